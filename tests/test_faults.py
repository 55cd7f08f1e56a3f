"""Fault injection: a stage killed at a checkpoint, a truncated checkpoint file, a full disk, a second run, Ctrl-C.

For each stage (SFT, DPO, UPO with online and offline pairs) the stage process is SIGKILLed right after checkpoint 2 of
3 (the `POSTTRAIN_TEST_KILL_AFTER_CHECKPOINT` hook: deterministic, no sleeping), resumed, and its final adapter
compared with an uninterrupted run's: bit-identical on CPU. The uninterrupted reference and the resumed runs train
in-process; only the killed run is a subprocess.
"""

import errno
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from posttrain import checkpoints
from posttrain.errors import ERROR_FILE_ENV, UserError
from posttrain.pipeline import Pipeline
from posttrain.recipe import load_recipe
from posttrain.runlock import RunLock

TINY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml"
COMMON = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"],
              per_device_train_batch_size=4, logging_steps=1, save_strategy="steps", save_steps=1, max_steps=3,
              report_to="none", seed=0, use_cpu=True, bf16=False, learning_rate=1e-3)


@pytest.fixture(scope="module")
def configs(tiny_model_path, task_data, tmp_path_factory):
    """stage -> its resolved arguments (as the pipeline writes resolved.yaml), without output_dir."""
    pairs = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
             "chosen": [{"role": "assistant", "content": str(2 * i + 1)}],
             "rejected": [{"role": "assistant", "content": f"maybe {i * 3}"}]} for i in range(12)]
    Dataset.from_list(rows).to_parquet(pairs / "train.parquet")
    model = str(tiny_model_path("llama"))
    base = {**COMMON, "model_name_or_path": model, "tokenizer_name_or_path": model}
    return {
        "sft": {**base, "dataset_name": str(task_data), "dataset_train_split": "sft", "max_train_samples": 16,
                "assistant_only_loss": True, "max_length": 128},
        "dpo": {**base, "dataset_name": str(pairs), "max_length": 128, "beta": 0.1},
        # hackable_length: random rollouts differ in words written, so groups differ in reward (accuracy and
        # length_penalty do not: every group tied) and a resume must restore a policy gradient and online pairs
        "upo": {**base, "dataset_name": str(task_data), "dataset_train_split": "prompts", "max_train_samples": 16,
                "rewards": {"accuracy": 1.0, "hackable_length": 0.1}, "upo_mode": "both",
                "upo_offline_dataset": str(pairs), "num_generations": 4, "per_device_train_batch_size": 8,
                "max_completion_length": 8},
    }


def _config_file(args: dict, out) -> str:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({**args, "output_dir": str(out)}))
    return str(path)


def train(stage: str, args: dict, out, resume=None) -> dict:
    """Run the stage in-process (optionally resuming); returns its saved adapter tensors."""
    module = importlib.import_module(f"posttrain.stages.{stage}")
    parsed = module.make_parser().parse_args_and_config(args=["--config", _config_file(args, out)])
    parsed[1].resume_from_checkpoint = str(resume) if resume else None
    module.main(*parsed)
    return load_file(out / "adapter_model.safetensors")


def killed_run(stage: str, args: dict, out, after: int = 2) -> int:
    """The stage in a forked copy of this process (its imports already done: seconds saved per run), SIGKILLed by
    its own test hook right after checkpoint `after`; returns the exit code."""
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_train_killed, args=(stage, args, out, after))
    process.start()
    process.join(timeout=300)
    return process.exitcode


def _train_killed(stage, args, out, after):
    os.environ[checkpoints.KILL_ENV] = str(after)
    train(stage, args, out)


@pytest.fixture(scope="module")
def reference(configs, tmp_path_factory):
    """stage -> (adapter, metrics) of one uninterrupted run, shared by every test of that stage."""
    cache = {}

    def get(stage):
        if stage not in cache:
            out = tmp_path_factory.mktemp(f"ref-{stage}") / "out"
            cache[stage] = train(stage, configs[stage], out), json.loads((out / "metrics.json").read_text())
        return cache[stage]

    return get


def assert_same_adapter(got: dict, want: dict):
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the uninterrupted run"


