"""Trainer checkpoints that are safe to resume from: marked complete when written, verified before resuming.

The Trainer writes `checkpoint-N/` file by file; a kill, an OOM or a full disk in the middle leaves a folder that looks
like a checkpoint and fails to load (`SafetensorError`, `JSONDecodeError`, `EOFError`) on every rerun. So every stage
adds a callback (`after_save`) that writes `checkpoint_complete.json` (each file's size) once the Trainer has finished a
checkpoint, and the pipeline resumes from the newest checkpoint that is marked, still has every file at its recorded
size, and whose JSON and safetensors files load; unusable newer ones are removed, with a message.

Test hook: with `POSTTRAIN_TEST_KILL_AFTER_CHECKPOINT=N` in its environment, a stage SIGKILLs itself right after
checkpoint N is complete, so the fault-injection tests interrupt training at a known point without timing guesses.
"""

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .io import write_json

MARKER = "checkpoint_complete.json"
KILL_ENV = "POSTTRAIN_TEST_KILL_AFTER_CHECKPOINT"


def checkpoints(folder: str | Path) -> list[Path]:
    """`checkpoint-N` folders of `folder`, newest (highest N) first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def mark_complete(checkpoint: str | Path, processes: int = 1) -> Path:
    """Record every file of a finished checkpoint with its size, and how many processes trained it (the data each
    step read, the RNG files); written last, atomically."""
    checkpoint = Path(checkpoint)
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MARKER}
    return write_json(checkpoint / MARKER, {"files": files, "processes": processes})


def check_processes(checkpoint: str | Path, processes: int, partial: str | Path) -> None:
    """A checkpoint resumes on as many processes as trained it. On another number the Trainer would skip each
    process's first `global_step` batches of its new share of the data, rows no step trained on (and repeat others),
    and find no RNG file for the new ranks: refused, with the ways on. (Marked before this was recorded: not checked.)"""
    try:
        saved = json.loads((Path(checkpoint) / MARKER).read_text()).get("processes")
    except (OSError, ValueError, AttributeError):
        return
    if saved is not None and saved != processes:
        raise UserError(f"{Path(checkpoint).name} was trained by {saved} process(es) and this stage runs {processes}: "
                        f"resuming would skip rows no step trained on. Run it on {saved} process(es) again to resume, "
                        f"or remove {partial} to train the stage from the start")


def problem(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it can."""
    checkpoint = Path(checkpoint)
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
    except FileNotFoundError:
        return "it was never marked complete (its save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MARKER} is unreadable ({exc})"
    for name, size in files.items():
        path = checkpoint / name
        if path.is_file() and path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
        reason = file_problem(path)
        if reason:
            return reason
    return None


def file_problem(path: Path) -> str | None:
    """`<name> is missing`, `<name> does not load (<why>)` for a JSON or safetensors file, or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    reason = _load_problem(path)
    return f"{path.name} does not load ({reason})" if reason else None


def _load_problem(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:  # the header only: "pt" would import torch (2 s)
                handle.keys()
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not resumable"; the reason is shown
        return f"{type(exc).__name__}: {exc}"
    return None


def finished_problem(folder: str | Path) -> str | None:
    """Why a finished stage folder cannot be used as one (its adapter, or its full model's weights, missing or not
    loading: deleted or truncated by hand, a disk that filled), or None."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        names = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        names = sorted(p.name for p in folder.glob("model*.safetensors")) or ["adapter_model.safetensors"]
    for name in names:
        reason = file_problem(folder / name)
        if reason:
            return reason
    return None


def resume_point(folder: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest usable checkpoint of `folder`; newer unusable ones are removed (so the Trainer neither resumes from
    nor rotates against them), each with a message saying why."""
    for checkpoint in checkpoints(folder):
        reason = problem(checkpoint)
        if reason is None:
            return checkpoint
        say(f"{checkpoint.name} cannot be resumed from: {reason}; removed it")
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def remove_incomplete(folder: str | Path) -> None:
    """Drop checkpoints never marked complete (a save that failed): nothing half-written stays behind."""
    for checkpoint in checkpoints(folder):
        if not (checkpoint / MARKER).is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)


def after_save(output_dir: str | Path, step: int, is_main_process: bool) -> None:
    """What every process does once the Trainer has written checkpoint `step` (the stages' `CheckpointGuard`
    callback): wait for all processes' files, mark the checkpoint complete on the main one, then honour the test hook.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()  # other ranks write their own rng_state_<rank>.pth into the same folder
    checkpoint = Path(output_dir) / f"checkpoint-{step}"
    if is_main_process and checkpoint.is_dir():
        mark_complete(checkpoint, dist.get_world_size() if distributed else 1)
    if distributed:
        dist.barrier()
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
