"""Step 2 of the report: a `RunView` -> the blocks of its results: summary, evaluation, curves and samples.

Rule for every number: it is read from a file the run wrote (run.json, metrics.json); where the file or the key is
missing the cell says "not measured", never 0 or a guess. The run's inputs (recipe, lineage, data) are `inputs`.
"""

import re

from ..promotion import blocks_chain
from ..stats import accuracy_interval, format_p
from . import plots
from .blocks import (
    NOT_MEASURED,
    STATUS_TEXT,
    Cell,
    Code,
    Details,
    Heading,
    Image,
    Para,
    Table,
    fmt,
    heading,
    literal,
    num_cell,
    seconds,
    slug,
    status_cell,
)
from .load import EVALUATED_OTHERWISE, RunView, StageView, relative, same_prompts

EVAL_ROWS = [  # key, label, kind
    ("n", "held-out prompts", "int"),
    ("accuracy", "accuracy (verifier)", "rate"),
    ("format", "format: think tags well formed", "rate"),
    ("stop_rate", "stop rate: emitted EOS", "rate"),
    ("mean_completion_tokens", "mean completion tokens", "num"),
    ("heldout_loss", "held-out loss of reference replies (nats/token)", "num"),
    ("proxy_reward", "hackable proxy: length (not a goal)", "num"),
    ("processes", "evaluated by processes", "int"),  # a setting: no change column
]
GROUP_LABELS = {"mode/thinking": "accuracy · thinking on", "mode/non_thinking": "accuracy · thinking off",
                "mode/default": "accuracy · default mode"}
KNOWN_METRICS = {"stage", "status", "wall_time_s", "world_size", "train", "log_history", "adapter", "eval",
                 "promotion"}


# --------------------------------------------------------------------------------------------------------- summary
def summary(run: RunView) -> list:
    state = run.state.get("steps", {}).get("run", {})
    facts = [f"recipe `{run.state['recipe']}`" if run.state.get("recipe") else "recipe not recorded",
             f"started {state['started']}" if state.get("started") else "",
             f"finished {state['finished']}" if state.get("finished") else ""]
    status = state.get("status", "unknown")
    blocks = [Heading(f"Run report: {run.name}", 1, slug(run.name)),
              Para(" · ".join(f for f in facts if f) + f" · run status **{STATUS_TEXT.get(status, status)}**"),
              Para(f"**Held-out accuracy:** {run.accuracy or 'not measured'}")]
    blocks += run_failure(run)
    for i, stage in enumerate(run.stages):
        if stage.status == "failed":
            where = f"`{relative(stage.log_path, run.root)}`" if stage.log_path else "not found"
            later = [s.name for s in run.stages[i + 1:] if s.status == "not started"]
            earlier = " The numbers shown for it are from an earlier attempt." if stage.earlier else ""
            blocks.append(Para(f"**Stage {stage.name} failed:** "
                               f"{literal(stage.error_cause) or 'no error text recorded'}\nFull log: {where}.{earlier}"
                               + (f" Not run because of it: {', '.join(later)}." if later else ""), "failed"))
            if stage.error:
                blocks.append(Details(f"last lines of the {stage.name} log", [Code(stage.error)]))
        gate = gate_failure(stage)
        if gate:
            later = [s.name for s in run.stages[i + 1:] if s.status == "not started"]
            blocks.append(Para(f"**Stage {stage.name} failed its promote gate:** {gate}\n`posttrain export` refuses "
                               "it unless --force." + (f" Not run because of it: {', '.join(later)}." if later
                                                        else ""), "failed"))
    blocks += [heading("Steps"), steps_table(run)]
    return blocks


