"""Build verifiable image tasks: VQA rows (image + question + short answer) in thinking and non-thinking form.

The vision counterpart of `build_verifiable_tasks`: every answer is checked by the same reward functions UPO optimises
(`accuracy`: exact match after normalisation), so "did post-training help" is a number. Sources:

- `easy_vqa` (default): the easy-VQA dataset shipped in the PyPI package `easy-vqa` (MIT license): 64x64 images of
  one coloured shape; questions about its colour, its shape, or yes/no ("is there a red shape?"). Test rows come from
  its test images. Each image's colour and shape are read off its questions, which gives worked steps for the
  thinking rendering ("The image shows a blue rectangle. ...").
- a data file (jsonl, json, parquet, csv) of VQA rows in any format `data_prep.formats` reads: `vqa` (`image`/`images`
  as paths or `{"bytes"}`, `question`, `answer`, `reasoning`?, `domain`?), ERNIEKit VL (`image_info`/`text_info`), or
  single-turn `messages` with `images`. Held-out rows are chosen by a hash of the image, so no test image is trained on.

Every image must exist and decode; a bad one stops the job with `FILE:LINE: "images[0]" ...`. Images are embedded in
the parquet files (bytes), so the output folder is self-contained.

Output (`--output_dir DIR`): `sft.parquet` (`messages`, `images`, `thinking`, `domain`), `prompts.parquet` (`prompt`,
`images`, `answer`, `domain`, `thinking`, reference reply `completion`: RL prompts), `test.parquet` (held-out, same
columns), `README.md` and `card.json`.

    posttrain data build_vqa_tasks --output_dir data/vqa --n_train 2000 --n_test 60
"""

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import UserError

from . import card as card_lib
from .config import command_line, parse_config, run
from .config import make_parser as _make_parser
from .images import embed_image

PROG = "posttrain data build_vqa_tasks"
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
EASY_VQA = {"name": "easy-vqa", "license": "mit", "path": "PyPI package easy-vqa 1.0 (github.com/vzhou842/easy-VQA)",
            "notes": "4,000 train / 1,000 test 64x64 images of one coloured shape, 13 answers; MIT license, "
                     "Copyright (c) 2019 Victor Zhou. Thinking steps are generated from each image's colour and shape, "
                     "read off its own questions."}


