"""One `posttrain run` per run folder: an exclusive lock on `<run>/.lock`, held for as long as the run's process lives.

The lock is the kernel's (`fcntl.flock`), so it goes away with its process however that process ends: a lock file left
by a process that died is simply taken over (and said so). The file holds the holder's PID, which a refused second run
names. The steps a run starts inherit the lock (`held_fds`, passed to every child): `posttrain run` killed with
SIGKILL leaves its stage finishing its step and saving it (`childproc.die_with_parent`), and until that stage exits
the folder is still in use; a second run waits for it (`WAIT_FOR_STEPS_S`) instead of writing next to it.
"""

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UserError, make_folder
from .io import pid_running

# how long a run waits for the steps of a run that was killed (its holder PID is gone, its children still save)
WAIT_FOR_STEPS_S = 120.0
_HELD: set[int] = set()


def held_fds() -> tuple[int, ...]:
    """File descriptors of the run locks this process holds: `pass_fds` of every step it starts."""
    return tuple(sorted(_HELD))


class RunLock:
    """Exclusive lock on a run folder. `acquire()` raises `UserError` naming the holder's PID if another live process
    holds it; `say` receives the take-over message for a lock left by a dead process."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.handle = None

    def acquire(self, say=print) -> "RunLock":
        make_folder(self.path.parent, "the run folder")
        handle = open(self.path, "a+")
        deadline, waiting = time.monotonic() + WAIT_FOR_STEPS_S, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read(handle)
                # a PID is only looked up on the machine that wrote it: a run on another machine (a shared
                # filesystem) or in another PID namespace is a live run whose PID does not exist here
                orphaned = holder.isdigit() and _host(handle) == socket.gethostname() and not pid_running(int(holder))
                if orphaned and time.monotonic() < deadline:
                    if not waiting:  # the run was killed; the steps it started hold the lock while they save
                        say(f"the run that held {self.path.parent} (PID {holder}) was stopped; waiting for the steps "
                            "it started to finish saving…")
                        waiting = True
                    time.sleep(0.5)
                    continue
            handle.close()
            if orphaned:
                raise UserError(f"{self.path.parent} is still in use by the steps of a stopped posttrain run (PID "
                                f"{holder}) after {WAIT_FOR_STEPS_S:.0f} s; wait for them to exit or stop them "
                                f"(`fuser {self.path}` lists them), or give this run another --output-dir") from None
            raise UserError(f"{self.path.parent} is in use by another posttrain run (PID {holder or 'unknown'}, "
                            f"lock file {self.path}); wait for it to finish or stop it, or give this run another "
                            "--output-dir") from None
        previous = _read(handle)
        if previous and previous != str(os.getpid()):
            say(f"taking over the lock of {self.path.parent} left by PID {previous}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n{socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        _HELD.add(handle.fileno())
        return self

    def release(self) -> None:
        if self.handle is not None:
            _HELD.discard(self.handle.fileno())
            self.handle.seek(0)
            self.handle.truncate()  # an empty lock file: released cleanly, nothing to take over
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _read(handle) -> str:
    handle.seek(0)
    return (handle.readline() or "").strip()


def _host(handle) -> str:
    """The machine the holder wrote its PID on (the lock file's third line; none in files written before it)."""
    handle.seek(0)
    lines = handle.read().splitlines()
    return lines[2].strip() if len(lines) > 2 else ""