@pytest.mark.parametrize("stage", ["sft", "dpo", "upo"])
def test_killed_at_checkpoint_then_resumed_is_bit_identical(stage, configs, reference, tmp_path):
    want, want_metrics = reference(stage)
    out = tmp_path / "out"
    assert killed_run(stage, configs[stage], out) == -9
    assert [c.name for c in checkpoints.checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    assert not (out / "adapter_model.safetensors").exists(), "killed before the end"
    if stage == "upo":  # the offline pairs' position travels with the checkpoint
        assert json.loads((out / "checkpoint-2" / "upo_offline_pairs.json").read_text())["cursor"] == 2 * 2
    fallback = tmp_path / "fallback"
    shutil.copytree(out, fallback)

    assert checkpoints.resume_point(out) == out / "checkpoint-2"
    assert_same_adapter(train(stage, configs[stage], out, resume=out / "checkpoint-2"), want)
    metrics = json.loads((out / "metrics.json").read_text())
    # the whole stage's loss, not only the resumed step's
    assert metrics["train"]["train_loss"] == pytest.approx(want_metrics["train"]["train_loss"], rel=1e-5)
    assert metrics["train"]["global_step"] == 3

    # every file of the newest checkpoint, truncated in turn, makes resuming fall back to the one before ...
    files = sorted(json.loads((fallback / "checkpoint-2" / checkpoints.MARKER).read_text())["files"])
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(files)
    for name in [*files, checkpoints.MARKER]:
        broken = tmp_path / "broken"
        shutil.copytree(fallback / "checkpoint-2", broken / "checkpoint-2")
        shutil.copytree(fallback / "checkpoint-1", broken / "checkpoint-1")
        path = broken / "checkpoint-2" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        said = []
        assert checkpoints.resume_point(broken, said.append) == broken / "checkpoint-1", name
        assert name in said[0] and "checkpoint-2" in said[0] and not (broken / "checkpoint-2").exists()
        shutil.rmtree(broken)
    # ... which ends exactly where the uninterrupted run does (one rerun shared by all truncated files: each of them
    # leads to the same checkpoint-1, asserted above)
    (fallback / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    resumed_from = checkpoints.resume_point(fallback)
    assert resumed_from == fallback / "checkpoint-1"
    assert_same_adapter(train(stage, configs[stage], fallback, resume=resumed_from), want)


def test_dpo_killed_with_precomputed_reference_log_probs_resumes(configs, reference, tmp_path, monkeypatch):
    """`precompute_ref_log_probs`: TRL computes them before training into a file under the stage's folder
    (`REF_LOGPS`). A DPO stage killed at a checkpoint resumes, in a folder the pipeline made (its lineage.json names
    the stage's inputs) without computing them again, trains what DPO with the reference scored during training
    does, and removes the folder when it finishes."""
    from posttrain.io import write_json
    from posttrain.trainers import dpo_trainer
    from posttrain.trainers.dpo_trainer import REF_LOGPS

    args, out = {**configs["dpo"], "precompute_ref_log_probs": True}, tmp_path / "out"
    write_json(out / "lineage.json", {"inputs_hash": "0123abcd"})  # as `run_stage` writes it before the launch
    assert killed_run("dpo", args, out) == -9
    assert (out / REF_LOGPS / "cache-train-0123abcd.arrow").is_file(), "computed before training, left by the kill"
    scored = []
    compute = dpo_trainer.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(dpo_trainer.DPOTrainer, "compute_ref_log_probs",
                        lambda self, *args: scored.append(1) or compute(self, *args))
    resumed = train("dpo", args, out, resume=out / "checkpoint-2")
    assert not scored, "read from the file the killed run wrote, not computed again"
    assert not (out / REF_LOGPS).exists()
    want, _ = reference("dpo")
    for key in want:
        torch.testing.assert_close(resumed[key], want[key], rtol=1e-4, atol=1e-5)


def test_resumed_from_the_last_steps_checkpoint_trains_no_step_more(configs, tmp_path):
    """Stopped after its last step's checkpoint (while saving or evaluating), a stage resumed from it finishes there:
    the Trainer alone would run a 4th step of 3, here at a constant learning rate, so the adapter would move."""
    args = {**configs["sft"], "lr_scheduler_type": "constant"}
    want = train("sft", args, tmp_path / "whole")
    out = tmp_path / "out"
    assert killed_run("sft", args, out, after=3) == -9
    assert checkpoints.resume_point(out) == out / "checkpoint-3"
    assert_same_adapter(train("sft", args, out, resume=out / "checkpoint-3"), want)
    metrics, whole = (json.loads((folder / "metrics.json").read_text())["train"] for folder in (out, tmp_path / "whole"))
    assert metrics["global_step"] == 3 and metrics["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


def _train_sigtermed(stage, args, out, at):
    from posttrain.errors import Terminated
    from posttrain.stages.training import SIGTERM_TEST_ENV

    os.environ[SIGTERM_TEST_ENV] = str(at)
    try:
        train(stage, args, out)
    except Terminated as exc:
        os._exit(128 + exc.signum)
    os._exit(0)


@pytest.mark.parametrize("stage", ["sft", "upo"])
def test_sigterm_saves_the_step_then_stops_and_resumes_bit_identical(stage, configs, reference, tmp_path):
    """SIGTERM during a step (the stage's test hook sends it after step 2; no checkpoint is due until step 100): the
    stage finishes the step, writes a complete checkpoint-2, stops with 143 before saving an adapter, and resuming
    from it ends where the uninterrupted run does."""
    want, _ = reference(stage)
    args, out = {**configs[stage], "save_steps": 100}, tmp_path / "out"
    process = multiprocessing.get_context("fork").Process(target=_train_sigtermed, args=(stage, args, out, 2))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 143
    assert [c.name for c in checkpoints.checkpoints(out)] == ["checkpoint-2"]
    assert checkpoints.resume_point(out) == out / "checkpoint-2", "marked complete"
    assert not (out / "adapter_model.safetensors").exists(), "stopped before the end"
    assert_same_adapter(train(stage, args, out, resume=out / "checkpoint-2"), want)


def _launch_two(stage: str, args: dict, out: Path, **env) -> subprocess.Popen:
    """The stage as two gloo data-parallel processes on CPU, under accelerate's launcher as the pipeline runs it."""
    from posttrain.devices import NO_LOG_DIR
    from posttrain.nodes import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--dynamo_backend", "no", "--num_processes", "2", "--mixed_precision", "no", "--main_process_port",
               str(free_port()), *NO_LOG_DIR, "-m", f"posttrain.stages.{stage}", "--config", _config_file(args, out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """The launch's output once it has ended; killed (with its processes) if it hangs."""
    import psutil

    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        pytest.fail(f"still running after {timeout} s: {process.communicate()[0][-3000:]}")


# SFT, and UPO (rollouts, offline pairs' position): in the `multinode` line, 25 s each the default suite does without
@pytest.mark.multinode
@pytest.mark.parametrize("stage", ["sft", "upo"])
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(configs, tmp_path, stage):
    """Two processes agree on the step they stop at: the test hook sends SIGTERM to process 0 only, after step 2,
    and process 1, never signalled, saves step 2 with it (had it trained on, it would have waited in step 3's
    gradient all-reduce for a peer that had left). checkpoint-2 is complete, and resuming from it on two processes
    ends on the uninterrupted two-process run's adapter, bit for bit.""" 
    from posttrain.stages.training import SIGTERM_TEST_ENV

    args = {**configs[stage], "save_steps": 100}
    args["per_device_train_batch_size"] //= 2  # the same global batch as one process's
    runs = {"whole": _launch_two(stage, args, tmp_path / "whole"),
            "cut": _launch_two(stage, args, tmp_path / "cut", **{SIGTERM_TEST_ENV: "2"})}
    said = {name: _finish(process) for name, process in runs.items()}
    assert runs["whole"].returncode == 0, said["whole"][-3000:]
    assert runs["cut"].returncode != 0 and "SIGTERM: saving checkpoint-2" in said["cut"], said["cut"][-3000:]
    assert re.search(r"exitcode\s*:\s*143 \(pid: \d+\)", said["cut"]), said["cut"][-3000:]  # interrupted, not a crash
    cut = tmp_path / "cut"
    assert [c.name for c in checkpoints.checkpoints(cut)] == ["checkpoint-2"]
    assert checkpoints.resume_point(cut) == cut / "checkpoint-2", "marked complete"
    # marked once both processes had written their part of it: process 1 saved step 2 too
    assert "rng_state_1.pth" in json.loads((cut / "checkpoint-2" / checkpoints.MARKER).read_text())["files"]
    assert not (cut / "adapter_model.safetensors").exists(), "stopped before the end"

    resumed = _launch_two(stage, {**args, "resume_from_checkpoint": str(cut / "checkpoint-2")}, cut)
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert_same_adapter(load_file(cut / "adapter_model.safetensors"),
                        load_file(tmp_path / "whole" / "adapter_model.safetensors"))


def test_loraplus_killed_then_resumed_is_bit_identical(configs, tmp_path):
    """LoRA+ keeps its optimizer groups across a resume: the B matrices' faster learning rate and Adam state come back
    from the checkpoint, so the resumed run ends on the uninterrupted one's adapter, bit for bit. (That LoRA+ trains
    otherwise than plain LoRA is `test_sft_stage.test_loraplus_trains_b_at_its_ratio`.)"""
    args = {**configs["sft"], "loraplus_lr_ratio": 8.0}
    want = train("sft", args, tmp_path / "ref")
    out = tmp_path / "out"
    assert killed_run("sft", args, out) == -9
    assert_same_adapter(train("sft", args, out, resume=out / "checkpoint-2"), want)


def test_group_by_length_killed_inside_a_later_epoch_then_resumed_is_bit_identical(configs, tmp_path):
    """`train_sampling_strategy: group_by_length`, 8 rows, 2 steps an epoch, killed after step 3 (inside the second
    epoch): the Trainer's sampler drew the epoch's order from torch's generator before the resumed run restored the
    checkpoint's, so step 4 trained on other rows; each epoch's order now comes from the seed and the epoch."""
    args = {**configs["sft"], "max_train_samples": 8, "max_steps": 4, "train_sampling_strategy": "group_by_length"}
    want = train("sft", args, tmp_path / "ref")
    out = tmp_path / "out"
    assert killed_run("sft", args, out, after=3) == -9
    assert_same_adapter(train("sft", args, out, resume=out / "checkpoint-3"), want)
    logged = [[(e["loss"], e["epoch"]) for e in json.loads((folder / "metrics.json").read_text())["log_history"]
               if "loss" in e] for folder in (out, tmp_path / "ref")]
    assert logged[0] == logged[1] and [epoch for _, epoch in logged[0]] == [0.5, 1.0, 1.5, 2.0]

def test_upo_offline_pairs_with_accumulation_killed_then_resumed_is_bit_identical(configs, tmp_path):
    """With gradient accumulation a step's offline pairs (7 here) are spread over its micro-steps (3, then 4) by
    GRPO's micro-step count, which a resumed run restarts at 0: still in step, since checkpoints fall between steps.
    Step 2 reached the second, reshuffled pass over the 12 pairs: the resumed step draws on from there."""
    args = {**configs["upo"], "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4,
            "upo_offline_ratio": 3.5}
    want = train("upo", args, tmp_path / "ref")
    out = tmp_path / "out"
    assert killed_run("upo", args, out) == -9
    assert json.loads((out / "checkpoint-2" / "upo_offline_pairs.json").read_text())["epoch"] == 1
    assert_same_adapter(train("upo", args, out, resume=out / "checkpoint-2"), want)
    logged = [[e["upo/pairs_offline"] for e in json.loads((folder / "metrics.json").read_text())["log_history"]
               if "loss" in e] for folder in (out, tmp_path / "ref")]
    assert logged[0] == logged[1] == [7.0] * 3


def test_disk_full_during_a_save_is_one_paragraph_and_leaves_no_half_checkpoint(configs, reference, tmp_path,
                                                                                 monkeypatch, capsys):
    from posttrain.stages import common, sft

    out = tmp_path / "out"
    error_file = tmp_path / "sft.error"
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    monkeypatch.setattr(sys, "argv", ["sft", "--config", _config_file(configs["sft"], out)])
    with pytest.raises(SystemExit) as exited:
        common.entry("sft", sft.main, sft.make_parser)
    assert exited.value.code == 2
    message = error_file.read_text()
    assert message.startswith("no space left on ") and "checkpoint-2" in message and "sft stage" in message
    assert "Traceback" not in capsys.readouterr().err
    assert [c.name for c in checkpoints.checkpoints(out)] == ["checkpoint-1"], "the half checkpoint is removed"

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the rerun resumes and ends as an uninterrupted run
    assert_same_adapter(train("sft", configs["sft"], out, resume=checkpoints.resume_point(out)), reference("sft")[0])


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline: run.json never stays "running", one run per folder
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def pipeline(tmp_path, task_data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "faults", "base": {"model_name_or_path": "tiny:llama", "chat_template": "chatml"},
        "data": {"verifiable": {"job": "build_verifiable_tasks", "n_train": 8, "n_test": 4}},
        "stages": {"sft": {"dataset_name": "{data}/verifiable", "dataset_train_split": "sft", "max_steps": 1}},
    }))
    return Pipeline(load_recipe(recipe), tmp_path / "outputs")


def _state(pipeline) -> dict:
    return json.loads(pipeline.state_path.read_text())


def test_disk_full_in_the_pipeline_marks_the_run_failed(pipeline, monkeypatch):
    """... after dropping the checkpoint a stage stopped mid-save left unmarked: the space run.json needs."""
    def full_disk(self, after):
        (self.root / ".sft.partial" / "checkpoint-3").mkdir(parents=True)  # a save the full disk cut short
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / "data" / "verifiable" / "x.parquet"))

    monkeypatch.setattr(Pipeline, "build_data", full_disk)
    with pytest.raises(UserError, match=r"no space left on .* \(writing .*x\.parquet\), needed for the run's files"):
        pipeline.run()
    state = _state(pipeline)
    assert state["steps"]["run"]["status"] == "failed" and "no space left" in state["steps"]["run"]["error"]
    leftovers = [p.name for p in pipeline.root.rglob("*")
                 if ".tmp" in p.name or re.search(r"\.\d+-[0-9a-f]{8}\.partial$", p.name) or "checkpoint-" in p.name]
    assert leftovers == [], "nothing temporary is left behind"
    assert (pipeline.root / ".lock").read_text() == "", "the lock is released"


