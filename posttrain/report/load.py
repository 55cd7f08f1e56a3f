"""Step 1 of the report: a run folder -> one `RunView`, everything the report shows read from disk here and only here.

Every step's status, metrics, lineage, resolved arguments, error and the data cards, for a run finished or not.

Nothing here computes a metric: every number the report shows is read from a file the run wrote. A stage that is
still running (or was killed) may have logged curves in a Trainer checkpoint of `.<stage>.partial/`; those are shown
and labelled as such. Later stages add keys to these files, so every read tolerates missing ones.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..io import read_json
from ..runs import STAGE_ORDER, run_state, stale_stages
from ..stats import format_change, format_eval_accuracy, paired_evals
from .plots import Reuse


@dataclass
class StageView:
    """What the run folder says about one step (`base` or a stage).

    status (`str`): `done`, `failed`, `running` (or killed while running), `not started`, `stale`.
    earlier (`bool`): the metrics are those an earlier attempt left in `<stage>/`: the pipeline keeps that folder
        until a new attempt succeeds, so a failed (or still running) re-run or re-evaluation leaves the old numbers.
    log_history (`list[dict]`): TRL's logs, from metrics.json or, for an unfinished stage, its last checkpoint.
    curves_from (`str`): where `log_history` came from (`metrics.json` or `checkpoint-N (unfinished)`).
    """

    name: str
    status: str = "not started"
    step: dict = field(default_factory=dict)  # run.json's entry
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)
    resolved_text: str = ""
    folder: Path | None = None
    log_history: list = field(default_factory=list)
    curves_from: str = ""
    error: str = ""
    error_cause: str = ""
    log_path: Path | None = None
    earlier: bool = False

    @property
    def eval(self) -> dict | None:
        return self.metrics.get("eval") or None

    @property
    def wall_time_s(self) -> float | None:
        return self.metrics.get("wall_time_s", self.step.get("wall_time_s"))


@dataclass
class DataCardView:
    """`data/<name>/` as the data job left it: its card.json, whether it wrote a README, its length histogram."""

    card: dict
    has_readme: bool = False
    lengths_png: bytes | None = None


@dataclass
class RunView:
    """A run folder as the report sees it.

    state (`dict`): run.json.
    recipe_yaml (`str`): the recipe as run (`recipe.yaml`, overrides applied), empty if not written.
    ablation (`list[Path]`): the other runs run.json says this one is compared with (those that still exist).
    accuracy (`str`): the held-out accuracy of every finished step (`accuracy_line`), empty if none was evaluated.
    data (`set[str]` or `None`): the data folders of the run (`run_data`): `cards` and the steps table show only
        these; None: all of them.
    evaluated_otherwise (`set[str]`): the stages scored with another evaluation than the base now is
        (`evaluated_otherwise`): their numbers are not compared with it.
    figures (`plots.Reuse`): the figures of the report this one replaces, for those drawn from unchanged inputs.
    """

    root: Path
    name: str
    state: dict
    stages: list[StageView]
    cards: dict[str, DataCardView]  # by data folder name
    recipe_yaml: str = ""
    ablation: list[Path] = field(default_factory=list)
    accuracy: str = ""
    data: set[str] | None = None
    evaluated_otherwise: set[str] = field(default_factory=set)
    figures: Reuse = field(default_factory=Reuse)

    def stage(self, name: str) -> StageView | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def trained(self) -> list[StageView]:
        return [s for s in self.stages if s.name != "base"]


def load_run(root: str | Path) -> RunView:
    """Everything the report needs from `outputs/<run>/`, in run order (base first)."""
    root = Path(root)
    state = read_json(root / "run.json")
    # a run.json from before `order` was recorded: the stage folders there are. With one, only its stages: a stage
    # folder left from the recipe's earlier chain (dpo after `stages:` dropped it) is not part of this run
    order = list(state.get("order") or [name for name in STAGE_ORDER
                                        if (root / name).is_dir() or (root / f".{name}.partial").is_dir()])
    order = order or ["base"]
    stages = [_load_stage(root, name, state.get("steps", {}).get(name, {})) for name in order]
    stale = stale_stages(root)
    for stage in stages:
        if stage.name in stale and stage.status == "done":
            stage.status = "stale"
    recipe = root / "recipe.yaml"
    recipe_yaml = recipe.read_text() if recipe.is_file() else ""
    data = run_data(root, recipe_yaml, stages)
    cards = {p.parent.name: _load_card(p.parent) for p in sorted((root / "data").glob("*/card.json"))
             if data is None or p.parent.name in data}
    return RunView(root, state.get("name") or root.name, state, stages, cards, recipe_yaml,
                   ablation_runs(root, state), accuracy_line(root), data, evaluated_otherwise(root),
                   Reuse(root / "report_files"))


def run_data(root: Path, recipe_yaml: str, stages: list[StageView]) -> set[str] | None:
    """The names of the data folders this run builds or its steps read: the recipe's `data:` jobs (the recipe as
    run) and each `data/<name>` a stage's lineage or held-out evaluation names (a stage skipped after its job was
    renamed trained on the old folder). Not a folder a job the recipe has since dropped or renamed left behind. None
    when the recipe as run cannot be read: every folder counts then."""
    try:
        recipe = yaml.safe_load(recipe_yaml) if recipe_yaml else None
    except yaml.YAMLError:
        recipe = None
    if not isinstance(recipe, dict):
        return None
    names = set(recipe.get("data") or {})
    for stage in stages:
        paths = [info.get("path") for info in (stage.lineage.get("datasets") or {}).values()]
        for path in (*paths, stage.resolved.get("eval_dataset")):
            parts = Path(relative(path, root)).parts
            if len(parts) > 1 and parts[0] == "data":
                names.add(parts[1])
    return names


def _load_card(folder: Path) -> DataCardView:
    lengths = folder / "lengths.png"
    return DataCardView(read_json(folder / "card.json"), (folder / "README.md").is_file(),
                        lengths.read_bytes() if lengths.is_file() else None)


def ablation_runs(root: Path, state: dict) -> list[Path]:
    """The other runs a run's run.json says it is compared with (`"ablation": {"runs": [...]}` or a list; paths
    relative to the run folder or absolute)."""
    listed = state.get("ablation") or []
    listed = listed.get("runs", []) if isinstance(listed, dict) else listed
    paths = [p if p.is_absolute() else (root / p) for p in map(Path, listed)]
    return [p for p in paths if (p / "run.json").is_file()]  # a deleted sibling run must not break the report


def stage_metrics(root: str | Path) -> dict[str, dict]:
    """metrics.json of every finished step of a run, in run order (base first); with an unreadable run.json (written
    empty by a power loss), the steps of `STAGE_ORDER` that have one, as `load_run` reads that run."""
    root = Path(root)
    order = run_state(root).get("order") or STAGE_ORDER
    out = {}
    for step in order:
        if metrics := read_json(root / step / "metrics.json"):
            out[step] = metrics
    return out


EVALUATED_OTHERWISE = "evaluated with earlier `eval:` settings than the base"


def evaluated_otherwise(root: str | Path) -> set[str]:
    """The stages whose held-out metrics are from another evaluation than the base's now: their lineage's `eval_hash`
    is not the one the base's records (a run stopped while it evaluated the finished stages again after `eval:` was
    edited). Runs recorded before the base's `eval_hash` have none."""
    root = Path(root)
    now = read_json(root / "base" / "lineage.json").get("eval_hash")
    order = run_state(root).get("order") or STAGE_ORDER
    recorded = {step: read_json(root / step / "lineage.json").get("eval_hash") for step in order if step != "base"}
    return {step for step, evaluated in recorded.items() if now and evaluated and evaluated != now}


