"""`UPOConfig`: TRL's `GRPOConfig` plus the few fields UPO adds (see `upo_trainer.py` for the method)."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..configs import check_upo_values
from ..errors import UserError
from ..rewards import check_reward_names


@dataclass
class UPOConfig(GRPOConfig):
    r"""
    Configuration class for [`UPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the UPO fields below.

    UPO minimises `L_PG + upo_lambda * L_DPO`: GRPO's clipped policy-gradient loss (any `loss_type`) plus a DPO loss on
    preference pairs mined from the same batch's rollouts (online) and/or drawn from a preference dataset (offline).

    Parameters:
        upo_lambda (`float`, *optional*, defaults to `0.5`):
            λ, weight of the DPO term. `0.0` is plain GRPO: with `normalize_rewards_by` unset and the same
            `disable_dropout` (UPO defaults to `True`, GRPO to `False`: with LoRA dropout, set it on the GRPO side or
            pass `disable_dropout: false` here), the same rollouts, losses and gradients as [`~trl.GRPOTrainer`] (the
            UPO metrics are still logged).
        upo_beta (`float`, *optional*, defaults to `0.1`):
            β of the DPO loss `-log σ(β · [(log π(y+) − log π_ref(y+)) − (log π(y−) − log π_ref(y−))])`. Independent of
            GRPO's `beta` (the KL coefficient, default `0.0`), which UPO leaves alone.
        upo_margin (`float` or `None`, *optional*, defaults to `None`):
            Minimum reward gap `r+ − r−` for an online pair, in units of the combined reward (weights applied, after
            per-group normalisation when `normalize_rewards_by` is set). `None` means half the range (max − min) of
            the rewards observed in the current generation batch, i.e. "0.5 × reward range". A pair also always needs
            a strictly positive gap, so groups whose rewards are all equal never give a pair.
        upo_pairs_per_prompt (`int`, *optional*, defaults to `1`):
            At most this many online pairs per prompt group: best vs worst, second best vs second worst, ... (disjoint
            completions; each pair must pass the margin). At most `num_generations // 2`.
        upo_mode (`str`, *optional*, defaults to `"online"`):
            Where pairs come from: `"online"` (mined from the policy's own rollouts every generation batch),
            `"offline"` (a preference dataset prepared before the stage), or `"both"`.
        upo_offline_dataset (`str` or `None`, *optional*, defaults to `None`):
            Preference data for `"offline"`/`"both"`: a data_prep folder, a data file or a Hub id with columns
            `prompt`, `chosen`, `rejected` (conversational or plain text) and optionally `thinking`.
        upo_offline_ratio (`float`, *optional*, defaults to `1.0`):
            Offline pairs per RL prompt: each optimizer step, whose rows hold `per_device_train_batch_size ×
            processes × gradient_accumulation_steps / num_generations` prompts, mixes in `round(upo_offline_ratio ×
            that)` offline pairs, at least 1, spread over its micro-steps and shared out over the processes. `1.0`
            trains on as many offline pairs as prompts.
        rewards (`dict[str, float]` or `None`, *optional*, defaults to `None`):
            Reward functions by name from `posttrain.rewards.REWARDS`, or functions of your own by import path
            (`my_rewards.brevity`), with their weights, e.g. `{"accuracy": 1.0, "think_format": 0.5}`. Replaces
            GRPO's positional `reward_weights` (leave that unset): a recipe then names what it optimises, and the
            weights cannot drift out of order. When `None`, pass
            `reward_funcs` to the trainer instead.
        normalize_rewards_by (`str` or `None`, *optional*, defaults to `None`):
            A dataset column (e.g. `"domain"`): the combined reward is standardised within each of its values before
            GRPO computes group advantages and before pairs are mined, so the advantage of a rollout is
            `(r − mean of its prompt group) / std of r over its domain in the batch`: domains with large reward
            scales no longer drive the update, and a prompt group whose rewards barely differ is not blown up to unit
            scale the way GRPO's group std does. The per-value std *is* the scale, so `scale_rewards: "group"` (GRPO's
            default, under which standardising a whole domain would be absorbed and change nothing) becomes `"none"`;
            `"batch"` is kept. Not combinable with `multi_objective_aggregation: "normalize_then_sum"`, which
            re-standardises each reward per group. TRL's `reward`/`rewards/*` metrics then show normalised values;
            the raw rewards per group are logged as `upo/reward/<value>/mean|std`.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            GRPO's field with DPOConfig's default: dropout off in the policy and the reference, so the reference
            log-probs of the DPO term are deterministic and both sides of a pair are scored by the same function
            (GRPO defaults to `False`; with LoRA dropout, the "ref" adapter would otherwise apply it too).
        merged_rollouts (`bool`, *optional*, defaults to `True`):
            With a LoRA policy and transformers' `generate` (not vLLM, FSDP or DeepSpeed), rollouts are sampled
            from copies of the weights with the adapter merged in: with `bf16`, bf16 copies under bf16 autocast
            (`posttrain.models.frozen_weights_cast`); without it, on CPU, float32 copies (`sampling_weights`). GRPO
            otherwise decodes in float32 (accelerate's autocast wraps the training forward, not `generate`) through
            the unmerged LoRA layers. About 40% less rollout time for 8 x 40 tokens on 2 CPU cores with bf16. Only
            the sampler changes: the policy-gradient and DPO terms score the sampled tokens in a training forward
            either way.
        upo_sft_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the chosen replies' negative log-likelihood (per token, averaged over the pairs like the DPO
            loss) added to each pair's DPO loss, as the DPO stage's `loss_type: [sigmoid, sft]` (RPO) does: it keeps
            the likelihood of the chosen reply, right and well formed, from falling while the margin grows. The whole
            pair term is still weighted by `upo_lambda`. Logged as `upo/sft_loss`.
        drop_uniform_groups (`bool`, *optional*, defaults to `False`):
            Leave out of the loss the prompt groups whose rollouts all got the same reward (all right or all wrong),
            as ERNIE 4.5's RL filters them: their advantages are zero, so they add nothing to the policy gradient, but
            under GRPO's token-level normalisation (`loss_type` `dapo`, its default; also `bnpo`, `cispo`, `vespo`;
            the others are refused, as they do not divide by the token count) their tokens still count in the
            denominator and shrink every other group's step. Their completion masks are zeroed and the token count
            recomputed; no prompts are sampled to replace them (DAPO's dynamic sampling would, for more rollouts), so
            a batch's gradient comes from its informative groups only (with `beta` > 0, their KL term goes too).
            Training steps only; logged as `upo/groups_dropped` (the fraction of the generation batch's groups).
        padding_free (`bool`, *optional*, defaults to `False`):
            Score each batch of prompts and rollouts (GRPO's forwards, the DPO term's, the reference's) on its real
            tokens only, as one sequence with position ids restarting at each row, instead of left- and right-padded
            (`posttrain.models.padding_free`; applied by the UPO stage, on by default there). Image prompts stay
            padded. The same log-probs and gradients in float32.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["rewards"]

    upo_lambda: float = field(
        default=0.5,
        metadata={"help": "λ, weight of the DPO term in L_PG + λ·L_DPO. 0.0 is plain GRPO."},
    )
    upo_beta: float = field(
        default=0.1,
        metadata={"help": "β of the DPO loss. Independent of GRPO's `beta` (KL coefficient)."},
    )
    upo_margin: float | None = field(
        default=None,
        metadata={
            "help": "Minimum reward gap r+ − r− for an online pair, in combined-reward units. None: half the range of "
            "the rewards observed in the current generation batch."
        },
    )
    upo_pairs_per_prompt: int = field(
        default=1,
        metadata={"help": "At most this many online pairs per prompt group (best vs worst, 2nd best vs 2nd worst...)."},
    )
    upo_mode: str = field(
        default="online",
        metadata={"help": "Where pairs come from: 'online' (own rollouts), 'offline' (preference dataset), 'both'."},
    )
    upo_offline_dataset: str | None = field(
        default=None,
        metadata={"help": "Preference data (prompt/chosen/rejected, optional thinking) for 'offline' and 'both'."},
    )
    upo_offline_ratio: float = field(
        default=1.0,
        metadata={"help": "Offline pairs mixed in per RL prompt of each optimizer step, rounded, at least 1 (1.0: as "
                          "many pairs as prompts)."},
    )
    rewards: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Reward functions by name (or your own by import path, my_rewards.brevity) with weights, e.g. "
            "{\"accuracy\": 1.0, \"think_format\": 0.5}. Use instead of `reward_weights`."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Disable dropout in the policy and reference (DPOConfig's default), so reference log-probs "
                          "are deterministic."},
    )
    merged_rollouts: bool = field(
        default=True,
        metadata={"help": "Sample rollouts from copies of the weights with the LoRA adapter merged in (bf16 copies "
                          "with bf16, float32 ones on CPU without it; transformers generate): ~40% less rollout time "
                          "on CPU with bf16; the losses are unchanged."},
    )
    upo_sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the chosen replies' NLL per token added to each pair's DPO loss (as DPO's "
                          "loss_type [sigmoid, sft]); the pair term is still scaled by upo_lambda."},
    )
    drop_uniform_groups: bool = field(
        default=False,
        metadata={"help": "Leave groups whose rollouts all got the same reward out of the loss (and out of GRPO's "
                          "token count), instead of diluting the other groups' step; none are resampled."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Score each batch's real tokens only, as one sequence without padding (the UPO stage applies "
                          "it; image prompts stay padded); the same log-probs and gradients."},
    )
    normalize_rewards_by: str | None = field(
        default=None,
        metadata={"help": "Dataset column (e.g. 'domain') within whose values the combined reward is standardised; "
                          "that std replaces GRPO's group scaling (scale_rewards 'group' becomes 'none')."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_upo_values(vars(self))  # also checked with the recipe, before any work
        if self.normalize_rewards_by:
            self._scale_by_group()
        if self.rewards is not None:
            if not isinstance(self.rewards, dict):
                raise UserError(f"`rewards` must map reward names to weights, e.g. {{\"accuracy\": 1.0}}; got "
                                f"{self.rewards!r}")
            try:
                check_reward_names(self.rewards)
            except UserError as exc:
                raise UserError(f"`rewards`: {exc}") from None

    def _scale_by_group(self):
        """With `normalize_rewards_by`, the per-value std is the advantage scale (see the field's help): GRPO's
        group scaling would divide it out again, so it becomes "none" (`check_upo_values` refused normalize_then_sum,
        which re-standardises every reward per prompt group)."""
        if self.scale_rewards == "group":
            self.scale_rewards = "none"
