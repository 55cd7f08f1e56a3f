"""Error bars: checked against values computed independently (scipy / textbook examples), not against themselves."""

import random

import pytest

from posttrain import stats


def test_wilson_matches_reference_values():
    # scipy.stats.binomtest(24, 48).proportion_ci(method="wilson") = (0.36389, 0.63611)
    low, high = stats.wilson(24, 48)
    assert low == pytest.approx(0.36389, abs=1e-5) and high == pytest.approx(0.63611, abs=1e-5)
    # near the edge the interval stays inside [0, 1] and is asymmetric (the normal approximation would go below 0)
    low, high = stats.wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_accuracy_is_printed_with_its_interval():
    assert stats.format_accuracy(24, 48) == "50.0% (±14)"  # ±13.6: the *interval* half-width, not the standard error
    assert stats.format_accuracy(100, 200) == "50.0% (±7)"  # 6.8
    assert stats.format_accuracy(126, 200) == "63.0% (±7)"  # 56.1-69.4: near enough to symmetric
    # near 0 or 1 the interval itself: 0 of 8 is 0-32.4%, which "±16" would understate
    assert stats.format_accuracy(0, 8) == "0.0% (0–32)"
    assert stats.format_accuracy(10, 200) == "5.0% (3–9)"  # 2.7-9.0


def test_mcnemar_exact_against_binomial_tail():
    # 1 vs 9 discordant: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(5, 5) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_compare_counts_discordant_prompts_and_flags_significance():
    a = [True] * 30 + [False] * 170
    b = [True] * 30 + [True] * 25 + [False] * 145  # 25 prompts fixed, none broken
    c = stats.compare(a, b)
    assert (c.only_a, c.only_b) == (0, 25)
    assert c.difference == pytest.approx(0.125)
    assert c.significant and c.p_value < 1e-6
    assert c.interval[0] > 0 and c.interval[0] < 0.125 < c.interval[1]
    assert stats.format_change(c).startswith("+12.5 (p=")


def test_compare_small_change_is_not_significant():
    a = [True] * 24 + [False] * 24
    b = [True] * 22 + [False] * 2 + [True] * 4 + [False] * 20  # 4 fixed, 2 broken: +2 out of 48
    c = stats.compare(a, b)
    assert not c.significant
    assert c.interval[0] < 0 < c.interval[1]
    assert stats.format_change(c) == "+4.2 n.s."


def test_paired_bootstrap_interval_is_the_central_95_percent():
    # 20 of 100 prompts fixed: difference 0.2, standard error 0.04, so about 0.2 ± 1.96 * 0.04 = (0.12, 0.28); the
    # extremes of 2000 resamples would be ±3.5 standard errors
    low, high = stats.paired_bootstrap([False] * 100, [True] * 20 + [False] * 80)
    assert low == pytest.approx(0.12, abs=0.015) and high == pytest.approx(0.28, abs=0.015)


def test_paired_bootstrap_cuts_as_many_resamples_off_each_end():
    """The interval of b - a is minus that of a - b (the same resamples, negated). It cut 50 of 2000 means off below
    and 49 above: here it read -15.5 to -2.0 points, and -15.5 to -2.5 with the models swapped."""
    rng = random.Random(15)
    a = [rng.random() < 0.6 for _ in range(200)]
    b = [x if rng.random() < 0.8 else not x for x in a]
    low, high = stats.paired_bootstrap(a, b)
    swapped_low, swapped_high = stats.paired_bootstrap(b, a)
    assert (low, high) == (-swapped_high, -swapped_low)


def test_compare_rejects_unpaired_verdicts():
    with pytest.raises(ValueError, match="same prompts"):
        stats.compare([True], [True, False])


def test_mean_interval_over_seeds_uses_student_t():
    mean, low, high = stats.mean_interval([0.30, 0.40, 0.50])
    # sd 0.1, t(2) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    assert mean == pytest.approx(0.40)
    assert high - mean == pytest.approx(0.2484, abs=1e-4) and mean - low == pytest.approx(0.2484, abs=1e-4)
    assert stats.mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_mcnemar_on_many_discordant_prompts_matches_the_exact_sum():
    """Above 1,000 discordant prompts the tail is summed in log space (exact big integers took minutes at 40,000)."""
    import math

    exact = min(1.0, 2 * sum(math.comb(1200, i) for i in range(571)) / 2**1200)
    assert stats.mcnemar_exact(570, 630) == pytest.approx(exact, rel=1e-9)
    assert 0 < stats.mcnemar_exact(19_600, 20_400) < 1e-4  # 2 * 2**-40000 * sum(...) would underflow in plain floats


def test_t_quantile_beyond_the_table():
    """From 31 degrees of freedom on, not the normal quantile (4 % too narrow at 31) but t itself."""
    assert stats.t95(30) == 2.042
    for df, exact in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert stats.t95(df) == pytest.approx(exact, abs=2e-4)


def test_wilson_is_clamped_to_zero_and_one_where_rounding_would_step_outside():
    """At 0 of n (or n of n) the bound is 0 (1) exactly in theory but centre - half rounds to -1e-17 for n = 21 (and
    1 + 2e-16 at 16 of 16): the clamp keeps the interval a probability and the printed bound from reading "-0"."""
    assert stats.wilson(0, 21)[0] == 0.0
    assert stats.wilson(16, 16)[1] == 1.0
    assert stats.format_accuracy(0, 21) == "0.0% (0–15)"  # not "(-0–15)"
    # and on the inside: 5.6e-17 at 0 of 7, 1 - 1e-16 at 48 of 48 (metrics.json kept them)
    assert [stats.wilson(0, n)[0] for n in (7, 48, 200)] == [0.0] * 3
    assert [stats.wilson(n, n)[1] for n in (7, 48, 200)] == [1.0] * 3


def test_evaluations_without_a_prompts_hash_pair_only_when_their_verdicts_line_up():
    """Evaluations written before `prompts_sha` was recorded both lack it: verdicts of other lengths are then not
    the same prompts, and give no comparison (not a ValueError in the report or the promote gate)."""
    assert stats.paired_evals({"verdicts": [1, 0]}, {"verdicts": [1, 0, 1]}) is None
    assert stats.paired_evals({"verdicts": [1, 0]}, {"verdicts": [1, 1]}).only_b == 1


def test_an_evaluation_written_before_intervals_were_recorded_reads_its_rate_and_size():
    """An `evaluate()` dict without verdicts (or a recorded interval): the right answers are its rate times its size,
    rounded (0.29 * 100 is 28.999999999999996 in floats, not 28); without a size, the bare rate; a recorded interval
    is the one given."""
    old = {"accuracy": 0.29, "n": 100}
    assert stats.format_eval_accuracy(old) == stats.format_accuracy(29, 100) == "29.0% (±9)"
    assert stats.accuracy_interval(old) == stats.wilson(29, 100)
    assert stats.format_eval_accuracy({"accuracy": 0.5}) == "50.0%"
    assert stats.accuracy_interval({"accuracy": 0.5}) is None
    assert stats.accuracy_interval({**old, "accuracy_ci95": [0.2, 0.4]}) == (0.2, 0.4)


def test_a_p_value_is_printed_to_two_significant_digits():
    assert [stats.format_p(p) for p in (0.01234, 0.003, 0.5)] == ["0.012", "0.003", "0.5"]


def test_the_mean_of_scores_leaves_out_the_prompts_not_scored():
    """None is "not scored" (a reward that does not apply), not a 0: the mean is over the others."""
    assert stats.mean_of([1.0, None, 0.0]) == 0.5
    assert stats.mean_of([None]) == stats.mean_of([]) == 0.0