def test_ctrl_c_marks_the_run_interrupted(pipeline, monkeypatch):
    def interrupt(self, after):
        self._record("data/verifiable", status="running")
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "build_data", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run()
    state = _state(pipeline)
    assert state["steps"]["run"]["status"] == "interrupted"
    assert state["steps"]["data/verifiable"]["status"] == "interrupted"


def test_interrupted_while_writing_the_report_a_finished_run_stays_done(pipeline, monkeypatch):
    """Ctrl-C or SIGTERM after the last stage, while the report is written: the run finished, and run.json says so."""
    from posttrain import report

    for name in ("resolve_base", "evaluate_base", "print_summary"):
        monkeypatch.setattr(Pipeline, name, lambda self: None)
    monkeypatch.setattr(Pipeline, "build_data", lambda self, after: None)
    monkeypatch.setattr(Pipeline, "run_stage", lambda self, stage, previous, force=False: None)
    monkeypatch.setattr(Pipeline, "promote", lambda self, stage: None)

    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "try_build_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run()
    assert _state(pipeline)["steps"]["run"]["status"] == "done"


def test_a_run_folder_that_cannot_be_made_is_a_user_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=r"cannot create the run folder .*a-file/run: Not a directory"):
        RunLock(tmp_path / "a-file" / "run").acquire()


def test_second_run_into_the_same_folder_is_refused_naming_the_holder(pipeline, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from posttrain.runlock import RunLock; "
                               f"lock = RunLock({str(pipeline.root)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another posttrain run \(PID {holder.pid},"):
            pipeline.run()
        assert not (pipeline.root / "run.json").exists(), "the refused run wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    said = []  # the holder died without releasing: its lock file is taken over, with a message
    lock = RunLock(pipeline.root).acquire(say=said.append)
    assert said == [f"taking over the lock of {pipeline.root} left by PID {holder.pid}, which is no longer running"]
    lock.release()


def test_the_steps_of_a_killed_run_keep_its_lock_until_they_exit(tmp_path):
    """`posttrain run` SIGKILLed leaves the step it started saving (SIGTERM from `die_with_parent`); a second run into
    the folder waits for that step instead of working beside it (it resumed a checkpoint the old step wrote after the
    new run had discarded the old ones)."""
    step = ("import atexit, signal, time; signal.signal(signal.SIGTERM, lambda *a: open('step.term', 'w').close()); "
            "atexit.register(lambda: open('step.exit', 'w').close()); print('step up', flush=True); "
            "time.sleep(4); open('step.done', 'w').close()")
    run = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from posttrain.childproc import spawn; from posttrain.runlock import RunLock; "
                            f"lock = RunLock({str(tmp_path)!r}).acquire(); spawn([sys.executable, '-c', {step!r}], "
                            "Path('step.log'))"], cwd=tmp_path)
    deadline = time.monotonic() + 60
    while "step up" not in ((tmp_path / "step.log").read_text() if (tmp_path / "step.log").exists() else ""):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.1)
    run.kill()
    run.wait()
    said = []
    lock = RunLock(tmp_path).acquire(say=said.append)
    seen = {name: (tmp_path / name).exists() for name in ("step.term", "step.exit")}  # to tell a killed step apart
    assert (tmp_path / "step.done").exists(), (f"the lock was taken while the killed run's step was still running "
                                               f"({seen}; log: {(tmp_path / 'step.log').read_text()!r})")
    assert said[0].startswith(f"the run that held {tmp_path} (PID {run.pid}) was stopped; waiting for the steps")
    lock.release()


