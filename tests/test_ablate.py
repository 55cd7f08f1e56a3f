"""Ablation variants: overrides applied and validated up front; variant folders reuse the shared stages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.ablate import check_ablation, variant_recipe
from posttrain.errors import UserError
from posttrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny" / "text.yaml"


def test_variants_apply_their_overrides():
    recipe = load_recipe(ROOT / "recipes" / "text" / "smollm2-135m-ablation.yaml")
    stage, variants = check_ablation(recipe)
    assert stage == "upo" and {"grpo", "upo_online", "upo_offline", "grpo_proxy", "upo_offline_proxy"} == set(variants)
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
