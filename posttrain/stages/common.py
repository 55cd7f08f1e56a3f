"""What every stage script does around its TRL trainer: parse, load the policy, save, verify, evaluate, record.

Stages hand over through folders: a stage loads the base model plus the previous stage's LoRA adapter and keeps
training that adapter (TRL freezes a copy of it as the reference for DPO/GRPO), so no merged full-weight copies are
ever written between stages and only one copy of the base weights is in memory.
"""

import json
import logging
import shutil
import time
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("posttrain")


def set_threads() -> None:
    """On CPU, tiny shared machines are much faster with one intra-op thread per process than with the default."""
    import os

    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def load_policy(stage_args, training_args, model_args):
    """Base model + the previous stage's adapter (trainable), or the base model and a fresh LoRA config.

    Returns (model, tokenizer, peft_config); peft_config is None when continuing an adapter (TRL forbids passing a
    PeftModel together with a peft_config). For a vision-language model the "tokenizer" is its processor, and LoRA
    stays on the language tower (`posttrain.models.vision`): the vision tower and projector are trained only when listed in
    `lora_modules_to_save`, in the stage that lists them.
    """
    from trl import get_peft_config

    from ..models import load_model, load_tokenizer, vision

    tokenizer = load_tokenizer(stage_args.tokenizer_name_or_path or model_args.model_name_or_path,
                               trust_remote_code=training_args.trust_remote_code)
    dtype = model_args.dtype or "float32"
    model = load_model(model_args.model_name_or_path, adapter=stage_args.adapter_path, dtype=dtype,
                       trust_remote_code=training_args.trust_remote_code, is_trainable=True)
    peft_config = None if stage_args.adapter_path else get_peft_config(model_args)
    if peft_config is not None and vision.is_vision_model(model_args.model_name_or_path):
        peft_config = vision.language_only_lora(peft_config, model)
    if stage_args.adapter_path is None and peft_config is None:
        logger.warning("use_peft is false: this stage fine-tunes all weights and saves a full model, not an adapter")
    return model, tokenizer, peft_config


def freeze_vision(trainer, stage_args, model_args) -> dict:
    """A continued VLM adapter's fully trained modules (vision tower, projector) stay unchanged in this stage unless
    it lists them in `lora_modules_to_save` (see `vision.freeze_vision`)."""
    from ..models import vision

    if not stage_args.adapter_path or not vision.is_vision_model(model_args.model_name_or_path):
        return {}
    frozen = vision.freeze_vision(trainer, model_args.lora_modules_to_save)
    if frozen:
        trainer.accelerator.print(f"frozen in this stage (not in lora_modules_to_save): {', '.join(frozen)}")
    return {"frozen_modules": frozen}


def prepare_trainer(trainer, model, stage_args, model_args, images: bool) -> dict:
    """What SFT and DPO do to their TRL trainer before training: ERNIE-4.5-VL's expert routing in the collator
    (`posttrain.moe_routing`), a continued VLM adapter's vision modules frozen, and with image rows the image gates.
    Returns what goes into the stage's pre-flight record."""
    from .. import gates
    from ..moe_routing import route_collator

    route_collator(trainer)
    preflight = freeze_vision(trainer, stage_args, model_args)
    if stage_args.preflight and images:
        preflight.update(gates.check_image_tokens(trainer, model.config.image_token_id))
        gates.check_processor_matches_model(trainer.processing_class, trainer.model,
                                            trainer.data_collator([trainer.train_dataset[0]]))
    return preflight


def load_train_dataset(stage_args):
    from ..data import load_split

    if not stage_args.dataset_name:
        raise UserError("the stage has no dataset_name; set stages.<stage>.dataset_name in the recipe")
    dataset = load_split(stage_args.dataset_name, stage_args.dataset_train_split, stage_args.dataset_config)
    if stage_args.max_train_samples:
        dataset = dataset.select(range(min(stage_args.max_train_samples, len(dataset))))
    return dataset


def keep_columns(dataset, columns: set[str]):
    return dataset.remove_columns([c for c in dataset.column_names if c not in columns])


def verify_adapter(output_dir: str | Path, model) -> dict:
    """The saved adapter exists, is non-empty, holds non-zero weights and reloads equal to what was trained."""
    import torch
    from safetensors.torch import load_file

    path = Path(output_dir) / "adapter_model.safetensors"
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"adapter was not saved: {path} is missing or empty (e.g. sharded weights under ZeRO-3)")
    saved = load_file(path)
    if not saved or all(t.numel() == 0 for t in saved.values()):
        raise RuntimeError(f"adapter file {path} holds no tensors")
    lora_b = [t for k, t in saved.items() if "lora_B" in k]
    if lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b):
        raise RuntimeError(f"adapter {path}: every lora_B is zero, i.e. the adapter is untrained")
    from peft import get_peft_model_state_dict

    live = get_peft_model_state_dict(model, adapter_name="default")
    for key, tensor in saved.items():
        if key not in live or not torch.equal(live[key].detach().float().cpu(), tensor.float()):
            raise RuntimeError(f"adapter {path}: saved tensor {key} does not reload equal to the trained one")
    return {"adapter_bytes": path.stat().st_size, "adapter_tensors": len(saved), "reloads_equal": True}


def run_eval(model, tokenizer, stage_args) -> dict | None:
    """The recipe's held-out evaluation of the trained model, or None when the recipe has none."""
    if not stage_args.eval_dataset:
        return None
    from ..evaluate import run

    return run(stage_args.eval_settings(), model, tokenizer)


def finish(trainer, stage: str, stage_args, tokenizer, train_result, started: float, extra: dict | None = None):
    """Save the adapter and tokenizer, verify them, evaluate on held-out data, and write metrics.json (rank 0)."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    # PEFT saves every adapter; TRL's frozen "ref" copy (the previous stage, already saved there) goes to ref/
    shutil.rmtree(Path(output_dir) / "ref", ignore_errors=True)
    # Trainer pickles its arguments next to the adapter; resolved.yaml holds them as text, and we ship no pickles
    (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
    if not trainer.accelerator.is_main_process:
        trainer.accelerator.wait_for_everyone()
        return
    tokenizer.save_pretrained(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    checks = verify_adapter(output_dir, model) if hasattr(model, "peft_config") else {}
    trainer.accelerator.print(f"[{stage}] evaluating on held-out data…")
    evaluation = run_eval(model, tokenizer, stage_args)
    metrics = {
        "stage": stage,
        "status": "done",
        "wall_time_s": round(time.time() - started, 1),
        "world_size": trainer.accelerator.num_processes,
        "train": {**train_result.metrics, "global_step": trainer.state.global_step},
        "log_history": trainer.state.log_history,
        "adapter": checks,
        "eval": evaluation,
        **(extra or {}),
    }
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    trainer.accelerator.wait_for_everyone()
