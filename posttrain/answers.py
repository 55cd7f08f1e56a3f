"""Reading answers out of completions: the final answer, numbers, math expressions and tool calls.

The final answer of a completion is the text after its last `</think>` (or the whole completion): `final_answer` is the
one place that decides this, and rewards and evaluation both call it, so training and evaluation score the same thing.

Math answers are checked with Hugging Face's `math-verify` (the verifier TRL's and open-r1's accuracy rewards use):
fractions, LaTeX, `\\boxed{}`, units and equivalent forms. Plain numbers on both sides (a numeric reference, a final
answer without LaTeX or fractions) take a regex path, ~150x faster (30 us vs 4.7 ms a row on 2 CPU cores), that gives
the same verdict (tests compare the two on such answers): UPO scores every rollout, and most arithmetic answers are
plain. The regex also reads a Unicode minus and a leading "+", which math-verify does not.
"""

import functools
import json
import math
import re
import threading
import unicodedata

# A number: optional sign (ASCII or Unicode minus), thousands separators, decimals; or a bare ".5".
_NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+\u2212]?\.\d+")
# Stripped from both ends before exact comparison. Signs, %, $ are kept: "-7" and "7" must stay different.
_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`*_()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u3002\uff0c\uff01\uff1f"
NUMERIC_REL_TOL = 1e-6  # answers are compared as floats: "0.50" == ".5" == "1/2 is 0.5"


def final_answer(text: str) -> str:
    """The answer part of a completion: the text after the last `</think>` if there is one, else all of it, stripped."""
    return text.rsplit("</think>", 1)[-1].strip()


def parse_number(text: str) -> float | None:
    """`text` as a number if it is exactly one (e.g. a reference answer "42", "-7", "1,000", "0.5"), else None."""
    text = text.strip()
    return _to_float(text) if _NUMBER.fullmatch(text) else None


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def normalize_text(text: str, keep_case: bool = False) -> str:
    """Unicode-normalise, drop surrounding whitespace/punctuation/quotes, collapse inner whitespace, lowercase."""
    text = " ".join(unicodedata.normalize("NFKC", text).strip(_EDGE_PUNCTUATION).split())
    return text if keep_case else text.lower()


def _is_capitals(reference: str) -> bool:
    letters = [c for c in reference if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def numeric_match(text: str, reference: str) -> bool | None:
    """Whether the last number of the final answer equals the numeric `reference`; None if the reference is no number."""
    expected = parse_number(reference)
    if expected is None:
        return None
    got = last_number(final_answer(text))
    return got is not None and math.isclose(got, expected, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_REL_TOL)


def exact_text_match(text: str, reference: str) -> bool:
    """Normalised equality of the final answer and `reference`.

    Case is ignored, unless the reference is written in capitals (two or more letters, e.g. "APPLE" for "Write apple in
    capital letters"): then the case is what the task checks.
    """
    keep_case = _is_capitals(reference)
    return normalize_text(final_answer(text), keep_case) == normalize_text(reference, keep_case)


def choice_letter(text: str) -> str | None:
    """The option letter a multiple-choice answer picks: "B", "(b)", "B. Paris", "The answer is C", "I think it's D"."""
    answer = final_answer(text)
    for pattern in (r"answer\s*(?:is|:)?\s*\(?([A-Za-z])\)?(?![A-Za-z])",  # "The answer is (B)", "Answer: c"
                    r"\(([A-Za-z])\)",  # "(B)" anywhere
                    r"\A([A-Za-z])(?:[.):]|\Z)"):  # "B", "B.", "B) Paris"
        found = re.findall(pattern, answer, flags=re.I)
        if found:
            return found[-1].upper()
    capitals = re.findall(r"\b([A-Z])\b", answer)  # last standalone capital letter
    return capitals[-1] if capitals else None


# ----------------------------------------------------------------------------------------------------------------------
# Math answers: math-verify, with a plain-number fast path
# ----------------------------------------------------------------------------------------------------------------------
# LaTeX, fractions, ratios, powers, space-grouped thousands ("1 000"): math-verify reads these, the regex does not.
_NOT_PLAIN = re.compile(r"[\\$/^{}]|\d:\d|\d \d{3}\b|\d[eE][-+]?\d|\bpi\b|sqrt|frac", re.I)
_MATH_REFERENCE = re.compile(r"\d|\\")
MATH_TIMEOUT_S = 5  # per parse / comparison, on the main thread only (math-verify's timeout is signal.alarm)


def is_math_reference(reference: str) -> bool:
    """A reference answer worth a math comparison: it has a digit or LaTeX ("42", "\\frac{1}{2}", "x^2 + 1")."""
    return bool(_MATH_REFERENCE.search(reference))


def _timeout() -> int | None:
    """math-verify's timeouts use `signal.alarm`, which only works on a process's main thread: off it (a thread pool,
    an async reward) they are switched off rather than raising."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
    from math_verify import parse

    text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    return parse(text, parsing_timeout=_timeout())


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(answer, extraction_config=configs, parsing_timeout=_timeout())


def math_verify_match(text: str, reference: str) -> bool | None:
    """math-verify's verdict on the final answer of `text` against `reference`; None if the reference does not parse
    as math."""
    from math_verify import verify

    gold = _parse_reference(reference.strip())
    if not gold:
        return None
    answer = _parse_answer(final_answer(text))
    return bool(answer) and verify(gold, answer, timeout_seconds=_timeout())


def is_plain(answer: str) -> bool:
    """An answer whose numbers the regex reads exactly as math-verify does: no LaTeX, fractions, ratios or powers."""
    return not _NOT_PLAIN.search(answer)


def math_match(text: str, reference: str) -> bool | None:
    """Whether the final answer of `text` equals the math `reference`: the fast regex path for plain numbers on both
    sides, math-verify for everything else. None if the reference is not math (use a text comparison then)."""
    if not is_math_reference(reference):
        return None
    if parse_number(reference) is not None and is_plain(final_answer(text)):
        return numeric_match(text, reference)
    return math_verify_match(text, reference)


# ----------------------------------------------------------------------------------------------------------------------
# Tool calls
# ----------------------------------------------------------------------------------------------------------------------
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def as_call(value) -> tuple[str, dict] | None:
    """A call as `(name, arguments)` from TRL's `{"type": "function", "function": {...}}` or a bare `{name,
    arguments}` (arguments a dict or a JSON string); None if it is not one."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return (function["name"], arguments) if isinstance(arguments, dict) else None


def completion_calls(completion) -> list[tuple[str, dict] | None]:
    """The tool calls a completion makes: a conversational completion's `tool_calls`, else the
    `<tool_call>{json}</tool_call>` blocks of its final answer (the format of our chat templates). A block that is
    not a valid call is kept as None (it counts as a wrong call)."""
    if isinstance(completion, list):
        calls = [c for m in completion if isinstance(m, dict) for c in m.get("tool_calls") or []]
        if calls:
            return [as_call(c) for c in calls]
        completion = str(completion[-1].get("content") or "") if completion else ""
    found = []
    for block in _TOOL_CALL.findall(final_answer(completion)):
        try:
            found.append(as_call(json.loads(block)))
        except json.JSONDecodeError:
            found.append(None)
    return found


def reference_calls(reference) -> list[tuple[str, dict]] | None:
    """The expected calls from a `tool_calls` value or a JSON `answer` (a call or a list of calls); None if none."""
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError:
            return None
    items = reference if isinstance(reference, list) else [reference]
    calls = [as_call(item) for item in items]
    return calls if calls and all(calls) else None


def same_value(a, b) -> bool:
    """Argument values compared as a caller means them: numbers by value, strings without case or surrounding space,
    lists and objects element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_REL_TOL)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b
