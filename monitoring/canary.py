"""Canary analysis, the judgement from live data that decides a rollout step: Prometheus-format
metrics from the gateways (per-version latency histograms and error counters) and the Triton servers
(per-model failure counters), judged over a sliding window.

Every tick scrapes the sources, keeps the cumulative figures as a snapshot in Redis, and compares the
newest with the oldest snapshot inside the window (never older than the step's settle point, so a
window holds one weight). Counters that went down (a gateway or Triton restarted) count from zero.

The canary is judged against the stable version over the same window, since both share the machine and
its noise (monitoring/stats.py has the tests):
- latency: a one-sided Mann-Whitney U test on the two latency histograms (buckets as tied ranks): the
  canary fails when it is slower with confidence 1 - ALPHA and by an effect that matters: P(a canary
  request is slower than a stable one) >= SLOWER_EFFECT, and its median LATENCY_RATIO times stable's and
  LATENCY_FLOOR_MS above it (with thousands of requests a 10% difference is significant, and harmless);
- errors: a one-sided Fisher exact test of the canary's error count against stable's, sound for small
  counts, with the same confidence and a canary error rate above stable's by at least ERROR_MARGIN;
- the deployment's absolute limits stay as hard ceilings, each judged by an exact binomial test: the
  canary fails the p99 ceiling when more of its requests exceed max_p99_ms than a p99 at the ceiling
  would give (1%), with confidence 1 - ALPHA; likewise the error-rate ceiling.
A window that cannot pass (fewer than min_requests canary requests) and shows no failure with that
confidence is `inconclusive`: the rollout extends the step rather than deciding on a few requests.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from monitoring import stats

log = logging.getLogger("monitoring.canary")

SNAPSHOT_KEY = "deployer:analysis:{deployment}"
ALPHA = 0.01  # a failure is called with 99% confidence
SLOWER_EFFECT = 0.65  # ... and only if a canary request is slower than a stable one in 65% of pairs,
LATENCY_RATIO = 1.5  # its median at least 1.5 times stable's
LATENCY_FLOOR_MS = 0.5  # and half a millisecond more (below that it is the machine's scheduling, not the model)
# ... over at least this many seconds: a machine busy for a moment (a database restarting, a burst of
# builds) slows one Triton process more than another for a second or two, which the test alone would
# call significant (bench/chaos saw a copy of the stable model "slower" over 2 s). Errors and the hard
# ceilings are judged at once.
LATENCY_MIN_WINDOW_S = 6.0
ERROR_MARGIN = 0.01  # ... or its error rate is above stable's by a percentage point
CEILING_P = 0.01  # the share of requests a p99 allows above it


@dataclass
class Figures:
    """Cumulative counts of one version (or one Triton model), summed over sources."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def minus(self, old: Figures) -> Figures:
        if self.requests < old.requests or self.errors < old.errors:
            return self  # a source restarted: its counters began again from zero
        return Figures(self.requests - old.requests, self.errors - old.errors,
                       {b: max(0.0, n - old.buckets.get(b, 0.0)) for b, n in self.buckets.items()})


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile as Prometheus computes it: linear inside the bucket that holds the rank."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the largest finite bucket: report that bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


def _families(text: str) -> Iterable[Any]:
    try:
        yield from text_string_to_metric_families(text)
    except ValueError as exc:
        log.warning("unparsable metrics: %s", exc)


def gateway_figures(text: str, model: str) -> dict[str, Figures]:
    """Per routed version of `model`, from one gateway's /metrics."""
    out: dict[str, Figures] = {}
    for family in _families(text):
        for s in family.samples:
            labels = s.labels
            if labels.get("model") != model or "version" not in labels:
                continue
            figures = out.setdefault(labels["version"], Figures())
            if s.name == "gateway_request_duration_seconds_bucket":
                bound = float(labels["le"])
                figures.buckets[bound] = figures.buckets.get(bound, 0.0) + s.value
            elif s.name == "gateway_request_duration_seconds_count":
                figures.requests += s.value
            elif s.name == "gateway_request_errors_total":
                figures.errors += s.value
    return out


def triton_figures(text: str, triton_models: set[str]) -> dict[str, Figures]:
    """Per Triton model, from one Triton server's /metrics: successes + failures, and failures."""
    out: dict[str, Figures] = {}
    for family in _families(text):
        for s in family.samples:
            name = s.labels.get("model")
            if name not in triton_models:
                continue
            figures = out.setdefault(name, Figures())
            sample = s.name.removesuffix("_total")  # the parser names counter samples <name>_total
            if sample == "nv_inference_request_success":
                figures.requests += s.value
            elif sample == "nv_inference_request_failure":
                figures.requests += s.value
                figures.errors += s.value
    return out


