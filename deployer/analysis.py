"""Canary analysis from Prometheus-format metrics: the gateways' per-version latency histograms and
error counters, and the Triton servers' per-model failure counters, judged over a sliding window.

Every tick scrapes the sources, keeps the cumulative figures as a snapshot in Redis, and compares the
newest with the oldest snapshot inside the window. Counters that went down (a gateway or Triton restarted)
count from zero. The verdict is pass, fail (with the reason in words) or wait (too few requests yet).
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

from deployer.gateway.routing import INSTANCES_KEY as GATEWAYS_KEY

log = logging.getLogger("deployer.analysis")

SNAPSHOT_KEY = "deployer:analysis:{deployment}"
GATEWAY_STALE_S = 10.0


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


def live_gateways(redis_client: Any, now: float | None = None) -> dict[str, dict[str, Any]]:
    now = time.time() if now is None else now
    found = {}
    for key, raw in redis_client.hgetall(GATEWAYS_KEY).items():
        info = json.loads(raw)
        if now - float(info.get("seen", 0)) <= GATEWAY_STALE_S:
            found[key.decode() if isinstance(key, bytes) else key] = info
    return found


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


FAIL_EVIDENCE = 3  # failed (or too slow) canary requests that suffice to fail a window below min_requests


def _slower_than(seconds: float, buckets: dict[float, float]) -> float:
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
    outcome: str  # "pass", "fail", "wait"
    reason: str
    figures: dict[str, Any]


def judge(win: dict[str, Figures], canary_version: str, canary_triton: str, stable_version: str | None,
          limits: Thresholds, window_s: float) -> Verdict:
    gw = win.get(f"gateway:{canary_version}", Figures())
    tr = win.get(f"triton:{canary_triton}", Figures())
    requests = max(gw.requests, tr.requests)
    gw_rate = gw.errors / gw.requests if gw.requests else 0.0
    tr_rate = tr.errors / tr.requests if tr.requests else 0.0
    error_rate = max(gw_rate, tr_rate)  # the same failure is seen by both: the larger rate, not the sum
    p99 = quantile(0.99, gw.buckets)
    errors = max(gw.errors, tr.errors)
    figures: dict[str, Any] = {
        "window_s": round(window_s, 1), "canary_requests": int(requests), "canary_errors": int(errors),
        "canary_error_rate": round(error_rate, 4), "canary_p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "max_p99_ms": limits.max_p99_ms, "max_error_rate": limits.max_error_rate,
    }
    if stable_version is not None:
        st = win.get(f"gateway:{stable_version}", Figures())
        sp99 = quantile(0.99, st.buckets)
        figures.update(stable_requests=int(st.requests),
                       stable_error_rate=round(st.errors / st.requests, 4) if st.requests else 0.0,
                       stable_p99_ms=None if sp99 is None else round(sp99 * 1000, 2))
    # Passing needs min_requests; failing needs only clear evidence: a slow or failing canary answers few
    # requests, so waiting for min_requests would keep it in traffic longest exactly when it is worst.
    slow = _slower_than(limits.max_p99_ms / 1000, gw.buckets)
    enough = requests >= limits.min_requests
    if error_rate > limits.max_error_rate and (enough or errors >= FAIL_EVIDENCE):
        return Verdict("fail", f"canary error rate {error_rate:.1%} over {int(requests)} requests exceeds "
                               f"{limits.max_error_rate:.1%}", figures)
    if p99 is not None and p99 * 1000 > limits.max_p99_ms and (enough or slow >= FAIL_EVIDENCE):
        return Verdict("fail", f"canary p99 latency {p99 * 1000:.1f} ms exceeds {limits.max_p99_ms:g} ms "
                               f"({int(slow)} of {int(gw.requests)} requests slower)", figures)
    if not enough:
        return Verdict("wait", f"{int(requests)} of {limits.min_requests} canary requests in the last "
                               f"{window_s:.0f}s", figures)
    return Verdict("pass", f"{int(requests)} canary requests, error rate {error_rate:.1%}, p99 "
                           f"{'n/a' if p99 is None else f'{p99 * 1000:.1f} ms'}", figures)


class SnapshotStore:
    """The snapshots of one deployment's analysis, oldest first, trimmed to the window."""

    def __init__(self, redis_client: Any, deployment_id: int) -> None:
        self.redis, self.key = redis_client, SNAPSHOT_KEY.format(deployment=deployment_id)

    def push_and_base(self, snap: Snapshot, window_s: float) -> Snapshot | None:
        """Store `snap`; return the oldest stored snapshot not older than the window (the base)."""
        raw = self.redis.get(self.key)
        kept = [Snapshot(s["t"], s["sources"]) for s in json.loads(raw)] if raw else []
        kept = [s for s in kept if snap.t - s.t <= window_s]
        base = kept[0] if kept else None
        kept.append(snap)
        self.redis.set(self.key, json.dumps([asdict(s) for s in kept]), ex=int(window_s * 4) + 60)
        return base

    def clear(self) -> None:
        self.redis.delete(self.key)
