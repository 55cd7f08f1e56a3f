"""Check data files without building anything: every bad row is reported as `FILE:LINE: message`.

    posttrain data validate FILE [FILE ...] [--format F]

Exit status 0 when every row is valid, 1 when any row is bad (2 for a usage error). Rows a build would filter rather
than reject (rated responses closer than `--min_score_margin`) are counted, not reported as bad.
"""

import argparse
import sys
from pathlib import Path

from .config import run
from .formats import FORMATS, Options, convert_rows


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain data validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="Data files, save_to_disk folders or Hub ids.")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="Input format; `auto` detects it from the keys of the rows.")
    parser.add_argument("--min_score_margin", type=float, default=1.0,
                        help="Rated data: best/worst score gap below which a row would be filtered.")
    parser.add_argument("--max_row_bytes", type=int, default=2_000_000, help="Rows larger than this are errors.")
    parser.add_argument("--check_images", type=lambda s: s.lower() in ("true", "1", "yes"), default=True,
                        help="Open every image with PIL to check it decodes (true/false).")
    return parser


def validate_file(path: str, args) -> tuple[int, int]:
    """Print each bad row of `path`; returns `(rows, bad rows)`."""
    base = Path(path).parent if Path(path).exists() else Path.cwd()
    opts = Options(base_dir=base, check_images=args.check_images, min_score_margin=args.min_score_margin)
    fmt, rows = convert_rows(path, args.format, opts, args.max_row_bytes)
    total = bad = skipped = 0
    for item in rows:
        total += 1
        if item.error:
            bad += 1
            print(f"{item.where}: {item.error}")
        skipped += item.skip is not None
    note = f", {skipped} below the score margin (filtered at build time)" if skipped else ""
    verdict = f"{bad} bad" if bad else "all valid"
    print(f"{path}: {total} rows in format '{fmt}', {verdict}{note}", file=sys.stderr)
    return total, bad


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    bad = sum(validate_file(path, args)[1] for path in args.files)
    sys.stdout.flush()
    return 1 if bad else 0


if __name__ == "__main__":
    run(main)
