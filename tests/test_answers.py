"""Answer checking: math through math-verify (fractions, LaTeX, \\boxed{}, units), its plain-number fast path compared
with it, off the main thread; function-call accuracy against the expected calls; the transfer set's exact answers."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from data_prep.write_arithmetic_transfer import value
from posttrain import answers
from posttrain.answers import final_answer, is_plain, last_number, math_match, math_verify_match, numeric_match
from posttrain.errors import UserError
from posttrain.rewards import REWARDS, accuracy, exact_match, function_call, numeric_accuracy

REFERENCES = ["42", "-7", "1,000", "0.5", "3", "12.25", "20"]
PLAIN_ANSWERS = [
    "42", "17 + 25 = 42", "I think 41", "-7", "It is 7", "The result is -7.", "1000",
    "1,000 apples", "0.50", ".5", "3.0", "no idea", "<think>6*7=42</think>\n42",
    "<think>so 41?</think> 40 + 2 = 42", "12.25 dollars", "3 apples and 4 pears make 7", "x = 3", "1,000,000",
    "**42**", "Step 1: 20. Step 2: 42.", "3, 4 and 5", "She has 20 marbles.",
    "20 - 0 = 20", "Total: 12.25", "42.", "It takes 3 hours and 20 minutes",
]
# a stated answer: the number after "answer is" / "answer:", not the last one, as math-verify reads it
STATED_ANSWERS = ["The answer is 42.", "Answer: 3 cats", "The answer is 42!", "The answer is 7, not 8.",
                  "The answer is 7 apples and 2 pears.", "My final answer: 12.25, or 20 rounded",
                  "The answer is 6 + 19 = 25.", "The answer is 1,000.", "The answer is: x = 3; y is 4",
                  "I think 5. The answer is 8"]


def test_fast_path_agrees_with_math_verify_on_plain_answers():
    compared = 0
    for reference in REFERENCES:
        for text in PLAIN_ANSWERS:
            assert is_plain(final_answer(text)), text
            fast, slow = numeric_match(text, reference), math_verify_match(text, reference)
            assert fast == slow, f"{text!r} vs {reference!r}: regex {fast}, math-verify {slow}"
            compared += 1
    assert compared == len(REFERENCES) * len(PLAIN_ANSWERS)


@pytest.mark.parametrize("text", ["1 000", "1e3", "0.5 or 1/2", "\\boxed{3}", "$3$", "6 * 7", "10 - 3.", "2-5", "42%"])
def test_answers_the_regex_would_misread_go_to_math_verify(text):
    assert not is_plain(text)


def test_a_percentage_is_judged_as_math_verify_judges_it():
    """math-verify credits "50%" against 50 and against 0.5; the regex read 50 alone, so a plain "50%" scored 0
    against the reference "0.5" that "\\boxed{50\\%}" scored 1 against."""
    for text in ["50%", "The answer is 50%.", "She keeps 50% of it", "\\boxed{50\\%}"]:
        for reference, expected in [("50", True), ("0.5", True), ("5", False)]:
            assert math_match(text, reference) is math_verify_match(text, reference) is expected, (text, reference)
    assert accuracy(["50%", "50%", "0.5", "50"], answer=["0.5", "50", "50", "0.5"]) == [1.0, 1.0, 0.0, 0.0]


def test_stated_answers_are_read_as_math_verify_reads_them():
    for reference in REFERENCES + ["7", "8"]:
        for text in STATED_ANSWERS:
            assert is_plain(final_answer(text)), text  # the fast path, reading what math-verify reads
            assert numeric_match(text, reference) == math_verify_match(text, reference), (text, reference)
    assert accuracy(["The answer is 7, not 8."] * 2, answer=["7", "8"]) == [1.0, 0.0]
    # and in quotes, where math-verify finds no number (SmolLM2's own reply to "Which is less, 12 or 645?")
    assert accuracy(['\nThe answer is "12"', 'The answer is "12"'], answer=["12", "645"]) == [1.0, 0.0]
    # an equation stated as the answer: its result (the base model's reply to a word problem)
    assert accuracy(["The answer is 6 + 19 = 25.", "The answer is 6 + 19 = 25."], answer=["25", "6"]) == [1.0, 0.0]


def test_a_corrected_answer_counts_and_a_reply_without_a_number_does_not():
    # the last "answer is" is the answer: a reply may correct itself
    assert accuracy(["The answer is 7. No, wait: the answer is 8."] * 2, answer=["8", "7"]) == [1.0, 0.0]
    # no number at all is wrong, also against a reference of 0
    assert accuracy(["I do not know.", "The answer is none"], answer=["0", "0"]) == [0.0, 0.0]


# (answer, reference): whole numbers equal only exactly, decimals to 6 places, as math-verify compares them
NEAR_NUMBERS = [("1000001", "1000000", False), ("2,345,679", "2,345,678", False), ("999999", "1000000", False),
                ("100000000000000001", "100000000000000000", False), ("3.0000001", "3", False),
                ("3", "3.0000001", False), ("3.0", "3", True), ("0.5000001", "0.5", True), ("0.500001", "0.5", False),
                ("0.3333333", "0.333333", True), ("-12.2500001", "-12.25", True)]


@pytest.mark.parametrize("text, reference, expected", NEAR_NUMBERS)
def test_numbers_compare_as_math_verify_compares_them(text, reference, expected):
    assert is_plain(text)
    assert numeric_match(text, reference) is expected
    assert math_verify_match(text, reference) is expected
    assert accuracy([text], answer=[reference]) == [float(expected)]


def test_a_hyphen_between_numbers_is_no_minus_sign():
    assert last_number("The answer is 3-4") == 4 and last_number("It was on 2024-05-07") == 7
    assert last_number("Between 2-5 degrees") == 5 and last_number("pages 10-12.") == 12
    # a sign after a space, "=", or at the start is one
    for text, number in [("5 - 12 = -7", -7), ("x=-5", -5), ("\u22127", -7), ("-.5", -0.5), ("+3", 3),
                         ("1,000 grams", 1000), ("(-2)", -2)]:
        assert last_number(text) == number, text
    for text in ("The answer is 3-4", "Between 2-5 degrees", "It was on 2024-05-07"):
        for reference in ("-4", "-5", "-7", "4", "5", "-3"):
            assert math_match(text, reference) == math_verify_match(text, reference), (text, reference)


def test_numeric_references_are_judged_by_the_math_comparison_alone():
    # the text rule strips surrounding punctuation, ".5" -> "5": it must not overrule the math verdict on a number
    assert accuracy([".5", "5", "0.50", "5."], answer=["5", ".5", ".5", "5"]) == [0.0, 0.0, 1.0, 1.0]
    # ".5" no longer tells the two apart (the text rule keeps a dot before a digit, below); ".-3" still does: stripped
    # of its edge punctuation it reads "-3", which math-verify's verdict on the number does not
    assert accuracy([".-3", "...-3"], answer=["-3", "-3"]) == [0.0, 0.0]
    # nor does the text rule itself: a dot before a digit is part of the number
    assert exact_match([".5", "5", "(.5)", "Paris."], answer=["5", ".5", ".5", "paris"]) == [0.0, 0.0, 1.0, 1.0]


def test_plain_answers_never_reach_math_verify(monkeypatch):
    def fail(*args):
        raise AssertionError("math-verify called on a plain answer")

    monkeypatch.setattr(answers, "math_verify_match", fail)
    assert accuracy(["So the total is 1,000.", "It is 41", "\u22127"], answer=["1000", "42", "-7"]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("text, reference, expected", [
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("It is 3/4", "0.75", True),
    ("$\\frac{1}{2}$", "1/2", True),
    ("The distance is 42\\text{ km}", "42", True),
    ("$42^\\circ$", "42", True),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", True),
    ("<think>expand it</think> \\boxed{x^2+1}", "1 + x^2", True),
    ("\\boxed{\\dfrac{6}{8}}", "\\frac34", True),
    ("\\boxed{5}", "6", False),
    ("The answer is 1 000", "1,000", True),
    ("\\boxed{1\\,500}", "1500", True),  # a LaTeX thin space between digit groups: math-verify read 501
    ("\\boxed{1\\,500}", "501", False),
    ("$12\\,345\\,678$", "12345678", True),
    ("\\boxed{1500}", "1\\,500", True),
    ("$3\\,\\text{cm}$", "3", True),  # a thin space before a unit stays
])
def test_math_answers(text, reference, expected):
    assert math_match(text, reference) is expected
    assert accuracy([text], answer=[reference]) == [float(expected)]


def test_an_escaped_dollar_is_a_currency_sign():
    """math-verify finds nothing in "\\$12.50" outside math: the MATH reference "\\$12.50" credited only its own text,
    and a reply "The answer is \\$72." scored 0 against "72"."""
    replies = ["\\$12.50", "$12.50", "12.5", "\\boxed{\\$12.50}", "The answer is \\$12.50.", "\\$13.50"]
    assert accuracy(replies, answer=["\\$12.50"] * 6) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert accuracy(["\\$72", "She has \\$72 left.", "\\$71"], answer=["72"] * 3) == [1.0, 1.0, 0.0]
    assert numeric_accuracy(["The answer is \\$12.50."], answer=["12.5"]) == [1.0]


def test_numeric_accuracy_reads_latex_answers_and_skips_non_numeric_references():
    assert numeric_accuracy(["\\boxed{\\frac{1}{2}}", "half"], answer=["0.5", "half"]) == [1.0, None]


def test_text_references_keep_the_exact_rule():
    assert math_match("Paris", "Paris") is None
    assert accuracy(["Paris.", "B", "ROOM 101"], answer=["paris", "B", "Room 101"]) == [1.0, 1.0, 1.0]


def test_interval_and_tuple_brackets_count():
    """The text rule strips surrounding punctuation, brackets included: a plain "[2, 5]" (math-verify reads 5 out of
    it) matched the references "[2, 5)", "(2, 5)" and "(2, 5]" alike, credit for any interval with the right ends."""
    intervals = ["[2, 5)", "(2, 5)", "(2, 5]", "[2, 5]"]
    for reply in intervals + ["[2, 5).", "$[2, 5)$", "\\boxed{(2, 5]}"]:
        credited = [ref for ref, r in zip(intervals, accuracy([reply] * 4, answer=intervals), strict=True) if r]
        assert len(credited) == 1 and credited[0] in reply, (reply, credited)
    assert accuracy(["(1, 2)", "[1, 2]", "$(1, 2)$"], answer=["(1, 2)"] * 3) == [1.0, 0.0, 1.0]
    assert accuracy(["(B)", "Paris."], answer=["B", "(paris)"]) == [1.0, 1.0]  # text references: brackets still go


def test_math_verify_works_off_the_main_thread():
    """math-verify's own timeouts use signal.alarm, which raises off the main thread (thread pools, async rewards)."""
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(accuracy, ["\\boxed{\\frac{2}{4}}", "\\boxed{7}"], answer=["0.5", "\\frac{14}{3}"])
    assert result.result(timeout=60) == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------------
