"""The statistical tests behind automatic verdicts: each says how sure it is, so a decision is taken on
evidence and not on noise. Pure functions of counts (scipy for the distributions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _scipy


@dataclass(frozen=True)
class Comparison:
    p_value: float  # one-sided: the chance of a difference at least this large if there were none
    p_slower: float  # P(a draw from the first is larger than one from the second), ties counted half


def _bins(cumulative: dict[float, float], bounds: list[float]) -> list[float]:
    """Per-bucket counts, on `bounds`, from Prometheus' cumulative `le` buckets."""
    counts, before = [], 0.0
    for bound in bounds:
        total = max((n for b, n in cumulative.items() if b <= bound), default=0.0)
        counts.append(max(0.0, total - before))
        before = max(before, total)
    return counts


def slower_binned(first: dict[float, float], second: dict[float, float]) -> Comparison:
    """One-sided Mann-Whitney U test that `first` (latencies as cumulative histogram buckets) is slower
    than `second`: every request in a bucket is a tie at that bucket's rank (tie-corrected variance,
    continuity correction, normal approximation)."""
    bounds = sorted(set(first) | set(second))
    a, b = _bins(first, bounds), _bins(second, bounds)
    n1, n2 = sum(a), sum(b)
    if n1 == 0 or n2 == 0:
        return Comparison(1.0, 0.5)
    u, below = 0.0, 0.0
    for ca, cb in zip(a, b, strict=True):
        u += ca * (below + cb / 2)
        below += cb
    n = n1 + n2
    ties = sum((ca + cb) ** 3 - (ca + cb) for ca, cb in zip(a, b, strict=True))
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    p_slower = u / (n1 * n2)
    if variance <= 0:
        return Comparison(1.0, p_slower)
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return Comparison(float(_scipy.norm.sf(z)), p_slower)


def fisher_greater(errors: int, requests: int, base_errors: int, base_requests: int) -> float:
    """One-sided Fisher exact test that the error proportion errors/requests is above the baseline's;
    exact for small counts. 1.0 without a baseline or requests."""
    if requests <= 0 or base_requests <= 0:
        return 1.0
    table = [[errors, requests - errors], [base_errors, base_requests - base_errors]]
    return float(_scipy.fisher_exact(table, alternative="greater").pvalue)


def binomial_tail(hits: int, trials: int, rate: float) -> float:
    """P(at least `hits` in `trials` if each happens with probability `rate`): the exact one-sided test
    that the true rate is above `rate`."""
    if trials <= 0 or hits <= 0:
        return 1.0
    return float(_scipy.binom.sf(hits - 1, trials, min(max(rate, 0.0), 1.0)))


def slower_paired(first: list[float], second: list[float]) -> Comparison:
    """One-sided Wilcoxon signed-rank test that `first` is slower than `second` where both timed the same
    requests (first[i] and second[i] answered one request): more powerful than comparing the two
    distributions, since each request's own cost cancels out. p_slower: the share of requests that took
    longer in `first`, ties counted half."""
    pairs = list(zip(first, second, strict=True))
    if not pairs:
        return Comparison(1.0, 0.5)
    p_slower = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    if all(a == b for a, b in pairs):
        return Comparison(1.0, p_slower)
    result = _scipy.wilcoxon([a - b for a, b in pairs], alternative="greater", zero_method="zsplit")
    return Comparison(float(result.pvalue), p_slower)


@dataclass(frozen=True)
class Shift:
    """How two samples of a model's answers differ: the test, its p-value and an effect size in 0..1."""

    test: str
    p_value: float
    effect: float  # total variation distance of the label shares, or the K-S statistic of numeric answers
    effect_name: str


MAX_CATEGORIES = 50  # answers with at most this many distinct values (and not floats) are labels


def answers_differ(first: list[object], second: list[object]) -> Shift:
    """Whether two samples of answers come from different distributions. Labels (classes, strings): the
    chi-square test of homogeneity on their counts, with the total variation distance of their shares;
    numbers: the two-sample Kolmogorov-Smirnov test, its statistic as the effect."""
    values = set(first) | set(second)
    labels = len(values) <= MAX_CATEGORIES and not any(isinstance(v, float) for v in values)
    if labels:
        order = sorted(values, key=str)
        counts = [[sum(1 for v in sample if v == c) for c in order] for sample in (first, second)]
        tvd = 0.5 * sum(abs(a / len(first) - b / len(second)) for a, b in zip(*counts, strict=True))
        if len(order) < 2:
            return Shift("chi-square", 1.0, 0.0, "total variation distance")
        p = float(_scipy.chi2_contingency(counts, correction=False).pvalue)
        return Shift("chi-square", p, tvd, "total variation distance")
    numbers = [[float(v) for v in sample] for sample in (first, second)]  # type: ignore[arg-type]
    ks = _scipy.ks_2samp(numbers[0], numbers[1])
    return Shift("Kolmogorov-Smirnov", float(ks.pvalue), float(ks.statistic), "K-S statistic")
