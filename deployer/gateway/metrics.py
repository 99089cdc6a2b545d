"""Prometheus metrics of the gateway, per logical model and routed version.

The per-request figures (latency histogram, in-flight) are plain integers on an ArmStats object that each
routed arm holds (resolved when a routing table is applied): the event loop is the only writer, so the hot
path takes no lock and calls no library code; a collector turns them into Prometheus families at scrape
time. Rarer events (errors, retries, nodes taken out) use prometheus_client counters.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Sub-millisecond resolution: the gateway's own overhead is a fraction of a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


class ArmStats:
    __slots__ = ("buckets", "sum", "in_flight")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.in_flight = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class _ArmCollector:
    def __init__(self, stats: dict[tuple[str, str], ArmStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily("gateway_request_duration_seconds",
                                     "Inference request latency through the gateway, from the request's last byte "
                                     "read to the response's last byte relayed", labels=["model", "version"])
        gauge = GaugeMetricFamily("gateway_requests_in_flight", "Inference requests being served",
                                  labels=["model", "version"])
        bounds = [floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf)]
        for (model, version), s in sorted(self.stats.items()):
            total, cumulative = 0, []
            for bound, n in zip(bounds, s.buckets, strict=True):
                total += n
                cumulative.append((bound, total))
            hist.add_metric([model, version], cumulative, s.sum)
            gauge.add_metric([model, version], s.in_flight)
        yield hist
        yield gauge


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.arms: dict[tuple[str, str], ArmStats] = {}
        self.registry.register(_ArmCollector(self.arms))  # type: ignore[arg-type]
        self.errors = Counter("gateway_request_errors_total",
                              "Inference requests that failed, by reason: upstream_5xx (upstream status >= 500), "
                              "unavailable (no node reachable), upstream_lost (the upstream connection ended "
                              "mid-response), upstream_timeout (no complete response within the read timeout)",
                              ["model", "version", "reason"],
                              registry=self.registry)
        self.retries = Counter("gateway_upstream_retries_total",
                               "Requests sent again to another node after a connection failure",
                               ["model", "version"], registry=self.registry)
        self.node_down = Counter("gateway_node_marked_down_total", "Times a node was taken out after a failure",
                                 ["node"], registry=self.registry)
        self.samples_dropped = Counter("gateway_samples_dropped_total",
                                       "Sampled requests dropped because the sampling queue was full",
                                       registry=self.registry)
        self.routes_version = Gauge("gateway_routes_version", "Version of the routing table in use",
                                    registry=self.registry)

    def arm(self, model: str, version: str) -> ArmStats:
        """The figures of one model version; kept across routing tables."""
        stats = self.arms.get((model, version))
        if stats is None:
            stats = self.arms[(model, version)] = ArmStats()
        return stats

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
