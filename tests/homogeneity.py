"""Two-sample chi-square tests of "these sampled outcomes come from the same distribution", shared by
the sampling tests against HF (test_sampling*.py) and through vLLM's engine (test_vllm.py).

Plain Python (no torch), so every venv that runs tests can import it. Outcomes are ``Counter`` s of
hashable outcomes (tuples of tokens). Thresholds are chi-square upper quantiles for the degrees of
freedom of the bins actually used (Wilson-Hilferty, within about 1% for df >= 3).
"""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist


def chi2_quantile(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square(df)."""
    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def homogeneity(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """Two-sample chi-square statistic and degrees of freedom; outcomes seen fewer than ``min_count``
    times in both samples together share one bin."""
    na, nb = sum(a.values()), sum(b.values())
    bins, rest = [], [0, 0]
    for key in set(a) | set(b):
        if a[key] + b[key] >= min_count:
            bins.append((a[key], b[key]))
        else:
            rest[0] += a[key]
            rest[1] += b[key]
    if sum(rest) > 0:
        bins.append(tuple(rest))
    ka, kb = math.sqrt(nb / na), math.sqrt(na / nb)
    return sum((x * ka - y * kb) ** 2 / (x + y) for x, y in bins), len(bins) - 1


def tv(a: Counter, b: Counter) -> float:
    """Total variation between the two samples' empirical distributions."""
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def position(outcomes: Counter, i: int) -> Counter:
    """The distribution of the token at position ``i`` (None where an outcome is shorter)."""
    out = Counter()
    for seq, n in outcomes.items():
        out[seq[i] if i < len(seq) else None] += n
    return out


def worst_test(a: Counter, b: Counter, positions: int, alpha: float, pool: int = 5) -> tuple[float, int, float]:
    """The largest of 1 + ``positions`` tests, each against its threshold at ``alpha`` split over
    them: the whole outcomes, and the token at each position. Outcomes are pooled until the smaller
    sample expects ``pool`` of each. A position's own test has few bins, so a bias that lands on
    outcomes one side rarely or never produces (pooled away in the whole-outcome test) is seen
    there; the whole outcomes see a bias in how tokens follow each other. Returns (statistic,
    degrees of freedom, threshold) of the test nearest to rejecting."""
    tests = [(a, b)] + [(position(a, i), position(b, i)) for i in range(positions)]
    worst = None
    for x, y in tests:
        nx, ny = sum(x.values()), sum(y.values())
        stat, df = homogeneity(x, y, min_count=math.ceil(pool * (nx + ny) / min(nx, ny)))
        limit = chi2_quantile(max(df, 1), alpha / len(tests))
        if worst is None or stat / limit > worst[0] / worst[2]:
            worst = (stat, df, limit)
    return worst