def run_failure(run: RunView) -> list:
    """The error of a run that failed (or was interrupted) outside a stage's process, which only run.json's `run`
    step records: a data job, the base model, a full disk. Not repeated when it only names a stage that failed: that
    stage's own call-out says why."""
    state = run.state.get("steps", {}).get("run", {})
    error = state.get("error")
    failed = [s for s in run.stages if s.status == "failed"]
    told = {text for s in failed for text in (f"step '{s.name}' failed", s.step.get("error"))}
    # the run's error ends as the whole message printed: "step 'dpo' failed: <the stage's error>\nLog: …"
    told_too = any(error.startswith(f"step '{s.name}' failed:") for s in failed) if error else False
    if not error or state.get("status") not in ("failed", "interrupted") or error in told or told_too:
        return []
    later = [s.name for s in run.stages if s.status == "not started"]
    return [Para(f"**Run {state['status']}:** {literal(error)}"
                 + (f"\nNot run because of it: {', '.join(later)}." if later else ""), "failed")]


def stage_label(stage: StageView, run: RunView) -> str:
    """A stage's name, with its status where it is not done: `dpo (failed; numbers from an earlier attempt)`, or
    where its held-out numbers are from earlier `eval:` settings than the base's (`RunView.evaluated_otherwise`)."""
    if stage.status == "done":
        return f"{stage.name} ({EVALUATED_OTHERWISE})" if stage.name in run.evaluated_otherwise else stage.name
    status = STATUS_TEXT.get(stage.status, stage.status)
    return f"{stage.name} ({status}; numbers from an earlier attempt)" if stage.earlier else f"{stage.name} ({status})"


def gate_failure(stage: StageView) -> str:
    """The reason of a stage's failed, enforced promote gate, or ''."""
    record = stage.metrics.get("promotion")
    return record["gate"].get("reason", "") if blocks_chain(record) else ""


def steps_table(run: RunView) -> Table:
    rows = []
    for name, step in run.state.get("steps", {}).items():
        if name.startswith("data/") and (run.data is None or name.removeprefix("data/") in run.data):
            rows.append([f"`{name}`", status_cell(step.get("status", "done")), "", Cell(seconds(
                step.get("wall_time_s")), "num"), "", "data job"])
    for stage in run.stages:
        train = stage.metrics.get("train") or {}
        notes = []
        if stage.step.get("skipped"):
            notes.append("finished earlier with the same inputs; skipped on the last run")
        if stage.status == "failed":
            notes.append(stage.error_cause)
        if stage.earlier:
            notes.append("the numbers shown are from an earlier attempt")
        if gate_failure(stage):
            notes.append(f"promote gate failed: {gate_failure(stage)}")
        if stage.curves_from and stage.curves_from != "metrics.json":
            notes.append(f"curves from {stage.curves_from}")
        started = stage.status != "not started"
        rows.append([f"**{stage.name}**", status_cell(stage.status), Cell(stage.step.get("started", ""), "nowrap"),
                     Cell(seconds(stage.step.get("wall_time_s", stage.wall_time_s)), "num") if started else "",
                     num_cell(train.get("global_step"), "int") if started and stage.name != "base" else "",
                     Cell("; ".join(n for n in notes if n), literal=True)])  # error text: shown as logged
    return Table(["step", "status", "started", "wall time", "optimizer steps", "notes"], rows,
                 "Wall time is the whole step as the pipeline measured it (process start, training, saving, "
                 "held-out evaluation).")


# --------------------------------------------------------------------------------------------------------- evaluation
def evaluation(run: RunView) -> list:
    measured = [s for s in run.stages if s.eval]
    prompts = ("The same held-out prompts" if all(same_prompts(measured[0].eval, s.eval) for s in measured) else
               "Held-out prompts, not the same for every stage (see \"held-out prompts\"; accuracies on different "
               "prompts are not compared),")
    blocks = [heading("Evaluation"),
              Para(f"{prompts} answered greedily after each stage and scored by the verifiers UPO trains on. Each "
                   "column is one stage's `metrics.json`.")]
    if not measured:
        return blocks + [Para("No stage has a held-out evaluation yet: not measured.", "warning")]
    blocks.append(eval_table(run))
    blocks += promotions(run)
    bars, key = run.figures.draw("eval_by_stage.png", plots.eval_bars, [(s.name, s.eval) for s in run.stages],
                                 [s.name for s in run.stages])
    if bars:
        blocks.append(Image("eval_by_stage.png", bars, "held-out rates by stage",
                            "Rates in [0, 1]; stages without an evaluation are left out.", key))
    for stage in run.stages:
        blocks += stage_extras(stage)
    return blocks


