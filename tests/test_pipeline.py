"""The tiny recipe through the real CLI, in subprocesses, as a user runs it: end to end, skip and rerun, errors, stale
data. Runs again over a copy of the finished run call the CLI's `main` in the test's process (`posttrain_here`), its
steps still in processes of their own. (Resuming a killed run is in test_faults.py, two processes in
test_distributed.py.)"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from posttrain.io import write_json
from posttrain.stats import format_eval_accuracy

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny" / "text.yaml"


def test_tiny_recipe_end_to_end(tiny_run, shared_tiny, check_evaluation):
    """The session's shared run of the tiny recipe (`tiny_run`, made through the CLI; SFT trained 12 steps)."""
    run = tiny_run
    state = json.loads((run / "run.json").read_text())
    assert state["steps"]["run"]["status"] == "done"
    assert (run / "data" / "verifiable" / "sft.parquet").is_file()
    assert (run / "data" / "verifiable" / "README.md").is_file()
    base = json.loads((run / "base" / "metrics.json").read_text())
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    for metrics in (base, sft):
        check_evaluation(metrics["eval"], 8)
    assert sft["train"]["global_step"] == 12
    assert sft["adapter"]["reloads_equal"] and (run / "sft" / "adapter_model.safetensors").stat().st_size > 0
    lineage = json.loads((run / "sft" / "lineage.json").read_text())
    assert lineage["datasets"]["dataset_name"]["fingerprint"]
    assert lineage["versions"]["trl"] and lineage["inputs_hash"]
    assert not list(run.glob(".*.partial")), "a finished stage leaves no partial folder"
    evaluated = {step: json.loads((run / step / "metrics.json").read_text())["eval"]
                 for step in ("base", "sft", "dpo", "upo")}
    line = shared_tiny.log.read_text().split("held-out accuracy: ", 1)[1].splitlines()[0]
    parts = line.split(" → ")
    for part, (step, evaluation) in zip(parts, evaluated.items(), strict=True):  # what metrics.json holds
        assert part.startswith(f"{step} {format_eval_accuracy(evaluation)}"), line
        assert len(evaluation["verdicts"]) == evaluation["n"] == 8
    assert all(re.search(r"\), [+-]\d+\.\d( n\.s\.| \(p=)", p) for p in parts[1:]), "every change is tested"
    gates = [json.loads((run / s / "metrics.json").read_text())["promotion"]["gate"] for s in ("sft", "dpo", "upo")]
    assert all(g["metric"] == "accuracy" and g["passed"] for g in gates), gates
    # the chain: on-policy pairs from the SFT adapter feed DPO; UPO continues the DPO adapter
    assert (run / "data" / "pairs" / "train.parquet").is_file()
    dpo = json.loads((run / "dpo" / "metrics.json").read_text())
    assert dpo["preference"]["before"]["n"] > 0 and dpo["preference"]["after"]["n"] > 0
    upo = json.loads((run / "upo" / "metrics.json").read_text())
    assert upo["train"]["global_step"] == 2
    assert any("upo/dpo_loss" in log for log in upo["log_history"])
    steps = [log for log in upo["log_history"] if "upo/pairs_online" in log]  # the rollouts' rewards differ: online
    assert steps and all(log["frac_reward_zero_std"] < 1 and log["upo/pairs_online"] > 0 for log in steps)  # pairs, PG
    for stage, previous in (("dpo", "sft"), ("upo", "dpo")):
        record = json.loads((run / stage / "lineage.json").read_text())
        assert record["previous_stage"] == previous
        assert record["previous_inputs_hash"] == json.loads((run / previous / "lineage.json").read_text())["inputs_hash"]
        assert yaml.safe_load((run / stage / "resolved.yaml").read_text())["adapter_path"] == str(run / previous)
        assert not (run / stage / "ref").exists(), "only the trained adapter is saved"


def test_rerun_skips_finished_stage_and_reruns_on_change(shared_tiny, tiny_run, tmp_path, posttrain_here):
    """The same command again in (a copy of) the shared run's folder skips every stage, also with other logging and
    saving settings (they change nothing a stage trains); a changed UPO setting reruns UPO only."""
    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    run = cwd / "outputs" / shared_tiny.name
    stamp = (run / "sft" / "lineage.json").stat().st_mtime_ns
    again = posttrain_here("run", "recipe.yaml", "shared.logging_steps=3", "shared.save_steps=7", cwd=cwd)
    for stage in ("sft", "dpo", "upo"):
        assert f"{stage}: finished earlier with the same inputs, skipped" in again.stdout
    assert (run / "sft" / "lineage.json").stat().st_mtime_ns == stamp
    upo_stamp = (run / "upo" / "lineage.json").stat().st_mtime_ns
    changed = posttrain_here("run", "recipe.yaml", "stages.upo.learning_rate=5e-4", cwd=cwd)
    assert "sft: finished earlier with the same inputs, skipped" in changed.stdout
    assert "upo: finished earlier with the same" not in changed.stdout and "stage: upo" in changed.stdout
    assert "upo: finished earlier with other inputs (learning_rate: 0.001 → 0.0005); trained again" in changed.stdout
    assert (run / "sft" / "lineage.json").stat().st_mtime_ns == stamp
    assert (run / "upo" / "lineage.json").stat().st_mtime_ns != upo_stamp
    assert yaml.safe_load((run / "upo" / "resolved.yaml").read_text())["learning_rate"] == 5e-4


