"""Extract a few hundred human-human conversations from the `chitchat-dataset` PyPI wheel (MIT), once.

BYU's Chit-Chat Challenge corpus (7,168 open-domain conversations between people): real multi-turn dialogue that,
unlike benchmark sets, may be trained on. The first speaker becomes `user`, the other `assistant`, consecutive
messages of one speaker join into one turn, and each conversation is cut after at most `--max_turns` turns, ending on
an assistant turn. The best-rated conversations are kept (sum of the corpus's witty/upbeat/interesting ratings).

    pip download --no-deps chitchat-dataset==0.9.0
    python -m data_prep.extract_chitchat --wheel chitchat_dataset-0.9.0-py3-none-any.whl

Writes `data_prep/sources/chitchat.jsonl` (`messages`, `id`) and `chitchat.md` (license front matter, provenance).
"""

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import write_jsonl, write_text

from .config import run

SOURCES = Path(__file__).parent / "sources"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.extract_chitchat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", required=True, help="chitchat_dataset-0.9.0-py3-none-any.whl (or its dataset.json).")
    parser.dataclass_types = []  # plain flags, no config dataclass (see `data_prep.config.make_parser`)
    parser.add_argument("--output", default=str(SOURCES / "chitchat.jsonl"), help="JSON Lines file to write.")
    parser.add_argument("--conversations", type=int, default=300, help="How many conversations to keep.")
    parser.add_argument("--max_turns", type=int, default=8, help="Turns kept per conversation (user + assistant).")
    return parser


def load_corpus(path: Path) -> dict:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with zipfile.ZipFile(path) as wheel:
        name = next((n for n in wheel.namelist() if n.endswith("chitchat_dataset/dataset.json")), None)
        if name is None:
            raise UserError(f"{path}: no chitchat_dataset/dataset.json inside; is it the chitchat-dataset wheel?")
        return json.loads(wheel.read(name))


def to_messages(conversation: dict, max_turns: int) -> list[dict]:
    """Speaker turns -> user/assistant messages, cut to end on an assistant turn."""
    turns = [" ".join(u["text"].strip() for u in turn if u["text"].strip()) for turn in conversation["messages"]]
    turns = [t for t in turns if t][:max_turns]
    # Turns alternate between the two speakers in the corpus; an empty turn dropped above would break that, so keep
    # only the prefix where the senders still alternate.
    senders = [turn[0]["sender"] for turn in conversation["messages"] if any(u["text"].strip() for u in turn)]
    alternating = next((i for i in range(1, len(turns)) if senders[i] == senders[i - 1]), len(turns))
    turns = turns[: alternating - alternating % 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    path = Path(args.wheel)
    if not path.is_file():
        raise UserError(f"{path} not found; get it with `pip download --no-deps chitchat-dataset==0.9.0`")
    corpus = load_corpus(path)
    ranked = sorted(corpus.items(), key=lambda item: (-sum(item[1].get("ratings", {}).values()), item[0]))
    rows = []
    for conversation_id, conversation in ranked:
        messages = to_messages(conversation, args.max_turns)
        if len(messages) >= 4:
            rows.append({"messages": messages, "id": conversation_id})
        if len(rows) == args.conversations:
            break
    output = Path(args.output)
    write_jsonl(output, rows)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    write_text(output.with_suffix(".md"), f"""---
license: MIT
notes: "chitchat-dataset 0.9.0 (PyPI, BYU PCC lab): {len(rows)} best-rated human-human conversations"
---
# chitchat.jsonl

{len(rows)} open-domain conversations between people from BYU's Chit-Chat Challenge corpus, extracted by
`python -m data_prep.extract_chitchat` from the PyPI wheel `chitchat-dataset==0.9.0` (sha256 `{digest}`).

- License: MIT (Copyright (c) 2019 Perception, Control and Cognition Lab; the wheel's LICENSE file).
- Columns: `messages` (the first speaker as `user`, the other as `assistant`, at most {args.max_turns} turns, ending
  on an assistant turn) and `id` (the corpus's conversation id; ignored by the importers).
- Selection: the conversations with the highest sum of the corpus's witty/upbeat/interesting ratings, ties by id.
- Caveat: casual chat between students, not assistant behaviour; good for multi-turn plumbing and smoke runs.
""")
    print(f"wrote {output} ({len(rows)} conversations) and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run(main)
