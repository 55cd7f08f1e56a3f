"""Reward functions on hand-written completions, in both TRL completion formats and both thinking modes."""

import math
import sys
import types

import pytest
import torch

from posttrain.errors import UserError
from posttrain.reward_groups import normalize_by_group, weighted_sum
from posttrain.reward_inputs import custom_reward_files
from posttrain.rewards import (
    REWARD_COLUMNS,
    REWARDS,
    accuracy,
    choice_letter,
    combine_rewards,
    exact_match,
    final_answer,
    hackable_length,
    length_penalty,
    multiple_choice,
    numeric_accuracy,
    resolve_rewards,
    think_format,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_final_answer_is_text_after_last_think_block():
    assert final_answer("<think>\n2 + 2 = 4\n</think>\n\n4") == "4"
    assert final_answer("  42 \n") == "42"
    assert final_answer("<think>a</think> x </think> 7") == "7"
    assert final_answer("<think>unclosed 12") == "<think>unclosed 12"


def test_a_multi_turn_completion_is_scored_on_its_last_reply():
    """A rollout that calls a tool is a conversation (call, result, reply): the answer is its last message's."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    completion = [{"role": "assistant", "content": "Let me add them.", "tool_calls": [call]},
                  {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 + 3 is 5."}]
    assert accuracy([completion], answer=["5"]) == [1.0]


def test_numeric_accuracy_last_number_with_tolerance():
    completions = ["<think>\n3 + 4 = 7, no wait\n</think>\n\n8", "The answer is -7.", "0.50", "1,000 grams", "none",
                   "<think>\nthe answer is 8\n</think>\n\n9"]
    answers = ["8", "-7", ".5", "1000", "3", "8"]
    assert numeric_accuracy(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # The last number wins, and a number inside the think block does not count as the answer
    assert numeric_accuracy(["5 - 12 = -7"], answer=["-7"]) == [1.0]
    assert numeric_accuracy(["7"], answer=["apple"]) == [None]  # not applicable: TRL leaves it out


def test_exact_match_normalises_case_whitespace_punctuation():
    completions = ["Apple", "  apple. ", "**apple**", "\"apple\"", "apples", "APPLE", "-7", "7"]
    answers = ["apple", "apple", "apple", "apple", "apple", "apple", "-7", "-7"]
    assert exact_match(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_exact_match_strips_chinese_and_japanese_quotes_and_brackets():
    completions = ["《红楼梦》", "「東京」", "『東京』。", "【北京】", "北京、", "〈北京〉", "《红楼梦》续"]
    answers = ["红楼梦", "東京", "東京", "北京", "北京", "北京", "红楼梦"]
    assert exact_match(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_exact_match_keeps_case_when_the_reference_is_in_capitals():
    # "Write "river" in capital letters." -> "RIVER": case is the point of the task
    assert exact_match(["RIVER", "river", "River."], answer=["RIVER"] * 3) == [1.0, 0.0, 0.0]
    assert exact_match(["b", "B"], answer=["B"] * 2) == [1.0, 1.0]  # one letter is not "written in capitals"


def test_multiple_choice_letter_extraction():
    completions = ["B", "(b)", "B. Paris", "The answer is C", "Answer: (D)", "I think it's B", "A", "no idea"]
    answers = ["B", "B", "B", "C", "D", "B", "B", "B"]
    assert multiple_choice(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert choice_letter("<think>\nmaybe (A)\n</think>\n\nC") == "C"
    assert multiple_choice(["B"], answer=["Paris"]) == [None]
    # a one-character Chinese answer is no option letter either (it scored 0.0, a penalty, for every reply)
    assert multiple_choice(["答案是甲", "对", "B"], answer=["甲", "对", "Ｂ"]) == [None, None, 1.0]


@pytest.mark.parametrize("text, letter", [
    ("The correct answer is B. Answer A is wrong.", "B"),  # "Answer A" states nothing
    ("B, I think.", "B"),  # the pronoun "I" is no option
    ("The answer is a tricky one, but it is C.", "C"),  # nor the article "a"
    ("C is right; answer D is a distractor.", "C"),
    ("My answer: B. (A) and (C) are wrong.", "B"),
    ("B. (A) and (C) are wrong.", "B"),
    ("The answer is A. No wait, the answer is D.", "D"),  # the last statement
    ("Option C is correct, not A", "C"),
    ("It is B, I think", "B"),
    ("the answer is b", "B"),
    # Chinese and Japanese: no space around the letter, full-width letters and brackets, the answer stated in Chinese
    ("答案是B", "B"), ("选B。", "B"), ("Ｂ", "B"), ("正确答案是（Ｃ）", "C"), ("我认为答案是C，不是D", "C"), ("答えはBです", "B"),
])
def test_multiple_choice_reads_the_stated_choice(text, letter):
    assert choice_letter(text) == letter
    assert multiple_choice([text], answer=[letter]) == [1.0]


def test_accuracy_picks_numeric_or_exact_by_reference():
    completions = ["<think>\n40 + 2\n</think>\n\n42", "forty-two", "The first letter is r", "r",
                   "<think>\nr\n</think>\n\nR"]
    answers = ["42", "42", "r", "r", "r"]
    assert accuracy(completions, answer=answers) == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_unclosed_thinking_earns_no_correctness_credit():
    # A chain of thought cut off by the token budget, which happens to end on the right number / word / letter
    truncated = ["<think>\n40 + 2 = 42", "<think>\nthe first letter is r", "<think>\nso (B)"]
    answers = ["42", "r", "B"]
    for name in ("accuracy", "numeric_accuracy", "exact_match", "multiple_choice"):
        scored = [r for r in REWARDS[name](truncated, answer=answers, thinking=[True] * 3) if r is not None]
        assert scored and not any(scored), name
        # without a thinking column the template lets the reply think: one that opened <think> is a thinking reply
        unknown = [r for r in REWARDS[name](truncated, answer=answers) if r is not None]
        assert unknown and not any(unknown), name
    assert accuracy(truncated, answer=answers, thinking=[False] * 3) == [1.0, 0.0, 0.0]  # non-thinking: whole text
    assert multiple_choice(truncated, answer=answers, thinking=[None] * 3)[2] == 0.0
    assert accuracy(["40 + 2 = 42"], answer=["42"]) == [1.0]  # no <think> at all: scored as before
    closed = ["<think>\n40 + 2\n</think>\n\n42", chat("<think>\n40 + 2\n</think>\n\n42")]
    assert accuracy(closed, answer=["42", "42"], thinking=[True, True]) == [1.0, 1.0]
    assert accuracy([chat("<think>\n40 + 2 = 42")], answer=["42"], thinking=[True]) == [0.0]


def test_a_think_block_the_prompt_opened_counts_as_the_replys():
    """A template whose generation prompt ends by opening the think block (Qwen3.5's, DeepSeek-R1's, ERNIE-4.5-VL's
    own) leaves the reply without its `<think>`: read alone, a closed chain of thought had no block (format 0) and
    reasoning cut off by the token budget looked like a plain answer (format 1, accuracy 1). With TRL's `prompts` the
    rewards read the reply as the model wrote it."""
    prompts = ["<|im_start|>user\nWhat is 40 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"] * 2
    replies = ["40 + 2 = 42\n</think>\n\n42", "40 + 2 = 42"]  # closed; cut off by the token budget
    for thinking in (None, True):
        modes = [thinking] * 2
        assert think_format(replies, prompts=prompts, thinking=modes) == [1.0, 0.0]
        assert accuracy(replies, prompts=prompts, answer=["42", "42"], thinking=modes) == [1.0, 0.0]
    assert think_format(replies, thinking=[None] * 2) == [0.0, 1.0]  # read without the prompt, as before
    # a reply that opens its own block, and conversational prompts (TRL passes them unrendered), read as they are
    own = ["<think>\n40 + 2\n</think>\n\n42"]
    assert think_format(own, prompts=prompts[:1], thinking=[True]) == [1.0]
    assert think_format(replies[:1], prompts=[[{"role": "user", "content": "hi"}]], thinking=[None]) == [0.0]


def test_rewards_accept_string_and_conversational_completions():
    for name in ("accuracy", "numeric_accuracy", "exact_match", "think_format", "hackable_length"):
        plain = REWARDS[name](["42"], answer=["42"], thinking=[False])
        assert REWARDS[name]([chat("42")], answer=["42"], thinking=[False]) == plain, name


def test_rows_without_a_reference_are_not_scored():
    # compared as text, a null reference is "None" and a blank one "": "none." and an empty reply would score 1
    completions = ["None", "none.", "", "<think>\n40 + 2"]
    answers = [None, None, "", "  "]
    for name in ("accuracy", "numeric_accuracy", "exact_match", "multiple_choice"):
        assert REWARDS[name](completions, answer=answers, thinking=[None, None, None, True]) == [None] * 4, name
    combined = combine_rewards({"accuracy": 1.0, "think_format": 0.5})
    assert combined(["42", "42"], answer=[None, "42"], thinking=[False, False]) == [0.5, 1.5]


def test_rewards_that_do_not_apply_give_none_not_zero():
    # a reference that is math but no number is not numeric_accuracy's, and a digit is no option letter
    assert numeric_accuracy(["x^2 + 1", "42"], answer=["x^2 + 1", "42"]) == [None, 1.0]
    assert multiple_choice(["1", "B"], answer=["1", "B"]) == [None, 1.0]
    # a row no reward applies to has no combined reward (GRPO leaves it out), not a reward of 0
    combined = combine_rewards({"accuracy": 1.0, "multiple_choice": 2.0})
    assert combined(["42", "42"], answer=[None, "42"]) == [None, 1.0]


def test_missing_answer_column_is_explained():
    with pytest.raises(UserError, match="'answer' column"):
        accuracy(["42"], domain=["arithmetic"])


@pytest.mark.parametrize(
    "completion, thinking, expected",
    [
        ("<think>\n17 + 25 = 42\n</think>\n\n42", True, 1.0),
        ("<think>\n\n</think>\n\n42", True, 0.0),  # thinking asked, nothing thought
        ("<think>\n17 + 25 = 42\n</think>\n\n", True, 0.0),  # no answer after the block
        ("42", True, 0.0),  # no block at all
        ("<think>\na\n</think>\n<think>\nb\n</think>\n42", True, 0.0),  # two blocks
        ("<think>\na\n42", True, 0.0),  # never closed
        ("42", False, 1.0),  # the prompt already ends with the empty block
        ("<think>\n\n</think>\n\n42", False, 1.0),  # an empty block is tolerated
        ("<think>\nreasoning\n</think>\n\n42", False, 0.0),  # thinking when asked not to
        ("", False, 0.0),
        ("42 </think>", False, 0.0),
        ("42", None, 1.0),  # mode unknown: either shape
        ("<think>\nx\n</think>\n\n42", None, 1.0),
    ],
)
def test_think_format(completion, thinking, expected):
    assert think_format([completion], thinking=[thinking]) == [expected]
    assert think_format([chat(completion)], thinking=[thinking]) == [expected]


def test_think_format_without_thinking_column_accepts_either_shape():
    assert think_format(["42", "<think>\nx\n</think>\n\n42", "<think>"]) == [1.0, 1.0, 0.0]


def test_length_penalty_prefers_shorter_in_tokens_or_words():
    assert length_penalty(["a", "b"], completion_ids=[[1] * 64, [1] * 1024]) == [-64 / 512, -1.0]
    assert length_penalty(["one two three"]) == [-3 / 512]


def test_hackable_length_pays_for_words_not_correctness():
    rambling = "It is 42, but let me also say " + "more " * 40 + "so 41"
    completions = [rambling, "42", "<think>\n40 + 2 = 42\n</think>\n\n42"]
    assert accuracy(completions, answer=["42"] * 3) == [0.0, 1.0, 1.0]
    assert hackable_length(completions, answer=["42"] * 3) == [1.0, pytest.approx(1 / 32), pytest.approx(8 / 32)]


def test_length_rewards_count_each_cjk_letter_as_a_word():
    # no spaces in Chinese: a 16-character reply was one "word", paid and penalised as the shortest answer
    replies = ["所以小明一共有四十二个苹果答案是", "答案是 42", "Xiaoming has 42 apples, 小明有苹果"]
    assert hackable_length(replies) == [pytest.approx(16 / 32), pytest.approx(4 / 32), pytest.approx(9 / 32)]
    assert length_penalty(replies[:1]) == [-16 / 512]


def test_resolve_and_combine_rewards_by_name():
    funcs, weights = resolve_rewards({"accuracy": 1.0, "think_format": 0.5})
    assert funcs == [accuracy, think_format] and weights == [1.0, 0.5]
    combined = combine_rewards({"accuracy": 1.0, "think_format": 0.5, "multiple_choice": 2.0})
    # multiple_choice is None for a non-letter reference: left out of the sum, not counted as 0
    assert combined(["42", "<think>\nx\n</think>\n\n41"], answer=["42", "42"], thinking=[False, True]) == [1.5, 0.5]
    with pytest.raises(UserError, match=r"'acuracy' is not a reward \(did you mean accuracy\?\); the rewards are accuracy"):
        resolve_rewards({"acuracy": 1.0})


def test_a_reward_of_your_own_gets_the_columns_it_names(tmp_path, monkeypatch):
    """As TRL's rewards do (`fn(completions, solution, **kwargs)`), the parameters a reward of your own names are
    prompt columns the UPO stage keeps for it (it dropped every column but ours); the pre-flight names a required one
    the prompts lack, before a TypeError inside GRPO a step in. GRPO's own keywords are not columns."""
    from datasets import Dataset

    from posttrain.gates import check_reward_references
    from posttrain.stages.upo_prompts import upo_columns

    (tmp_path / "column_rewards.py").write_text(
        "def solved(completions, solution, prompts=None, *, tests=(), trainer_state=None, **kwargs):\n"
        "    return [1.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = {"accuracy": 1.0, "column_rewards.solved": 1.0}
    args = types.SimpleNamespace(rewards=rewards, normalize_rewards_by="source")
    assert upo_columns(args) == {"prompt", *REWARD_COLUMNS, "solution", "tests", "source"}
    assert upo_columns(types.SimpleNamespace(rewards={"accuracy": 1.0})) == {"prompt", *REWARD_COLUMNS}
    rows = {"prompt": [[{"role": "user", "content": "2 + 2?"}]], "answer": ["4"]}
    kept, skipped = check_reward_references(Dataset.from_dict({**rows, "solution": ["4"]}), rewards, "prompts.jsonl")
    assert len(kept) == 1 and skipped == 0  # `tests` has a default: not required
    with pytest.raises(UserError, match=r"pre-flight: prompts.jsonl: reward 'column_rewards.solved' takes the "
                                        r"column\(s\) solution as parameters, which the prompts do not have "
                                        r"\(columns: prompt, answer\)"):
        check_reward_references(Dataset.from_dict(rows), rewards, "prompts.jsonl")
    (tmp_path / "prompt_rewards.py").write_text("def echo(completions, prompt, **kwargs):\n    return [0.0]\n")
    with pytest.raises(UserError, match=r"reward 'prompt_rewards.echo' takes prompt as a parameter, which GRPO never "
                                        r"passes \(it gives them as `prompts` and `completions`\)"):
        check_reward_references(Dataset.from_dict(rows), {"prompt_rewards.echo": 1.0}, "prompts.jsonl")


def test_a_reward_naming_a_column_grpo_drops_is_refused_though_the_prompts_have_it(tmp_path, monkeypatch):
    """GRPO passes neither `prompt` nor `completion` by name (it gives them as `prompts` and `completions`), even where
    the prompts have such a column; the stage keeps `REWARD_COLUMNS` for its rewards whatever they name."""
    from posttrain.reward_inputs import check_own_reward_columns, reward_columns

    (tmp_path / "pair_rewards.py").write_text("def judge(completions, completion, **kwargs):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"reward 'pair_rewards.judge' takes completion as a parameter, which GRPO"):
        check_own_reward_columns({"pair_rewards.judge": 1.0}, ["prompt", "completion"], "pre-flight: p.jsonl")
    assert reward_columns(None) == reward_columns({"accuracy": 1.0}) == set(REWARD_COLUMNS)
    assert reward_columns({"pair_rewards.judge": 1.0}) == {*REWARD_COLUMNS, "completion"}


def test_a_reward_of_your_own_by_its_import_path(tmp_path, monkeypatch):
    """As TRL's GRPO script takes `reward_funcs`: a dotted name is a function imported from the Python path, combined
    with ours; a module or function that is not there is a UserError naming it, and a module that fails on its own
    import keeps its own error."""
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kwargs):\n"
                                            "    return [1.0 / (1 + len(str(c))) for c in completions]\n")
    (tmp_path / "broken_rewards.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs, weights = resolve_rewards({"accuracy": 1.0, "my_rewards.brevity": 2.0})
    assert funcs[0] is accuracy and funcs[1].__name__ == "brevity" and weights == [1.0, 2.0]
    combined = combine_rewards({"accuracy": 1.0, "my_rewards.brevity": 2.0})
    assert combined(["42", "7"], answer=["42", "42"], thinking=[False, False]) == [1.0 + 2 / 3, 1.0]
    with pytest.raises(UserError, match=r"reward 'no_such_rewards.brevity': no module 'no_such_rewards' on the Python"):
        resolve_rewards({"no_such_rewards.brevity": 1.0})
    with pytest.raises(UserError, match=r"reward 'my_rewards.length': module 'my_rewards' .* has no function 'length'"):
        resolve_rewards({"my_rewards.length": 1.0})
    with pytest.raises(ModuleNotFoundError, match="not_installed_anywhere"):
        resolve_rewards({"broken_rewards.score": 1.0})


@pytest.mark.parametrize(("body", "message"), [
    ("return [1.0] * (len(completions) - 1)", r"of 3 values .* returned list: 2 values"),
    ("return 0.5", r"of 3 values .* returned float: 0.5"),
    ("return ['1'] * len(completions)", r"at row 0 it returned '1' \(str\)"),
    ("return [float('nan')] * len(completions)", r"at row 0 it returned nan .*None for a row it does not apply to"),
    ("return [float('inf')] * len(completions)", r"at row 0 it returned inf"),
])
def test_a_reward_of_your_own_that_returns_no_list_of_rewards_is_named(tmp_path, monkeypatch, body, message):
    """GRPO would crash deep in TRL (a scalar, strings), or train on NaN advantages (inf) or drop rows as "not
    applicable" (NaN): the check names the reward, what it must return and what it returned, in UPO and the pair job."""
    (tmp_path / "bad_rewards.py").write_text(f"def bad(completions, **kwargs):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_rewards", raising=False)  # each case's own module
    funcs, _ = resolve_rewards({"bad_rewards.bad": 1.0})
    with pytest.raises(UserError, match=r"reward 'bad_rewards.bad' must return a list\[float \| None\] .*" + message):
        funcs[0](["a", "b", "c"])
    with pytest.raises(UserError, match=r"reward 'bad_rewards.bad'"):
        combine_rewards({"length_penalty": 1.0, "bad_rewards.bad": 1.0})(["a", "b", "c"])


def test_rewards_of_your_own_in_other_shapes(tmp_path, monkeypatch):
    """A numpy array, a callable instance, an async function: as GRPO takes them; one without **kwargs is refused when
    the recipe loads, not at the first step; a callable instance's source file is the stage's input."""
    (tmp_path / "shaped_rewards.py").write_text(
        "import numpy as np\n"
        "def array(completions, **kwargs):\n    return np.ones(len(completions))\n"
        "class Brevity:\n    def __call__(self, completions, **kwargs):\n        return [0.5] * len(completions)\n"
        "brevity = Brevity()\n"
        "async def later(completions, **kwargs):\n    return [2.0] * len(completions)\n"
        "def positional(completions, answer):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = {"shaped_rewards.array": 1.0, "shaped_rewards.brevity": 1.0, "shaped_rewards.later": 1.0}
    assert combine_rewards(names)(["a", "b"]) == [3.5, 3.5]
    assert [f.__name__ for f in resolve_rewards(names)[0]] == ["array", "brevity", "later"]  # logged by these names
    assert custom_reward_files(["shaped_rewards.brevity"]) == {"shaped_rewards.brevity": str(tmp_path / "shaped_rewards.py")}
    assert custom_reward_files(["accuracy", "think_format"]) == {}  # ours are code of the package, not inputs
    with pytest.raises(UserError, match=r"reward 'shaped_rewards.positional' takes no \*\*kwargs"):
        resolve_rewards({"shaped_rewards.positional": 1.0})


def test_a_reward_without_kwargs_is_told_the_columns_it_would_get(tmp_path, monkeypatch):
    """The refusal names what GRPO passes a reward: the columns the UPO stage keeps (`upo_columns`), not "every dataset
    column": a column of the prompt file besides those is dropped before the rewards are called."""
    from posttrain.stages.upo_prompts import upo_columns

    (tmp_path / "narrow_rewards.py").write_text("def by_level(completions, level):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as refused:
        resolve_rewards({"narrow_rewards.by_level": 1.0})
    message = str(refused.value)
    assert "every dataset column" not in message
    kept = upo_columns(types.SimpleNamespace(normalize_rewards_by=None)) - {"prompt"}
    assert all(column in message for column in kept)
    assert "normalize_rewards_by" in message and "names as parameters; other columns are dropped" in message


def test_rewards_of_your_own_as_numpy_scalars_or_an_async_callable_instance(tmp_path, monkeypatch):
    """A list of numpy scalars is a list of numbers, and a callable instance whose `__call__` is async is awaited."""
    (tmp_path / "more_rewards.py").write_text(
        "import numpy as np\n"
        "def scalars(completions, **kwargs):\n    return [np.float32(0.25)] * len(completions)\n"
        "class Soon:\n    async def __call__(self, completions, **kwargs):\n        return [2.0] * len(completions)\n"
        "soon = Soon()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert combine_rewards({"more_rewards.scalars": 1.0, "more_rewards.soon": 1.0})(["a", "b"]) == [2.25, 2.25]


def test_a_reward_weight_of_true_is_refused():
    from posttrain.rewards import check_reward_names

    with pytest.raises(UserError, match="'accuracy' has the weight True; expected a finite number"):
        check_reward_names({"accuracy": True})


def test_every_reward_is_named_as_its_key():
    # TRL logs rewards/<function __name__>/mean: the key a recipe uses is the name in the logs
    assert all(func.__name__ == name for name, func in REWARDS.items())


def test_weighted_sum_skips_nan_and_keeps_all_nan_rows_nan():
    rewards = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [float("nan"), float("nan")]])
    total = weighted_sum(rewards, torch.tensor([1.0, 0.5]))
    assert total[:2].tolist() == [1.0, 0.5] and math.isnan(total[2])


def test_normalize_by_group_standardises_the_combined_reward_per_group():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [10.0, 0.0], [20.0, 0.0], [5.0, 5.0]])
    weights = torch.tensor([1.0, 0.5])
    groups = ["math", "math", "math", "units", "units", "const"]
    normalized = weighted_sum(normalize_by_group(rewards, weights, groups), weights)
    for key in ("math", "units"):
        values = normalized[[g == key for g in groups]]
        assert values.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert normalized[5].item() == 0.0  # a constant group becomes 0, not NaN
    # Order within a group is preserved: a per-group affine map
    assert normalized[3] < normalized[4]


def test_normalize_by_group_centres_each_reward_among_the_rows_it_applies_to():
    # as its docstring says: not the combined reward standardised when a reward applies to only some rows of a group
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]])  # combined: 1, 1, 0
    weights = torch.tensor([1.0, 1.0])
    normalized = weighted_sum(normalize_by_group(rewards, weights, ["d", "d", "d"]), weights)
    assert normalized.tolist() == [0.0, 0.0, 0.0]
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [float("nan"), 0.0]])  # combined: 2, 1, 0; std sqrt(2/3)
    normalized = weighted_sum(normalize_by_group(rewards, weights, ["d", "d", "d"], eps=0.0), weights)
    expected = [(0.5 + 1 / 3) / (2 / 3) ** 0.5, (-0.5 + 1 / 3) / (2 / 3) ** 0.5, (-2 / 3) / (2 / 3) ** 0.5]
    assert normalized.tolist() == pytest.approx(expected)