def test_a_rerun_with_nothing_to_do_imports_neither_torch_nor_transformers(shared_tiny, tiny_run, tmp_path,
                                                                            posttrain_here):
    """A finished run run again skips every step without loading the tokenizer (base/tokenizer is saved again only
    when what it is made from, or the folder itself, changed) or importing torch: 1.4 s instead of 6.4 s. Another
    chat template saves it again, and so does a folder damaged by hand."""
    import subprocess
    import sys

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    tokenizer = cwd / "outputs" / shared_tiny.name / "base" / "tokenizer"
    stamp = (tokenizer / "tokenizer_config.json").stat().st_mtime_ns
    check = ("import sys; from posttrain.cli import main; code = main(['run', 'recipe.yaml']); "
             "print(code, sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    again = subprocess.run([sys.executable, "-c", check], cwd=cwd, capture_output=True, text=True, check=True)
    assert again.stdout.splitlines()[-1] == "0 []", again.stdout[-3000:]
    assert "upo: finished earlier with the same inputs, skipped" in again.stdout
    assert (tokenizer / "tokenizer_config.json").stat().st_mtime_ns == stamp
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    (tokenizer / "tokenizer.json").write_text("{}")  # damaged by hand: saved again from the base model
    Pipeline(load_recipe(cwd / "recipe.yaml"), cwd / "outputs").resolve_base()
    assert json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    (cwd / "mine.jinja").write_text("{#- another template -#}\n" + (tokenizer / "chat_template.jinja").read_text())
    pipeline = Pipeline(load_recipe(cwd / "recipe.yaml", ["base.chat_template=mine.jinja"]), cwd / "outputs")
    pipeline.resolve_base()
    assert (tokenizer / "chat_template.jinja").read_text().startswith("{#- another template -#}")
    assert pipeline.template.startswith("{#- another template -#}")


def test_a_stage_finished_but_not_moved_into_place_is_moved_not_trained_again(shared_tiny, tiny_run, tmp_path,
                                                                               posttrain_here):
    """Killed after the stage process finished and before its folder was moved into place (its checkpoints already
    removed): the rerun moves the finished folder, trains nothing, and a stale older folder goes."""
    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    run = cwd / "outputs" / shared_tiny.name
    adapter, log = ((run / "sft" / name).read_bytes() for name in ("adapter_model.safetensors", "sft.log"))
    os.replace(run / "sft", run / ".sft.partial")
    (run / "sft").mkdir()  # an older finished folder the move replaces
    (run / "sft" / "stale.txt").write_text("old")
    again = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert f"sft: finished in {run / '.sft.partial'} before the run was stopped; moved into place" in again.stdout
    assert (run / "sft" / "sft.log").read_bytes() == log, "no stage process ran"
    assert (run / "sft" / "adapter_model.safetensors").read_bytes() == adapter
    assert not (run / "sft" / "stale.txt").exists() and not (run / ".sft.partial").exists()
    assert json.loads((run / "run.json").read_text())["steps"]["sft"]["status"] == "done"


def test_a_changed_evaluation_scores_finished_stages_again_without_training_them(shared_tiny, tiny_run, tmp_path,
                                                                                posttrain_here):
    """Held-out settings changed after a finished run (here fewer new tokens; equally another eval set, or a smaller
    batch after running out of memory): the base model and the finished stages are evaluated again, from their
    saved adapters, and nothing is trained again; the same command once more evaluates nothing. (Up to SFT: DPO and
    UPO take the same path, and each evaluation is seconds of the suite.)"""
    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    run = cwd / "outputs" / shared_tiny.name
    stages = ["sft"]
    adapters = {s: (run / s / "adapter_model.safetensors").stat().st_mtime_ns for s in stages}
    hashes = {s: json.loads((run / s / "lineage.json").read_text())["inputs_hash"] for s in stages}
    assert json.loads((run / "sft" / "metrics.json").read_text())["eval"]["mean_completion_tokens"] > 3

    changed = posttrain_here("run", "recipe.yaml", "eval.max_new_tokens=3", "--until", "sft", cwd=cwd)
    assert "evaluating the base model" in changed.stdout
    for stage in stages:
        assert f"{stage}: finished earlier with the same inputs, skipped" in changed.stdout
        assert f"{stage}: the held-out evaluation changed; the finished adapter is evaluated again" in changed.stdout
        assert (run / stage / "adapter_model.safetensors").stat().st_mtime_ns == adapters[stage], "not trained again"
        # what `posttrain eval RUN --stage S` evaluates with, as the run now did
        assert yaml.safe_load((run / stage / "resolved.yaml").read_text())["eval_max_new_tokens"] == 3
        assert json.loads((run / stage / "lineage.json").read_text())["inputs_hash"] == hashes[stage]
    assert "stage: " not in changed.stdout and "data: pairs" not in changed.stdout  # no stage or pairs job re-ran
    for step in ["base", *stages]:
        metrics = json.loads((run / step / "metrics.json").read_text())
        assert metrics["eval"]["mean_completion_tokens"] <= 3, step
        if step != "base":
            assert metrics["promotion"]["gate"]["passed"] is not None  # compared again, on the new numbers
    again = posttrain_here("run", "recipe.yaml", "eval.max_new_tokens=3", "--until", "sft", cwd=cwd)
    assert "evaluated again" not in again.stdout and "evaluating the base model" not in again.stdout


def test_a_stage_recorded_with_the_earlier_inputs_hash_is_still_skipped(shared_tiny, tiny_run, tmp_path,
                                                                        posttrain_here):
    """Runs recorded before the logging and saving keys left the inputs hash (`stage_hashes`' second) keep their
    finished stages after an upgrade: nothing is trained again."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    sft = cwd / "outputs" / shared_tiny.name / "sft"
    pipeline = Pipeline(load_recipe(cwd / "recipe.yaml"), cwd / "outputs")
    pipeline.resolve_base()
    pipeline.evaluate_base()  # up to date: sets the hashes a stage's hash builds on
    args = pipeline.stage_args("sft", None)
    hashes = pipeline.stage_hashes("sft", args, None)
    current, earlier = hashes[0], hashes[-1]  # the last: dataset paths as written, logging and saving keys in
    assert earlier != current
    record = json.loads((sft / "lineage.json").read_text())
    (sft / "lineage.json").write_text(json.dumps({**record, "inputs_hash": earlier}))
    again = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert "sft: finished earlier with the same inputs, skipped" in again.stdout and "stage: sft" not in again.stdout


def test_a_stage_skipped_as_finished_is_done_whatever_an_earlier_attempt_recorded(shared_tiny, tiny_run, tmp_path,
                                                                                   posttrain_here):
    """A re-run with other inputs failed (run.json: sft failed, its log; or the base evaluation failed on another eval
    set), then the inputs went back: the finished stage and the base evaluation are skipped, and run.json (which the
    report and the accuracy line read) says done again, with no error left on the run."""
    from posttrain.report.load import accuracy_line

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    state_path = cwd / "outputs" / shared_tiny.name / "run.json"
    state = json.loads(state_path.read_text())
    state["steps"]["sft"].update(status="failed", error="ValueError: bad row", log="/elsewhere/.sft.partial/sft.log")
    state["steps"]["base"].update(status="failed", error="UserError: no such eval set", log="/elsewhere/base.log")
    state["steps"]["run"].update(error="UserError: no such eval set")
    state_path.write_text(json.dumps(state))
    again = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert "sft: finished earlier with the same inputs, skipped" in again.stdout
    steps = json.loads(state_path.read_text())["steps"]
    assert steps["sft"]["status"] == "done" and steps["sft"]["error"] is None and steps["sft"]["log"] is None
    assert steps["base"]["status"] == "done" and steps["base"]["error"] is None and steps["run"]["error"] is None
    assert "failed" not in accuracy_line(state_path.parent)


def test_only_a_later_stage_refuses_an_earlier_one_whose_inputs_changed(shared_tiny, tiny_run, tmp_path, monkeypatch):
    """`--only dpo` after SFT's learning rate changed: DPO would train from an SFT adapter the recipe no longer gives,
    and the run would report it as current; the run stops and says what changed and how to go on."""
    from posttrain.errors import UserError
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    monkeypatch.chdir(cwd)
    pipeline = Pipeline(load_recipe(cwd / "recipe.yaml", ["stages.sft.learning_rate=2e-3"]), cwd / "outputs")
    with pytest.raises(UserError, match=r"stage 'sft' comes before the ones asked for and its inputs changed since it "
                                        r"finished \(learning_rate: .* → 0\.002\); run it first \(--from sft\)"):
        pipeline.run(only="dpo")


def test_until_leaves_out_the_data_only_later_stages_read(tmp_path):
    """`--until sft` builds what SFT and the evaluation read, not a preference set only DPO reads (a bad row there
    would stop a run that never gets to DPO)."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["prefs"] = {"job": "build_preference_set", "sources": [{"path": "prefs.jsonl"}]}
    raw["stages"]["upo"].update(upo_mode="both", upo_offline_dataset="{data}/prefs")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
    assert pipeline.data_for_later_stages(["sft"]) == {"pairs", "prefs"}  # pairs: built after sft, for dpo
    assert pipeline.data_for_later_stages(["sft", "dpo"]) == {"prefs"}
    assert pipeline.data_for_later_stages(["sft", "dpo", "upo"]) == set()
    # a data job only the held-out evaluation reads is built for it, whatever the stages read
    raw["data"]["held"] = {"job": "build_verifiable_tasks", "n_train": 8, "n_test": 8}
    raw["eval"]["dataset"] = "{data}/held"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs").data_for_later_stages(["sft"]) == \
        {"pairs", "prefs"}


@pytest.fixture()
def stage_calls(tmp_path, monkeypatch):
    """A tiny-recipe `Pipeline` whose steps only record what the run asked of them: `calls` lists `run_stage`'s
    (stage, previous, force) and `build_data`'s `after`; `changed` is what `changed_since` answers."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    pipeline = Pipeline(load_recipe(TINY), tmp_path / "outputs")
    pipeline.calls, pipeline.changed = [], None
    for name in ("resolve_base", "evaluate_base", "print_summary"):
        monkeypatch.setattr(Pipeline, name, lambda self: None)
    monkeypatch.setattr(Pipeline, "promote", lambda self, stage: None)
    monkeypatch.setattr(Pipeline, "reevaluate", lambda self, stage: False)
    monkeypatch.setattr(Pipeline, "build_data", lambda self, after: self.calls.append(("data after", after)))
    monkeypatch.setattr(Pipeline, "run_stage", lambda self, stage, previous, force=False:
                        self.calls.append((stage, previous, force)))
    monkeypatch.setattr(Pipeline, "changed_since", lambda self, stage, previous: self.changed)
    return pipeline


def test_until_trains_up_to_and_including_that_stage(stage_calls):
    """`--until dpo`: sft then dpo, skipped where finished (not forced); no data job after dpo, whose later data
    only upo reads."""
    stage_calls.run(until="dpo")
    assert stage_calls.calls == [("data after", None), ("sft", None, False), ("data after", "sft"),
                                 ("dpo", "sft", False)]


def test_from_and_only_train_the_stages_asked_for_again_on_the_finished_ones_before(stage_calls):
    """`--from dpo` trains dpo and upo again (forced: their inputs may be unchanged), `--only dpo` dpo alone; the
    finished sft before them is kept, not trained."""
    sft = stage_calls.root / "sft"
    sft.mkdir(parents=True)
    (sft / "lineage.json").write_text("{}")
    stage_calls.run(start="dpo")
    assert [c for c in stage_calls.calls if c[0] != "data after"] == [("dpo", "sft", True), ("upo", "dpo", True)]
    stage_calls.calls.clear()
    stage_calls.run(only="dpo")
    assert stage_calls.calls == [("data after", None), ("data after", "sft"), ("dpo", "sft", True)]
    # nor the data jobs only the stages after it read: on-policy pairs sampled after `--only sft` are DPO's
    stage_calls.calls.clear()
    stage_calls.run(only="sft")
    assert stage_calls.calls == [("data after", None), ("sft", None, True)] and stage_calls.later_data == {"pairs"}


def test_only_a_later_stage_needs_the_earlier_ones_finished_and_unchanged(stage_calls):
    """`--only dpo` without a finished sft, or with one whose inputs changed since, stops before training dpo from
    an adapter the recipe does not give."""
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="stage 'sft' comes before the ones asked for and has not finished"):
        stage_calls.run(only="dpo")
    (stage_calls.root / "sft").mkdir()
    (stage_calls.root / "sft" / "lineage.json").write_text("{}")
    stage_calls.changed = "learning_rate: 0.001 → 0.002"
    with pytest.raises(UserError, match=r"its inputs changed since it finished \(learning_rate: 0.001 → 0.002\)"):
        stage_calls.run(only="dpo")
    assert not [c for c in stage_calls.calls if c[0] == "dpo"]


def test_only_a_later_stage_refuses_an_unfinished_earlier_one_before_any_data_job(stage_calls):
    """`--only upo` with sft finished and dpo not: refused before the data jobs, which sampled the pairs from the SFT
    adapter (minutes on the default recipe) only for the run to stop at dpo."""
    from posttrain.errors import UserError

    (stage_calls.root / "sft").mkdir(parents=True)
    (stage_calls.root / "sft" / "lineage.json").write_text("{}")
    with pytest.raises(UserError, match="stage 'dpo' comes before the ones asked for and has not finished"):
        stage_calls.run(only="upo")
    assert stage_calls.calls == []


@pytest.fixture
def hashed(tmp_path):
    """A tiny-recipe `Pipeline` that hashes stage inputs without a base model (its hashes set by hand)."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    pipeline = Pipeline(load_recipe(TINY), tmp_path / "outputs")
    pipeline.base_hash, pipeline.eval_hash = "base", "eval"
    return pipeline


def test_a_stage_hashed_with_its_logging_keys_is_still_up_to_date(hashed):
    """Runs recorded a stage's hash before the logging and saving keys were left out of it: that finished stage
    still has the same inputs (any of `stage_hashes`, not only the first); one with another learning rate does not."""
    args = {"learning_rate": 1e-3, "logging_steps": 5}
    same = hashed.stage_hashes("sft", args, None)
    write_json(hashed.root / "sft" / "lineage.json", {"inputs_hash": same[-1]})
    assert same[-1] != same[0] and hashed._up_to_date(hashed.root / "sft", *same)
    assert not hashed._up_to_date(hashed.root / "sft", *hashed.stage_hashes("sft", {**args, "learning_rate": 2e-3},
                                                                            None))


def test_a_stage_has_other_inputs_once_the_stage_before_it_was_trained_again(hashed):
    args = {"learning_rate": 1e-3}
    write_json(hashed.root / "sft" / "lineage.json", {"inputs_hash": "first"})
    before = set(hashed.stage_hashes("dpo", args, "sft"))
    write_json(hashed.root / "sft" / "lineage.json", {"inputs_hash": "second"})
    assert not before & set(hashed.stage_hashes("dpo", args, "sft"))


def test_a_forced_stage_trains_again_though_it_finished_with_the_same_inputs(hashed, monkeypatch):
    """`--from`/`--only` force their stages: trained again, where a plain rerun skips the finished stage."""
    from posttrain import lineage, pipeline_stages
    from posttrain.pipeline import Pipeline

    spawned = []
    monkeypatch.setattr(Pipeline, "stage_args", lambda self, stage, previous: {"learning_rate": 1e-3})
    monkeypatch.setattr(pipeline_stages, "finished_problem", lambda folder: None)
    monkeypatch.setattr(lineage, "other_previous", lambda root, record: None)
    monkeypatch.setattr(lineage, "stage_lineage", lambda stage, args, digest, pipe, previous: {"inputs_hash": digest})
    monkeypatch.setattr(Pipeline, "reevaluate", lambda self, stage: False)
    monkeypatch.setattr(Pipeline, "_spawn", lambda self, cmd, log, stage, env: spawned.append(stage))
    hashed.run_stage("sft", None)  # nothing finished: trained
    hashed.run_stage("sft", None)  # finished with the same inputs: skipped
    assert spawned == ["sft"]
    hashed.run_stage("sft", None, force=True)
    assert spawned == ["sft", "sft"]


def test_a_stage_whose_evaluation_was_deferred_is_evaluated_in_a_process_of_its_own(hashed, monkeypatch):
    """A stage whose process could not evaluate (`eval_deferred`: weights sharded) is evaluated on the next step,
    though its held-out evaluation is unchanged; then it is up to date."""
    from posttrain.pipeline import Pipeline

    final = hashed.root / "sft"
    write_json(final / "lineage.json", {"inputs_hash": "h", "eval_hash": hashed.eval_hash})
    write_json(final / "metrics.json", {"status": "done", "eval": None, "eval_deferred": "weights sharded"})
    monkeypatch.setattr(Pipeline, "run_eval", lambda self, out, step, adapter=None: {"accuracy": 0.5})
    assert hashed.reevaluate("sft")
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["eval"] == {"accuracy": 0.5} and "eval_deferred" not in metrics
    assert not hashed.reevaluate("sft")


def test_a_discarded_unfinished_stage_says_what_changed(tmp_path):
    from posttrain.step_inputs import changed_inputs

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({"learning_rate": 1e-3, "max_steps": 10, "output_dir": "a",
                                        "resume_from_checkpoint": "a/checkpoint-5"}))
    assert changed_inputs(resolved, {"learning_rate": 2e-3, "max_steps": 10, "output_dir": "b"}) == \
        "learning_rate: 0.001 → 0.002"
    assert changed_inputs(resolved, {"learning_rate": 1e-3, "max_steps": 10}) == \
        "the data, the base model or the previous stage changed"


