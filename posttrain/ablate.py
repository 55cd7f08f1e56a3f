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

One seed is one draw: on a few hundred held-out prompts, variants a few points apart are often ranked by luck.
`seeds: N` in the section (or `posttrain ablate --seeds N`) runs every variant N times, the varied stage's `seed`
going from the recipe's upwards (folders `outputs/<name>-<variant>-seed<k>/`; the shared stages still run once, so
the spread is the varied stage's). The comparison then gives each variant's mean held-out accuracy with a 95 %
t-interval over seeds, and its paired difference to the `baseline:` variant (default: the first), seed by seed on the
same prompts. `--variants a,b` runs a subset (e.g. a shorter check), with the usual KEY=VALUE overrides;
`ablation.variants.grpo.stages.upo.upo_lambda=0.1` sets one override of one variant, keeping its others.

`until: <stage>` (or `--until`) ends every variant's run after that stage, and the comparison reads it there: an
SFT data variant, say, compared after SFT over several seeds without paying for the stages after it each time.

A command that runs less of the section or otherwise (`--variants`, `--seeds`, `--until`) writes its comparison to
a file of its own beside `comparison.html` (`comparison_stem`), so that it never replaces the full comparison.
Finished variants named in `--variants` are skipped, so naming them with a new one compares them all.
"""

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .console import console
from .errors import UserError
from .io import read_json, replace_dir, write_json, write_text
from .pipeline import Pipeline, run_dir
from .recipe import Recipe, load_recipe
from .recipe_files import check_recipe_files
from .recipe_yaml import set_dotted, warn_shadowed
from .runlock import RunLock
from .typecheck import suggest

SEEDED = "seeded.json"  # in a variant folder: what seed_from_shared copied into it, step -> stamp


def variant_recipe(recipe: Recipe, variant: str, overrides: dict) -> Recipe:
    """The recipe with one variant's overrides applied and its own run name, validated like any recipe."""
    raw = copy.deepcopy(recipe.raw)
    raw.pop("ablation")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value, f"{recipe.path}: ablation.variants.{variant}: override '{dotted}'")
    raw["name"] = f"{recipe.name}-{variant}"
    return load_recipe(recipe.path, raw=raw)


ABLATION_KEYS = ("stage", "variants", "seeds", "baseline", "until")
DEFAULT_SEED = 42  # TrainingArguments' own default, when the recipe sets none


@dataclass
class Ablation:
    """A checked `ablation:` section: the varied stage, the variants (name -> overrides), seeds per variant, the
    variant the others are compared with, and the last stage each variant runs (None: the recipe's last)."""

    stage: str
    variants: dict[str, dict]
    seeds: int = 1
    baseline: str | None = None
    until: str | None = None


SECTION_DEPTH = {"stages": 3, "data": 3, "shared": 2, "eval": 2, "base": 2}  # the dotted path of one key there


def check_whole_section(keys: list[str], value, where: str) -> None:
    """A variant's override written as nested YAML (`stages: {upo: {upo_lambda: 0.0}}`) would replace the whole
    section or stage, and the recipe then fails on what went missing (`data.pairs.after: 'sft' is not a stage`): say
    so, with the dotted keys it meant. A mapping one key holds (`stages.upo.rewards: {...}`) is a value, as it should."""
    depth = SECTION_DEPTH.get(keys[0])
    if depth is None or len(keys) >= depth or not isinstance(value, dict):
        return

    def dotted(path: list[str], node) -> list[str]:
        if len(path) < depth and isinstance(node, dict) and node:
            return [line for key, child in node.items() for line in dotted([*path, str(key)], child)]
        return [f"{'.'.join(path)}: {json.dumps(node)}"]

    raise UserError(f"{where}: '{'.'.join(keys)}' would replace the recipe's whole {'.'.join(keys)}; a variant sets "
                    f"keys one by one, each by its dotted path: {{{', '.join(dotted(keys, value))}}}")


