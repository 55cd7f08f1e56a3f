"""Error bars for accuracies: Wilson intervals, and paired comparisons of two models on the same prompts.

Held-out sets here are small (hundreds of prompts), so a few points of accuracy are often luck. Every accuracy we
print carries a 95 % Wilson interval (well behaved near 0 and 1, unlike the normal approximation), and a stage is
compared with the one before on the *same* prompts with an exact McNemar test (only the prompts where the two
disagree carry information) and a paired bootstrap interval of the difference. Written by hand: scipy is not a
dependency, and these are a few lines each.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion; (0, 1) when `n` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 or n successes the bound is 0 or 1 exactly; computed, it misses by rounding (5.6e-17 at 0 of 7)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return low, 1.0 if successes == n else min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference", the `only_a + only_b` discordant prompts split
    Binomial(n, 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    if n <= 1000:
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    else:  # the same sum in log space: exact integers took minutes at tens of thousands of discordant prompts
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                for i in range(k + 1)]
        top = max(logs)
        tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[bool], b: list[bool], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(b) - mean(a) over prompts resampled with replacement (seeded)."""
    n = len(a)
    if n == 0:
        return 0.0, 0.0
    rng = random.Random(seed)
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    # as many resamples cut off above as below (50 of 2000 each): then swapping a and b only flips the sign
    cut = int(0.025 * samples)
    return means[cut], means[samples - 1 - cut]


@dataclass
class Comparison:
    """`b` (e.g. a stage) against `a` (the stage before) on the same prompts."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    interval: tuple[float, float]  # 95 % paired bootstrap interval of the difference
    only_a: int  # prompts right under a and wrong under b
    only_b: int
    p_value: float  # exact McNemar
    significant: bool  # p < 0.05

    def to_dict(self) -> dict:
        return asdict(self)


def compare(a: list[bool], b: list[bool]) -> Comparison:
    """Paired comparison of per-prompt verdicts `a` and `b` (same prompts, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same prompts: {len(a)} verdicts vs {len(b)}")
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    p = mcnemar_exact(only_a, only_b)
    acc_a, acc_b = (sum(a) / n, sum(b) / n) if n else (0.0, 0.0)
    return Comparison(n=n, accuracy_a=acc_a, accuracy_b=acc_b, difference=acc_b - acc_a,
                      interval=paired_bootstrap(a, b), only_a=only_a, only_b=only_b, p_value=p,
                      significant=p < 0.05)


def paired_evals(a: dict | None, b: dict | None) -> Comparison | None:
    """`compare` two held-out evaluations (`evaluate()`'s dicts) by their per-prompt verdicts; None when either has
    none or they were not answered on the same prompts (`prompts_sha`)."""
    if not a or not b or a.get("verdicts") is None or b.get("verdicts") is None:
        return None
    if a.get("prompts_sha") != b.get("prompts_sha") or len(a["verdicts"]) != len(b["verdicts"]):
        return None
    return compare([bool(v) for v in a["verdicts"]], [bool(v) for v in b["verdicts"]])


def format_eval_accuracy(evaluation: dict) -> str:
    """`format_accuracy` of an `evaluate()` dict (the bare rate for one written before intervals were recorded)."""
    n = evaluation.get("n") or 0
    if evaluation.get("verdicts") is not None:
        return format_accuracy(sum(evaluation["verdicts"]), len(evaluation["verdicts"]))
    return f"{100 * evaluation['accuracy']:.1f}%" if not n else format_accuracy(round(evaluation["accuracy"] * n), n)


def accuracy_interval(evaluation: dict) -> tuple[float, float] | None:
    """The 95 % Wilson interval of an `evaluate()` dict's accuracy: the one it recorded, else (one written before
    intervals were recorded) from its rate and size, as `format_eval_accuracy` gives it; None without a size."""
    if evaluation.get("accuracy_ci95"):
        return tuple(evaluation["accuracy_ci95"])
    n = evaluation.get("n") or 0
    return wilson(round(evaluation["accuracy"] * n), n) if n and evaluation.get("accuracy") is not None else None


def format_accuracy(successes: int, n: int) -> str:
    """`54.2% (±7)`: the accuracy with half its 95 % interval, in points; `0.0% (0–32)`, the interval itself, where
    one side is more than a quarter longer than the other (near 0 or 1 a half-width understates the long side: 0 of 8
    is not "±16")."""
    rate = successes / max(n, 1)
    low, high = wilson(successes, n)
    short, long = sorted((rate - low, high - rate))
    if long <= 1.25 * short:
        return f"{100 * rate:.1f}% (±{100 * (high - low) / 2:.0f})"
    return f"{100 * rate:.1f}% ({100 * low:.0f}–{100 * high:.0f})"


def format_change(comparison: Comparison) -> str:
    """`+4.2 n.s.` or `+12.5 (p=0.003)`: the paired difference in points and whether it is significant."""
    text = f"{100 * comparison.difference:+.1f}"
    return f"{text} (p={format_p(comparison.p_value)})" if comparison.significant else f"{text} n.s."


def format_p(p: float) -> str:
    """A p-value to two significant digits, more where two would round it across 0.05: 0.04998 is `0.04998`, not
    `0.05` (significant, yet printed as if it failed p < 0.05); 0.05002 stays `0.05`."""
    digits = 2
    while (float(f"{p:.{digits}g}") < 0.05) != (p < 0.05):
        digits += 1
    return f"{p:.{digits}g}"


def mean_of(values) -> float:
    """The mean of the values given (None: not scored, left out); 0.0 for none."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95 % t-interval over seeds."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = t95(n - 1)
    return mean, mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)


def t95(df: int) -> float:
    """Two-sided 95 % Student t quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    around the normal quantile (within 1e-4 of the exact value from 31 on)."""
    if df in _T95:
        return _T95[df]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


# two-sided 95 % Student t quantiles by degrees of freedom: seeds are few
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.16, 14: 2.145, 15: 2.131, 16: 2.12, 17: 2.11, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.08, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.06, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