def eval_table(run: RunView) -> Table:
    stages = run.stages
    measured = [s for s in stages if s.eval]
    # the change runs between the stages whose numbers are what the chain now gives: not stale, failed or unfinished
    current = [s for s in measured if s.status == "done" and s.name not in run.evaluated_otherwise]
    first, last = (current[0], current[-1]) if len(current) > 1 else (None, None)
    comparable = first is not None and same_prompts(first.eval, last.eval)
    groups = sorted({g for s in measured for g in (s.eval.get("by_group") or {})},
                    key=lambda g: (g.startswith("mode/"), g))
    known = {k for k, _, _ in EVAL_ROWS} | {"by_group", "samples", "verdicts", "accuracy_ci95"}
    extra = sorted({k for s in measured for k, v in s.eval.items()
                    if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)})
    rows = []
    specs = [(lambda e, k=k: e.get(k), label, kind) for k, label, kind in EVAL_ROWS]
    specs.insert(2, (accuracy_interval, "accuracy: 95 % interval (Wilson)", "interval"))
    specs += [(lambda e, g=g: (e.get("by_group") or {}).get(g),
               GROUP_LABELS.get(g, f"accuracy · {g.replace('/', ' ')}"), "rate") for g in groups]
    specs += [(lambda e, k=k: e.get(k), k, "num") for k in extra]
    for get, label, kind in specs:
        values = [get(s.eval) if s.eval else None for s in stages]
        if kind == "interval":
            rows.append([label] + [Cell(f"{v[0]:.1%} – {v[1]:.1%}", "num") if v else NOT_MEASURED for v in values]
                        + [""] * (first is not None))
            continue
        row = [label] + [num_cell(v, kind) for v in values]
        if first is not None:
            a, b = get(first.eval), get(last.eval)
            if a is None or b is None or kind == "int":
                row.append("")
            else:
                row.append(Cell(_delta(a, b, kind), "num") if comparable else Cell("different prompts", "missing"))
        rows.append(row)
    header = ["metric"] + [stage_label(s, run) for s in stages]
    if first is not None:
        header.append(f"change {first.name} → {last.name}")
    return Table(header, rows, "Rates are fractions of the held-out prompts; per-group rows are accuracy within the "
                 "group. \"not measured\": the stage wrote no evaluation (not run, failed, or no eval data).")


def promotions(run: RunView) -> list:
    """Each stage against the step before it on the same prompts, and its promote gate's verdict, as the pipeline
    recorded them (`promotion` in metrics.json)."""
    rows = []
    for stage in run.trained:
        record = stage.metrics.get("promotion")
        if not record:
            continue
        c, gate = record.get("comparison"), record.get("gate")
        paired = ([Cell(f"{100 * c['difference']:+.1f} pts", "num"),
                   Cell(f"{100 * c['interval'][0]:+.1f} to {100 * c['interval'][1]:+.1f}", "num"),
                   Cell(f"{c['only_a']} / {c['only_b']}", "num"), Cell(format_p(c["p_value"]), "num"),
                   Cell("yes" if c["significant"] else "no",
                        "" if not c["significant"] else "ok" if c["difference"] > 0 else "bad")]
                  if c else [NOT_MEASURED] * 5)
        passed = (gate or {}).get("passed", True)  # as the run's summary line reads a record without it
        verdict = (Cell(("passed: " if passed else "FAILED: " if gate.get("enforced", True)
                         else "worse (not enforced): ") + gate.get("reason", ""), "ok" if passed else "bad",
                        literal=True) if gate else Cell("no gate", "missing"))
        mark = stage_label(stage, run).removeprefix(stage.name)  # ` (stale: …)`: not what the chain now gives
        rows.append([f"**{stage.name}**{mark}", record.get("against", ""), *paired, verdict])
    if not rows:
        return []
    return [heading("Stage against the step before", 3),
            Table(["stage", "against", "accuracy change", "95 % interval of the change", "prompts lost / gained",
                   "McNemar p", "significant", "promote gate"], rows,
                  "Paired on the same held-out prompts: only prompts the two steps answer differently carry "
                  "information (exact McNemar test); the interval is a paired bootstrap. A change that is not "
                  "significant may be luck. The gate is the recipe's `gate:`.")]


