"""One `posttrain run` per run folder: an exclusive lock on `<run>/.lock`, held for as long as the run's process lives.

The lock is the kernel's (`fcntl.flock`), so it goes away with its process however that process ends: a lock file left
by a process that died is simply taken over (and said so). The file holds the holder's PID, which a refused second run
names.
"""

import fcntl
import os
import time
from pathlib import Path

from .errors import UserError, make_folder


class RunLock:
    """Exclusive lock on a run folder. `acquire()` raises `UserError` naming the holder's PID if another live process
    holds it; `say` receives the take-over message for a lock left by a dead process."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.handle = None

    def acquire(self, say=print) -> "RunLock":
        make_folder(self.path.parent, "the run folder")
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            raise UserError(f"{self.path.parent} is in use by another posttrain run (PID {holder or 'unknown'}, "
                            f"lock file {self.path}); wait for it to finish or stop it, or give this run another "
                            "--output-dir") from None
        previous = _read(handle)
        if previous and previous != str(os.getpid()):
            say(f"taking over the lock of {self.path.parent} left by PID {previous}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()  # an empty lock file: released cleanly, nothing to take over
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _read(handle) -> str:
    handle.seek(0)
    return (handle.readline() or "").strip()
