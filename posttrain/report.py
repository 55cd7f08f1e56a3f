"""Run reports. For now: the one-line before/after summary printed at the end of a run."""

import json
from pathlib import Path


def stage_metrics(root: str | Path) -> dict[str, dict]:
    """metrics.json of every finished step of a run, in run order (base first)."""
    root = Path(root)
    state = json.loads((root / "run.json").read_text()) if (root / "run.json").is_file() else {}
    order = state.get("order") or ["base", "sft", "dpo", "upo"]
    out = {}
    for step in order:
        path = root / step / "metrics.json"
        if path.is_file():
            out[step] = json.loads(path.read_text())
    return out


def accuracy_line(root: str | Path) -> str:
    """`base 12.0% → sft 41.5% → dpo 44.0%` from the metrics of a run; empty when nothing was evaluated."""
    parts = [f"{step} {m['eval']['accuracy']:.1%}" for step, m in stage_metrics(root).items() if m.get("eval")]
    return " → ".join(parts)
