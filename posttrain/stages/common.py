"""What every stage script does around its TRL trainer: parse, load the policy, save, verify, evaluate, record.

Stages hand over through folders: a stage loads the base model plus the previous stage's LoRA adapter and keeps
training that adapter (TRL freezes a copy of it as the reference for DPO/GRPO), so no merged full-weight copies are
ever written between stages and only one copy of the base weights is in memory.
"""

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .. import checkpoints, skip_final_collection
from ..errors import (
    Terminated,
    UserError,
    disk_full_error,
    is_disk_full,
    is_out_of_memory,
    out_of_memory_error,
    report_child_error,
)
from .adapter_checks import live_adapter, sharded_weights, verify_adapter
from .training import lora_plus, whole_stage_loss

logger = logging.getLogger("posttrain")


def set_threads() -> None:
    """On CPU, tiny shared machines are much faster with one intra-op thread per process than with the default."""
    import os

    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def parse(parser) -> tuple:
    """The stage's dataclasses from its command line (`--config resolved.yaml`), with the process group started
    first with the stage's `ddp_timeout` (see `start_processes`)."""
    import sys

    start_processes(sys.argv[1:])
    return parser.parse_args_and_config()


def start_processes(argv: list[str]) -> None:
    """Start the gloo process group of a several-process CPU stage with the recipe's `ddp_timeout`.

    transformers (5.23) hands `ddp_timeout` to the process group only on GPUs; with `use_cpu` gloo keeps torch's
    30-minute default, so when one process freezes or its machine goes away the others wait half an hour. accelerate's
    `PartialState` is shared, so one started here first is the one TrainingArguments then uses.
    """
    import os
    from datetime import timedelta

    import torch
    import yaml

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "--config" not in argv or torch.cuda.is_available():
        return
    config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {}
    if config.get("use_cpu"):
        from accelerate import PartialState

        PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=config.get("ddp_timeout", 1800)))