def check_ablation(recipe: Recipe, seeds: int | None = None, only: list[str] | None = None,
                   until: str | None = None) -> Ablation:
    """Validate the recipe's `ablation:` section and every variant before anything runs; `seeds`, `only` (a
    subset of the variants) and `until` come from the command line and win over the recipe."""
    spec = recipe.raw.get("ablation")
    where = f"{recipe.path}: ablation"
    if not isinstance(spec, dict) or not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise UserError(f"{where}: expected {{stage: <stage>, variants: {{name: {{overrides}}, ...}}}}")
    for key in spec:
        if key not in ABLATION_KEYS:
            raise UserError(f"{where}.{key}: unknown key{suggest(key, ABLATION_KEYS)}; expected "
                            f"{', '.join(ABLATION_KEYS)}")
    stage = spec.get("stage")
    if not isinstance(stage, str) or stage not in recipe.stages:
        raise UserError(f"{where}.stage: '{stage}' is not a stage of this recipe ({', '.join(recipe.stages)})")
    variants = spec["variants"]
    for name in only or []:
        if name not in variants:
            raise UserError(f"--variants: '{name}' is not a variant of {recipe.path}{suggest(name, variants)} "
                            f"(variants: {', '.join(variants)})")
    variants = {k: v or {} for k, v in variants.items() if not only or k in only}
    for name, overrides in variants.items():
        if not isinstance(overrides, dict):
            raise UserError(f"{where}.variants.{name}: expected a mapping of overrides (section.key: value)")
        for dotted, value in overrides.items():  # as for `shared.K=V` on the command line: a variant that varies
            keys = str(dotted).split(".")        # nothing costs a whole run per seed
            check_whole_section(keys, value, f"{where}.variants.{name}")
            if keys[0] == "shared" and len(keys) == 2:
                warn_shadowed(recipe.raw, keys[1], f"{dotted}: {value}", f"{where}.variants.{name}")
        try:  # every variant validated before anything runs, its files too: a variant stopped there by its
            # run would leave the run.json of its last ablation, and the comparison would read that one's results
            check_recipe_files(variant_recipe(recipe, name, overrides))
        except UserError as exc:
            raise UserError(f"{where}.variants.{name}: {str(exc).removeprefix(f'{recipe.path}: ')}") from None
    seeds = spec.get("seeds", 1) if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UserError(f"{where}.seeds: {seeds!r}; expected a whole number of seeds per variant, 1 or more")
    own_seed = next((name for name, overrides in variants.items() if f"stages.{stage}.seed" in overrides), None)
    if seeds > 1 and own_seed:  # replaced by each run's seed (`variant_runs`), without a word
        raise UserError(f"{where}.variants.{own_seed}: stages.{stage}.seed is set by the seeds ({seeds}: the recipe's "
                        "seed upwards, the same in every variant, so their runs pair up seed by seed); leave it out")
    baseline = spec.get("baseline") or next(iter(variants))
    if not isinstance(baseline, str) or baseline not in variants:
        subset = only and isinstance(baseline, str) and baseline in spec["variants"]
        raise UserError(f"{where}.baseline: '{baseline}' is not among the variants run ({', '.join(variants)}); "
                        f"{'add it to --variants, or ' if subset else ''}name one of them with ablation.baseline=NAME "
                        "on the command line (or `baseline:` in the recipe's ablation section)")
    until = until or spec.get("until")
    order = list(recipe.stages)
    if until is not None and (not isinstance(until, str) or until not in order
                              or order.index(until) < order.index(stage)):
        raise UserError(f"{where}.until: '{until}'; expected the varied stage '{stage}' or one after it "
                        f"({', '.join(order[order.index(stage):])})")
    return Ablation(stage, variants, seeds, baseline, until)


def variant_runs(recipe: Recipe, plan: Ablation) -> dict[str, list[Recipe]]:
    """variant -> its recipes, one per seed (with one seed, the variant's recipe as is)."""
    if plan.seeds == 1:
        return {name: [variant_recipe(recipe, name, overrides)] for name, overrides in plan.variants.items()}
    first = recipe.stages[plan.stage].get("seed", DEFAULT_SEED)
    runs = {}
    for name, overrides in plan.variants.items():
        runs[name] = []
        for seed in range(first, first + plan.seeds):
            variant = variant_recipe(recipe, f"{name}-seed{seed}", {**overrides, f"stages.{plan.stage}.seed": seed})
            runs[name].append(variant)
    return runs


