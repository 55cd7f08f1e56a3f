"""Atomic writes: the one place that turns "write a file or folder" into "nothing half-written is ever visible".

Every file or folder the project writes for someone else to read (run state, stage folders, exports, data-job
outputs, reports, converted models) goes through here: the content is written to a hidden sibling first and renamed
into place, so a crash, a kill or a full disk leaves either the old content or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(partial|old|tmp)$")  # what `_sibling` names


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (`_sibling`) that writers killed mid-write left under `folder` (SIGKILL gives
    them no chance to clean up: a half-written merged export or data set is gigabytes for a real model), those of
    processes no longer running; returns what was removed. For a folder only this process writes into, such as a
    run folder under its `RunLock`."""
    removed = []
    for path in sorted(Path(folder).rglob(".*"), key=lambda p: len(p.parts)):
        match = _LEFTOVER.match(path.name)
        if not match or any(parent in removed for parent in path.parents) or pid_running(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_running(pid: int) -> bool:
    """Whether a process with this PID runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically, also across a power loss: the content is synced before the
    rename, which may otherwise reach the disk first and leave an empty file, and the folder after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileNotFoundError):  # the mode the file had (opened to others, or kept private)
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power loss, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    with contextlib.suppress(OSError):  # some filesystems refuse to sync one
        os.fsync(fd)
    os.close(fd)


def read_json(path: str | Path, say: Callable[[str], object] | None = None) -> dict:
    """The JSON object in `path`, or `{}` when the file does not exist yet (a run's state, a stage's metrics) or no
    longer reads as one (emptied or cut short by hand or by a copy: what it records is then missing, so the step it
    describes is done again and the report shows it unmeasured, where it ended in a JSONDecodeError traceback);
    `say` is told why, then."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
        record = exc
    if isinstance(record, dict):
        return record
    if say:
        say(f"{path} is unreadable ({record if isinstance(record, Exception) else 'not a JSON object'})")
    return {}


def write_json(path: str | Path, obj, **dumps_kwargs) -> Path:
    """Replace `path` with `obj` as indented JSON (non-JSON values through `str`) atomically."""
    dumps_kwargs = {"indent": 2, "ensure_ascii": False, "default": str, **dumps_kwargs}
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def write_jsonl(path: str | Path, rows) -> Path:
    """Replace `path` with one JSON object per line (UTF-8 kept as is, non-JSON values through `str`) atomically."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def replace_dir(out: str | Path, write: Callable[[Path], object], if_exists: str = "replace") -> Path:
    """Run `write(tmp)` into a hidden sibling folder of `out`, then swap it into place; returns `out`.

    Args:
        out (`str` or `Path`): the folder to create or replace.
        write (`Callable[[Path], object]`): fills the (empty, existing) temporary folder.
        if_exists (`str`, *optional*, defaults to `"replace"`):
            What to do when `out` exists once `write` has finished: `"replace"` it; `"keep"` it and drop ours (another
            process built the same cache entry first); `"fail"` with `FileExistsError` (someone else's folder
            appeared while we were writing ours).

    On any failure (an exception, Ctrl-C) the temporary folder is removed and `out` is left as it was. The temporary
    folder is made with `mkdir`, not `mkdtemp`, whose 0700 mode would make the result private to this user.
    """
    out = Path(out)
    if out.is_symlink():  # a folder linked elsewhere (a bigger disk): replace what it points to, keep the link
        out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp, old = _sibling(out, "partial"), _sibling(out, "old")
    tmp.mkdir()
    try:
        write(tmp)
        umask_permissions(tmp)
        if out.exists() and if_exists != "replace":
            return _taken(out, tmp, if_exists)
        if out.exists():  # move the old folder aside first, so the swap is two renames
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError as exc:  # another writer's `out` appeared between the check above and this rename
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or if_exists == "replace":
                raise
            return _taken(out, tmp, if_exists)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _taken(out: Path, tmp: Path, if_exists: str) -> Path:
    """`replace_dir` when another writer's `out` is there (`if_exists` keep or fail): ours is dropped."""
    shutil.rmtree(tmp)
    if if_exists == "fail":
        raise FileExistsError(f"{out} appeared while it was being written")
    return out


def _remove_dead_partials(out: Path) -> None:
    """Remove the temporary folders of `out` that earlier writers killed mid-write left (SIGKILL, the OOM killer during
    a big merged export): `remove_leftovers` only sweeps run folders, and an export's --out or a report can be
    anywhere, so writing `out` again is the one moment anything looks there."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        match = _LEFTOVER.match(path.name)  # `.exp.v2.<pid>-….partial` is another folder's: its name is not ours
        if match and match["name"] == out.name and not pid_running(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def moved_aside(out: str | Path):
    """For a writer that must create `out` itself (a data job in its own process, some of which refuse an existing
    folder), where `replace_dir`'s temporary folder cannot stand in: an existing `out` is moved to a hidden sibling
    for the duration, dropped once the block succeeds, and put back if it fails without having written a new one."""
    out = Path(out)
    old = _sibling(out, "old")
    if out.exists():
        os.replace(out, old)
    try:
        yield out
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(out: str | Path, *objects, if_exists: str = "replace") -> Path:
    """`save_pretrained` of each of `objects` (a model, its tokenizer or processor) into `out`, atomically.

    `if_exists="keep"` is for cache entries (tiny, converted models): two processes may build the same one, and
    either result is right."""

    def write(tmp: Path):
        for obj in objects:
            obj.save_pretrained(tmp)

    return replace_dir(out, write, if_exists)


def umask_permissions(folder: Path) -> None:
    """Some writers (safetensors via a temp file) leave 0600 files; what we write is meant to be shared (a folder
    `replace_dir` fills, a stage folder the pipeline moves into place)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