def accuracy_line(root: str | Path) -> str:
    """`base 18.8% (±6) → sft 43.8% (±7), +25.0 (p=1e-09) → dpo 45.1% (±7), +1.3 n.s.` from the metrics of a run: each
    accuracy with half its 95 % Wilson interval, each change against the step before on the same prompts (exact
    McNemar; `n.s.`: not significant), and `✗ gate failed` where a stage's promote gate rejected it. Empty when
    nothing was evaluated. A stale stage (`stale_stages`) is shown as such, not compared; so is a stage whose latest
    attempt failed, is running or was interrupted (its metrics are an earlier attempt's), and the stage after it is
    not compared either."""
    parts, before, stale, otherwise = [], None, stale_stages(root), evaluated_otherwise(root)
    steps = read_json(Path(root) / "run.json").get("steps", {})
    for step, metrics in stage_metrics(root).items():
        if not metrics.get("eval"):
            continue
        text = f"{step} {format_eval_accuracy(metrics['eval'])}"
        if step in stale:
            parts.append(f"{text} (stale: {stale[step]})")
            continue
        if step in otherwise:
            parts.append(f"{text} ({EVALUATED_OTHERWISE})")
            before = None
            continue
        status = steps.get(step, {}).get("status")
        if status in ("failed", "running", "interrupted"):
            parts.append(f"{text} ({status}; from an earlier attempt)")
            before = None
            continue
        comparison = paired_evals(before, metrics["eval"])
        if comparison:
            text += f", {format_change(comparison)}"
        gate = (metrics.get("promotion") or {}).get("gate") or {}
        if gate and not gate.get("passed", True):
            text += " ✗ gate failed" if gate.get("enforced", True) else " (gate: worse, not enforced)"
        parts.append(text)
        before = metrics["eval"]
    return " → ".join(parts)