def test_a_live_run_on_another_machine_is_refused_at_once(tmp_path, monkeypatch):
    """A PID is looked up only on the machine that wrote it: a run holding the lock from another machine (a shared
    filesystem) or PID namespace is live, not a killed run whose steps are saving."""
    from posttrain import runlock

    monkeypatch.setattr(runlock, "WAIT_FOR_STEPS_S", 5.0)
    lock = tmp_path / ".lock"
    script = (f"import fcntl, time; f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
              "f.write('4194000\\n2026-12-05 00:00:00\\nother-host\\n'); f.flush(); print('held', flush=True); "
              "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said = []
        with pytest.raises(UserError, match=r"in use by another posttrain run \(PID 4194000,"):
            RunLock(tmp_path).acquire(say=said.append)
        assert not said, "no wait for the steps of a stopped run"
    finally:
        holder.kill()
        holder.wait()


def test_a_checkpoint_resumes_only_on_as_many_processes_as_trained_it(tmp_path):
    """On another number of processes the Trainer skips each process's first `global_step` batches of its new share
    of the data (16 rows skipped where one process trained 8): refused, naming both ways on."""
    from posttrain.checkpoints import MARKER, check_processes, mark_complete

    checkpoint = tmp_path / ".sft.partial" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    mark_complete(checkpoint, processes=1)
    check_processes(checkpoint, 1, checkpoint.parent)
    with pytest.raises(UserError, match=r"checkpoint-2 was trained by 1 process\(es\) and this stage runs 2: .* Run "
                                        r"it on 1 process\(es\) again to resume, or remove .*\.sft\.partial"):
        check_processes(checkpoint, 2, checkpoint.parent)
    (checkpoint / MARKER).write_text('{"files": {"trainer_state.json": 2}}')  # marked before processes were recorded
    check_processes(checkpoint, 2, checkpoint.parent)


def test_resuming_takes_the_highest_step_that_is_whole_and_drops_the_newer_broken_ones(tmp_path):
    """Steps compare as numbers (checkpoint-10 is newer than checkpoint-9); a newer checkpoint with a file cut short
    that is neither JSON nor safetensors (optimizer.pt) is removed, saying which file, and the one before is taken;
    a folder not named by a step is not a checkpoint; one never marked complete is dropped by `remove_incomplete`."""
    out = tmp_path / "out"
    for step in (9, 10, 11):
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "optimizer.pt").write_bytes(b"x" * 64)
        if step != 11:
            checkpoints.mark_complete(checkpoint)
    (out / "checkpoint-best").mkdir()
    checkpoints.remove_incomplete(out)
    assert [c.name for c in checkpoints.checkpoints(out)] == ["checkpoint-10", "checkpoint-9"]
    assert checkpoints.resume_point(out) == out / "checkpoint-10"
    (out / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 32)
    said = []
    assert checkpoints.resume_point(out, said.append) == out / "checkpoint-9"
    assert said == ["checkpoint-10 cannot be resumed from: optimizer.pt is 32 bytes, 64 were written (truncated or "
                    "overwritten); removed it"] and not (out / "checkpoint-10").exists()


def test_a_checkpoint_is_resumed_from_only_as_its_marker_recorded_it(tmp_path):
    """A checkpoint marked again lists its files, not its marker; it records the processes it is given. A file
    rewritten longer, or one of the recorded size that no longer loads (JSON, safetensors), makes it unusable; a newer
    checkpoint never marked complete is removed, saying so, and the marked one before it is taken."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    checkpoint = out / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"a": 1}')
    save_file({"w": torch.ones(4)}, str(checkpoint / "model.safetensors"))
    checkpoints.mark_complete(checkpoint, processes=2)
    checkpoints.mark_complete(checkpoint, processes=2)  # a save after a resume at the same step
    assert checkpoints.problem(checkpoint) is None
    checkpoints.check_processes(checkpoint, 2, out)
    with pytest.raises(UserError, match=r"trained by 2 process\(es\) and this stage runs 1"):
        checkpoints.check_processes(checkpoint, 1, out)

    (checkpoint / "trainer_state.json").write_text('{"a": 10}')
    assert checkpoints.problem(checkpoint) == ("trainer_state.json is 9 bytes, 8 were written (truncated or "
                                               "overwritten)")
    (checkpoint / "trainer_state.json").write_text('{"a": 1,')  # the recorded size, cut JSON
    assert checkpoints.problem(checkpoint).startswith("trainer_state.json does not load (JSONDecodeError")
    (checkpoint / "trainer_state.json").write_text('{"a": 1}')
    weights = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * len(weights))
    assert checkpoints.problem(checkpoint).startswith("model.safetensors does not load (")
    (checkpoint / "model.safetensors").write_bytes(weights)

    newer = out / "checkpoint-2"
    newer.mkdir()
    (newer / "trainer_state.json").write_text("{}")
    said = []
    assert checkpoints.resume_point(out, said.append) == checkpoint
    assert said == ["checkpoint-2 cannot be resumed from: it was never marked complete (its save was interrupted); "
                    "removed it"] and not newer.exists()


def test_only_the_main_process_marks_a_saved_checkpoint(tmp_path):
    """Every process calls `after_save`; the main one alone writes the marker (the others would race it)."""
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    checkpoints.after_save(tmp_path, 3, is_main_process=False)
    assert not (tmp_path / "checkpoint-3" / checkpoints.MARKER).exists()
    checkpoints.after_save(tmp_path, 3, is_main_process=True)
    assert checkpoints.problem(tmp_path / "checkpoint-3") is None


def test_a_finished_stage_whose_adapter_config_is_cut_is_not_finished(tmp_path):
    """The adapter's config is part of a finished adapter: cut short (a disk that filled), the stage is trained again."""
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text('{"r": 4')
    save_file({"lora_A": torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    assert checkpoints.finished_problem(tmp_path).startswith("adapter_config.json does not load (JSONDecodeError")


def test_a_finished_stage_folder_with_no_weights_at_all_is_not_finished(tmp_path):
    """Neither an adapter nor a full model's weights (emptied by hand): the stage is trained again, its adapter
    named as what is missing."""
    assert checkpoints.finished_problem(tmp_path) == "adapter_model.safetensors is missing"


def test_offline_pairs_shared_order_disjoint_across_processes_and_resumable():
    from posttrain.trainers.upo_pairs import OfflinePairs

    pairs = [(i,) for i in range(5)]
    ranks = [OfflinePairs(pairs, seed="0", rank=r, processes=2) for r in range(2)]
    for _ in range(5):  # across reshuffles too: each step's draws are distinct pairs of one pass
        step = [ranks[r].take(2) for r in range(2)]
        assert not set(step[0]) & set(step[1])
    resumed = OfflinePairs(pairs, seed="0", rank=1, processes=2)
    resumed.load_state_dict(ranks[0].state_dict(), "checkpoint-5/upo_offline_pairs.json")
    assert [resumed.take(2) for _ in range(3)] == [ranks[1].take(2) for _ in range(3)]
    with pytest.raises(UserError, match="saved with 5 offline pairs on 2 process"):
        OfflinePairs(pairs, seed="0").load_state_dict(ranks[0].state_dict(), "ckpt")


def test_a_draw_of_offline_pairs_counts_all_processes_together():
    """A step's offline pairs are counted over all processes (half a prompt on each of two processes draws one pair
    between them, as one process does on the same rows), shared out as evenly as the count allows."""
    from posttrain.trainers.upo_pairs import OfflinePairs

    pairs = [(i,) for i in range(7)]
    for count, shares in ((1, [1, 0]), (3, [2, 1]), (4, [2, 2])):
        ranks = [OfflinePairs(pairs, seed="0", rank=r, processes=2) for r in range(2)]
        drawn = [ranks[r].take(count) for r in range(2)]
        assert [len(d) for d in drawn] == shares
        assert sorted(drawn[0] + drawn[1]) == sorted(OfflinePairs(pairs, seed="0").take(count))  # one process's


def test_killed_stage_resumes_from_checkpoint(tmp_path, posttrain_here):
    """The stage process SIGKILLed right after its second checkpoint (the stage's test hook), then the same command."""
    overrides = ["stages.sft.max_steps=4", "shared.save_strategy=steps", "shared.save_steps=1", "eval.dataset=null",
                 "name=resume"]
    killed = posttrain_here("run", TINY_RECIPE, *overrides, "--only", "sft", cwd=tmp_path, check=False,
                            env={"POSTTRAIN_TEST_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode == 2 and "step 'sft' failed" in killed.stdout and "SIGKILL" in killed.stdout
    assert "Traceback" not in killed.stdout + killed.stderr
    run = tmp_path / "outputs" / "resume"
    assert json.loads((run / "run.json").read_text())["steps"]["sft"]["status"] == "failed"
    assert not (run / "sft").exists(), "killed before the end: no finished stage folder"

    resumed = posttrain_here("run", TINY_RECIPE, *overrides, "--only", "sft", cwd=tmp_path)
    assert "resuming sft from checkpoint-2" in resumed.stdout
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 4
    first_logged = min(log["step"] for log in metrics["log_history"] if "loss" in log)
    assert first_logged == 1  # log history carried over from the checkpoint, not restarted
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps["run"]["status"] == "done"
    assert steps["sft"]["error"] is steps["sft"]["log"] is None, "the killed attempt's error and log are history"


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.multinode)])  # 2: the multinode line
def test_sigterm_stops_the_stage_and_marks_the_run_interrupted(tmp_path, processes):
    """A scheduler's SIGTERM (preemption, a time limit) to `posttrain run`: the stage's processes stop with it instead
    of training on orphaned, after saving the step they were at (on two processes through torch's elastic agent,
    which passes SIGTERM on to both); run.json says interrupted (not running), the lock is released, the exit code is
    143, and the same command resumes (the tests above cover resuming)."""
    import signal

    import psutil

    overrides = ["stages.sft.max_steps=100000", "shared.save_steps=100000", "eval.dataset=null", "name=term"]
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(TINY_RECIPE), *overrides, "--only", "sft",
                                "--num-processes", str(processes)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seen = []
    for line in process.stdout:  # until the stage trains: its progress bar, not the pre-flight line printed before
        seen.append(line)           # its SIGTERM handler is in place
        if "/100000 [" in line:
            break
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 143, "".join(seen)[-2000:] + rest[-2000:]
    assert "interrupted: run the same command again" in rest
    run = tmp_path / "outputs" / "term"
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps["run"]["status"] == steps["sft"]["status"] == "interrupted"
    assert steps["sft"]["error"] == "interrupted (SIGTERM)"
    assert (run / ".lock").read_text() == "", "the lock is released"
    stage = str(run / ".sft.partial")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(stage in part for part in p.info["cmdline"] or [])]
    assert not left, "no stage process outlives the pipeline"
    # the stage, stopped in turn, saved the step it was at (no checkpoint was due before step 100000)
    saved = checkpoints.resume_point(run / ".sft.partial")
    assert saved is not None and "SIGTERM: saving checkpoint-" in rest, rest[-2000:]
    files = json.loads((saved / checkpoints.MARKER).read_text())["files"]
    assert {f"rng_state_{rank}.pth" for rank in range(processes)} <= set(files) if processes > 1 else "rng_state.pth" in files