@dataclass
class VQATasksConfig:
    output_dir: str = field(default="data/vqa",
                            metadata={"help": "Output folder; an earlier one a data job wrote is replaced atomically."})
    source: str = field(default="easy_vqa", metadata={"help": "`easy_vqa`, or a data file of VQA rows."})
    format: str = field(default="auto", metadata={"help": "Format of a `source` file (auto: from its keys)."})
    license: str = field(default="unknown", metadata={"help": "License of a `source` file, for the data card."})
    n_train: int = field(default=2000, metadata={"help": "Training tasks (SFT rows and RL prompts).", "min": 1})
    n_test: int = field(default=60, metadata={"help": "Held-out tasks for evaluation.", "min": 0})
    thinking_fraction: float = field(default=0.5, metadata={"help": "easy_vqa: fraction of tasks with worked steps."})
    balance_domains: bool = field(default=True, metadata={"help": "Draw the domains (colour, shape, yes/no...) "
                                                                  "equally often instead of as in the source."})
    test_every: int = field(default=10, metadata={"help": "Source file: about one image in this many is held out.",
                                                  "min": 1})
    check_images: bool = field(default=True, metadata={"help": "Open every image with PIL to check it decodes."})
    max_row_bytes: int = field(default=20_000_000, metadata={"help": "Larger source rows are errors."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


# ----------------------------------------------------------------------------------------------------------------------
# easy-VQA
# ----------------------------------------------------------------------------------------------------------------------
def easy_vqa_split(split: str) -> list[dict]:
    """Tasks `{question, answer, image (path), domain, facts}` of easy-VQA's `train` or `test` split."""
    try:
        import easy_vqa
    except ImportError:
        raise UserError("source 'easy_vqa' needs the PyPI package easy-vqa (3 MB, MIT): pip install easy-vqa") from None
    questions, answers, image_ids = (easy_vqa.get_train_questions if split == "train" else
                                     easy_vqa.get_test_questions)()
    paths = (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()
    facts: dict[int, dict] = {}
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        facts.setdefault(image, {}).update(_facts(question, answer))
    return [{"question": q[0].upper() + q[1:], "answer": a, "image": paths[i], "domain": _domain(a),
             "facts": facts[i]} for q, a, i in zip(questions, answers, image_ids, strict=True)]


def _domain(answer: str) -> str:
    return "color" if answer in COLORS else "shape" if answer in SHAPES else "yes_no"


def _yes_no(question: str) -> tuple[str, bool] | None:
    """(the colour or shape a yes/no question asks about, whether it is negated)."""
    found = [w for w in re.findall(r"[a-z]+", question.lower()) if w in SHAPES + COLORS]
    return (found[0], bool(re.search(r"\b(not|no)\b", question.lower()))) if found else None


def _facts(question: str, answer: str) -> dict:
    """What one question and answer tell about its image: its `color` and/or `shape`."""
    if answer in COLORS:
        return {"color": answer}
    if answer in SHAPES:
        return {"shape": answer}
    asked = _yes_no(question)
    if asked is None or (answer == "yes") == asked[1]:  # "is there a red shape?" no: says what it is not
        return {}
    return {"color" if asked[0] in COLORS else "shape": asked[0]}


def easy_vqa_steps(task: dict) -> str | None:
    """Worked reasoning for the thinking rendering, or None when the image's colour or shape is unknown."""
    color, shape = task["facts"].get("color"), task["facts"].get("shape")
    if not (color and shape):
        return None
    seen = f"I see a {color} {shape}."  # short on purpose: every reasoning token is trained and generated
    if task["domain"] != "yes_no":
        return f"{seen}\nIts {task['domain']} is {task['answer']}."
    asked, negated = _yes_no(task["question"])
    present = asked in (color, shape)
    if (present != negated) != (task["answer"] == "yes"):
        return None  # the question does not parse the way the answer implies: no steps rather than wrong ones
    thing = f"{asked} shape" if asked in COLORS else asked
    there = f"A {thing} is there" if present else f"No {thing} is there"
    return f"{seen}\n{there}{', and the question says not' if negated else ''}."


# ----------------------------------------------------------------------------------------------------------------------
# VQA rows from a file, through the shared format converters
# ----------------------------------------------------------------------------------------------------------------------
def file_tasks(config: VQATasksConfig) -> dict[str, list[dict]]:
    """Tasks of a VQA file, held-out by image hash; any bad row is an error naming `FILE:LINE` and the field."""
    from .formats import FORMATS, Options, convert_rows
    from .messages import text_of

    opts = Options(base_dir=Path(config.source).parent, check_images=config.check_images, embedded_images=True)
    fmt, rows = convert_rows(config.source, config.format, opts, config.max_row_bytes)
    if FORMATS[fmt][0] != "sft":
        raise UserError(f"{config.source}: rows in format '{fmt}' are not VQA rows (image + question + answer)")
    tasks = {"train": [], "test": []}
    for row in rows:
        if row.error:
            raise UserError(f"{row.where}: {row.error}")
        record = row.record
        turns = [m for m in record["messages"] if m["role"] != "system"]
        if len(turns) != 2 or not record.get("images"):
            raise UserError(f"{row.where}: expected one question about an image and its answer; got {len(turns)} "
                            f"turns and {len(record.get('images') or [])} images")
        reply = turns[1]["content"]
        images = [embed_image(image) for image in record["images"]]
        task = {"prompt": record["messages"][:-1], "reply": reply, "answer": reply.rsplit("</think>", 1)[-1].strip(),
                "images": images, "thinking": bool(record.get("thinking")),
                "domain": str((row.raw or {}).get("domain") or "vqa"), "question": text_of(turns[0]["content"])}
        digest = hashlib.sha256(b"".join(image["bytes"] for image in images)).hexdigest()
        tasks["test" if int(digest, 16) % config.test_every == 0 else "train"].append(task)
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and tables
# ----------------------------------------------------------------------------------------------------------------------
def sample(tasks: list[dict], n: int, balance: bool, rng: random.Random) -> list[dict]:
    """`n` tasks, round-robin over the domains when `balance` (each domain shuffled), else a plain shuffle."""
    tasks = list(tasks)
    rng.shuffle(tasks)
    if not balance:
        return tasks[:n]
    by_domain: dict[str, list[dict]] = {}
    for task in tasks:
        by_domain.setdefault(task["domain"], []).append(task)
    queues = [by_domain[d] for d in sorted(by_domain)]
    out = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


def easy_vqa_task(task: dict, thinking: bool) -> dict:
    steps = easy_vqa_steps(task) if thinking else None
    reply = f"<think>\n{steps}\n</think>\n\n{task['answer']}" if steps else task["answer"]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task["question"]}]}]
    return {"prompt": prompt, "reply": reply, "answer": task["answer"], "thinking": bool(steps),
            "images": [{"bytes": Path(task["image"]).read_bytes()}], "domain": task["domain"],
            "question": task["question"]}


