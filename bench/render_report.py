"""Build a run's report and screenshot it in headless Chromium, to look at it as a user would.

    python bench/render_report.py outputs/<run> [--out shots/] [--height 6000] [--compare outputs/<other> ...]

Writes `<out>/<run>.png` (the full page, 1280 px wide) and `<out>/<run>-<i>.png` slices of 1500 px that an image
viewer shows at full resolution. Needs `chromium` on PATH (Debian: `apt-get install -y chromium`).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SLICE = 1500


def screenshot(html: Path, png: Path, height: int) -> None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size=1280,{height}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("shots"))
    parser.add_argument("--height", type=int, default=6000, help="page height to capture, in pixels")
    parser.add_argument("--compare", nargs="+", type=Path, default=None)
    args = parser.parse_args(argv)

    from PIL import Image

    from posttrain.report import build_report

    html = build_report(args.run, args.compare)
    args.out.mkdir(parents=True, exist_ok=True)
    full = args.out / f"{args.run.name}.png"
    screenshot(html, full, args.height)
    image = Image.open(full)
    for i, top in enumerate(range(0, image.height, SLICE)):
        image.crop((0, top, image.width, min(top + SLICE, image.height))).save(args.out / f"{args.run.name}-{i}.png")
    print(f"{html}\n{full} (+ {i + 1} slices of {SLICE} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