def end_processes() -> bool:
    """Tear down the process group of a several-process stage before the interpreter exits (as torch asks). Left to
    Python's shutdown, gloo's threads could still be running when it was destroyed: a rank that had finished its
    stage then died with SIGABRT ("terminate called without an active exception") and failed the run. Returns whether
    there was one."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized()
    if several:
        dist.destroy_process_group()
    return several


def exit_interrupted(code: int) -> None:
    """Exit with `code` once SIGTERM has stopped the stage and its checkpoint is saved. A process of a several-process
    stage leaves without the interpreter's finalization (output flushed first): there DDP's reducer, freed last,
    destroyed the gloo process group while holding the GIL, whose destructor waited for a gloo thread that was itself
    waiting for the GIL to free the stage's last collective. Seen as a hang of the second machine's stage after it had
    saved (native stacks: `~ProcessGroupGloo` joining its thread, the thread in `~AsyncAllgatherWork`). Exit handlers
    do not run then: a tracker (`report_to`) may miss its last upload of an interrupted stage."""
    import os

    if not end_processes():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def load_policy(stage_args, training_args, model_args):
    """Base model + the previous stage's adapter (trainable), or the base model and a fresh LoRA config.

    Returns (model, tokenizer, peft_config); peft_config is None when continuing an adapter (TRL forbids passing a
    PeftModel together with a peft_config). For a vision-language model the "tokenizer" is its processor, and LoRA
    stays on the language tower (`posttrain.models.vision`): the vision tower and projector are trained only when listed in
    `lora_modules_to_save`, in the stage that lists them.
    """
    from trl import get_peft_config

    from ..models import load_model, load_tokenizer, moe_lora, vision

    tokenizer = load_tokenizer(stage_args.tokenizer_name_or_path or model_args.model_name_or_path,
                               trust_remote_code=training_args.trust_remote_code)
    dtype = model_args.dtype or "float32"
    # ZeRO-3 gathers each parameter group in one dtype: a float32 adapter over a bf16 base fails there
    # (deepspeedai/DeepSpeed#8072). TRL keeps an adapter it creates in the base's dtype under ZeRO-3; so does this one
    plugin = getattr(training_args, "deepspeed_plugin", None)
    model = load_model(model_args.model_name_or_path, adapter=stage_args.adapter_path, dtype=dtype,
                       trust_remote_code=training_args.trust_remote_code, is_trainable=True,
                       attn_implementation=model_args.attn_implementation,
                       adapter_in_float32=plugin is None or plugin.zero_stage != 3)
    moe_lora.install()  # LoRA on an MoE model's dense layers too (see the module)
    peft_config = None if stage_args.adapter_path else get_peft_config(model_args)
    if peft_config is not None and vision.is_vision_model(model_args.model_name_or_path):
        peft_config = vision.language_only_lora(peft_config, model)
    if peft_config is not None:
        peft_config = moe_lora.expert_targets(peft_config, model)  # the experts of an MoE model PEFT does not convert
    if peft_config is not None and stage_args.lora_top_layers:
        peft_config = top_layers_lora(peft_config, model, stage_args.lora_top_layers)
    if stage_args.adapter_path is None and peft_config is None:
        logger.warning("use_peft is false: this stage fine-tunes all weights and saves a full model, not an adapter")
    return model, tokenizer, peft_config


def top_layers_lora(peft_config, model, top: int):
    """LoRA on the last `top` decoder layers only: nothing below them needs a gradient, so autograd records no
    backward there (SmolLM2-135M, top 20 of 30 layers: SFT steps ~25% shorter here). PEFT's
    `layers_to_transform` cannot take `all-linear`, so the lower layers are excluded by name instead."""
    import re

    from ..models import moe_lora

    layers = model.config.get_text_config().num_hidden_layers
    if not 0 < top <= layers:
        raise UserError(f"lora_top_layers: {top}; the model has {layers} decoder layers, expected 1 to {layers}")
    if top == layers:
        return peft_config
    below = rf"(.*\.)?layers\.({'|'.join(str(i) for i in range(layers - top))})\..*"
    excluded = peft_config.exclude_modules
    if excluded and not isinstance(excluded, str):  # a list of names
        excluded = "|".join(rf"(.*\.)?{re.escape(name)}" for name in excluded)
    peft_config.exclude_modules = f"(?:{excluded})|(?:{below})" if excluded else below
    moe_lora.outside_excluded(peft_config, model)  # parameter targets (MoE experts) asked for already
    return peft_config


def padding_free_problem(model, images: bool) -> str | None:
    """Why this stage's batches must stay padded although `padding_free` is on (a default, `devices.speed_defaults`),
    or None; the reason is logged."""
    from ..models.padding_free import multimodal_positions

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    problem = None
    if images:
        problem = "TRL's vision collator pads image rows"
    elif multimodal_positions(base):
        problem = (f"{base.config.model_type}'s multimodal rotary positions would let the rows of a packed batch "
                   "attend to each other")
    if problem:
        logger.warning("padding_free is off: %s", problem)
    return problem


def attend_by_row(model, model_args) -> str:
    """Padding-free batches attend within each row (`models.attention.packed_rows`) instead of over the packed
    square with SDPA: same logits and gradients (tested). 4 SFT steps of the default recipe (16 rows, ~750 tokens a
    batch) took 28.3 s instead of 34.9 s in float32 on 2 AVX2 cores with SDPA per row (median of 3, alternating);
    under bf16 autocast the rows' attention as one padded batch made a forward and backward of those batches 1.17x
    [1.14-1.25] faster than SDPA per row (median and quartiles of 16, alternated in one process). Kept as it is when
    the recipe names an `attn_implementation` and for a model whose attention is not transformers' SDPA (a
    flash-attention one takes the row boundaries itself). On CUDA the rows go to SDPA's flash kernel as a padded
    batch: SFT of a 1.5B-shaped model on 16 conversations of ~200 tokens a step took 32 GiB over the packed square
    (H200, 2026-12-04). Returns the one in use."""
    from ..models.attention import register

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = base.config._attn_implementation
    if model_args.attn_implementation or current != "sdpa":
        return current
    base.set_attn_implementation(register())
    return base.config._attn_implementation


def pack_scoring(trainer, model_args) -> str:
    """`padding_free` for DPO and UPO, whose TRL trainers pad: the policy's and the reference's scoring forwards run on
    each batch's real tokens only, as one sequence (`models.padding_free`), attending within each row; same log-probs
    and gradients as the padded batch (tested). Returns the attention in use."""
    from ..models.padding_free import pack_scoring_forward

    attentions = []
    for model in (trainer.model, trainer.ref_model):  # those TRL gave its fused LM head (no ref_model under PEFT)
        if model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            pack_scoring_forward(base)
            attentions.append(attend_by_row(base, model_args))
    return attentions[0]  # the policy's


def freeze_vision(trainer, stage_args, model_args) -> dict:
    """A continued VLM adapter's fully trained modules (vision tower, projector) stay unchanged in this stage unless
    it lists them in `lora_modules_to_save` (see `vision.freeze_vision`). Under FSDP, every stage of a VLM keeps the
    vision tower in the root unit (`vision.shard_vision_with_root`)."""
    from ..models import vision

    if not vision.is_vision_model(model_args.model_name_or_path):
        return {}
    vision.shard_vision_with_root(trainer)
    vision.reduce_unused_gradients(trainer)
    if not stage_args.adapter_path:
        return {}
    if stage_args.loraplus_lr_ratio is not None:  # the optimizer may be built below, before `training.train` sets LoRA+
        lora_plus(trainer, stage_args.loraplus_lr_ratio)
    frozen = vision.freeze_vision(trainer, model_args.lora_modules_to_save)
    if frozen:
        trainer.accelerator.print(f"frozen in this stage (not in lora_modules_to_save): {', '.join(frozen)}")
    return {"frozen_modules": frozen}


def prepare_trainer(trainer, model, stage_args, model_args, images: bool, rows: list[int] | None = None,
                    end_of_turn: set[int] | None = None) -> dict:
    """What SFT and DPO do to their TRL trainer before training: ERNIE-4.5-VL's expert routing in the collator
    (`posttrain.moe_routing`), a continued VLM adapter's vision modules frozen, and with image rows the image gates.
    `rows`: each training row's row in its file, where pre-flight skipped some (`gates.kept_rows`); `end_of_turn`: the
    end-of-turn ids, to count the image rows (or pairs) whose reply `max_length` cuts before it. Returns what goes
    into the stage's pre-flight record."""
    from .. import gates
    from ..moe_routing import route_collator

    route_collator(trainer)
    preflight = freeze_vision(trainer, stage_args, model_args)
    if stage_args.preflight and images:
        preflight.update(gates.check_image_tokens(trainer, model.config.image_token_id, rows=rows,
                                                  end_of_turn=end_of_turn, name=stage_args.dataset_name))
        gates.check_processor_matches_model(trainer.processing_class, trainer.model,
                                            trainer.data_collator([trainer.train_dataset[0]]))
    elif stage_args.preflight:
        check_positions(trainer, model, stage_args.dataset_name)
    return preflight


