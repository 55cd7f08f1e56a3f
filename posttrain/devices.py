"""Device-dependent defaults: how to launch a stage, which precision flags a machine can run, and the speed
settings a recipe gets when it does not choose them itself (`speed_defaults`, measured by `posttrain bench`)."""

import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

# Above this many parameters activations of a batch of 8 x 256 tokens start to crowd an 80 GB GPU, so recomputing
# them pays; below it gradient checkpointing only costs the recompute (~20 % of an SFT step on CPU, measured).
CHECKPOINTING_FROM_PARAMS = 3e9
# Activations a LoRA step keeps for the backward without checkpointing, in bytes per token, hidden unit and layer.
# Fitted to the H200 bench (a 1.5B model, bf16 base, Liger): the peak without checkpointing less the one with it came
# to 47-49 bytes for SFT on 2,400 and on 7,100 tokens a step and for DPO on 4,700. Korthikanti et al. (2022) count 34
# for plain bf16 training with a fused attention kernel.
ACTIVATION_BYTES = 48
# Checkpointing also below CHECKPOINTING_FROM_PARAMS when a step's activations, its rows all at their longest, would
# take more than this share of the GPU's memory: a 1.5B model at 8 rows of 4,096 tokens keeps ~68 GB.
CHECKPOINTING_MEMORY_SHARE = 0.5


def has_cuda() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:  # torch's CPU wheels say so in their version: no import (2 s) for a process that trains nothing itself
        if version("torch").endswith("+cpu"):
            return False
    except PackageNotFoundError:
        return shutil.which("nvidia-smi") is not None
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return shutil.which("nvidia-smi") is not None


# Without native bf16 dot products a CPU emulates bf16 matmuls: on an AVX2-only AMD EPYC a 512 x 576 x 1536 matmul took
# 742 ms in bf16 against 8.3 ms in float32 (90x), so an evaluation that takes 17 s with AVX512-BF16 took minutes; on an
# Intel Xeon with AVX-512 but no bf16 instructions a 1,200 x 576 x 1,536 one took 35 ms against 7.6 ms (4.6x).
EMULATED_BF16 = ("bf16 on this CPU is emulated (no AVX512-BF16 or AMX instructions): its matmuls run 4x (AVX-512) to "
                 "90x (AVX2) slower than float32; `posttrain doctor` measures this machine")


def bf16_matmul_slowdown(repeats: int = 3) -> float:
    """How many times longer a bf16 matmul of a small model's size (256 x 576 x 1,536) takes than a float32 one on
    this CPU, best of `repeats` each (a few hundred ms on an emulating CPU)."""
    import time

    import torch

    a, b = torch.randn(256, 576), torch.randn(576, 1536)

    def best(x, y) -> float:
        x @ y  # warm-up: the first call of a kernel also pays for its setup
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - started)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) / best(a, b)


@functools.cache
def cpu_has_bf16() -> bool:
    """bf16 autocast can pay on a CPU only with native bf16 dot products (AVX512-BF16 or AMX); without them it is
    emulated and far slower than fp32 (`EMULATED_BF16`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def native_bf16(device_type: str | None = None) -> bool:
    """Whether bf16 runs natively on `device_type` (default: the GPU if there is one, else the CPU)."""
    if device_type == "cuda" or (device_type is None and has_cuda()):
        import torch

        return torch.cuda.is_bf16_supported()
    return device_type in (None, "cpu") and cpu_has_bf16()


def resolve_precision(dtype: str, device_type: str | None = None) -> str:
    """A `configs.Precision` made concrete: `auto` is bfloat16 where it runs natively, float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device_type) else "float32"
    return dtype


