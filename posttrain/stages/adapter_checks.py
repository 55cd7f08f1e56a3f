"""The saved adapter, checked after training: non-empty, no all-zero update, equal to the live weights when reloaded,
changed from the adapter it continued; which modules LoRA targets; whether the weights are sharded over processes."""

import logging
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("posttrain")


def verify_adapter(output_dir: str | Path, model, live: dict | None = None, continued: str | None = None) -> dict:
    """The saved adapter exists, is non-empty, holds non-zero weights and reloads equal to what was trained (`live`:
    the trained adapter's tensors, gathered whole by `live_adapter`; default: read from `model`). One that continued
    the adapter at `continued` and comes out equal to it is recorded (`unchanged`) and warned about."""
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
        # a new adapter starts with B = 0: no step changed it, which the data or settings explain, not a crash
        raise UserError(f"adapter {path}: every lora_B is still zero, so no training step changed the new adapter. "
                        "Either no gradient reached it (a learning rate of 0, too few steps) or every loss was "
                        "zero: in UPO/GRPO, every prompt's rollouts got the same reward (the log's "
                        "frac_reward_zero_std = 1: prompts too hard or too easy for the model, or rewards that cannot "
                        "tell its completions apart) and no pair was mined. Start from an SFT stage, or give prompts "
                        "the model sometimes gets right")
    from peft import get_peft_model_state_dict

    live = get_peft_model_state_dict(model, adapter_name="default") if live is None else live
    for key, tensor in saved.items():
        if key not in live or not torch.equal(live[key].detach().float().cpu(), tensor.float()):
            raise RuntimeError(f"adapter {path}: saved tensor {key} does not reload equal to the trained one")
    checks = {"adapter_bytes": path.stat().st_size, "adapter_tensors": len(saved), "reloads_equal": True,
              "targets": lora_targets(model)}
    if continued and _same_tensors(saved, Path(continued) / "adapter_model.safetensors"):
        # the zero-lora_B check above sees a new adapter only: one continued from the stage before starts non-zero
        logger.warning("no training step changed the adapter continued from %s: every loss was zero or no gradient "
                       "reached it (in UPO/GRPO: every prompt's rollouts got the same reward, frac_reward_zero_std = "
                       "1, and no pair was mined); the stage's adapter is the previous stage's", continued)
        checks["unchanged"] = True
    return checks


def _same_tensors(saved: dict, path: Path) -> bool:
    """Whether the adapter file at `path` holds exactly the tensors `saved` does."""
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        return False
    before = load_file(path)
    return before.keys() == saved.keys() and all(torch.equal(before[k], saved[k]) for k in saved)


def lora_targets(model) -> dict:
    """What the adapter trains, as PEFT resolved `lora_target_modules`: module names and (MoE experts stored as one
    3-D tensor, transformers 5) parameter names. Recorded because what a name targets depends on PEFT's version: on
    an MoE model PEFT renames targets to the experts' parameters (see `models.moe_lora`)."""
    config = model.peft_config["default"]
    modules = config.target_modules or []
    modules = [modules] if isinstance(modules, str) else modules  # a regex stays as written

    def leaf(name):  # one name per kind of layer, not per layer; a weight with its module (a router's gate.weight)
        parts = name.split(".")
        return name if len(parts) <= 2 else ".".join(parts[-2:] if parts[-1] == "weight" else parts[-1:])

    def leaves(names):
        return sorted({leaf(name) for name in names})

    return {"modules": leaves(modules), "parameters": leaves(config.target_parameters or [])}


def live_adapter(trainer) -> dict | None:
    """The trained adapter's tensors, whole, on the main process (None for a full model). Under FSDP or ZeRO-3 each
    process holds a shard and gathering them is a collective, so every process calls this; elsewhere the adapter is
    read from the main process's own copy."""
    from peft import get_peft_model_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "peft_config"):
        return None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # the wrapped model: under DeepSpeed `trainer.model` stays the bare module, and ZeRO-3's gather is the engine's
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if not trainer.accelerator.is_main_process:  # the gathered weights are the main process's alone: others get {}
            return None
        return get_peft_model_state_dict(model, state_dict=full, adapter_name="default")
    return get_peft_model_state_dict(model, adapter_name="default") if trainer.accelerator.is_main_process else None


def sharded_weights(trainer) -> str | None:
    """Why no forward may run on the main process alone, or None: under FSDP or ZeRO-3 over several processes each
    holds a shard of the weights, and every forward gathers them (a collective the other processes would have to
    join). The main process's held-out evaluations skip the stage process then; `posttrain run` evaluates the saved
    adapter in a process of its own (`Pipeline.reevaluate`)."""
    processes = trainer.accelerator.num_processes
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    zero3 = trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3
    if processes > 1 and (trainer.is_fsdp_enabled or zero3):
        return f"{'FSDP' if trainer.is_fsdp_enabled else 'ZeRO-3'} sharded the weights over {processes} processes"
    return None
