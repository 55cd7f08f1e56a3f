"""Build the verifiable task suite: seeded small tasks with checkable answers, in thinking and non-thinking form.

A 135M model can learn these in CPU minutes, and every answer is checked by the same reward functions that UPO
optimises, so "did post-training help" is a number, not an impression. Domains: arithmetic, comparison, counting,
string, units (the default); and, as training data only, spelling (the words of counting and string, spelled) and
arithmetic_forms (doubling and halving, missing numbers, three numbers in a row: arithmetic worded another way). Each
task has a prompt, a reference answer, and worked steps for the thinking rendering, and is phrased by one of many
templates (`task_arithmetic`, `task_domains`: word problems, imperatives, other number ranges, two
steps), so what transfers is the skill, not one sentence shape.

Output (`--output_dir DIR`, written atomically): `sft.parquet` (`messages`, `thinking`, `domain`), `prompts.parquet`
(`prompt`, `answer`, `domain`, `thinking`, and the reference reply `completion`: RL prompts), `test.parquet`
(held-out prompts, same columns), a data card
`README.md` and `card.json`. Held-out tasks are chosen by a hash of the question text, so train and test never share a
question, whatever the seed and sizes.

    posttrain data build_verifiable_tasks --output_dir data/verifiable --n_train 2000 --n_test 100
"""

import hashlib
import random
from dataclasses import dataclass, field

from posttrain.errors import UserError

from . import card as card_lib
from .config import command_line, parse_config, run
from .config import make_parser as _make_parser
from .task_arithmetic import arithmetic, arithmetic_forms, steps
from .task_domains import comparison, counting, spelling, string, units

PROG = "posttrain data build_verifiable_tasks"
SPLITS = ("sft", "prompts", "test")  # the tables `to_tables` writes: a recipe's split names are checked against them


@dataclass
class VerifiableTasksConfig:
    output_dir: str = field(default="data/verifiable",
                            metadata={"help": "Output folder; an earlier one a data job wrote is replaced atomically."})
    n_train: int = field(default=2000, metadata={"help": "Number of training tasks (SFT rows and RL prompts).",
                                                 "min": 1})
    n_test: int = field(default=100, metadata={"help": "Number of held-out tasks for evaluation.", "min": 0})
    thinking_fraction: float = field(default=0.5, metadata={"help": "Fraction of tasks rendered in thinking mode."})
    domains: list[str] = field(
        default_factory=lambda: ["arithmetic", "comparison", "counting", "string", "units"],
        metadata={"help": "Task domains to generate."},
    )
    test_every: int = field(default=10, metadata={"help": "About one question in this many is reserved for test.",
                                                  "min": 1})
    seed: int = field(default=0, metadata={"help": "Random seed."})


# Each generator draws a structured task and phrases it (`task_arithmetic.Task`: question, answer, worked steps for
# the <think> block, template id, operands the answer is computed from).
GENERATORS = {"arithmetic": arithmetic, "comparison": comparison, "counting": counting, "string": string, "units": units,
              "spelling": spelling, "arithmetic_forms": arithmetic_forms}
TRAINING_ONLY = {"spelling", "arithmetic_forms"}  # training data for the default domains, not held-out domains


