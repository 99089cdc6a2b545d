"""Monitoring's reads: a model's policy (with the defaults for a model that has no row), and a version's
SLO and drift figures over time for charts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from monitoring.models import DriftCheck, DriftOutcome, MonitorPolicy, SloSample
from registry.models import ModelVersion

DEFAULT_POLICY = MonitorPolicy()


def policy_for(model_id: int) -> MonitorPolicy:
    return MonitorPolicy.objects.filter(model_id=model_id).first() or DEFAULT_POLICY


def policies_for(model_ids: list[int]) -> dict[int, MonitorPolicy]:
    """Each model's policy in one query (DEFAULT_POLICY for those without a row)."""
    found = {p.model_id: p for p in MonitorPolicy.objects.filter(model_id__in=model_ids)}
    return {m: found.get(m, DEFAULT_POLICY) for m in model_ids}


def slo_series(version: ModelVersion, since: datetime, step_s: float) -> list[dict[str, float | None]]:
    """The version's SLO figures per `step_s` bucket since `since`, summed over gateways, for charts: requests,
    their error rate and the share slower than the latency objective. Counters that went down (a gateway
    restarted) count from zero."""
    rows = (SloSample.objects.filter(version=version, at__gte=since).order_by("source", "at")
            .values_list("source", "at", "requests", "errors", "slow"))
    before: dict[str, tuple[float, float, float]] = {}
    buckets: dict[float, list[float]] = {}
    for source, at, requests, errors, slow in rows.iterator():
        now = (requests, errors, slow)
        last = before.get(source)
        before[source] = now
        if last is None:
            continue
        delta = [n - b for n, b in zip(now, last, strict=True)]
        if any(d < 0 for d in delta):
            delta = list(now)
        acc = buckets.setdefault(at.timestamp() // step_s * step_s, [0.0, 0.0, 0.0])
        for i, d in enumerate(delta):
            acc[i] += d
    return [{"at": t, "requests": r, "error_rate": e / r if r else None, "slow_share": s / r if r else None}
            for t, (r, e, s) in sorted(buckets.items())]


def drift_series(version: ModelVersion, since: datetime) -> list[dict[str, Any]]:
    """The version's drift checks with a verdict since `since`, oldest first: when, drifted share, outcome."""
    return [{"at": at.timestamp(), "drifted_share": share, "outcome": outcome} for at, share, outcome in
            DriftCheck.objects.filter(version=version, created_at__gte=since,
                                      outcome__in=[DriftOutcome.DRIFT, DriftOutcome.NO_DRIFT])
            .order_by("created_at").values_list("created_at", "drifted_share", "outcome")]
