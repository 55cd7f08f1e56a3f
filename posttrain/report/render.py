"""Last step of the report: blocks -> a self-contained HTML page and a Markdown file (+ its PNGs), written atomically.

Both files are rendered from the same blocks, so they cannot drift apart: what the HTML page says, the Markdown
(model card, terminal) says too.
"""

import base64
import html
import json
import re
from pathlib import Path

from ..io import replace_dir, write_text
from .blocks import Cell, Code, Details, Heading, Image, Para, Table
from .plots import Reuse


def write_documents(blocks: list, out_dir: Path, stem: str, title: str) -> Path:
    """Render `blocks` to `<stem>.html` and `<stem>.md` (+ PNGs in `<stem>_files/`), each replaced atomically so a
    reader never sees half a report; returns the HTML path."""
    files_dir = f"{stem}_files"
    images = list(_images(blocks))

    def write_images(folder: Path) -> None:
        for image in images:
            (folder / image.name).write_bytes(image.png)
        keys = {image.name: image.key for image in images if image.key}
        if keys:  # the next report reuses these figures where their inputs are unchanged
            (folder / Reuse.INDEX).write_text(json.dumps(keys, indent=1, sort_keys=True))

    replace_dir(out_dir / files_dir, write_images)
    write_text(out_dir / f"{stem}.md", to_markdown(blocks, files_dir))
    return write_text(out_dir / f"{stem}.html", to_html(blocks, title))


def _images(blocks: list):
    for block in blocks:
        if isinstance(block, Image):
            yield block
        elif isinstance(block, Details):
            yield from _images(block.blocks)


# ----------------------------------------------------------------------------------------------------------- inline
# `blocks.literal`'s backslash escapes first, so an escaped character never opens or closes a mark
_INLINE = re.compile(r"\\([\\`*\[\]])|`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)\s]+)\)")
# Where a link may point: the web, an anchor in this report, or a path beside it (report_files/, data/). Never another
# scheme (`javascript:`, `data:`) nor `//host`; no control characters or backslashes either, which browsers drop or
# read as `/` before they look at the scheme.
_SAFE_URL = re.compile(r"(?:https?://|#|(?![A-Za-z][A-Za-z0-9+.-]*:|//))[^\x00-\x20\x7f\\<>\"']*")


def safe_url(url: str) -> bool:
    return _SAFE_URL.fullmatch(url) is not None


def inline_html(text: str) -> str:
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[last:m.start()]))
        char, code, bold, label, url = m.groups()
        if char is not None:
            out.append(html.escape(char))
        elif code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{html.escape(bold)}</strong>")
        elif safe_url(url):
            out.append(f'<a href="{html.escape(url)}">{html.escape(label)}</a>')
        else:  # a link to a script or another scheme: shown as the text it is
            out.append(html.escape(m.group(0)))
        last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out).replace("\n", "<br>")


