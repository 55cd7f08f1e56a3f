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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from posttrain.errors import UserError, make_folder
from posttrain.io import replace_dir, write_json, write_jsonl, write_text


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail before any work if `out_dir` exists and `overwrite` is off."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} exists; pass --overwrite true (or `overwrite: true`) to replace it")
    make_folder(out.parent, "the folder for the output")
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_output(out_dir: Path, splits: dict, rejects: list[dict], card: dict, lengths: list[int],
                 length_unit: str, overwrite: bool) -> Path:
    """Write everything into a temporary sibling of `out_dir`, then rename it into place; returns `out_dir`.

    Args:
        splits (`dict[str, datasets.Dataset]`): final datasets by split name, TRL columns only.
        rejects (`list[dict]`): one entry per row left out (`where`, `source`, `filter`, `reason`, `row`).
        card (`dict`): facts for `card.json`; `splits` (rows + sha256) and `files` are filled in here.
        lengths (`list[int]`): length of every kept row, for the histogram.
        overwrite (`bool`): replace an existing `out_dir`; without it, one that appeared while building is an error.
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

    try:
        return replace_dir(out_dir, write, if_exists="replace" if overwrite else "fail")
    except FileExistsError:
        raise UserError(f"output folder {out_dir} appeared while building; not replacing it") from None


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
    header = ["---", f"license: {licenses[0] if len(licenses) == 1 else 'other'}", "configs:", "- config_name: default",
              "  data_files:"] + [f"  - split: {n}\n    path: {s['file']}" for n, s in card["splits"].items()] + ["---"]
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
                    lengths: list[int], length_unit: str, to_dataset=None) -> Path:
    """Write rows a generator made (no input files to import): same folder layout and card as the importers'.

    Args:
        config: the job's config dataclass (`output_dir` and the options recorded in the card).
        tables (`dict[str, list[dict]]`): rows per split.
        source (`dict`): `name`, `path`, `license` and `notes` of what generated the rows.
        to_dataset (*optional*): rows -> `datasets.Dataset` where the default typing does not fit (e.g. images).
    """
    import dataclasses

    import datasets
    import yaml

    total = sum(len(rows) for rows in tables.values())
    card = {
        "name": Path(config.output_dir).name, "job": job, "kind": kind,
        "columns": sorted({c for rows in tables.values() for row in rows[:1] for c in row}),
        "created": now(), "command": command,
        "sources": [{"format": "generated", "rows_read": total, "rows_invalid": 0, "rows_kept": total, **source}],
        "counts": [{"step": f"generate {split}" + _domains(rows), "before": len(rows), "after": len(rows)}
                   for split, rows in tables.items()],
        "rejects": 0, "filters": {}, "decontamination": None, "length_unit": length_unit,
        "length_stats": length_stats(lengths),
        "options_yaml": yaml.safe_dump(dataclasses.asdict(config), sort_keys=False),
    }
    to_dataset = to_dataset or datasets.Dataset.from_list
    splits = {name: to_dataset(rows) for name, rows in tables.items() if rows}
    return write_output(Path(config.output_dir), splits, [], card, lengths, length_unit, overwrite=True)


def _domains(rows: list[dict]) -> str:
    from collections import Counter

    counts = Counter(r["domain"] for r in rows if r.get("domain"))
    return " (" + ", ".join(f"{d} {n}" for d, n in sorted(counts.items())) + ")" if counts else ""
