"""Promote gates and the statistics they rest on: a stage measurably worse than the step before it stops the chain,
is shown as such in the summary line and the report, and is not exported without --force."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from posttrain.configs import GateArguments
from posttrain.errors import UserError
from posttrain.export import ExportRequest, run_export
from posttrain.pipeline import Pipeline
from posttrain.promotion import blocks_chain, promotion
from posttrain.recipe import load_recipe
from posttrain.report import accuracy_line, build_report
from posttrain.stats import format_change, paired_evals

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny" / "text.yaml"
ASSETS = Path(__file__).parent / "assets" / "runs" / "tiny-full"


def evaluation(verdicts: list[int], **metrics) -> dict:
    return {"n": len(verdicts), "accuracy": sum(verdicts) / len(verdicts), "verdicts": verdicts,
            "prompts_sha": "same-prompts", **metrics}


# ------------------------------------------------------------------------------------------------ verdicts
def test_accuracy_gate_stops_only_a_significant_drop():
    before = evaluation([1] * 20 + [0] * 20)
    much_worse = evaluation([1] * 8 + [0] * 32)  # 12 prompts lost, none gained: McNemar p = 2 / 2**12
    record = promotion(GateArguments(), "sft", before, much_worse)
    assert record["comparison"]["only_a"] == 12 and record["comparison"]["only_b"] == 0
    assert record["gate"]["p_value"] == pytest.approx(2 / 2**12)
    assert not record["gate"]["passed"] and blocks_chain(record)
    assert "20.0% vs 50.0% after sft" in record["gate"]["reason"]
    slightly_worse = evaluation([1] * 18 + [0] * 22)  # 2 lost: p = 0.5, luck
    record = promotion(GateArguments(), "sft", before, slightly_worse)
    assert record["gate"]["passed"] and "not significantly worse" in record["gate"]["reason"]
    # recorded but not enforced
    record = promotion(GateArguments(must_not_drop=False), "sft", before, much_worse)
    assert not record["gate"]["passed"] and not blocks_chain(record)


def test_a_p_value_just_under_005_is_not_printed_as_005(tmp_path):
    """150 prompts lost and 117 gained: exact McNemar p = 0.049983, significant, so the gate stops the run; at two
    digits it read "p=0.05" (as did 159 lost, 125 gained, p = 0.050016, which passes): the stopping p reads below
    0.05 in the gate's reason, the accuracy line and the report's table."""
    before = evaluation([1] * 150 + [0] * 117 + [1] * 50 + [0] * 50)
    after = evaluation([0] * 150 + [1] * 117 + [1] * 50 + [0] * 50)
    record = promotion(GateArguments(), "sft", before, after)
    assert not record["gate"]["passed"] and "McNemar p=0.04998," in record["gate"]["reason"]
    assert format_change(paired_evals(before, after)) == "-9.0 (p=0.04998)"
    run = tmp_path / "run"
    shutil.copytree(ASSETS, run)
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    (run / "sft" / "metrics.json").write_text(json.dumps({**metrics, "promotion": record}))
    build_report(run, compare=[])
    assert "| 150 / 117 | 0.04998 | yes |" in (run / "report.md").read_text()
    before = evaluation([1] * 159 + [0] * 125 + [1] * 50 + [0] * 50)
    after = evaluation([0] * 159 + [1] * 125 + [1] * 50 + [0] * 50)
    record = promotion(GateArguments(), "sft", before, after)
    assert record["gate"]["passed"] and "McNemar p=0.05," in record["gate"]["reason"]


def test_a_drop_of_exactly_max_drop_is_tolerated_and_the_reason_says_why_a_drop_passed():
    """`max_drop` is the tolerated worsening: 110/200 -> 100/200 (0.55 - 0.50 is 0.05000000000000004 in floats) passes
    at max_drop 0.05 although it is significant; the reason names the tolerance, not a lack of significance."""
    before, after = evaluation([1] * 110 + [0] * 90), evaluation([1] * 100 + [0] * 100)
    record = promotion(GateArguments(max_drop=0.05), "sft", before, after)
    assert record["comparison"]["p_value"] < 0.05 and record["gate"]["passed"]
    assert record["gate"]["reason"].endswith("10 prompts lost, 0 gained); within max_drop 0.05")
    assert not promotion(GateArguments(max_drop=0.04), "sft", before, after)["gate"]["passed"]
    loss = promotion(GateArguments("heldout_loss", max_drop=0.01), "base", evaluation([1], heldout_loss=0.30),
                     evaluation([1], heldout_loss=0.31))
    assert loss["gate"]["passed"]


def test_an_unchanged_accuracy_is_no_drop_to_explain():
    """As many prompts gained as lost: the accuracy did not fall, so the reason gives the test and no excuse for a drop
    ("not significantly worse")."""
    before = evaluation([1] * 5 + [0] * 5)
    after = evaluation([0] * 2 + [1] * 3 + [1] * 2 + [0] * 3)
    record = promotion(GateArguments(), "sft", before, after)
    assert record["gate"]["passed"] and record["gate"]["reason"].endswith("2 prompts lost, 2 gained)")


def test_threshold_gate_on_a_lower_is_better_metric():
    before, after = evaluation([0, 1], heldout_loss=2.0), evaluation([0, 1], heldout_loss=2.3)
    assert not promotion(GateArguments("heldout_loss"), "base", before, after)["gate"]["passed"]
    assert promotion(GateArguments("heldout_loss", max_drop=0.5), "base", before, after)["gate"]["passed"]
    assert promotion(GateArguments("heldout_loss"), "base", after, before)["gate"]["passed"], "a lower loss is better"
    nan = evaluation([0, 1], heldout_loss=None)  # evaluate() writes a NaN loss as None
    record = promotion(GateArguments("heldout_loss", max_drop=10.0), "base", before, nan)
    assert not record["gate"]["passed"] and "not measured" in record["gate"]["reason"]


def test_an_unchanged_threshold_metric_is_not_worse():
    same = evaluation([0, 1], heldout_loss=2.0)
    record = promotion(GateArguments("heldout_loss"), "base", same, same)
    assert record["gate"]["passed"] and "not worse by 0 (max_drop 0)" in record["gate"]["reason"]


def test_threshold_gates_on_higher_is_better_metrics():
    """`format` and `stop_rate` are fractions where higher is better: a fall stops the chain, a rise never does."""
    for metric in ("format", "stop_rate"):
        high, low = evaluation([0, 1], **{metric: 0.9}), evaluation([0, 1], **{metric: 0.5})
        assert not promotion(GateArguments(metric), "sft", high, low)["gate"]["passed"], metric
        assert promotion(GateArguments(metric), "sft", low, high)["gate"]["passed"], metric
    # a record without "enforced" (every writer sets it; a hand-edited one) fails closed
    assert blocks_chain({"gate": {"passed": False}})


def test_a_gate_without_a_previous_value_passes_and_a_negative_max_drop_is_refused():
    record = promotion(GateArguments("heldout_loss"), "base", evaluation([0, 1]), evaluation([0, 1], heldout_loss=2.0))
    assert record["gate"]["passed"] and "base has no heldout_loss" in record["gate"]["reason"]
    with pytest.raises(UserError, match=r"stages.dpo.gate.max_drop: -0.1 is negative"):
        load_recipe(TINY, ["stages.dpo.gate={metric: accuracy, max_drop: -0.1}"])


def test_different_prompts_are_not_paired():
    record = promotion(GateArguments(), "sft", evaluation([1] * 10),
                       {**evaluation([0] * 10), "prompts_sha": "other-prompts"})
    assert record["comparison"] is None and record["gate"]["passed"]


# ------------------------------------------------------------------------------------------------ recipe
def test_gate_keys_are_validated_and_kept_out_of_stage_arguments():
    recipe = load_recipe(TINY, ["shared.gate={metric: heldout_loss, max_drop: 0.5}", "stages.upo.gate=null",
                                "stages.dpo.gate=false"])
    assert recipe.gates["sft"] == GateArguments("heldout_loss", True, 0.5) and list(recipe.gates) == ["sft"]
    assert "gate" not in recipe.stages["sft"], "a gate is the pipeline's, not a TRL argument"
    with pytest.raises(UserError, match=r"stages.dpo.gate.metric: 'acuracy' .*did you mean accuracy"):
        load_recipe(TINY, ["stages.dpo.gate={metric: acuracy}"])
    with pytest.raises(UserError, match=r"shared.gate.must_not_dorp: unknown key .*did you mean must_not_drop"):
        load_recipe(TINY, ["shared.gate={must_not_dorp: true}"])


# ------------------------------------------------------------------------------------------------ pipeline, report
@pytest.fixture
def gated_run(tmp_path):
    """The committed tiny run with known per-prompt verdicts: sft gains 6 prompts, dpo loses 9 of them and more."""
    root = tmp_path / "tiny-text"
    shutil.copytree(ASSETS, root)
    verdicts = {"base": [1] * 4 + [0] * 36, "sft": [1] * 10 + [0] * 30, "dpo": [1] + [0] * 39,
                "upo": [1] * 2 + [0] * 38}
    for step, values in verdicts.items():
        path = root / step / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["eval"].update(evaluation(values))
        path.write_text(json.dumps(metrics))
    pipeline = Pipeline(load_recipe(TINY, ["shared.gate={metric: accuracy}"]), tmp_path)
    pipeline.promote("sft")
    with pytest.raises(UserError, match="stage 'dpo' is worse than sft and its promote gate stopped the run"):
        pipeline.promote("dpo")
    return root


def test_gate_verdicts_reach_metrics_run_json_summary_and_report(gated_run):
    dpo = json.loads((gated_run / "dpo" / "metrics.json").read_text())["promotion"]
    assert dpo["against"] == "sft" and dpo["comparison"]["only_a"] == 9 and not dpo["gate"]["passed"]
    state = json.loads((gated_run / "run.json").read_text())
    assert state["steps"]["run"]["status"] == "stopped" and state["steps"]["dpo"]["gate"] == dpo["gate"]
    line = accuracy_line(gated_run)
    assert line.startswith("base 10.0% (4–23) → sft 25.0% (14–40), +15.0 (p=0.031) → dpo 2.5% (0–13), -22.5 (p=0.0039) "
                           "✗ gate failed → upo 5.0% (1–17) (stale: trained from dpo, which its promote gate "
                           "rejected)")
    build_report(gated_run, compare=[])
    md = (gated_run / "report.md").read_text()
    assert "**Stage dpo failed its promote gate:** accuracy 2.5% vs 25.0% after sft" in md
    assert "stopped by a promote gate" in md
    assert "95 % interval of the change" in md and "| **sft** | base | +15.0 pts |" in md
    assert "accuracy: 95 % interval (Wilson)" in md


def test_chat_and_eval_say_when_they_take_a_gated_out_stage(gated_run, capsys):
    """Without --stage, `chat` and `eval` take the last stage that is not stale: here dpo, which its gate rejected
    (upo, trained from it, is stale). They took it without a word; now they say so and name the one before."""
    from posttrain.runs import stage_ref

    capsys.readouterr()
    assert stage_ref(gated_run).stage == "dpo"
    warning = " ".join(capsys.readouterr().out.split())
    assert "dpo of" in warning and "is the stage its promote gate rejected (accuracy 2.5% vs 25.0% after sft" in warning
    assert warning.endswith("pass --stage sft for the one before it")
    assert stage_ref(gated_run, "sft").stage == "sft" and capsys.readouterr().out == ""


def test_export_refuses_a_gated_out_stage_unless_forced(gated_run):
    with pytest.raises(UserError, match="stage 'dpo' failed its promote gate .*--stage sft, or pass --force"):
        run_export(ExportRequest(run=str(gated_run), stage="dpo"))
    with pytest.raises(Exception) as forced:  # past the gate, the export itself fails on the fixture's paths
        run_export(ExportRequest(run=str(gated_run), stage="dpo", force=True))
    assert "promote gate" not in str(forced.value)


def test_a_first_stage_its_gate_rejected_is_refused_without_offering_the_base(tmp_path):
    """sft worse than the base: the refusal offers --force only (the base is no stage to export), and with --force
    the reason for the card is the gate's."""
    from posttrain.export import _check_promoted
    from posttrain.runs import stage_ref

    root = tmp_path / "tiny-text"
    shutil.copytree(ASSETS, root)
    metrics = json.loads((root / "sft" / "metrics.json").read_text())
    metrics["promotion"] = {"against": "base", "gate": {"passed": False, "reason": "accuracy 1.0% vs 9.0% after base"}}
    (root / "sft" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError, match=r"failed its promote gate \(accuracy 1.0% vs 9.0% after base\);\s+pass --force"):
        _check_promoted(stage_ref(root, "sft"), force=False)
    assert _check_promoted(stage_ref(root, "sft"), force=True) == \
        "its promote gate rejected it (accuracy 1.0% vs 9.0% after base)"


