"""`data_prep` jobs by name, for `posttrain data` and for the `data:` section of a recipe.

The jobs live in the `data_prep` package, which imports posttrain (its errors, models, evaluation); posttrain does not
import data_prep back, not even here: like the stages, the jobs run in a child process, `python -m data_prep.jobs`,
which lists them, checks a recipe's `data:` section against their options, and runs one. So the recipe, the CLI and
`python -m data_prep.<job>` all go through the same code.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from .childproc import die_with_parent, killed_by
from .errors import Terminated, UserError
from .runlock import held_fds

JOBS = [sys.executable, "-m", "data_prep.jobs"]
# What a recipe's data job is told through its environment (read by data_prep.config, which imports them from here):
# the command its card records (its `--config` is a temporary file, gone once the job ends), and the file its user
# error goes to, so that error reaches the run's own whole, whatever the job's stderr prints after it.
COMMAND_ENV = "POSTTRAIN_DATA_COMMAND"
ERROR_ENV = "POSTTRAIN_DATA_ERROR"


def _ask(*args: str, stdin: str | None = None) -> str:
    """Run `python -m data_prep.jobs ARGS` quietly; its one-line user error becomes ours."""
    result = subprocess.run([*JOBS, *args], input=stdin, capture_output=True, text=True)
    if result.returncode == 2:
        raise UserError(result.stderr.strip().removeprefix("error: "))
    if result.returncode:
        raise RuntimeError(f"{' '.join(JOBS + list(args))} failed (exit code {result.returncode}):\n{result.stderr}")
    return result.stdout


def list_jobs() -> dict[str, list[str]]:
    """{"jobs": the builders a recipe can name, "tools": the other `posttrain data` commands (validate, ...)}."""
    return json.loads(_ask("list"))


def check_data_section(data: dict, where: str, stages: list[str]) -> dict[str, list[str] | None]:
    """The recipe's `data:` section, checked by the jobs' own option lists (UserError on the first mistake): the
    splits each dataset's job writes (None where the job does not say)."""
    return dict(_check(json.dumps({"data": data, "where": where, "stages": stages}, default=str))) if data else {}


@functools.lru_cache(maxsize=64)
def _check(section: str) -> dict[str, list[str] | None]:
    """One child process per distinct section: a section that passed passes again (a failure raises, so is not
    cached). `posttrain ablate` loads the recipe once per variant, the tests hundreds of times."""
    return json.loads(_ask("check", stdin=section))


def run_command(job: str, argv: list[str]) -> int:
    """`posttrain data JOB ARGS`: the job's output and errors go straight to the terminal; returns its exit code."""
    listed = list_jobs()
    if job not in listed["jobs"] + listed["tools"]:
        raise UserError(f"posttrain data: '{job}' is not a data_prep job; the jobs are: {', '.join(listed['jobs'])}")
    return _wait(subprocess.Popen([*JOBS, job, *argv], preexec_fn=die_with_parent()))


def run_job(job: str, args: dict, out: str | Path, launch=None, config_dir: str | Path | None = None) -> None:
    """Run `job` with `args` (a mapping of its config fields), writing to `out`; `launch` turns the job's Python
    arguments into its command (several processes under accelerate's launcher: `Pipeline.sampling_command`), and
    `config_dir` is where its options file goes (the temporary folder, else one every machine of the run sees)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, dir=config_dir) as handle:
        yaml.safe_dump({**args, "output_dir": str(out)}, handle)
    # the card's command: the temporary config is deleted below, and the card records the same options
    command = f"posttrain data {job} --config options.yaml  # options.yaml: the options this card lists"
    error = Path(f"{handle.name}.error")
    try:
        script = [*JOBS[1:], job, "--config", handle.name]
        process = subprocess.Popen(launch(script) if launch else [sys.executable, *script],
                                   preexec_fn=die_with_parent(), pass_fds=held_fds(),
                                   env={**os.environ, COMMAND_ENV: command, ERROR_ENV: str(error)},
                                   stderr=subprocess.PIPE)
        tail = StderrTail(process.stderr)
        code = _wait(process)
        cause = error.read_text(encoding="utf-8", errors="replace") if error.is_file() else None
    finally:
        Path(handle.name).unlink(missing_ok=True)
        error.unlink(missing_ok=True)
    if code < 0:  # its last line is whatever it printed when killed (a progress bar), not why
        raise UserError(f"data job '{job}' was {killed_by(-code)}")
    if code:
        cause = cause or tail.last_error()  # no user error: an exception's last line
        raise UserError(f"data job '{job}' failed with exit code {code}" + (f": {cause}" if cause else ""))


class StderrTail(threading.Thread):
    """A child's stderr copied to ours as it comes (progress bars and all), its end kept: the job's error then goes
    into the pipeline's own, which run.json and the report keep after the terminal has scrolled it away."""

    KEEP = 1 << 16

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.kept = pipe, bytearray()
        self.start()

    def run(self) -> None:
        raw = getattr(sys.stderr, "buffer", None)  # a test's captured stderr has none: text then
        for chunk in iter(lambda: os.read(self.pipe.fileno(), 1 << 16), b""):
            self.kept += chunk
            del self.kept[:-self.KEEP]
            # our stderr gone (`posttrain run ... 2>&1 | head`): the job is still read to its end, or it would block
            # on a full pipe and the run with it
            with contextlib.suppress(OSError, ValueError):
                if raw is not None:
                    raw.write(chunk)
                    raw.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))

    def last_error(self) -> str:
        """The job's `error: ...` message (data_prep prints a user error so; its `ERROR_ENV` file has it whole), else
        its last line (an exception's)."""
        self.join(timeout=10)
        lines = [line.strip() for line in self.kept.decode(errors="replace").replace("\r", "\n").splitlines()
                 if line.strip()]
        start = next((i for i in reversed(range(len(lines))) if lines[i].startswith("error: ")), None)
        if start is None:
            return lines[-1] if lines else ""
        return " ".join(lines[start:]).removeprefix("error: ")


def _wait(process: subprocess.Popen, grace_s: float = 30.0) -> int:
    """The job's exit code. Interrupted, it is given `grace_s` to clean up (its partial output and work folders)
    rather than `subprocess.call`'s SIGKILL: Ctrl-C reached it as well (same process group); SIGTERM is passed on."""
    try:
        return process.wait()
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            process.send_signal(exc.signum)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