def test_what_changed_names_four_arguments_and_counts_the_rest(tmp_path):
    """Five arguments changed: the message shows four of them (sorted) and says one more."""
    from posttrain.step_inputs import changed_inputs

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({k: 1 for k in "abcde"}))
    assert changed_inputs(resolved, {k: 2 for k in "abcde"}) == "a: 1 → 2; b: 1 → 2; c: 1 → 2; d: 1 → 2; 1 more"


def test_what_changed_leaves_out_logging_keys_and_the_runs_own_folder(tmp_path):
    """Exactly four changed arguments are shown without "more"; a logging key is no input; a run moved elsewhere is
    not said to have another dataset for the paths inside it."""
    from posttrain.step_inputs import changed_inputs

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({k: 1 for k in "abcd"}))
    assert changed_inputs(resolved, {k: 2 for k in "abcd"}) == "a: 1 → 2; b: 1 → 2; c: 1 → 2; d: 1 → 2"
    resolved.write_text(yaml.safe_dump({"report_to": "none", "max_steps": 1}))
    assert changed_inputs(resolved, {"report_to": "wandb", "max_steps": 1}) == \
        "the data, the base model or the previous stage changed"
    resolved.write_text(yaml.safe_dump({"output_dir": "/old/run/sft", "dataset_name": "/old/run/data/x"}))
    assert changed_inputs(resolved, {"output_dir": "/new/run/sft", "dataset_name": "/new/run/data/x"}) == \
        "the data, the base model or the previous stage changed"


def test_inputs_as_opened_and_read_by_a_data_job(tmp_path, monkeypatch):
    """A curriculum phase's dataset is opened as `dataset_name` is; a Hub id stays as written. A data job reads a
    data_prep output folder (with its `card.json`) by content, and a folder with weights is no tokenizer folder."""
    from posttrain.step_inputs import as_opened, read_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "logic.jsonl").write_text("{}\n")
    args = {"dataset_name": "org/prompts", "phases": [{"dataset_name": "logic.jsonl"}, "other"]}
    assert as_opened(args) == {"dataset_name": "org/prompts",
                               "phases": [{"dataset_name": str(tmp_path / "logic.jsonl")}, "other"]}
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "card.json").write_text("{}")
    (tmp_path / "set" / "train.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_text("")
    assert set(read_files({"input": "set", "sampler": "model"})) == {"set"}


def test_other_inputs_of_a_first_stage_or_an_older_record():
    """A stage with no stage before it is not said to have one trained again; a dataset entry an older posttrain
    recorded otherwise than {path, fingerprint} is passed over."""
    from posttrain.step_inputs import other_inputs

    record = {"datasets": {"dataset_name": "aaa"}, "base_hash": "b1"}
    now = {"datasets": {"dataset_name": "bbb"}, "base_hash": "b1", "previous_inputs_hash": "p1"}
    assert other_inputs(record, now).startswith("its arguments, data, base model and previous stage are as it")


def test_a_stage_recorded_before_base_hash_is_not_said_to_have_another_base():
    """A lineage from before `base_hash` was recorded says nothing about the base: what changed is not blamed on
    it."""
    from posttrain.step_inputs import other_inputs

    record = {"datasets": {}, "previous_stage": "sft", "previous_inputs_hash": "p1"}
    now = {"datasets": {}, "base_hash": "b1", "previous_inputs_hash": "p2"}
    assert other_inputs(record, now) == "sft was trained again since"


def test_a_stage_trained_again_with_its_arguments_unchanged_says_which_other_input_changed():
    from posttrain.step_inputs import other_inputs

    record = {"datasets": {"dataset_name": {"path": "data/pairs", "fingerprint": "aaa"}}, "base_hash": "b1",
              "previous_stage": "sft", "previous_inputs_hash": "p1", "git_commit": "0123456789abcdef"}
    now = {"datasets": {"dataset_name": "aaa"}, "base_hash": "b1", "previous_inputs_hash": "p1"}
    assert other_inputs(record, {**now, "datasets": {"dataset_name": "bbb"}}) == "the data in dataset_name changed"
    assert other_inputs(record, {**now, "base_hash": "b2", "previous_inputs_hash": "p2"}) == \
        "the base model or its chat template changed; sft was trained again since"
    # nothing it records differs: what a run made by a posttrain that hashed inputs another way gets
    unchanged = other_inputs(record, now)
    assert "as it recorded them" in unchanged and "(commit 0123456) hashed its inputs another way" in unchanged
    assert other_inputs({}, now) == "the data, the base model or the previous stage changed"


def test_one_dataset_spelled_another_way_is_the_same_stage_input(tmp_path, monkeypatch):
    """`data/x`, `./data/x`, its absolute path and the same recipe run from another folder (the path found beside the
    recipe) give one inputs hash: the finished stage is not trained again. A stage recorded with the path as written
    (before `as_opened`) stays finished."""
    from posttrain import pipeline_stages
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "train.jsonl").write_text('{"prompt": "hi"}\n')
    raw = yaml.safe_load(TINY.read_text())

    def hashes(dataset):
        raw["stages"]["sft"]["dataset_name"] = dataset
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
        pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
        pipeline.base_hash = "b"
        return pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)

    monkeypatch.chdir(tmp_path)
    spellings = {spelled: hashes(spelled) for spelled in ("data/x", "./data/x", str(tmp_path / "data" / "x"))}
    monkeypatch.chdir(tmp_path / "data")
    spellings["from another folder"] = hashes("data/x")
    assert len({found[0] for found in spellings.values()}) == 1, spellings
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline_stages, "as_opened", lambda args, spell=None: args)  # the hash as recorded before
    recorded = hashes("./data/x")[0]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert recorded in hashes("./data/x") and recorded != hashes("./data/x")[0]