def _delta(a: float, b: float, kind: str) -> str:
    if kind == "rate":
        return f"{(b - a) * 100:+.1f} pts"
    return f"{b - a:+.4g}"


def stage_extras(stage: StageView) -> list:
    """Stage-specific measurements (e.g. DPO's held-out preference accuracy before/after), shown generically."""
    extra = {k: v for k, v in stage.metrics.items() if k not in KNOWN_METRICS and k != "preflight" and v}
    blocks = []
    for key, value in extra.items():
        if isinstance(value, dict) and set(value) >= {"before", "after"}:
            before, after = value.get("before") or {}, value.get("after") or {}
            names = list(dict.fromkeys([*before, *after]))
            rows = [[name, num_cell(before.get(name), kind_of(name)), num_cell(after.get(name), kind_of(name))]
                    for name in names] or [[f"`{key}`", NOT_MEASURED, NOT_MEASURED]]  # recorded as null: not measured
            blocks += [heading(f"{stage.name}: {key.replace('_', ' ')} before and after", 4),
                       Table(["measure", f"before {stage.name}", f"after {stage.name}"], rows)]
        else:
            # settings and measurements a stage recorded under its own key, shown as recorded (no unit guessing)
            rows = [[f"`{k}`", Cell(fmt(v), "num", True)] for k, v in flatten(value, key).items() if v is not None]
            blocks += [heading(f"{stage.name}: `{key}` in metrics.json", 4), Table(["key", "value"], rows)]
    return blocks


def kind_of(key: str) -> str:
    """Fractions are shown as percentages: keys that name an accuracy or a rate."""
    return "rate" if re.search(r"accuracy|_rate$|fraction", key) else "int" if key in ("n", "rows") else "num"


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


# --------------------------------------------------------------------------------------------------------- curves
def curves(run: RunView) -> list:
    order = [s.name for s in run.stages]
    blocks = [heading("Training curves"), training_table(run)]
    timeline, key = run.figures.draw("loss_all_stages.png", plots.run_loss,
                                     [(s.name, s.log_history) for s in run.trained], order)
    if timeline:
        blocks.append(Image("loss_all_stages.png", timeline, "training loss across stages",
                            "Dashed lines mark stage boundaries. The objectives differ (SFT: token NLL; DPO: "
                            "pairwise logistic loss; UPO: PG + λ·DPO), so compare shapes, not levels, across "
                            "stages.", key))
    for stage in run.trained:
        if not stage.log_history:
            if stage.status != "not started":
                blocks.append(Para(f"**{stage.name}**: no training logs recorded (not measured).", "warning"))
            continue
        args = (stage.name, stage.log_history, order, stage.resolved.get("normalize_rewards_by"))
        main, main_key = run.figures.draw(f"curves_{stage.name}.png", plots.stage_curves, *args)
        extra, extra_key = run.figures.draw(f"diagnostics_{stage.name}.png", plots.stage_curves, *args,
                                            diagnostics=True)
        blocks.append(heading(f"{stage.name} curves", 3))
        if stage.curves_from != "metrics.json":
            blocks.append(Para(f"From {stage.curves_from}: the stage has not finished.", "warning"))
        elif stage.earlier:
            blocks.append(Para(f"From an earlier attempt of {stage.name}: its latest attempt "
                               f"{STATUS_TEXT.get(stage.status, stage.status)}.", "warning"))
        if main:
            blocks.append(Image(f"curves_{stage.name}.png", main, f"{stage.name} training curves",
                                "Solid: training batches; dashed with dots: held-out (eval_*) logs; bands: ± std "
                                "or min–max as logged.", main_key))
        if extra:
            blocks.append(Details(f"{stage.name} diagnostics (learning rate, gradient norm, entropy, …)",
                                  [Image(f"diagnostics_{stage.name}.png", extra, f"{stage.name} diagnostics",
                                         key=extra_key)]))
    return blocks


