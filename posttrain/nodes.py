"""Several machines, one run: machine 0 prepares everything once, the others join each stage it launches.

    posttrain run RECIPE --num-machines 2 --machine-rank $RANK --main-process-ip $HOST   # on every machine

The run folder must be on a filesystem every machine sees (the usual cluster home or scratch). Machine 0 runs the
pipeline as on one machine (data jobs, base evaluation, skipping finished stages, resuming, the report); before
each stage it launches, it writes the stage's `accelerate launch` arguments to `<run>/.nodes/launch.json`. Every
other machine only follows that file: it runs the same arguments with its own `--machine_rank`, so the stage's
processes on all machines meet in one `torch.distributed` group at `--main-process-ip`, and it exits when machine
0 writes that the run ended (0 if it finished, 2 if it failed).

Handshake, without trusting clocks across machines: a follower writes `<run>/.nodes/machine-<rank>.json` with a
fresh token and a counter it keeps increasing while it waits; machine 0 launches nothing until every follower's
counter has moved (so a file left by an earlier run is never mistaken for a live machine), and every entry it
writes names the tokens it is meant for and an id of machine 0's process (one started again after a crash numbers
its entries from 1 again, while the followers that outlived the first go on). Waits end after
`POSTTRAIN_NODE_TIMEOUT` seconds (default 7200) with an error that says which machine never came. A follower keeps
beating while its stage runs, and before each later stage machine 0 waits for every follower's counter to move
again: one whose counter stood still for `LOST_AFTER_S` (its machine went down between stages) stops the run with its
name, and one started again since (a new token) joins the stages from there on. A follower whose
own checks of the recipe fail (a reward it cannot import, an engine it lacks) writes why in its file instead, and
machine 0 stops with that, taking the file away, rather than wait the timeout out for it.

What every stage loads from outside the run folder (the base model, a folder in machine 0's caches; a dataset the
recipe names) must be at the same path on every machine: machine 0 writes those paths to `<run>/.nodes/needs.json`
before its first launch, each follower's counter file says which of them it lacks, and machine 0 stops with that
instead of launching a stage whose processes there would fail to load it (or, with NCCL, leave the others waiting).
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from . import childproc
from .console import console
from .errors import Terminated, UserError
from .io import write_json

POLL_S = 0.5
# How a stage whose processes lost one of them ends, as its log shows it (gloo on CPU, NCCL, torchrun)
LOST_PROCESS = (
    ("Timed out waiting", "a process of this stage stopped answering (frozen, or its machine unreachable) and the "
                          "others gave up after `ddp_timeout` seconds"),
    # gloo's wording when the timeout hits while a pair of processes is connected rather than mid-send
    ("Application timeout caused pair closure", "a process of this stage stopped answering (frozen, or its machine "
                                                "unreachable) and the others gave up after `ddp_timeout` seconds"),
    ("Watchdog caught collective operation timeout", "a process of this stage stopped answering and the others gave "
                                                     "up after `ddp_timeout` seconds"),
    ("Connection reset by peer", "another process of this stage died (killed, out of memory, or its machine went "
                                 "down)"),
    ("Connection closed by peer", "another process of this stage died (killed, out of memory, or its machine went "
                                  "down)"),
    ("Signals.SIGKILL", "a process of this stage was killed (SIGKILL: out of memory, or killed by hand)"),
)


# How long machine 0 waits, before launching a stage after the first, for a follower's file to change (a follower
# rewrites it every POLL_S between stages, every STAGE_BEAT_S while one runs): longer than a network filesystem
# caches what it last read
LOST_AFTER_S = 180.0
STAGE_BEAT_S = 5.0  # how often it does while its stage runs (hours, on a filesystem every machine shares)


def node_timeout() -> float:
    return float(os.environ.get("POSTTRAIN_NODE_TIMEOUT", "7200"))


# Ports for a run's rendezvous, below Linux's ephemeral range (32768 and up): a port `bind(("", 0))` hands out is one
# the kernel also gives outgoing connections, such as the many gloo and NCCL open between processes, and one of those
# could take it between this check and the rendezvous store's own bind seconds later (torchrun's default, 29500, is
# in this range too).
RENDEZVOUS_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port nobody holds now on this machine, drawn from `RENDEZVOUS_PORTS` by the system's randomness (a seeded
    `random` would give two runs started alike the same draws)."""
    draw = random.SystemRandom()
    for port in draw.sample(RENDEZVOUS_PORTS, min(64, len(RENDEZVOUS_PORTS))):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # that range taken: any free port
        sock.bind(("", 0))
        return sock.getsockname()[1]


