"""Ablation variants: overrides applied and validated up front; variant folders reuse the shared stages."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.ablate import check_ablation, variant_recipe, variant_runs
from posttrain.errors import UserError
from posttrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny" / "text.yaml"
RUNS = ROOT / "tests" / "assets" / "runs"


def test_variants_apply_their_overrides():
    recipe = load_recipe(ROOT / "recipes" / "text" / "smollm2-135m-ablation.yaml")
    plan = check_ablation(recipe)
    stage, variants = plan.stage, plan.variants
    assert stage == "upo" and {"grpo", "upo_online", "upo_offline", "grpo_proxy", "upo_offline_proxy"} == set(variants)
    assert plan.seeds == 3 and plan.baseline == "grpo"
    grpo = variant_recipe(recipe, "grpo", variants["grpo"])
    assert grpo.name == "smollm2-135m-ablation-grpo" and grpo.stages["upo"]["upo_lambda"] == 0.0
    proxy = variant_recipe(recipe, "upo_offline_proxy", variants["upo_offline_proxy"])
    assert proxy.stages["upo"]["rewards"] == {"hackable_length": 1.0}
    assert proxy.stages["upo"]["upo_mode"] == "offline"
    assert recipe.stages["upo"]["upo_mode"] == "online", "variants must not leak into the shared recipe"


def test_bad_variant_is_reported_before_anything_runs(tmp_path):
    text = TINY.read_text().replace("grpo: {stages.upo.upo_lambda: 0.0}", "grpo: {stages.upo.upo_lamda: 0.0}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="stages.upo.upo_lamda: unknown key .*upo_lambda"):
        check_ablation(load_recipe(path))
    path.write_text(TINY.read_text().replace("  stage: upo\n", "  stage: ppo\n"))
    with pytest.raises(UserError, match="ablation.stage: 'ppo' is not a stage"):
        check_ablation(load_recipe(path))
    # a missing file too: its run would fail before writing run.json, and the comparison read the last one's
    path.write_text(TINY.read_text().replace("grpo: {stages.upo.upo_lambda: 0.0}", "grpo: {stages.upo.dataset_name: "
                                                                                  "missing.jsonl}"))
    with pytest.raises(UserError, match=r"ablation.variants.grpo: the recipe names files .*\n"
                                        r"  stages.upo.dataset_name: file not found: missing.jsonl"):
        check_ablation(load_recipe(path))


def test_seeds_and_a_subset_of_variants():
    recipe = load_recipe(TINY)
    plan = check_ablation(recipe, seeds=3, only=["upo_proxy"])
    assert list(plan.variants) == ["upo_proxy"] and plan.baseline == "upo_proxy"
    runs = variant_runs(recipe, plan)["upo_proxy"]
    assert [r.name for r in runs] == ["tiny-text-upo_proxy-seed0", "tiny-text-upo_proxy-seed1",
                                      "tiny-text-upo_proxy-seed2"]
    assert [r.stages["upo"]["seed"] for r in runs] == [0, 1, 2] and runs[0].stages["sft"]["seed"] == 0
    assert runs[2].stages["upo"]["rewards"] == {"hackable_length": 1.0}
    assert [r.name for r in variant_runs(recipe, check_ablation(recipe))["grpo"]] == ["tiny-text-grpo"]
    assert check_ablation(recipe).baseline == "grpo"  # without `baseline:`, the first variant
    raw = yaml.safe_load(TINY.read_text())
    del raw["shared"]["seed"]  # the stage then trains with TrainingArguments' seed: the first variant seed is it
    unseeded = load_recipe(TINY, raw=raw)
    assert [r.stages["upo"]["seed"] for r in variant_runs(unseeded, check_ablation(unseeded, seeds=2))["grpo"]] == [
        42, 43]
    with pytest.raises(UserError, match="--variants: 'grp' is not a variant .*did you mean grpo"):
        check_ablation(recipe, only=["grp"])
    with pytest.raises(UserError, match="ablation.seeds: 0; expected a whole number"):
        check_ablation(recipe, seeds=0)
    with pytest.raises(UserError, match="ablation.seeds: True; expected a whole number"):  # YAML's `seeds: yes`
        check_ablation(load_recipe(TINY, ["ablation.seeds=true"]))
    with pytest.raises(UserError, match="ablation.seed: unknown key .*did you mean seeds"):
        check_ablation(load_recipe(TINY, ["ablation.seed=3"]))
    with pytest.raises(UserError, match="ablation.baseline: 'upo' is not among the variants"):
        check_ablation(load_recipe(TINY, ["ablation.baseline=upo"]))
    assert check_ablation(recipe).until is None and check_ablation(recipe, until="upo").until == "upo"
    with pytest.raises(UserError, match="ablation.until: 'sft'; expected the varied stage 'upo' or one after it"):
        check_ablation(recipe, until="sft")  # before the varied stage: the variants would never run it
    with pytest.raises(UserError, match="ablation.until: 'ppo'"):
        check_ablation(load_recipe(TINY, ["ablation.until=ppo"]))
    for key in ("stage", "baseline", "until"):  # a list where a name belongs: the message, not a TypeError
        with pytest.raises(UserError, match=f"ablation.{key}: .*'upo'"):
            check_ablation(load_recipe(TINY, [f"ablation.{key}=[upo]"]))


def test_a_variant_written_as_nested_yaml_is_told_its_dotted_keys():
    """`grpo: {stages: {upo: {upo_lambda: 0.0}}}` would replace the recipe's whole `stages` (the error was about
    `data.pairs.after`, far from the mistake); the error gives the dotted keys it meant. A mapping that is one
    key's value (`stages.upo.rewards`) stays a value."""
    raw = yaml.safe_load(TINY.read_text())
    raw["ablation"]["variants"] = {"grpo": {"stages": {"upo": {"upo_lambda": 0.0}, "dpo": {"beta": 0.3}}}}
    with pytest.raises(UserError, match=r"ablation.variants.grpo: 'stages' would replace the recipe's whole stages; "
                                        r".*\{stages.upo.upo_lambda: 0.0, stages.dpo.beta: 0.3\}"):
        check_ablation(load_recipe(TINY, raw=raw))
    raw["ablation"]["variants"] = {"grpo": {"stages.upo": {"upo_lambda": 0.0}}}
    with pytest.raises(UserError, match=r"'stages.upo' would replace .*\{stages.upo.upo_lambda: 0.0\}"):
        check_ablation(load_recipe(TINY, raw=raw))
    raw["ablation"]["variants"] = {"proxy": {"stages.upo.rewards": {"hackable_length": 1.0}}}
    recipe = load_recipe(TINY, raw=raw)
    runs = variant_runs(recipe, check_ablation(recipe))
    assert runs["proxy"][0].stages["upo"]["rewards"] == {"hackable_length": 1.0}


