"""Check data files without building anything: every bad row is reported as `FILE:LINE: message`.

    posttrain data validate FILE [FILE ...] [--format F]
    posttrain data validate path/to/dataset_info.json[:NAME]     # LLaMA-Factory's registry: one or every dataset

Exit status 0 when every row is valid, 1 when any row is bad (2 for a usage error, or a file that could not be read
at all: the other files are still checked). Rows a build would filter rather
than reject (rated responses closer than `--min_score_margin`) are counted, not reported as bad.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

from posttrain.errors import UserError

from .config import run, shipped_path
from .formats import FORMATS, Options, convert_rows
from .registry import load_entry, read_registry, split_spec


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain data validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="Data files, save_to_disk folders, Hub ids, or REGISTRY.json[:NAME] (LLaMA-Factory dataset_info.json).")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="Input format; `auto` detects it from the keys of the rows.")
    parser.add_argument("--min_score_margin", type=float, default=1.0,
                        help="Rated data: best/worst score gap below which a row would be filtered.")
    parser.add_argument("--max_row_bytes", type=int, default=2_000_000,
                        help="Rows of a text source (JSON Lines, JSON, CSV) larger than this are errors.")
    parser.add_argument("--check_images", type=lambda s: s.lower() in ("true", "1", "yes"), default=True,
                        help="Open every image with PIL to check it decodes (true/false).")
    return parser


def validate_file(path: str, args) -> tuple[int, int]:
    """Print each bad row of `path` (a file, or `REGISTRY.json:NAME`); returns `(rows, bad rows)`."""
    registry = split_spec(path)
    if registry and registry[1] is None:  # a whole dataset_info.json: every dataset in it
        counts = [validate_file(f"{registry[0]}:{name}", args) for name in read_registry(registry[0])]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    base = Path(path).parent if Path(path).exists() else Path.cwd()
    opts = Options(base_dir=base, check_images=args.check_images, min_score_margin=args.min_score_margin,
                   embedded_images=True)
    fmt, data, split, subset, remap = args.format, path, "train", None, None
    if registry:
        entry = load_entry(*registry)
        opts.base_dir, remap, data, split, subset = entry.base_dir, entry.remap, entry.path, entry.split, entry.subset
        fmt = entry.format if fmt == "auto" else fmt
    fmt, rows = convert_rows(data, fmt, opts, args.max_row_bytes, split, subset, remap)
    total = bad = skipped = 0
    notes = Counter()
    for item in rows:
        total += 1
        if item.error:
            bad += 1
            print(f"{item.where}: {item.error}")
        skipped += item.skip is not None
        if item.note:
            notes[item.note] += 1
    note = f", {skipped} below the score margin (filtered at build time)" if skipped else ""
    note += "".join(f"; warning: {count} with {text}" for text, count in notes.items())
    verdict = f"{bad} bad" if bad else "all valid"
    print(f"{path}: {total} rows in format '{fmt}', {verdict}{note} ({FORMATS[fmt][0]} data)", file=sys.stderr)
    return total, bad


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    bad = unreadable = 0
    for path in args.files:
        try:
            bad += validate_file(shipped_path(path), args)[1]
        except UserError as exc:  # a file not read at all (empty, unknown format): the files after it still checked
            if len(args.files) == 1:
                raise
            print(f"error: {exc}", file=sys.stderr)
            unreadable += 1
    sys.stdout.flush()
    return 2 if unreadable else 1 if bad else 0


if __name__ == "__main__":
    run(main)
