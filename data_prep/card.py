"""Writing a job's output folder atomically: parquet splits, rejects, a length histogram, `card.json` and `README.md`.

Output layout contract (the training stages load `OUT/<split>.parquet`):

    OUT/train.parquet, OUT/test.parquet   one file per split, TRL columns only
    OUT/README.md                         the data card: sources, licenses, counts per filter, histogram, sha256s,
                                          the command that built it
    OUT/card.json                         the same facts, machine-readable
    OUT/lengths.png                       length histogram (embedded in README.md)
    OUT/rejects.jsonl                     every row not in a split, with the filter and reason

Everything is written to a hidden sibling folder first and renamed into place, so a crash never leaves a half-written
`OUT/` that a stage could pick up.
"""

import hashlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from posttrain.errors import UserError, disk_full_error, is_disk_full, make_folder
from posttrain.io import replace_dir, write_json, write_jsonl, write_text
from posttrain.lineage import sha256  # the split files' digests, which lineage.card_fingerprint recomputes


def check_output_dir(out_dir: str | Path, overwrite: bool, inputs=()) -> Path:
    """Fail before any work if writing `out_dir` could destroy something, or could not be done at all.

    Only a previous job's output (a folder with `card.json`) is ever replaced, and only with `overwrite`; never a
    folder that is or holds one of `inputs` (the job's sources, evaluation sets, model folders), which a replace would
    delete."""
    out = Path(out_dir)
    check_replaceable(out, overwrite, inputs)
    make_folder(out.parent, "the folder for the output")
    check_writable(out)
    return out


def check_replaceable(out: Path, overwrite: bool, inputs=()) -> None:
    """Raise unless `out` is free, or a previous job output that `overwrite` allows replacing."""
    for path in inputs:
        if path and Path(path).exists() and _is_within(Path(path), out):
            held = "is" if Path(path).resolve() == out.resolve() else "holds"
            raise UserError(f"output folder {out} {held} the input {path}: writing it would delete that; choose an "
                            "output_dir outside the inputs")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or not (out / "card.json").is_file():
        what = "a folder" if out.is_dir() else "a file"
        raise UserError(f"output folder {out} exists and is {what} that no data job wrote (no card.json); not "
                        "replacing it: choose another output_dir, or move it away yourself")
    if not overwrite:
        raise UserError(f"output folder {out} exists; pass --overwrite true (or `overwrite: true`) to replace it")


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_writable(out: Path) -> None:
    """Create and remove a hidden sibling of `out`: a read-only or full disk fails now, not after all the work."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".check", dir=out.parent))
    except OSError as exc:
        raise write_error(exc, out) from exc


def write_error(exc: Exception, out: Path) -> UserError:
    """The paragraph for a failed write of `out`: a full disk as `disk_full_error`'s, anything else naming the cause."""
    if is_disk_full(exc):
        return disk_full_error(exc, f"the data set {out}", out.parent, resumes=False)
    return UserError(f"cannot write the output folder {out}: {exc.strerror or exc}"
                     + (f" ({exc.filename})" if exc.filename else ""))


