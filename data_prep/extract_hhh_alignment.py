"""Extract BIG-bench's `hhh_alignment` task (human-written preference pairs) from the `bigbench` PyPI sdist, once.

The sdist is 358 MB, so it is not a dependency: this job reads the four `task.json` files out of a downloaded copy and
writes the small committed file `data_prep/sources/hhh_alignment.jsonl` (221 rows, TRL conversational preference
format) and its provenance note `hhh_alignment.md`. To regenerate:

    pip download -v --no-deps bigbench==1.0.0   # prints the sdist URL; the download itself then fails on the
                                                # package's own direct-URL dependency, so fetch that URL directly
    python -m data_prep.extract_hhh_alignment --sdist bigbench-1.0.0.tar.gz

Each example is a prompt (sometimes a multi-turn `Human:`/`Assistant:` dialogue) and two replies scored 1 and 0.
"""

import argparse
import hashlib
import json
import re
import tarfile
from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import write_jsonl, write_text

from .config import run

SUBSETS = ("harmless", "helpful", "honest", "other")
SOURCES = Path(__file__).parent / "sources"
LICENSE = "Apache-2.0"
TURN = re.compile(r"\n+(Human|Assistant):[ \t]*")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.extract_hhh_alignment",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", required=True, help="bigbench-1.0.0.tar.gz, or the folder it was unpacked into.")
    parser.dataclass_types = []  # plain flags, no config dataclass (see `data_prep.config.make_parser`)
    parser.add_argument("--output", default=str(SOURCES / "hhh_alignment.jsonl"), help="JSON Lines file to write.")
    return parser


def read_tasks(sdist: Path) -> dict[str, dict]:
    """The four subtask `task.json` documents, by subset name."""
    suffixes = {f"bigbench/benchmark_tasks/hhh_alignment/{s}/task.json": s for s in SUBSETS}
    tasks = {}
    if sdist.is_dir():
        for suffix, subset in suffixes.items():
            found = list(sdist.glob(f"**/{suffix}"))
            if found:
                tasks[subset] = json.loads(found[0].read_text(encoding="utf-8"))
    else:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                subset = next((s for suffix, s in suffixes.items() if member.name.endswith(suffix)), None)
                if subset:
                    tasks[subset] = json.load(tar.extractfile(member))
    missing = [s for s in SUBSETS if s not in tasks]
    if missing:
        raise UserError(f"{sdist}: no hhh_alignment task.json for {', '.join(missing)}; is it the bigbench sdist?")
    return tasks


def to_prompt(text: str) -> list[dict]:
    """`q\\n\\nAssistant: a\\n\\nHuman: q2` -> user/assistant/user messages (the dialogue always starts with Human)."""
    parts = TURN.split(text.strip())
    messages = [{"role": "user", "content": parts[0].strip()}]
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def to_rows(tasks: dict[str, dict]) -> list[dict]:
    rows = []
    for subset in SUBSETS:
        for index, example in enumerate(tasks[subset]["examples"]):
            ranked = sorted(example["target_scores"].items(), key=lambda item: -item[1])
            (chosen, best), (rejected, worst) = ranked[0], ranked[-1]
            if best == worst:
                continue
            rows.append({"prompt": to_prompt(example["input"]),
                         "chosen": [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [{"role": "assistant", "content": rejected.strip()}],
                         "subset": subset, "id": f"hhh_alignment/{subset}/{index}"})
    return rows


def provenance(sdist: Path, tasks: dict, rows: list[dict]) -> str:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest() if sdist.is_file() else "(unpacked folder)"
    canary = tasks[SUBSETS[0]].get("canary", "")
    counts = ", ".join(f"{s} {sum(r['subset'] == s for r in rows)}" for s in SUBSETS)
    notes = (f"BIG-bench evaluation task (canary GUID {canary.split('GUID ')[-1]}): keep it out of real training "
             "sets; see data_prep/sources/hhh_alignment.md")
    return f"""---
license: {LICENSE}
notes: "{notes}"
---
# hhh_alignment.jsonl

Human-written preference pairs from BIG-bench's `hhh_alignment` task (Askell et al., 2021, "A General Language
Assistant as a Laboratory for Alignment"), extracted by `python -m data_prep.extract_hhh_alignment`.

- Source: PyPI package `bigbench==1.0.0`, sdist sha256 `{digest}`,
  files `bigbench/benchmark_tasks/hhh_alignment/{{{','.join(SUBSETS)}}}/task.json`.
- License: {LICENSE} (BIG-bench is released under the Apache License 2.0, as the package's `setup.py` header states).
- Rows: {len(rows)} ({counts}).
- Columns: `prompt` (messages; multi-turn dialogues split on `Human:`/`Assistant:`), `chosen` and `rejected` (one
  assistant message each: the replies scored 1 and 0), `subset`, `id` (ignored by the importers).
- **Caveat: it is an evaluation set.** BIG-bench asks that its tasks stay out of training corpora; the files carry
  this canary:
  `{canary}`.
  Train on it only for pipeline smoke tests; for real runs use it as a held-out preference evaluation (DPO reward
  accuracy) and list it under `decontaminate:`.
"""


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    sdist = Path(args.sdist)
    if not sdist.exists():
        raise UserError(f"{sdist} not found; see `python -m data_prep.extract_hhh_alignment --help` to get it")
    tasks = read_tasks(sdist)
    rows = to_rows(tasks)
    output = Path(args.output)
    write_jsonl(output, rows)
    write_text(output.with_suffix(".md"), provenance(sdist, tasks, rows))
    print(f"wrote {output} ({len(rows)} pairs) and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run(main)
