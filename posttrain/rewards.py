"""Reward functions by name: small, pure, each with TRL's reward-function signature.

Every function is `fn(completions, **kwargs) -> list[float | None]`. TRL passes the dataset columns (`answer`,
`domain`, `thinking`, ...) as lists aligned with `completions`, plus `prompts`, `completion_ids`, `trainer_state` and
logging hooks; the functions take what they need and ignore the rest. Completions may be strings or conversational
(`[{"role": "assistant", "content": ...}]`). `None` means "not applicable to this row" (TRL leaves it out of the sum).

Reading answers out of completions (the final answer after `</think>`, numbers, math with `math-verify`, tool calls)
lives in `posttrain.answers`, which evaluation uses too, so training and evaluation score the same thing. On a row
whose `thinking` is true, a completion without `</think>` has no final answer at all (`answer_text`): a chain of thought
cut off by the token budget must not earn credit for the last number it happened to write.

Functions are named exactly as their `REWARDS` key, because TRL logs each one as `rewards/<function name>/mean`.
"""

import asyncio
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable

from .answers import (
    choice_letter,
    completion_calls,
    exact_text_match,
    final_answer,
    math_match,
    normalize_text,
    parse_number,
    reference_calls,
    same_value,
    word_count,
)
from .data import completion_text, opens_think
from .errors import UserError
from .typecheck import suggest

# final_answer: kept for importers
__all__ = ["REWARDS", "REWARD_COLUMNS", "combine_rewards", "final_answer", "resolve_rewards", "reward_function"]

RewardFunc = Callable[..., list]
_THINK_BLOCK = re.compile(r"\A\s*<think>(.*?)</think>(.*)\Z", re.S)
LENGTH_PENALTY_TOKENS = 512  # a completion this long (or longer) gets the full penalty of -1
HACKABLE_LENGTH_WORDS = 32  # the hackable proxy pays in full for a completion of this many words


def _column(kwargs: dict, name: str, reward: str) -> list:
    if name not in kwargs:
        columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric"))
        raise UserError(f"reward '{reward}' needs a '{name}' column in the training dataset; the rows have: "
                        f"{', '.join(columns)}")
    return kwargs[name]


def answer_text(completion, thinking: bool | None = None) -> str:
    """The text the correctness rewards read: the completion, or "" when a thinking-mode row never closed its
    `</think>` (the reasoning was truncated, so nothing was answered). A row without a thinking mode (no `thinking`
    column: the template leaves the reply free to think) is in thinking mode when its reply opens `<think>`."""
    text = completion_text(completion)
    thinks = thinking or (thinking is None and "<think>" in text)
    return "" if thinks and "</think>" not in text else text


def as_written(completions, prompts=None) -> list:
    """The completions as the model wrote them in full: a completion whose text prompt ends by opening the think
    block (the generation prompt of Qwen3.5/3.6's and DeepSeek-R1's own templates ends "<think>\\n") gets its `<think>`
    back, so it reads as the thinking reply it is (a closed block, or reasoning cut off before `</think>`), not as a
    tag-free answer. A reply that opens its own block (a stored reference reply) and conversational prompts (TRL passes
    them unrendered) are left as they are."""
    prompts = prompts or [None] * len(completions)
    return ["<think>\n" + completion_text(c) if _think_left_open(p, c) else c
            for c, p in zip(completions, prompts, strict=True)]


def _think_left_open(prompt, completion) -> bool:
    """Whether a text prompt ends in a `<think>` the completion continues (rather than opening its own)."""
    return opens_think(prompt) and not completion_text(completion).lstrip().startswith("<think>")


def _reference(value) -> str | None:
    """A reference answer as text, or None when there is none (null or blank): correctness against nothing is not
    applicable, and compared as text, "None" or "" would credit a reply "none" or an empty one."""
    return None if value is None or not str(value).strip() else str(value)


def _modes(kwargs: dict, n: int) -> list:
    """The `thinking` column TRL passes (and evaluation passes), or None per row when the data has none."""
    return kwargs.get("thinking") or [None] * n


# ----------------------------------------------------------------------------------------------------------------------
# Correctness against the reference `answer`
# ----------------------------------------------------------------------------------------------------------------------
def numeric_accuracy(completions, **kwargs) -> list[float | None]:
    """1.0 if the final answer equals the numeric `answer` (its last number, whole numbers exactly, decimals to 6
    places; fractions, LaTeX, `\\boxed{}` and "the answer is ..." through math-verify), else 0.0. None for rows whose
    reference is not a number."""
    completions = as_written(completions, kwargs.get("prompts"))
    answers, modes = _column(kwargs, "answer", "numeric_accuracy"), _modes(kwargs, len(completions))
    results = [math_match(answer_text(c, t), a) if a is not None and parse_number(a) is not None else None
               for c, a, t in zip(completions, map(_reference, answers), modes, strict=True)]
    return [None if r is None else float(r) for r in results]


