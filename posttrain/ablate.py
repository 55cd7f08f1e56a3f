"""`posttrain ablate RECIPE`: run variants of one stage on shared earlier stages, then compare them in one report.

A recipe's `ablation:` section names the stage that varies and the variants, each a mapping of overrides:

    ablation:
      stage: upo
      variants:
        grpo: {stages.upo.upo_lambda: 0.0}
        upo_online: {}
        grpo_proxy: {stages.upo.upo_lambda: 0.0, stages.upo.rewards: {hackable_length: 1.0}}

The stages before `stage` run once, in `outputs/<name>/`. Each variant is a run folder `outputs/<name>-<variant>/`
that starts as a copy of the shared one (step hashes ignore the folder's location, so the copied stages count as
finished) and runs the varied stage with its overrides. `outputs/<name>-ablation/comparison.html` then shows held-out
(true) accuracy next to the training reward (the proxy) of every variant, so a reward-hacking claim is measured.
"""

import copy
import shutil
from pathlib import Path

from .console import console
from .errors import UserError
from .pipeline import Pipeline, run_dir
from .recipe import Recipe, load_recipe

SHARED = ("data", "base")  # plus the stages before the varied one


def variant_recipe(recipe: Recipe, variant: str, overrides: dict) -> Recipe:
    """The recipe with one variant's overrides applied and its own run name, validated like any recipe."""
    raw = copy.deepcopy(recipe.raw)
    raw.pop("ablation")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, key = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    raw["name"] = f"{recipe.name}-{variant}"
    return load_recipe(recipe.path, raw=raw)


def check_ablation(recipe: Recipe) -> tuple[str, dict]:
    spec = recipe.raw.get("ablation")
    where = f"{recipe.path}: ablation"
    if not isinstance(spec, dict) or not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise UserError(f"{where}: expected {{stage: <stage>, variants: {{name: {{overrides}}, ...}}}}")
    stage = spec.get("stage")
    if stage not in recipe.stages:
        raise UserError(f"{where}.stage: '{stage}' is not a stage of this recipe ({', '.join(recipe.stages)})")
    for name, overrides in spec["variants"].items():
        if overrides is not None and not isinstance(overrides, dict):
            raise UserError(f"{where}.variants.{name}: expected a mapping of overrides (section.key: value)")
        variant_recipe(recipe, name, overrides)  # validates every variant before anything runs
    return stage, spec["variants"]


def run_ablation(recipe: Recipe, output_root: str | Path = "outputs", accelerate_config: str | None = None,
                 num_processes: int | None = None) -> Path:
    stage, variants = check_ablation(recipe)
    order = list(recipe.stages)
    shared = Pipeline(recipe, output_root, accelerate_config, num_processes)
    if order.index(stage) > 0:
        console.rule(f"ablation: shared stages {' → '.join(order[:order.index(stage)])}")
        shared.run(only=None, start=None, stop_before=stage)
    roots = []
    for name, overrides in variants.items():
        console.rule(f"ablation variant: {name}")
        variant = variant_recipe(recipe, name, overrides)
        root = run_dir(variant, output_root).resolve()
        seed_from_shared(shared.root, root, order[:order.index(stage)])
        # one tracking project for the whole ablation: the variants' runs side by side in one dashboard
        Pipeline(variant, output_root, accelerate_config, num_processes, project=recipe.name).run()
        roots.append(root)
    from .report import build_comparison

    out = Path(output_root).resolve() / f"{recipe.name}-ablation"
    build_comparison(roots, out)
    console.print(f"ablation comparison: {out / 'comparison.html'}")
    return out


def seed_from_shared(shared: Path, root: Path, stages: list[str]) -> None:
    """Copy the shared run's finished steps into a variant folder that does not have them yet."""
    root.mkdir(parents=True, exist_ok=True)
    for name in (*SHARED, *stages):
        source, target = shared / name, root / name
        if target.exists() or not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
