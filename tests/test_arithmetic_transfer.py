"""The hand-written transfer set: answers as computed, columns evaluation reads, and no generator phrasing."""

import json
import re
from pathlib import Path

from data_prep import task_arithmetic, task_domains
from data_prep.write_arithmetic_transfer import OUTPUT, QUESTIONS, rows
from posttrain.rewards import REWARDS


def templates() -> list[str]:
    tables = [task_arithmetic.BARE, task_arithmetic.WORD, task_domains.COMPARE_TWO, task_domains.COMPARE_LIST,
              task_domains.COUNTING, task_domains.STRING, task_domains.UNIT_TEMPLATES]
    tables += [task_arithmetic.MISSING, task_arithmetic.THREE]
    found = [t for table in tables for group in table.values() for t in group]
    scaled = [template for group in task_arithmetic.SCALED.values() for template, _ in group]
    return found + scaled + [template for template, _ in task_arithmetic.TWO_STEP]


def as_pattern(template: str) -> re.Pattern:
    """What the template can produce: a field is one word or number ("three times" and lists: any text)."""
    pattern = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal) + ("" if not name else ".+?" if name in ("times", "items") else r"\S+?")
    return re.compile(pattern, re.I)


def test_committed_file_is_what_the_expressions_give():
    committed = [json.loads(line) for line in Path(OUTPUT).read_text().splitlines()]
    assert committed == rows() and len(committed) >= 120
    assert len({q for q, _ in QUESTIONS}) == len(QUESTIONS)
    columns = {k: [r[k] for r in committed] for k in ("answer", "thinking", "domain")}
    assert REWARDS["accuracy"]([r["answer"] for r in committed], **columns) == [1.0] * len(committed)


def test_no_question_is_a_generator_phrasing():
    patterns = [as_pattern(t) for t in templates()]
    assert patterns[0].fullmatch("What is 3 + 4?")  # the check itself works
    clashes = [q for q, _ in QUESTIONS if any(p.fullmatch(q) for p in patterns)]
    assert not clashes