def exact_match(completions, **kwargs) -> list[float | None]:
    """1.0 if the final answer equals `answer` after normalisation (case, surrounding whitespace/punctuation). None
    for rows without a reference."""
    completions = as_written(completions, kwargs.get("prompts"))
    answers, modes = _column(kwargs, "answer", "exact_match"), _modes(kwargs, len(completions))
    return [None if a is None else float(exact_text_match(answer_text(c, t), a))
            for c, a, t in zip(completions, map(_reference, answers), modes, strict=True)]


def multiple_choice(completions, **kwargs) -> list[float | None]:
    """1.0 if the option letter picked by the final answer is the reference letter. None if `answer` is no letter."""
    completions = as_written(completions, kwargs.get("prompts"))
    answers, modes = _column(kwargs, "answer", "multiple_choice"), _modes(kwargs, len(completions))
    rewards = []
    for completion, reference, thinking in zip(completions, map(_reference, answers), modes, strict=True):
        letter = normalize_text(reference or "").upper()
        if len(letter) != 1 or not "A" <= letter <= "Z":  # not isalpha(): "甲" or "对" is no option `choice_letter` reads
            rewards.append(None)
        else:
            rewards.append(float(choice_letter(answer_text(completion, thinking)) == letter))
    return rewards


def accuracy(completions, **kwargs) -> list[float | None]:
    """Correctness against `answer`: for a number, the math comparison alone (math-verify, with a fast path for plain
    numbers); for other references, the math comparison when it says yes (LaTeX, expressions) and `exact_match`'s rule
    otherwise, brackets kept for a math reference. None for rows without a reference."""
    completions = as_written(completions, kwargs.get("prompts"))
    answers, modes = _column(kwargs, "answer", "accuracy"), _modes(kwargs, len(completions))
    rewards = []
    for completion, reference, thinking in zip(completions, map(_reference, answers), modes, strict=True):
        if reference is None:
            rewards.append(None)
            continue
        text = answer_text(completion, thinking)
        verdict = math_match(text, reference)
        if parse_number(reference) is not None:  # the text rule would strip ".-3" to "-3"
            rewards.append(float(bool(verdict)))
        else:  # a math reference's brackets count: "[2, 5]" and "(2, 5)" are not "[2, 5)"
            rewards.append(float(bool(verdict) or exact_text_match(text, reference, keep_brackets=verdict is not None)))
    return rewards


def function_call(completions, **kwargs) -> list[float | None]:
    """Function-call accuracy against the expected calls (a `tool_calls` column, else a JSON `answer`: one
    `{"name", "arguments"}` call or a list of them): 1.0 for the right functions with the right arguments (in any
    order; numbers by value, strings without case), 0.5 for the right functions with some wrong arguments, 0.0 for
    no call, an unparsable one or a wrong function. None for rows that expect no call.

    Calls are read from a conversational completion's `tool_calls`, else from `<tool_call>{json}</tool_call>` blocks
    in the final answer (what our chat templates train the model to write)."""
    if kwargs.get("tool_calls") is None:
        references = _column(kwargs, "answer", "function_call")
    else:  # row by row: a row without tool calls (None) may still carry its call in `answer`
        answers = kwargs.get("answer") or [None] * len(completions)
        references = [calls or answer for calls, answer in zip(kwargs["tool_calls"], answers, strict=True)]
    rewards = []
    for completion, reference in zip(completions, references, strict=True):
        expected = reference_calls(reference)
        if expected is None:
            rewards.append(None)
            continue
        made = completion_calls(completion)
        if None in made or sorted(n for n, _ in made) != sorted(n for n, _ in expected):
            rewards.append(0.0)
            continue
        pending = list(made)
        for name, arguments in expected:
            match = next((c for c in pending if c[0] == name and same_value(c[1], arguments)), None)
            if match is not None:
                pending.remove(match)
        rewards.append(1.0 if not pending else 0.5)
    return rewards


