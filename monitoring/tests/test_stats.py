"""The tests behind the verdicts give the figures of the textbook cases."""

from __future__ import annotations

import math

import pytest

from monitoring.stats import binomial_tail, fisher_greater, slower_binned


def test_mann_whitney_on_buckets_matches_scipy_on_the_same_tied_values():
    from scipy.stats import mannwhitneyu

    first = {1.0: 2.0, 2.0: 5.0, 3.0: 9.0, math.inf: 10.0}
    second = {1.0: 6.0, 2.0: 10.0, 3.0: 12.0, math.inf: 12.0}
    values_first = [1] * 2 + [2] * 3 + [3] * 4 + [4] * 1
    values_second = [1] * 6 + [2] * 4 + [3] * 2
    expected = mannwhitneyu(values_first, values_second, alternative="greater", method="asymptotic")
    result = slower_binned(first, second)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert result.p_slower == pytest.approx(expected.statistic / (10 * 12))


def test_no_data_or_one_bucket_is_no_evidence():
    assert slower_binned({}, {1.0: 3.0}).p_value == 1.0
    assert slower_binned({1.0: 3.0}, {1.0: 5.0}).p_value == 1.0


def test_fisher_one_sided_matches_the_hypergeometric_tail():
    from scipy.stats import hypergeom

    # 5 errors of 100 against 0 of 900: P(X >= 5) with 5 errors among 1000 requests, 100 drawn.
    assert fisher_greater(5, 100, 0, 900) == pytest.approx(hypergeom.sf(4, 1000, 5, 100))
    assert fisher_greater(3, 10, 0, 0) == 1.0


def test_binomial_tail_is_the_exact_upper_tail():
    assert binomial_tail(2, 23, 0.01) == pytest.approx(1 - 0.99**23 - 23 * 0.01 * 0.99**22)
    assert binomial_tail(0, 10, 0.5) == 1.0
