"""SLOs of the serving versions and their burn-rate alerts, after the SRE workbook's multi-window,
multi-burn-rate alerting: an objective leaves a budget of bad requests (1 - target); the burn rate of a
window is its share of bad requests divided by that budget (1: the budget lasts exactly the SLO period).
A version pages when both windows of a pair burn at least the pair's rate: 1 h and 5 min at 14.4x (2% of a
30-day budget in an hour), or 6 h and 30 min at 6x (5% in six hours). The long window says it matters,
the short one that it is still happening, so the alert also stops soon after the problem does.

Figures come from the gateways' /metrics (the latency histograms and error counters the canary analysis
reads), sampled every PLATFORM_SLO_SAMPLE_S per version and gateway into SloSample; an increase over a
window adds the rises between consecutive samples, so a gateway that restarted (its counters back at
zero) is counted from zero, as Prometheus' increase() does. With PROMETHEUS_URL set the same increases
come from PromQL against that Prometheus instead, one query per version evaluated at the tick's time
(platform/prometheus/ holds the matching rules); tests/test_prometheus_live.py checks both give the same
counts for the same gateway traffic."""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from monitoring import alerts, canary
from monitoring.models import AlertKind, MonitorPolicy, SloSample
from monitoring.selectors import policies_for
from registry.models import ModelVersion

log = logging.getLogger("monitoring.slo")

# (long window, short window, burn rate): the SRE workbook's two paging pairs.
PAIRS = ((timedelta(hours=1), timedelta(minutes=5), 14.4), (timedelta(hours=6), timedelta(minutes=30), 6.0))
KEEP = timedelta(hours=6, minutes=10)


@dataclass(frozen=True)
class Counts:
    requests: float = 0.0
    errors: float = 0.0
    slow: float = 0.0


def increase(samples: list[SloSample], since: datetime) -> Counts:
    """Requests, errors and slow requests added since `since`, from one source's samples (oldest first):
    the rises between consecutive samples, a fall counted as a restart from zero."""
    total = {"requests": 0.0, "errors": 0.0, "slow": 0.0}
    before: SloSample | None = None
    for s in samples:
        if before is not None and s.at > since:
            for name in total:
                now, then = getattr(s, name), getattr(before, name)
                total[name] += now - then if now >= then else now
        before = s
    return Counts(**total)


def _add(a: Counts, b: Counts) -> Counts:
    return Counts(a.requests + b.requests, a.errors + b.errors, a.slow + b.slow)


def burn(counts: Counts, bad: str, budget: float) -> float:
    """The window's burn rate: its share of bad requests over the budget (0 without requests)."""
    if counts.requests <= 0 or budget <= 0:
        return 0.0
    return (getattr(counts, bad) / counts.requests) / budget


def window_counts(version: ModelVersion, window: timedelta, now: datetime) -> Counts:
    """Every gateway's increase over the window (each source's samples taken apart)."""
    samples = list(SloSample.objects.filter(version=version, at__gte=now - window - timedelta(minutes=2))
                   .order_by("source", "at"))
    out = Counts()
    by_source: dict[str, list[SloSample]] = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s)
    for series in by_source.values():
        out = _add(out, increase(series, now - window))
    return out


class PrometheusError(RuntimeError):
    """PROMETHEUS_URL did not answer the query, or answered with an error."""


# The gateway's latency bucket bounds, as its `le` labels spell them (deployer/gateway/dataplane/src/metrics.rs):
# the objective is counted against the largest bound not above it, as canary.slower_than counts it.
LE = ("0.0005", "0.001", "0.002", "0.003", "0.005", "0.0075", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
      "2.5", "5.0", "10.0")
PROMQL_TIMEOUT_S = 10.0


def _bucket_at_or_below(seconds: float) -> str:
    return max((le for le in LE if float(le) <= seconds), key=float, default=LE[0])


def _le_matcher(le: str) -> str:
    """A regex matching the bound however the Prometheus stored it: the gateway writes "1.0", Prometheus 3
    normalises classic histograms' `le` on ingestion, and other versions keep the text as scraped."""
    spellings = {le, repr(float(le)), f"{float(le):g}"}
    return "|".join(re.escape(s) for s in sorted(spellings))


def _quote(value: str) -> str:
    return json.dumps(value)  # a PromQL double-quoted string takes JSON's escapes