def run_ablation(recipe: Recipe, output_root: str | Path = "outputs", accelerate_config: str | None = None,
                 num_processes: int | None = None, seeds: int | None = None, only: list[str] | None = None,
                 until: str | None = None) -> Path:
    plan = check_ablation(recipe, seeds, only, until)
    order = list(recipe.stages)
    shared = Pipeline(recipe, output_root, accelerate_config, num_processes)
    # the data jobs and the base evaluation are shared too, also when the first stage is the varied one
    console.rule(f"ablation: shared {' → '.join(['data', 'base', *order[:order.index(plan.stage)]])}")
    shared.run(only=None, start=None, stop_before=plan.stage)
    groups, failed = {}, []
    for name, variants in variant_runs(recipe, plan).items():
        groups[name] = []
        for variant in variants:
            console.rule(f"ablation variant: {variant.name.removeprefix(recipe.name + '-')}")
            root = run_dir(variant, output_root).resolve()
            # under the variant's lock: another ablation's variant run may be training in that folder right now
            lock = RunLock(root).acquire(say=lambda text: console.print(f"[yellow]{text}[/yellow]"))
            try:
                seed_from_shared(shared.root, root, order[:order.index(plan.stage)])
            finally:
                lock.release()
            # one tracking project for the whole ablation: the variants' runs side by side in one dashboard
            pipeline = Pipeline(variant, output_root, accelerate_config, num_processes, project=recipe.name)
            try:
                pipeline.run(until=plan.until)
            except UserError as exc:  # a variant its promote gate stopped is a result to compare, not a crash
                if pipeline.state.get("steps", {}).get("run", {}).get("status") == "stopped":
                    console.print(f"[yellow]{variant.name}: stopped by a promote gate[/yellow] ({escape(str(exc))})")
                else:  # one failed run (a crash, out of memory) must not cost the other variants and the comparison
                    console.print(f"[red]{variant.name} failed[/red]: {escape(str(exc))}")
                    failed.append(f"{variant.name}: {exc}")
            groups[name].append(root)
    from .report import build_comparison

    out = Path(output_root).resolve() / f"{recipe.name}-ablation"
    at = plan.until or list(recipe.stages)[-1]  # every run read there: a seed a gate stopped earlier is not measured
    # with one seed too: the paired difference to the baseline on the same prompts is measured (McNemar)
    html = build_comparison([root for roots in groups.values() for root in roots], out, groups=groups,
                            baseline=plan.baseline, stage=at, stem=comparison_stem(recipe, plan))
    print_summary(groups, plan.baseline, at)
    console.print(f"ablation comparison: {html}")
    if failed:  # the exit status says the ablation is incomplete; the comparison marks these runs "failed"
        raise UserError(f"{len(failed)} variant run(s) failed; the comparison has the others. Fix them and run the "
                        "same command again (finished runs are skipped):\n  " + "\n  ".join(failed))
    return out


def comparison_stem(recipe: Recipe, plan: Ablation) -> str:
    """`comparison` for the recipe's own ablation; a command that runs less of it or otherwise (a subset of the
    variants, other seeds, another `until`) writes its own file beside it, named after what it changed
    (`comparison-grpo+upo_proxy-seeds1`), so that a shorter check never replaces the full comparison."""
    spec = recipe.raw["ablation"]
    changed = ["+".join(plan.variants)] if len(plan.variants) < len(spec["variants"]) else []
    if plan.seeds != spec.get("seeds", 1):
        changed.append(f"seeds{plan.seeds}")
    if plan.until != spec.get("until"):
        changed.append(f"until-{plan.until}")
    return "-".join(["comparison", *changed])


