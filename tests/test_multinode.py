"""Two machines on one box through the real CLI, a frozen process, and engines that cannot run on CPU.

    posttrain run RECIPE --num-machines 2 --machine-rank 0 --main-process-ip 127.0.0.1   # machine 0
    posttrain run RECIPE --num-machines 2 --machine-rank 1 --main-process-ip 127.0.0.1   # machine 1

exactly as README's "Several processes, several machines" section shows them: one process per "machine", gloo
over localhost, one shared run folder. The two runs of two machines take 1-3 minutes on 2 cores, so they carry the
`multinode` marker and run as their own line in `.ci/run`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain import checkpoints
from posttrain.nodes import explain_failure

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "text.yaml"
MACHINES = ["--num-machines", "2", "--main-process-ip", "127.0.0.1"]


def sft_recipe(folder: Path, **sft) -> Path:
    """The tiny recipe reduced to its SFT stage and the data it needs, without held-out evaluation."""
    raw = yaml.safe_load(TINY.read_text())
    raw.pop("ablation", None)
    raw.update(name="nodes", stages={"sft": {**raw["stages"]["sft"], **sft}}, eval={"dataset": None})
    raw["data"] = {k: v for k, v in raw["data"].items() if "after" not in v}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def start_machines():
    """Callable: (recipe, cwd) -> [machine 0, machine 1] processes; whatever still runs at teardown is killed."""
    started = []

    def start(recipe: Path, cwd: Path) -> list[subprocess.Popen]:
        started.extend(_start_machines(recipe, cwd))
        return started[-2:]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start_machines(recipe: Path, cwd: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "POSTTRAIN_NODE_TIMEOUT": "120"}
    return [subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(recipe), *MACHINES, "--machine-rank",
                              str(rank)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
            for rank in (1, 0)][::-1]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, output) per machine; a machine still running after `timeout` seconds fails the test."""
    deadline, results = time.time() + timeout, []
    for rank, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine {rank} still running after {timeout:.0f} s (a hang)\n{what_hung(processes)}")
        results.append((process.returncode, output))
    return results