def _counted(selector: str, window: str) -> str:
    """PromQL for what a counter selector's series added over the window, summed. increase() alone misses
    everything a series counted before its first sample in the window, which for a series that appears inside
    the window (a version just routed, an error reason's first error, a gateway just started) is all it
    counted up to its first scrape: such series are counted from zero (their largest value) instead, as the
    SloSample path counts them. Series that existed at the window's start get increase() (resets handled,
    values extrapolated to the window's edges by up to a scrape interval, as Prometheus does)."""
    return (f"((sum(increase({selector}[{window}]) and {selector} offset {window}) or vector(0)) + "
            f"(sum(max_over_time({selector}[{window}]) unless {selector} offset {window}) or vector(0)))")


def promql_counts_query(version: ModelVersion, policy: MonitorPolicy, windows: list[timedelta]) -> str:
    """One PromQL query for the requests, errors and slow requests of the version over every window, each a
    series labelled figure="<window>:<name>" (one evaluation time for them all)."""
    labels = f"model={_quote(version.model.name)},version={_quote(str(version.version))}"
    le = _le_matcher(_bucket_at_or_below(policy.slo_latency_ms / 1000))
    parts = []
    for window in windows:
        w = f"{int(window.total_seconds() * 1000)}ms"
        requests = _counted(f"gateway_request_duration_seconds_count{{{labels}}}", w)
        within = _counted(f"gateway_request_duration_seconds_bucket{{{labels},le=~{_quote(le)}}}", w)
        figures = {
            "requests": requests,
            "errors": _counted(f"gateway_request_errors_total{{{labels}}}", w),
            "slow": f"({requests} - {within})",
        }
        parts += [f'label_replace({expr}, "figure", "{int(window.total_seconds() * 1000)}:{name}", "", "")'
                  for name, expr in figures.items()]
    return " or ".join(parts)


def prometheus_counts(version: ModelVersion, policy: MonitorPolicy, windows: list[timedelta],
                      at: datetime) -> dict[timedelta, Counts]:
    """The same increases from PromQL (PROMETHEUS_URL), evaluated at `at`: the gateways' series of this model
    and version, summed over gateways."""
    result = _promql(promql_counts_query(version, policy, windows), at)
    values: dict[str, float] = {}
    for series in result:
        value = float(series["value"][1])
        values[series["metric"].get("figure", "")] = value if math.isfinite(value) else 0.0
    out = {}
    for window in windows:
        ms = int(window.total_seconds() * 1000)
        out[window] = Counts(**{name: max(0.0, values.get(f"{ms}:{name}", 0.0))
                                for name in ("requests", "errors", "slow")})
    return out