def test_a_project_moved_with_its_data_keeps_its_finished_stages(tmp_path, monkeypatch):
    """The recipe, its `data/x` and its outputs moved together (a renamed home, a copy on a cluster): the data's
    content is the stage's input, not where it lies, so the stage is not trained again. What a stage recorded with
    the absolute path (`as_opened`) stays finished."""
    import shutil

    from posttrain import pipeline_stages
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    raw = yaml.safe_load(TINY.read_text())
    raw["stages"]["sft"]["dataset_name"] = "./data/x"
    (tmp_path / "a" / "data" / "x").mkdir(parents=True)
    (tmp_path / "a" / "data" / "x" / "train.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "a" / "recipe.yaml").write_text(yaml.safe_dump(raw))

    def hashes(project):
        monkeypatch.chdir(project)
        pipeline = Pipeline(load_recipe(project / "recipe.yaml"), project / "outputs")
        pipeline.base_hash = "b"
        return pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)

    first = hashes(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert hashes(tmp_path / "b")[0] == first[0]
    with monkeypatch.context() as patch:
        patch.setattr(pipeline_stages, "by_content", lambda path: str(path.resolve()))  # as a stage recorded it before
        recorded = hashes(tmp_path / "b")[0]
    assert recorded in hashes(tmp_path / "b")


def test_a_curriculum_phases_own_prompts_are_a_stage_input(tmp_path, monkeypatch):
    """A UPO phase drawing from another prompt set (`phases: [{dataset_name: ...}]`): editing that file trains the
    stage again, as editing `dataset_name`'s does."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "logic.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"]["upo"]["phases"] = [{"dataset_name": str(tmp_path / "logic.jsonl"), "num_prompts": 1}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
    pipeline.base_hash = "b"
    before = pipeline.stage_hashes("upo", pipeline.stage_args("upo", None), None)
    (tmp_path / "logic.jsonl").write_text('{"prompt": "3+3?", "answer": "6"}\n')
    assert not set(before) & set(pipeline.stage_hashes("upo", pipeline.stage_args("upo", None), None))


def test_an_edited_reward_function_of_your_own_trains_upo_again(tmp_path, monkeypatch):
    """A reward named by import path is part of UPO's inputs through its source file: edited, the stage trains again,
    as edited data does; the stages before it keep their hashes. So is it of a pair job that lists its rewards."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe
    from posttrain.step_inputs import reward_sources

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "upo_rewards_edited.py"
    source.write_text("def brevity(completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"]["upo"]["rewards"] = {"accuracy": 1.0, "upo_rewards_edited.brevity": 0.1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    pipeline = Pipeline(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "outputs")
    pipeline.base_hash = "b"

    def hashes(stage):
        return set(pipeline.stage_hashes(stage, pipeline.stage_args(stage, None), None))

    before, sft = hashes("upo"), hashes("sft")
    pairs_job = reward_sources(["upo_rewards_edited.brevity=0.1"])  # a data job's deprecated list form
    assert pairs_job == reward_sources({"upo_rewards_edited.brevity": 0.1}) and pairs_job
    source.write_text("def brevity(completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    assert not before & hashes("upo") and hashes("sft") == sft
    assert reward_sources(["upo_rewards_edited.brevity"]) != pairs_job


def test_the_base_model_is_in_the_step_hashes_by_what_it_holds_not_where_it_lies(hashed, tmp_path):
    """The same model in another cache folder (another machine's home, `$POSTTRAIN_CACHE`, `HF_HOME`) or a local
    base folder moved: every stage and data job keeps its hash, and what runs recorded with the folder's path still
    counts; other weights in the same shapes, or another Hub commit, change them."""
    import torch
    from safetensors.torch import save_file

    from posttrain.lineage import base_identity, base_spelling

    def saved(folder: Path, weights: float) -> Path:
        folder.mkdir(parents=True)
        write_json(folder / "config.json", {"model_type": "llama"})
        save_file({"w": torch.full((100,), weights)}, folder / "model.safetensors")
        return folder

    def hashes(folder: Path, name: str) -> tuple:
        hashed.base_model, hashed.recipe.base.model_name_or_path = folder, name
        hashed.base_spelling = base_spelling(folder, base_identity(name, folder))
        job = {"job": "build_onpolicy_pairs", "args": {"model_name_or_path": str(folder), "adapter_path": "x"}}
        return hashed.stage_hashes("sft", hashed.stage_args("sft", None), None)[0], hashed.digest(job)

    cache = hashes(saved(tmp_path / "a" / "models" / "gguf-entry", 1.0), "org/m")
    assert hashes(saved(tmp_path / "b" / "models" / "gguf-entry", 1.0), "org/m") == cache
    other = hashes(saved(tmp_path / "c" / "models" / "gguf-entry", 2.0), "org/m")
    assert other[0] != cache[0] and other[1] != cache[1]
    local = hashes(saved(tmp_path / "mine", 1.0), str(tmp_path / "mine"))
    shutil.move(tmp_path / "mine", tmp_path / "moved")
    assert hashes(tmp_path / "moved", str(tmp_path / "moved")) == local
    hub = hashes(saved(tmp_path / "hf" / "models--org--m" / "snapshots" / "0123abcd", 1.0), "org/m")
    assert hashes(saved(tmp_path / "hf2" / "models--org--m" / "snapshots" / "0123abcd", 1.0), "org/m") == hub
    assert hashes(saved(tmp_path / "hf2" / "models--org--m" / "snapshots" / "4567ef01", 1.0), "org/m") != hub
    spelled = hashed.base_spelling
    hashed.base_spelling = None  # as runs recorded a step before: the folder's path
    before = hashed.stage_hashes("sft", hashed.stage_args("sft", None), None)[0]
    hashed.base_spelling = spelled
    assert before in hashed.stage_hashes("sft", hashed.stage_args("sft", None), None)[1:]


def test_a_local_base_named_relative_to_the_recipe_is_found_from_anywhere_and_keeps_its_stages(tmp_path, monkeypatch):
    """`base.model_name_or_path: ./my-base` beside the recipe is found from any folder, as the recipe's data files are,
    and named absolute, so `eval`, `export` and `chat` find it from other folders too; a stage recorded when the
    folder was named relative to the working directory keeps its hash."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    project = tmp_path / "project"
    write_json(project / "my-base" / "config.json", {"model_type": "llama"})
    raw = yaml.safe_load(TINY.read_text())
    raw["base"]["model_name_or_path"] = "./my-base"
    (project / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_recipe(project / "recipe.yaml").base.model_name_or_path == str(project / "my-base")

    monkeypatch.chdir(project)
    pipeline = Pipeline(load_recipe(project / "recipe.yaml"), tmp_path / "outputs")
    pipeline.base_hash = "b"
    pipeline.base_model = Path("my-base")  # as resolved before: relative, unspelled
    recorded = pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)[0]
    pipeline.base_model = Path(pipeline.recipe.base.model_name_or_path)
    pipeline.spell_base()
    now = pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)
    assert pipeline.stage_args("sft", None)["model_name_or_path"] == str(project / "my-base")
    assert recorded in now and recorded != now[0]


def test_a_run_and_its_model_cache_moved_to_another_machine_keep_every_finished_step(tiny_run, tmp_path,
                                                                                      posttrain_here):
    """A finished run copied to a machine whose model cache lies elsewhere (another home, `$POSTTRAIN_CACHE`), its
    base model built there again: the data jobs, the base evaluation and every stage are up to date, not redone."""
    from posttrain.models.load import cache_dir

    shutil.copytree(cache_dir() / "models" / "tiny-llama", tmp_path / "cache" / "models" / "tiny-llama")
    copy = shutil.copytree(tiny_run, tmp_path / "outputs" / tiny_run.name)
    shutil.copy(copy / "recipe.yaml", tmp_path / "recipe.yaml")
    result = posttrain_here("run", tmp_path / "recipe.yaml", "--output-dir", tmp_path / "outputs", cwd=ROOT,
                            env={"POSTTRAIN_CACHE": str(tmp_path / "cache")})
    for stage in ("sft", "dpo", "upo"):
        assert f"{stage}: finished earlier with the same inputs, skipped" in result.stdout, result.stdout[-3000:]
    assert "data pairs: up to date" in result.stdout and "stage:" not in result.stdout


def test_a_moved_run_keeps_its_hashes_with_a_path_that_starts_like_its_folder(tmp_path):
    """The run folder's path is written {run} in a step's hash and replaced in `changed_inputs` only where it names
    the folder or a path in it: a dataset in `outputs/<run>-data` (another folder, which does not move with the run)
    keeps the stage's hash and is not reported as changed."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe
    from posttrain.step_inputs import changed_inputs

    recipe = load_recipe(TINY)
    sibling = tmp_path / "outputs" / f"{recipe.name}-data"
    sibling.mkdir(parents=True)
    (sibling / "train.jsonl").write_text('{"prompt": "hi"}\n')
    recipe.stages["sft"]["dataset_name"] = str(sibling)
    hashes = []
    for where in ("outputs", "moved"):
        pipeline = Pipeline(recipe, tmp_path / where)
        pipeline.base_hash = "b"
        hashes.append(pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)[0])
    assert hashes[0] == hashes[1]

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({"dataset_name": str(sibling), "learning_rate": 1e-3,
                                        "output_dir": str(tmp_path / "outputs" / recipe.name / ".sft.partial")}))
    assert changed_inputs(resolved, {"dataset_name": str(sibling), "learning_rate": 2e-3,
                                     "output_dir": str(tmp_path / "moved" / recipe.name / ".sft.partial")}) == \
        "learning_rate: 0.001 → 0.002"


def test_only_a_later_stage_still_scores_the_earlier_ones_on_the_changed_evaluation(shared_tiny, tiny_run, tmp_path,
                                                                                    monkeypatch):
    """`--only dpo` (or `--from dpo`): SFT, kept as it is, is evaluated again when the held-out evaluation changed
    (and compared again), so DPO's gate compares two evaluations made the same way. The steps themselves are stood
    in for: what is asserted is which ones the run asks for, in order."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    pipeline = Pipeline(load_recipe(cwd / "recipe.yaml"), cwd / "outputs")
    calls = []
    for name in ("resolve_base", "evaluate_base", "print_summary"):
        monkeypatch.setattr(pipeline, name, lambda *args, name=name: None)
    monkeypatch.setattr(pipeline, "build_data", lambda after: None)
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, previous, force=False: calls.append(("run", stage)))
    monkeypatch.setattr(pipeline, "promote", lambda stage: calls.append(("promote", stage)))
    monkeypatch.setattr(pipeline, "changed_since", lambda stage, previous: None)  # SFT's inputs are as it trained
    for changed in (True, False):
        calls.clear()
        monkeypatch.setattr(pipeline, "reevaluate", lambda stage, changed=changed: calls.append(("eval", stage))
                            or changed)
        pipeline.run(only="dpo")
        expected = [("eval", "sft"), ("promote", "sft")] if changed else [("eval", "sft")]
        assert calls == [*expected, ("run", "dpo"), ("promote", "dpo")]


def test_a_stage_trained_sharded_is_evaluated_from_its_saved_adapter(shared_tiny, tiny_run, tmp_path, posttrain_here):
    """A stage whose weights were sharded over its processes (FSDP, ZeRO-3) cannot evaluate on the main process
    alone and records why (`eval_deferred`, see test_distributed); the run then evaluates the saved adapter in one
    process, compares it with the step before, and leaves the adapter as it was."""
    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    sft = cwd / "outputs" / shared_tiny.name / "sft"
    metrics = json.loads((sft / "metrics.json").read_text())
    evaluated = metrics["eval"]["verdicts"]
    metrics.update(eval=None, eval_deferred="FSDP sharded the weights over 2 processes")
    metrics.pop("promotion", None)
    (sft / "metrics.json").write_text(json.dumps(metrics))
    adapter = (sft / "adapter_model.safetensors").stat().st_mtime_ns

    again = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert "sft: finished earlier with the same inputs, skipped" in again.stdout
    assert "sft: FSDP sharded the weights over 2 processes; the saved adapter is evaluated in one process" in again.stdout
    metrics = json.loads((sft / "metrics.json").read_text())
    assert metrics["eval"]["verdicts"] == evaluated and "eval_deferred" not in metrics
    assert metrics["promotion"]["gate"]["passed"] is not None
    assert (sft / "adapter_model.safetensors").stat().st_mtime_ns == adapter
    once_more = posttrain_here("run", "recipe.yaml", "--until", "sft", cwd=cwd)
    assert "evaluated in one process" not in once_more.stdout


def test_user_errors_are_one_paragraph(tmp_path, posttrain_cli):
    missing = posttrain_cli("run", tmp_path / "nope.yaml", cwd=tmp_path, check=False)
    assert missing.returncode == 2
    assert "error: recipe not found" in missing.stdout and "Traceback" not in missing.stdout + missing.stderr
    typo = posttrain_cli("run", TINY, "stages.sft.lerning_rate=1", cwd=tmp_path, check=False)
    assert typo.returncode == 2 and "stages.sft.lerning_rate: unknown key" in typo.stdout


def test_offline_hub_model_fails_fast(tmp_path, posttrain_cli):
    # timeout: a hang (a Hub lookup waiting on the network) fails the test instead of stalling CI
    result = posttrain_cli("run", TINY, "base.model_name_or_path=someone/not-cached", cwd=tmp_path, check=False,
                       timeout=60)
    assert result.returncode == 2
    assert "someone/not-cached" in result.stdout and "HF_HUB_OFFLINE" in result.stdout


def test_a_run_in_a_folder_with_a_non_ascii_name_keeps_its_hashes_when_moved(tmp_path):
    """json.dumps writes `/home/zoë` escaped (`zo\\u00eb`): the run folder is found in a step's inputs as written
    there, so a copied or moved run (an ablation variant starts as a copy) keeps its finished steps."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    hashes = set()
    for where in ("outputs", "moved"):
        pipeline = Pipeline(load_recipe(TINY), tmp_path / "zoë" / where)
        pipeline.base_hash = "b"
        hashes.add(pipeline.stage_hashes("sft", pipeline.stage_args("sft", None), None)[0])
    assert len(hashes) == 1


def test_a_data_job_is_rebuilt_when_a_file_it_reads_changes(tmp_path, monkeypatch):
    """The mix reads the other job's output by a path that never changes: rebuilding `tasks` (or editing a source
    file) must rebuild the mix, not report it up to date; a rebuild replaces the old output, and one that fails
    leaves it as it was."""
    from posttrain import datajobs
    from posttrain.errors import UserError
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    built = []

    def fake_job(job, args, out, *launch):  # stands in for the job processes: records the call, writes its args
        built.append(Path(out).name)
        if args.get("n_train") == 30:
            raise UserError("the job failed")
        Path(out).mkdir(parents=True)  # like build_sft_set without `overwrite`: never into an existing folder
        text = json.dumps(args, sort_keys=True)
        for source in args.get("sources", []):
            text += Path(source).read_text()
        (Path(out) / "rows.jsonl").write_text(text)

    monkeypatch.setattr(datajobs, "run_job", fake_job)
    source = tmp_path / "chat.jsonl"
    source.write_text('{"text": "hi"}\n')

    def build(n_train):
        raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}},
               "data": {"tasks": {"job": "build_verifiable_tasks", "n_train": n_train},
                        "mix": {"job": "build_sft_set", "sources": ["{data}/tasks/rows.jsonl", str(source)]}}}
        built.clear()
        Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out").build_data(after=None)
        return list(built)

    assert build(10) == ["tasks", "mix"]
    assert build(10) == [], "nothing changed: both up to date"
    assert build(20) == ["tasks", "mix"], "the mix reads the rebuilt tasks"
    source.write_text('{"text": "hello"}\n')
    assert build(20) == ["mix"], "an edited source file rebuilds the job that reads it"
    before = (tmp_path / "out" / "r" / "data" / "tasks" / "rows.jsonl").read_text()
    with pytest.raises(UserError, match="the job failed"):
        build(30)
    assert (tmp_path / "out" / "r" / "data" / "tasks" / "rows.jsonl").read_text() == before, "a failed rebuild loses nothing"