def device_defaults(stage_args: dict) -> dict:
    """Flags a machine without a GPU needs: `use_cpu` (without it, several processes launched on CPU each train
    alone instead of as one gloo data-parallel job) and bf16 autocast (TRL's default) only where the CPU has bf16
    instructions; on a GPU TRL's defaults stay. A recipe that asks for bf16 on a CPU that emulates it gets it, with a
    warning."""
    if has_cuda():
        return {}
    if stage_args.get("bf16") and not cpu_has_bf16():
        logger.warning("bf16: true: %s; remove it from the recipe to get float32 on this machine", EMULATED_BF16)
    return {"use_cpu": True, "bf16": bool(stage_args.get("bf16", cpu_has_bf16()))}


def speed_defaults(stage: str, model_path: str | Path | None, stage_args: dict | None = None) -> dict:
    """What a stage gets for speed when the recipe does not say otherwise; each one won in `posttrain bench`.

    - `gradient_checkpointing` by model size (TRL turns it on everywhere; below `CHECKPOINTING_FROM_PARAMS` it only
      costs recompute), and on a GPU also by the activations of a step at the recipe's lengths
      (`activations_crowd_gpu`).
    - `padding_free` for SFT, DPO and UPO: a batch's rows as one sequence without padding (see
      `stages.sft_batches.flatten_batches` and `models.padding_free`); image rows stay padded. (`grpo`: `posttrain
      bench`'s row for UPO at λ = 0.)
    - `use_liger_kernel` for SFT and DPO on a GPU where Liger is installed (fused RMSNorm, RoPE, SwiGLU kernels). Not
      for UPO: GRPO's Liger loss never computes the per-token log-probs the DPO term reuses.
    - `dtype: bfloat16` (the frozen base weights) for SFT and DPO on a GPU training in bf16, as the shipped GPU
      recipes set it: no per-step casts of the base weights, half their memory; the LoRA weights stay float32 (PEFT
      keeps adapters in float32 over a bf16 base). On an H200, SFT 1.72x plain TRL instead of 1.41x, DPO 2.14x
      instead of 1.52x, at a lower peak (bench/results/2026-12-04-h200/variants). On CPU it gained nothing
      (docs/experiments.md). Not for UPO: its rollouts decode from float32 base weights copied to bf16 with the
      adapter merged in (`models.precision.frozen_weights_cast`), which skips a bf16 base, and that is unmeasured.
    """
    stage_args = stage_args or {}
    defaults = {"gradient_checkpointing": parameter_count(model_path) >= CHECKPOINTING_FROM_PARAMS
                or activations_crowd_gpu(stage, model_path, stage_args)}
    if stage in ("sft", "dpo", "upo", "grpo"):
        defaults["padding_free"] = True
    if stage in ("sft", "dpo") and has_cuda() and importlib.util.find_spec("liger_kernel") is not None:
        defaults["use_liger_kernel"] = True
    # not with `lora_modules_to_save`: PEFT keeps those full copies in the base's dtype, and bf16 weights drop
    # updates below their rounding step (a layer norm's 1.0 stays 1.0 at a learning rate of 1e-3)
    if (stage in ("sft", "dpo") and has_cuda() and stage_args.get("bf16", True) and not stage_args.get("fp16")
            and not stage_args.get("lora_modules_to_save") and native_bf16("cuda")):
        defaults["dtype"] = "bfloat16"
    return defaults


def step_tokens(stage: str, stage_args: dict) -> int:
    """Tokens of one device's step with every row at its longest: TRL's defaults where the recipe sets no length (SFT
    and DPO 1,024 tokens; GRPO 512 completion tokens), DPO's rows chosen and rejected, an RL prompt taken as 512, and
    UPO's DPO-term rows (`upo_pair_rows`)."""
    batch = stage_args.get("per_device_train_batch_size") or 8
    if stage in ("upo", "grpo"):
        rows = batch * (1 + upo_pair_rows(stage_args))
        return round(rows * ((stage_args.get("max_completion_length") or 512) + 512))
    return (2 if stage == "dpo" else 1) * batch * (stage_args.get("max_length") or 1024)