# ----------------------------------------------------------------------------------------------------------------------
# Format, length, and a deliberately hackable proxy
# ----------------------------------------------------------------------------------------------------------------------
def think_format_ok(text: str, thinking: bool | None) -> bool:
    """Whether `text` has the shape the row's thinking mode asks for (see `think_format`)."""
    opens, closes = text.count("<think>"), text.count("</think>")
    block = _THINK_BLOCK.match(text)
    single_block = opens == closes == 1 and block is not None and bool(block.group(2).strip())
    if thinking is None:  # either mode's shape is fine
        return think_format_ok(text, True) or think_format_ok(text, False)
    if thinking:
        return single_block and bool(block.group(1).strip())
    if opens == closes == 0:
        return bool(text.strip())
    return single_block and not block.group(1).strip()


def think_format(completions, **kwargs) -> list[float]:
    """1.0 if a completion is well formed for its row's `thinking` mode, else 0.0.

    - thinking on: exactly one `<think>…</think>` block, first, with non-empty reasoning, then a non-empty answer;
    - thinking off (the prompt already ends with an empty think block): no think tags and a non-empty answer, or only an
      empty block followed by a non-empty answer;
    - `thinking` None or no `thinking` column: either shape.
    """
    completions = as_written(completions, kwargs.get("prompts"))
    modes = _modes(kwargs, len(completions))  # the column is optional in the data contract
    return [float(think_format_ok(completion_text(c), None if t is None else bool(t)))
            for c, t in zip(completions, modes, strict=True)]


def length_penalty(completions, **kwargs) -> list[float]:
    """-min(1, length / 512): in [-1, 0], shorter is better. Length is in tokens (`completion_ids`, which TRL passes),
    else in words (`answers.word_count`: each Chinese, Japanese or Korean letter one)."""
    ids = kwargs.get("completion_ids")  # TRL always passes it; evaluation may not
    lengths = [len(x) for x in ids] if ids is not None else [word_count(completion_text(c)) for c in completions]
    return [-min(1.0, n / LENGTH_PENALTY_TOKENS) for n in lengths]


def hackable_length(completions, **kwargs) -> list[float]:
    """Deliberately hackable proxy for the reward-hacking ablation: pays for words, not for being right.

    min(1, words / `HACKABLE_LENGTH_WORDS`), words as `answers.word_count` counts them (each Chinese, Japanese or
    Korean letter one: a Chinese reply has no spaces, and a long one was paid as one word). Rollouts of different lengths make it easy to find
    (every group has variance), and a policy maximises it by rambling past its answer, which the verifier, reading the
    final answer's last number (or the one after an explicit "the answer is"), then marks wrong. Training on it shows
    whether UPO's pairwise term keeps the policy honest.
    """
    return [min(1.0, word_count(completion_text(c)) / HACKABLE_LENGTH_WORDS) for c in completions]


# The prompt columns rewards are given (`fn(completions, prompts=..., **columns)`): UPO keeps them for GRPO, which
# passes them on, and the pair sampler passes them alike, so a reward scores a reply the same way in both. A reward
# of your own also gets the columns it names as parameters (`reward_inputs.reward_columns`).
REWARD_COLUMNS = ("answer", "tool_calls", "domain", "thinking", "images")


REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy,
    "numeric_accuracy": numeric_accuracy,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "function_call": function_call,
    "think_format": think_format,
    "length_penalty": length_penalty,
    "hackable_length": hackable_length,
}

# The dataset column each reward reads a reference from, which every training row must fill (UPO's pre-flight gate).
REQUIRED_COLUMNS: dict[str, str] = {name: "answer" for name in ("accuracy", "numeric_accuracy", "exact_match",
                                                                  "multiple_choice")}


