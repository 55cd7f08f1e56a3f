"""Run reports: `outputs/<run>/report.html` (self-contained) and `report.md` (+ `report_files/*.png`).

    posttrain report outputs/<run> [--compare outputs/<other> ...]

The pipeline rebuilds the report when a run finishes or fails; it can be rebuilt any time from the folder alone, also
while a stage is running. A report is built in three steps, one module each:

1. `load`: the run folder -> one `RunView`; every file the report shows is read there and nowhere else.
2. `sections` (results: steps and status, held-out evaluation, training curves drawn by `plots`, samples) and
   `inputs` (recipe, lineage, data cards): the `RunView` -> document blocks (`blocks`). `compare` adds the
   "Ablation" section when runs are compared.
3. `render`: the blocks -> HTML and Markdown, written atomically.
"""

import time
from pathlib import Path

from rich.markup import escape

from ..console import console
from ..errors import UserError, make_folder
from . import inputs, sections
from .blocks import Heading, Para
from .compare import comparison, over_seeds
from .load import accuracy_line, load_run, stage_metrics
from .plots import Reuse
from .render import write_documents

__all__ = ["accuracy_line", "build_comparison", "build_report", "report_blocks", "stage_metrics", "try_build_report"]


def report_blocks(root: str | Path, compare: list[str | Path] | None = None) -> tuple[str, list]:
    """(run name, the report's blocks) for run folder `root`, compared with the runs in `compare` (if any)."""
    root = Path(root)
    run = load_run(root)
    others = [Path(p) for p in compare or []] or run.ablation
    blocks = sections.summary(run)
    blocks += sections.evaluation(run)
    blocks += sections.curves(run)
    blocks += sections.samples(run)
    if others:
        blocks += comparison([root, *[p for p in others if p.resolve() != root.resolve()]], figures=run.figures)
    blocks += inputs.lineage(run)
    blocks += inputs.data_cards(run)
    return run.name, with_contents(blocks)


def with_contents(blocks: list) -> list:
    """A line of links to the sections, after the summary paragraphs (anchors are GitHub's, so they work on the Hub
    as well as in the HTML file), and when the report was built."""
    headings = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    links = " · ".join(f"[{h.text}](#{h.anchor})" for h in headings)
    built = time.strftime("%Y-%m-%d %H:%M")
    at = next((i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.level == 2), len(blocks))
    return [*blocks[:at], Para(f"Contents: {links}\nBuilt {built} from the files in this run folder; every "
                                f"number below is read from them."), *blocks[at:]]


def build_report(root: str | Path, compare: list[str | Path] | None = None) -> Path:
    """Write `report.html`, `report.md` and `report_files/` into run folder `root`; returns the HTML path.

    Args:
        root (`str` or `Path`): a run folder (`outputs/<run>`), finished, failed or still running.
        compare (`list` of paths, *optional*): other run folders to compare with in an "Ablation" section; defaults
            to the runs listed in run.json's `ablation`.
    """
    root = Path(root)
    if not (root / "run.json").is_file():
        raise UserError(f"{root} is not a posttrain run folder (no run.json); expected outputs/<run name>")
    for other in compare or []:
        if not (Path(other) / "run.json").is_file():
            raise UserError(f"--compare {other}: not a posttrain run folder (no run.json)")
    make_folder(root, "the run folder (the report is written there)")
    name, blocks = report_blocks(root, compare)
    return write_documents(blocks, root, "report", f"posttrain report: {name}")


def build_comparison(runs: list[str | Path], out_dir: str | Path, groups: dict[str, list[Path]] | None = None,
                     baseline: str | None = None, stage: str | None = None, stem: str = "comparison") -> Path:
    """Write `<stem>.html` / `<stem>.md` (default `comparison`) for several run folders into `out_dir` (an
    ablation's parent); `groups` (variant -> its runs over seeds) adds each variant's mean over seeds and its
    difference to `baseline`. Every run is read after `stage` (default: where the finished runs end,
    `compare.read_at`)."""
    blocks = [Heading("Run comparison", 1)]
    if groups:
        blocks += over_seeds(groups, baseline or next(iter(groups)), stage)
    blocks += comparison([Path(r) for r in runs], stage, Reuse(Path(out_dir) / f"{stem}_files"))
    return write_documents(blocks, Path(out_dir), stem, "posttrain run comparison")


def try_build_report(root: str | Path) -> Path | None:
    """`build_report` for the pipeline: a report bug must never fail (or hide the error of) a training run, so any
    exception becomes a warning and None."""
    try:
        path = build_report(root)
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more than its report
        console.print(f"[yellow]warning:[/yellow] could not build the run report ({type(exc).__name__}: "
                      f"{escape(str(exc))}); retry with `posttrain report {root}`")
        return None
    console.print(f"report: {path}")
    return path
