"""UPO (Unified Preference Optimization): GRPO's policy gradient plus a DPO loss on preference pairs, in one step.

    L_UPO = L_PG + λ · L_DPO
    L_DPO = -log σ(β · [(log π(y+|x) − log π_ref(y+|x)) − (log π(y−|x) − log π_ref(y−|x))])

`UPOTrainer` is TRL's `GRPOTrainer` (generation, rewards, group advantages, every loss type, LoRA, vLLM) with a few
overrides, each there for one reason:

- `__init__`: resolves rewards by name (`UPOConfig.rewards`); renders conversational prompts to text in each row's
  thinking mode, because GRPO applies one global `chat_template_kwargs`; and lets GRPO build its reference even when
  `beta == 0` (GRPO builds one only for its KL term, the DPO term needs one whenever λ > 0). The reference is then what
  GRPO would use: for a PeftModel that already carries a trained adapter, a frozen copy of it (the "ref" adapter: the
  previous stage); for a fresh adapter (`peft_config`), the base model (adapter disabled); for a full model, a
  separate reference model. GRPO's `beta` is restored afterwards, so no KL penalty is added.
- `_calculate_rewards`: standardises the rewards per group (`normalize_rewards_by`, e.g. domain) before GRPO forms
  advantages, logs the raw reward per domain, and keeps the combined reward of the whole generation batch for mining.
- `_generate_and_score_completions`: mines the online pairs, because only here are whole groups and their rewards
  visible (GRPO then shuffles the rollouts and splits them over `steps_per_generation` micro-steps, which separates
  group members). A pair travels on its chosen row: the rejected completion's ids and both reference log-probs become
  extra per-row tensors that GRPO's shuffle and split carry like any other column.
- `_get_per_token_logps_and_entropies`: captures the log-probs of GRPO's own loss forward, so log π(y+|x) of each
  chosen rollout is reused, not recomputed.
- `compute_loss`: GRPO's loss plus λ · L_DPO. One extra forward per micro-step scores the rejected rollouts and both
  sides of this micro-step's offline pairs (offline reference log-probs: one more, gradient-free). The sum is divided
  like GRPO's `dapo` loss, so the accumulated gradient is λ × the mean DPO loss over all pairs of the step. With
  `steps_per_generation > gradient_accumulation_steps` a generation batch spans several steps and the online count is
  spread evenly over them, so a step's weight is exact only on average; with `steps_per_generation <
  gradient_accumulation_steps` a step spans several generation batches and each is weighted by its own count (a
  batch without a pair then lowers the step's DPO weight), as GRPO's `dapo` normaliser does.

Every process runs the same number of extra forwards per step, on a placeholder row when it has no pair: under DDP,
FSDP or ZeRO-3 a forward is a collective operation, and a mismatch hangs (tested with two processes).

Log-probs in the DPO term are GRPO's: summed over completion tokens, at the sampling `temperature` (1.0 by default).
With λ = 0 no override changes anything GRPO computes (tested against `GRPOTrainer` with the same `disable_dropout`:
UPOConfig defaults it to True, GRPOConfig to False, which differ as soon as the adapter has dropout). Not supported
with λ > 0: tools/environments, custom rollout functions (the constructor does not take them at all).

Images (a VLM's processor, an `images` column): GRPO needs the prompts conversational to attach the images, so they are
not rendered per row; GRPO applies one `chat_template_kwargs` to all of them, so image prompts must share one thinking
mode, which becomes `chat_template_kwargs.enable_thinking`. The DPO term scores a pair's rejected rollout (and the
reference scores both) with the images of its prompt, selected per row from GRPO's batch (`select_images`); offline
pairs with images carry their own, processed once (`load_offline_pairs`). Text prompts and pairs may sit among image
ones: `_tokenize_prompts` and `_called` make GRPO's batches of both kinds work (see there).

ERNIE-4.5-VL routes each token to text or vision experts by `moe_mm_token_type_ids`, which GRPO neither passes to the
model nor extends over the completion (`posttrain.moe_routing`). `_get_per_token_logps_and_entropies` gives every
forward (GRPO's and the DPO term's) the routing of its own tokens, and `_tokenize_prompts` works around its processor
failing on a batch of prompts of different lengths.
"""

import contextlib
import json
from pathlib import Path

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, nanstd, use_adapter

from ..data import render_prompt
from ..errors import UserError
from ..io import write_json
from ..models import sampling_weights
from ..moe_routing import MOE_ROUTING, routes_by_modality, vision_experts_in_graph, with_routing
from ..reward_groups import normalize_by_group, weighted_sum
from ..rewards import resolve_rewards
from .upo_config import UPOConfig
from .upo_pairs import (
    PER_IMAGE_INPUTS,
    OfflinePairs,
    default_margin,
    dpo_loss,
    load_offline_pairs,
    merge_images,
    mine_pairs,
    pack,
    pad_sequences,
    render_prompts,
    select_images,
    uniform_groups,
)