def job_recorder(built: list):
    """A `datajobs.run_job` stand-in: records the job's name and makes its output folder."""
    return lambda job, args, out, launch=None, config_dir=None: built.append(job) or Path(out).mkdir(parents=True)


def test_the_pair_job_runs_as_many_processes_as_the_stages_on_this_machine(tmp_path, monkeypatch):
    """With several processes (`--num-processes`, the GPUs of this machine) the job that samples pairs runs under
    accelerate's launcher as they are, each process sampling a share of the prompts; the other jobs run as one."""
    from posttrain import datajobs
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    launched = {}
    monkeypatch.setattr(datajobs, "run_job", lambda job, args, out, launch=None, *_: launched.update({job: launch}))
    raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}},
           "data": {"tasks": {"job": "build_verifiable_tasks"}, "pairs": {"job": "build_onpolicy_pairs"}}}
    Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out", num_processes=2).build_data(after=None)
    assert launched["build_verifiable_tasks"] is None
    command = launched["build_onpolicy_pairs"](["-m", "data_prep.jobs"])
    assert "--multi_gpu" in command and command[command.index("--num_processes") + 1] == "2"
    assert command[-2:] == ["-m", "data_prep.jobs"]
    launched.clear()
    Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "one").build_data(after=None)
    assert launched["build_onpolicy_pairs"](["-m", "data_prep.jobs"])[1:] == ["-m", "data_prep.jobs"]


def test_a_job_after_a_stage_is_rebuilt_when_the_stage_saved_other_weights(tmp_path, monkeypatch):
    """The on-policy pairs sample from the SFT adapter. SFT trained again with the same inputs (a damaged adapter
    retrained; on a GPU, where kernels are not deterministic) can save other weights: the pairs follow the weights,
    not only the stage's inputs hash."""
    from posttrain import datajobs
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    built = []
    monkeypatch.setattr(datajobs, "run_job", job_recorder(built))
    raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}},
           "data": {"pairs": {"job": "build_onpolicy_pairs", "after": "sft", "adapter_path": "{run}/sft"}}}
    pipeline = Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out")
    sft = tmp_path / "out" / "r" / "sft"
    sft.mkdir(parents=True)
    (sft / "lineage.json").write_text(json.dumps({"inputs_hash": "same"}))
    (sft / "adapter_model.safetensors").write_bytes(b"weights of the first training")

    def build():
        built.clear()
        pipeline.build_data(after="sft")
        return len(built)

    assert build() == 1 and build() == 0, "built once, then up to date"
    (sft / "adapter_model.safetensors").write_bytes(b"weights of the second training")
    assert build() == 1, "the same inputs hash, other weights: sampled again"


def test_only_hub_ids_that_name_no_local_folder_are_looked_up_in_the_hub_cache(tmp_path, monkeypatch):
    """`org/name` is a Hub id only where no folder of that name is at hand (a local `org/name` folder is what the job
    opens, whatever the cache's `main` says) and it has one slash (`a/b/c` is a path)."""
    from huggingface_hub import constants

    from posttrain.step_inputs import hub_commits

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for cached in ("org--name", "a--b--c"):
        main = tmp_path / "hub" / f"models--{cached}" / "refs" / "main"
        main.parent.mkdir(parents=True)
        main.write_text("aaaa")
    args = {"model_name_or_path": "org/name", "sampler": "a/b/c"}
    assert hub_commits(args) == {"org/name": "aaaa"}
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_commits(args) == {}, "a local folder of that name is what the job reads"


def test_a_job_that_names_a_hub_model_is_rebuilt_when_main_moves(tmp_path, monkeypatch):
    """A data job sampling from `org/name` itself (not `{base}`, a snapshot folder): `main` moving to other weights
    in the local Hugging Face cache changes what it samples from, not its arguments; it is sampled again."""
    from huggingface_hub import constants

    from posttrain import datajobs
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    main = tmp_path / "hub" / "models--org--name" / "refs" / "main"
    main.parent.mkdir(parents=True)
    main.write_text("aaaa")
    built = []
    monkeypatch.setattr(datajobs, "run_job", job_recorder(built))
    raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}},
           "data": {"pairs": {"job": "build_onpolicy_pairs", "model_name_or_path": "org/name"}}}
    pipeline = Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out")

    def build():
        built.clear()
        pipeline.build_data(after=None)
        return len(built)

    assert build() == 1 and build() == 0, "built once, then up to date"
    main.write_text("bbbb")
    assert build() == 1, "main names other weights: sampled again"


def test_a_full_model_stage_retrained_in_the_same_shapes_has_another_weights_fingerprint(tmp_path):
    """A full fine-tune (no adapter) saved again from the same inputs writes files of the same names and sizes; its
    fingerprint reads the weights themselves (sampled), so what samples from the stage is rebuilt."""
    import torch
    from safetensors.torch import save_file

    from posttrain.lineage import weights_fingerprint

    weights = {"a": torch.zeros(3 << 20), "b": torch.ones(1000)}  # 12 MB: the sampled places, not the whole file
    save_file(weights, tmp_path / "model.safetensors")
    before = weights_fingerprint(tmp_path)
    assert weights_fingerprint(tmp_path) == before
    weights["a"] += 1e-3  # training moves every weight (one value alone may lie outside the sampled places)
    save_file(weights, tmp_path / "model.safetensors")
    assert weights_fingerprint(tmp_path) != before


