"""Prometheus metrics of the gateway, per logical model and routed version. Children are resolved once
per arm when a routing table is applied, so the hot path only calls observe/inc/dec."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Sub-millisecond resolution: the gateway's own overhead is a fraction of a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram("gateway_request_duration_seconds",
                                 "Inference request latency through the gateway, from the request's last byte "
                                 "to the response's first byte written", ["model", "version"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("gateway_request_errors_total",
                              "Inference requests that failed: upstream status >= 500, no node reachable, or the "
                              "upstream connection lost mid-response", ["model", "version", "reason"],
                              registry=self.registry)
        self.in_flight = Gauge("gateway_requests_in_flight", "Inference requests being served",
                               ["model", "version"], registry=self.registry)
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

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