def _fetch(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback / cluster URLs only
            return str(resp.read().decode("utf-8", "replace"))
    except OSError as exc:
        log.info("metrics from %s unavailable: %s", url, exc)
        return None


@dataclass
class Snapshot:
    t: float
    sources: dict[str, dict[str, dict[str, Any]]]  # source url -> subject -> Figures as a dict


def scrape(model: str, triton_models: set[str], gateway_urls: list[str], triton_urls: list[str]) -> Snapshot:
    sources: dict[str, dict[str, dict[str, Any]]] = {}
    for url in gateway_urls:
        text = _fetch(url)
        if text is not None:
            sources[url] = {f"gateway:{v}": asdict(f) for v, f in gateway_figures(text, model).items()}
    for url in triton_urls:
        text = _fetch(url)
        if text is not None:
            sources[url] = {f"triton:{m}": asdict(f) for m, f in triton_figures(text, triton_models).items()}
    return Snapshot(time.time(), sources)


def _as_figures(data: dict[str, Any]) -> Figures:
    return Figures(data["requests"], data["errors"], {float(b): n for b, n in data["buckets"].items()})


def window(new: Snapshot, old: Snapshot | None) -> dict[str, Figures]:
    """Per subject ("gateway:<version>", "triton:<model>"), the counts between two snapshots, summed over
    sources. A source missing from the old snapshot counts in full (it is new, or was unreachable)."""
    total: dict[str, Figures] = {}
    for url, subjects in new.sources.items():
        for subject, data in subjects.items():
            current = _as_figures(data)
            before = old.sources.get(url, {}).get(subject) if old is not None else None
            delta = current.minus(_as_figures(before)) if before is not None else current
            acc = total.setdefault(subject, Figures())
            acc.requests += delta.requests
            acc.errors += delta.errors
            for b, n in delta.buckets.items():
                acc.buckets[b] = acc.buckets.get(b, 0.0) + n
    return total


FAIL_EVIDENCE = 3  # canary requests, at the least, behind any failure


def slower_than(seconds: float, buckets: dict[float, float]) -> float:
    """Requests certainly slower than `seconds`: those above the largest bucket bound not above it."""
    bounds = sorted(buckets)
    if not bounds:
        return 0.0
    below = max((buckets[b] for b in bounds if b <= seconds), default=0.0)
    return buckets[bounds[-1]] - below


@dataclass(frozen=True)
class Thresholds:
    max_p99_ms: float
    max_error_rate: float
    min_requests: int


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "pass", "fail", "inconclusive", "wait" (settling after a weight change, or no window yet)
    reason: str
    figures: dict[str, Any]


def waiting(reason: str) -> Verdict:
    """No window to judge yet: the step is settling after a weight change, or has just begun."""
    return Verdict("wait", reason, {"canary_requests": 0, "canary_error_rate": 0.0, "canary_p99_ms": None})


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def judge(win: dict[str, Figures], canary_version: str, canary_triton: str, stable_version: str | None,
          limits: Thresholds, window_s: float) -> Verdict:
    gw = win.get(f"gateway:{canary_version}", Figures())
    tr = win.get(f"triton:{canary_triton}", Figures())
    st = win.get(f"gateway:{stable_version}", Figures()) if stable_version is not None else Figures()
    requests = int(max(gw.requests, tr.requests))
    errors = int(max(gw.errors, tr.errors))  # the same failure is seen by both: the larger count, not the sum
    error_rate = errors / requests if requests else 0.0
    p99, sp99, p50, sp50 = (quantile(q, f.buckets) for f, q in ((gw, 0.99), (st, 0.99), (gw, 0.5), (st, 0.5)))
    st_requests, st_errors = int(st.requests), int(st.errors)
    st_rate = st_errors / st_requests if st_requests else 0.0
    latency = stats.slower_binned(gw.buckets, st.buckets)
    error_p = stats.fisher_greater(errors, requests, st_errors, st_requests)
    slow = int(slower_than(limits.max_p99_ms / 1000, gw.buckets))
    ceiling_p = stats.binomial_tail(slow, int(gw.requests), CEILING_P)
    error_ceiling_p = stats.binomial_tail(errors, requests, limits.max_error_rate)
    figures: dict[str, Any] = {
        "window_s": round(window_s, 1), "canary_requests": requests, "canary_errors": errors,
        "canary_error_rate": round(error_rate, 4), "canary_p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "canary_p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "max_p99_ms": limits.max_p99_ms, "max_error_rate": limits.max_error_rate,
        "latency_p_value": round(latency.p_value, 6), "latency_p_slower": round(latency.p_slower, 3),
        "error_p_value": round(error_p, 6), "confidence": 1 - ALPHA,
    }
    if stable_version is not None:
        figures.update(stable_requests=st_requests, stable_error_rate=round(st_rate, 4),
                       stable_p99_ms=None if sp99 is None else round(sp99 * 1000, 2),
                       stable_p50_ms=None if sp50 is None else round(sp50 * 1000, 2))
    arms = (f"canary {requests} requests, p50 {_ms(p50)}, p99 {_ms(p99)}, errors {error_rate:.1%}; "
            f"stable {st_requests} requests, p50 {_ms(sp50)}, p99 {_ms(sp99)}, errors {st_rate:.1%}")
    # Failing needs confidence, not min_requests: a slow or failing canary answers few requests, so waiting
    # for min_requests would keep it in traffic longest exactly when it is worst. But never on one or two.
    if requests >= FAIL_EVIDENCE:
        if errors >= FAIL_EVIDENCE and error_ceiling_p < ALPHA:
            return Verdict("fail", f"canary error rate {error_rate:.1%} is above the {limits.max_error_rate:.1%} "
                                   f"limit (binomial test, p={error_ceiling_p:.2g}); {arms}", figures)
        if errors >= FAIL_EVIDENCE and error_p < ALPHA and error_rate - st_rate >= ERROR_MARGIN:
            return Verdict("fail", f"canary errors {error_rate:.1%} against stable's {st_rate:.1%} in the same "
                                   f"{window_s:.0f}s (Fisher exact test, p={error_p:.2g}); {arms}", figures)
        if slow >= FAIL_EVIDENCE and ceiling_p < ALPHA:
            return Verdict("fail", f"canary p99 latency is above the {limits.max_p99_ms:g} ms limit: {slow} of "
                                   f"{int(gw.requests)} requests slower (binomial test against 1%, "
                                   f"p={ceiling_p:.2g}); {arms}", figures)
        if latency.p_value < ALPHA and latency.p_slower >= SLOWER_EFFECT and p50 is not None and sp50 is not None \
                and p50 >= sp50 * LATENCY_RATIO and (p50 - sp50) * 1000 >= LATENCY_FLOOR_MS:
            slower = (f"a canary request is slower than a stable one {latency.p_slower:.0%} of the time "
                      f"(Mann-Whitney U, p={latency.p_value:.2g})")
            if window_s < LATENCY_MIN_WINDOW_S:
                return Verdict("inconclusive", f"canary slower than stable so far ({slower}), but over "
                                               f"{window_s:.0f}s, less than the {LATENCY_MIN_WINDOW_S:g}s a latency "
                                               f"verdict needs; {arms}", figures)
            return Verdict("fail", f"canary slower than stable in the same {window_s:.0f}s: {slower}; {arms}", figures)
    if requests < limits.min_requests:
        return Verdict("inconclusive", f"{requests} of {limits.min_requests} canary requests in the last "
                                       f"{window_s:.0f}s and no failure shown with {1 - ALPHA:.0%} confidence; "
                                       f"{arms}", figures)
    return Verdict("pass", f"no regression against stable with {1 - ALPHA:.0%} confidence; {arms}", figures)


class SnapshotStore:
    """The snapshots of one deployment's analysis, oldest first, trimmed to the window."""

    def __init__(self, redis_client: Any, deployment_id: int) -> None:
        self.redis, self.key = redis_client, SNAPSHOT_KEY.format(deployment=deployment_id)

    def push_and_base(self, snap: Snapshot, window_s: float, not_before: float = 0.0) -> Snapshot | None:
        """Store `snap`; return the oldest stored snapshot not older than the window nor taken before
        `not_before` (the step's settle point): the base."""
        raw = self.redis.get(self.key)
        kept = [Snapshot(s["t"], s["sources"]) for s in json.loads(raw)] if raw else []
        kept = [s for s in kept if snap.t - s.t <= window_s and s.t >= not_before]
        base = kept[0] if kept else None
        kept.append(snap)
        self.redis.set(self.key, json.dumps([asdict(s) for s in kept]), ex=int(window_s * 4) + 60)
        return base

    def clear(self) -> None:
        self.redis.delete(self.key)