def upo_pair_rows(stage_args: dict) -> float:
    """Rows UPO's DPO term forwards per row of GRPO's, at most (UPOConfig's defaults where the recipe sets none): its
    forward of the rejected rollouts (`upo_pairs_per_prompt` a prompt) and of both sides of the offline pairs
    (`upo_offline_ratio` a prompt) is kept for the same backward as GRPO's, so its activations add to the step's."""
    if not stage_args.get("upo_lambda", 0.5):
        return 0.0
    mode = stage_args.get("upo_mode", "online")
    pairs = stage_args.get("upo_pairs_per_prompt", 1) if mode in ("online", "both") else 0
    if mode in ("offline", "both"):
        pairs += 2 * stage_args.get("upo_offline_ratio", 1.0)
    return pairs / (stage_args.get("num_generations") or 8)


def activations_crowd_gpu(stage: str, model_path: str | Path | None, stage_args: dict) -> bool:
    """Whether a step's activations without checkpointing (`ACTIVATION_BYTES` a token, hidden unit and layer, at
    `step_tokens`) would take more than `CHECKPOINTING_MEMORY_SHARE` of the GPU; False on CPU or for an unknown model."""
    if not has_cuda() or model_path is None or not (Path(model_path) / "config.json").is_file():
        return False
    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config") or config  # a vision-language model's language tower
    hidden, layers = text.get("hidden_size"), text.get("num_hidden_layers")
    if not hidden or not layers:
        return False
    return ACTIVATION_BYTES * step_tokens(stage, stage_args) * hidden * layers > (CHECKPOINTING_MEMORY_SHARE
                                                                                   * gpu_memory_bytes())


