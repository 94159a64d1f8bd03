"""Paired statistics against dense attention: what a reviewer needs to tell a loss from noise.

Every sparse run is paired with dense attention's run on the same sample, so the unit of analysis
is the per-sample difference ``method - dense`` (accuracy score, or answer log-likelihood in nats).
For a set of such differences :func:`paired` gives:

* the mean difference with a 95% **percentile bootstrap** interval (resampling the samples with
  replacement, ``n_boot`` times, from a fixed seed so a report is reproducible);
* **wins / losses / ties** (samples where the method scored above / below / equal to dense);
* the exact two-sided **sign test** p-value on wins vs losses (ties dropped), which does not
  assume anything about the size of the differences;
* ``flag``: ``"below"`` / ``"above"`` when the bootstrap interval excludes zero and there are at
  least ``min_n`` (default 5) pairs, else ``""`` (a percentile bootstrap over 2-4 samples is too
  narrow to trust: three losses of 0.01 nats would be "significant").

With 5-10 samples per cell, intervals are wide: a flag means the loss is unlikely to be noise, no
flag does *not* mean "equal to dense". Bootstrap percentile intervals are known to be a little too
narrow for very small n; the sign test is the conservative check next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["bootstrap_ci", "sign_test", "paired"]


def bootstrap_ci(diffs: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``diffs`` and its percentile bootstrap interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = torch.tensor([float(d) for d in diffs], dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("no paired differences")
    if not torch.isfinite(x).all():
        raise ValueError("paired differences must be finite")
    mean = float(x.mean())
    if x.numel() == 1 or bool((x == x[0]).all()):
        return mean, mean, mean
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)
    means = x[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return mean, lo, hi


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value for ``wins`` vs ``losses`` (ties excluded); 1.0 when both are 0."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses must be >= 0")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(diffs: Sequence[float], *, tol: float = 0.0, n_boot: int = 10_000, seed: int = 0,
           min_n: int = 5) -> dict:
    """Summary of paired differences ``method - dense``: ``{"n", "mean", "low", "high", "wins",
    "losses", "ties", "p_sign", "flag"}``; a difference within ``tol`` of zero is a tie (use a small
    ``tol`` for log-likelihoods, whose decode path is not bitwise dense at full budget)."""
    diffs = [float(d) for d in diffs]
    if not diffs:
        return {"n": 0, "mean": None, "low": None, "high": None, "wins": 0, "losses": 0, "ties": 0,
                "p_sign": None, "flag": ""}
    mean, lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    wins = sum(d > tol for d in diffs)
    losses = sum(d < -tol for d in diffs)
    flag = "" if len(diffs) < min_n else "below" if hi < 0 else "above" if lo > 0 else ""
    return {"n": len(diffs), "mean": mean, "low": lo, "high": hi, "wins": wins, "losses": losses,
            "ties": len(diffs) - wins - losses, "p_sign": sign_test(wins, losses), "flag": flag}