def test_stages_recorded_before_the_base_identity_stay_finished(tmp_path):
    """Runs recorded before `base_identity` joined the base hash keep their finished stages after an upgrade (a
    local or Hub base would otherwise retrain every stage); new runs record the hash with the identity."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml")
    now, before = Pipeline(recipe, tmp_path), Pipeline(recipe, tmp_path)
    now.base_hash, now.legacy_base_hashes = "with identity", ("shapes only",)
    before.base_hash = "shapes only"
    args = now.stage_args("sft", None)
    recorded = before.stage_hashes("sft", args, None)[0]
    hashes = now.stage_hashes("sft", args, None)
    assert hashes[0] != recorded and recorded in hashes


def test_stages_recorded_before_the_tokenizer_joined_the_base_identity_stay_finished(tmp_path, monkeypatch):
    """A local base's stages recorded with its weights' identity but not its tokenizer files' keep their finished
    stages after an upgrade; new runs record the hash with the tokenizer."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from posttrain import lineage
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(10)}, folder / "model.safetensors")
    recipe = load_recipe(TINY)
    recipe = dataclasses.replace(recipe, base=dataclasses.replace(recipe.base, model_name_or_path=str(folder)))

    def base_hashes():
        pipeline = Pipeline(recipe, tmp_path / "outputs")
        pipeline.base_model, pipeline.template = folder, "a template"
        pipeline.run_eval = lambda *args, **kwargs: None
        pipeline.evaluate_base()
        return pipeline.base_hash, pipeline.legacy_base_hashes

    identity = lineage.base_identity
    monkeypatch.setattr(lineage, "base_identity", lambda *args: {"weights": identity(*args)["weights"]})
    recorded = base_hashes()[0]
    monkeypatch.undo()
    now, earlier = base_hashes()
    assert now != recorded and recorded in earlier


def test_a_base_model_saved_over_in_place_or_moved_on_the_hub_changes_every_stage_hash(tmp_path):
    """`model_fingerprint` (config, weight names and sizes) is the same for a local base folder saved again in the same
    shapes or with a fixed tokenizer, and for a Hub revision that moved on; `base_identity` tells them apart (not a
    README edited), and adds nothing for cache-built bases (GGUF, tiny), whose stage hashes stay as they were."""
    import torch
    from safetensors.torch import save_file

    from posttrain.lineage import base_identity, model_fingerprint

    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = {"w": torch.zeros(1000)}
    save_file(weights, folder / "model.safetensors")
    shape, identity = model_fingerprint(folder), base_identity(str(folder), folder)
    weights["w"] += 1.0
    save_file(weights, folder / "model.safetensors")
    assert model_fingerprint(folder) == shape and base_identity(str(folder), folder) != identity

    shape, identity = model_fingerprint(folder), base_identity(str(folder), folder)
    (folder / "README.md").write_text("notes")
    assert base_identity(str(folder), folder) == identity
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (folder / name).write_text(f"{name} as fixed")  # ids, special tokens, template, image size: same weights
        assert model_fingerprint(folder) == shape and base_identity(str(folder), folder) != identity, name
        identity = base_identity(str(folder), folder)

    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / "0123abcd"
    assert base_identity("org/m", snapshot) == {"revision": "0123abcd"}
    assert base_identity("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "cache" / "gguf-entry") == {}
    assert base_identity("tiny:llama", tmp_path / "cache" / "tiny-llama") == {}


def test_a_base_named_from_the_home_folder_is_identified_as_a_local_folder(tmp_path, monkeypatch):
    """`base.model_name_or_path: ~/my-base` is a local folder that can be saved over in place: its identity holds its
    weights and tokenizer, as for the same folder named in full, not nothing as for a cache-built base."""
    import torch
    from safetensors.torch import save_file

    from posttrain.lineage import base_identity

    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "my-base"
    folder.mkdir()
    save_file({"w": torch.zeros(10)}, folder / "model.safetensors")
    assert base_identity("~/my-base", folder) == base_identity(str(folder), folder) != {}


def test_only_a_snapshot_folder_of_the_hub_cache_names_a_hub_revision(tmp_path):
    """`models--org--m/snapshots/<commit>` is a Hub snapshot; another folder two down from `models--org--m` (a ref, a
    folder of one's own) names no commit, and a base there is not taken for that revision."""
    from posttrain.lineage import hub_snapshot

    assert hub_snapshot(tmp_path / "models--org--m" / "snapshots" / "0123abcd") == ("org/m", "0123abcd")
    assert hub_snapshot(tmp_path / "models--org--m" / "refs" / "main") is None


def test_the_sampled_digest_reads_the_first_and_the_last_bytes_of_the_tensor_data(tmp_path, monkeypatch):
    """Of the 8 places `sampled_digest` reads, the first starts at the tensor data and the last ends at the file's
    end: a weight file changed only in its first or last bytes gets another digest."""
    from posttrain import lineage

    monkeypatch.setattr(lineage, "SAMPLED_BYTES", 16)  # 8 places of 16 bytes in 1000 bytes of data: gaps between
    header = b'{"__metadata__":{}}'
    file = tmp_path / "model.safetensors"

    def digest(data: bytearray) -> str:
        file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
        return lineage.sampled_digest(file)

    data = bytearray(1000)
    before = digest(data)
    for place in (0, -1):
        changed = bytearray(data)
        changed[place] = 1
        assert digest(changed) != before, place


def test_a_stage_trained_from_other_weights_of_its_previous_stage_is_trained_again(shared_tiny, tiny_run, tmp_path,
                                                                                   posttrain_here):
    """DPO trained again with the same inputs to other weights (its folder removed, on a GPU whose kernels are not
    deterministic): UPO, trained from the old DPO with the same inputs hash, is stale for the report and export and
    is trained again by the next run. (SFT's case reaches DPO through the on-policy pairs, keyed on SFT's weights.)"""
    from safetensors.torch import load_file, save_file

    from posttrain.runs import stale_stages

    cwd = tmp_path / "copy"
    shutil.copytree(shared_tiny.root, cwd)
    run = cwd / "outputs" / shared_tiny.name
    assert stale_stages(run) == {}
    adapter = run / "dpo" / "adapter_model.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(adapter).items()}, adapter, metadata={"format": "pt"})
    assert stale_stages(run) == {"upo": "trained from an earlier dpo"}
    again = " ".join(posttrain_here("run", "recipe.yaml", cwd=cwd).stdout.split())
    assert "dpo: finished earlier with the same inputs, skipped" in again
    assert "upo: finished earlier with the same inputs, but dpo has been trained again since" in again
    assert "stage: upo" in again and stale_stages(run) == {}


def test_an_installed_copy_inside_another_repository_records_no_commit(tmp_path, monkeypatch):
    """A user's project with its .venv inside: site-packages is in that repository, whose commit is not posttrain's."""
    import subprocess

    from posttrain import lineage

    site = tmp_path / ".venv" / "site-packages" / "posttrain"
    site.mkdir(parents=True)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the user's project"], check=True)
    monkeypatch.setattr(lineage, "__file__", str(site / "lineage.py"))
    assert lineage.git_commit() is None


def test_a_copied_run_is_evaluated_on_its_own_data(tiny_run, tmp_path):
    """A stage's resolved.yaml names the folder it was written in: a copy of the run (or the run moved) reads its own
    `{data}`, not the original's, which may since have been built again or removed."""
    from posttrain.runs import stage_ref

    copy = tmp_path / "copy" / tiny_run.name
    shutil.copytree(tiny_run, copy)
    resolved = stage_ref(copy, "sft").resolved
    assert resolved["eval_dataset"] == str(copy.resolve() / "data" / "verifiable")
    assert str(tiny_run.resolve()) not in json.dumps(resolved)


def test_a_stage_folder_is_readable_as_the_umask_allows(tiny_run):
    """safetensors writes its file 0600: a stage moved into place has the modes the umask gives everything else, so a
    teammate who can read the run can evaluate and export its stages."""
    umask = os.umask(0)
    os.umask(umask)
    for stage in ("sft", "dpo", "upo"):
        adapter = tiny_run / stage / "adapter_model.safetensors"
        assert adapter.stat().st_mode & 0o777 == 0o666 & ~umask, stage


def test_a_data_file_beside_the_recipe_named_without_a_folder_is_found_from_anywhere(tmp_path, monkeypatch):
    """`path: chat.jsonl` beside the recipe passed the recipe check but the job, run from another folder, did not find
    it; and `~/x` is in the home folder, as base.model_name_or_path is."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe, resolve_relative

    project = tmp_path / "project"
    project.mkdir()
    (project / "chat.jsonl").write_text('{"messages": []}\n')
    (project / "recipe.yaml").write_text(TINY.read_text())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    pipeline = Pipeline(load_recipe(project / "recipe.yaml"), tmp_path / "outputs")
    assert pipeline.local_paths({"path": "chat.jsonl", "name": "chat"}) == {"path": str(project / "chat.jsonl"),
                                                                             "name": "chat"}
    monkeypatch.setenv("HOME", str(project))
    assert resolve_relative("~/chat.jsonl", project / "recipe.yaml") == project / "chat.jsonl"


def test_a_path_flag_expands_the_home_folder(tmp_path, monkeypatch):
    """`--output-dir=~/runs`: the shell leaves `~` after `=` as written, which made a folder named `~`."""
    from posttrain.cli import make_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    assert make_parser().parse_args(["run", "--output-dir=~/runs"]).output_dir == str(tmp_path / "runs")
    assert make_parser().parse_args(["export", "r", "--out=~/x"]).out == str(tmp_path / "x")


def test_each_stage_tracks_into_a_run_named_by_its_inputs(tiny_run):
    """A stage trained again with other inputs (or the recipe run in another folder with other settings) drew its
    curves over the old ones: trackio resumes a run of the same name, TensorBoard merges one folder's event files."""
    for stage in ("sft", "dpo", "upo"):
        digest = json.loads((tiny_run / stage / "lineage.json").read_text())["inputs_hash"]
        resolved = yaml.safe_load((tiny_run / stage / "resolved.yaml").read_text())
        assert resolved["run_name"] == f"tiny-text-{stage}-{digest[:8]}"


def test_a_job_measuring_lengths_with_the_runs_tokenizer_is_rebuilt_when_the_template_changes(tmp_path, monkeypatch):
    """`build_sft_set` with `tokenizer: "{run}/base/tokenizer"` and `max_tokens` keeps the rows that fit as the
    recipe's chat template renders them: another template (or base model) writes other tokenizer files at the same
    path, and the job must be built again, not reported up to date with rows measured by the old template."""
    from posttrain import datajobs
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    built = []
    monkeypatch.setattr(datajobs, "run_job", job_recorder(built))
    raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}},
           "data": {"mix": {"job": "build_sft_set", "sources": ["x.jsonl"], "tokenizer": "{run}/base/tokenizer",
                            "max_tokens": 64}}}
    pipeline = Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out")
    tokenizer = tmp_path / "out" / "r" / "base" / "tokenizer"
    tokenizer.mkdir(parents=True)

    def build(template):
        (tokenizer / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        built.clear()
        pipeline.build_data(after=None)
        return len(built)

    assert build("chatml") == 1 and build("chatml") == 0, "built once, then up to date"
    assert build("a template with a system prompt") == 1, "another chat template: the lengths are measured again"


def test_a_stage_trained_on_the_base_before_it_was_edited_is_stale(tmp_path):
    """The recipe's base model or chat template edited, and the run stopped in its first stage (Ctrl-C, a failure):
    the base is evaluated anew, but sft/ (and what follows) is still trained on the old one. It is stale, not compared
    with the new base in the accuracy line, until it is trained again."""
    from posttrain import lineage
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe
    from posttrain.runs import stale_stages

    template = tmp_path / "system.jinja"
    template.write_text("{% for m in messages %}system says hi {{ m['content'] }}{% endfor %}")

    def evaluate_base(chat_template):
        raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama", "chat_template": chat_template},
               "stages": {"sft": {"dataset_name": "x"}}}
        pipeline = Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out")
        pipeline.resolve_base()
        pipeline.evaluate_base()  # no eval set: records the base's lineage only
        return pipeline

    pipeline = evaluate_base("chatml")
    run = pipeline.root
    write_json(run / "run.json", {"order": ["base", "sft"]})
    (run / "sft").mkdir()
    write_json(run / "sft" / "lineage.json",
               lineage.stage_lineage("sft", {"model_name_or_path": str(pipeline.base_model)}, "h", pipeline, None))
    assert stale_stages(run) == {}
    evaluate_base(str(template))
    assert stale_stages(run) == {"sft": "trained on another base model or chat template than the run's base now"}