def print_summary(groups: dict[str, list[Path]], baseline: str, stage: str | None = None) -> None:
    """The comparison's first table on the terminal: each variant's held-out accuracy over its seeds and its paired
    difference to the baseline (the report's `variant_summaries`)."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from .report.compare import variant_summaries

    summaries = variant_summaries(groups, baseline, stage)
    # the stage every run is read at: the varied one only when nothing runs after it (else `until`, or the last)
    read = summaries[0]["stage"] if summaries else stage
    table = Table(title=f"held-out accuracy after {read} (95 % t-interval over seeds)")
    for column in ("variant", "seeds", "mean", "interval", f"vs {baseline}", "its interval", "verdict"):
        table.add_column(column, justify="left" if column in ("variant", "verdict") else "right",
                         no_wrap=column != "verdict")
    for v in summaries:
        low, high = v["interval"]
        measured, missing = len(v["accuracies"]), len(v["missing"])  # a seed a gate stopped is not measured
        cells = [v["name"], f"{measured} of {measured + missing}" if missing else str(measured),
                 f"{v['mean']:.1%}" if v["accuracies"] else "not measured",
                 f"{low:.1%} – {high:.1%}" if len(v["accuracies"]) > 1 else ""]
        if v["baseline"]:
            table.add_row(*cells, "baseline", "", "")
            continue
        d_low, d_high = v["difference_interval"]
        spread = d_high > d_low  # not with one seed (no interval) nor the same difference on every seed (width 0)
        table.add_row(*cells, f"{100 * v['difference']:+.1f} pts" if v["differences"] else "not measured",
                      f"{100 * d_low:+.1f} to {100 * d_high:+.1f}" if spread else "", v["verdict"])
    # at the table's own width: squeezed into 80 columns (a log, a small terminal) rich cuts the means to "51…" and
    # drops the verdict column, the results themselves
    width = Measurement.get(console, console.options.update_width(1000), table).maximum
    Console(file=console.file, width=max(console.width, width), highlight=False).print(table)


def seed_from_shared(shared: Path, root: Path, stages: list[str]) -> None:
    """Copy the shared run's finished steps (base, each data folder, `stages`) into a variant folder.

    A copy is replaced when the shared step was built again from other inputs (else the variant would train its
    "shared" sft itself, and the variants would no longer pair) or when it is incomplete (a copy killed part-way).
    A step the variant built itself (a data override, say) is left to the variant's pipeline: `seeded.json` says
    what was copied, so that a resumed ablation does not rebuild every variant's own data again."""
    root.mkdir(parents=True, exist_ok=True)
    seeded = read_json(root / SEEDED)
    names = ["base", *stages]
    if (shared / "data").is_dir():  # each data folder on its own: a variant may add data jobs of its own
        names += [f"data/{p.name}" for p in sorted((shared / "data").iterdir())
                  if p.is_dir() and not p.name.startswith(".")]  # not another writer's temporary folder
    for name in names:
        source, target = shared / name, root / name
        stamp, have = _stamp(source), _stamp(target)
        # not what was copied last (a folder without a record is taken for an older version's copy)
        own = target.exists() and have != stamp and seeded.get(name, have) != have
        if not source.is_dir() or own:
            continue
        if have != stamp or not _complete(source, target):
            # built aside and renamed into place: a kill leaves the old copy or the new one, never half of one
            replace_dir(target, lambda tmp, source=source: shutil.copytree(source, tmp, dirs_exist_ok=True))
            if source.with_suffix(".inputs").is_file():  # after the folder: a kill in between copies it again
                write_text(target.with_suffix(".inputs"), stamp)
        seeded[name] = stamp
    write_json(root / SEEDED, seeded)


def _stamp(folder: Path) -> str | None:
    """What a step was built from: a data folder's `.inputs` file beside it (`Pipeline.build_data`), else its
    lineage's `inputs_hash` (base, stages); None when it has neither."""
    inputs = folder.with_suffix(".inputs")
    return inputs.read_text() if inputs.is_file() else read_json(folder / "lineage.json").get("inputs_hash")


def _complete(source: Path, target: Path) -> bool:
    """Whether `target` has every file of `source` (a copy made in place before copies were atomic, and killed,
    has its lineage but not its adapter)."""
    have = {p.relative_to(target) for p in target.rglob("*")}
    return all(p.relative_to(source) in have for p in source.rglob("*"))