def _promql(query: str, at: datetime) -> list[dict[str, Any]]:
    """An instant query at `at`; its result vector. Bounded: Prometheus stops the query after
    PROMQL_TIMEOUT_S, and this waits at most that and 5 s more for any one read of its answer."""
    url = f"{str(settings.PLATFORM['PROMETHEUS_URL']).rstrip('/')}/api/v1/query"
    body = urllib.parse.urlencode({"query": query, "time": f"{at.timestamp():.3f}",
                                   "timeout": f"{PROMQL_TIMEOUT_S:g}s"}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=PROMQL_TIMEOUT_S + 5) as resp:  # noqa: S310 - the operator's
            data = json.loads(resp.read(4 << 20))
    except urllib.error.HTTPError as exc:  # Prometheus answers 400/422/503 with its JSON error
        try:
            data = json.loads(exc.read(64 << 10))
        except ValueError:
            raise PrometheusError(f"Prometheus answered HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"Prometheus at {url} did not answer: {exc}") from exc
    if data.get("status") != "success":
        raise PrometheusError(f"Prometheus answered {data.get('status')}: {data.get('error', '')}")
    if data["data"].get("resultType") != "vector":
        raise PrometheusError(f"Prometheus answered a {data['data'].get('resultType')}, not a vector")
    return list(data["data"]["result"])


@dataclass(frozen=True)
class Burn:
    kind: str  # AlertKind.LATENCY or AlertKind.ERRORS
    rates: dict[str, float]  # window label -> burn rate
    firing_pair: str | None  # "1h/5m at 14.4x" when a pair fires
    counts: dict[str, dict[str, float]]


def _label(window: timedelta) -> str:
    minutes = int(window.total_seconds() // 60)
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


def evaluate(version: ModelVersion, policy: MonitorPolicy, now: datetime) -> list[Burn]:
    """Both objectives' burn rates over the four windows, and which pair fires."""
    windows = sorted({w for pair in PAIRS for w in pair[:2]})
    if settings.PLATFORM["PROMETHEUS_URL"]:
        counts = prometheus_counts(version, policy, windows, now)
    else:
        counts = {w: window_counts(version, w, now) for w in windows}
    out = []
    for kind, bad, budget in ((AlertKind.LATENCY, "slow", 1 - policy.slo_latency_target),
                              (AlertKind.ERRORS, "errors", 1 - policy.slo_availability)):
        rates = {_label(w): round(burn(counts[w], bad, budget), 3) for w in sorted(windows)}
        firing = next((f"{_label(long)}/{_label(short)} at {rate:g}x" for long, short, rate in PAIRS
                       if rates[_label(long)] >= rate and rates[_label(short)] >= rate), None)
        out.append(Burn(kind, rates, firing, {_label(w): {"requests": c.requests, "errors": c.errors,
                                                          "slow": c.slow} for w, c in counts.items()}))
    return out


def _words(version: ModelVersion, policy: MonitorPolicy, b: Burn) -> tuple[str, str]:
    label = f"{version.model.name} v{version.version}"
    if b.kind == AlertKind.LATENCY:
        objective = f"{policy.slo_latency_target:.2%} of requests within {policy.slo_latency_ms:g} ms"
        title = f"{label}: latency SLO burning ({b.firing_pair})"
    else:
        objective = f"{policy.slo_availability:.3%} of requests without an error"
        title = f"{label}: error budget burning ({b.firing_pair})"
    rates = ", ".join(f"{w} {r:g}x" for w, r in b.rates.items())
    long_w = b.firing_pair.split("/")[0] if b.firing_pair else "1h"
    c = b.counts[long_w]
    bad = c["slow"] if b.kind == AlertKind.LATENCY else c["errors"]
    summary = (f"objective {objective}; burn rates {rates}; in the last {long_w}: {bad:.0f} of "
               f"{c['requests']:.0f} requests {'slower' if b.kind == AlertKind.LATENCY else 'failed'}")
    return title, summary


def record(version: ModelVersion, policy: MonitorPolicy, figures_by_source: dict[str, canary.Figures],
           now: datetime) -> None:
    SloSample.objects.bulk_create(SloSample(
        version=version, source=source, at=now, requests=f.requests, errors=f.errors,
        slow=canary.slower_than(policy.slo_latency_ms / 1000, f.buckets), latency_ms=policy.slo_latency_ms)
        for source, f in figures_by_source.items())


def check(version: ModelVersion, policy: MonitorPolicy, now: datetime | None = None) -> list[Burn]:
    """Raise, refresh or clear the version's SLO alerts from its burn rates."""
    now = now or timezone.now()
    burns = evaluate(version, policy, now)
    for b in burns:
        if b.firing_pair:
            title, summary = _words(version, policy, b)
            alerts.alert_seen(version, b.kind, title, summary, {"burn_rates": b.rates, "pair": b.firing_pair,
                                                                "windows": b.counts})
        else:
            alerts.alert_clear(version, b.kind)
    return burns


def slo_tick(gateways: list[str], versions: list[ModelVersion], now: datetime | None = None) -> int:
    """Sample every serving version at every gateway, judge its burn rates, forget old samples."""
    now = now or timezone.now()
    policies = policies_for(list({v.model_id for v in versions}))
    for version in versions:
        policy = policies[version.model_id]
        by_source: dict[str, canary.Figures] = {}
        if not settings.PLATFORM["PROMETHEUS_URL"]:
            for url in gateways:
                snap = canary.scrape(version.model.name, set(), [url], [])
                data = snap.sources.get(url, {}).get(f"gateway:{version.version}")
                if data is not None:
                    by_source[url] = canary.Figures(data["requests"], data["errors"],
                                                    {float(k): v for k, v in data["buckets"].items()})
            record(version, policy, by_source, now)
        try:
            check(version, policy, now)
        except PrometheusError as exc:  # judged at the next tick; the other versions are judged now
            log.warning("SLO of %s v%s not judged: %s", version.model.name, version.version, exc)
    SloSample.objects.filter(at__lt=now - KEEP).delete()
    return len(versions)