def what_hung(processes: list[subprocess.Popen]) -> str:
    """Each machine's output and the tail of every step log of the run folder (beside the recipe), its processes
    killed first: what a hang leaves to read."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    told = [f"--- machine {rank} ---\n{(process.communicate()[0] or '')[-2000:]}"
            for rank, process in enumerate(processes)]
    folder = Path(next(a for a in processes[0].args if a.endswith(".yaml"))).parent  # the recipe, in the cwd
    told += [f"--- {log} ---\n{log.read_text(errors='replace')[-2000:]}" for log in sorted(folder.rglob("*.log"))]
    return "\n".join(told)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): the stage processes of the machine we started, not anyone else's."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def stage_process(machine: subprocess.Popen) -> int | None:
    """The training process a machine runs (below `accelerate launch` and torchrun's agent, which both name the
    stage module on their command lines too)."""
    for pid in descendants(machine.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"posttrain.stages" in cmdline and b"accelerate" not in cmdline:
                return pid
        except OSError:
            continue
    return None


@pytest.mark.multinode
def test_two_machines_on_one_box(tmp_path, start_machines):
    (code0, out0), (code1, out1) = finish(start_machines(sft_recipe(tmp_path), tmp_path), timeout=240)
    assert code0 == 0, out0[-3000:]
    assert code1 == 0 and "machine 0 reports the run finished" in out1, out1[-3000:]
    run = tmp_path / "outputs" / "nodes"
    metrics = yaml.safe_load((run / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 3
    assert metrics["adapter"]["reloads_equal"]
    assert "stage: sft (machine 1)" in out1 and (run / ".nodes" / "sft.machine-1.log").is_file()
    # one `accelerate launch` per machine, one process each, meeting at machine 0's address
    assert "--num_processes 2 --num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1" in out0
    assert "data: verifiable" in out0 and "data: verifiable" not in out1  # prepared once, by machine 0


@pytest.mark.multinode
def test_the_pair_job_runs_on_every_machine(tmp_path, start_machines):
    """The job that samples pairs is launched like a stage: machine 1 joins it and samples its share (its own journal
    and log), machine 0 writes the pairs once, and DPO trains on them on both machines."""
    raw = yaml.safe_load(TINY.read_text())
    raw.pop("ablation", None)
    pairs = {k: v for k, v in raw["data"]["pairs"].items() if k not in ("after", "adapter_path")}
    raw.update(name="nodes", data={"verifiable": raw["data"]["verifiable"], "pairs": pairs},
               stages={"dpo": raw["stages"]["dpo"]}, eval={"dataset": None})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (code0, out0), (code1, out1) = finish(start_machines(tmp_path / "recipe.yaml", tmp_path), timeout=300)
    assert code0 == 0, out0[-3000:]
    assert code1 == 0 and "stage: data-pairs (machine 1)" in out1, out1[-3000:]
    run = tmp_path / "outputs" / "nodes"
    assert out0.count("wrote ") and "wrote" not in (run / ".nodes" / "data-pairs.machine-1.log").read_text()
    assert (run / "data" / "pairs" / "card.json").is_file() and not list((run / "data").glob(".pairs.sampling*"))
    assert yaml.safe_load((run / "dpo" / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.multinode
@pytest.mark.parametrize("lost", ["frozen", "killed"])
def test_a_lost_process_ends_the_run_and_the_rerun_resumes(tmp_path, start_machines, lost):
    """Machine 1's training process freezes (SIGSTOP) or dies (SIGKILL) after the first checkpoint. Machine 0 gives
    up, frozen after `ddp_timeout` (10 s here; transformers passes it to gloo only through
    `posttrain.stages.common.start_processes`), killed at once, with an error that says which; machine 1 exits when
    machine 0 reports the failure; running both again resumes from the checkpoint and finishes."""
    recipe = sft_recipe(tmp_path, max_steps=12, save_strategy="steps", save_steps=2, ddp_timeout=10)
    machines = start_machines(recipe, tmp_path)
    partial = tmp_path / "outputs" / "nodes" / ".sft.partial"
    deadline = time.time() + 180
    while time.time() < deadline and not list(partial.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.1)
    victim = stage_process(machines[1])
    assert victim, "machine 1 should be training by the time machine 0 has written a checkpoint"
    os.kill(victim, signal.SIGSTOP if lost == "frozen" else signal.SIGKILL)
    try:
        (code0, out0), = finish(machines[:1], timeout=120)
    finally:
        if lost == "frozen":
            os.kill(victim, signal.SIGKILL)
    expected = {"frozen": ("stopped answering", "ddp_timeout"),
                "killed": ("another process of this stage died", "by peer")}[lost]
    assert code0 == 2 and all(text in out0 for text in expected), out0[-3000:]
    if lost == "frozen":  # gloo words the timeout by what was in flight when it hit
        assert "Timed out waiting 10000ms" in out0 or "Application timeout caused pair closure" in out0, out0[-3000:]
    assert "resumes from its last complete checkpoint" in out0 and "Traceback" not in out0.split("error:")[-1]
    (code1, out1), = finish(machines[1:], timeout=60)
    assert code1 == 2 and "machine 0 reports the run failed" in out1, out1[-3000:]

    (code0, out0), (code1, _) = finish(start_machines(recipe, tmp_path), timeout=240)
    assert code0 == 0 and code1 == 0, out0[-3000:]
    assert "resuming sft from checkpoint-" in out0
    metrics = yaml.safe_load((tmp_path / "outputs" / "nodes" / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 12


def test_lost_process_explanations_quote_the_log():
    timed_out = ["[rank0]: RuntimeError: [../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 10000ms for "
                 "send operation to complete"]
    assert explain_failure(timed_out).startswith("a process of this stage stopped answering")
    assert "Timed out waiting 10000ms" in explain_failure(timed_out)
    reset = ["[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:61625: Connection "
             "reset by peer."]
    assert explain_failure(reset).startswith("another process of this stage died")
    assert explain_failure(["ValueError: loss is nan"]) is None  # the stage's own error: its last lines say it


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_sharded_engines_refuse_to_run_on_cpu(tmp_path, posttrain_cli):
    """accelerate picks FSDP only over a GPU device type: on CPU the FSDP config would silently train with plain
    DDP. posttrain refuses before building any data; DeepSpeed configs too."""
    from posttrain.devices import check_engine_runs_here
    from posttrain.errors import UserError

    # the README's relative `recipes/accelerate/...` path, found from any folder as a recipe's own paths are
    config = "recipes/accelerate/fsdp.yaml"
    result = posttrain_cli("run", sft_recipe(tmp_path), "--accelerate-config", config, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "distributed_type FSDP needs CUDA GPUs and none is visible" in result.stdout
    assert "does not shard on CPU" in result.stdout
    assert not (tmp_path / "outputs" / "nodes" / "data").exists()
    # ablate too, before its shared data jobs and base evaluation
    result = posttrain_cli("ablate", REPO / "recipes" / "tiny" / "text.yaml", "--accelerate-config", config,
                           "--output-dir", tmp_path / "ablate", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "distributed_type FSDP needs CUDA GPUs" in result.stdout
    assert not (tmp_path / "ablate").exists() or not any((tmp_path / "ablate").rglob("run.json"))
    for engine in ("zero2", "zero3"):
        with pytest.raises(UserError, match="distributed_type DEEPSPEED needs CUDA GPUs"):
            check_engine_runs_here(str(REPO / "recipes" / "accelerate" / f"{engine}.yaml"))
    check_engine_runs_here(str(REPO / "recipes" / "accelerate" / "ddp.yaml"))  # DDP runs on CPU (gloo)


def test_a_deepspeed_config_without_deepspeed_is_refused_before_any_work(monkeypatch):
    """A GPU machine without the deepspeed package (not a posttrain dependency): accelerate would refuse it only at
    the first stage's launch, after the data jobs and the base evaluation."""
    import importlib.util

    from posttrain import devices
    from posttrain.errors import UserError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(devices, "has_cuda", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(UserError, match="distributed_type DEEPSPEED needs the deepspeed package, which is not installed"):
        devices.check_engine_runs_here(str(REPO / "recipes" / "accelerate" / "zero3.yaml"))
    devices.check_engine_runs_here(str(REPO / "recipes" / "accelerate" / "fsdp.yaml"))


def test_machine_0_waits_for_live_followers_only(tmp_path, monkeypatch):
    """A machine file left by an earlier run never counts as a live machine; a live follower hears how the run ended
    even when machine 0 launched no stage (everything finished earlier)."""
    import threading

    from posttrain.errors import UserError
    from posttrain.nodes import Coordinator, Nodes

    monkeypatch.setattr("posttrain.nodes.POLL_S", 0.05)
    nodes = Nodes(num_machines=2, machine_rank=0, main_process_ip="127.0.0.1")
    (tmp_path / ".nodes").mkdir()
    (tmp_path / ".nodes" / "machine-1.json").write_text('{"token": "old", "beat": 7}')
    with pytest.raises(UserError, match=r"machine\(s\) \[1\] did not join within 1 s"):
        Coordinator(tmp_path, nodes)._wait_for_followers(1.0)

    for status, expected in (("done", 0), ("failed", "machine 0 reports the run failed"),
                             ("interrupted", "signal 15")):  # Terminated: exit code 143, like machine 0's
        outcome = []
        follower = threading.Thread(target=run_follower, args=(tmp_path, outcome))
        follower.start()
        Coordinator(tmp_path, nodes).finish(status)
        follower.join(timeout=30)
        assert outcome and (outcome[0] == expected or expected in str(outcome[0]))


def run_follower(root: Path, outcome: list) -> None:
    from posttrain.errors import Terminated, UserError
    from posttrain.nodes import Nodes, follow

    try:
        outcome.append(follow(root, Nodes(2, 1, "127.0.0.1")))
    except (UserError, Terminated) as exc:
        outcome.append(str(exc))


def test_a_follower_joins_machine_0_started_again_after_a_crash(tmp_path, monkeypatch):
    """Machine 0 killed after a launch (no end written) and started again numbers its entries from 1 again: the
    follower that outlived it joins the new launch and hears the new end, rather than waiting on for a later number."""
    import threading

    from posttrain import nodes

    monkeypatch.setattr(nodes, "POLL_S", 0.05)
    monkeypatch.setenv("POSTTRAIN_NODE_TIMEOUT", "10")  # broken, it fails in seconds, not hours
    joined = []
    monkeypatch.setattr(nodes, "_join_stage", lambda folder, entry, machines, beat: joined.append(entry["seq"]))
    outcome = []
    follower = threading.Thread(target=run_follower, args=(tmp_path, outcome))
    follower.start()
    machine_0 = nodes.Nodes(2, 0, "127.0.0.1", 29555)
    for expected in ([1], [1, 1]):  # the first machine 0, then the one started after it was killed
        nodes.Coordinator(tmp_path, machine_0).announce("sft", ["--machine_rank", "0"])
        deadline = time.time() + 10
        while joined != expected and time.time() < deadline:
            time.sleep(0.05)
        assert joined == expected
    nodes.Coordinator(tmp_path, machine_0).finish("done")
    follower.join(timeout=15)
    assert outcome == [0]


def test_a_follower_lost_between_stages_stops_machine_0_and_one_started_again_joins(tmp_path, monkeypatch):
    """A follower's machine goes down after a stage (its counter file stands still): before the next launch machine 0
    names it within `LOST_AFTER_S`, instead of leaving the stage's processes waiting for it in the rendezvous; the
    same follower started again (a new token) joins from the next stage on and hears the end."""
    import threading

    from posttrain import nodes
    from posttrain.errors import UserError

    class MachineDown(Exception):
        pass

    monkeypatch.setattr(nodes, "POLL_S", 0.05)
    monkeypatch.setattr(nodes, "LOST_AFTER_S", 2.0)
    joined = []

    def join(folder, entry, machines, beat):
        joined.append(entry["stage"])
        if entry["stage"] == "sft":
            raise MachineDown  # the follower stops beating right after its stage, as a machine gone down does

    monkeypatch.setattr(nodes, "_join_stage", join)
    machine_1 = threading.Thread(target=lambda: pytest.raises(MachineDown, nodes.follow, tmp_path,
                                                              nodes.Nodes(2, 1, "127.0.0.1")), daemon=True)
    machine_1.start()
    coordinator = nodes.Coordinator(tmp_path, nodes.Nodes(2, 0, "127.0.0.1", 29555))
    coordinator.announce("sft", ["--machine_rank", "0"])
    machine_1.join(timeout=15)
    assert joined == ["sft"] and not machine_1.is_alive()
    started = time.time()
    with pytest.raises(UserError, match=r"machine\(s\) \[1\] stopped answering after joining the run: .+ has not "
                                        r"changed for 2 s"):
        coordinator.announce("dpo", ["--machine_rank", "0"])
    assert time.time() - started < 10 and joined == ["sft"], "stopped before launching dpo"

    outcome = []
    again = threading.Thread(target=run_follower, args=(tmp_path, outcome), daemon=True)
    again.start()
    coordinator.announce("dpo", ["--machine_rank", "0"])
    deadline = time.time() + 10
    while joined != ["sft", "dpo"] and time.time() < deadline:
        time.sleep(0.05)
    assert joined == ["sft", "dpo"]
    coordinator.finish("done")
    again.join(timeout=15)
    assert outcome == [0]


def test_a_follower_beats_while_its_stage_runs(tmp_path, monkeypatch):
    """While its stage's processes run (as long as they take to save and exit after machine 0's ended), a follower
    keeps rewriting its counter file, so machine 0 does not take it for a machine gone down."""
    from posttrain import nodes

    (tmp_path / "slow_launcher.py").write_text("import time\ntime.sleep(1.5)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(nodes.childproc, "LAUNCHER", "slow_launcher")
    monkeypatch.setattr(nodes, "POLL_S", 0.05)
    monkeypatch.setattr(nodes, "STAGE_BEAT_S", 0.1)
    beats = []
    nodes._join_stage(tmp_path, {"stage": "sft", "args": ["--machine_rank", "0"]}, nodes.Nodes(2, 1, "127.0.0.1"),
                      lambda: beats.append(time.time()))
    assert len(beats) >= 5 and beats[-1] - beats[0] >= 1.0


def test_a_follower_without_the_base_model_stops_the_run_before_any_launch(tmp_path, monkeypatch):
    """The stages load the base model from where machine 0 resolved it, in its caches: a follower whose caches are
    its own lacks that path. Machine 0 names the machine and the path before it launches anything, instead of the
    follower's processes failing to load the model once launched; the follower then hears the run failed."""
    import threading

    from posttrain.errors import UserError
    from posttrain.nodes import Coordinator, Nodes

    monkeypatch.setattr("posttrain.nodes.POLL_S", 0.05)
    monkeypatch.setenv("POSTTRAIN_NODE_TIMEOUT", "10")
    # a launch: no stage
    monkeypatch.setattr("posttrain.nodes._join_stage", lambda folder, entry, machines, beat: None)
    outcome = []
    follower = threading.Thread(target=run_follower, args=(tmp_path, outcome), daemon=True)
    follower.start()
    coordinator = Coordinator(tmp_path, Nodes(2, 0, "127.0.0.1", 29555))
    seen, unseen = tmp_path / "cache" / "model", tmp_path / "machine-0-cache" / "model"
    seen.mkdir(parents=True)
    with pytest.raises(UserError, match=rf"machine 1 \(.+\) does not see {re.escape(str(unseen))}, which the stages"):
        coordinator.announce("sft", ["--machine_rank", "0"], needs=[str(seen), str(unseen)])
    assert not (tmp_path / ".nodes" / "launch.json").exists(), "nothing was launched"
    coordinator.finish("failed")
    follower.join(timeout=15)
    assert outcome and "machine 0 reports the run failed" in outcome[0]


def test_a_follower_that_fails_its_own_checks_stops_machine_0_and_the_other_followers_hear_it(tmp_path, monkeypatch):
    """A follower whose recipe does not load there (a reward of your own its Python path lacks) says why in its
    counter file; machine 0 stops with that at its first wait instead of waiting POSTTRAIN_NODE_TIMEOUT for it, takes
    the file away (a later run must not read it as its own), and the followers still alive hear the run failed."""
    import threading

    from posttrain.errors import UserError
    from posttrain.nodes import Coordinator, Nodes, follow, report_failure

    monkeypatch.setattr("posttrain.nodes.POLL_S", 0.05)
    monkeypatch.setenv("POSTTRAIN_NODE_TIMEOUT", "10")
    outcome = []

    def machine_1():
        try:
            outcome.append(follow(tmp_path, Nodes(3, 1, "127.0.0.1")))
        except UserError as exc:
            outcome.append(str(exc))

    follower = threading.Thread(target=machine_1, daemon=True)
    follower.start()
    while not (tmp_path / ".nodes" / "machine-1.json").exists():
        time.sleep(0.05)
    report_failure(tmp_path, Nodes(3, 2, "127.0.0.1"), "recipe.yaml: reward 'mine.brevity': no module 'mine'")
    coordinator = Coordinator(tmp_path, Nodes(3, 0, "127.0.0.1", 29555))
    started = time.time()
    with pytest.raises(UserError, match=r"machine 2 \(.+\) stopped before joining the run: recipe.yaml: reward "
                                        r"'mine.brevity': no module 'mine'"):
        coordinator.announce("sft", ["--machine_rank", "0"], needs=[])
    assert time.time() - started < 5, "stopped at once, not after the timeout"
    assert not (tmp_path / ".nodes" / "machine-2.json").exists()
    coordinator.finish("failed")
    follower.join(timeout=15)
    assert outcome and "machine 0 reports the run failed" in outcome[0]


def test_a_follower_whose_recipe_fails_to_load_there_reports_it(tmp_path, posttrain_here):
    """The CLI side: `posttrain run … --machine-rank 1` whose recipe fails its checks on that machine writes the
    failure where machine 0 reads it (its run folder's `.nodes`), and exits as any failed command."""
    raw = {"name": "nodes", "base": {"model_name_or_path": "tiny:llama"},
           "stages": {"upo": {"dataset_name": str(REPO / "data_prep" / "sources" / "chitchat.jsonl"),
                              "rewards": {"not_on_this_machine.brevity": 1.0}}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = posttrain_here("run", "recipe.yaml", *MACHINES, "--machine-rank", "1", "--output-dir", "out",
                            cwd=tmp_path, check=False)
    assert result.returncode == 2 and "no module 'not_on_this_machine'" in result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "nodes" / ".nodes" / "machine-1.json").read_text())
    assert "no module 'not_on_this_machine'" in report["failed"] and report["host"]


def test_the_paths_every_machine_must_see_are_the_files_named_outside_the_run_folder(tmp_path, monkeypatch):
    """`outside_paths`, what machine 0 asks the followers about besides the base model: the files and folders any
    stage's arguments name outside the run folder, at any depth and as written (a relative one as each machine's
    stages resolve it, from their working folder); not those in the run folder, nor Hub ids or other words."""
    from posttrain.nodes import outside_paths

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "x"
    (run / "data" / "pairs").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "chat.jsonl").write_text("{}")
    stages = [{"dataset_name": str(run / "data" / "pairs"), "lr_scheduler_type": "cosine", "rewards": {"accuracy": 1}},
              {"dataset_name": "HuggingFaceH4/no_robots", "upo_offline_dataset": "mine/chat.jsonl",
               "phases": [{"dataset_name": str(tmp_path / "mine")}, {"dataset_name": f"{run}/data/pairs"}]}]
    assert outside_paths(stages, run) == ["mine/chat.jsonl", str(tmp_path / "mine")]


def test_the_evaluation_set_outside_the_run_folder_is_among_the_paths_asked_about(tmp_path, monkeypatch):
    """Every process of a stage reads its share of the held-out prompts from `eval.dataset`: one outside the run
    folder is asked about with the base model and the stages' own files; one built in the run folder is not."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "heldout.jsonl").write_text("{}")
    raw = {"name": "nodes", "base": {"model_name_or_path": str(tmp_path)},
           "data": {"tasks": {"job": "build_verifiable_tasks", "n_train": 4, "n_test": 4}},
           "eval": {"dataset": "mine/heldout.jsonl"}, "stages": {"sft": {"dataset_name": "{data}/tasks"}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
    pipeline.base_model = str(tmp_path)  # resolved on machine 0 as `prepare` would
    assert pipeline.shared_paths() == [str(tmp_path), "mine/heldout.jsonl"]
    raw["eval"]["dataset"] = "{data}/tasks"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
    pipeline.base_model = str(tmp_path)
    assert pipeline.shared_paths() == [str(tmp_path)]


def test_machine_0_failing_before_its_first_step_ends_the_followers(tmp_path, monkeypatch):
    """A machine 0 that fails before it runs anything (a recipe file missing, a stage flag that names no stage) tells
    the followers, which exit with the run rather than after POSTTRAIN_NODE_TIMEOUT; one refused because another run
    holds the folder tells them nothing: the followers in its `.nodes` are that run's."""
    import threading

    from posttrain.errors import UserError
    from posttrain.nodes import Coordinator, Nodes
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe
    from posttrain.runlock import RunLock

    monkeypatch.setattr("posttrain.nodes.POLL_S", 0.05)
    monkeypatch.setenv("POSTTRAIN_NODE_TIMEOUT", "10")
    raw = {"name": "nodes", "base": {"model_name_or_path": "tiny:llama"},
           "stages": {"sft": {"dataset_name": str(tmp_path / "missing.jsonl")}}}
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(raw))
    raw["stages"]["sft"]["dataset_name"] = str(REPO / "data_prep" / "sources" / "chitchat.jsonl")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    machine_0 = Nodes(2, 0, "127.0.0.1")
    for recipe, until, error in (("missing.yaml", None, "file not found"), ("recipe.yaml", "dpo", "--until")):
        pipeline = Pipeline(load_recipe(tmp_path / recipe), tmp_path / "outputs", nodes=machine_0)
        outcome = []
        follower = threading.Thread(target=run_follower, args=(pipeline.root, outcome))
        follower.start()
        with pytest.raises(UserError, match=error):
            pipeline.run(until=until)
        follower.join(timeout=15)
        assert outcome and "machine 0 reports the run failed" in outcome[0]

    told = []
    monkeypatch.setattr(Coordinator, "finish", lambda self, status: told.append(status))
    holder = RunLock(pipeline.root).acquire()
    try:
        with pytest.raises(UserError, match="in use by another posttrain run"):
            pipeline.run()
    finally:
        holder.release()
    assert told == []