# Function calls
# ----------------------------------------------------------------------------------------------------------------------
WEATHER = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


@pytest.mark.parametrize("completion, expected", [
    (call("get_weather", city="Oslo", days=2), 1.0),
    (call("get_weather", days=2.0, city=" oslo "), 1.0),  # numbers by value, strings without case or spaces
    ("<think>the user wants Oslo</think>\n" + call("get_weather", city="Oslo", days=2), 1.0),
    (call("get_weather", city="Bergen", days=2), 0.5),
    (call("get_weather", city="Oslo"), 0.5),
    (call("get_time", city="Oslo", days=2), 0.0),
    ("It will be cold in Oslo.", 0.0),
    ("<tool_call>\n{not json}\n</tool_call>", 0.0),
    (call("get_weather", city="Oslo", days=2) + call("get_weather", city="Oslo", days=2), 0.0),
    ([{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]}], 1.0),
    # no `tool_calls`: the blocks of the last message, the reply's final answer
    ([{"role": "assistant", "content": "Let me look it up."},
      {"role": "assistant", "content": call("get_weather", city="Oslo", days=2)}], 1.0),
])
def test_function_call_accuracy(completion, expected):
    assert function_call([completion], answer=[WEATHER]) == [expected]


def test_function_call_several_calls_any_order_and_rows_without_calls():
    both = json.dumps([{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}])
    completions = [call("b") + call("a", x=1), call("a", x=1), "Paris"]
    assert function_call(completions, answer=[both, both, "Paris"]) == [1.0, 0.0, None]
    tool_calls = [[{"type": "function", "function": {"name": "a", "arguments": {"x": 1}}}]]
    assert function_call([call("a", x=1)], tool_calls=tool_calls, answer=["unused"]) == [1.0]
    assert REWARDS["function_call"] is function_call


