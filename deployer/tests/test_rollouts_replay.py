"""Low-traffic canaries and shadow rollouts on the real local fleet behind the real gateway. A canary step whose
time is up without enough client requests to judge replays recorded stable requests against the canary, and is
decided on them on time (promoted when good, rolled back when faulty); the replayed requests are never counted as
served. A shadow rollout sends the candidate no client request: the gateway mirrors stable's, and the candidate
is judged on its answers to them."""

from __future__ import annotations

import json
import random
import re
import urllib.request
from typing import Any

import pytest
from django.utils import timezone

from deployer import services
from deployer.models import AnalysisPoint, RolloutMode, RolloutStatus
from deployer.shadow import REPLAYED_KEY
from deployer.testing import Load, wait_until
from deployer.tests.test_rollouts import FAST, _first_deployment, _reconcile_until, _routed
from monitoring.samples import SAMPLES_STREAM
from registry.audit import SYSTEM
from registry.models import AuditEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

STEP_S, BAKE_S, SETTLE_S, TICK_BOUND_S = 3, 1, 4.0, 10.0


@pytest.fixture(autouse=True)
def quick_settings(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_WINDOW_S", 5.0)
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_DRAIN_S", 0.5)
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_SETTLE_S", SETTLE_S)
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_REPLAY_RATE", 100.0)


def _record_stable_requests(redis_client: Any, model: str, n: int) -> None:
    """Samples of version 1's traffic as the gateway writes them (its recording, bodies included, is tested
    in test_shadow.py; this module's gateway samples nothing, so no client request is needed)."""
    rng = random.Random(11)
    triton_model = f"{model}_v1_cpu-fp32-onnxruntime"
    for _ in range(n):
        values = [round(rng.uniform(0.1, 1.0), 3) for _ in range(4)]
        body = json.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": values}]}).encode()
        response = json.dumps({"model_name": triton_model, "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [4], "data": values}]}).encode()
        redis_client.xadd(SAMPLES_STREAM, {
            "model": model, "version": "1", "triton_model": triton_model, "status": "200", "latency_ms": "0.500",
            "ts": "0", "request": body, "response": response, "response_head": b"HTTP/1.1 200 OK\r\n",
            "request_head": f"POST /v2/models/{triton_model}/infer HTTP/1.1\r\nHost: gw\r\n"
                            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()})


def _served_by_gateway(port: int, model: str, version: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(rf'gateway_request_duration_seconds_count{{model="{model}",version="{version}"}} (\S+)', text)
    return sum(float(n) for n in found)


@pytest.mark.parametrize("fault", [None, "error"])
def test_a_canary_without_client_traffic_is_decided_on_time_by_replaying_recorded_stable_requests(
        local_fleet, gateway, redis_client, serving_version, model_archive, unique_name, tmp_path, fault):
    redis_client.delete(REPLAYED_KEY)
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    _record_stable_requests(redis_client, unique_name, 40)
    fault_file = tmp_path / "fault"
    v2 = serving_version(unique_name, model_archive, 1.0, fault_file=fault_file)  # answers as v1 does
    d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[50],
                                   **{**FAST, "min_requests": 20, "step_interval_s": STEP_S, "bake_s": BAKE_S})
    d = _reconcile_until(d, {RolloutStatus.PROGRESSING})
    if fault:
        fault_file.write_text(fault)  # after the warm-up, which a failing model would never pass
    started = d.step_started_at
    d = _reconcile_until(d, {RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK, RolloutStatus.PAUSED}, timeout=60)
    decided_after = ((d.finished_at or timezone.now()) - started).total_seconds()
    # Without replay the step would be extended for lack of requests, then paused (ROLLOUT_EXTEND_MAX_S).
    assert decided_after <= max(STEP_S + BAKE_S, SETTLE_S) + TICK_BOUND_S, (decided_after, d.reason)
    if fault:
        assert d.status == RolloutStatus.ROLLED_BACK, d.reason
        assert re.match(r"automatic rollback: 30 recorded stable requests replayed against the canary, 0 served "
                        r"by it in the window: candidate failed 30 requests stable answered", d.reason), d.reason
    else:
        assert d.status == RolloutStatus.PROMOTED, d.reason
        assert re.match(r"all steps passed: 30 recorded stable requests replayed against the canary, 0 served by "
                        r"it in the window: answers as stable's", d.reason), d.reason
        assert d.analysis["replay"]["agreement"] == 1.0
    assert d.analysis["replayed"] == 30  # min_requests and a margin, at 100 a second well within the budget
    print(f"decided {decided_after:.1f}s after the step began: {d.reason}")
    # Replayed, never served: the gateway answered no request with version 2, and the analysis counted none.
    assert _served_by_gateway(gateway["port"], unique_name, "2") == 0
    assert list(AnalysisPoint.objects.filter(deployment=d).values_list("canary_requests", flat=True)) \
        and not AnalysisPoint.objects.filter(deployment=d, canary_requests__gt=0).exists()
    redis_client.delete(REPLAYED_KEY, SAMPLES_STREAM)


def test_requests_replayed_against_a_canary_are_never_judged_as_served_in_later_windows(
        local_fleet, gateway, redis_client, serving_version, model_archive, unique_name):
    # Too few recorded requests to pass (10 of 20): the replay leaves the step inconclusive and it goes on, while
    # Triton has counted the 10 replayed requests to the canary's model; the windows after it must not.
    redis_client.delete(REPLAYED_KEY)
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    _record_stable_requests(redis_client, unique_name, 10)
    v2 = serving_version(unique_name, model_archive, 1.0)
    d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[50],
                                   **{**FAST, "min_requests": 20, "step_interval_s": STEP_S, "bake_s": BAKE_S})
    d = _reconcile_until(d, {RolloutStatus.PROGRESSING})

    def replayed() -> bool:
        d.refresh_from_db()
        return d.analysis.get("replayed") == 10

    wait_until(replayed, 60, "a replay of the 10 recorded requests", every=services.rollouts_reconcile, interval=0.3)
    assert d.analysis["outcome"] == "inconclusive" and "10 of 20 replayed requests compared" in d.reason, d.reason
    replayed_at = timezone.now()
    wait_until(lambda: AnalysisPoint.objects.filter(deployment=d, at__gt=replayed_at).count() >= 8, 30,
               "windows after the replay", every=services.rollouts_reconcile, interval=0.3)
    d.refresh_from_db()
    assert d.status == RolloutStatus.PROGRESSING, d.reason
    assert set(AnalysisPoint.objects.filter(deployment=d).values_list("canary_requests", flat=True)) == {0}
    services.deployment_abort(SYSTEM, d)
    redis_client.delete(REPLAYED_KEY, SAMPLES_STREAM)


@pytest.mark.parametrize(("factor", "outcome"), [(1.0, RolloutStatus.PROMOTED), (-1.0, RolloutStatus.ROLLED_BACK)])
def test_a_shadow_rollout_is_judged_on_mirrored_requests_while_every_client_gets_stables_answer(
        local_fleet, gateway, redis_client, serving_version, model_archive, unique_name, factor, outcome):
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    v2 = serving_version(unique_name, model_archive, factor)
    routes_seen = set()

    def watch() -> None:
        services.rollouts_reconcile()
        route = _routed(redis_client, unique_name)
        if route is not None and route.stable.version == "1":
            routes_seen.add((route.canary is not None, route.shadow.version if route.shadow else None,
                             route.shadow_share))

    with Load(gateway["port"], unique_name) as load:
        d = services.deployment_create(SYSTEM, v2.model, v2.version, mode=RolloutMode.SHADOW, shadow_share=50,
                                       **{**FAST, "min_requests": 20, "step_interval_s": STEP_S, "bake_s": BAKE_S})
        assert d.steps == [0]

        def decided() -> bool:
            d.refresh_from_db()
            return d.status in {RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK, RolloutStatus.PAUSED}

        wait_until(decided, 90, "the shadow rollout decided", every=watch, interval=0.3)
        seen_at_decision = load.by_version()
    assert d.status == outcome, d.reason
    assert routes_seen >= {(False, "2", 50)} and all(not canary for canary, _, _ in routes_seen), routes_seen
    if outcome == RolloutStatus.ROLLED_BACK:
        assert re.match(r"automatic rollback: candidate answers differ from stable's", d.reason), d.reason
        # no client ever got the candidate's answer: every answer is version 1's, x * 1
        assert set(seen_at_decision) == {"1"}
        assert {f for (_, _, f) in load.outcomes} == {1.0}
    else:
        assert re.match(r"all steps passed: answers as stable's .* \d+ mirrored requests sent to both", d.reason), \
            d.reason
    assert load.failures == [], load.failures[:5]
    assert d.analysis["shadow_requests"] >= 20 and d.analysis["shadow_source"] == "mirrored"
    actions = list(AuditEvent.objects.filter(target_type="deployment", target_id=str(d.pk))
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["deployment.create", "deployment.progressing",
                       "deployment.promoted" if outcome == RolloutStatus.PROMOTED else "deployment.rolled_back"]
