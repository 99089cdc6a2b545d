"""Replay of recorded stable requests against candidates: a real Triton server with echo models (y = x * factor),
a real gateway recording every request into a stream of the test's own, and the shadow judgement on the pairs."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import time
import uuid

import pytest

from deployer.gateway.echo_model import write_echo_model
from deployer.gateway.routing import publish_routes
from deployer.shadow import ReplayArm, count_replayed, mirrored_pairs, recorded_requests, replay, replayed_so_far
from deployer.testing import gateway_process, wait_until
from monitoring.shadow import MIRRORED_LATENCY_FLOOR_MS, ShadowThresholds, judge_pairs

pytestmark = pytest.mark.timeout(180)

FACTORS = {"echo_v1": 1.0, "echo_same": 1.0, "echo_double": 2.0, "echo_negated": -1.0, "echo_faulty": 1.0}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    import tritonclient.http as triton_http

    from pipelines.triton_local import TritonServer

    base = tmp_path_factory.mktemp("shadow-triton")
    fault = base / "fault"
    fault.write_text("error")
    for name, factor in FACTORS.items():
        write_echo_model(base / "repo", name, factor, fault_file=fault if name == "echo_faulty" else None)
    server = TritonServer(base / "repo", base / "work")
    server.start()
    try:
        client = triton_http.InferenceServerClient(server.url)
        for name in FACTORS:
            client.load_model(name)
        client.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def recorded(triton, tmp_path_factory):
    """40 requests answered by stable (echo_v1, version 1) through a gateway sampling every request, and the
    samples read back as the deployer reads them. A Redis database of the module's own for the routes."""
    import redis

    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    stream = f"gateway:samples:test-shadow-{uuid.uuid4().hex[:8]}"
    node = triton.url.removeprefix("http://")
    publish_routes(client, {"echo": {"stable": {"version": "1", "triton_model": "echo_v1", "nodes": [node]},
                                     "canary": None}})
    rng = random.Random(7)
    try:
        with gateway_process(url, tmp_path_factory.mktemp("shadow-gw") / "gateway.log", "--sample-rate", "1",
                             "--sample-stream", stream, "--routes-poll-s", "0.2") as (port, _proc):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

            def infer(values: list[float]) -> int:
                body = json.dumps({"inputs": [{"name": "x", "shape": [len(values)], "datatype": "FP32",
                                               "data": values}]})
                conn.request("POST", "/v2/models/echo/infer", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                return resp.status

            wait_until(lambda: infer([1.0]) == 200, 30, "the gateway routing echo")
            for _ in range(40):  # positive values, the largest anywhere: argmax varies, scaling keeps it
                assert infer([round(rng.uniform(0.1, 1.0), 3) for _ in range(4)]) == 200
            conn.close()
            wait_until(lambda: client.xlen(stream) >= 41, 10, "the samples in the stream")
        # the newest 40: these requests, not the probes before them (one value each)
        found = recorded_requests(client, "echo", "1", limit=40, stream=stream)
        assert recorded_requests(client, "echo", "2", limit=100, stream=stream) == []
        yield client, node, found
    finally:
        client.delete(stream)
        client.close()


def test_recorded_stable_requests_are_read_back_with_their_bodies(recorded):
    _client, _node, found = recorded
    assert len(found) == 40
    docs = [json.loads(r.body) for r in found]
    assert all(d["inputs"][0]["name"] == "x" and len(d["inputs"][0]["data"]) == 4 for d in docs)
    assert found[0].headers.get("Content-Type", found[0].headers.get("content-type")) == "application/json"


@pytest.mark.parametrize(("candidate", "outcome", "why"), [
    ("echo_same", "pass", "answers as stable's"),
    ("echo_double", "fail", "agreement 0.0%"),
    ("echo_negated", "fail", "labels differ in 40"),
    ("echo_faulty", "fail", "candidate failed 40 requests stable answered"),
])
def test_a_replayed_candidate_is_judged_on_its_answers_against_stables(recorded, candidate, outcome, why):
    _client, node, found = recorded
    began = time.monotonic()
    pairs = replay(found, ReplayArm("echo_v1", [node]), ReplayArm(candidate, [node]), rate_per_s=200, budget_s=20)
    took = time.monotonic() - began
    assert len(pairs) == 40
    assert took >= 39 / 200  # the rate bound holds
    assert all(p.stable_status == 200 for p in pairs)
    verdict = judge_pairs(pairs, ShadowThresholds(min_requests=20), "replayed")
    assert verdict.outcome == outcome, verdict.reason
    assert why in verdict.reason
    assert verdict.figures["shadow_requests"] == 40
    if candidate == "echo_double":
        assert verdict.figures["label_agreement"] == 1.0  # scaling keeps the argmax; the values are 0.1-1.0 off
        assert 0.5 < verdict.figures["max_prob_diff"] <= 1.0


def test_replay_stops_at_its_time_budget_and_counts_what_it_sent(recorded):
    client, node, found = recorded
    client.delete("deployer:replayed")
    pairs = replay(found, ReplayArm("echo_v1", [node]), ReplayArm("echo_faulty", [node]), rate_per_s=20,
                   budget_s=0.5)
    assert 9 <= len(pairs) <= 11  # 20 a second for half a second
    count_replayed(client, pairs, ReplayArm("echo_v1", [node]), ReplayArm("echo_faulty", [node]))
    assert replayed_so_far(client, "echo_faulty") == (len(pairs), len(pairs))
    assert replayed_so_far(client, "echo_v1") == (len(pairs), 0)
    client.delete("deployer:replayed")


def _metric(text: str, name: str, version: str) -> float:
    found = re.findall(rf'{name}{{model="echo",version="{version}"}} (\S+)', text)
    return sum(float(n) for n in found)


@pytest.mark.parametrize(("shadow", "outcome"), [("echo_same", "pass"), ("echo_double", "fail"),
                                                 ("echo_faulty", "fail")])
def test_the_gateway_mirrors_a_share_of_stables_requests_off_the_clients_path(triton, tmp_path, shadow, outcome):
    """Half of stable's requests are copied to the shadow arm after the client has stable's answer; the client
    never sees the shadow's answer (nor its failures), its latency is counted apart from the served requests,
    and each copy comes back as a sample with both answers, which monitoring/shadow.py judges."""
    import redis

    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    stream = f"gateway:samples:test-mirror-{uuid.uuid4().hex[:8]}"
    node = triton.url.removeprefix("http://")
    publish_routes(client, {"echo": {"stable": {"version": "1", "triton_model": "echo_v1", "nodes": [node]},
                                     "canary": None,
                                     "shadow": {"version": "2", "triton_model": shadow, "nodes": [node], "share": 50}}})
    rng = random.Random(5)
    try:
        with gateway_process(url, tmp_path / "gateway.log", "--sample-rate", "0", "--sample-stream", stream,
                             "--routes-poll-s", "0.2") as (port, _proc):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

            def infer(values: list[float]) -> tuple[int, str | None, list[float]]:
                body = json.dumps({"inputs": [{"name": "x", "shape": [len(values)], "datatype": "FP32",
                                               "data": values}]})
                conn.request("POST", "/v2/models/echo/infer", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheader("x-model-version"), json.loads(data)["outputs"][0]["data"]

            def metrics() -> str:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                return resp.read().decode()

            wait_until(lambda: "gateway_shadow_dropped_total" in metrics(), 30, "the table with a shadow arm")
            served_before = _metric(metrics(), "gateway_request_duration_seconds_count", "1")
            shadow_before = _metric(metrics(), "gateway_shadow_request_duration_seconds_count", "2")
            answers = []
            for _ in range(40):
                values = [round(rng.uniform(0.1, 1.0), 3) for _ in range(4)]
                status, version, data = infer(values)
                answers.append((status, version, data == pytest.approx(values)))
            assert answers == [(200, "1", True)] * 40  # only ever stable's answer, whatever the shadow does
            wait_until(lambda: _metric(metrics(), "gateway_shadow_request_duration_seconds_count", "2")
                       >= shadow_before + 20, 10, "20 mirrored requests answered")
            text = metrics()
            assert _metric(text, "gateway_shadow_request_duration_seconds_count", "2") == shadow_before + 20
            assert _metric(text, "gateway_request_duration_seconds_count", "1") == served_before + 40
            assert _metric(text, "gateway_request_duration_seconds_count", "2") == 0  # never counted as served
            conn.close()
            wait_until(lambda: len(mirrored_pairs(client, "echo", "2", 100, stream=stream)) >= 20, 10,
                       "the mirrored samples")
        pairs = mirrored_pairs(client, "echo", "2", 100, stream=stream)
        assert len(pairs) >= 20
        limits = ShadowThresholds(min_requests=20, latency_floor_ms=MIRRORED_LATENCY_FLOOR_MS)
        verdict = judge_pairs(pairs[:20], limits, "mirrored")
        assert verdict.outcome == outcome, verdict.reason
        assert "20 mirrored requests sent to both" in verdict.reason
        if shadow == "echo_faulty":
            assert all(p.stable_status == 200 and p.candidate_status >= 400 for p in pairs)
        if shadow == "echo_double":
            assert verdict.figures["label_agreement"] == 1.0 and verdict.figures["agreement"] == 0.0
    finally:
        client.delete(stream)
        client.close()
