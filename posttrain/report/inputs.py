"""Step 2 of the report, continued: a `RunView` -> the blocks about its inputs: the recipe and lineage of every stage,
and the data cards of its datasets."""

from ..runs import MACHINE_PATH_KEYS
from .blocks import NOT_MEASURED, Cell, Code, Details, Image, Para, Table, fmt, heading, status_cell
from .load import DataCardView, RunView, relative


def short(fingerprint: str | None, n: int = 16) -> str:
    return f"`{fingerprint[:n]}…`" if fingerprint and len(fingerprint) > n else f"`{fingerprint}`" if fingerprint \
        else "not recorded"


# --------------------------------------------------------------------------------------------------------- lineage
def lineage(run: RunView) -> list:
    blocks = [heading("Recipe and lineage")]
    recorded = [s for s in run.stages if s.lineage]
    if not recorded:
        return blocks + [Para("No stage has written its lineage yet: not recorded.", "warning")]
    recipe = run.state.get("recipe")
    fingerprints = {s.lineage.get("recipe_fingerprint") for s in recorded} - {None}
    note = (f", fingerprint `{fingerprints.pop()}`." if len(fingerprints) == 1 else
            ": the stages were run from different versions of it (see their recipe fingerprints)." if fingerprints
            else ".")
    blocks.append(Para(f"Recipe `{recipe or 'not recorded'}`{note}"))
    if run.recipe_yaml:
        blocks.append(Details("the recipe as run (recipe.yaml, overrides applied)", [Code(run.recipe_yaml)]))
    blocks += [heading("Base model", 3), base_model_table(run)]
    blocks += [heading("Stages", 3), stages_table(run)]
    blocks += [heading("Datasets", 3), datasets_table(run)]
    blocks += [heading("Software", 3), versions_table(run)]
    params = hyperparameters_table(run)
    if params:
        blocks.append(Details("resolved arguments of every stage (resolved.yaml)", [params]))
    return blocks


def base_model_table(run: RunView) -> Table:
    info = next((s.lineage["base_model"] for s in run.stages if isinstance(s.lineage.get("base_model"), dict)), None)
    base = run.stage("base")
    rows = [[k.replace("_", " "), Cell(", ".join(map(str, v)) if isinstance(v, list) else str(v),
                                       "mono" if k == "path" else "")] for k, v in (info or {}).items()]
    if not info and base and base.lineage.get("base_model"):
        rows = [["path", Cell(str(base.lineage["base_model"]), "mono")]]
    return Table(["field", "value"], rows or [["base model", NOT_MEASURED]])


def stages_table(run: RunView) -> Table:
    rows = []
    for stage in run.stages:
        lin = stage.lineage
        commit = lin.get("git_commit")
        starts_from = lin.get("previous_stage") or ("base model" if stage.name != "base" and lin else "")
        rows.append([f"**{stage.name}**", status_cell(stage.status), starts_from,
                     Cell(lin.get("inputs_hash", "not recorded"), "mono"),
                     Cell(lin.get("recipe_fingerprint", ""), "mono"),
                     Cell(commit[:12] if commit else "not recorded", "mono"), lin.get("device", "not recorded")])
    return Table(["stage", "status", "starts from", "inputs hash", "recipe fingerprint", "git commit", "device"], rows,
                 "A re-run skips a finished stage whose inputs hash is unchanged.")


def datasets_table(run: RunView) -> Table:
    rows = []
    cards = {f"data/{name}": view.card for name, view in run.cards.items()}
    for stage in run.stages:
        for key, info in (stage.lineage.get("datasets") or {}).items():
            path = relative(info.get("path"), run.root)
            card = cards.get(path)
            check = ""
            if card and card.get("fingerprint"):
                same = card["fingerprint"] == info.get("fingerprint")
                check = Cell("matches data card" if same else "differs from the current data card",
                             "ok" if same else "bad")
            rows.append([stage.name, f"`{key}`", f"`{path}`", short(info.get("fingerprint")), check])
        eval_path = stage.resolved.get("eval_dataset")
        if eval_path:
            rows.append([stage.name, "`eval_dataset`", f"`{relative(eval_path, run.root)}`",
                         f"split `{stage.resolved.get('eval_split', 'test')}`", ""])
    return Table(["stage", "argument", "path", "fingerprint", "check"], rows or [["", "", NOT_MEASURED, "", ""]])


def versions_table(run: RunView) -> Table:
    recorded = [s for s in run.stages if s.lineage.get("versions")]
    packages = list(dict.fromkeys(p for s in recorded for p in s.lineage["versions"]))
    same = all(s.lineage["versions"] == recorded[0].lineage["versions"] for s in recorded)
    if same and recorded:
        return Table(["package", "version (all stages)"],
                     [[p, Cell(str(recorded[0].lineage["versions"][p]), "mono")] for p in packages])
    return Table(["package"] + [s.name for s in recorded],
                 [[p] + [Cell(str(s.lineage["versions"].get(p, "—")), "mono") for s in recorded] for p in packages],
                 "Stages ran with different package versions.")


