"""Run a step's child process (a stage under `accelerate launch`, the base evaluation) the way a user should see it.

Its output streams to the terminal and to the step's log, except tracebacks: those go to the log only (the terminal
gets one line pointing there), so a failed stage shows its cause, not accelerate's launcher traceback. The cause comes
from the child itself: a child that fails on a user error writes its one-paragraph message to the file named by
`POSTTRAIN_ERROR_FILE` (`errors.report_child_error`); for any other failure it is the log's last exception line.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ERROR_FILE_ENV
from .runlock import held_fds

_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_LAUNCHER_ERRORS = ("subprocess.CalledProcessError", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
# accelerate (1.16) raises its CalledProcessError `from RuntimeError(<the child's stderr tail>)`: Python prints that
# cause first, with no traceback of its own, so the child's output would reach the terminal twice. A line opening
# such a cause is held back until the chain marker that follows it proves it one (then it stays in the log only).
_CAUSE = "RuntimeError: "
_HOLD_LINES = 5000
# what a stage prints when SIGTERM (to any of its processes) stops it after saving a checkpoint of the step it was at
SAVED_ON_SIGTERM = "SIGTERM: saving checkpoint-"
# how accelerate's launchers report a child killed by a signal (one process; torchrun for several)
_KILLED = re.compile(r"died with <Signals\.\w+: (\d+)>|exitcode\s*:\s*-(\d+)")
# what torch's elastic agent puts before each line of its workers (several processes): read past it, log it as is
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")


def die_with_parent():
    """For `Popen(preexec_fn=...)`: the child gets SIGTERM when the process that started it dies, however it dies
    (SIGKILL gives that process no chance to stop it), so a step never goes on writing into a run folder a rerun has
    taken over; a stage saves the step it is at and exits, as on any SIGTERM. Linux (`prctl`); None elsewhere. The
    kernel watches the thread that forked: steps are started from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up here, before the fork

    def arm():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


@dataclass
class Outcome:
    code: int
    message: str | None  # the child's own one-paragraph error, when it reported one
    last_exception: str | None  # else the last exception line of its log
    signal: int | None = None  # the signal that killed it (or one of its processes), if any
    saved_on_sigterm: bool = False  # it stopped on SIGTERM after saving the step it was at (`SAVED_ON_SIGTERM`)


class _Echo:
    """Writes the child's output to the log, and to the terminal without tracebacks."""

    def __init__(self, log, log_path: Path):
        self.log, self.log_path, self.pending = log, log_path, b""
        self.in_traceback = self.pointed = False
        self.last_exception, self.signal, self.saved_on_sigterm = None, None, False
        self.held: list[bytes] | None = None  # lines of a possible chained cause (`_CAUSE`), not shown yet

    def feed(self, chunk: bytes) -> None:
        self.log.write(chunk)
        self.log.flush()  # on disk now: if this process is killed, the log still ends with the child's last words
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        if (self.pending and not self.in_traceback and self.held is None and b"\r" in self.pending
                and not self.pending.startswith(_CAUSE.encode())):  # a progress bar: show it as it moves
            self._show(self.pending)
            self.pending = b""

    def _line(self, line: bytes, may_hold: bool = True) -> None:
        text = _RANK_PREFIX.sub("", line.decode(errors="replace").rstrip(), count=1)
        killed = _KILLED.search(text)
        if killed:
            self.signal = int(killed.group(1) or killed.group(2))
        self.saved_on_sigterm |= text.startswith(SAVED_ON_SIGTERM)
        if text.startswith(_CHAINED):  # between the tracebacks of chained exceptions
            self.held = None  # what was held was the cause of the exception that follows: the log has it
            self.in_traceback = True  # the blank line before that exception's traceback goes to the log only
            return
        if self.held is not None:
            self.held.append(line)
            if len(self.held) >= _HOLD_LINES:
                self.flush()
            return
        if may_hold and text.startswith(_CAUSE) and not self.in_traceback:
            self.held = [line]
            return
        if text.startswith("Traceback (most recent call last):"):
            if not self.pointed:
                self._show(f"  (traceback written to {self.log_path})\n".encode())
            self.in_traceback = self.pointed = True
            return
        if self.in_traceback:
            if text[:1].isspace() or not text:
                return
            self.in_traceback = False  # the exception line ends the traceback; it stays in the log only
            if _EXCEPTION_LINE.match(text):
                # the child's own exception, not the launcher's that follows it
                if self.last_exception is None or not text.startswith(_LAUNCHER_ERRORS):
                    self.last_exception = text
                return
        self._show(line)

    def flush(self) -> None:
        """Show held lines that turned out not to be a chained cause (called at the end of the output too)."""
        held, self.held = self.held or [], None
        for index, line in enumerate(held):
            self._line(line, may_hold=index > 0)

    def _show(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def progress_env() -> dict:
    """Progress bars for output that goes to a file (nohup, a batch job's log), not to a terminal: tqdm redraws its
    bar up to 10 times a second, each frame a carriage return that a file keeps (about 3 MB an hour, in one line, in
    that file and in the step's log); one frame every 30 s still shows progress. tqdm reads its defaults from
    TQDM_* variables, so one set by the user wins (it comes later, with the rest of the environment)."""
    return {} if sys.stdout.isatty() else {"TQDM_MININTERVAL": "30"}


def spawn(cmd: list[str], log_path: Path, env: dict | None = None) -> Outcome:
    """Run `cmd` (with `env` added to the environment), appending its output to `log_path`; returns its exit code
    and the cause of a failure."""
    error_file = log_path.with_suffix(".error")
    error_file.unlink(missing_ok=True)
    env = {**progress_env(), **os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), ERROR_FILE_ENV: str(error_file)}
    with open(log_path, "ab") as log:
        echo = _Echo(log, log_path)
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=die_with_parent(), pass_fds=held_fds())
        try:
            for chunk in iter(lambda: process.stdout.read1(4096), b""):
                echo.feed(chunk)
            if echo.pending:
                echo.feed(b"\n")
            echo.flush()
            code = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the step's processes stop with the pipeline, never orphaned
            stop(process, echo, launcher=LAUNCHER in cmd)
            raise
    message = None
    if error_file.is_file():
        message = error_file.read_text(errors="replace").strip() or None
        error_file.unlink()
    return Outcome(code, message, echo.last_exception, echo.signal, echo.saved_on_sigterm)