@dataclass
class Nodes:
    """How this machine takes part in a multi-machine run (`num_machines` > 1)."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int | None = None

    def __post_init__(self):
        if not 0 <= self.machine_rank < self.num_machines:
            raise UserError(f"--machine-rank must be in 0..{self.num_machines - 1}; got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise UserError("--num-machines > 1 needs --main-process-ip: the address of machine 0, which every "
                            "machine can reach")

    def launch_flags(self) -> list[str]:
        """`accelerate launch` flags that put this machine's processes into the run's one process group."""
        # unset: machine 0 picks a free one per stage (a port just released can linger); followers read it from the
        # launch entry
        port = self.main_process_port or free_port()
        return ["--num_machines", str(self.num_machines), "--machine_rank", str(self.machine_rank),
                "--main_process_ip", self.main_process_ip, "--main_process_port", str(port)]


class Coordinator:
    """Machine 0's side: waits for the followers, then announces each stage launch and the end of the run."""

    def __init__(self, root: Path, nodes: Nodes):
        self.folder, self.nodes = root / ".nodes", nodes
        self.tokens: dict[int, str] | None = None
        # a machine 0 started again (after a crash) numbers its entries from 1 again: this id tells them from those
        # of the one before, which the followers that outlived it have already seen
        self.run_id, self.seq = uuid.uuid4().hex, 0

    def _wait_for_followers(self, timeout: float, needs: list[str] | None = None) -> dict[int, str]:
        """{rank: token} of every follower once each is seen alive; with `needs` (paths every machine must see),
        once each has also said which of them it lacks, and then only if none does."""
        if self.tokens is None:
            console.print(f"waiting for machines 1..{self.nodes.num_machines - 1} to join (posttrain run … "
                          "--machine-rank N on each)…")
        if needs is not None:
            write_json(self.folder / "needs.json", {"run": self.run_id, "paths": needs})
        first_seen: dict[int, dict] = {}
        alive: dict[int, str] = {}
        deadline = time.time() + timeout
        while time.time() < deadline:
            alive, failed = {}, {}
            for rank in range(1, self.nodes.num_machines):
                entry = _read(self.folder / f"machine-{rank}.json")
                if entry and entry.get("failed"):
                    failed[rank] = entry
                elif entry and rank in first_seen and first_seen[rank]["token"] == entry["token"] \
                        and entry["beat"] > first_seen[rank]["beat"] \
                        and (needs is None or entry.get("checked") == self.run_id):
                    if needs is not None:
                        _check_sees(rank, entry)
                    alive[rank] = entry["token"]
                elif entry and (rank not in first_seen or first_seen[rank]["token"] != entry["token"]):
                    first_seen[rank] = entry
            if failed:
                self._stop_on_failed(failed, first_seen)
            if len(alive) == self.nodes.num_machines - 1:
                return alive
            time.sleep(POLL_S * 2)
        missing = sorted(set(range(1, self.nodes.num_machines)) - set(alive))
        if self.tokens is not None:  # they joined an earlier stage
            raise UserError(f"machine(s) {missing} stopped answering after joining the run: their file in "
                            f"{self.folder} has not changed for {timeout:.0f} s (the machine went down, or its "
                            "`posttrain run` was killed); start `posttrain run` with the same arguments there, and "
                            "this machine's again if it has stopped, to resume")
        raise UserError(f"machine(s) {missing} did not join within {timeout:.0f} s (POSTTRAIN_NODE_TIMEOUT): "
                        f"start `posttrain run` with the same recipe and --machine-rank on each, with {self.folder} "
                        "on a filesystem every machine sees")

    def _stop_on_failed(self, failed: dict[int, dict], seen: dict[int, dict]) -> None:
        """Raise for the followers that stopped before joining (`report_failure`), their reports taken away so that
        a later run does not read them as its own; the other followers seen are then told the run failed (`finish`)
        instead of being waited for."""
        self.tokens = {rank: entry["token"] for rank, entry in seen.items() if rank not in failed}
        for rank in failed:
            (self.folder / f"machine-{rank}.json").unlink(missing_ok=True)
        raise UserError("; ".join(f"machine {rank} ({entry.get('host', '?')}) stopped before joining the run: "
                                  f"{entry['failed']}" for rank, entry in failed.items())
                        + f" (its report in {self.folder} is removed now: if that machine was started again since, "
                          "start this one again too)")

    def announce(self, stage: str, launch_args: list[str], needs: list[str] | None = None) -> None:
        """Write `launch_args` for the followers, after waiting for them (`needs`: paths outside the run folder the
        stage loads, which every machine must see): the first time until they join, later until each is seen still
        alive (`LOST_AFTER_S`), so that a machine gone down between stages stops the run with its name rather than
        leave the stage's processes waiting for it in the rendezvous; one started again since (another token)
        joins from this stage on, once it has looked at `needs` too."""
        timeout = node_timeout() if self.tokens is None else min(LOST_AFTER_S, node_timeout())
        self.tokens = self._wait_for_followers(timeout, needs or [])
        # what every machine runs, with its own --machine_rank
        console.print(escape(f"accelerate launch {' '.join(launch_args)}"), style="dim", soft_wrap=True)
        self._write({"action": "launch", "stage": stage, "args": launch_args})

    def finish(self, status: str) -> None:
        """Tell the followers the run ended. When no stage was launched (all finished earlier, or a failure before
        the first), the followers started with this machine are given a minute to show up and hear it."""
        if self.tokens is None:
            try:
                self.tokens = self._wait_for_followers(min(60.0, node_timeout()))
            except UserError:
                if self.tokens is None:  # else one stopped before joining, and the others seen hear the end
                    return
        self._write({"action": "end", "status": status})

    def _write(self, entry: dict) -> None:
        self.seq += 1
        write_json(self.folder / "launch.json", {**entry, "run": self.run_id, "seq": self.seq, "for": self.tokens})


