"""The one exception type that means "the user can fix this": the CLI prints it as a paragraph, not a traceback.

Child processes (stages, the base evaluation) report such an error the same way and also hand the paragraph to the
pipeline through the file named by `POSTTRAIN_ERROR_FILE`, so the run's summary shows the cause, not the launcher's
traceback. A full disk, whatever layer notices it first, becomes such an error too (`disk_full_error`).
"""

import errno
import os
import sys
from pathlib import Path

from .io import write_text

ERROR_FILE_ENV = "POSTTRAIN_ERROR_FILE"


class UserError(Exception):
    """A mistake in a recipe, a file, an argument or the environment, explained in words the user can act on."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption or time limit, `kill`), raised in the main thread by `terminate_on_sigterm`:
    a KeyboardInterrupt, so every path that handles Ctrl-C (run.json marked interrupted, children stopped, the lock
    released, the report built) handles it too."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in this process (the CLI's: the default would end it on the spot, leaving the
    run marked as running and a stage process orphaned)."""
    import signal

    def handler(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` or anything in its cause/context chain is "no space left on device" or "disk quota exceeded" (a
    user's quota on a cluster's file system: the same remedy): torch and safetensors wrap the OSError of a failed
    write in their own exception types, so the errno alone is not enough."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def make_folder(path: str | Path, what: str) -> Path:
    """Create the folder `path` (and its parents) for `what`; one that cannot be made (a file in the way, no
    permission, a read-only file system) or that exists but cannot be written in (someone else's run, a read-only
    mount) is a `UserError` naming it, checked before any work. A full disk stays an OSError, for
    `disk_full_error`'s paragraph."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):  # else found by the first write, after the work (a traceback)
        raise UserError(f"cannot write in {what} {path}: no permission, or a read-only file system")
    return path


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def is_out_of_memory(exc: BaseException) -> bool:
    """A device or the CPU allocator out of memory: torch's OutOfMemoryError (CUDA), or the RuntimeError other
    backends raise ("MPS backend out of memory", "DefaultCPUAllocator: can't allocate memory")."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def what_ran_out(exc: BaseException) -> str:
    """The first line of an out-of-memory error (what was asked for, what the device holds), for a paragraph."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "…"


def disk_full_error(exc: BaseException, needed_for: str, near: str | Path | None = None,
                    resumes: bool = True) -> UserError:
    """The paragraph for a full disk: which file system, which file, what the space was needed for, and that the same
    command (a run: resuming from its checkpoint) works once space is freed."""
    filename = getattr(exc, "filename", None) or near
    where = f"{_mount_point(Path(filename))} (writing {filename})" if filename else "the device"
    then = " and the run resumes from its last complete checkpoint" if resumes else ""
    return UserError(f"no space left on {where}, needed for {needed_for}. Free some space and run the same command "
                     f"again: nothing half-written is kept{then}.")


# the settings a step's memory grows with, as each stage's TRL config names them (UPO: GRPOConfig's)
MEMORY_SETTINGS = ("per_device_train_batch_size", "max_length", "num_generations", "max_completion_length",
                   "gradient_checkpointing")


def out_of_memory_error(stage: str, exc: BaseException, training_args) -> str:
    """The paragraph for a stage that ran out of memory while training (TRL's own traceback calls it nothing
    more than an exception): the settings that decide a step's memory, with their values, and what to change."""
    settings = ", ".join(f"{name}={getattr(training_args, name)}" for name in MEMORY_SETTINGS
                         if getattr(training_args, name, None) is not None)
    changes = ["Lower per_device_train_batch_size and raise gradient_accumulation_steps as much (the same rows an "
               "optimizer step)",
               "lower num_generations or max_completion_length" if hasattr(training_args, "num_generations") else
               "shorten max_length"]
    if not training_args.gradient_checkpointing:
        changes.append("set gradient_checkpointing: true")
    changes.append("shard the model over several GPUs (--accelerate-config recipes/accelerate/fsdp.yaml)")
    return (f"the {stage} stage ran out of memory ({what_ran_out(exc)}) with {settings}. {', '.join(changes[:-1])} "
            f"or {changes[-1]}; then run the same command again: the stages before it are kept, and this one starts "
            "over when its settings change.")


def report_child_error(message: str) -> None:
    """In a child process: print `message` as one paragraph to stderr and hand it to the pipeline (if it asked)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            write_text(path, message)
        except OSError:  # a full disk may refuse even this; the pipeline then falls back to the log
            pass


def row_name(index: int) -> str:
    """A dataset row in an error, as users look for it: counted from 1, as data_prep's `FILE:N` and the line numbers
    of a JSON Lines file are (`index` is datasets' own, from 0); said, since a Python user may count from 0."""
    return f"row {index + 1} (counting from 1)"