def hyperparameters_table(run: RunView) -> Table | None:
    stages = [s for s in run.stages if s.resolved]
    if not stages:
        return None
    keys = list(dict.fromkeys(k for s in stages for k in s.resolved if k not in MACHINE_PATH_KEYS))
    rows = []
    for key in keys:
        values = [s.resolved.get(key) for s in stages]
        shown = [relative(v, run.root) if isinstance(v, str) and v.startswith("/") else v for v in values]
        rows.append([f"`{key}`"] + [Cell("—", "missing") if key not in s.resolved else Cell(fmt(v), "mono", True)
                                    for s, v in zip(stages, shown)])  # recipe strings: shown as written
    return Table(["argument"] + [s.name for s in stages], rows, "Paths are relative to the run folder.")


# --------------------------------------------------------------------------------------------------------- data
def data_cards(run: RunView) -> list:
    blocks = [heading("Data")]
    if not run.cards:
        return blocks + [Para("No data card in `data/`: the run's datasets are not described here.", "warning")]
    users = _dataset_users(run)
    for name, view in run.cards.items():
        blocks += _card(name, view, users.get(f"data/{name}", ""))
    return blocks


def _dataset_users(run: RunView) -> dict[str, str]:
    """`data/<name>` -> "training: sft (`dataset_name`); held-out evaluation: sft, dpo"."""
    train: dict[str, list[str]] = {}
    held_out: dict[str, list[str]] = {}
    for stage in run.stages:
        for key, info in (stage.lineage.get("datasets") or {}).items():
            train.setdefault(relative(info.get("path"), run.root), []).append(f"{stage.name} (`{key}`)")
        if stage.resolved.get("eval_dataset"):
            held_out.setdefault(relative(stage.resolved["eval_dataset"], run.root), []).append(stage.name)
    return {path: "; ".join(([f"training: {', '.join(train[path])}"] if path in train else []) +
                            ([f"held-out evaluation after {', '.join(held_out[path])}"] if path in held_out else []))
            for path in {*train, *held_out}}


def _card(name: str, view: DataCardView, used_by: str) -> list:
    card = view.card
    kind = card.get("kind") or "dataset"
    job = f" built by `{card['job']}`" if card.get("job") else ""
    columns = f" Columns: {', '.join(f'`{c}`' for c in card['columns'])}." if card.get("columns") else ""
    link = f" [Full data card](data/{name}/README.md)." if view.has_readme else ""
    blocks = [heading(f"data/{name}", 3),
              Para(f"**{kind}**{job}.{columns}{link}\nUsed by: {used_by or 'no stage recorded it'}."
                   + (f"\n{card['description']}" if card.get("description") else ""))]
    splits = card.get("splits") or {}
    if splits:
        blocks.append(Table(["split", "rows", "sha256"], [[s, Cell(fmt(v.get("rows")), "num"), short(v.get("sha256"))]
                                                          for s, v in splits.items()]))
    sources = card.get("sources") or []
    if sources:
        blocks.append(Table(["source", "license", "rows read", "rows kept", "path"], [
            [s.get("name", ""), s.get("license", "not recorded"), Cell(fmt(s.get("rows_read")), "num"),
             Cell(fmt(s.get("rows_kept")), "num"), f"`{s['path']}`" if s.get("path") else ""] for s in sources]))
    counts = card.get("counts")
    if isinstance(counts, list) and counts:
        blocks.append(Table(["filter step", "rows before", "rows after", "removed"], [
            [c.get("step", ""), Cell(fmt(c.get("before")), "num"), Cell(fmt(c.get("after")), "num"),
             Cell(fmt(c["before"] - c["after"]) if isinstance(c.get("before"), int) and isinstance(
                 c.get("after"), int) else "", "num")] for c in counts]))
    elif isinstance(counts, dict) and counts:  # older cards: rows per split and per domain
        blocks.append(Table(["split", "counts"], [[s, ", ".join(f"{k} {v}" for k, v in c.items())]
                                                  for s, c in counts.items() if isinstance(c, dict)]))
    facts = [f"Fingerprint `{card['fingerprint']}`." if card.get("fingerprint") else "",
             f"Built with `{card['command']}`." if card.get("command") else ""]
    if any(facts):
        blocks.append(Para(" ".join(f for f in facts if f)))
    if view.lengths_png:
        blocks.append(Image(f"data_{name}_lengths.png", view.lengths_png, f"{name} length histogram",
                            f"Lengths of the kept rows ({card.get('length_unit', 'as measured by the data job')})."))
    return blocks