def outside_paths(value, root: Path) -> list[str]:
    """The files and folders `value` names (its strings at any depth with a `/` that exist here as paths), outside
    the run folder `root`, as written: a stage's processes on every machine read them from there."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [path for item in value for path in outside_paths(item, root)]
    if isinstance(value, str) and "/" in value and Path(value).exists() \
            and not Path(value).resolve().is_relative_to(root.resolve()):
        return [value]
    return []


def report_failure(root: Path, nodes: Nodes, message: str) -> None:
    """A follower that stopped before joining (its own checks of the recipe failed) says why in its counter file."""
    folder = root / ".nodes"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"machine-{nodes.machine_rank}.json", {"token": uuid.uuid4().hex, "beat": 0,
                                                                 "host": socket.gethostname(), "failed": message})


def _check_sees(rank: int, entry: dict) -> None:
    if entry.get("missing"):
        raise UserError(f"machine {rank} ({entry.get('host', '?')}) does not see {', '.join(entry['missing'])}, "
                        "which the stages read from there on machine 0 (the base model, resolved in its caches, and "
                        "the recipe's files outside the run folder): keep the caches on a filesystem every machine "
                        "sees (HF_HOME, ~/.cache/posttrain), put the same files at that path on every machine, or "
                        "point the recipe at folders they all see")


class Heartbeat:
    """A follower's counter file (`<run>/.nodes/machine-<rank>.json`), rewritten at every call: its token, a beat
    that keeps increasing, and which of the paths machine 0 asks about (`needs.json`) this machine lacks."""

    def __init__(self, folder: Path, nodes: Nodes):
        self.path, self.token = folder / f"machine-{nodes.machine_rank}.json", uuid.uuid4().hex
        self.beat, self.checked, self.missing = 0, None, []

    def __call__(self) -> None:
        self.beat += 1
        needs = _read(self.path.parent / "needs.json") or {}
        if needs.get("run") != self.checked:  # checked once per machine 0 that asks, not at every beat
            self.missing = [path for path in needs.get("paths", []) if not Path(path).exists()]
            if self.missing:
                console.print(f"[yellow]this machine does not see {', '.join(self.missing)}, which machine 0's "
                              "stages load: machine 0 will stop the run[/yellow]")
            self.checked = needs.get("run")
        write_json(self.path, {"token": self.token, "beat": self.beat, "host": socket.gethostname(),
                               "checked": self.checked, "missing": self.missing})


def follow(root: Path, nodes: Nodes) -> int:
    """A follower machine's whole run: join every stage machine 0 launches, until it announces the end."""
    folder = root / ".nodes"
    folder.mkdir(parents=True, exist_ok=True)
    console.print(f"machine {nodes.machine_rank} of {nodes.num_machines}: following machine 0 through {folder}")
    heartbeat = Heartbeat(folder, nodes)
    token, last_run, last_seq, waited_since = heartbeat.token, None, 0, time.time()
    while True:
        heartbeat()
        entry = _read(folder / "launch.json")
        if entry and token in (entry.get("for") or {}).values() \
                and (entry["run"] != last_run or entry["seq"] > last_seq):
            last_run, last_seq = entry["run"], entry["seq"]
            if entry["action"] == "end":
                if entry["status"] == "interrupted":  # SIGTERM or Ctrl-C there: resumable, as if it had come here
                    console.print("[yellow]machine 0 reports the run interrupted[/yellow]")
                    raise Terminated(signal.SIGTERM)
                if entry["status"] != "done":
                    raise UserError(f"machine 0 reports the run {entry['status']}: its terminal and "
                                    f"{root / 'run.json'} say why")
                console.print("[green]machine 0 reports the run finished[/green]")
                return 0
            _join_stage(folder, entry, nodes, heartbeat)
            waited_since = time.time()
        elif time.time() - waited_since > node_timeout():
            raise UserError(f"machine 0 announced nothing for {node_timeout():.0f} s (POSTTRAIN_NODE_TIMEOUT); is "
                            f"`posttrain run … --machine-rank 0` running, with {folder} shared?")
        time.sleep(POLL_S)


