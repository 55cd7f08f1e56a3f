"""The report's document model: the blocks every section is made of, and how a measured value becomes a cell.

Sections build these blocks, `render` turns them into HTML and Markdown. A missing value is a "not measured" cell,
never 0 or a guess. Inline text understands three marks only: `code`, **bold** and [text](link), and a backslash
before one of \\ ` * [ ] that keeps it a plain character (`literal`). A link is rendered only to the web, a place in
this report or a file beside it; any other target (`javascript:`) is shown as text.
"""

import re
from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str | None = None


@dataclass
class Para:
    text: str
    kind: str = ""  # "", "note", "failed", "warning": a call-out box in HTML, a quote in Markdown


@dataclass
class Cell:
    """A table cell with a style (`num`, `ok`, `bad`, `failed`, `running`, `missing`, `mono`, `pre`, `right`,
    `wrong`); `literal` text (model outputs) is shown as is, without inline marks."""

    text: str
    cls: str = ""
    literal: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list]  # str or Cell
    caption: str = ""
    cls: str = ""


@dataclass
class Image:
    name: str  # file name under report_files/
    png: bytes
    alt: str
    caption: str = ""
    key: str = ""  # what the figure was drawn from (`plots.Reuse`); empty: not reused


@dataclass
class Code:
    text: str


@dataclass
class Details:
    """Collapsed in HTML (<details>), also in Markdown (the Hub and GitHub render <details>)."""

    summary: str
    blocks: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- cells
STATUS_CLASS = {"done": "ok", "failed": "failed", "running": "running", "not started": "missing", "stopped": "failed",
                "stale": "missing"}
STATUS_TEXT = {"running": "running (or interrupted)", "stopped": "stopped by a promote gate",
               "stale": "stale: from before its previous stage was trained again, or after one its gate "
                        "rejected"}
NOT_MEASURED = Cell("not measured", "missing")


def literal(text: str) -> str:
    """`text` shown as written inside a paragraph: text the run did not author (an error message quoting a dataset
    row, a recipe string) must not become a link or bold. Table cells have `Cell(..., literal=True)` instead."""
    return re.sub(r"([\\`*\[\]])", r"\\\1", str(text))


def slug(text: str) -> str:
    """GitHub's heading anchor, so links work in report.md on the Hub and in report.html alike."""
    return re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")


def heading(text: str, level: int = 2) -> Heading:
    return Heading(text, level, slug(text))


def fmt(value, kind: str = "num") -> str:
    if value is None:
        return "not measured"
    if kind == "rate":
        return f"{value:.1%}"
    if kind == "int" or (isinstance(value, int) and not isinstance(value, bool)):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def seconds(value) -> str:
    if value is None:
        return "not measured"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def num_cell(value, kind: str = "num") -> Cell:
    return NOT_MEASURED if value is None else Cell(fmt(value, kind), "num")


def status_cell(status: str) -> Cell:
    return Cell(STATUS_TEXT.get(status, status), STATUS_CLASS.get(status, ""))