def test_function_call_reference_is_chosen_row_by_row():
    # a row whose `tool_calls` is empty still has its call in `answer`
    completions = [call("a", x=1), call("get_weather", city="Oslo", days=2), call("get_weather", city="Oslo", days=2)]
    tool_calls = [[{"type": "function", "function": {"name": "a", "arguments": {"x": 1}}}], None, []]
    assert function_call(completions, tool_calls=tool_calls, answer=["unused", WEATHER, WEATHER]) == [1.0, 1.0, 1.0]
    assert function_call([call("a", x=1)], tool_calls=[None]) == [None]  # no `answer` column: nothing expected
    with pytest.raises(UserError, match="'answer' column"):
        function_call([call("a", x=1)], domain=["tools"])


def test_a_reference_with_an_item_that_is_no_call_is_not_scored():
    """A reference list one of whose items is no call (a number, a call without a name) names no calls to compare
    with: the row is not scored (None), as a row without calls, rather than the reward failing on it."""
    for item in (5, {"arguments": {}}):
        reference = json.dumps([{"name": "a", "arguments": {}}, item])
        assert function_call([call("a")], answer=[reference]) == [None]


def test_function_call_numbers_compare_exactly_when_whole():
    assert function_call([call("get_weather", city="Oslo", days=2.0000001)], answer=[WEATHER]) == [0.5]
    assert function_call([call("get_weather", city="Oslo", days=2.0)], answer=[WEATHER]) == [1.0]


