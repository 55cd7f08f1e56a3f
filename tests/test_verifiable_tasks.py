"""The verifiable task suite: disjoint splits, both thinking modes, and references the verifiers accept."""

from collections import Counter

import datasets

from data_prep.build_verifiable_tasks import VerifiableTasksConfig, generate, is_test_question, to_tables
from posttrain.rewards import REWARDS


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
    assert {r["thinking"] for r in rows} == {True, False}
    assert len({(r["question"], r["thinking"]) for r in rows}) == len(rows)


def test_small_question_spaces_fill_what_they_can():
    rows = generate(VerifiableTasksConfig(n_train=2000, n_test=50, seed=0))["train"]
    counts = Counter(r["domain"] for r in rows)
    assert counts["arithmetic"] == counts["comparison"] == 400 and 0 < counts["units"] < 400


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