def _join_stage(folder: Path, entry: dict, nodes: Nodes, heartbeat) -> None:
    """Run machine 0's launch arguments with this machine's rank, beating meanwhile (`heartbeat`: machine 0 tells a
    machine whose stage is still ending from one gone down); a failure is machine 0's to report."""
    args = list(entry["args"])
    args[args.index("--machine_rank") + 1] = str(nodes.machine_rank)
    console.rule(f"stage: {entry['stage']} (machine {nodes.machine_rank})")
    log_path = folder / f"{entry['stage']}.machine-{nodes.machine_rank}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", childproc.LAUNCHER, *args], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   preexec_fn=childproc.die_with_parent())
        try:
            beaten = 0.0
            while (code := process.poll()) is None:
                if time.monotonic() - beaten >= STAGE_BEAT_S:
                    heartbeat()
                    beaten = time.monotonic()
                time.sleep(POLL_S)
        except BaseException:  # SIGTERM, Ctrl-C: the stage saves the step it is at and stops, never orphaned
            childproc.stop(process, None, launcher=True)
            raise
    if code != 0:
        console.print(f"[yellow]stage {entry['stage']} ended with exit code {code} on this machine; log: "
                      f"{log_path}[/yellow]")


def explain_failure(lines: list[str]) -> str | None:
    """One sentence on why a several-process stage ended, with the log line that shows it, when the log shows that a
    process was lost (rather than the training's own error, which its last lines already show)."""
    for sign, meaning in LOST_PROCESS:
        found = next((line.strip() for line in lines if sign in line), None)
        if found:
            return f"{meaning}:\n  {found[:300]}"
    return None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