def write_output(out_dir: Path, splits: dict, rejects: list[dict], card: dict, lengths: list[int],
                 length_unit: str, overwrite: bool, inputs=()) -> Path:
    """Write everything into a temporary sibling of `out_dir`, then rename it into place; returns `out_dir`.

    Args:
        splits (`dict[str, datasets.Dataset]`): final datasets by split name, TRL columns only.
        rejects (`list[dict]`): one entry per row left out (`where`, `source`, `filter`, `reason`, `row`).
        card (`dict`): facts for `card.json`; `splits` (rows + sha256) and `files` are filled in here.
        lengths (`list[int]`): length of every kept row, for the histogram.
        overwrite (`bool`): replace an existing `out_dir`; without it, one that appeared while building is an error.
        inputs (*optional*): paths the job read, which `out_dir` must not be or hold (`check_output_dir`).
    """

    def write(tmp: Path):
        card["splits"] = {}
        for name, dataset in splits.items():
            dataset.to_parquet(str(tmp / f"{name}.parquet"))
            card["splits"][name] = {"rows": len(dataset), "file": f"{name}.parquet",
                                    "sha256": sha256(tmp / f"{name}.parquet")}
        write_jsonl(tmp / "rejects.jsonl", rejects)
        plot_lengths(lengths, length_unit, card.get("filters", {}), tmp / "lengths.png")
        card["fingerprint"] = hashlib.sha256("".join(s["sha256"] for s in card["splits"].values()).encode()).hexdigest()
        card["files"] = sorted(p.name for p in tmp.iterdir()) + ["card.json", "README.md"]
        write_json(tmp / "card.json", card)
        write_text(tmp / "README.md", render_readme(card))
        if overwrite:  # checked again: what sits at `out_dir` may have changed while the job ran
            check_replaceable(out_dir, overwrite, inputs)

    try:
        return replace_dir(out_dir, write, if_exists="replace" if overwrite else "fail")
    except FileExistsError:
        raise UserError(f"output folder {out_dir} appeared while building; not replacing it") from None
    except Exception as exc:  # pyarrow and matplotlib wrap some OSErrors of a failed write in their own types
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise write_error(exc, out_dir) from exc
        raise


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 1),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def plot_lengths(lengths: list[int], unit: str, filters: dict, path: Path):
    """Histogram of the kept rows' lengths, with the min/max limits drawn when set."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(lengths or [0], bins=min(50, max(5, len(set(lengths)))), color="#4c72b0")
    for key, style in (("min_tokens", "--"), ("max_tokens", ":")):
        if filters.get(key) is not None:
            ax.axvline(filters[key], color="#c44e52", linestyle=style, label=f"{key}={filters[key]}")
    if any(filters.get(k) is not None for k in ("min_tokens", "max_tokens")):
        ax.legend()
    ax.set_xlabel(f"length in {unit}")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(lengths):,} rows kept")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def render_readme(card: dict) -> str:
    """The data card as Markdown, with a Hub-style YAML header so the folder can be pushed as a dataset repo."""
    licenses = sorted({s["license"] for s in card["sources"]})
    # a split without rows is left out of the Hub config: `load_dataset(folder)` refuses one ("corresponds to no data")
    header = ["---", f"license: {licenses[0] if len(licenses) == 1 else 'other'}", "configs:", "- config_name: default",
              "  data_files:"] + [f"  - split: {n}\n    path: {s['file']}" for n, s in card["splits"].items()
                                  if s["rows"]] + ["---"]
    sources = _table(["source", "path", "format", "license", "read", "invalid", "kept"],
                     [[s["name"], f"`{s['path']}`", s["format"], s["license"], s["rows_read"], s["rows_invalid"],
                       s["rows_kept"]] for s in card["sources"]])
    steps = _table(["step", "rows before", "rows after", "removed"],
                   [[c["step"], c["before"], c["after"], c["before"] - c["after"]] for c in card["counts"]])
    splits = _table(["split", "rows", "file", "sha256"],
                    [[n, s["rows"], s["file"], f"`{s['sha256']}`"] for n, s in card["splits"].items()])
    notes = [f"- **{s['name']}**: {s['notes']}" for s in card["sources"] if s.get("notes")]
    decontam = card.get("decontamination") or {}
    parts = [
        "\n".join(header), f"# {card['name']}", "",
        f"{card['kind']} data built by `data_prep/{card['job']}.py` on {card['created']}. "
        f"Columns: {', '.join(f'`{c}`' for c in card['columns'])}.", "",
        "## How it was built", "", "```bash", card["command"], "```", "",
        "## Sources", "", sources, "", *(["Notes:", "", *notes, ""] if notes else []),
        "## Filters", "", steps, "",
        f"Rows left out are listed with their reason in `rejects.jsonl` ({card['rejects']} rows).", "",
        *(["## Decontamination", "", f"Evaluation sets: {', '.join(f'`{p}`' for p in decontam['eval_sets'])}; "
           f"{decontam['ngram']}-gram overlap; {decontam['removed']} rows removed.", ""] if decontam else []),
        "## Lengths", "", f"![length histogram](lengths.png)  \nLength in {card['length_unit']}: "
        f"{_summary(card.get('length_stats', {}))}.", "",
        "## Files", "", splits, "", f"Fingerprint (sha256 of the split hashes): `{card['fingerprint']}`", "",
        "## Options", "", "```yaml", card["options_yaml"].rstrip(), "```", "",
    ]
    return "\n".join(parts)


def _summary(stats: dict) -> str:
    if not stats:
        return "no rows"
    return ", ".join(f"{k} {v:g}" for k, v in stats.items())


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_generated(config, tables: dict[str, list[dict]], *, job: str, kind: str, source: dict, command: str,
                    lengths: list[int], length_unit: str, to_dataset=None, overwrite: bool = True,
                    inputs=(), read: dict[str, int] | None = None, keep_empty: bool = False) -> Path:
    """Write rows a generator made (no input files to import): same folder layout and card as the importers'.

    Args:
        config: the job's config dataclass (`output_dir` and the options recorded in the card).
        tables (`dict[str, list[dict]]`): rows per split.
        source (`dict`): `name`, `path`, `license` and `notes` of what generated the rows.
        to_dataset (*optional*): rows -> `datasets.Dataset` where the default typing does not fit (e.g. images).
        overwrite (`bool`, *optional*, defaults to `True`): replace a previous output of a job (a folder with
            `card.json`; `check_output_dir` refuses anything else). Generators rebuild their own folder by default.
        inputs (*optional*): paths the job read, which `output_dir` must not be or hold.
        read (*optional*): rows read per split where it is not the rows written (the prompts a pair is sampled
            for: one that gives no pair is a row removed).
        keep_empty (`bool`, *optional*, defaults to `False`): write a split without rows too, with the features of
            one that has rows (the job's splits share one schema): a stage that names it finds it, and sees no rows.
    """
    import dataclasses

    import datasets
    import yaml

    total = sum(len(rows) for rows in tables.values())
    read = read or {split: len(rows) for split, rows in tables.items()}
    card = {
        "name": Path(config.output_dir).name, "job": job, "kind": kind,
        "columns": sorted({c for rows in tables.values() for row in rows[:1] for c in row}),
        "created": now(), "command": command,
        "sources": [{"format": "generated", "rows_read": sum(read.values()), "rows_invalid": 0, "rows_kept": total,
                     **source}],
        "counts": [{"step": f"generate {split}" + _domains(rows), "before": read[split], "after": len(rows)}
                   for split, rows in tables.items()],
        "rejects": 0, "filters": {}, "decontamination": None, "length_unit": length_unit,
        "length_stats": length_stats(lengths),
        "options_yaml": yaml.safe_dump(dataclasses.asdict(config), sort_keys=False),
    }
    to_dataset = to_dataset or datasets.Dataset.from_list
    splits = {name: to_dataset(rows) for name, rows in tables.items() if rows}
    if keep_empty and splits:  # an empty split keeps the others' columns and types: `datasets` loads it
        empty = next(iter(splits.values())).select([])
        splits = {name: splits.get(name, empty) for name in tables}
    return write_output(Path(config.output_dir), splits, [], card, lengths, length_unit, overwrite, inputs)


def _domains(rows: list[dict]) -> str:
    from collections import Counter

    counts = Counter(r["domain"] for r in rows if r.get("domain"))
    return " (" + ", ".join(f"{d} {n}" for d, n in sorted(counts.items())) + ")" if counts else ""
