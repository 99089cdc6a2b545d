"""Canary analysis: reading gateway and Triton metrics, windows between snapshots, and the verdict."""

from __future__ import annotations

import math

import pytest

from deployer.analysis import Figures, Snapshot, Thresholds, gateway_figures, judge, quantile, triton_figures, window

GATEWAY_METRICS = """\
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{model="m",version="1",le="0.005"} 90.0
gateway_request_duration_seconds_bucket{model="m",version="1",le="0.01"} 100.0
gateway_request_duration_seconds_bucket{model="m",version="1",le="+Inf"} 100.0
gateway_request_duration_seconds_count{model="m",version="1"} 100.0
gateway_request_duration_seconds_sum{model="m",version="1"} 0.4
gateway_request_duration_seconds_bucket{model="m",version="2",le="0.005"} 10.0
gateway_request_duration_seconds_bucket{model="m",version="2",le="0.01"} 10.0
gateway_request_duration_seconds_bucket{model="m",version="2",le="+Inf"} 40.0
gateway_request_duration_seconds_count{model="m",version="2"} 40.0
gateway_request_duration_seconds_sum{model="m",version="2"} 31.0
gateway_request_duration_seconds_bucket{model="other",version="2",le="+Inf"} 7.0
gateway_request_duration_seconds_count{model="other",version="2"} 7.0
# TYPE gateway_request_errors_total counter
gateway_request_errors_total{model="m",version="2",reason="upstream_5xx"} 4.0
"""

TRITON_METRICS = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="m_v2",version="1"} 30
nv_inference_request_success{model="m_v1",version="1"} 500
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="m_v2",version="1"} 10
"""

LIMITS = Thresholds(max_p99_ms=500, max_error_rate=0.05, min_requests=20)


def test_gateway_figures_are_read_per_version_of_the_model_only():
    figures = gateway_figures(GATEWAY_METRICS, "m")
    assert set(figures) == {"1", "2"}
    assert figures["2"].requests == 40 and figures["2"].errors == 4
    assert figures["1"].buckets[0.005] == 90 and figures["1"].buckets[math.inf] == 100


def test_triton_figures_count_successes_and_failures_of_the_named_models():
    figures = triton_figures(TRITON_METRICS, {"m_v2"})
    assert set(figures) == {"m_v2"}
    assert figures["m_v2"].requests == 40 and figures["m_v2"].errors == 10


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = {0.005: 90.0, 0.01: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.005 * 50 / 90)
    assert quantile(0.99, buckets) == pytest.approx(0.005 + 0.005 * 9 / 10)
    assert quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    # Beyond the largest finite bound, the bound is reported (Prometheus does the same).
    assert quantile(0.99, {0.01: 10.0, math.inf: 40.0}) == 0.01


def test_a_window_subtracts_the_older_snapshot_and_treats_a_restart_as_counting_from_zero():
    def snap(t: float, requests: float, errors: float) -> Snapshot:
        return Snapshot(t, {"gw": {"gateway:2": {"requests": requests, "errors": errors,
                                                 "buckets": {"0.01": requests, "inf": requests}}}})

    win = window(snap(10, 150, 5), snap(0, 100, 1))
    assert win["gateway:2"].requests == 50 and win["gateway:2"].errors == 4
    restarted = window(snap(10, 30, 0), snap(0, 100, 1))
    assert restarted["gateway:2"].requests == 30 and restarted["gateway:2"].errors == 0
    assert window(snap(10, 30, 2), None)["gateway:2"].requests == 30


def test_a_canary_with_enough_good_requests_passes():
    win = {"gateway:2": Figures(100, 0, {0.005: 100, math.inf: 100}), "gateway:1": Figures(900, 0, {math.inf: 900})}
    verdict = judge(win, "2", "m_v2", "1", LIMITS, 10)
    assert verdict.outcome == "pass"
    assert verdict.figures["canary_requests"] == 100 and verdict.figures["stable_requests"] == 900


def test_too_few_requests_wait_rather_than_pass():
    verdict = judge({"gateway:2": Figures(5, 0, {0.005: 5, math.inf: 5})}, "2", "m_v2", "1", LIMITS, 10)
    assert verdict.outcome == "wait" and "5 of 20" in verdict.reason


def test_an_error_rate_over_the_limit_fails_and_triton_failures_count_even_when_the_gateway_saw_none():
    verdict = judge({"gateway:2": Figures(40, 0, {0.005: 40, math.inf: 40}), "triton:m_v2": Figures(40, 10)},
                    "2", "m_v2", "1", LIMITS, 10)
    assert verdict.outcome == "fail" and "error rate 25.0%" in verdict.reason


def test_a_slow_canary_fails_on_clear_evidence_before_it_has_min_requests():
    slow = Figures(4, 0, {0.25: 0, 1.0: 1, 2.5: 4, math.inf: 4})
    verdict = judge({"gateway:2": slow}, "2", "m_v2", "1", LIMITS, 10)
    assert verdict.outcome == "fail" and "p99 latency" in verdict.reason
    # Two slow requests are not yet evidence enough.
    two = Figures(2, 0, {0.25: 0, 1.0: 0, 2.5: 2, math.inf: 2})
    assert judge({"gateway:2": two}, "2", "m_v2", "1", LIMITS, 10).outcome == "wait"