# ----------------------------------------------------------------------------------------------------------------------
# Combining and normalising
# ----------------------------------------------------------------------------------------------------------------------
def reward_function(name: str) -> RewardFunc:
    """A reward by name: a key of `REWARDS`, or a function of your own by its import path (`my_rewards.brevity`: the
    function `brevity` of the module `my_rewards`), as TRL's GRPO script takes `reward_funcs`. The module is imported
    from the Python path (`PYTHONPATH=.` for a my_rewards.py in the folder you run from); the function has our
    signature, `fn(completions, **kwargs) -> list[float | None]`. A UserError names a name that is neither."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, _, function = str(name).rpartition(".")
    if not module_name or not function:
        raise UserError(f"'{name}' is not a reward{suggest(str(name), REWARDS)}; the rewards are {', '.join(REWARDS)}, "
                        "or a function of your own by its import path (my_rewards.brevity)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise  # the module was found, and one it imports was not: its own traceback says which
        raise UserError(f"reward '{name}': no module '{module_name}' on the Python path; a reward of your own is "
                        "imported by its module path (PYTHONPATH=. for a my_rewards.py in the folder you run from), "
                        f"else use one of {', '.join(REWARDS)}") from None
    func = getattr(module, function, None)
    if not callable(func):
        raise UserError(f"reward '{name}': module '{module_name}' ({getattr(module, '__file__', '?')}) has no function "
                        f"'{function}'")
    try:
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call say
        takes_kwargs = True
    if not takes_kwargs:  # GRPO passes the columns UPO keeps, `prompts` and `completion_ids` by keyword
        raise UserError(f"reward '{name}' takes no **kwargs: a reward is `fn(completions, **kwargs) -> "
                        f"list[float | None]` (it is passed by name `prompts`, `completion_ids`, the prompt columns "
                        f"{', '.join(REWARD_COLUMNS)}, the `normalize_rewards_by` column and the columns it names as "
                        "parameters; other columns are dropped)")
    return func


def _checked_rewards(name: str, rewards, n: int) -> list[float | None]:
    """What a reward of your own returned, as `n` floats or None, or a UserError naming the reward: GRPO would zip a
    scalar or wrong type into a crash deep in TRL, and turn NaN into "not applicable" and inf into NaN advantages."""
    if hasattr(rewards, "tolist"):  # a numpy array or a tensor
        rewards = rewards.tolist()
    expected = f"reward '{name}' must return a list[float | None] of {n} values (one per completion)"
    if not isinstance(rewards, (list, tuple)) or len(rewards) != n:
        shown = f"{len(rewards)} values" if isinstance(rewards, (list, tuple)) else repr(rewards)[:80]
        raise UserError(f"{expected}; it returned {type(rewards).__name__}: {shown}")
    rewards = [reward.item() if hasattr(reward, "item") else reward for reward in rewards]  # numpy or torch scalars
    for i, reward in enumerate(rewards):
        if reward is not None and not (isinstance(reward, (int, float)) and math.isfinite(reward)):
            raise UserError(f"{expected}; at row {i} it returned {reward!r} ({type(reward).__name__}): a reward is a "
                            "finite number, or None for a row it does not apply to")
    return [None if reward is None else float(reward) for reward in rewards]


def _checked(name: str, func: RewardFunc) -> RewardFunc:
    """A reward of your own whose output is checked (`_checked_rewards`), named as GRPO logs it (`rewards/<function
    name>/mean`) and async if it is (GRPO runs async rewards side by side)."""
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):
        async def checked(completions, **kwargs):
            return _checked_rewards(name, await func(completions, **kwargs), len(completions))
    else:
        def checked(completions, **kwargs):
            return _checked_rewards(name, func(completions, **kwargs), len(completions))
    functools.update_wrapper(checked, func)
    checked.__name__ = name.rpartition(".")[2]  # a callable instance has no __name__ of its own
    return checked


def check_reward_names(names) -> None:
    """Every name is a reward (`reward_function`, the rule `resolve_rewards` resolves by), or a UserError naming the
    first that is not: the recipe's check at load, and UPOConfig's. Given `{name: weight}`, there is one at least and
    each weight is a finite number: `resolve_rewards` reads them only once the model is loaded, a stage or two in."""
    if isinstance(names, dict) and not names:
        raise UserError("no reward named; name at least one with its weight, e.g. {accuracy: 1.0, think_format: 0.5}")
    for name in names:
        reward_function(name)
        weight = names[name] if isinstance(names, dict) else 1.0
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise UserError(f"'{name}' has the weight {weight!r}; expected a finite number, e.g. {name}: 1.0")


def resolve_rewards(weights: dict[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Reward functions and weights, in the order given, from `{name: weight}` (TRL's `reward_funcs`/`reward_weights`)."""
    if not weights:
        raise UserError("`rewards` is empty; name at least one reward, e.g. {accuracy: 1.0, think_format: 0.5}")
    funcs = [reward_function(name) if name in REWARDS else _checked(name, reward_function(name)) for name in weights]
    return funcs, [float(w) for w in weights.values()]


def combine_rewards(weights: dict[str, float]) -> RewardFunc:
    """One reward function: the weighted sum of the named rewards. Rewards that return None for a row are left out of
    that row's sum; a row for which all return None gets None."""
    funcs, factors = resolve_rewards(weights)

    def combined(completions, **kwargs) -> list[float | None]:
        columns = [func(completions, **kwargs) for func in funcs]
        columns = [asyncio.run(c) if inspect.isawaitable(c) else c for c in columns]  # GRPO takes async rewards too
        totals = []
        for row in zip(*columns, strict=True):
            terms = [w * r for w, r in zip(factors, row, strict=True) if r is not None]
            totals.append(sum(terms) if terms else None)
        return totals

    return combined