def test_variant_overrides_are_set_as_command_line_ones():
    """A variant's `shared.K` under a `shared:` the file leaves empty sets it, as `shared.K=V` on the command line
    does (a TypeError traceback before); one under a value, not a mapping, is an error naming the variant."""
    raw = yaml.safe_load(TINY.read_text())
    raw["shared"] = None
    raw["ablation"]["variants"] = {"small": {"shared.lora_r": 4}, "lr": {"stages.upo.learning_rate.x": 1}}
    recipe = load_recipe(TINY, raw=raw)
    plan = check_ablation(recipe, only=["small"])
    assert variant_runs(recipe, plan)["small"][0].stages["upo"]["lora_r"] == 4
    with pytest.raises(UserError, match="ablation.variants.lr: override 'stages.upo.learning_rate.x': "
                                        "'learning_rate' is not a mapping"):
        check_ablation(recipe)


def test_one_key_of_a_variant_set_on_the_command_line_merges_with_its_overrides():
    """`ablation.variants.NAME.stages.upo.upo_lambda=V` sets that one override of the variant and keeps its others;
    split on every dot it made a `stages:` override that replaced the variant's whole `stages` (an error about
    `data.pairs.after`), and a new variant of one override is made the same way."""
    recipe = load_recipe(TINY, ["ablation.variants.grpo.stages.upo.upo_lambda=0.1",
                                "ablation.variants.upo_proxy.stages.upo.upo_lambda=0.2",
                                "ablation.variants.offline.stages.upo.upo_mode=offline"])
    runs = {name: r[0].stages["upo"] for name, r in variant_runs(recipe, check_ablation(recipe)).items()}
    assert runs["grpo"]["upo_lambda"] == 0.1 and runs["upo_proxy"]["upo_lambda"] == 0.2
    assert runs["upo_proxy"]["rewards"] == {"hackable_length": 1.0}, "the variant's other override was dropped"
    assert runs["offline"]["upo_mode"] == "offline" and "sft" in variant_runs(recipe, check_ablation(
        recipe, only=["offline"]))["offline"][0].stages