def test_a_stage_trained_from_a_gated_out_stage_is_not_picked_or_exported(gated_run):
    """A re-evaluation on another eval set (or a stricter gate) stops the run at dpo: the upo left from before was
    trained from that dpo, so it is stale, and `eval`/`export`/`chat` do not pick it by default."""
    from posttrain.runs import stage_ref

    assert stage_ref(gated_run).stage == "dpo"
    with pytest.raises(UserError, match=r"stage 'upo' is stale \(trained from dpo, which its promote gate rejected"):
        run_export(ExportRequest(run=str(gated_run), stage="upo"))


def test_huge_learning_rate_is_stopped_by_the_gate(tiny_run, tiny_recipe, tmp_path, posttrain_here):
    """The real chain on the tiny recipe: SFT (12 steps) lowers the held-out loss below the random base model's, then
    DPO with learning rate 1000 blows the model up, back to about the loss of a uniform guess (ln 512 = 6.24): worse
    than SFT, so the gate stops the run with a non-zero exit and export refuses the stage. (Against the random base
    itself a blown-up model is no worse: the base is already at the uniform loss.) The run continues a copy of the
    shared tiny run, cut back to SFT and DPO, whose finished steps it skips (same inputs) and whose DPO it trains
    again (changed inputs), as a user's re-run with a stage's setting changed would."""
    raw = tiny_recipe
    raw.update(name="tiny-gate", stages={"sft": raw["stages"]["sft"],
                                         "dpo": {**raw["stages"]["dpo"], "learning_rate": 1000.0,
                                                 "gate": {"metric": "heldout_loss"}}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # the stage order is the file's
    run = tmp_path / "outputs" / "tiny-gate"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("upo"))
    result = posttrain_here("run", tmp_path / "recipe.yaml", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "sft: finished earlier with the same inputs, skipped" in result.stdout
    assert "stage 'dpo' is worse than sft and its promote gate stopped the run: heldout_loss" in result.stdout
    losses = {s: json.loads((run / s / "metrics.json").read_text())["eval"]["heldout_loss"] for s in ("base", "sft")}
    assert losses["sft"] < losses["base"], losses  # the first stage learned: there is something to lose
    gate = json.loads((run / "dpo" / "metrics.json").read_text())["promotion"]["gate"]
    assert gate["value"] > gate["previous_value"] == pytest.approx(losses["sft"]) and not gate["passed"]
    state = json.loads((run / "run.json").read_text())["steps"]["run"]
    assert state["status"] == "stopped" and state["stopped_by"] == "dpo"  # stopped by its gate, not failed
    refused = posttrain_here("export", run, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "failed its promote gate" in refused.stdout


def test_stages_trained_from_an_earlier_previous_stage_are_stale(tmp_path, capsys):
    """DPO retrained and stopped by its gate, say: the UPO folder left from before was trained from the old DPO. It
    is marked stale in the accuracy line (not compared with the new DPO) and the report, and `eval`/`export`/`chat`
    default to the last stage that is not."""
    from posttrain.runs import stage_ref, stale_stages

    root = tmp_path / "tiny-text"
    shutil.copytree(ASSETS, root)

    def lineage(step, **changes):
        path = root / step / "lineage.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    lineage("sft", inputs_hash="sft-now")
    lineage("dpo", previous_inputs_hash="sft-now", inputs_hash="dpo-now")
    lineage("upo", previous_inputs_hash="dpo-now")
    assert stale_stages(root) == {} and stage_ref(root).stage == "upo"
    assert "stale" not in accuracy_line(root)
    lineage("dpo", previous_inputs_hash="sft-before")
    assert stale_stages(root) == {"dpo": "trained from an earlier sft", "upo": "trained from an earlier dpo"}
    line = accuracy_line(root)
    assert "(stale: trained from an earlier sft) → upo" in line and line.endswith("(stale: trained from an earlier dpo)")
    assert "n.s. (stale" not in line and "), -" not in line.split(" → dpo")[1]  # no change against the line's steps
    assert stage_ref(root).stage == "sft" and stage_ref(root, "upo").stage == "upo"  # asked for by name: allowed
    build_report(root, compare=[])
    assert "stale: from before its previous stage was trained again" in (root / "report.md").read_text()
    with pytest.raises(UserError, match="stage 'upo' is stale .*pass --force"):
        run_export(ExportRequest(run=str(root), stage="upo"))
    with pytest.raises(Exception) as forced:  # past the check, the export itself fails on the fixture's paths
        run_export(ExportRequest(run=str(root), stage="upo", force=True))
    assert "stale" not in str(forced.value)
    # sft trained on another base model too: every trained stage stale, nothing current to export but the base
    lineage("base", base_hash="base-now")
    lineage("sft", base_hash="base-before")
    with pytest.raises(UserError, match=r"every trained stage is stale \(sft: trained on another base .*--stage upo "
                                        r"--force") as none_current:
        run_export(ExportRequest(run=str(root)))
    assert "unmodified base model" not in str(none_current.value)
    capsys.readouterr()
    assert stage_ref(root).stage == "base"  # what `chat` and `eval` take without --stage: said so
    warning = " ".join(capsys.readouterr().out.split())
    assert "every trained stage of" in warning and "using the base model; pass --stage upo" in warning
