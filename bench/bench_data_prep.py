"""Scale check of the data-prep cleaning: 100k instruction rows of ~300 tokens through dedup, near-dup, decontam.

    OMP_NUM_THREADS=1 python bench/bench_data_prep.py [--rows 100000] [--num_proc 2]

Generates alpaca rows (Zipf-distributed words, ~225 words ~ 300 tokens each) with known plants: 2% exact copies (case
and spacing changed), 2% near copies (1% of words changed: Jaccard ~0.9), 0.5% rows quoting an evaluation question. Runs the same
building blocks as `build_sft_set` (read + validate, exact dedup, MinHash/LSH near-dup, 13-gram decontamination)
and prints the wall time of each step, the total, the peak RSS, and how many plants each filter caught.
Target on 2 cores: <= 3 minutes and <= 4 GB.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import build, clean  # noqa: E402
from data_prep.config import SFTSetConfig, SourceConfig  # noqa: E402


def vocabulary(size: int, rng) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(size)])


def generate(path: Path, eval_path: Path, rows: int, seed: int = 0) -> dict:
    """Write `rows` alpaca rows and a 1,000-question eval set; returns how many of each plant were written."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(30_000, rng)
    ranks = np.arange(1, len(vocab) + 1)
    probs = (1 / ranks) / (1 / ranks).sum()  # Zipf: a few very common words, a long tail, like real text

    def blocks():  # word ids drawn 400k at a time: one `choice` call per word would take minutes
        while True:
            yield from rng.choice(len(vocab), size=(10_000, 40), p=probs)

    pool = blocks()

    def text(n: int) -> str:
        ids = np.concatenate([next(pool) for _ in range(-(-n // 40))])[:n]
        return " ".join(vocab[ids])

    questions = [text(40) for _ in range(1000)]
    eval_path.write_text("".join(json.dumps({"question": q, "answer": "42"}) + "\n" for q in questions))
    plants = {"exact": 0, "near": 0, "contaminated": 0}
    originals = []
    with open(path, "w") as f:
        for _ in range(rows):
            kind = rng.random()
            if originals and kind < 0.02:
                row = dict(originals[rng.integers(len(originals))])
                row["output"] = "  " + row["output"].upper() + " "
                plants["exact"] += 1
            elif originals and kind < 0.04:
                row = dict(originals[rng.integers(len(originals))])
                words = row["output"].split()
                for j in rng.choice(len(words), size=len(words) // 100, replace=False):
                    words[j] = vocab[rng.integers(len(vocab))]
                row["output"] = " ".join(words)
                plants["near"] += 1
            elif kind < 0.045:
                row = {"instruction": "Solve: " + questions[rng.integers(len(questions))], "output": text(180)}
                plants["contaminated"] += 1
            else:
                row = {"instruction": text(25), "input": text(15) if kind > 0.5 else "", "output": text(185)}
                if len(originals) < 5000:
                    originals.append(row)
            f.write(json.dumps(row) + "\n")
    return plants


def peak_rss_gb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest child (the map workers), in GB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    return own, children


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    start = time.perf_counter()
    plants = generate(tmp / "train.jsonl", tmp / "eval.jsonl", args.rows)
    print(f"generated {args.rows:,} rows in {time.perf_counter() - start:.1f} s; plants: {plants}")

    cfg = SFTSetConfig(sources=[SourceConfig(path=str(tmp / "train.jsonl"))], output_dir=str(tmp / "out"),
                       num_proc=args.num_proc, decontaminate=[str(tmp / "eval.jsonl")])
    timings, results = {}, {}

    def step(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - t
        return out

    total = time.perf_counter()
    records, _ = step("read + validate", build.import_source, cfg.sources[0], cfg, ("sft",), "bench", [])
    dataset, _ = step("to dataset", build.to_dataset, records, "sft")
    del records
    dataset = step("write work copy", build.on_disk, dataset, tmp / "work")
    dataset = step("collect text", clean.add_text, dataset, args.num_proc)
    dataset, results["exact"] = step("exact dedup", clean.exact_dedup, dataset, args.num_proc)
    dataset, results["near"] = step("near dedup (MinHash+LSH)", clean.near_dedup, dataset, 0.85, 5, 128,
                                    args.num_proc)
    texts = build.eval_texts(cfg.decontaminate, cfg.max_row_bytes)
    table = step("eval n-grams", clean.eval_ngrams, texts, 13)
    dataset, results["contaminated"] = step("decontaminate", clean.decontaminate, dataset, table, 13, args.num_proc)
    total = time.perf_counter() - total

    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds:7.1f} s")
    own, child = peak_rss_gb()
    print(f"total {total:.1f} s for {args.rows:,} rows ({args.num_proc} processes); kept {len(dataset):,}")
    print(f"peak RSS: main process {own:.2f} GB, largest worker {child:.2f} GB")
    for name, removed in results.items():
        print(f"  {name:<13} planted {plants[name]:>5,}  removed {len(removed):>5,}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
