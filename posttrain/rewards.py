"""Reward functions by name: small, pure, each with TRL's reward-function signature.

Every function is `fn(completions, **kwargs) -> list[float | None]`. TRL passes the dataset columns (`answer`,
`domain`, `thinking`, ...) as lists aligned with `completions`, plus `prompts`, `completion_ids`, `trainer_state` and
logging hooks; the functions take what they need and ignore the rest. Completions may be strings or conversational
(`[{"role": "assistant", "content": ...}]`). `None` means "not applicable to this row" (TRL leaves it out of the sum).

The final answer of a completion is the text after its last `</think>` (or the whole completion): `final_answer` is the
one place that decides this, and evaluation calls it too, so training and evaluation score the same thing. On a row
whose `thinking` is true, a completion without `</think>` has no final answer at all (`answer_text`): a chain of thought
cut off by the token budget must not earn credit for the last number it happened to write.

Functions are named exactly as their `REWARDS` key, because TRL logs each one as `rewards/<function name>/mean`.
"""

import math
import re
import unicodedata
from collections.abc import Callable

from .data import completion_text
from .errors import UserError

RewardFunc = Callable[..., list]

# A number: optional sign (ASCII or Unicode minus), thousands separators, decimals; or a bare ".5".
_NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+\u2212]?\.\d+")
# Stripped from both ends before exact comparison. Signs, %, $ are kept: "-7" and "7" must stay different.
_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`*_()[]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u3002\uff0c\uff01\uff1f"
_THINK_BLOCK = re.compile(r"\A\s*<think>(.*?)</think>(.*)\Z", re.S)
NUMERIC_REL_TOL = 1e-6  # answers are compared as floats: "0.50" == ".5" == "1/2 is 0.5"
LENGTH_PENALTY_TOKENS = 512  # a completion this long (or longer) gets the full penalty of -1
HACKABLE_LENGTH_WORDS = 32  # the hackable proxy pays in full for a completion of this many words


# ----------------------------------------------------------------------------------------------------------------------
# Parsing helpers (public: evaluation uses them)
# ----------------------------------------------------------------------------------------------------------------------
def final_answer(text: str) -> str:
    """The answer part of a completion: the text after the last `</think>` if there is one, else all of it, stripped."""
    return text.rsplit("</think>", 1)[-1].strip()


def answer_text(completion, thinking: bool | None = None) -> str:
    """The text the correctness rewards read: the completion, or "" when a thinking-mode row never closed its
    `</think>` (the reasoning was truncated, so nothing was answered). Rows without a thinking mode are unaffected."""
    text = completion_text(completion)
    return "" if thinking and "</think>" not in text else text


def _modes(kwargs: dict, n: int) -> list:
    """The `thinking` column TRL passes (and evaluation passes), or None per row when the data has none."""
    return kwargs.get("thinking") or [None] * n


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


def _column(kwargs: dict, name: str, reward: str) -> list:
    if name not in kwargs:
        columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric"))
        raise UserError(f"reward '{reward}' needs a '{name}' column in the training dataset; the rows have: "
                        f"{', '.join(columns)}")
    return kwargs[name]


# ----------------------------------------------------------------------------------------------------------------------
# Correctness against the reference `answer`
# ----------------------------------------------------------------------------------------------------------------------
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


def numeric_accuracy(completions, **kwargs) -> list[float | None]:
    """1.0 if the last number in the final answer equals the numeric `answer` (relative tolerance 1e-6), else 0.0.

    None for rows whose reference is not a number.
    """
    answers, modes = _column(kwargs, "answer", "numeric_accuracy"), _modes(kwargs, len(completions))
    results = [numeric_match(answer_text(c, t), str(a)) for c, a, t in zip(completions, answers, modes, strict=True)]
    return [None if r is None else float(r) for r in results]


def exact_match(completions, **kwargs) -> list[float]:
    """1.0 if the final answer equals `answer` after normalisation (case, surrounding whitespace/punctuation)."""
    answers, modes = _column(kwargs, "answer", "exact_match"), _modes(kwargs, len(completions))
    return [float(exact_text_match(answer_text(c, t), str(a)))
            for c, a, t in zip(completions, answers, modes, strict=True)]


def multiple_choice(completions, **kwargs) -> list[float | None]:
    """1.0 if the option letter picked by the final answer is the reference letter. None if `answer` is no letter."""
    answers, modes = _column(kwargs, "answer", "multiple_choice"), _modes(kwargs, len(completions))
    rewards = []
    for completion, reference, thinking in zip(completions, answers, modes, strict=True):
        letter = normalize_text(str(reference)).upper()
        if len(letter) != 1 or not letter.isalpha():
            rewards.append(None)
        else:
            rewards.append(float(choice_letter(answer_text(completion, thinking)) == letter))
    return rewards


def accuracy(completions, **kwargs) -> list[float]:
    """Correctness against `answer`: numeric comparison when the reference is a number, else `exact_match`'s rule."""
    answers, modes = _column(kwargs, "answer", "accuracy"), _modes(kwargs, len(completions))
    rewards = []
    for completion, reference, thinking in zip(completions, answers, modes, strict=True):
        text, reference = answer_text(completion, thinking), str(reference)
        numeric = numeric_match(text, reference)
        rewards.append(float(numeric if numeric is not None else exact_text_match(text, reference)))
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
    modes = _modes(kwargs, len(completions))  # the column is optional in the data contract
    return [float(think_format_ok(completion_text(c), None if t is None else bool(t)))
            for c, t in zip(completions, modes, strict=True)]


def length_penalty(completions, **kwargs) -> list[float]:
    """-min(1, length / 512): in [-1, 0], shorter is better. Length is in tokens (`completion_ids`, which TRL passes),
    else in whitespace-separated words."""
    ids = kwargs.get("completion_ids")  # TRL always passes it; evaluation may not
    lengths = [len(x) for x in ids] if ids is not None else [len(completion_text(c).split()) for c in completions]
    return [-min(1.0, n / LENGTH_PENALTY_TOKENS) for n in lengths]


def hackable_length(completions, **kwargs) -> list[float]:
    """Deliberately hackable proxy for the reward-hacking ablation: pays for words, not for being right.

    min(1, whitespace-separated words / `HACKABLE_LENGTH_WORDS`). Rollouts of different lengths make it easy to find
    (every group has variance), and a policy maximises it by rambling past its answer, which the verifier, reading the
    final answer's last number, then marks wrong. Training on it shows whether UPO's pairwise term keeps the policy
    honest.
    """
    return [min(1.0, len(completion_text(c).split()) / HACKABLE_LENGTH_WORDS) for c in completions]


REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy,
    "numeric_accuracy": numeric_accuracy,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "think_format": think_format,
    "length_penalty": length_penalty,
    "hackable_length": hackable_length,
}


# ----------------------------------------------------------------------------------------------------------------------
# Combining and normalising
# ----------------------------------------------------------------------------------------------------------------------
def resolve_rewards(weights: dict[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Reward functions and weights, in the order given, from `{name: weight}` (TRL's `reward_funcs`/`reward_weights`)."""
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        raise UserError(f"unknown reward(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(REWARDS)}")
    if not weights:
        raise UserError("`rewards` is empty; name at least one reward, e.g. {accuracy: 1.0, think_format: 0.5}")
    return [REWARDS[name] for name in weights], [float(w) for w in weights.values()]


def combine_rewards(weights: dict[str, float]) -> RewardFunc:
    """One reward function: the weighted sum of the named rewards. Rewards that return None for a row are left out of
    that row's sum; a row for which all return None gets None."""
    funcs, factors = resolve_rewards(weights)

    def combined(completions, **kwargs) -> list[float | None]:
        columns = [func(completions, **kwargs) for func in funcs]
        totals = []
        for row in zip(*columns, strict=True):
            terms = [w * r for w, r in zip(factors, row, strict=True) if r is not None]
            totals.append(sum(terms) if terms else None)
        return totals

    return combined


def weighted_sum(rewards_per_func, weights):
    """Per-row weighted sum of a `(rows, funcs)` reward tensor. NaN (not applicable) entries are skipped; a row where
    all are NaN stays NaN."""
    import torch

    total = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def normalize_by_group(rewards_per_func, weights, groups: list, eps: float = 1e-4):
    """Standardise rewards within each group of rows (e.g. each `domain`), before GRPO forms group advantages.

    Each reward column is centred on its group mean, and all columns are divided by the standard deviation of the
    *combined* (weighted) reward in that group, so the weighted sum TRL computes afterwards is exactly the combined reward
    standardised per group. NaN ("not applicable") entries stay NaN. A group whose combined reward is constant becomes
    all zeros.

    Note: within one prompt group (one domain) this is an affine map, so with `scale_rewards="group"` the advantages
    would be unchanged; `UPOConfig` therefore turns GRPO's group scaling off when it is used (the group's std becomes
    its domain's std). It also sets the units of the margin UPO mines pairs against.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(rows, funcs)`): rewards per function, NaN where not applicable.
        weights (`torch.Tensor` of shape `(funcs,)`): reward weights.
        groups (`list`): group key per row (e.g. the domain), same length as `rows`.
    """
    import torch

    combined = weighted_sum(rewards_per_func, weights)
    normalized = rewards_per_func.clone()
    for key in dict.fromkeys(groups):  # first-seen order: deterministic
        rows = torch.tensor([g == key for g in groups], device=rewards_per_func.device)
        scored = combined[rows & ~torch.isnan(combined)]
        if scored.numel() == 0:
            continue
        std = scored.std(unbiased=False)
        normalized[rows] = (rewards_per_func[rows] - torch.nanmean(rewards_per_func[rows], dim=0)) / (std + eps)
    return normalized