OFFLINE_STATE = "upo_offline_pairs.json"  # in each checkpoint: where the offline pairs' shared order stands
GENERATION_STATE = "upo_generation_{rank}.pt"  # in a checkpoint inside a generation batch: its rollouts, per process

# Any non-zero value: GRPOTrainer only builds a reference (ref adapter or ref model) when `beta != 0`.
# Why borrow it instead of building one ourselves: GRPOTrainer.__init__ builds the reference in three places that
# depend on each other (the frozen "ref" copy of a loaded adapter, a separate model for full fine-tuning, and its
# DeepSpeed / FSDP / accelerate preparation) and has no argument to ask for a reference without the KL term; a copy of
# that code would drift from TRL's. So `beta` is set for the duration of `super().__init__` only, in `__init__` below.
_BETA_TO_BUILD_REFERENCE = 1.0


class UPOTrainer(GRPOTrainer):
    r"""
    Trainer for UPO: [`~trl.GRPOTrainer`] plus `upo_lambda` × a DPO loss on online and/or offline preference pairs.

    Example (a stage continuing the previous stage's LoRA adapter, which becomes the frozen reference):

    ```python
    >>> from posttrain.models import load_model, load_tokenizer
    >>> from posttrain.trainers import UPOConfig, UPOTrainer

    >>> tokenizer = load_tokenizer(base_path)
    >>> model = load_model(base_path, adapter=dpo_adapter_dir, is_trainable=True)  # no peft_config with a PeftModel
    >>> args = UPOConfig(output_dir="outputs/run/upo", rewards={"accuracy": 1.0, "think_format": 0.5},
    ...                  normalize_rewards_by="domain", upo_lambda=0.5, upo_beta=0.1)
    >>> trainer = UPOTrainer(model, args=args, train_dataset=prompts, processing_class=tokenizer)
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The policy. A PeftModel with a trained adapter (loaded with `is_trainable=True`) keeps training that
            adapter, and a frozen copy of it is the reference. A plain model with `peft_config` trains a fresh adapter
            against the base model. A plain model without `peft_config` is fully fine-tuned against a reference copy.
        reward_funcs (`RewardFunc | list[RewardFunc]`, *optional*):
            As in GRPOTrainer; only when `args.rewards` is `None`.
        args ([`UPOConfig`]):
            Configuration.
        train_dataset ([`~datasets.Dataset`]):
            RL prompts: `prompt` (conversational or text) and the columns the rewards read (`answer`, `domain`,
            `thinking`, ...). Conversational prompts with a `thinking` column are rendered to text in each row's mode.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Same format as `train_dataset`. Evaluation adds the DPO term of online pairs only.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer, left-padding. Required: it renders prompts and tokenizes offline pairs.
        reward_processing_classes, callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.GRPOTrainer`]. Tools, environments and custom rollout functions are not supported.
        offline_dataset ([`~datasets.Dataset`], *optional*):
            The offline pairs already loaded (the upo stage passes them after its pre-flight gate); default: loaded
            from `args.upo_offline_dataset`.
    """

    _tag_names = ["trl", "grpo", "upo", "posttrain"]
    _name = "UPO"
    _capture_logps = False  # class default: set before GRPOTrainer.__init__ could ever run a forward
    _routing = False  # set after GRPOTrainer.__init__: whether the model routes tokens by modality (ERNIE-4.5-VL)

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: UPOConfig = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        offline_dataset=None,
    ):
        if not isinstance(args, UPOConfig):
            raise TypeError(f"UPOTrainer needs a UPOConfig as `args`, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("UPOTrainer needs `processing_class` (the tokenizer): it renders prompts per thinking mode "
                             "and tokenizes offline pairs")
        reward_funcs, reward_weights = self._resolve_reward_funcs(reward_funcs, args)
        self._check_dataset(train_dataset, args)
        for name, held_out in (eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}).items():
            self._check_dataset(held_out, args, f"evaluation data {name}".strip())
        self._check_trainable(model, peft_config)
        train_dataset, eval_dataset = self._prompts_for_grpo(train_dataset, eval_dataset, processing_class, args)

        build_reference = args.upo_lambda > 0 and args.beta == 0.0
        if build_reference:  # see the module docstring: borrow GRPO's reference building, then restore beta
            args.beta = _BETA_TO_BUILD_REFERENCE
        try:
            super().__init__(
                model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class,
                reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config,
            )
        finally:
            if build_reference:
                args.beta = 0.0
        self.beta = args.beta  # 0.0: GRPO adds no KL term and skips its own reference pass
        if reward_weights is not None:
            self.reward_weights = torch.tensor(reward_weights, dtype=torch.float32)
        self._check_think_tags_survive_decoding()

        self._online = args.upo_mode in ("online", "both")
        self._offline = self._offline_pairs(args, processing_class, offline_dataset)
        self._captured_logps = None
        self._routing = routes_by_modality(processing_class)  # ERNIE-4.5-VL (see the module docstring)
        self._batch_rewards = None  # combined rewards of the current generation batch (all processes)
        self._pooled = {"train": {}, "eval": {}}  # `_log_mean`'s sums and counts since the last log, per metric

    def _prompts_for_grpo(self, train_dataset, eval_dataset, processing_class, args):
        """Text prompts rendered here, each in its row's thinking mode (GRPO would render them all with
        `chat_template_kwargs`); image prompts, which GRPO renders, all of one mode and padded on the left."""
        if "images" in (train_dataset.column_names or []):
            self._one_thinking_mode(train_dataset, args)
            # GRPO left-pads the prompt ids but takes the per-token image types (`mm_token_type_ids`) from the
            # processor's own padding: right-padded, they miss the image tokens of every shorter prompt, and
            # Qwen-VL's and ERNIE-4.5-VL's rotary positions come out wrong (or fail on a shape mismatch)
            processing_class.tokenizer.padding_side = "left"
            return train_dataset, eval_dataset
        kwargs = args.chat_template_kwargs
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: render_prompts(ds, processing_class, kwargs) for name, ds in eval_dataset.items()}
        else:
            eval_dataset = render_prompts(eval_dataset, processing_class, kwargs)
        return render_prompts(train_dataset, processing_class, kwargs), eval_dataset

    def _offline_pairs(self, args, processing_class, offline_dataset) -> OfflinePairs | None:
        """The offline pairs, tokenized once, for `upo_mode` offline or both; None otherwise."""
        if args.upo_mode not in ("offline", "both"):
            return None
        processor = None if processing_class is self._tokenizer else processing_class  # a VLM's processor
        pairs = load_offline_pairs(args.upo_offline_dataset, self._tokenizer, args.max_completion_length,
                                   processor, offline_dataset, template_kwargs=args.chat_template_kwargs,
                                   drop_truncated=args.mask_truncated_completions)
        return OfflinePairs(pairs, seed=str(args.seed), rank=self.accelerator.process_index,
                            processes=self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------------------------------
    # The offline pairs' position and an unfinished generation batch are part of a checkpoint: a resumed run trains on
    # what an uninterrupted one would
    # ------------------------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self._offline is not None and self.args.should_save:
            write_json(folder / OFFLINE_STATE, self._offline.state_dict())
        if self._step % self._generate_every:  # GRPO keeps these in memory only; every process its own rollouts
            state = {"step": self._step, "buffered_inputs": self._buffered_inputs}
            torch.save(state, folder / GENERATION_STATE.format(rank=self.accelerator.process_index))

    @property
    def _generate_every(self) -> int:
        """Micro-steps one generation batch trains for (GRPO's `_prepare_inputs`)."""
        return self.args.steps_per_generation * self.num_iterations

    def _restore_generation(self, checkpoint: Path):
        """A checkpoint inside a generation batch (`steps_per_generation` > `gradient_accumulation_steps`, or
        `num_iterations` > 1) resumes on the batch's saved rollouts and GRPO's micro-step count: without them GRPO
        restarts its count at 0 and samples new rollouts, from later weights, at the resume point."""
        path = checkpoint / GENERATION_STATE.format(rank=self.accelerator.process_index)
        if path.is_file():
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]
            return
        step = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["global_step"]
        if step * self.args.gradient_accumulation_steps % self._generate_every:
            raise UserError(f"{path} is missing: checkpoint-{step} falls inside a generation batch (steps_per_generation "
                            f"{self.args.steps_per_generation} x num_iterations {self.num_iterations} micro-steps, "
                            f"gradient_accumulation_steps {self.args.gradient_accumulation_steps}) and was saved "
                            "without its rollouts, so resuming would train on other rollouts than an uninterrupted "
                            "run; remove the checkpoint to start the stage over")

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self._restore_generation(Path(resume_from_checkpoint))
        if resume_from_checkpoint and self._offline is not None:
            path = Path(resume_from_checkpoint) / OFFLINE_STATE
            if not path.is_file():
                raise UserError(f"{path} is missing: this checkpoint was saved without the offline pairs' position, "
                                "so resuming would train on other pairs than an uninterrupted run; remove the "
                                "checkpoint to start the stage over")
            self._offline.load_state_dict(json.loads(path.read_text()), str(path))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _get_train_sampler(self, dataset=None):
        self._prompt_sampler = super()._get_train_sampler(dataset)
        self._prompt_sampler.__class__ = EpochRepeatSampler  # GRPO's `RepeatSampler`, plus `set_epoch`
        return self._prompt_sampler

    def _run_epoch(self, *args, **kwargs):
        # Called here, not left to the Trainer and accelerate: resumed inside an epoch on several processes, their
        # `set_epoch` does not reach a sampler under both accelerate's `SkipBatchSampler` and `BatchSamplerShard`
        if getattr(self, "_prompt_sampler", None) is not None:
            self._prompt_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------------
    # Construction checks
    # ------------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_reward_funcs(reward_funcs, args):
        if args.rewards is None:
            if reward_funcs is None:
                raise UserError("no rewards: set `rewards` in the UPO config, e.g. {accuracy: 1.0, think_format: 0.5}")
            return reward_funcs, None
        if reward_funcs is not None:
            raise ValueError("pass either `reward_funcs` to UPOTrainer or `rewards` in UPOConfig, not both")
        return resolve_rewards(args.rewards)

    @staticmethod
    def _check_dataset(dataset, args, name="training data"):
        columns = (dataset.column_names or []) if dataset is not None else []
        if args.normalize_rewards_by and columns and args.normalize_rewards_by not in columns:
            raise UserError(f"normalize_rewards_by is '{args.normalize_rewards_by}' but the {name} has no such "
                            f"column (has: {', '.join(columns)})")
        if "image" in columns:
            raise UserError("image prompts go in an `images` column (a list of images per row), not `image`")

    @staticmethod
    def _one_thinking_mode(dataset, args):
        """Image prompts stay conversational and GRPO renders them all with `args.chat_template_kwargs`: their one
        thinking mode becomes its `enable_thinking`."""
        if "thinking" not in dataset.column_names:
            return
        modes = {bool(mode) for mode in dataset["thinking"] if mode is not None}
        kwargs = args.chat_template_kwargs or {}
        if len(modes) > 1:
            raise UserError("image prompts of both thinking modes: GRPO renders image prompts with one "
                            "chat_template_kwargs, so give UPO the prompts of one mode (the upo stage keeps those "
                            "matching `chat_template_kwargs: {enable_thinking: true|false}`)")
        if modes and kwargs.get("enable_thinking", modes == {True}) != (modes == {True}):
            raise UserError(f"chat_template_kwargs.enable_thinking is {kwargs['enable_thinking']} but the image "
                            f"prompts' thinking column is {modes.pop()}")
        if modes:
            args.chat_template_kwargs = {**kwargs, "enable_thinking": modes == {True}}

    @staticmethod
    def _check_trainable(model, peft_config):
        if is_peft_model(model) and peft_config is None and not any(p.requires_grad for p in model.parameters()):
            raise UserError("the LoRA adapter has no trainable parameters: it was loaded for inference. Load it with "
                            "is_trainable=True (posttrain.models.load_model(..., adapter=..., is_trainable=True))")

    def _check_think_tags_survive_decoding(self):
        """GRPO decodes completions with `skip_special_tokens=True`; if the tokenizer marks `<think>` as special, the
        tags vanish and `think_format` would silently score every completion as tag-free."""
        if "think_format" not in self.reward_func_names:
            return
        ids = self._tokenizer(text="<think>x</think>", add_special_tokens=False)["input_ids"]
        if "<think>" not in self._tokenizer.decode(ids, skip_special_tokens=True):
            raise UserError("the tokenizer marks <think>/</think> as special tokens, so decoded completions lose them "
                            "and the think_format reward cannot see them. Register them as normal added tokens "
                            "(special=False) or drop think_format from `rewards`.")

    # ------------------------------------------------------------------------------------------------------------------
    # Rewards and online pairs (whole generation batch visible)
    # ------------------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self.args.rewards and prompts and not isinstance(prompts[0], str):
            # conversational (image) prompts, rendered as GRPO rendered them: the rewards then see a think block the
            # template's generation prompt opened (`rewards.as_written`)
            prompts = [render_prompt(self.processing_class, p, extra=self.chat_template_kwargs) for p in prompts]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
        mode = "train" if self.model.training else "eval"
        column = self.args.normalize_rewards_by or ("domain" if "domain" in inputs[0] else None)
        if column is not None:
            groups = gather_object([row[column] for row in inputs])  # same process order as the gathered rewards
            self._log_rewards_by_group(mode, weighted_sum(rewards_per_func, self.reward_weights), groups)
            if self.args.normalize_rewards_by:  # GRPO's group scaling is off (UPOConfig): this std is the scale
                rewards_per_func = normalize_by_group(rewards_per_func, self.reward_weights, groups)
        self._batch_rewards = weighted_sum(rewards_per_func, self.reward_weights)
        return rewards_per_func

    def _log_rewards_by_group(self, mode, rewards, groups):
        for key in dict.fromkeys(groups):
            values = rewards[torch.tensor([g == key for g in groups], device=rewards.device)]
            self._metrics[mode][f"upo/reward/{key}/mean"].append(torch.nanmean(values).item())
            self._metrics[mode][f"upo/reward/{key}/std"].append(nanstd(values).item())

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        if self._online:
            self._mine_online_pairs(output, num_generations, mode)
        if self.args.drop_uniform_groups and mode == "train":
            self._drop_uniform_groups(output, num_generations)
        return output

    def _mine_online_pairs(self, output, num_generations, mode):
        # Masked-out rollouts (e.g. truncated, with mask_truncated_completions) have no log-probs to compare
        valid = self.accelerator.gather((output["completion_mask"].sum(dim=1) > 0).long())
        rewards = self._batch_rewards
        margin = default_margin(rewards, valid) if self.args.upo_margin is None else self.args.upo_margin
        pairs = mine_pairs(rewards, num_generations, margin, self.args.upo_pairs_per_prompt, valid)
        self._metrics[mode]["upo/pairs_online"].append(float(len(pairs)))
        # a mean over the pairs since the last log, as the other pair metrics (`log`); the pairs are already those of
        # every process, so no gather
        self._pool(mode, "upo/pair_reward_gap", sum(gap for _, _, gap in pairs), len(pairs))
        self._metrics[mode]["upo/margin"].append(margin)
        if self.args.upo_lambda > 0:
            output.update(self._pair_columns(output, pairs))

    def _drop_uniform_groups(self, output, num_generations):
        """Zero the completion masks of this process's rows in groups whose rewards are all equal, and recount GRPO's
        loss tokens over every process (`drop_uniform_groups`). Written here because GRPOTrainer has no such filter;
        the rows stay in the batch, so shapes, the split over `steps_per_generation` and every process's forwards are
        unchanged. Uniform groups give no online pairs, so the pairs are untouched."""
        uniform = uniform_groups(self._batch_rewards, num_generations)  # gathered: every process's groups
        self._metrics["train"]["upo/groups_dropped"].append(uniform.float().mean().item())
        rows = output["completion_mask"].size(0)
        start = self.accelerator.process_index * rows
        keep = (~uniform).repeat_interleave(num_generations)[start:start + rows].to(output["completion_mask"])
        output["completion_mask"] = output["completion_mask"] * keep.unsqueeze(1)
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

    def _generate_single_turn(self, *args, **kwargs):
        """GRPO's rollouts, sampled from merged weights when `merged_rollouts` allows (see UPOConfig)."""
        with self._rollout_weights():
            return super()._generate_single_turn(*args, **kwargs)

    def _rollout_weights(self):
        plain = not (self.use_vllm or self.use_transformers_continuous_batching or self.is_fsdp_enabled
                     or self.is_deepspeed_enabled)
        if not (self.args.merged_rollouts and plain and is_peft_model(self.model)):
            return contextlib.nullcontext()
        return sampling_weights(self.model, self.args.bf16, merge_lora=True)

    def _pair_columns(self, output, pairs):
        """Per-row tensors that carry each pair on its chosen row through GRPO's shuffle and split."""
        device = self.accelerator.device
        rows = output["completion_ids"].size(0)
        start = self.accelerator.process_index * rows
        # The rejected rollout may live on another process (a group can span processes): share the completions
        completions = gather_object(_unpad(output["completion_ids"], output["completion_mask"], as_lists=True))
        rejected_of = {chosen - start: rejected for chosen, rejected, _ in pairs if start <= chosen < start + rows}
        has_pair = torch.zeros(rows, dtype=torch.bool, device=device)
        has_pair[sorted(rejected_of)] = True
        rejected = [completions[rejected_of[i]] if i in rejected_of else [] for i in range(rows)]
        rejected_ids, rejected_mask = pad_sequences(rejected, self._tokenizer.pad_token_id, "right", device)

        prompts = _unpad(output["prompt_ids"][has_pair], output["prompt_mask"][has_pair])
        chosen = _unpad(output["completion_ids"][has_pair], output["completion_mask"][has_pair])
        paired = sorted(rejected_of)
        rejected = [rejected[i] for i in paired]
        if "ref_per_token_logps" in output:  # beta > 0: GRPO already scored every rollout under the reference
            ref_chosen_local = (output["ref_per_token_logps"] * output["completion_mask"]).sum(-1)[has_pair]
            ref_rejected_local = self._reference_logps(prompts, rejected, select_images(output, paired))
        else:
            ref = self._reference_logps(prompts * 2, chosen + rejected, select_images(output, paired * 2))
            ref_chosen_local, ref_rejected_local = ref[: len(chosen)], ref[len(chosen) :]
        ref_chosen = torch.zeros(rows, device=device).masked_scatter(has_pair, ref_chosen_local)
        ref_rejected = torch.zeros(rows, device=device).masked_scatter(has_pair, ref_rejected_local)
        return {
            "upo_has_pair": has_pair,
            "upo_rejected_ids": rejected_ids,
            "upo_rejected_mask": rejected_mask,
            "upo_ref_chosen_logps": ref_chosen,
            "upo_ref_rejected_logps": ref_rejected,
            "upo_num_pairs": torch.tensor(float(len(pairs)), device=device),  # 0-dim: not split, not shuffled
        }

    # ------------------------------------------------------------------------------------------------------------------
    # Log-probs. Each helper runs the same number of forwards on every process, on a placeholder row when it has nothing
    # to score: under DDP, FSDP or ZeRO-3 a forward is a collective operation, and processes that disagree on how many
    # they run hang. So every process calls them the same number of times per step, whatever its number of pairs.
    # ------------------------------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self._routing:  # GRPO passes no routing, or the processor's for the prompt only: route by the tokens
            kwargs.pop(MOE_ROUTING, None)
        model = self._called(model)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._capture_logps:  # GRPO's loss forward: keep the policy log-probs for the chosen rollouts
            self._captured_logps = logps
        return logps, entropies, aux_loss

    def _pack(self, prompts, completions):
        if prompts:
            return pack(prompts, completions, self._tokenizer.pad_token_id, self.accelerator.device)
        pad_id = self._tokenizer.pad_token_id
        prompt_ids, prompt_mask, completion_ids, completion_mask = pack(
            [[pad_id]], [[pad_id]], pad_id, self.accelerator.device
        )
        return prompt_ids, prompt_mask, completion_ids, torch.zeros_like(completion_mask)  # placeholder: nothing scored

    def _sequence_logps(self, model, prompts, completions, images=None):
        """Summed log-prob of each completion given its prompt under `model`; one placeholder value if there are none.

        `images`: the image inputs of the first rows' prompts (`select_images`); later rows have none."""
        prompt_ids, prompt_mask, completion_ids, completion_mask = self._pack(prompts, completions)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        kwargs = {}
        if images and prompts:
            kwargs = {k: v.to(input_ids.device) for k, v in images.items() if isinstance(v, torch.Tensor)}
            kwargs["num_images"] = images["num_images"] + [0] * (len(prompts) - len(images["num_images"]))
            for key in images.get("typed", []):  # per-token image markers, for this layout of the tokens
                kwargs[key] = (input_ids == self.model.config.image_token_id).long()
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, torch.cat([prompt_mask, completion_mask], dim=1), completion_ids.size(1), **kwargs
        )
        return (logps * completion_mask).sum(-1)

    @torch.no_grad()
    def _reference_logps(self, prompts, completions, images=None):
        """Summed log π_ref(completion | prompt) per row, under the reference GRPO built (see the module docstring)."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self._chunked_logps(self.ref_model, prompts, completions, images)
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return self._chunked_logps(self.model, prompts, completions, images)

    def _chunked_logps(self, model, prompts, completions, images=None):
        """`_sequence_logps` in chunks of `per_device_train_batch_size` rows, like GRPO's own forwards: the pairs of
        a whole generation batch in one forward would be an out-of-memory risk at real sizes. Every process runs as
        many chunks as the process with the most rows needs (placeholders when it has none left). Rows with images go
        in one forward (`images` belongs to the first rows of the list), on every process: its size the most rows any
        process has, not this process's own, or processes with fewer rows would run more forwards (a hang under FSDP
        and ZeRO-3, where every forward gathers the weights)."""
        most = self.accelerator.gather(torch.tensor([len(prompts)], device=self.accelerator.device)).max().item()
        size = max(int(most), 1) if images else self.args.per_device_train_batch_size
        parts = []
        for start in range(0, max(int(most), 1), size):
            rows = slice(start, start + size)
            logps = self._sequence_logps(model, prompts[rows], completions[rows], images if start == 0 else None)
            parts.append(logps[: len(prompts[rows])])
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------------------------------
    # Vision inputs: batches of image and text prompts, and ERNIE-4.5-VL's expert routing (`moe_mm_token_type_ids`,
    # see posttrain.moe_routing), which GRPO does not carry
    # ------------------------------------------------------------------------------------------------------------------
    def _called(self, model):
        """`model` as GRPO calls it (keyword inputs, one chunk of rows at a time), with two repairs. A chunk of text
        rows from a batch that mixes image and text prompts gets GRPO's slice of the batch's image inputs, which is
        empty, and the vision towers fail on it (an empty `torch.cat`, a reshape of 0 elements): it gets none. And
        ERNIE-4.5-VL gets the routing of the chunk's tokens."""

        def forward(**inputs):
            pixels = inputs.get("pixel_values")
            if pixels is not None and pixels.numel() == 0:
                inputs = {key: value for key, value in inputs.items() if key not in PER_IMAGE_INPUTS}
            if not self._routing:
                return model(**inputs)
            inputs = with_routing(self.processing_class, inputs)
            if _inside_ddp(model) is model or not (self.model.training and self._offline_images()):
                return model(**inputs)
            with vision_experts_in_graph(model.module, inputs):  # see there: the offline image pairs' forward
                return model(**inputs)

        return forward

    def _offline_images(self) -> bool:
        """Whether the offline pairs are image pairs (rows with their images; text rows among them have none)."""
        return self._offline is not None and len(self._offline.pairs[0]) > 3

    def _tokenize_prompts(self, prompts):
        """GRPO's tokenized prompts, with two repairs.

        A generation batch may mix image and text prompts (a vision set with text rows): GRPO lists None as a text
        prompt's images, which the processors refuse when it scores the batch ("only a single or a list of entries
        is supported"); they take an empty list, so that is what a text prompt gets.

        ERNIE-4.5-VL's processor (transformers 5.23) builds its routing with one numpy array over the batch, which
        fails on the unpadded prompts of different lengths GRPO tokenizes together. So those are tokenized one at a
        time and merged as GRPO merges per-environment prompts: tensors concatenated, other fields joined by rows
        (a text prompt has no image fields)."""
        if not self._routing or len(prompts) == 1:
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            return prompt_ids, None if images is None else [found or [] for found in images], fields
        tokenize = super()._tokenize_prompts
        parts = [tokenize([prompt]) for prompt in prompts]
        prompt_ids = [ids for part in parts for ids in part[0]]
        images = [part[1][0] if part[1] else [] for part in parts]
        keys = dict.fromkeys(key for part in parts for key in part[2])
        fields = {key: [part[2][key] for part in parts if key in part[2]] for key in keys}
        fields = {key: torch.cat(values) if isinstance(values[0], torch.Tensor) else [row for v in values for row in v]
                  for key, values in fields.items()}
        return prompt_ids, images if any(images) else None, fields

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if self.args.upo_lambda == 0.0:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._log_pg_loss(mode, loss)
            return loss
        self._capture_logps = True
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._capture_logps = False
        policy_logps, self._captured_logps = self._captured_logps, None
        self._log_pg_loss(mode, loss)

        chosen, rejected, ref_chosen, ref_rejected, forward, chosen_tokens = self._pair_logps(
            model, inputs, policy_logps, mode
        )
        losses, logits = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.args.upo_beta)
        self._log_dpo(mode, losses, logits, chosen - ref_chosen, rejected - ref_rejected)
        if self.args.upo_sft_weight:  # each chosen reply's NLL per token (RPO), averaged over pairs like the DPO term
            nll = -chosen / chosen_tokens.clamp(min=1)
            self._log_mean(mode, "upo/sft_loss", nll)  # every process: a gather
            losses = losses + self.args.upo_sft_weight * nll
        loss = loss + 0.0 * forward.sum()  # keeps the extra forward in the graph even when it scored only a placeholder
        if losses.numel():
            loss = loss + self.args.upo_lambda * losses.sum() / self._dpo_normalizer(inputs, mode, losses.numel())
        return loss

    def _pair_logps(self, model, inputs, policy_logps, mode):
        """Summed log-probs of this micro-step's pairs, online pairs first: chosen, rejected, ref chosen, ref rejected,
        plus the raw output of the one extra policy forward (rejected rollouts and both sides of the offline pairs) and
        the chosen replies' token counts."""
        empty = torch.zeros(0, device=self.accelerator.device)
        chosen, ref_chosen, ref_rejected, chosen_tokens = empty, empty, empty, empty
        prompts, completions, images = [], [], None
        if "upo_has_pair" in inputs:
            rows = inputs["upo_has_pair"]
            chosen = (policy_logps[rows] * inputs["completion_mask"][rows]).sum(-1)  # reused from GRPO's forward
            chosen_tokens = inputs["completion_mask"][rows].sum(-1).float()
            ref_chosen, ref_rejected = inputs["upo_ref_chosen_logps"][rows], inputs["upo_ref_rejected_logps"][rows]
            prompts = _unpad(inputs["prompt_ids"][rows], inputs["prompt_mask"][rows])
            completions = _unpad(inputs["upo_rejected_ids"][rows], inputs["upo_rejected_mask"][rows])
            images = select_images(inputs, rows.nonzero().flatten().tolist())
        num_online = len(prompts)
        offline = self._draw_offline() if self._offline is not None and mode == "train" else []
        offline_prompts = [pair[0] for pair in offline] * 2
        offline_completions = [pair[1] for pair in offline] + [pair[2] for pair in offline]
        offline_images = {}
        if mode == "train" and self._offline_images():
            # image pairs: truthy without any on this process too, as `select_images` for no rows, so that every
            # process scores them in as many forwards (`_chunked_logps`)
            offline_images = merge_images([pair[3] for pair in offline] * 2) or {"num_images": []}
        forward = self._sequence_logps(_inside_ddp(model), prompts + offline_prompts,  # grad
                                       completions + offline_completions, merge_images([images, offline_images]))
        rejected = forward[:num_online]
        if self._offline is not None and mode == "train":
            ref = self._reference_logps(offline_prompts, offline_completions, offline_images)
            n, end = len(offline), num_online + 2 * len(offline)
            chosen = torch.cat([chosen, forward[num_online : num_online + n]])
            rejected = torch.cat([rejected, forward[num_online + n : end]])
            ref_chosen, ref_rejected = torch.cat([ref_chosen, ref[:n]]), torch.cat([ref_rejected, ref[n:]])
            counts = torch.tensor([float(len(pair[1])) for pair in offline], device=chosen_tokens.device)
            chosen_tokens = torch.cat([chosen_tokens, counts])
        return chosen, rejected, ref_chosen, ref_rejected, forward, chosen_tokens

    def _offline_per_step(self) -> int:
        """Offline pairs per optimizer step, all processes together: `upo_offline_ratio` per prompt of the step's rows
        (every micro-step of the accumulation, every process), rounded, at least 1. Counted per step, not per
        micro-step: rounded per micro-step, half the batch with twice the accumulation (the same rows a step) drew
        other numbers of pairs (ratio 0.5, 2 prompts a step: 1 pair in one micro-step of 8 rows, 2 in two of 4). Over
        all processes, not per process, for the same reason: a prompt's rollouts split over two processes (half a
        prompt each) would otherwise get a pair each. An integer, so that the DPO normaliser counts exactly the pairs
        each step trains on."""
        rows = (self.args.per_device_train_batch_size * self.accelerator.num_processes
                * self.current_gradient_accumulation_steps)
        return max(1, round(self.args.upo_offline_ratio * rows / self.num_generations))

    def _draw_offline(self):
        """This micro-step's share of the step's offline pairs, spread as evenly as they go (a micro-step may get
        none): together the pairs one draw of the step's count gives; `upo/pairs_offline` logs that count."""
        steps, total = self.current_gradient_accumulation_steps, self._offline_per_step()
        micro = self._step % steps  # GRPO's count of micro-steps, incremented after each
        if micro == 0:
            self._offline.start_step(total)
            self._metrics["train"]["upo/pairs_offline"].append(float(total))
        return self._offline.take((micro + 1) * total // steps - micro * total // steps, in_step=True)

    def _dpo_normalizer(self, inputs, mode, local_pairs) -> float:
        """What this process divides its DPO sum by, so that after gradient accumulation and DDP's mean over processes
        the DPO term is the mean over all pairs of the optimizer step (all processes). Mirrors GRPO's `dapo` loss:
        the global count, clamped to >= 1, divided by the number of processes."""
        if mode == "eval":  # no accumulation; each batch is averaged on its own
            return float(local_pairs)
        steps = self.current_gradient_accumulation_steps
        processes = self.accelerator.num_processes
        window = 0.0
        if "upo_num_pairs" in inputs:  # online pairs of the whole generation batch, spread over steps_per_generation
            window += inputs["upo_num_pairs"].item() * steps / self.args.steps_per_generation
        if self._offline is not None:
            window += self._offline_per_step()
        return max(window, 1.0) / processes

    # ------------------------------------------------------------------------------------------------------------------
    # Metrics (every process calls the same gathers in the same order)
    # ------------------------------------------------------------------------------------------------------------------
    def _log_mean(self, mode, name, values):
        """Adds `values` (this process's) to the metric's sum and count over all processes since the last log."""
        local = torch.stack([values.detach().float().sum(), torch.tensor(float(values.numel()), device=values.device)])
        total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
        self._pool(mode, name, total, count)

    def _pool(self, mode, name, total, count):
        before = self._pooled[mode].get(name, (0.0, 0.0))
        self._pooled[mode][name] = (before[0] + total, before[1] + count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """GRPO's log, which averages each metric's values per micro-step as they were appended; `_log_mean`'s
        metrics (the DPO term's loss, accuracy and margins) are means over every pair since the last log instead,
        as the loss weighs them: a micro-step with one pair counts as one pair, not as much as one with ten."""
        mode = "train" if self.model.training else "eval"
        # a metric with no values since the last log (no pairs) is left out: GRPO's log would pass its NaN on as None,
        # which TensorBoard warns about at every log ("attempting to log a value of None") and trackio stores
        for name, (total, count) in self._pooled[mode].items():
            if count:
                self._metrics[mode][name] = [total / count]
        self._pooled[mode].clear()
        super().log(logs, start_time)

    def _log_pg_loss(self, mode, loss):
        # GRPO's micro-step loss is pre-divided for gradient accumulation; undo it so the logged value reads per step
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1
        self._log_mean(mode, "upo/pg_loss", loss.detach().reshape(1) * scale)

    def _log_dpo(self, mode, losses, logits, chosen_logratios, rejected_logratios):
        self._log_mean(mode, "upo/dpo_loss", losses)
        self._log_mean(mode, "upo/dpo_accuracy", (logits > 0).float())
        self._log_mean(mode, "upo/dpo_margin", logits)
        self._log_mean(mode, "upo/chosen_logratio", chosen_logratios)
        self._log_mean(mode, "upo/rejected_logratio", rejected_logratios)


class EpochRepeatSampler(RepeatSampler):
    """GRPO's prompt sampler, with each epoch's order the same whether or not this process trained the epochs before.
    GRPO's sampler draws every epoch's order from one generator seeded once, so a stage resumed in its second epoch or
    later drew the first epoch's order again: other prompts than the uninterrupted run's. `set_epoch`, called before
    each epoch (`UPOTrainer._run_epoch`), seeds the generator again and draws the orders of the epochs before, so an
    uninterrupted run keeps the orders it had."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


def _inside_ddp(model):
    """The module DDP wraps, for the pairs' forward. DDP readies its gradient all-reduce from the last forward it ran,
    and one without images (a process holding no pair this step scores a text placeholder) left out the vision modules
    GRPO's forward had used: trained or carried ones (`lora_modules_to_save`) then failed the backward ("marked as
    ready twice"). Every parameter the pairs' forward uses, GRPO's uses too, so its all-reduce still covers them
    (ERNIE-4.5-VL's vision experts, which text rows do not reach, are held in GRPO's graph: `_called`)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _unpad(ids: torch.Tensor, mask: torch.Tensor, as_lists: bool = False) -> list:
    """Rows of a padded batch without their padding."""
    rows = [row[row_mask.bool()] for row, row_mask in zip(ids, mask, strict=True)]
    return [row.tolist() for row in rows] if as_lists else rows