def generate(config: VQATasksConfig) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The tasks sampled per split, and how many the source held per split (the card's rows read)."""
    rng = random.Random(config.seed)
    if config.source == "easy_vqa":
        tables, read = {}, {}
        for split, n in (("train", config.n_train), ("test", config.n_test)):
            tasks = easy_vqa_split(split)
            read[split] = len(tasks)
            chosen = sample(tasks, n, config.balance_domains, rng)
            tables[split] = [easy_vqa_task(t, rng.random() < config.thinking_fraction) for t in chosen]
        return tables, read
    tasks = file_tasks(config)
    return ({split: sample(tasks[split], n, config.balance_domains, rng)
             for split, n in (("train", config.n_train), ("test", config.n_test))},
            {split: len(rows) for split, rows in tasks.items()})


SPLITS = ("sft", "prompts", "test")  # the tables `to_datasets` writes: a recipe's split names are checked against them


def to_datasets(tables: dict[str, list[dict]]) -> dict:
    """sft / prompts / test datasets; messages as `Json` (image parts and text replies mixed), images embedded."""
    from datasets import Dataset, Features, Image, Json, List, Value

    common = {"images": List(Image()), "domain": Value("string"), "thinking": Value("bool")}
    sft_features = Features({"messages": List(Json()), **common})
    rl_features = Features({"prompt": List(Json()), **common, "answer": Value("string"), "completion": Value("string")})

    def rl(task):
        return {"prompt": task["prompt"], "images": task["images"], "domain": task["domain"],
                "thinking": task["thinking"], "answer": task["answer"], "completion": task["reply"]}

    def dataset(rows, features):  # from_list cannot build an empty split
        return Dataset.from_list(rows, features=features) if rows else \
            Dataset.from_dict({key: [] for key in features}, features=features)

    sft = [{"messages": t["prompt"] + [{"role": "assistant", "content": t["reply"]}], "images": t["images"],
            "domain": t["domain"], "thinking": t["thinking"]} for t in tables["train"]]
    return {"sft": dataset(sft, sft_features), "prompts": dataset([rl(t) for t in tables["train"]], rl_features),
            "test": dataset([rl(t) for t in tables["test"]], rl_features)}


def write(config: VQATasksConfig, tables: dict[str, list[dict]], command: str, read: dict[str, int]) -> Path:
    """The output folder with the same data card as the other generators (`card.write_output`); `read`: the tasks
    the source held per split, of which `tables` is a sample."""
    import dataclasses

    import yaml

    splits = to_datasets(tables)
    if config.source == "easy_vqa":
        source = {**EASY_VQA, "format": "easy_vqa"}
    else:
        source = {"name": Path(config.source).stem, "path": config.source, "license": config.license,
                  "format": config.format, "notes": "held-out rows chosen by a hash of the image bytes"}
    lengths = [len(t["reply"]) for rows in tables.values() for t in rows]
    total = sum(len(rows) for rows in tables.values())
    card = {
        "name": Path(config.output_dir).name, "job": "build_vqa_tasks", "kind": "verifiable image tasks",
        "columns": sorted({c for ds in splits.values() for c in ds.column_names}), "created": card_lib.now(),
        "command": command,
        "sources": [{"rows_read": sum(read.values()), "rows_invalid": 0, "rows_kept": total, **source}],
        "counts": [{"step": f"sample {split}" + card_lib._domains(tables["test" if split == "test" else "train"]),
                    "before": read["test" if split == "test" else "train"], "after": len(ds)}
                   for split, ds in splits.items()],
        "rejects": 0, "filters": {}, "decontamination": None, "length_unit": "characters of the reference reply",
        "length_stats": card_lib.length_stats(lengths),
        "options_yaml": yaml.safe_dump(dataclasses.asdict(config), sort_keys=False),
    }
    return card_lib.write_output(Path(config.output_dir), splits, [], card, lengths, card["length_unit"],
                                 overwrite=True, inputs=[config.source])


def make_parser():
    return _make_parser(VQATasksConfig, PROG, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    config = parse_config(VQATasksConfig, make_parser(), argv, needs_sources=False)
    card_lib.check_output_dir(config.output_dir, overwrite=True, inputs=[config.source])
    tables, read = generate(config)
    if not tables["train"]:
        raise UserError(f"{PROG}: no training tasks from {config.source}")
    write(config, tables, command_line(PROG, argv), read)
    print(f"wrote {config.output_dir}: sft {len(tables['train'])}, prompts {len(tables['train'])}, "
          f"test {len(tables['test'])}")
    return 0


if __name__ == "__main__":
    run(main)