def check_positions(trainer, model, name: str) -> None:
    """The longest training row, as TRL cut it to `max_length`, fits the model's positions (`generation.context_limit`):
    past them a RoPE model trains on positions it was never trained for, without an error (the generation checks of
    the evaluation and of UPO never see training rows), and one with learned positions fails mid-training on an index
    error. Text rows, which TRL tokenizes before training (a packed row's positions restart at each of its rows)."""
    from ..generation import context_limit

    limit, dataset, max_length = context_limit(model), trainer.train_dataset, trainer.args.max_length
    columns = dataset.column_names or []
    if limit is None or (max_length is not None and max_length <= limit):
        return
    if "seq_lengths" in columns:
        lengths = (max(row["seq_lengths"]) for row in dataset.select_columns(["seq_lengths"]))
    elif "input_ids" in columns:
        lengths = (len(row["input_ids"]) for row in dataset.select_columns(["input_ids"]))
    elif "prompt_ids" in columns:  # DPO: TRL's collator cuts each side to max_length
        sides = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        lengths = (min(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])),
                       max_length or float("inf")) for r in sides)
    else:
        return
    longest = max(lengths, default=0)
    if longest > limit:
        raise UserError(f"pre-flight: {name}: its longest training row runs to position {longest} "
                        f"(max_length={max_length}), past the model's max_position_embeddings ({limit}), where it "
                        f"learns from positions it was never trained for without an error; set max_length to at "
                        f"most {limit}, or shorten the rows")


def load_train_dataset(stage_args):
    from ..data import load_split

    if not stage_args.dataset_name:
        raise UserError("the stage has no dataset_name; set stages.<stage>.dataset_name in the recipe")
    dataset = load_split(stage_args.dataset_name, stage_args.dataset_train_split, stage_args.dataset_config)
    if stage_args.max_train_samples:
        dataset = dataset.select(range(min(stage_args.max_train_samples, len(dataset))))
    return dataset