def test_a_stage_trains_from_the_stage_before_it_is_evaluated_as_the_run_is_and_keeps_its_own_project(hashed):
    """A stage's arguments: the adapter of the stage before it, the run's held-out evaluation (the same for every
    step), and a tracking project the recipe names for the stage rather than the run's."""
    from posttrain.configs import StageArguments

    args = hashed.stage_args("dpo", "sft")
    assert args["adapter_path"] == str(hashed.root / "sft") and "adapter_path" not in hashed.stage_args("sft", None)
    assert StageArguments.from_eval(hashed.eval_settings()).items() <= args.items()
    assert args["project"] == "tiny-text"
    hashed.recipe.stages["dpo"]["project"] = "mine"
    assert hashed.stage_args("dpo", "sft")["project"] == "mine"


@pytest.fixture
def fake_training(hashed, monkeypatch):
    """`hashed` whose stage process only records the arguments it was given (`trained`) and whose re-evaluation only
    records the stage (`evaluated`); a folder's adapter is always whole."""
    from posttrain import lineage, pipeline_stages
    from posttrain.pipeline import Pipeline

    hashed.trained, hashed.evaluated = [], []
    monkeypatch.setattr(Pipeline, "stage_args", lambda self, stage, previous: {"learning_rate": 1e-3})
    monkeypatch.setattr(pipeline_stages, "finished_problem", lambda folder: None)
    monkeypatch.setattr(lineage, "stage_lineage", lambda stage, args, digest, pipe, previous: {"inputs_hash": digest})
    monkeypatch.setattr(Pipeline, "reevaluate", lambda self, stage: self.evaluated.append(stage))
    monkeypatch.setattr(Pipeline, "_spawn", lambda self, cmd, log, stage, env: self.trained.append(
        yaml.safe_load((self.root / f".{stage}.partial" / "resolved.yaml").read_text())))
    return hashed


def test_a_trained_or_skipped_stage_is_scored_and_its_record_is_of_this_attempt(fake_training):
    """A stage trained, then skipped as finished, is evaluated again where its held-out evaluation changed
    (`reevaluate`) each time; its lineage records the evaluation, and run.json no error of an earlier attempt."""
    pipeline = fake_training
    pipeline.run_stage("sft", None)
    assert len(pipeline.trained) == 1 and pipeline.evaluated == ["sft"]
    assert json.loads((pipeline.root / "sft" / "lineage.json").read_text())["eval_hash"] == pipeline.eval_hash
    pipeline._record("sft", error="an earlier attempt failed", log="sft.log")
    pipeline.run_stage("sft", None)
    assert len(pipeline.trained) == 1 and pipeline.evaluated == ["sft", "sft"]
    assert {k: pipeline.state["steps"]["sft"][k] for k in ("status", "error", "log")} == \
        {"status": "done", "error": None, "log": None}


def test_a_stage_resumes_only_an_unfinished_run_of_the_same_inputs_from_the_same_previous_weights(fake_training,
                                                                                                  monkeypatch):
    """An unfinished stage of the same inputs resumes from its last checkpoint; one of other inputs, or trained from
    other weights of the stage before it, starts over."""
    from posttrain import lineage, pipeline_stages

    pipeline, partial = fake_training, fake_training.root / ".sft.partial"
    monkeypatch.setattr(pipeline_stages, "resume_point", lambda folder, say: next(folder.glob("checkpoint-*"), None))

    def unfinished(inputs_hash):
        shutil.rmtree(pipeline.root / "sft", ignore_errors=True)
        (partial / "checkpoint-5").mkdir(parents=True)
        write_json(partial / "lineage.json", {"inputs_hash": inputs_hash})
        pipeline.run_stage("sft", None)
        return pipeline.trained[-1].get("resume_from_checkpoint")

    same = pipeline.stage_hashes("sft", {"learning_rate": 1e-3}, None)[0]
    assert unfinished(same) == str(partial / "checkpoint-5")
    assert unfinished("other inputs") is None
    monkeypatch.setattr(lineage, "other_previous", lambda root, record: "dpo has been trained again since")
    assert unfinished(same) is None


def test_a_finished_stage_is_trained_again_when_its_adapter_is_damaged_or_the_stage_before_was_retrained(
        fake_training, monkeypatch):
    from posttrain import lineage, pipeline_stages

    pipeline = fake_training
    pipeline.run_stage("sft", None)
    pipeline.run_stage("sft", None)
    assert len(pipeline.trained) == 1
    monkeypatch.setattr(pipeline_stages, "finished_problem", lambda folder: "adapter_model.safetensors is missing")
    pipeline.run_stage("sft", None)
    assert len(pipeline.trained) == 2
    monkeypatch.setattr(pipeline_stages, "finished_problem", lambda folder: None)
    monkeypatch.setattr(lineage, "other_previous", lambda root, record: "dpo has been trained again since")
    pipeline.run_stage("sft", None)
    assert len(pipeline.trained) == 3


def test_a_stage_finished_in_its_partial_folder_is_moved_into_place_unless_forced(fake_training):
    """A run stopped after the stage process finished but before its folder was moved: the next run moves it (and
    scores it), `--from`/`--only` train it again."""
    pipeline, partial = fake_training, fake_training.root / ".sft.partial"

    def finished_in_partial():
        shutil.rmtree(pipeline.root / "sft", ignore_errors=True)
        write_json(partial / "lineage.json", {"inputs_hash": pipeline.stage_hashes("sft", {"learning_rate": 1e-3},
                                                                                    None)[0]})
        write_json(partial / "metrics.json", {"status": "done"})

    finished_in_partial()
    pipeline.run_stage("sft", None)
    assert pipeline.trained == [] and pipeline.evaluated == ["sft"] and (pipeline.root / "sft" / "metrics.json").is_file()
    finished_in_partial()
    pipeline.run_stage("sft", None, force=True)
    assert len(pipeline.trained) == 1

