"""Run reports: `outputs/<run>/report.html` (self-contained) and `report.md` (+ `report_files/*.png`).

    posttrain report outputs/<run> [--compare outputs/<other> ...]

The pipeline rebuilds the report when a run finishes or fails; it can be rebuilt any time from the folder alone, also
while a stage is running. Sections: steps and status (a failed stage with its error), the held-out evaluation of
every stage side by side, training curves, the same held-out prompts answered by each stage, an ablation when runs
are compared, the recipe and lineage, and the data cards. Modules: `report_run` reads the folder, `report_sections`
/ `report_inputs` / `report_compare` build the sections, `report_plots` draws, `report_doc` renders HTML and
Markdown from the same blocks.
"""

import json
import os
import shutil
from pathlib import Path

FILES_DIR = "report_files"


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


def report_blocks(root: str | Path, compare: list[str | Path] | None = None) -> tuple[str, list]:
    """(run name, the report's blocks) for run folder `root`, compared with the runs in `compare` (if any)."""
    from . import report_inputs as inputs
    from . import report_sections as sections
    from .report_compare import ablation_runs, comparison
    from .report_run import load_run

    root = Path(root)
    run = load_run(root)
    others = [Path(p) for p in compare or []] or ablation_runs(root, run.state)
    blocks = sections.summary(run, accuracy_line(root))
    blocks += sections.evaluation(run)
    blocks += sections.curves(run)
    blocks += sections.samples(run)
    if others:
        blocks += comparison([root, *[p for p in others if p.resolve() != root.resolve()]])
    blocks += inputs.lineage(run)
    blocks += inputs.data_cards(run)
    return run.name, with_contents(blocks)


def with_contents(blocks: list) -> list:
    """A line of links to the sections, after the summary paragraphs (anchors are GitHub's, so they work on the Hub
    as well as in the HTML file), and when the report was built."""
    import time

    from .report_doc import Heading, Para

    sections = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    links = " · ".join(f"[{h.text}](#{h.anchor})" for h in sections)
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
    from .errors import UserError

    root = Path(root)
    if not (root / "run.json").is_file():
        raise UserError(f"{root} is not a posttrain run folder (no run.json); expected outputs/<run name>")
    for other in compare or []:
        if not (Path(other) / "run.json").is_file():
            raise UserError(f"--compare {other}: not a posttrain run folder (no run.json)")
    name, blocks = report_blocks(root, compare)
    return write_documents(blocks, root, "report", f"posttrain report: {name}")


def build_comparison(runs: list[str | Path], out_dir: str | Path) -> Path:
    """Write `comparison.html` / `comparison.md` for several run folders into `out_dir` (an ablation's parent)."""
    from .report_compare import comparison
    from .report_doc import Heading

    blocks = [Heading("Run comparison", 1), *comparison([Path(r) for r in runs])]
    return write_documents(blocks, Path(out_dir), "comparison", "posttrain run comparison")


def write_documents(blocks: list, out_dir: Path, stem: str, title: str) -> Path:
    """Render `blocks` to `<stem>.html` and `<stem>.md` (+ PNGs in `<stem>_files/`), each file replaced atomically
    so a reader never sees half a report."""
    from .report_doc import Details, Image, to_html, to_markdown

    files_dir = f"{stem}_files"
    images, stack = [], list(blocks)
    while stack:
        block = stack.pop()
        if isinstance(block, Image):
            images.append(block)
        elif isinstance(block, Details):
            stack.extend(block.blocks)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{files_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for image in images:
        (tmp / image.name).write_bytes(image.png)
    old = out_dir / f".{files_dir}.old-{os.getpid()}"
    if (out_dir / files_dir).exists():
        os.replace(out_dir / files_dir, old)
    os.replace(tmp, out_dir / files_dir)
    shutil.rmtree(old, ignore_errors=True)
    _atomic_write(out_dir / f"{stem}.md", to_markdown(blocks, files_dir))
    html_path = out_dir / f"{stem}.html"
    _atomic_write(html_path, to_html(blocks, title))
    return html_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def try_build_report(root: str | Path) -> Path | None:
    """`build_report` for the pipeline: a report bug must never fail (or hide the error of) a training run, so any
    exception becomes a warning and None."""
    from rich.markup import escape

    from .console import console

    try:
        path = build_report(root)
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more than its report
        console.print(f"[yellow]warning:[/yellow] could not build the run report ({type(exc).__name__}: "
                      f"{escape(str(exc))}); retry with `posttrain report {root}`")
        return None
    console.print(f"report: {path}")
    return path
