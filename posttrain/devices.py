"""Device-dependent defaults: how to launch a stage and which precision flags a machine can run."""

import shutil
from pathlib import Path

from .errors import UserError


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


def accelerate_launch_args(config_file: str | None, num_processes: int | None = None, nodes=None) -> list[str]:
    """`accelerate launch` flags: the recipe's config file, else N processes per machine (all GPUs, or 1 on CPU).

    Several processes on CPU need `--multi_gpu` (accelerate then uses gloo): `--cpu --num_processes 2` silently runs
    a single process. `nodes` (`posttrain.nodes.Nodes`): this machine's place in a multi-machine run; accelerate's
    `--num_processes` then counts the processes of all machines.
    """
    machines = nodes.launch_flags() if nodes else ["--num_machines", "1"]
    if config_file:
        check_engine_runs_here(config_file)
        flags = ["--config_file", config_file]
        if num_processes:
            flags += ["--num_processes", str(num_processes * (nodes.num_machines if nodes else 1))]
        return [*flags, *machines] if nodes else flags
    count = (num_processes or (_gpu_count() if has_cuda() else 1)) * (nodes.num_machines if nodes else 1)
    flags = ["--num_processes", str(count), *machines, "--mixed_precision", "no", "--dynamo_backend", "no"]
    if count > 1:
        return ["--multi_gpu", *flags]
    return flags if has_cuda() else ["--cpu", *flags]


def check_engine_runs_here(config_file: str | None) -> None:
    """FSDP and DeepSpeed configs need GPUs: accelerate (1.15) picks FSDP only on top of a GPU-like device type,
    so on CPU an FSDP config runs plain gloo DDP instead (or, without `use_cpu`, N independent single-process
    trainings), and the run would report a sharded training that never happened. Refuse before launching."""
    import yaml

    if not config_file:
        return
    try:
        engine = (yaml.safe_load(Path(config_file).read_text()) or {}).get("distributed_type", "NO")
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"accelerate config {config_file}: cannot read it ({exc})") from exc
    if engine in ("FSDP", "DEEPSPEED") and not has_cuda():
        raise UserError(f"accelerate config {config_file}: distributed_type {engine} needs CUDA GPUs and none is "
                        f"visible. accelerate {_version('accelerate')} does not shard on CPU (it picks FSDP only "
                        "over a GPU device type and would silently run gloo DDP instead; DeepSpeed needs CUDA). "
                        "On CPU use --num-processes N (DDP over gloo).")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