def load_test_split(stage_args, training_args):
    """The `dataset_test_split` rows for the trainer's own evaluation loop when an `eval_strategy` asks for them (as
    TRL's scripts pass them), else None (the Trainer refuses an `eval_strategy` without an eval dataset)."""
    from ..data import load_split

    if not stage_args.dataset_test_split or training_args.eval_strategy == "no":
        return None
    return load_split(stage_args.dataset_name, stage_args.dataset_test_split, stage_args.dataset_config)


def keep_columns(dataset, columns: set[str]):
    return dataset.remove_columns([c for c in dataset.column_names if c not in columns])


def run_eval(model, tokenizer, stage_args, accelerator) -> dict | None:
    """The recipe's held-out evaluation of the trained model, or None when the recipe has none. Every process calls
    it: under DDP each generates a share of the prompts (`generation.Share`); the main process's result is the one
    kept."""
    if not stage_args.eval_dataset:
        return None
    from ..evaluate import run
    from ..generation import Share

    share = Share.among(accelerator.process_index, accelerator.num_processes)
    return run(stage_args.eval_settings(), model, tokenizer, share=share)


def finish(trainer, stage: str, stage_args, tokenizer, train_result, started: float, extra: dict | None = None):
    """Save the adapter and tokenizer, verify them, evaluate on held-out data, and write metrics.json (rank 0)."""
    output_dir = trainer.args.output_dir
    accelerator = trainer.accelerator
    trainer.save_model(output_dir)
    live = live_adapter(trainer)  # every process: a collective under FSDP and ZeRO-3
    model = accelerator.unwrap_model(trainer.model)
    deferred = sharded_weights(trainer) if stage_args.eval_dataset else None
    if not accelerator.is_main_process:  # the others return from save_model before the main one has written
        if not deferred:
            run_eval(model, tokenizer, stage_args, accelerator)  # their share of the prompts
        accelerator.wait_for_everyone()
        return
    # PEFT saves every adapter; TRL's frozen "ref" copy (the previous stage, already saved there) goes to ref/
    shutil.rmtree(Path(output_dir) / "ref", ignore_errors=True)
    # Trainer pickles its arguments next to the adapter; resolved.yaml holds them as text, and we ship no pickles
    (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(output_dir)
    checks = verify_adapter(output_dir, model, live, stage_args.adapter_path) if live is not None else {}
    if deferred:
        accelerator.print(f"[{stage}] held-out evaluation after the stage: {deferred}")
        extra = {**(extra or {}), "eval_deferred": deferred}
    elif stage_args.eval_dataset:
        accelerator.print(f"[{stage}] evaluating on held-out data…")
    evaluation = None if deferred else run_eval(model, tokenizer, stage_args, accelerator)
    metrics = {
        "stage": stage,
        "status": "done",
        "wall_time_s": round(time.time() - started, 1),
        "world_size": accelerator.num_processes,
        "train": {**train_result.metrics, "global_step": trainer.state.global_step,
                  "train_loss": whole_stage_loss(trainer, train_result)},
        "log_history": trainer.state.log_history,
        "adapter": checks,
        "eval": evaluation,
        **(extra or {}),
    }
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    accelerator.wait_for_everyone()


def entry(stage: str, main, make_parser) -> None:
    """`python -m posttrain.stages.<stage>`: a user error (bad data, a full disk) is printed as one paragraph and handed
    to the pipeline, and the process exits with code 2; anything else is a bug and keeps its traceback."""
    skip_final_collection()
    training_args = None
    try:
        parsed = parse(make_parser())
        training_args = parsed[1]
        main(*parsed)
        end_processes()
    except UserError as exc:
        report_child_error(str(exc))
        sys.exit(2)
    except Terminated as exc:  # stopped by SIGTERM after saving a checkpoint (`training.save_and_stop_on_sigterm`)
        exit_interrupted(128 + exc.signum)
    except Exception as exc:
        if is_out_of_memory(exc) and training_args is not None:
            report_child_error(out_of_memory_error(stage, exc, training_args))
            sys.exit(2)
        if not is_disk_full(exc):
            raise
        output_dir = training_args.output_dir if training_args is not None else None
        if output_dir:
            checkpoints.remove_incomplete(output_dir)
        report_child_error(str(disk_full_error(exc, f"the {stage} stage's checkpoint or adapter", output_dir)))
        sys.exit(2)