def test_a_step_deaf_to_sigterm_is_killed_with_the_processes_it_started(tmp_path):
    """`childproc.stop`: a step that ignores SIGTERM (a stage stuck in a collective, a launcher whose workers hang) is
    SIGKILLed after the grace period, and so are its children, which would otherwise train on orphaned."""
    import psutil

    from posttrain import childproc

    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    parent = (deaf + "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
              "print(child.pid, flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", parent, deaf + "time.sleep(600)"], stdout=subprocess.PIPE)
    child = psutil.Process(int(process.stdout.readline()))
    with open(tmp_path / "step.log", "wb") as log:
        childproc.stop(process, childproc._Echo(log, tmp_path / "step.log"), grace=1.0)
    assert process.returncode == -9
    child.wait(timeout=10)  # ended (and reaped by whoever adopted it) rather than sleeping on
    assert not child.is_running()


def test_a_launchers_workers_get_the_whole_grace_period(tmp_path):
    """`childproc.stop` on a launcher sends SIGTERM to the processes it started, not to it: accelerate's launcher for
    one process, signalled itself, kills its child 5 s later (this stand-in: 1 s), before a large model's step and
    save are done. Here the worker needs 3 s after SIGTERM to save, and it does."""
    from posttrain import childproc

    worker = ("import signal, sys, time; asked = []; signal.signal(signal.SIGTERM, lambda *_: asked.append(1)); "
              "print('ready', flush=True)\nwhile not asked: time.sleep(0.05)\n"
              "time.sleep(3); open(sys.argv[1], 'w').write('saved'); sys.exit(143)")
    launcher = ("import signal, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
                "sys.argv[2]])\ndef handle(*_):\n    child.terminate(); time.sleep(1); child.kill(); sys.exit(143)\n"
                "signal.signal(signal.SIGTERM, handle); sys.exit(child.wait())")
    saved = tmp_path / "saved"
    process = subprocess.Popen([sys.executable, "-c", launcher, worker, str(saved)], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"ready\n"
    with open(tmp_path / "step.log", "wb") as log:
        childproc.stop(process, childproc._Echo(log, tmp_path / "step.log"), grace=20.0, launcher=True)
    assert saved.read_text() == "saved"
    assert process.returncode == 143  # the launcher ended with its worker, on its own


@pytest.mark.parametrize("stage", ["sft", "upo"])
def test_out_of_memory_is_one_paragraph_with_the_settings_it_depends_on(stage, configs, tmp_path, monkeypatch):
    """A stage that runs out of GPU memory while training (what torch raises, here raised by a stand-in for the
    stage's main) is not reported as a bug: one paragraph names the memory-deciding settings with their values and
    what to change; UPO's also names its rollouts."""
    from posttrain.stages import common

    module = importlib.import_module(f"posttrain.stages.{stage}")
    error_file = tmp_path / f"{stage}.error"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    checkpointing = stage == "upo"  # on in UPO here, so not advised
    args = {**configs[stage], "gradient_checkpointing": checkpointing}
    monkeypatch.setattr(sys, "argv", [stage, "--config", _config_file(args, tmp_path / "out")])

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.06 GiB is free.\nIncluding non-PyTorch memory, ...")

    with pytest.raises(SystemExit) as ended:
        common.entry(stage, out_of_memory, module.make_parser)
    assert ended.value.code == 2
    said = error_file.read_text()
    assert said.startswith(f"the {stage} stage ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. "
                           "GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.) with "
                           f"per_device_train_batch_size={configs[stage]['per_device_train_batch_size']}, ")
    assert f"gradient_checkpointing={checkpointing}" in said and "raise gradient_accumulation_steps" in said
    assert ("set gradient_checkpointing: true" in said) != checkpointing
    assert ("num_generations=4, max_completion_length=8" in said) == ("lower num_generations" in said) == (stage == "upo")
    assert ("shorten max_length" in said) == (stage == "sft")
    assert "Including non-PyTorch memory" not in said  # the first line of torch's message only


def test_evaluation_out_of_memory_names_the_batch_to_lower(task_data, monkeypatch):
    from posttrain import evaluate
    from posttrain.configs import EvalArguments
    from posttrain.errors import is_out_of_memory

    def out_of_memory(*_, **__):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)")

    monkeypatch.setattr(evaluate, "evaluate", out_of_memory)
    settings = EvalArguments(dataset=str(task_data), split="test", batch_size=64, max_new_tokens=40)
    with pytest.raises(UserError, match=r"out of memory evaluating on .*verifiable \(MPS backend out of memory "
                                        r"\(MPS allocated: 17.00 GB, other allocations: 1.2 GB\)\) with 64 prompts a "
                                        r"batch and up to 40 new tokens: lower eval.batch_size"):
        evaluate.run(settings, model=None, tokenizer=None)
    assert not is_out_of_memory(RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only what torch raises for it
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 68719476736 bytes"))


def test_a_finished_stage_with_a_damaged_adapter_is_not_taken_as_finished(tmp_path):
    """A finished stage whose adapter was deleted or truncated (by hand, or a disk that filled) is trained again
    instead of skipped (`Pipeline.run_stage`), and the message says what is wrong with it."""
    from safetensors.torch import save_file

    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"lora_A": torch.ones(64, 64)}, str(stage / "adapter_model.safetensors"))
    assert checkpoints.finished_problem(stage) is None
    data = (stage / "adapter_model.safetensors").read_bytes()
    (stage / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert checkpoints.finished_problem(stage).startswith("adapter_model.safetensors does not load (")
    (stage / "adapter_model.safetensors").unlink()
    assert checkpoints.finished_problem(stage) == "adapter_model.safetensors is missing"
    (stage / "adapter_config.json").unlink()
    save_file({"w": torch.ones(2)}, str(stage / "model.safetensors"))  # a stage that trained all weights
    assert checkpoints.finished_problem(stage) is None


def test_a_stage_whose_json_records_were_emptied_is_redone_and_reported(shared_tiny, tiny_run, tmp_path,
                                                                         posttrain_here):
    """A stage's lineage.json or metrics.json emptied since (by hand, a copy cut short; the pipeline writes them
    atomically): `posttrain report` and a rerun ended in a JSONDecodeError traceback. The report shows the stage
    unmeasured; the rerun evaluates a stage without its metrics again and trains one without its lineage again."""
    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    run = cwd / "outputs" / shared_tiny.name
    (run / "upo" / "metrics.json").write_text("")
    posttrain_here("report", run, cwd=cwd)
    assert (run / "report.html").is_file()
    (run / "sft" / "lineage.json").write_text('{"inputs_hash": "cut sh')
    again = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert "sft: finished earlier, but its lineage.json is unreadable" in " ".join(again.stdout.split())
    assert json.loads((run / "sft" / "lineage.json").read_text())["inputs_hash"]
    again = posttrain_here("run", "recipe.yaml", cwd=cwd)
    assert "upo: its held-out metrics are missing from metrics.json; the finished adapter is evaluated again" in \
        " ".join(again.stdout.split())
    assert json.loads((run / "upo" / "metrics.json").read_text())["eval"]["n"] > 0


def test_a_steps_process_ends_when_the_run_that_started_it_is_killed(tmp_path):
    """`posttrain run` SIGKILLed (no chance to stop its children): the step it was running gets SIGTERM from the
    kernel (`childproc.die_with_parent`) instead of running on as an orphan into a folder a rerun takes over."""
    import signal
    import time

    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; from pathlib import Path; from posttrain.childproc import spawn; "
              f"spawn([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'step.log')!r}))")
    run = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 60
    while not (marker.is_file() and marker.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(marker.read_text())
    run.send_signal(signal.SIGKILL)
    run.wait()
    import psutil

    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # ended, not yet reaped by its new parent
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the step's process outlived the run that started it")


def test_what_a_killed_writer_left_half_written_is_removed_by_the_next_run(pipeline):
    """A merged export or a data set whose writer was SIGKILLed stays behind as a hidden temporary sibling; the next
    run of the folder (holding its lock) removes those of processes that are gone, and keeps everything else."""
    from posttrain.io import remove_leftovers

    root = pipeline.root
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [root / "exports" / f".upo-merged.{dead}-0123abcd.partial", root / "data" / f".pairs.{dead}-89abcdef.old"]
    for folder in left:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.safetensors").write_bytes(b"x" * 10)
    kept = [root / ".sft.partial", root / "data" / f".pairs.{os.getpid()}-0123abcd.old", root / "data" / "pairs"]
    for folder in kept:
        folder.mkdir(parents=True)
    (root / f".run.json.{dead}-aaaabbbb.tmp").write_text("{")
    assert sorted(remove_leftovers(root)) == sorted([*left, root / f".run.json.{dead}-aaaabbbb.tmp"])
    assert all(folder.is_dir() for folder in kept) and not any(folder.exists() for folder in left)


def test_a_writer_that_is_another_users_process_is_running(monkeypatch):
    """Signal 0 to another user's process raises PermissionError: it runs, so what it is writing is not swept away."""
    from posttrain import io

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(io.os, "kill", kill)
    assert io.pid_running(4242)


def test_writing_a_folder_again_removes_what_a_killed_writer_of_it_left(tmp_path):
    """A merged export SIGKILLed (the OOM killer) leaves its hidden temporary folder next to --out, which can be
    anywhere, so no run sweeps it: writing the same folder again removes it; a live writer's and other folders' stay."""
    from posttrain.io import replace_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = tmp_path / f".model.{dead}-0123abcd.partial"
    kept = [tmp_path / f".model.{os.getpid()}-0123abcd.partial", tmp_path / f".model.v2.{dead}-0123abcd.partial"]
    for folder in [left, *kept]:
        (folder / "sub").mkdir(parents=True)
    replace_dir(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not left.exists() and all(folder.is_dir() for folder in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["model"]


# ----------------------------------------------------------------------------------------------------------------------
# A stage's output and log, a run's files, when something dies
# ----------------------------------------------------------------------------------------------------------------------
def test_sigterm_after_posttrain_run_was_killed_still_saves_the_step(monkeypatch):
    """`posttrain run` SIGKILLed: the stage gets SIGTERM (`die_with_parent`) with nobody left reading its output, so
    every write to it fails (EPIPE). The stage's output goes to /dev/null instead, and the step is saved."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from posttrain.stages.training import save_and_stop_on_sigterm

    def to_stdout(*args):  # what print does, unbuffered
        os.write(1, (" ".join(map(str, args)) + "\n").encode())

    accelerator = SimpleNamespace(num_processes=1, is_main_process=True, print=to_stdout)
    monkeypatch.delenv("POSTTRAIN_TEST_SIGTERM_AT_STEP", raising=False)
    callback = save_and_stop_on_sigterm(SimpleNamespace(accelerator=accelerator, add_callback=lambda cb: None))
    kept = os.dup(1), os.dup(2)
    read, write = os.pipe()
    os.close(read)  # the reader is gone
    try:
        os.dup2(write, 1)
        os.dup2(write, 2)
        callback.handle(15, None)
        control = TrainerControl()
        callback.on_step_end(None, TrainerState(global_step=3), control)
        os.write(2, b"a progress bar or a log line of the save\n")
    finally:
        for fd, saved in zip((1, 2), kept):
            os.dup2(saved, fd)
            os.close(saved)
        os.close(write)
        callback.restore()
    assert control.should_save and control.should_training_stop and callback.stopped


def test_rank_prefixed_worker_tracebacks_stay_in_the_log_and_give_the_cause(tmp_path, capsysbinary):
    """With several processes torch's elastic agent puts `[rankN]: ` before each of their lines: the tracebacks still
    go to the log only, and the cause is the workers' exception, not the launcher's ChildFailedError after it."""
    from posttrain.childproc import _Echo

    worker = (b"[rank1]: Traceback (most recent call last):\n[rank1]:   File \"trainer.py\", line 3982\n"
              b"[rank1]:     torch.load(\n[rank1]: \n[rank1]: _pickle.UnpicklingError: Weights only load failed.\n")
    launcher = (b"Traceback (most recent call last):\n  File \"run.py\", line 9\n"
                b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \nbye\n")
    log_path = tmp_path / "sft.log"
    with open(log_path, "wb") as log:
        echo = _Echo(log, log_path)
        echo.feed(b"[rank0]: step 1\n" + worker + worker.replace(b"rank1", b"rank0") + launcher)
        echo.flush()
    shown = capsysbinary.readouterr().out.decode()
    assert log_path.read_bytes().startswith(b"[rank0]: step 1\n" + worker)
    assert "[rank0]: step 1" in shown and "bye" in shown
    assert "Traceback" not in shown and "File " not in shown and "torch.load" not in shown, shown
    assert echo.last_exception == "_pickle.UnpicklingError: Weights only load failed."


def test_the_log_has_a_steps_output_as_it_comes(tmp_path):
    """Nothing waits in a buffer of `posttrain run`: killed, its log still ends with the last thing the step said
    (before an out-of-memory kill, the one line that says what happened)."""
    from posttrain.childproc import _Echo

    log_path = tmp_path / "step.log"
    with open(log_path, "ab") as log:
        _Echo(log, log_path).feed(b"step 7: allocating 30 GiB\n")
        assert log_path.read_bytes() == b"step 7: allocating 30 GiB\n"


def test_a_failure_is_explained_by_its_own_attempts_output_only(pipeline):
    """The stage log keeps every attempt: a process lost in an earlier one is not the cause of this one's error."""
    log_path = pipeline.root / ".sft.partial" / "sft.log"
    log_path.parent.mkdir(parents=True)
    log_path.write_text("[rank0]: RuntimeError: [pair.cc:537] Read error: Connection closed by peer\n")
    with pytest.raises(UserError) as failed:
        pipeline._spawn([sys.executable, "-c", "raise ValueError('a bad row')"], log_path, "sft")
    assert "ValueError: a bad row" in str(failed.value) and "another process" not in str(failed.value)


@pytest.mark.parametrize("if_exists", ["keep", "fail", "replace"])
def test_a_cache_entry_another_process_renames_into_place_first_is_kept(tmp_path, monkeypatch, if_exists):
    """Two test workers building the same tiny model: the other's folder appeared between the check for it and the
    rename, and the rename failed with "Directory not empty". `keep` keeps theirs, `fail` says it appeared, `replace`
    raises the rename's error (ours was not written: never silently); no temporary folder is left."""
    from posttrain import io

    out, rename = tmp_path / "tiny-llama", os.replace

    def racing(source, target):
        if Path(target) == out and not out.exists():  # the other writer wins the race
            out.mkdir()
            (out / "config.json").write_text("theirs")
        rename(source, target)

    monkeypatch.setattr(io.os, "replace", racing)
    write = lambda folder: (folder / "config.json").write_text("ours")  # noqa: E731
    if if_exists == "keep":
        assert io.replace_dir(out, write, if_exists="keep") == out
    elif if_exists == "fail":
        with pytest.raises(FileExistsError, match="appeared while it was being written"):
            io.replace_dir(out, write, if_exists="fail")
    else:
        with pytest.raises(OSError) as error:
            io.replace_dir(out, write)
        assert error.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (out / "config.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]


def test_a_writer_that_fails_after_writing_its_folder_keeps_it_and_its_error(tmp_path):
    """`moved_aside`: the old folder comes back only where the failed writer wrote none; one it wrote stays (its
    partial output is the writer's to clean up), and the writer's own error is what is raised."""
    from posttrain.io import moved_aside

    out = tmp_path / "job"
    out.mkdir()
    (out / "rows").write_text("old")
    with pytest.raises(ValueError, match="the job failed"):
        with moved_aside(out):
            out.mkdir()
            (out / "rows").write_text("new")
            raise ValueError("the job failed")
    assert (out / "rows").read_text() == "new"
    with pytest.raises(ValueError, match="the job failed"), moved_aside(out):
        raise ValueError("the job failed")
    assert (out / "rows").read_text() == "new"  # put back: nothing written in its place


def test_a_written_folder_is_shared_as_the_umask_allows_not_more(tmp_path):
    """`replace_dir` opens up what a writer left private (safetensors' 0600 temp files) to what the umask allows: with
    umask 022, files 0644 and folders 0755, never writable by others."""
    from posttrain.io import replace_dir

    def write(folder):
        (folder / "weights").write_text("x")
        (folder / "weights").chmod(0o600)

    umask = os.umask(0o022)
    try:
        out = replace_dir(tmp_path / "model", write)
    finally:
        os.umask(umask)
    assert ((out / "weights").stat().st_mode & 0o777, out.stat().st_mode & 0o777) == (0o644, 0o755)


def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    """As shell redirection and editors do: a file made private (or opened to others) stays so after a rewrite."""
    from posttrain.io import write_json

    (tmp_path / "run.json").write_text("{}")
    for mode in (0o600, 0o644):
        (tmp_path / "run.json").chmod(mode)
        write_json(tmp_path / "run.json", {"steps": {}})
        assert (tmp_path / "run.json").stat().st_mode & 0o777 == mode


def test_a_full_quota_is_a_full_disk():
    """A cluster's file system answers EDQUOT when a user's quota is spent: the same remedy as ENOSPC."""
    from posttrain.errors import is_disk_full

    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("SafetensorError: Disk quota exceeded (os error 122)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_folder_that_cannot_be_written_in_is_named_before_any_work(tmp_path, monkeypatch):
    """Someone else's run or a read-only mount: `run`, `report` and `eval --out` said so in a traceback, after the
    work. (os.access is stood in for: these tests run as root, whom permissions do not stop.)"""
    from posttrain import errors
    from posttrain.report import build_report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"steps": {}}))
    access = os.access
    monkeypatch.setattr(errors.os, "access", lambda path, mode: Path(path) != tmp_path / "run" and access(path, mode))
    with pytest.raises(UserError, match=r"cannot write in the run folder .*run: no permission, or a read-only"):
        errors.make_folder(tmp_path / "run", "the run folder")
    with pytest.raises(UserError, match="cannot write in the run folder"):
        build_report(tmp_path / "run")
    assert errors.make_folder(tmp_path / "other", "the run folder").is_dir()


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Else a power loss can leave the renamed file empty (the rename on disk, its content not)."""
    import stat

    from posttrain.io import write_json

    done, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        done.append("sync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync file")
        real_fsync(fd)

    def replace(source, target):
        done.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json(tmp_path / "run.json", {"steps": {}})
    assert done == ["sync file", "rename", "sync folder"]
    assert json.loads((tmp_path / "run.json").read_text()) == {"steps": {}}


def test_an_unreadable_run_json_is_a_warning_and_the_run_goes_on(pipeline, monkeypatch, capsys):
    """An empty run.json (a power loss before it reached the disk) is started over, naming the file."""
    for name in ("resolve_base", "evaluate_base", "print_summary"):
        monkeypatch.setattr(Pipeline, name, lambda self: None)
    monkeypatch.setattr(Pipeline, "build_data", lambda self, after: None)
    monkeypatch.setattr(Pipeline, "run_stage", lambda self, stage, previous, force=False: None)
    monkeypatch.setattr(Pipeline, "promote", lambda self, stage: None)
    pipeline.root.mkdir(parents=True)
    pipeline.state_path.write_text("")
    pipeline.run()
    assert _state(pipeline)["steps"]["run"]["status"] == "done"
    assert f"{pipeline.state_path} is unreadable" in " ".join(capsys.readouterr().out.split())


def test_eval_export_and_chat_find_the_stages_of_a_run_whose_run_json_is_unreadable(tmp_path):
    """The commands that pick a run's stage read run.json for its order; an empty one (a power loss) leaves them the
    stage folders and the usual order instead of a JSONDecodeError."""
    from posttrain.runs import finished_stages, stage_ref, stale_stages

    run = tmp_path / "run"
    for stage in ("sft", "dpo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "lineage.json").write_text(json.dumps({"stage": stage, "inputs_hash": stage}))
        (run / stage / "resolved.yaml").write_text("model_name_or_path: tiny:llama\n")
    (run / "run.json").write_text("")
    assert finished_stages(run) == ["sft", "dpo"] and stale_stages(run) == {}
    assert stage_ref(run).stage == "dpo" and stage_ref(run, "sft").adapter == str(run / "sft")


def test_a_run_writing_to_a_file_keeps_progress_bars_from_flooding_it(tmp_path, monkeypatch):
    """`posttrain run > run.log` (nohup, a batch job): a step's tqdm bar reaches that file and the step's log every
    30 s, not 10 times a second (every frame a carriage return a file keeps, megabytes an hour)."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    child = "import time, tqdm\nfor _ in tqdm.tqdm(range(40)): time.sleep(0.05)"
    parent = (f"import sys; from pathlib import Path; from posttrain.childproc import spawn; "
              f"spawn([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'step.log')!r}))")
    with open(tmp_path / "run.log", "wb") as out:  # not a terminal
        subprocess.run([sys.executable, "-c", parent], stdout=out, stderr=subprocess.STDOUT, check=True)
    for log in ("run.log", "step.log"):
        frames = (tmp_path / log).read_bytes().count(b"it/s]")
        assert 1 <= frames <= 3, (log, frames)  # the first and the last frame; 22 without the limit


@pytest.mark.parametrize("spread", [dict(gradient_accumulation_steps=2, steps_per_generation=4),
                                    dict(gradient_accumulation_steps=1, num_iterations=2)])
def test_upo_killed_inside_a_generation_batch_then_resumed_is_bit_identical(configs, tmp_path, spread):
    """A generation batch that trains two optimizer steps (`steps_per_generation` twice the accumulation, or
    `num_iterations` 2): checkpoint-1 falls inside it. GRPO keeps the batch's rollouts and its micro-step count in
    memory only, so a resumed run sampled new rollouts from step 1's weights; the checkpoint now carries them.
    A reward that varies between random rollouts (words written): a policy gradient and online pairs, beside the
    offline pairs."""
    args = {**configs["upo"], **spread, "per_device_train_batch_size": 8 // spread["gradient_accumulation_steps"],
            "rewards": {"accuracy": 1.0, "hackable_length": 1.0}}
    want = train("upo", args, tmp_path / "ref")
    out = tmp_path / "out"
    assert killed_run("upo", args, out, after=2) == -9
    assert (out / "checkpoint-1" / "upo_generation_0.pt").is_file()
    assert not (out / "checkpoint-2" / "upo_generation_0.pt").exists(), "a new generation batch starts at step 2"
    assert_same_adapter(train("upo", args, out, resume=out / "checkpoint-1"), want)
    logged = [[(e["loss"], e.get("reward"), e.get("upo/pairs_online")) for e in
               json.loads((folder / "metrics.json").read_text())["log_history"] if "loss" in e]
              for folder in (out, tmp_path / "ref")]
    assert logged[0] == logged[1]
    assert [reward is not None for _, reward, _ in logged[0]] == [True, False, True], "rollouts at steps 1 and 3"
    assert all(pairs for _, _, pairs in logged[0] if pairs is not None), "online pairs trained"

    (out / "checkpoint-1" / "upo_generation_0.pt").unlink()  # as a checkpoint saved before it was kept
    with pytest.raises(UserError, match="upo_generation_0.pt is missing: checkpoint-1 falls inside a generation batch"):
        train("upo", args, out, resume=out / "checkpoint-1")


@pytest.mark.parametrize("after", [2, 3])
def test_upo_resumed_in_a_later_epoch_is_bit_identical(configs, tmp_path, after):
    """4 prompts, 2 a step: checkpoint-2 ends the first epoch and checkpoint-3 is inside the second. GRPO's sampler
    draws each epoch's order from one generator seeded once, so a resumed process drew the first epoch's order again
    (other prompts at steps 3 and 4); the order of epoch e is now the (e+1)-th from the seed in any process."""
    args = {**configs["upo"], "upo_mode": "online", "max_train_samples": 4, "max_steps": 4,
            "rewards": {"accuracy": 1.0, "hackable_length": 1.0}}
    want = train("upo", args, tmp_path / "ref")
    out = tmp_path / "out"
    assert killed_run("upo", args, out, after=after) == -9
    assert_same_adapter(train("upo", args, out, resume=out / f"checkpoint-{after}"), want)
    logged = [[(e["loss"], e["epoch"]) for e in json.loads((folder / "metrics.json").read_text())["log_history"]
               if "loss" in e] for folder in (out, tmp_path / "ref")]
    assert logged[0] == logged[1] and [epoch for _, epoch in logged[0]] == [0.5, 1.0, 1.5, 2.0]


@pytest.mark.multinode
def test_upo_on_two_processes_resumed_inside_a_later_epoch_is_bit_identical(configs, tmp_path):
    """As above on two processes, stopped after step 3, inside the second epoch: there accelerate wraps the sampler
    in two batch samplers for the skipped batches, which its `set_epoch` and the Trainer's do not reach."""
    from posttrain.stages.training import SIGTERM_TEST_ENV

    args = {**configs["upo"], "upo_mode": "online", "max_train_samples": 4, "max_steps": 4, "save_steps": 100,
            "per_device_train_batch_size": 4, "rewards": {"accuracy": 1.0, "hackable_length": 1.0}}
    runs = {"whole": _launch_two("upo", args, tmp_path / "whole"),
            "cut": _launch_two("upo", args, tmp_path / "cut", **{SIGTERM_TEST_ENV: "3"})}
    said = {name: _finish(process) for name, process in runs.items()}
    assert runs["whole"].returncode == 0, said["whole"][-3000:]
    cut = tmp_path / "cut"
    assert [c.name for c in checkpoints.checkpoints(cut)] == ["checkpoint-3"], said["cut"][-3000:]
    resumed = _launch_two("upo", {**args, "resume_from_checkpoint": str(cut / "checkpoint-3")}, cut)
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert_same_adapter(load_file(cut / "adapter_model.safetensors"),
                        load_file(tmp_path / "whole" / "adapter_model.safetensors"))


def test_a_lock_names_its_holder_is_passed_to_the_steps_and_is_left_empty_when_released(tmp_path):
    """The lock file holds the holder's PID, time and machine (what a refused run names and a take-over checks); the
    steps the run starts inherit it; released, it is empty, so the next run takes nothing over. One left by a process
    that died is taken over, and said so."""
    import socket

    from posttrain.runlock import held_fds

    said = []
    lock = RunLock(tmp_path).acquire(say=said.append)
    pid, _, host = (tmp_path / ".lock").read_text().splitlines()
    assert (pid, host) == (str(os.getpid()), socket.gethostname()) and lock.handle.fileno() in held_fds()
    fd = lock.handle.fileno()
    lock.release()
    assert (tmp_path / ".lock").read_text() == "" and fd not in held_fds() and said == []
    (tmp_path / ".lock").write_text(f"99999999\n2026-01-01 00:00:00\n{socket.gethostname()}\n")
    RunLock(tmp_path).acquire(say=said.append).release()
    assert said == [f"taking over the lock of {tmp_path} left by PID 99999999, which is no longer running"]
