"""Answer checking: math through math-verify (fractions, LaTeX, \\boxed{}, units), its plain-number fast path compared
with it, off the main thread; function-call accuracy against the expected calls."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from posttrain import answers
from posttrain.answers import final_answer, is_plain, math_match, math_verify_match, numeric_match
from posttrain.rewards import REWARDS, accuracy, function_call, numeric_accuracy

REFERENCES = ["42", "-7", "1,000", "0.5", "3", "12.25", "20"]
PLAIN_ANSWERS = [
    "The answer is 42.", "42", "17 + 25 = 42", "I think 41", "-7", "It is 7", "The result is -7.", "1000",
    "1,000 apples", "0.50", ".5", "Answer: 3 cats", "3.0", "no idea", "<think>6*7=42</think>\n42",
    "<think>so 41?</think> 40 + 2 = 42", "12.25 dollars", "3 apples and 4 pears make 7", "x = 3", "1,000,000",
    "The answer is 42!", "**42**", "42%", "Step 1: 20. Step 2: 42.", "3, 4 and 5", "She has 20 marbles.",
    "20 - 0 = 20", "Total: 12.25", "42.", "It takes 3 hours and 20 minutes",
]


def test_fast_path_agrees_with_math_verify_on_plain_answers():
    compared = 0
    for reference in REFERENCES:
        for text in PLAIN_ANSWERS:
            assert is_plain(final_answer(text)), text
            fast, slow = numeric_match(text, reference), math_verify_match(text, reference)
            assert fast == slow, f"{text!r} vs {reference!r}: regex {fast}, math-verify {slow}"
            compared += 1
    assert compared == len(REFERENCES) * len(PLAIN_ANSWERS)


@pytest.mark.parametrize("text", ["1 000", "1e3", "0.5 or 1/2", "\\boxed{3}", "$3$"])
def test_answers_the_regex_would_misread_go_to_math_verify(text):
    assert not is_plain(text)


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
])
def test_math_answers(text, reference, expected):
    assert math_match(text, reference) is expected
    assert accuracy([text], answer=[reference]) == [float(expected)]


def test_numeric_accuracy_reads_latex_answers_and_skips_non_numeric_references():
    assert numeric_accuracy(["\\boxed{\\frac{1}{2}}", "half"], answer=["0.5", "half"]) == [1.0, None]


def test_text_references_keep_the_exact_rule():
    assert math_match("Paris", "Paris") is None
    assert accuracy(["Paris.", "B", "ROOM 101"], answer=["paris", "B", "Room 101"]) == [1.0, 1.0, 1.0]


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