def test_a_variants_shared_override_the_stages_shadow_is_named(capsys):
    """`shared.learning_rate` in a variant, where every stage sets its own: the variant would train as the recipe
    does, so it is named as `shared.learning_rate=...` on the command line is."""
    recipe = load_recipe(TINY, ["ablation.variants.slow={shared.learning_rate: 1.0e-5}"])
    check_ablation(recipe, only=["slow"])
    out = " ".join(capsys.readouterr().out.split())
    assert "ablation.variants.slow: override 'shared.learning_rate: 1e-05': stage(s) sft, dpo, upo set " \
           "learning_rate themselves, so it changes nothing" in out, out


def test_a_variants_own_seed_of_the_varied_stage_is_refused_over_several_seeds(capsys):
    """Over seeds every variant's varied stage trains with the recipe's seed upwards: a variant's own
    `stages.upo.seed` was replaced without a word. Alone (one seed) it is kept; `--variants ""` names no variant (it
    ran them all)."""
    from posttrain.cli import main

    recipe = load_recipe(TINY, ["ablation.variants.seven={stages.upo.seed: 7}"])
    with pytest.raises(UserError, match=r"variants.seven: stages.upo.seed is set by the seeds \(2"):
        check_ablation(recipe, seeds=2)
    assert variant_runs(recipe, check_ablation(recipe, only=["seven"]))["seven"][0].stages["upo"]["seed"] == 7
    assert main(["ablate", str(TINY), "--variants", " , "]) == 2
    assert "--variants ' , ' names no variant" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_ablate_cli_shares_stages_and_compares(tmp_path):
    result = subprocess.run([sys.executable, "-m", "posttrain", "ablate", str(TINY)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("sft: finished earlier with the same inputs, skipped") == 2
    for variant in ("grpo", "upo_proxy"):
        metrics = json.loads((tmp_path / "outputs" / f"tiny-text-{variant}" / "upo" / "metrics.json").read_text())
        assert "proxy_reward" in metrics["eval"]
    comparison = (tmp_path / "outputs" / "tiny-text-ablation" / "comparison.md").read_text()
    assert "tiny-text-grpo" in comparison and "held-out proxy" in comparison


@pytest.mark.slow
def test_ablate_over_seeds_reports_means_and_paired_differences(tmp_path):
    result = subprocess.run([sys.executable, "-m", "posttrain", "ablate", str(TINY), "--seeds", "2"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outputs = tmp_path / "outputs"
    for variant in ("grpo", "upo_proxy"):
        seeds = [yaml.safe_load((outputs / f"tiny-text-{variant}-seed{s}" / "upo" / "resolved.yaml").read_text())
                 ["seed"] for s in (0, 1)]
        assert seeds == [0, 1]
    comparison = (outputs / "tiny-text-ablation" / "comparison.md").read_text()
    assert "## Variants over seeds" in comparison and "vs grpo" in comparison


def test_comparison_over_seeds_pairs_each_seed_with_the_baselines(tmp_path, capsys, monkeypatch):
    """Known verdicts on 20 prompts: upo beats grpo by 4 and 6 prompts on seeds 0 and 1 (a superset each time).
    Accuracy intervals are clipped to [0, 1]."""
    from posttrain.report import build_comparison

    right = {"grpo": [5, 6], "upo": [9, 12]}
    groups = {}
    for variant, counts in right.items():
        groups[variant] = []
        for seed, count in enumerate(counts):
            root = tmp_path / f"tiny-{variant}-seed{seed}"
            shutil.copytree(RUNS / "tiny-full", root)
            metrics = json.loads((root / "upo" / "metrics.json").read_text())
            verdicts = [1] * count + [0] * (20 - count)
            metrics["eval"].update(n=20, accuracy=count / 20, verdicts=verdicts, prompts_sha="same")
            (root / "upo" / "metrics.json").write_text(json.dumps(metrics))
            groups[variant].append(root)
    build_comparison([r for roots in groups.values() for r in roots], tmp_path / "out", groups=groups,
                     baseline="grpo")
    md = (tmp_path / "out" / "comparison.md").read_text()
    grpo = next(line for line in md.splitlines() if line.startswith("| **grpo** |"))
    upo = next(line for line in md.splitlines() if line.startswith("| **upo** |"))
    assert "| 2 | 27.5% | 0.0% – 59.3% | 25.0%, 30.0% |" in grpo and "| baseline |" in grpo
    # differences +20 and +30 points: a mean of +25 whose 2-seed t-interval (t = 12.7) still spans 0
    assert "| 52.5% |" in upo and "| +25.0 pts | -38.5 to +88.5 | n.s. | 1 better, 0 worse of 2 |" in upo
    from posttrain.ablate import print_summary
    from posttrain.console import console

    monkeypatch.setattr(console, "width", 80)  # a log or a small terminal: the cells are not cut to fit
    print_summary(groups, "grpo")  # the same table on the terminal at the end of `posttrain ablate`
    printed = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert "grpo 2 27.5% 0.0% – 59.3% baseline" in printed
    assert "upo 2 52.5% 0.0% – 100.0% +25.0 pts -38.5 to +88.5 n.s." in printed, printed
    print_summary({"grpo_baseline": groups["grpo"], "upo_offline_proxy": groups["upo"]}, "grpo_baseline")
    printed = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert "upo_offline_proxy 2 52.5% 0.0% – 100.0% +25.0 pts -38.5 to +88.5 n.s." in printed, printed


def finished_runs(monkeypatch, right: dict[str, int]):
    """`run_ablation` with a pipeline that leaves each variant a finished copy of the tiny run, whose held-out
    evaluation gets `right[variant]` of 20 prompts right (same prompts in every run); returns the list of runs."""
    import posttrain.ablate as ablate

    ran = []

    class FinishedPipeline:
        def __init__(self, recipe, output_root, *args, **kwargs):
            self.recipe, self.root, self.state = recipe, Path(output_root) / recipe.name, {}

        def run(self, **kwargs):
            variant = self.recipe.name.removeprefix("tiny-text-")
            if variant in right:
                ran.append(variant)
                shutil.copytree(RUNS / "tiny-full", self.root, dirs_exist_ok=True)
                metrics = json.loads((self.root / "upo" / "metrics.json").read_text())
                count = right[variant]
                metrics["eval"].update(n=20, accuracy=count / 20, verdicts=[1] * count + [0] * (20 - count),
                                       prompts_sha="same")
                (self.root / "upo" / "metrics.json").write_text(json.dumps(metrics))
            return {}

    monkeypatch.setattr(ablate, "Pipeline", FinishedPipeline)
    monkeypatch.setattr(ablate, "seed_from_shared", lambda shared, root, stages: None)
    return ran


def test_one_seed_compares_each_variant_with_the_baseline_in_the_files_too(tmp_path, monkeypatch, capsys):
    """With one seed the terminal printed each variant's difference to the baseline, comparison.md and .html did
    not; both now carry it, with the exact McNemar test on the same held-out prompts as the verdict."""
    from posttrain.ablate import run_ablation

    finished_runs(monkeypatch, {"grpo": 5, "upo_proxy": 15})
    out = run_ablation(load_recipe(TINY), tmp_path)
    printed = " ".join(capsys.readouterr().out.split())
    md = (out / "comparison.md").read_text()
    upo = [line for line in md.splitlines() if line.startswith("| **upo_proxy** |")]
    assert upo and "| +50.0 pts |   | one seed: better (McNemar p=0.002) |" in upo[0], md
    assert "vs grpo" in (out / "comparison.html").read_text()
    assert "+50.0 pts" in printed and "one seed: better (McNemar p=0.002)" in printed, printed


def test_a_subset_or_other_seeds_never_replace_the_full_comparison(tmp_path, monkeypatch):
    """`--variants upo_proxy` after the full ablation rewrote comparison.md/.html with upo_proxy alone (the full
    comparison lost); a command that runs less of the ablation or otherwise now writes a file of its own."""
    from posttrain.ablate import run_ablation

    finished_runs(monkeypatch, {"grpo": 5, "upo_proxy": 15, "grpo-seed0": 5, "grpo-seed1": 6})
    out = run_ablation(load_recipe(TINY), tmp_path)
    full = (out / "comparison.md").read_text()
    assert "| **grpo** |" in full and "| **upo_proxy** |" in full
    run_ablation(load_recipe(TINY), tmp_path, only=["upo_proxy"])
    run_ablation(load_recipe(TINY), tmp_path, seeds=2, only=["grpo"])
    assert (out / "comparison.md").read_text() == full
    assert "| **grpo** |" not in (out / "comparison-upo_proxy.md").read_text()
    assert "| **grpo** | 2 |" in (out / "comparison-grpo-seeds2.md").read_text()
    assert (out / "comparison-upo_proxy_files").is_dir() and (out / "comparison_files").is_dir()


def test_the_printed_table_names_the_stage_it_was_read_at(capsys):
    """An ablation of DPO without `until:` reads every run after UPO: the table at the end of `posttrain ablate`
    says so (it said "after the varied stage" over UPO's numbers)."""
    from posttrain.ablate import print_summary

    for stage in ("dpo", "upo"):
        print_summary({"a": [RUNS / "tiny-full"]}, "a", stage)
        assert f"held-out accuracy after {stage} (95 % t-interval" in capsys.readouterr().out


def test_training_reward_is_the_compared_stages_not_a_later_ones():
    """A run read at dpo (an ablation's `until: dpo`) whose folder also holds a upo stage (an earlier ablation ran
    it to the end): its training reward is DPO's, not UPO's."""
    from posttrain.report.compare import comparison_rows

    row = comparison_rows([RUNS / "tiny-full"], stage="dpo")[0]
    assert row["proxy"][0] == "`rewards/accuracies`" and row["proxy"][3] == "dpo", row["proxy"]
    assert comparison_rows([RUNS / "tiny-full"], stage="upo")[0]["proxy"][3] == "upo"


def test_a_stage_an_earlier_attempt_left_is_not_this_runs_result(tmp_path):
    """A variant whose run failed this time before its upo stage (its own data job) still holds the upo stage and
    run.json's `upo: done` of the last ablation: that was compared as its result. A run that ended after the stage
    read, or whose gate on that stage stopped it, is measured there."""
    from posttrain.report.compare import comparison_rows

    def ended(name, steps, **run):
        root = tmp_path / name
        shutil.copytree(RUNS / "tiny-full", root)
        state = json.loads((root / "run.json").read_text())
        state["steps"]["run"].update(run)
        for step, status in steps.items():
            state["steps"][step]["status"] = status
        (root / "run.json").write_text(json.dumps(state))
        return root

    row = comparison_rows([ended("data-failed", {"data/prefs": "failed"}, status="failed")], "upo")[0]
    assert (row["accuracy"], row["proxy"]) == (None, None), row
    assert row["where"] == "its last run failed before upo; the upo there is an earlier run's"
    assert comparison_rows([ended("upo-failed", {"upo": "failed"}, status="failed")], "dpo")[0]["accuracy"] is not None
    gate = ended("upo-gate", {}, status="stopped", stopped_by="upo")
    assert comparison_rows([gate], "upo")[0]["accuracy"] is not None


def test_a_differences_interval_is_clipped_as_accuracies_are(tmp_path):
    """Differences of +5 and +75 points on 2 seeds: the t-interval (t = 12.7) reached -405 to +485 points, past
    what a difference of two rates can be; it is clipped to ±100 points, as accuracy intervals are to [0, 1]."""
    from posttrain.report.compare import variant_summaries

    groups = {}
    for variant, counts in {"grpo": [5, 5], "upo": [6, 20]}.items():
        groups[variant] = []
        for seed, count in enumerate(counts):
            root = tmp_path / f"tiny-{variant}-seed{seed}"
            (root / "upo").mkdir(parents=True)
            shutil.copy2(RUNS / "tiny-full" / "run.json", root)
            metrics = json.loads((RUNS / "tiny-full" / "upo" / "metrics.json").read_text())
            metrics["eval"].update(n=20, accuracy=count / 20, verdicts=[1] * count + [0] * (20 - count),
                                   prompts_sha="same")
            (root / "upo" / "metrics.json").write_text(json.dumps(metrics))
            groups[variant].append(root)
    upo = variant_summaries(groups, "grpo", "upo")[1]
    assert upo["difference"] == pytest.approx(0.4) and upo["difference_interval"] == (-1.0, 1.0)
    assert upo["verdict"] == "n.s."


def test_a_variant_the_same_on_every_seed_or_with_a_seed_missing_is_not_overstated(tmp_path, capsys):
    """+20 points on both seeds: a t-interval of width 0 measures no spread, so no verdict of "better"; a variant whose
    second seed has no evaluation at the stage shows "1 of 2" seeds on the terminal, as comparison.md does."""
    from posttrain.ablate import print_summary
    from posttrain.report import build_comparison

    groups = {}
    for variant, counts in {"grpo": [5, 6], "same": [9, 10], "cut": [9, 12]}.items():
        groups[variant] = []
        for seed, count in enumerate(counts):
            root = tmp_path / f"tiny-{variant}-seed{seed}"
            shutil.copytree(RUNS / "tiny-full", root)
            metrics = json.loads((root / "upo" / "metrics.json").read_text())
            metrics["eval"].update(n=20, accuracy=count / 20, verdicts=[1] * count + [0] * (20 - count),
                                   prompts_sha="same")
            (root / "upo" / "metrics.json").write_text(json.dumps(metrics))
            groups[variant].append(root)
    shutil.rmtree(groups["cut"][1] / "upo")
    build_comparison([r for roots in groups.values() for r in roots], tmp_path / "out", groups=groups,
                     baseline="grpo")
    same = next(line for line in (tmp_path / "out" / "comparison.md").read_text().splitlines()
                if line.startswith("| **same** |"))
    assert "| +20.0 pts |   | same difference every seed: no interval |" in same, same
    print_summary(groups, "grpo")
    printed = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert any(line.startswith("cut 1 of 2 45.0%") for line in printed), printed
    assert not any(line.startswith("same") and ("better" in line or " to " in line) for line in printed), printed


SFT_ABLATION = """ablation:
  stage: sft
  until: sft
  variants:
    fast: {stages.sft.learning_rate: 1.0e-3}
    slow: {stages.sft.learning_rate: 1.0e-5}
"""


def test_ablate_until_ends_each_variant_after_that_stage(tmp_path, posttrain_here):
    """An SFT variant compared after SFT: each variant's run stops there (no DPO or UPO, and not the on-policy pairs
    that only DPO reads), and the comparison reads the SFT evaluation. The data jobs and the base evaluation run once,
    shared, also when the varied stage is the first."""
    text = TINY.read_text()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text[:text.index("ablation:")] + SFT_ABLATION)
    result = posttrain_here("ablate", recipe, cwd=tmp_path)
    assert result.stdout.count("evaluating the base model") == 1, result.stdout
    assert result.stdout.count("data: verifiable (build_verifiable_tasks)") == 1, result.stdout
    outputs = tmp_path / "outputs"
    rates = []
    for variant in ("fast", "slow"):
        root = outputs / f"tiny-text-{variant}"
        assert json.loads((root / "sft" / "metrics.json").read_text())["eval"]["n"] == 8
        assert not (root / "dpo").exists() and not (root / "upo").exists() and not (root / "data" / "pairs").exists()
        assert json.loads((root / "run.json").read_text())["steps"]["run"]["status"] == "done"
        rates.append(yaml.safe_load((root / "sft" / "resolved.yaml").read_text())["learning_rate"])
    assert rates == [1.0e-3, 1.0e-5]
    comparison = (outputs / "tiny-text-ablation" / "comparison.md").read_text()
    rows = [line for line in comparison.splitlines() if line.startswith("| **tiny-text-")]
    assert len(rows) == 2 and all("| sft |" in row for row in rows), comparison


def make_step(folder: Path, inputs_hash: str, adapter: bytes = b"weights") -> Path:
    """A finished step as the pipeline leaves it, small: its lineage and an adapter file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lineage.json").write_text(json.dumps({"inputs_hash": inputs_hash}))
    (folder / "adapter_model.safetensors").write_bytes(adapter)
    return folder


def make_data(data: Path, name: str, stamp: str, rows: str = "rows") -> None:
    """A data job's output folder and the `.inputs` stamp beside it (`Pipeline.build_data`)."""
    (data / name).mkdir(parents=True, exist_ok=True)
    (data / name / "train.parquet").write_text(rows)
    (data / f"{name}.inputs").write_text(stamp)


def test_retrained_shared_stage_replaces_the_variants_old_copy(tmp_path):
    """The shared sft and data trained again with other inputs: each variant gets the new ones (else it trains its
    own sft, and the variants no longer share one), and keeps the data jobs only it has."""
    from posttrain.ablate import seed_from_shared

    shared, variant = tmp_path / "abl", tmp_path / "abl-grpo"
    make_step(shared / "base", "base-1")
    make_step(shared / "sft", "sft-1", b"old sft")
    make_data(shared / "data", "sft_mix", "mix-1", "old rows")
    seed_from_shared(shared, variant, ["sft"])
    make_data(variant / "data", "extra", "extra-1")  # a data job of the variant's own
    make_step(shared / "sft", "sft-2", b"new sft")
    make_data(shared / "data", "sft_mix", "mix-2", "new rows")
    seed_from_shared(shared, variant, ["sft"])
    assert json.loads((variant / "sft" / "lineage.json").read_text())["inputs_hash"] == "sft-2"
    assert (variant / "sft" / "adapter_model.safetensors").read_bytes() == b"new sft"
    assert (variant / "data" / "sft_mix.inputs").read_text() == "mix-2"
    assert (variant / "data" / "sft_mix" / "train.parquet").read_text() == "new rows"
    assert (variant / "data" / "extra" / "train.parquet").is_file()
    assert not [p.name for p in variant.rglob(".*")], "temporary copies left behind"


def test_incomplete_copy_is_replaced(tmp_path, monkeypatch):
    """A copy killed part-way: one made in place (lineage copied, adapter not) is completed on the next run; one
    killed now leaves the old copy under the final name, never half of the new one."""
    import posttrain.ablate as ablate

    shared, variant = tmp_path / "abl", tmp_path / "abl-grpo"
    make_step(shared / "base", "base-1")
    make_step(shared / "sft", "sft-1")
    make_data(shared / "data", "sft_mix", "mix-1")
    (variant / "sft").mkdir(parents=True)
    shutil.copy2(shared / "sft" / "lineage.json", variant / "sft")
    (variant / "data").mkdir()
    shutil.copy2(shared / "data" / "sft_mix.inputs", variant / "data")
    ablate.seed_from_shared(shared, variant, ["sft"])
    assert (variant / "sft" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (variant / "data" / "sft_mix" / "train.parquet").is_file()

    make_step(shared / "sft", "sft-2", b"new sft")

    def killed(source, target, **kwargs):
        shutil.copy2(Path(source) / "lineage.json", target)
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.shutil, "copytree", killed)
    with pytest.raises(KeyboardInterrupt):
        ablate.seed_from_shared(shared, variant, ["sft"])
    monkeypatch.undo()
    assert json.loads((variant / "sft" / "lineage.json").read_text())["inputs_hash"] == "sft-1"
    ablate.seed_from_shared(shared, variant, ["sft"])
    assert (variant / "sft" / "adapter_model.safetensors").read_bytes() == b"new sft"


def test_data_the_variant_built_itself_is_kept(tmp_path):
    """A variant that overrides a data job rebuilds it in its own folder: a resumed ablation leaves that alone (the
    variant's pipeline decides), rather than copying the shared one over it to be rebuilt again."""
    from posttrain.ablate import seed_from_shared

    shared, variant = tmp_path / "abl", tmp_path / "abl-more"
    make_step(shared / "base", "base-1")
    make_data(shared / "data", "sft_mix", "mix-1", "shared rows")
    seed_from_shared(shared, variant, [])
    make_data(variant / "data", "sft_mix", "mix-variant", "variant rows")  # what its pipeline rebuilt
    seed_from_shared(shared, variant, [])
    assert (variant / "data" / "sft_mix.inputs").read_text() == "mix-variant"
    assert (variant / "data" / "sft_mix" / "train.parquet").read_text() == "variant rows"


def test_a_failed_variant_does_not_cost_the_others(tmp_path, monkeypatch):
    """A variant whose stage crashes: the variants after it still run, the comparison is written with all of them,
    and the ablation ends with an error naming the failed run (exit status 2)."""
    import posttrain.ablate as ablate
    import posttrain.report as report

    ran, compared = [], {}

    class FakePipeline:
        def __init__(self, recipe, output_root, *args, **kwargs):
            self.recipe, self.root, self.state = recipe, Path(output_root) / recipe.name, {}

        def run(self, **kwargs):
            ran.append(self.recipe.name)
            if self.recipe.name.endswith("-grpo"):
                self.state = {"steps": {"run": {"status": "failed"}}}
                raise UserError("step 'upo' failed: it ended with ValueError")
            return {}

    monkeypatch.setattr(ablate, "Pipeline", FakePipeline)
    monkeypatch.setattr(ablate, "seed_from_shared", lambda *args: None)
    monkeypatch.setattr(ablate, "print_summary", lambda *args: None)
    monkeypatch.setattr(report, "build_comparison", lambda runs, out, **kw: compared.update(runs=runs))
    with pytest.raises(UserError, match="(?s)1 variant run.* failed.*tiny-text-grpo: step 'upo' failed"):
        ablate.run_ablation(load_recipe(TINY), tmp_path)
    assert ran == ["tiny-text", "tiny-text-grpo", "tiny-text-upo_proxy"]
    assert [Path(r).name for r in compared["runs"]] == ["tiny-text-grpo", "tiny-text-upo_proxy"]


def test_a_variant_a_promote_gate_stopped_is_a_result_not_a_failure(tmp_path, monkeypatch):
    """A gate that stops a variant's chain measured it worse: the ablation compares it with the others and ends
    without an error."""
    import posttrain.ablate as ablate
    import posttrain.report as report

    class FakePipeline:
        def __init__(self, recipe, output_root, *args, **kwargs):
            self.recipe, self.root, self.state = recipe, Path(output_root) / recipe.name, {}

        def run(self, **kwargs):
            if self.recipe.name.endswith("-grpo"):
                self.state = {"steps": {"run": {"status": "stopped"}}}
                raise UserError("upo: held-out accuracy dropped; the promote gate stopped the chain")
            return {}

    compared = {}
    monkeypatch.setattr(ablate, "Pipeline", FakePipeline)
    monkeypatch.setattr(ablate, "seed_from_shared", lambda *args: None)
    monkeypatch.setattr(ablate, "print_summary", lambda *args: None)
    monkeypatch.setattr(report, "build_comparison", lambda runs, out, **kw: compared.update(runs=runs))
    assert ablate.run_ablation(load_recipe(TINY), tmp_path) == tmp_path.resolve() / "tiny-text-ablation"
    assert [Path(r).name for r in compared["runs"]] == ["tiny-text-grpo", "tiny-text-upo_proxy"]


def test_a_variant_folder_another_run_holds_is_not_written_into(tmp_path, monkeypatch):
    """The shared stages are copied into a variant's folder under that folder's lock: another ablation (other shared
    settings) replaced the DPO stage a running variant was training from, before its own run was refused."""
    import posttrain.ablate as ablate
    from posttrain.runlock import RunLock

    seeded = []

    class FakePipeline:
        def __init__(self, recipe, output_root, *args, **kwargs):
            self.recipe, self.root, self.state = recipe, Path(output_root) / recipe.name, {}

        def run(self, **kwargs):
            return {}

    monkeypatch.setattr(ablate, "Pipeline", FakePipeline)
    monkeypatch.setattr(ablate, "seed_from_shared", lambda shared, root, stages: seeded.append(root.name))
    held = RunLock(tmp_path / "tiny-text-grpo").acquire()
    try:
        with pytest.raises(UserError, match="tiny-text-grpo is in use by another posttrain run"):
            ablate.run_ablation(load_recipe(TINY), tmp_path)
    finally:
        held.release()
    assert seeded == []


def test_an_unknown_baseline_says_how_to_name_another():
    """The baseline is set with `ablation.baseline=NAME` (there is no `--baseline`); a subset that leaves out the
    recipe's baseline may also name it in --variants."""
    with pytest.raises(UserError, match="'upo' is not among .* name one of them with ablation.baseline=NAME on the "
                                        "command line"):
        check_ablation(load_recipe(TINY, ["ablation.baseline=upo"]))
    with pytest.raises(UserError, match=r"'grpo' is not among the variants run \(upo_proxy\); add it to --variants, "
                                        "or name one of them with ablation.baseline=NAME"):
        check_ablation(load_recipe(TINY, ["ablation.baseline=grpo"]), only=["upo_proxy"])
