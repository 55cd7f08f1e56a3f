"""Device-dependent defaults: how to launch a stage and which precision flags a machine can run."""

import shutil


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return shutil.which("nvidia-smi") is not None


def device_defaults(stage_args: dict) -> dict:
    """Flags a machine without a GPU needs: `use_cpu` (without it, several processes launched on CPU each train
    alone instead of as one gloo data-parallel job) and bf16 off unless the recipe asks for CPU bf16 autocast."""
    if has_cuda():
        return {}
    return {"use_cpu": True, "bf16": bool(stage_args.get("bf16", False))}


def accelerate_launch_args(config_file: str | None, num_processes: int | None = None) -> list[str]:
    """`accelerate launch` flags: the recipe's config file, else N processes (all GPUs, or 1 on CPU).

    Several processes on CPU need `--multi_gpu` (accelerate then uses gloo): `--cpu --num_processes 2` silently runs
    a single process.
    """
    if config_file:
        return ["--config_file", config_file]
    count = num_processes or (_gpu_count() if has_cuda() else 1)
    flags = ["--num_processes", str(count), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if count > 1:
        return ["--multi_gpu", *flags]
    return flags if has_cuda() else ["--cpu", *flags]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