def training_table(run: RunView) -> Table:
    rows = []
    for stage in run.trained:
        train, adapter = stage.metrics.get("train") or {}, stage.metrics.get("adapter") or {}
        preflight = stage.metrics.get("preflight") or {}
        checks = ", ".join(f"{k} {fmt(v)}" for k, v in flatten(preflight).items())
        reloads = adapter.get("reloads_equal")
        rows.append([f"**{stage.name}**", status_cell(stage.status), num_cell(train.get("global_step"), "int"),
                     num_cell(train.get("train_loss")), Cell(seconds(train.get("train_runtime")), "num")
                     if train.get("train_runtime") is not None else NOT_MEASURED,
                     num_cell(stage.metrics.get("world_size"), "int"),
                     Cell(f"{adapter['adapter_bytes'] / 1e6:.2f} MB, {adapter.get('adapter_tensors', '?')} tensors"
                          if adapter.get("adapter_bytes") else "not measured", "num" if adapter else "missing"),
                     Cell("yes" if reloads else "no" if reloads is False else "not measured",
                          "ok" if reloads else "bad" if reloads is False else "missing"),
                     checks or NOT_MEASURED])
    return Table(["stage", "status", "steps", "mean train loss", "train runtime", "processes", "adapter saved",
                  "reloads equal", "pre-flight checks"], rows)


# --------------------------------------------------------------------------------------------------------- samples
MODE_TITLES = {True: "Thinking on", False: "Thinking off", None: "Default mode"}


def samples(run: RunView) -> list:
    stages = [s for s in run.stages if s.eval and s.eval.get("samples")]
    blocks = [heading("Held-out samples")]
    if not stages:
        return blocks + [Para("No stage recorded sample answers: not measured.", "warning")]
    blocks.append(Para("The first held-out prompts, answered greedily by each stage and judged by the same verifier "
                       "as the accuracy above (✓ correct / ✗ wrong). Completions are shown as generated."))
    rows_by_key: dict = {}
    for stage in stages:
        for i, sample in enumerate(stage.eval["samples"]):
            # a row is one position in one set of held-out prompts, not a prompt text: the same question about
            # another image (vision) is another prompt. The text guards evaluations that recorded no prompts_sha.
            key = (stage.eval.get("prompts_sha"), i, sample.get("prompt"))
            rows_by_key.setdefault(key, {"sample": sample, "by_stage": {}})["by_stage"].setdefault(stage.name, sample)
    for mode in (True, False, None):
        rows = [r for r in rows_by_key.values() if r["sample"].get("thinking") is mode]
        if not rows:
            continue
        table_rows = []
        for row in rows:
            sample = row["sample"]
            cells = [Cell(str(sample.get("prompt", "")), literal=True), Cell(str(sample.get("answer", "")),
                                                                              literal=True)]
            for stage in stages:
                got = row["by_stage"].get(stage.name)
                cells.append(_sample_cell(got) if got else NOT_MEASURED)
            table_rows.append(cells)
        totals = ["**correct on these prompts**", ""] + [
            f"{sum(bool(r['by_stage'][s.name].get('correct')) for r in rows if s.name in r['by_stage'])} / "
            f"{sum(s.name in r['by_stage'] for r in rows)}" for s in stages]
        blocks += [heading(f"{MODE_TITLES[mode]} ({len(rows)} prompts)", 3),
                   Table(["prompt", "reference answer"] + [stage_label(s, run) for s in stages], table_rows + [totals],
                         cls="samples")]
    return blocks


def _sample_cell(sample: dict) -> Cell:
    verdict = "✓ correct" if sample.get("correct") else "✗ wrong"
    return Cell(f"{verdict}\n{visible(sample.get('completion'))}", "right" if sample.get("correct") else "wrong",
                literal=True)


def visible(text: str | None, limit: int = 600) -> str:
    """A completion as it was generated, except that blank ones are named instead of shown as nothing."""
    if text is None:
        return "(no completion recorded)"
    if not text:
        return "(empty completion)"
    if not text.strip():
        return f"(blank: {len(text)} whitespace characters)"
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"