def is_test_question(question: str, test_every: int) -> bool:
    """Deterministic held-out membership by question text: a question is in test or train, never both."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % test_every == 0


def generate(config: VerifiableTasksConfig) -> dict[str, list[dict]]:
    """Tasks for train and test, as balanced over domains as their question spaces allow, `thinking` drawn per task.

    Each domain gets an equal share of each split (of the test split: the domains outside `TRAINING_ONLY`). A
    (question, thinking mode) pair appears at most once per split, and a question is in train or in test, never both
    (by its hash). Domains with few distinct questions (units, string) fill their share as far as they can; the data
    card reports the counts.
    """
    for domain in config.domains:
        if domain not in GENERATORS:
            raise UserError(f"unknown task domain '{domain}'; choose from: {', '.join(GENERATORS)}")
    held = [d for d in config.domains if d not in TRAINING_ONLY]  # the test split's domains
    if config.n_test and not held:
        tested = ", ".join(d for d in GENERATORS if d not in TRAINING_ONLY)
        raise UserError(f"domains {config.domains} are training data only (no held-out tasks of their own); set "
                        f"n_test: 0, or add a domain to test on ({tested})")
    rng = random.Random(config.seed)
    rows = {"train": [], "test": []}
    for index, domain in enumerate(config.domains):
        share = {"train": _share(config.n_train, index, len(config.domains)),
                 "test": _share(config.n_test, held.index(domain), len(held)) if domain in held else 0}
        taken, seen = {"train": 0, "test": 0}, set()
        for _ in range(100 * (share["train"] + share["test"])):  # a domain's question space may run out first
            if all(taken[s] >= share[s] for s in taken):
                break
            task = GENERATORS[domain](rng)
            question = task.question
            thinking = rng.random() < config.thinking_fraction
            split = "test" if is_test_question(question, config.test_every) else "train"
            if (question, thinking) in seen or taken[split] >= share[split]:
                continue
            seen.add((question, thinking))
            taken[split] += 1
            rows[split].append({**task._asdict(), "domain": domain, "thinking": thinking})
    for split in rows:  # interleave the domains
        rng.shuffle(rows[split])
    return rows


def _share(n: int, index: int, parts: int) -> int:
    """The `index`-th of `parts` near-equal shares of `n` (the first ones take the remainder)."""
    return n // parts + (index < n % parts)


def brief(task: dict) -> str:
    """The non-thinking reply: the answer after a one-line working, or the bare answer for string tasks.

    Trained on bare numbers, a 135M model answered "Please add 134 and 58." with "134": it learns to say a number and
    picks one from the question. Writing the working first ("134 + 58 = 192"; two steps: "4 * 3 = 12, 12 + 5 = 17";
    "34 vs 19: 3 > 1, so the larger is 34."; "t-u-r-t-l-e. That is 6 letters.") gives it the operands next to the
    result, and the answer is still the reply's last number. String answers are checked as the whole reply, so they
    stay bare.
    """
    if task["domain"] in ("arithmetic", "arithmetic_forms"):
        return ", ".join(steps(task["operands"], top=False))
    if task["domain"] in ("units", "comparison", "counting"):
        return task["steps"].replace("\n", ". ")
    return task["answer"]


def reply(task: dict) -> str:
    """The assistant reply SFT trains on: worked steps in <think> then the bare answer, or the brief answer."""
    if task["thinking"]:
        return f"<think>\n{task['steps']}\n</think>\n\n{task['answer']}"
    return brief(task)


def to_tables(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    def prompt(task):
        return [{"role": "user", "content": task["question"]}]

    def rl_row(task):
        return {"prompt": prompt(task), "answer": task["answer"], "domain": task["domain"], "thinking": task["thinking"],
                "completion": reply(task)}

    sft = [{"messages": prompt(t) + [{"role": "assistant", "content": reply(t)}], "thinking": t["thinking"],
            "domain": t["domain"]} for t in rows["train"]]
    return {"sft": sft, "prompts": [rl_row(t) for t in rows["train"]], "test": [rl_row(t) for t in rows["test"]]}


def make_parser():
    return _make_parser(VerifiableTasksConfig, PROG, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    config = parse_config(VerifiableTasksConfig, make_parser(), argv, needs_sources=False)
    card_lib.check_output_dir(config.output_dir, overwrite=True)
    tables = to_tables(generate(config))
    source = {"name": "generated", "path": "data_prep/build_verifiable_tasks.py", "license": "apache-2.0",
              "notes": "seeded generator; test questions are chosen by a hash of the question text, so no test "
                       "question appears in sft or prompts"}
    lengths = [len(r.get("completion") or r["messages"][-1]["content"]) for rows in tables.values() for r in rows]
    card_lib.write_generated(config, tables, job="build_verifiable_tasks", kind="verifiable tasks", source=source,
                             command=command_line(PROG, argv), lengths=lengths,
                             length_unit="characters of the reference reply")
    print(f"wrote {config.output_dir}: " + ", ".join(f"{s} {len(t)}" for s, t in tables.items()))
    return 0


if __name__ == "__main__":
    run(main)