LAUNCHER = "accelerate.commands.launch"  # a stage's launcher (`python -m`): its children are the stage's processes
# seconds a stopped step's processes get to exit before SIGKILL: as long as a stage may need to finish its step and
# save it, and longer than the 30 s torch's elastic agent gives its workers, so that it ends workers still saving
STOP_GRACE = 40.0


def stop(process: subprocess.Popen, echo: _Echo | None, grace: float = STOP_GRACE, launcher: bool = False) -> None:
    """SIGTERM to a step's process, or, for a `launcher`, to the processes it started (a stage saves the step it is
    at and exits, `stages.training.save_and_stop_on_sigterm`; the launcher ends when they do: accelerate's own
    launcher for one process would kill its child 5 s after passing SIGTERM on, too soon for a large model's step and
    save). What the step still writes is passed on through `echo` (when its output is piped), so its last words reach
    the terminal and the log; SIGKILL to it and whatever it started if it has not exited within `grace` seconds."""
    import selectors
    import time

    import psutil

    try:
        parent = psutil.Process(process.pid)
        workers = parent.children() if launcher else []
        family = parent.children(recursive=True)  # known now: orphans are re-parented
    except psutil.NoSuchProcess:
        workers, family = [], []
    deadline = time.monotonic() + grace
    try:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.terminate()
        if not workers:  # nothing to signal if it already ended (Ctrl-C reaches the whole group)
            process.terminate()
        if echo is not None:  # its output may still wait in the pipe
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                while (left := deadline - time.monotonic()) > 0 and selector.select(timeout=left):
                    chunk = process.stdout.read1(4096)
                    if not chunk:
                        break
                    echo.feed(chunk)
            echo.flush()
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when a second Ctrl-C cuts the wait short
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def killed_by(number: int) -> str:
    return f"killed by signal {number} ({signal.Signals(number).name}; SIGKILL often means the machine ran out of memory)"


def describe(outcome: Outcome) -> str:
    """The cause of a failed step in one line or paragraph."""
    if outcome.message:
        return outcome.message
    if outcome.signal or outcome.code < 0:
        return f"the process was {killed_by(outcome.signal or -outcome.code)}"
    if outcome.last_exception:
        # not always a bug: a recipe value only TRL checks (a DPO `loss_type`) ends a stage the same way
        return (f"it ended with {outcome.last_exception} (a recipe value posttrain does not check, or a bug in "
                "posttrain or a library: the traceback is in its log)")
    return f"exit code {outcome.code}"