@pytest.mark.multinode
@pytest.mark.parametrize("preempted", [1, 0])
def test_sigterm_to_one_machine_saves_the_step_on_both(tmp_path, start_machines, preempted):
    """A scheduler preempts one machine only (SIGTERM to its `posttrain run`): its stage process stops after the step
    it is at, and the other machine's, never signalled, stops after the same step (they agree after every step), so
    both save their part of one checkpoint and both runs end as interrupted (143); running both again resumes from
    that checkpoint and finishes."""
    recipe = sft_recipe(tmp_path, max_steps=24, save_strategy="steps", save_steps=1000)
    machines = start_machines(recipe, tmp_path)
    seen = []
    for line in machines[0].stdout:  # until machine 0 has trained a step (no checkpoint is due before step 1000)
        seen.append(line)
        if re.search(r"\| *[1-9]\d*/24 \[", line):  # not the weight-loading bar ("0/20 [")
            break
    machines[preempted].send_signal(signal.SIGTERM)
    (code0, out0), (code1, out1) = finish(machines, timeout=120)
    out0 = "".join(seen) + out0
    assert code0 == code1 == 143, out0[-3000:] + out1[-3000:]
    assert all("interrupted: run the same command again" in out for out in (out0, out1))
    if preempted == 1:
        assert "stopped on SIGTERM to one of its processes" in out0, out0[-3000:]
    else:
        assert "machine 0 reports the run interrupted" in out1, out1[-3000:]
    run = tmp_path / "outputs" / "nodes"
    assert yaml.safe_load((run / "run.json").read_text())["steps"]["sft"]["error"] == "interrupted (SIGTERM)"
    saved = checkpoints.resume_point(run / ".sft.partial")
    assert saved is not None, out0[-3000:]
    files = yaml.safe_load((saved / checkpoints.MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)  # both machines saved that step

    (code0, out0), (code1, _) = finish(start_machines(recipe, tmp_path), timeout=240)
    assert code0 == 0 and code1 == 0, out0[-3000:]
    assert f"resuming sft from {saved.name}" in out0
    metrics = yaml.safe_load((run / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == 24


@pytest.mark.parametrize("code, requeued", [(143, True), (0, False), (2, False)])
def test_the_slurm_script_requeues_an_interrupted_run_only(tmp_path, code, requeued):
    """recipes/accelerate/slurm.sbatch with stand-ins for `srun` and `scontrol`: an interrupted run (143: the time
    limit's early SIGTERM, or preemption) is requeued to resume; a finished or failed one is not, and the job ends with
    the run's exit code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/srun.args\nexit {code}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\n[ \"$1\" = show ] && echo node1 && exit 0\n"
                                      f"echo \"$@\" > {tmp_path}/scontrol.args\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]"}
    script = REPO / "recipes" / "accelerate" / "slurm.sbatch"
    ended = subprocess.run(["bash", str(script), "recipes/text/qwen2.5-1.5b.yaml"], cwd=tmp_path, env=env)
    assert ended.returncode == code
    assert "posttrain run recipes/text/qwen2.5-1.5b.yaml" in (tmp_path / "srun.args").read_text()
    assert (tmp_path / "scontrol.args").is_file() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]
    assert "#SBATCH --signal=TERM@180" in script.read_text().splitlines()


def test_the_slurm_script_passes_an_override_with_spaces_as_one_argument(tmp_path):
    """A YAML mapping override needs its space (`stages.upo.rewards={accuracy: 1.0}`): the script's inner shell must
    not split it. Stand-ins: `srun` runs its command, `posttrain` writes the arguments it got, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    (bin_dir / "srun").write_text("#!/bin/bash\nshift\nexec \"$@\"\n")  # drops --ntasks
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    (bin_dir / "posttrain").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/posttrain.args\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NODEID": "0"}
    override = "stages.upo.rewards={accuracy: 1.0}"
    script = REPO / "recipes" / "accelerate" / "slurm.sbatch"
    subprocess.run(["bash", str(script), "recipes/text/qwen2.5-1.5b.yaml", override], cwd=tmp_path, env=env, check=True)
    given = (tmp_path / "posttrain.args").read_text().splitlines()
    assert given[:3] == ["run", "recipes/text/qwen2.5-1.5b.yaml", override] and "--machine-rank" in given
