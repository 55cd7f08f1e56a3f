"""Device-dependent defaults: how to launch a stage and which precision flags a machine can run."""

import shutil

from .errors import UserError


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return shutil.which("nvidia-smi") is not None


def device_defaults(stage_args: dict) -> dict:
    """On a machine without a GPU, TRL's bf16 default cannot run: turn it off unless the recipe insists."""
    if has_cuda():
        return {}
    if stage_args.get("bf16") is True:
        raise UserError("the recipe sets bf16: true but this machine has no CUDA GPU; set bf16: false to run on CPU")
    return {"bf16": False}


def accelerate_launch_args(config_file: str | None) -> list[str]:
    """`accelerate launch` flags: the recipe's config file, else one process (on CPU, explicitly so)."""
    if config_file:
        return ["--config_file", config_file]
    if has_cuda():
        import torch

        count = torch.cuda.device_count()
        return ["--num_processes", str(count), *(["--multi_gpu"] if count > 1 else []), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    return ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