def test_function_call_counts_every_call_and_argument():
    # a block that is no valid call is a wrong call, next to a right one too
    assert function_call([call("get_weather", city="Oslo", days=2) + "<tool_call>\n{not json}\n</tool_call>"],
                         answer=[WEATHER]) == [0.0]
    # lists by their length and elements, booleans only as booleans (JSON true is not 1)
    expected = json.dumps({"name": "f", "arguments": {"ids": [1, 2], "flag": True}})
    completions = [call("f", ids=[1, 2], flag=True), call("f", ids=[1, 2, 3], flag=True), call("f", ids=[1, 2], flag=1)]
    assert function_call(completions, answer=[expected] * 3) == [1.0, 0.5, 0.5]


# ----------------------------------------------------------------------------------------------------------------------
# The transfer set's answers (data_prep/write_arithmetic_transfer.py): computed exactly
# ----------------------------------------------------------------------------------------------------------------------
def test_transfer_answers_are_exact_whole_numbers():
    assert [value(e) for e in ("-4 + 9", "7 - 10", "47", "2 + 3 * 4", "(10 - 4) * 5", "144 / 12")] == \
        ["5", "-3", "47", "14", "30", "12"]
    assert value("100000000000000001 / 1") == "100000000000000001"  # no float on the way
    for expression in ("7 / 2", "10001 / 10000"):  # the second rounds to 1 within a denominator of 1000
        with pytest.raises(ValueError, match="not a whole number"):
            value(expression)


# (reply, reference, verdict): full-width signs and points as Chinese and Japanese input methods type them, and an
# answer stated in Chinese, read as their ASCII and English counterparts are
CJK_ANSWERS = [("答案：－7", "-7", True), ("答案：－7", "7", False), ("42．5", "42.5", True), ("42．5", "5", False),
               ("答案是 42，不是 43", "42", True), ("答案是 42，不是 43", "43", False), ("第3题答案为5。", "5", True),
               ("The answer is 7。 So x = 8", "7", True), ("答案：x＝３", "3", True), ("４２", "42", True),
               ("答案是 1，000", "1000", True), ("The answer is 3²", "32", False)]


@pytest.mark.parametrize("text, reference, expected", CJK_ANSWERS)
def test_full_width_and_chinese_stated_answers(text, reference, expected):
    assert math_match(text, reference) is expected
    assert accuracy([text], answer=[reference]) == [float(expected)]


def test_a_reference_is_a_worked_solution_only_past_rationale_words_beside_its_box():
    """`RATIONALE_WORDS` words beside a `\\boxed{}` answer are a short answer's wording ("so the total is"), more are
    a worked solution."""
    words = " ".join(["word"] * answers.RATIONALE_WORDS)
    assert answers.rationale_problem(f"{words} \\boxed{{5}}") is None
    assert "worked solution" in answers.rationale_problem(f"{words} more \\boxed{{5}}")