def same_prompts(a: dict, b: dict) -> bool:
    """Whether two held-out evaluations answered the same prompts (as `stats.paired_evals` decides): only then is
    the difference of their accuracies a change. Evaluations from before `prompts_sha` was recorded go by size."""
    return a.get("prompts_sha") == b.get("prompts_sha") and a.get("n") == b.get("n")


def _load_stage(root: Path, name: str, step: dict) -> StageView:
    final, partial = root / name, root / f".{name}.partial"
    view = StageView(name, step=step)
    folder = final if (final / "metrics.json").is_file() else partial if partial.is_dir() else None
    if folder is None and final.is_dir():
        folder = final
    view.folder = folder
    if folder is not None:
        view.metrics = read_json(folder / "metrics.json")
        view.lineage = read_json(folder / "lineage.json")
        if (folder / "resolved.yaml").is_file():
            view.resolved_text = (folder / "resolved.yaml").read_text()
            view.resolved = yaml.safe_load(view.resolved_text) or {}
        logs = [folder / f"{name}.log", partial / f"{name}.log"]
        view.log_path = next((p for p in logs if p.is_file()), None)
    view.log_history = view.metrics.get("log_history") or []
    if view.log_history:
        view.curves_from = "metrics.json"
    elif partial.is_dir():
        view.log_history, view.curves_from = _checkpoint_logs(partial)
    view.status = _status(view, final, partial)
    view.earlier = view.status in ("failed", "running") and folder == final and bool(view.metrics)
    if view.status == "failed":
        view.log_path = _failure_log(root, name, step)
        log = view.log_path.read_text(errors="replace") if view.log_path else ""
        view.error = step.get("error") or "\n".join(log.splitlines()[-25:])
        view.error_cause = error_cause(log or view.error, step.get("error"))
    return view


def _failure_log(root: Path, name: str, step: dict) -> Path | None:
    """The log of a failed step's latest attempt: the one run.json records (the stage's own, or its evaluation's),
    else the unfinished stage's; never the log of an earlier attempt that `<stage>/` may still hold."""
    recorded = [root / relative(step["log"], root)] if step.get("log") else []  # may be absolute on another machine
    return next((p for p in [*recorded, root / f".{name}.partial" / f"{name}.log"] if p.is_file()), None)


def _status(view: StageView, final: Path, partial: Path) -> str:
    recorded = view.step.get("status")
    if recorded == "interrupted":  # a step still running when its run was stopped (`Pipeline._end_run`)
        return "running"
    if recorded in ("failed", "running"):
        return recorded
    if view.metrics.get("status") == "done" or (final / "lineage.json").is_file() or recorded == "done":
        return "done"
    if partial.is_dir():
        return "running"
    return "not started"


def _checkpoint_logs(partial: Path) -> tuple[list, str]:
    """The log history of an unfinished stage's newest Trainer checkpoint, if it wrote one."""
    checkpoints = [p for p in partial.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        state = read_json(checkpoint / "trainer_state.json")
        if state.get("log_history"):
            return state["log_history"], f"{checkpoint.name} (unfinished stage)"
    return [], ""


_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Interrupt|Exit)): (.+)$")
_LAUNCHER_NOISE = ("CalledProcessError", "ChildFailedError")


def error_cause(text: str, recorded: str | None = None) -> str:
    """The line of a stage's log that says why it failed: the last exception raised by the stage itself, not the
    launcher's `CalledProcessError` that wraps it; else the cause the pipeline `recorded` in run.json (a signal, a lost
    process: a stage killed mid-step, by the OOM killer say, leaves no exception in its log, whose last line is then a
    progress bar); else the last line that mentions an error."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    causes = [line for line in lines if _EXCEPTION.match(line) and not any(n in line for n in _LAUNCHER_NOISE)]
    if causes:
        match = _EXCEPTION.match(causes[-1])
        return f"{match.group(1)}: {match.group(2)}"  # `UserError: …`, not `posttrain.errors.UserError: …`
    if recorded:
        return error_cause(recorded)
    mentions = [line for line in lines if re.search(r"error|no module named|killed|out of memory", line, re.I)
                and not any(n in line for n in _LAUNCHER_NOISE) and not line.startswith("File ")]
    return mentions[-1] if mentions else (lines[-1] if lines else "")


def relative(path: str | Path | None, root: Path) -> str:
    """`path` relative to the run folder when inside it (`data/verifiable`), else as given. A run folder copied
    elsewhere (off a cluster) still has its old absolute paths in lineage.json: those are matched by the run
    folder's name, the last `/<run name>/` in the path."""
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except (ValueError, OSError):
        pass
    parts = Path(path).parts
    if Path(path).is_absolute() and root.resolve().name in parts:
        index = len(parts) - 1 - parts[::-1].index(root.resolve().name)
        if index < len(parts) - 1:
            return str(Path(*parts[index + 1:]))
    return str(path)