def gpu_memory_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def parameter_count(model_path: str | Path | None) -> int:
    """Parameters of a saved model, read from its safetensors headers (no weights loaded); 0 when unknown."""
    if model_path is None or not Path(model_path).is_dir():
        return 0
    total = 0
    for path in Path(model_path).glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def cpu_threads(num_processes: int) -> int:
    """Intra-op threads per process on CPU: what torch picks for a plain script here (OMP_NUM_THREADS when set, else
    its own count of the cores), shared out over the processes."""
    import torch

    return max(1, torch.get_num_threads() // max(num_processes, 1))


# torchrun's agent otherwise leaves a `torchelastic_*` folder in the temp folder at every launch of several processes:
# its log folder, for error files our stages do not write (they report through `POSTTRAIN_ERROR_FILE`)
NO_LOG_DIR = ["--log_dir", os.devnull]


def accelerate_launch_args(config_file: str | None, num_processes: int | None = None, nodes=None) -> list[str]:
    """`accelerate launch` flags: the recipe's config file, else N processes per machine (all GPUs, or 1 on CPU).

    Several processes on CPU need `--multi_gpu` (accelerate then uses gloo): `--cpu --num_processes 2` silently runs
    a single process. `nodes` (`posttrain.nodes.Nodes`): this machine's place in a multi-machine run; accelerate's
    `--num_processes` then counts the processes of all machines. On CPU the thread count is passed explicitly
    (`cpu_threads`): accelerate otherwise derives it from the *physical* core count, e.g. one thread per process
    where a plain `python` script runs two on a 2-vCPU machine with SMT, which leaves half the machine idle.
    """
    machines = nodes.launch_flags() if nodes else ["--num_machines", "1"]
    if config_file:
        config = check_engine_runs_here(config_file)
        # precision is the stage's (`bf16`, `fp16`), as without a config file: TrainingArguments (transformers 5.23)
        # keeps a config's `mixed_precision: bf16` when the stage says `bf16: false`, and trained under bf16 anyway
        flags = ["--config_file", config_file, "--mixed_precision", "no"]
        if num_processes:
            flags += ["--num_processes", str(num_processes * (nodes.num_machines if nodes else 1))]
        return [*flags, *machines, *NO_LOG_DIR] if nodes else [*flags, *own_port(config), *NO_LOG_DIR]
    count = (num_processes or (_gpu_count() if has_cuda() else 1)) * (nodes.num_machines if nodes else 1)
    if count > 1 and not nodes:
        machines += own_port({})
    flags = ["--num_processes", str(count), *machines, "--mixed_precision", "no", "--dynamo_backend", "no"]
    if not has_cuda():
        flags += ["--num_cpu_threads_per_process", str(cpu_threads(count // (nodes.num_machines if nodes else 1)))]
    if count > 1:
        return ["--multi_gpu", *flags, *NO_LOG_DIR]
    return flags if has_cuda() else ["--cpu", *flags]


def direct_command(flags: list[str], script: list[str]) -> tuple[list[str], dict] | None:
    """The command and environment of the one process `accelerate launch FLAGS SCRIPT` would start with its simple
    launcher (one process, no engine), built by accelerate itself (its parser, its checks against the config file,
    `prepare_simple_launcher_cmd_env`), so the stage can run without the launcher in between; None where accelerate
    would use another launcher (several processes, FSDP, DeepSpeed), or where its internals are not the ones read here.

    Why: on SIGTERM the simple launcher kills its child 5 s after passing the signal on. A scheduler that signals every
    process of a job (SLURM's `--signal`, its time limit) thus left a stage 5 s to finish its step and save it, too
    short for a large model; a process started directly has the pipeline's grace period (`childproc.STOP_GRACE`). It
    also saves the launcher's start, about 1.5 s of imports per stage."""
    try:
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils import ComputeEnvironment
        from accelerate.utils.launch import prepare_simple_launcher_cmd_env

        args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, *script]))
    except (ImportError, TypeError, ValueError):  # another accelerate: its own launcher, as before
        return None
    engines = args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.multi_gpu or args.tpu
    if (engines and not args.cpu) or (defaults is not None
                                       and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER):
        return None
    return prepare_simple_launcher_cmd_env(args)


def own_port(config: dict) -> list[str]:
    """A free port for the process group of a stage on one machine: with accelerate's default (29500) a second run on
    the same machine (two experiments on two halves of its GPUs) fails at once with EADDRINUSE. An accelerate config
    (`config`, as `check_engine_runs_here` read it) that names its port keeps it."""
    from .nodes import free_port

    if "main_process_port" in config:
        return []
    return ["--main_process_port", str(free_port())]


def check_engine_runs_here(config_file: str | None) -> dict:
    """FSDP and DeepSpeed configs need GPUs: accelerate (1.15) picks FSDP only on top of a GPU-like device type,
    so on CPU an FSDP config runs plain gloo DDP instead (or, without `use_cpu`, N independent single-process
    trainings), and the run would report a sharded training that never happened. Refuse before launching. Returns
    the config as read (empty without a file)."""
    import yaml

    if not config_file:
        return {}
    try:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"accelerate config {config_file}: cannot read it ({exc})") from exc
    if not isinstance(config, dict):
        raise UserError(f"accelerate config {config_file}: expected a mapping of accelerate settings "
                        f"(`accelerate config` writes one), got a YAML {type(config).__name__}")
    engine = config.get("distributed_type", "NO")
    if engine in ("FSDP", "DEEPSPEED") and not has_cuda():
        raise UserError(f"accelerate config {config_file}: distributed_type {engine} needs CUDA GPUs and none is "
                        f"visible. accelerate {_version('accelerate')} does not shard on CPU (it picks FSDP only "
                        "over a GPU device type and would silently run gloo DDP instead; DeepSpeed needs CUDA). "
                        "On CPU use --num-processes N (DDP over gloo).")
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:  # else refused at the first stage
        raise UserError(f"accelerate config {config_file}: distributed_type DEEPSPEED needs the deepspeed package, "
                        "which is not installed (pip install deepspeed)")
    return config


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