def test_normalize_by_group_keeps_not_applicable_entries():
    rewards = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    normalized = normalize_by_group(rewards, torch.tensor([1.0, 1.0]), ["a", "a"])
    assert torch.isnan(normalized[:, 1]).all() and normalized[:, 0].tolist() == pytest.approx([1.0, -1.0], abs=1e-3)


def test_normalize_by_group_leaves_rows_no_reward_scored_out_of_the_group():
    """A row every reward skips (all NaN) stays NaN and does not count in its group's spread; a group of such rows
    alone stays NaN (no error on an empty group)."""
    nan = float("nan")
    rewards = torch.tensor([[1.0], [0.0], [nan], [nan]])
    normalized = normalize_by_group(rewards, torch.tensor([1.0]), ["a", "a", "a", "b"])
    assert normalized[:2, 0].tolist() == pytest.approx([1.0, -1.0], abs=1e-3)
    assert torch.isnan(normalized[2:]).all()


def test_normalize_by_group_reads_a_gap_of_tie_as_pair_mining_does():
    """A gap of exactly `TIE` is a tie (pair mining keeps a pair only above it): the group becomes zeros. Just above
    it, `eps` keeps a rounding-sized spread from becoming a unit one."""
    from posttrain.reward_groups import TIE

    weights = torch.tensor([1.0])
    assert normalize_by_group(torch.tensor([[0.0], [TIE]]), weights, ["a", "a"]).tolist() == [[0.0], [0.0]]
    small = normalize_by_group(torch.tensor([[0.0], [4 * TIE]]), weights, ["a", "a"])
    assert small.abs().max().item() < 0.05


def test_normalize_by_group_keeps_not_applicable_entries_of_a_constant_group():
    nan = float("nan")
    normalized = normalize_by_group(torch.tensor([[1.0, nan], [1.0, 0.0]]), torch.tensor([1.0, 1.0]), ["a", "a"])
    assert normalized[0, 0].item() == normalized[1].abs().sum().item() == 0.0 and normalized[0, 1].isnan()
