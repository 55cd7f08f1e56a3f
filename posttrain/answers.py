"""Reading answers out of completions: the final answer, numbers, math expressions and tool calls.

The final answer of a completion is the text after its last `</think>` (or the whole completion): `final_answer` is the
one place that decides this, and rewards and evaluation both call it, so training and evaluation score the same thing.

Math answers are checked with Hugging Face's `math-verify` (the verifier TRL's and open-r1's accuracy rewards use):
fractions, LaTeX, `\\boxed{}`, units and equivalent forms. Plain numbers on both sides (a numeric reference, a final
answer without LaTeX or fractions) take a regex path, ~150x faster (30 us vs 4.7 ms a row on 2 CPU cores), that gives
the same verdict (tests compare the two on such answers): UPO scores every rollout, and most arithmetic answers are
plain. It compares numbers as math-verify does (`same_number`), reads a stated answer as it does (the number after
"answer is": "The answer is 7, not 8" is 7), and leaves to math-verify an answer that ends on an expression ("6 * 7",
"2-5": math-verify works it out). The regex also reads numbers math-verify misses: a Unicode minus, a leading "+",
"-.5", a number in brackets, in quotes or right after a letter ("(-5)", '"12"', "v2.5"), full-width signs and points
("－7", "42．5"), and an answer stated in Chinese or Japanese ("答案是 42，不是 43", "答えは 42")."""

import functools
import json
import re
import threading
import unicodedata

