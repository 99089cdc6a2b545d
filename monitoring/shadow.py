"""Shadow analysis: a candidate judged on the same requests as the stable version, answer by answer.

Each `Pair` is one request answered by both versions (a replayed recorded request, see deployer/shadow.py):
both statuses, both latencies and both KServe v2 JSON responses. Over a window of pairs the candidate fails
when, with confidence 1 - ALPHA (canary.ALPHA) and at least FAIL_EVIDENCE pairs behind it:
- its answers differ from stable's in more than 1 - min_agreement of the requests (exact binomial test):
  a pair differs when the labels differ (the argmax of the first output, or a string output's value) or
  when some output value differs by more than max_prob_diff (for a classifier: a class probability);
- it fails requests stable answered, more than ERROR_MARGIN above stable's rate (exact binomial test on
  the requests where exactly one version failed: a sign test, paired as the data are);
- it is slower on the same requests (one-sided Wilcoxon signed-rank test) by an effect that matters:
  slower on SLOWER_EFFECT of them, median LATENCY_RATIO times stable's and latency_floor_ms above it
  (canary.LATENCY_FLOOR_MS for replayed pairs, timed alike; MIRRORED_LATENCY_FLOOR_MS for mirrored ones).
It passes with min_requests pairs and no failure; otherwise the window is inconclusive. The verdict is in
words with the figures, as the canary's is.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from monitoring import stats
from monitoring.canary import (
    ALPHA,
    ERROR_MARGIN,
    FAIL_EVIDENCE,
    LATENCY_FLOOR_MS,
    LATENCY_RATIO,
    SLOWER_EFFECT,
    Verdict,
)
from monitoring.kserve import outputs

DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MAX_PROB_DIFF = 0.05
# Mirrored copies are timed on another path than the client's request (a gateway worker that just woke, a
# model instance that sees only the mirrored share, so is colder): identical sub-millisecond echo models
# measured 1.1 ms mirrored against 0.5 ms served on this 2-core machine under load. A latency regression
# of a mirrored candidate must be this much above stable's median, not canary.LATENCY_FLOOR_MS.
MIRRORED_LATENCY_FLOOR_MS = 2.0


@dataclass(frozen=True)
class Pair:
    """One request sent to both versions."""

    stable_status: int
    stable_ms: float
    stable_body: bytes
    candidate_status: int
    candidate_ms: float
    candidate_body: bytes


@dataclass(frozen=True)
class ShadowThresholds:
    min_requests: int
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF
    latency_floor_ms: float = LATENCY_FLOOR_MS


def _label(values: list[Any]) -> Any:
    if not values:
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return max(range(len(values)), key=lambda i: values[i])  # argmax: the class of a probability vector
    return values[0]  # a label output (strings)


@dataclass(frozen=True)
class Difference:
    labels_agree: bool
    max_diff: float  # the largest absolute difference between numeric output values; inf if not comparable


def compare(stable_body: bytes, candidate_body: bytes) -> Difference:
    """How far the candidate's answer is from stable's: the label (of the first output, by name order, that
    both have) and the largest value difference over every output both have. Different output names or
    shapes, or an answer that is not KServe v2 JSON, count as disagreeing."""
    a, b = outputs(stable_body), outputs(candidate_body)
    if a is None or b is None or set(a) != set(b) or not a:
        return Difference(False, math.inf)
    names = sorted(a)
    labels_agree = _label(a[names[0]]) == _label(b[names[0]])
    max_diff = 0.0
    for name in names:
        x, y = a[name], b[name]
        if len(x) != len(y):
            return Difference(False, math.inf)
        for u, v in zip(x, y, strict=True):
            if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                max_diff = max(max_diff, abs(float(u) - float(v)))
            elif u != v and name != names[0]:
                max_diff = math.inf  # a string output other than the label: differs or not, no distance
    return Difference(labels_agree, max_diff)


def judge_pairs(pairs: list[Pair], limits: ShadowThresholds, source: str = "shadow") -> Verdict:
    """The shadow verdict over a window's pairs. `source` names where the pairs came from in the reason
    ("replayed", "mirrored")."""
    n = len(pairs)
    both_ok = [p for p in pairs if p.stable_status == 200 and p.candidate_status == 200]
    diffs = [compare(p.stable_body, p.candidate_body) for p in both_ok]
    label_differ = sum(1 for d in diffs if not d.labels_agree)
    value_differ = sum(1 for d in diffs if d.labels_agree and d.max_diff > limits.max_prob_diff)
    differ = label_differ + value_differ
    largest = max((d.max_diff for d in diffs), default=0.0)
    compared = len(both_ok)
    agreement = 1 - differ / compared if compared else 1.0
    only_candidate_failed = sum(1 for p in pairs if p.candidate_status != 200 and p.stable_status == 200)
    only_stable_failed = sum(1 for p in pairs if p.stable_status != 200 and p.candidate_status == 200)
    candidate_errors = sum(1 for p in pairs if p.candidate_status != 200)
    stable_errors = sum(1 for p in pairs if p.stable_status != 200)
    latency = stats.slower_paired([p.candidate_ms for p in both_ok], [p.stable_ms for p in both_ok])
    p50 = statistics.median([p.candidate_ms for p in both_ok]) if both_ok else None
    sp50 = statistics.median([p.stable_ms for p in both_ok]) if both_ok else None
    agreement_p = stats.binomial_tail(differ, compared, 1 - limits.min_agreement)
    # Sign test on the requests only one version failed: under "no worse", each is the candidate's with p 1/2.
    discordant = only_candidate_failed + only_stable_failed
    error_p = stats.binomial_tail(only_candidate_failed, discordant, 0.5)
    figures: dict[str, Any] = {
        "shadow_source": source, "shadow_requests": n, "compared": compared,
        "label_agreement": round(1 - label_differ / compared, 4) if compared else None,
        "agreement": round(agreement, 4), "max_prob_diff": None if math.isinf(largest) else round(largest, 6),
        "min_agreement": limits.min_agreement, "max_prob_diff_limit": limits.max_prob_diff,
        "agreement_p_value": round(agreement_p, 6),
        "canary_requests": n, "canary_errors": candidate_errors,
        "canary_error_rate": round(candidate_errors / n, 4) if n else 0.0,
        "stable_error_rate": round(stable_errors / n, 4) if n else 0.0, "error_p_value": round(error_p, 6),
        "canary_p50_ms": None if p50 is None else round(p50, 2),
        "stable_p50_ms": None if sp50 is None else round(sp50, 2),
        "canary_p99_ms": None, "latency_p_value": round(latency.p_value, 6),
        "latency_p_slower": round(latency.p_slower, 3), "confidence": 1 - ALPHA,
    }
    largest_text = "n/a" if not diffs else ("not comparable" if math.isinf(largest) else f"{largest:.4g}")
    arms = (f"{n} {source} requests sent to both; {compared} compared: labels differ in {label_differ}, "
            f"values beyond {limits.max_prob_diff:g} in {value_differ} (agreement {agreement:.1%}), largest "
            f"difference {largest_text}; errors candidate {candidate_errors}, stable {stable_errors}; p50 "
            f"candidate {_ms(p50)}, stable {_ms(sp50)}")
    if n >= FAIL_EVIDENCE:
        if differ >= FAIL_EVIDENCE and agreement_p < ALPHA:
            return Verdict("fail", f"candidate answers differ from stable's: agreement {agreement:.1%} is below "
                                   f"{limits.min_agreement:.1%} (binomial test, p={agreement_p:.2g}); {arms}", figures)
        if only_candidate_failed >= FAIL_EVIDENCE and error_p < ALPHA \
                and (candidate_errors - stable_errors) / n >= ERROR_MARGIN:
            return Verdict("fail", f"candidate failed {only_candidate_failed} requests stable answered (sign test, "
                                   f"p={error_p:.2g}); {arms}", figures)
        if latency.p_value < ALPHA and latency.p_slower >= SLOWER_EFFECT and p50 is not None and sp50 is not None \
                and p50 >= sp50 * LATENCY_RATIO and p50 - sp50 >= limits.latency_floor_ms:
            return Verdict("fail", f"candidate slower than stable on the same requests: slower on "
                                   f"{latency.p_slower:.0%} of them (Wilcoxon signed-rank, p={latency.p_value:.2g}); "
                                   f"{arms}", figures)
    if compared < limits.min_requests:
        return Verdict("inconclusive", f"{compared} of {limits.min_requests} {source} requests compared and no "
                                       f"failure shown with {1 - ALPHA:.0%} confidence; {arms}", figures)
    return Verdict("pass", f"answers as stable's and no regression with {1 - ALPHA:.0%} confidence; {arms}", figures)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"