def test_a_finished_stage_moved_into_place_replaces_the_old_one_without_its_checkpoints(tmp_path):
    """The finished `.partial` folder becomes the stage folder: the old one and what a killed move left (`.sft.old`)
    gone, and the checkpoints with them."""
    from posttrain.pipeline_stages import StageSteps

    partial, final, old = tmp_path / ".sft.partial", tmp_path / "sft", tmp_path / ".sft.old"
    for folder, name in ((partial / "checkpoint-2", "optimizer.pt"), (partial, "new"), (final, "stale"),
                         (old, "stale")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    StageSteps._move_into_place(partial, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"] and [p.name for p in final.iterdir()] == ["new"]


def test_a_stage_process_finished_only_with_its_metrics_done_and_its_adapter_whole(tmp_path):
    """What a stopped run left in `.partial` is moved into place, not trained again, only when the stage process
    wrote its metrics as done and its adapter loads."""
    from posttrain.pipeline_stages import StageSteps

    write_json(tmp_path / "metrics.json", {"status": "done"})
    write_json(tmp_path / "adapter_config.json", {"r": 8})
    assert not StageSteps._finished_in(tmp_path)  # no adapter weights


def test_an_ablations_shared_part_trains_the_stages_before_the_varied_one_and_their_data(stage_calls):
    stage_calls.run(stop_before="upo")
    assert stage_calls.calls == [("data after", None), ("sft", None, False), ("data after", "sft"),
                                 ("dpo", "sft", False), ("data after", "dpo")]


def test_only_a_later_stage_promotes_the_earlier_ones_it_scored_again(stage_calls, monkeypatch):
    """`--only dpo` after the held-out evaluation changed: the kept sft is scored again and goes through its gate,
    as dpo does after training."""
    from posttrain.pipeline import Pipeline

    (stage_calls.root / "sft").mkdir(parents=True)
    (stage_calls.root / "sft" / "lineage.json").write_text("{}")
    monkeypatch.setattr(Pipeline, "reevaluate", lambda self, stage: True)
    monkeypatch.setattr(Pipeline, "promote", lambda self, stage: self.calls.append(("promote", stage)))
    stage_calls.run(only="dpo")
    assert [c for c in stage_calls.calls if c[0] != "data after"] == [("promote", "sft"), ("dpo", "sft", True),
                                                                        ("promote", "dpo")]


def test_until_leaves_the_data_jobs_only_later_stages_read_for_later(stage_calls):
    """`--until sft` leaves the pairs DPO trains on (sampled from the SFT adapter) for the run that gets to DPO."""
    stage_calls.run(until="sft")
    assert stage_calls.later_data == {"pairs"}
    stage_calls.run()
    assert stage_calls.later_data == set()


def test_a_data_job_left_for_later_stages_is_not_built(tmp_path, monkeypatch):
    from posttrain import datajobs
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    built = []
    monkeypatch.setattr(datajobs, "run_job", lambda job, args, out, launch=None, config_dir=None: built.append(job))
    pipeline = Pipeline(load_recipe(TINY), tmp_path / "outputs")
    pipeline.later_data = {"pairs"}
    pipeline.build_data(after="sft")  # sft has not finished: the pairs' job would fail reading its lineage
    assert built == []


def test_a_stage_scored_on_another_evaluation_is_scored_again_once_and_records_it(hashed, monkeypatch):
    """The held-out evaluation changed: the finished stage is evaluated again (not trained), its gate's old verdict
    dropped, its resolved.yaml given the new settings (what `posttrain eval` reads) and its lineage the new hash."""
    from posttrain.pipeline import Pipeline

    final, evaluated = hashed.root / "sft", []
    write_json(final / "lineage.json", {"inputs_hash": "h", "eval_hash": "an earlier evaluation"})
    write_json(final / "metrics.json", {"status": "done", "eval": {"accuracy": 0.1}, "promotion": {"gate": None}})
    (final / "resolved.yaml").write_text(yaml.safe_dump({"learning_rate": 1e-3, "eval_split": "dev"}))
    monkeypatch.setattr(Pipeline, "run_eval", lambda self, out, step, adapter=None: evaluated.append(adapter) or
                        {"accuracy": 0.5})
    assert hashed.reevaluate("sft") and not hashed.reevaluate("sft")
    assert evaluated == [final]
    assert json.loads((final / "metrics.json").read_text()) == {"status": "done", "eval": {"accuracy": 0.5}}
    resolved = yaml.safe_load((final / "resolved.yaml").read_text())
    assert resolved["learning_rate"] == 1e-3 and resolved["eval_split"] == "test"
    assert json.loads((final / "lineage.json").read_text()) == {"inputs_hash": "h", "eval_hash": hashed.eval_hash}


def test_an_evaluation_runs_the_base_model_with_the_stages_adapter_as_the_recipe_loads_it(hashed, monkeypatch):
    from posttrain.pipeline import Pipeline

    commands = []

    def spawn(self, cmd, log, step):
        commands.append((cmd, log))
        Path(cmd[cmd.index("--out") + 1]).write_text('{"accuracy": 1.0}')

    monkeypatch.setattr(Pipeline, "_spawn", spawn)
    hashed.base_model = hashed.root / "model"
    final = hashed.root / "sft"
    final.mkdir(parents=True)
    assert hashed.run_eval(final, "sft", adapter=final) == {"accuracy": 1.0}
    cmd, log = commands[-1]
    assert cmd[cmd.index("--adapter") + 1] == str(final) and "--trust-remote-code" not in cmd
    assert log == final / "sft.eval.log" and not list(final.iterdir())  # its settings and result read and removed
    hashed.recipe.base.trust_remote_code = True
    hashed.run_eval(hashed.root / "base", "base")
    cmd, log = commands[-1]
    assert "--adapter" not in cmd and "--trust-remote-code" in cmd and log == hashed.root / "base" / "base.log"


def test_a_base_evaluated_with_the_same_inputs_before_an_upgrade_is_not_evaluated_again(hashed, monkeypatch):
    """The base model's held-out evaluation is skipped while its inputs are unchanged, also when a version before
    `base_identity` recorded them (its legacy hash), and run.json then keeps no error of an earlier attempt."""
    from posttrain.pipeline import Pipeline

    evaluated, model = [], hashed.root / "model"
    monkeypatch.setattr(Pipeline, "run_eval", lambda self, out, step, adapter=None: evaluated.append(step) or {})
    write_json(model / "config.json", {"model_type": "llama"})
    hashed.base_model, hashed.template = model, "chatml"
    hashed.recipe.base.model_name_or_path = str(model)  # a local folder: its identity is more than its shape
    hashed.evaluate_base()
    lineage_path = hashed.root / "base" / "lineage.json"
    legacy = hashed.digest({"base": hashed.legacy_base_hashes[0], "eval": hashed.eval_hash})
    assert json.loads(lineage_path.read_text())["inputs_hash"] != legacy
    write_json(lineage_path, {**json.loads(lineage_path.read_text()), "inputs_hash": legacy})
    hashed._record("base", status="failed", error="an earlier attempt failed")
    hashed.evaluate_base()
    assert evaluated == ["base"] and hashed.state["steps"]["base"]["error"] is None


def test_an_eval_set_edited_in_place_is_another_held_out_evaluation(hashed):
    """The held-out hash covers the eval set's content, not only its settings: finished stages are scored again."""
    data = hashed.root / "data" / "verifiable"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    before = hashed.held_out_hash()
    (data / "test.jsonl").write_text('{"prompt": "1 + 2?", "answer": "3"}\n')
    assert hashed.held_out_hash() != before


def test_a_base_models_shape_changes_with_the_size_of_a_weight_file(tmp_path):
    """`model_fingerprint` (the legacy base hash runs from before `base_identity` recorded) covers the weight files'
    sizes, not only config.json: a model saved in another dtype is another base."""
    from posttrain.lineage import model_fingerprint

    write_json(tmp_path / "config.json", {"model_type": "llama"})
    (tmp_path / "model.safetensors").write_bytes(b"x" * 8)
    before = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 16)
    assert model_fingerprint(tmp_path) != before


def test_a_stages_lineage_records_the_previous_stage_as_it_trained_from_it(hashed, monkeypatch):
    """The previous stage's inputs hash and weights (which `other_previous` compares with what is there now) and both
    datasets a stage trains on."""
    from posttrain import lineage, models

    monkeypatch.setattr(models, "describe_model", lambda path: {})
    sft = hashed.root / "sft"
    write_json(sft / "lineage.json", {"inputs_hash": "sft-hash"})
    (sft / "adapter_model.safetensors").write_bytes(b"weights")
    args = {"model_name_or_path": "m", "dataset_name": "org/prompts", "upo_offline_dataset": "org/pairs"}
    record = lineage.stage_lineage("upo", args, "upo-hash", hashed, "sft")
    assert (record["previous_stage"], record["previous_inputs_hash"]) == ("sft", "sft-hash")
    assert sorted(record["datasets"]) == ["dataset_name", "upo_offline_dataset"]
    assert lineage.other_previous(hashed.root, record) is None
    (sft / "adapter_model.safetensors").write_bytes(b"other weights")
    assert lineage.other_previous(hashed.root, record) == "sft has been trained again since, to other weights"


def test_the_other_machines_of_a_run_hear_how_it_ended(stage_calls, monkeypatch):
    from types import SimpleNamespace

    from posttrain.errors import UserError
    from posttrain.pipeline import Pipeline

    heard = []
    stage_calls.coordinator = SimpleNamespace(finish=heard.append)
    stage_calls.run()

    def fail(self, stage, previous, force=False):
        raise UserError("step 'sft' failed")

    monkeypatch.setattr(Pipeline, "run_stage", fail)
    with pytest.raises(UserError):
        stage_calls.run()
    assert heard == ["done", "failed"]


def test_a_full_disk_a_step_already_explained_is_reported_as_it_said(stage_calls, monkeypatch):
    """A UserError that says the disk is full (the stage's own, naming what it was writing) is not reworded as one
    about the run's files."""
    import errno

    from posttrain.errors import UserError
    from posttrain.pipeline import Pipeline

    said = "no space left on /scratch (writing checkpoint-3/optimizer.pt), needed for a checkpoint of sft"

    def full(self, stage, previous, force=False):
        raise UserError(said) from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Pipeline, "run_stage", full)
    with pytest.raises(UserError) as error:
        stage_calls.run()
    assert str(error.value) == said


def test_a_data_jobs_relative_path_is_made_absolute_only_where_it_exists(stage_calls, tmp_path, monkeypatch):
    """A path found from here, beside the recipe or in the repository is made absolute; a Hub id (`org/name`) or a
    path that is nowhere stays as written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "chat.jsonl").write_text("{}\n")
    assert stage_calls.local_paths({"sources": [{"path": "sources/chat.jsonl"}], "model": "Qwen/Qwen2.5-0.5B",
                                    "other": "nowhere/x.jsonl"}) == \
        {"sources": [{"path": str(tmp_path / "sources" / "chat.jsonl")}], "model": "Qwen/Qwen2.5-0.5B",
         "other": "nowhere/x.jsonl"}
