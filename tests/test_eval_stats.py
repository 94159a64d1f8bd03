"""Paired statistics of the report (tokensparse.eval.stats): exact sign-test values, bootstrap
intervals that cover what they must, flags only where the interval excludes zero."""

import math

import pytest

from tokensparse.eval import stats


def test_sign_test_exact_values():
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(0, 5) == pytest.approx(2 / 32)  # all five below: 2 * 0.5**5
    assert stats.sign_test(5, 0) == pytest.approx(2 / 32)
    assert stats.sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.sign_test(5, 5) == 1.0
    assert stats.sign_test(3, 4) == 1.0  # capped at 1
    with pytest.raises(ValueError):
        stats.sign_test(-1, 2)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    diffs = [-1, 0, 0, -1, 0, 0, -1, 0, 0, 0]
    m, lo, hi = stats.bootstrap_ci(diffs)
    assert m == pytest.approx(-0.3) and lo <= m <= hi and -1 <= lo < hi <= 0
    assert stats.bootstrap_ci(diffs) == (m, lo, hi)  # fixed seed
    cont = [0.3, -1.2, 0.7, -0.4, -2.2, 0.1]
    assert stats.bootstrap_ci(cont, seed=1) != stats.bootstrap_ci(cont, seed=0)  # the seed is used
    # the interval narrows as the level drops
    _, lo80, hi80 = stats.bootstrap_ci(diffs, level=0.8)
    assert lo <= lo80 and hi80 <= hi
    # constant differences: a point interval
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    for bad in ([], [math.nan, 1.0]):
        with pytest.raises(ValueError):
            stats.bootstrap_ci(bad)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci([1, 2], level=1.5)


def test_bootstrap_matches_the_normal_interval_on_a_large_sample():
    diffs = [float((i * 37) % 11 - 5) for i in range(400)]  # mean ~0, sd ~3.2
    m, lo, hi = stats.bootstrap_ci(diffs, n_boot=4000)
    sd = (sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    half = 1.96 * sd / len(diffs) ** 0.5
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_paired_counts_ties_flags_and_min_n():
    p = stats.paired([-1, -1, -1, -1, -1])
    assert (p["wins"], p["losses"], p["ties"], p["flag"]) == (0, 5, 0, "below")
    assert p["p_sign"] == pytest.approx(1 / 16)
    assert stats.paired([-1, -1, -1, -1])["flag"] == ""  # fewer than min_n pairs: never flagged
    assert stats.paired([-1, -1, -1, -1], min_n=4)["flag"] == "below"
    p = stats.paired([0, 0, 0, 0, -1])
    assert p["flag"] == "" and (p["losses"], p["ties"]) == (1, 4)  # one loss in five is not a flag
    assert stats.paired([2, 1, 3, 1, 2])["flag"] == "above"
    p = stats.paired([0.0005, -0.0004, -2.0, -1.0, -3.0], tol=1e-3)
    assert (p["wins"], p["losses"], p["ties"]) == (0, 3, 2)
    assert stats.paired([])["n"] == 0 and stats.paired([])["mean"] is None