def inline_md(text: str) -> str:
    """Markdown renderers treat `<think>` as an HTML tag and drop it: escape <, > and & outside code spans (inside
    **bold** and link text too). `[` is escaped outside links, so text that is not a safe link (`[x]( javascript:…)`,
    which Markdown links but the marks do not) cannot become one. `*`, `~` and `_` (`_MD_MARK`) are escaped too, so
    they show as written: `__init__()` is not a bold "init", `eval_*` does not end an italic caption."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(_md_text(text[last:m.start()]))
        char, code, bold, label, url = m.groups()
        if char is not None or code is not None:  # Markdown's own escape, and a code span, are shown as written
            out.append(m.group(0))
        elif bold is not None:
            out.append(f"**{_md_text(bold)}**")
        elif safe_url(url):
            out.append(f"[{_md_text(label)}]({url})")
        else:
            out.append(md_literal(m.group(0)))
        last = m.end()
    out.append(_md_text(text[last:]))
    return "".join(out)


def _md_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# `*`, `~` and a `_` at a word's edge would open or close a mark; `build_sft_set`'s inner `_` never does, and stays
# as written (report.md is also read as text, and searched)
_MD_MARK = re.compile(r"[\[*~]|(?<![^\W_])_|_(?![^\W_])")


def _md_text(text: str) -> str:
    return _MD_MARK.sub(lambda m: "\\" + m.group(0), _md_escape(text))


def md_literal(text: str) -> str:
    """`text` as written in Markdown: no HTML, no marks (GitHub's and the Hub's `~~strikethrough~~` included)."""
    return re.sub(r"([\\`*_~\[])", r"\\\1", _md_escape(text))


# ----------------------------------------------------------------------------------------------------------- markdown
def to_markdown(blocks: list, files_dir: str) -> str:
    return "\n".join(_md_block(b, files_dir) for b in blocks).rstrip() + "\n"


def _md_block(block, files_dir: str) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {inline_md(block.text)}\n"
    if isinstance(block, Para):
        text = inline_md(block.text)
        return ("> " + text.replace("\n", "  \n> ") if block.kind else text.replace("\n", "  \n")) + "\n"
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Image):
        caption = f"\n*{inline_md(block.caption)}*" if block.caption else ""
        return f"![{block.alt}]({files_dir}/{block.name}){caption}\n"
    if isinstance(block, Code):
        fence = "~~~~" if "```" in block.text else "```"
        return f"{fence}\n{block.text.rstrip()}\n{fence}\n"
    if isinstance(block, Details):
        inner = "\n".join(_md_block(b, files_dir) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>\n\n{inner}\n</details>\n"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _md_cell(cell) -> str:
    text = cell.text if isinstance(cell, Cell) else str(cell)
    if isinstance(cell, Cell) and cell.literal:
        text = md_literal(text)
    else:
        text = inline_md(text)
    # every Markdown line ending (a completion's `\r\n` or lone `\r` too) would end the table row
    return re.sub(r"\r\n?|\n", "<br>", text.replace("|", "\\|")) or " "


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    caption = f"\n*{inline_md(table.caption)}*\n" if table.caption else ""
    return "\n".join(lines) + "\n" + caption


# ----------------------------------------------------------------------------------------------------------- html
def to_html(blocks: list, title: str) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"</main>\n</body>\n</html>\n")


def _html_block(block) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
        return f"<h{block.level}{anchor}>{inline_html(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        cls = f' class="callout {block.kind}"' if block.kind else ""
        return f"<p{cls}>{inline_html(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode()
        caption = f"<figcaption>{inline_html(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}">{caption}</figure>'
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text.rstrip())}</pre>"
    if isinstance(block, Details):
        inner = "\n".join(_html_block(b) for b in block.blocks)
        return f"<details><summary>{inline_html(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _html_cell(cell, tag: str) -> str:
    if isinstance(cell, Cell):
        text = html.escape(cell.text) if cell.literal else inline_html(cell.text)
        cls = f' class="{cell.cls}"' if cell.cls else ""
        return f"<{tag}{cls}>{text}</{tag}>"
    return f"<{tag}>{inline_html(str(cell))}</{tag}>"


def _html_table(table: Table) -> str:
    head = "".join(_html_cell(h, "th") for h in table.header)
    rows = "\n".join("<tr>" + "".join(_html_cell(c, "td") for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{inline_html(table.caption)}</caption>" if table.caption else ""
    cls = f' class="{table.cls}"' if table.cls else ""
    return (f'<div class="scroll"><table{cls}>{caption}<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n'
            "</tbody></table></div>")


CSS = """
:root { --fg: #1d2329; --muted: #5c6670; --line: #d9dee3; --bg-alt: #f5f7f9; --ok: #1a7f37; --bad: #c62828;
        --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 14px/1.5 -apple-system, "Segoe UI", Roboto,
       "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); }
p { margin: 6px 0 10px; }
a { color: #0b5cad; }
code { font: 12.5px/1.4 "DejaVu Sans Mono", Menlo, Consolas, monospace; background: var(--bg-alt);
       padding: 1px 4px; border-radius: 3px; }
pre { font: 12px/1.45 "DejaVu Sans Mono", Menlo, Consolas, monospace; background: var(--bg-alt);
      border: 1px solid var(--line); border-radius: 4px; padding: 10px 12px; overflow-x: auto; white-space: pre-wrap;
      word-break: break-word; }
.scroll { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; font-size: 13px; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12px; padding-top: 4px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: #eef1f4; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.nowrap { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.ok, span.ok { color: var(--ok); font-weight: 600; }
td.bad { color: var(--bad); font-weight: 600; }
td.failed { color: #fff; background: var(--bad) !important; font-weight: 600; }
td.running { background: #fff3cd !important; color: var(--warn); font-weight: 600; }
td.missing { color: var(--muted); font-style: italic; }
td.mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
td.pre { white-space: pre-wrap; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px;
         word-break: break-word; }
table.samples { width: 100%; table-layout: fixed; }
table.samples th:nth-child(1) { width: 21%; }
table.samples th:nth-child(2) { width: 10%; }
table.samples td { white-space: pre-wrap; word-break: break-word; font-size: 12px; }
table.samples td.right { border-left: 4px solid var(--ok); }
table.samples td.wrong { border-left: 4px solid var(--bad); }
table.samples td.right::first-line { color: var(--ok); font-weight: 600; }
table.samples td.wrong::first-line { color: var(--bad); font-weight: 600; }
.callout { border-left: 4px solid #0b5cad; background: #eef5fc; padding: 8px 12px; border-radius: 3px; }
.callout.failed { border-color: var(--bad); background: #fdecea; }
.callout.warning { border-color: #d4a72c; background: #fff8e1; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
details { margin: 8px 0 12px; }
summary { cursor: pointer; color: #0b5cad; }
.subtitle { color: var(--muted); }
"""