# A number: optional sign (ASCII or Unicode minus), thousands separators, decimals; or a bare ".5". A sign right after
# a letter, digit or dot is a hyphen, not a minus: "3-4" is 3 and 4, "2024-05-07" ends on 7; "x=-5" and "5 - 12 = -7"
# keep theirs.
_SIGN = r"(?:(?<![\w.])[-+\u2212])?"
_NUMBER = re.compile(rf"{_SIGN}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|{_SIGN}\.\d+")
# Stripped from both ends before exact comparison. Signs, %, $ are kept: "-7" and "7" must stay different. With
# Chinese and Japanese quotes and brackets (、「」『』《》〈〉【】): "《红楼梦》" answers "红楼梦" as '"Hamlet"' answers "Hamlet".
_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`*_()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u3002\uff0c\uff01\uff1f" \
                    "\u3001\u300c\u300d\u300e\u300f\u300a\u300b\u3008\u3009\u3010\u3011"
_NO_BRACKETS = str.maketrans("", "", "()[]{}")
FLOAT_DECIMALS = 6  # math-verify's `float_rounding`: decimals are equal when they agree to 6 places


def final_answer(text: str) -> str:
    """The answer part of a completion: the text after the last `</think>` if there is one, else all of it, stripped."""
    return text.rsplit("</think>", 1)[-1].strip()


def parse_number(text: str) -> int | float | None:
    """`text` as a number if it is exactly one (e.g. a reference answer "42", "-7", "1,000", "0.5"), else None."""
    text = text.translate(_HALF_WIDTH).strip()
    return _to_number(text) if _NUMBER.fullmatch(text) else None


def last_number(text: str) -> int | float | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def _to_number(token: str) -> int | float:
    """An int for a number written without a decimal point (exact at any size: 10**17 + 1 is not 10**17), else a
    float. math-verify draws the same line (sympy Integer or Float), and `same_number` compares them its way."""
    token = token.replace(",", "").replace("\u2212", "-")
    if "." in token:
        return float(token)
    try:
        return int(token)
    except ValueError:  # over Python's 4,300-digit limit for int(): a degenerate rollout, not an answer
        return float(token)


def same_number(a: int | float, b: int | float) -> bool:
    """Numbers compared as math-verify compares them: exactly when either is whole (an int: 1000001 is not 1000000,
    3 is not 3.0000001), else rounded to `FLOAT_DECIMALS` places (0.3333333 == 0.333333)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return round(a, FLOAT_DECIMALS) == round(b, FLOAT_DECIMALS)


def normalize_text(text: str, keep_case: bool = False, keep_brackets: bool = False) -> str:
    """Unicode-normalise, drop surrounding whitespace/punctuation/quotes, collapse inner whitespace, lowercase. A dot
    before a digit stays: ".5" is not "5". With `keep_brackets`, surrounding brackets and braces stay: in a math
    answer they are part of it ("[2, 5)" is not "(2, 5]")."""
    edges = _EDGE_PUNCTUATION.translate(_NO_BRACKETS) if keep_brackets else _EDGE_PUNCTUATION
    text = unicodedata.normalize("NFKC", text).rstrip(edges)
    start = len(text) - len(text.lstrip(edges))
    if start and text[start - 1] == "." and text[start:start + 1].isdigit():
        start -= 1
    text = " ".join(text[start:].split())
    return text if keep_case else text.lower()


def _is_capitals(reference: str) -> bool:
    letters = [c for c in reference if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


# "The answer is 7, not 8.", "Answer: 3 cats", "答案是 7，不是 8": what follows the last such phrase, up to the end of
# its clause (a semicolon, a sentence's full stop, a comma that is no thousands separator), is what the answer states
_STATED = re.compile(r"\banswer\s*(?:is\s*:?|:)|(?:答案|答え)\s*(?:[是为為は]\s*:?|:)", re.I)
_CLAUSE_END = re.compile(r";|\.(?!\d)|,(?!\d{3}(?!\d))|\u3002")
# Full-width forms (U+FF01-FF5E) and the ideographic space, as Chinese and Japanese input methods type them, read as
# their ASCII letters: "－7" is -7 (the regex took 7), "42．5" is 42.5 (it took 5), "答案：x＝3" states 3. Not NFKC,
# which also makes "3²" "32".
_HALF_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def stated_number(answer: str) -> int | float | None:
    """The number an answer states: in the clause after its last "answer is" / "answer:", the first number after
    its last "=" ("The answer is 6 + 19 = 25.") or else its first ("The answer is 7 apples and 2 pears"); without
    such a phrase, the last number (the generator's replies end on their answer: "so the larger is 845.")."""
    answer = answer.translate(_HALF_WIDTH)
    phrases = list(_STATED.finditer(answer))
    if phrases:
        clause = _CLAUSE_END.split(answer[phrases[-1].end():], maxsplit=1)[0]
        found = _NUMBER.search(clause, clause.rfind("=") + 1)
        if found:
            return _to_number(found.group())
    return last_number(answer)


def numeric_match(text: str, reference: str) -> bool | None:
    """Whether the number the final answer states (`stated_number`) equals the numeric `reference`; None if the
    reference is no number."""
    expected = parse_number(reference)
    if expected is None:
        return None
    got = stated_number(final_answer(text))
    return got is not None and same_number(got, expected)


def exact_text_match(text: str, reference: str, keep_brackets: bool = False) -> bool:
    """Normalised equality of the final answer and `reference`.

    Case is ignored, unless the reference is written in capitals (two or more letters, e.g. "APPLE" for "Write apple in
    capital letters"): then the case is what the task checks. `keep_brackets` compares surrounding brackets too (an
    interval or a tuple: "[2, 5)", "(1, 2)").
    """
    keep_case = _is_capitals(reference)
    return normalize_text(final_answer(text), keep_case, keep_brackets) == \
        normalize_text(reference, keep_case, keep_brackets)


# An option letter: "(b)", a capital standing alone ("B", "B."), or any letter marked off by punctuation or the end
# ("c.", "b"), so that the words "a" and "I" are not read as options ("the answer is a tricky one").
_OPTION = r"(\([A-Za-z]\)|\b[A-Z]\b|\b[A-Za-z](?=[.,;:!)]|\s*\Z))"
# ASCII word boundaries: a Chinese or Japanese character is a letter to Unicode's \b, so "答案是B" or "Bです" had no
# letter standing alone
_CHOICE_PATTERNS = (
    # a stated choice, the last one (a reply may correct itself): "The answer is (B)", "Answer: c", "C is correct",
    # "答案是C，不是D"; "answer D" without "is" or ":" states nothing ("answer D is a distractor")
    (re.compile(rf"(?:(?i:answer\s*(?:is\s*:?|:))|(?:答案|答え)\s*(?:[是为為は]\s*:?|:))\s*{_OPTION}"
                rf"|{_OPTION}\s+(?i:is\s+(?:the\s+)?(?:right|correct|best|answer))\b", re.ASCII), -1),
    (re.compile(r"\A(\([A-Za-z]\)|[A-Za-z](?=[.,;:)]|\Z))"), 0),  # the reply opens with one: "B, I think.", "B) Paris"
    (re.compile(r"(\([A-Za-z]\))"), -1),  # "(B)" anywhere
    (re.compile(r"\b((?!I\b)[A-Z])\b", re.ASCII), -1),  # the last capital standing alone, but the pronoun "I"
)


def choice_letter(text: str) -> str | None:
    """The option letter a multiple-choice answer picks: "B", "(b)", "B. Paris", "The answer is C", "I think it's D",
    "C is right; answer D is a distractor", "答案是Ｂ" (full-width letters and brackets read as ASCII)."""
    answer = unicodedata.normalize("NFKC", final_answer(text))
    for pattern, which in _CHOICE_PATTERNS:
        found = [match.group(match.lastindex) for match in pattern.finditer(answer)]
        if found:
            return found[which].strip("()").upper()
    return None


# Ideographs, kana and hangul: scripts written without spaces between words, so each of their letters counts as a word
CJK_LETTERS = "\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f" \
              "\uac00-\ud7ff\uf900-\ufaff\U00020000-\U0003134f"
_WORD = re.compile(rf"[^\s{CJK_LETTERS}]+|[{CJK_LETTERS}]")


def word_count(text: str) -> int:
    """Whitespace-separated words, each ideograph, kana or hangul letter one: a Chinese reply of 200 characters has
    no spaces, and would be one word long."""
    return len(_WORD.findall(text))


# ----------------------------------------------------------------------------------------------------------------------
# Math answers: math-verify, with a plain-number fast path
# ----------------------------------------------------------------------------------------------------------------------
# LaTeX, fractions, ratios, powers, space-grouped thousands ("1 000"), percentages (math-verify takes "50%" for 50 and
# for 0.5, the regex for 50 alone): math-verify reads these, the regex does not.
# Nor does it read as math-verify does an answer that ends on an expression (math-verify works out "6 * 7" and "2-5",
# the regex reads 7 and 5). The generator's replies do not: they end on the answer ("so the larger is 845.",
# "12 + 5 = 17", "The letter p appears 2 times."), and keep the fast path. A stated answer ("The answer is 7, not 8")
# keeps it too: `stated_number` reads the number after "answer is", as math-verify does, and also in quotes
# ('The answer is "12"'), where math-verify finds none.
_NOT_PLAIN = re.compile(r"[\\$/^{}%]|\d:\d|\d \d{3}\b|\d[eE][-+]?\d|\bpi\b|sqrt|frac"
                        r"|\d\s*[-+*\u2212\u00d7\u00f7]\s*\.?\d[\d.,]*\D*\Z", re.I)
_MATH_REFERENCE = re.compile(r"\d|\\")
MATH_TIMEOUT_S = 5  # per parse / comparison, on the main thread only (math-verify's timeout is signal.alarm)


def is_math_reference(reference: str) -> bool:
    """A reference answer worth a math comparison: it has a digit or LaTeX ("42", "\\frac{1}{2}", "x^2 + 1")."""
    return bool(_MATH_REFERENCE.search(reference))


def _timeout() -> int | None:
    """math-verify's timeouts use `signal.alarm`, which only works on a process's main thread: off it (a thread pool,
    an async reward) they are switched off rather than raising."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


# LaTeX's escaped dollar, a currency sign (MATH's money answers "\$12.50"; replies in Markdown write "\$72"):
# math-verify reads it inside math ("$\$12.50$", "\boxed{\$12.50}") and finds nothing at all in "\$12.50" or
# "The answer is \$72.": dropped from references and answers, as math-verify drops it inside math
_ESCAPED_DOLLAR = "\\$"


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
    from math_verify import parse

    reference = reference.replace(_ESCAPED_DOLLAR, "")
    text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    return parse(text, parsing_timeout=_timeout())


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(answer.replace(_ESCAPED_DOLLAR, ""), extraction_config=configs, parsing_timeout=_timeout())


# A LaTeX space between digit groups ("1\,500", "12\,345\,678", "1\ 500"; siunitx's thousands separator):
# math-verify adds the groups (1\,500 is 501), dropped
_SPACED_THOUSANDS = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")


def math_verify_match(text: str, reference: str) -> bool | None:
    """math-verify's verdict on the final answer of `text` against `reference`; None if the reference does not parse
    as math."""
    from math_verify import verify

    gold = _parse_reference(_SPACED_THOUSANDS.sub("", reference.strip()))
    if not gold:
        return None
    answer = _parse_answer(_SPACED_THOUSANDS.sub("", final_answer(text)))
    return bool(answer) and verify(gold, answer, timeout_seconds=_timeout())


def is_plain(answer: str) -> bool:
    """An answer whose numbers the regex reads exactly as math-verify does: no LaTeX, fractions, ratios or powers."""
    return not _NOT_PLAIN.search(answer.translate(_HALF_WIDTH))


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
        return same_number(a, b)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


# ----------------------------------------------------------------------------------------------------------------------
# Reference answers: the final answer, not the worked solution around it
# ----------------------------------------------------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
RATIONALE_WORDS = 12  # a reference with more words than this beside its \boxed{} is a worked solution, not an answer


def boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` of `text`, up to its own closing brace
    (`\\boxed{\\frac{1}{2}}` is `\\frac{1}{2}`), stripped; None if there is none or its braces never close."""
    starts = list(_BOX.finditer(text))
    if not starts:
        return None
    depth, begin = 1, starts[-1].end()
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index].strip()
    return None


def rationale_problem(reference: str) -> str | None:
    """Why the reference `answer` is a worked solution rather than the answer, or None. Two shapes only, which
    datasets ship and no answer has: GSM8K's rationale ending in `#### 72`, and a MATH-style solution with its answer
    in `\\boxed{}` among more than `RATIONALE_WORDS` words. Compared with the whole text, a reply stating just the
    answer scores 0 under `exact_match` and is not scored at all (None) under `numeric_accuracy`."""
    if "####" in reference:
        return "holds GSM8K's '####' marker: it is a worked solution with the answer after '####'"
    box = boxed_content(reference)
    if box is not None and len(reference.split()) - len(box.split()) > RATIONALE_WORDS:
        return f"is a worked solution ({len(reference.split())} words) with the answer in \\boxed{{}}"
    return None
