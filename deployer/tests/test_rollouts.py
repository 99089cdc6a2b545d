"""Rollouts end to end on the real local fleet (two supervised Triton servers) behind the real gateway, under
constant client load: first deployment, canary steps and promotion, automatic rollback, a Triton node
killed mid-canary, and a reconciler pass that finishes what a killed worker left."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from deployer import services
from deployer.fleet_local import read_nodes
from deployer.gateway.routing import load_routes
from deployer.models import Deployment, Endpoint, RolloutStatus
from deployer.testing import Load, wait_until
from registry import mlflow_store
from registry.audit import SYSTEM
from registry.models import AuditEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

FAST = {"step_interval_s": 1, "bake_s": 1, "min_requests": 5, "max_p99_ms": 1000.0, "max_error_rate": 0.05}


@pytest.fixture(autouse=True)
def quick_settings(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_WINDOW_S", 5.0)
    monkeypatch.setitem(settings.PLATFORM, "ROLLOUT_DRAIN_S", 0.5)


@pytest.fixture
def served(local_fleet: dict[str, Any], gateway: dict[str, Any], redis_client: Any) -> dict[str, Any]:
    return {"fleet": local_fleet, "gateway": gateway, "redis": redis_client}


def _reconcile_until(deployment: Deployment, states: set[str], timeout: float = 120) -> Deployment:
    def done() -> Deployment | None:
        deployment.refresh_from_db()
        return deployment if deployment.status in states else None

    return wait_until(done, timeout, f"deployment {deployment.pk} to reach {states}", every=services.rollouts_reconcile,
                      interval=0.3)


def _routed(redis_client: Any, model: str) -> Any:
    _, table = load_routes(redis_client)
    return None if table is None else table.get(model)


def _wait_unloaded(model: str, version: int, proc: Any = None) -> None:
    """Until the fleet no longer holds the version's Triton model; reconciler passes run in this process
    unless a worker process (`proc`) does them."""
    name = f"{model}_v{version}_cpu-fp32-onnxruntime"
    wait_until(lambda: name not in services.fleet().placed(), 60, f"{name} unloaded", proc,
               every=None if proc is not None else services.rollouts_reconcile, interval=0.3)


def _first_deployment(model: str, archive: Path, serving_version: Any, redis_client: Any) -> Any:
    v1 = serving_version(model, archive, 1.0)
    d = services.deployment_create(SYSTEM, v1.model, v1.version, **FAST)
    _reconcile_until(d, {RolloutStatus.PROMOTED})
    wait_until(lambda: _routed(redis_client, model) is not None, 30, "a route", every=services.rollouts_reconcile)
    return v1


def _promoted_or_fail(d: Deployment) -> bool:
    """Whether it was promoted; a rollback fails the test at once, with the verdict's words."""
    d.refresh_from_db()
    if d.status == RolloutStatus.ROLLED_BACK:
        pytest.fail(f"the good canary was rolled back: {d.reason}")
    return bool(d.status == RolloutStatus.PROMOTED)


def test_a_first_deployment_loads_on_every_node_routes_all_traffic_and_sets_the_champion_alias(
        served, serving_version, model_archive, unique_name):
    redis_client = served["redis"]
    v1 = _first_deployment(unique_name, model_archive, serving_version, redis_client)
    route = _routed(redis_client, unique_name)
    assert route.stable.version == "1" and route.canary is None
    assert sorted(route.stable.nodes) == sorted(n.http for n in read_nodes(redis_client))
    assert mlflow_store.alias_version(unique_name, "champion") == 1
    endpoint = Endpoint.objects.get(model=v1.model)
    assert endpoint.stable_version == v1
    with Load(served["gateway"]["port"], unique_name) as load:
        wait_until(lambda: load.total() >= 20, 30, "20 answers")
    assert load.failures == []
    assert load.by_version() == {"1": load.total()}


def test_a_canary_steps_through_its_weights_and_is_promoted_under_load_without_a_failed_request(
        served, serving_version, model_archive, unique_name):
    redis_client = served["redis"]
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    v2 = serving_version(unique_name, model_archive, 2.0)
    with Load(served["gateway"]["port"], unique_name) as load:
        d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[20, 50], **FAST)
        weights_seen = set()

        def watch() -> None:
            services.rollouts_reconcile()
            route = _routed(redis_client, unique_name)
            if route is not None and route.canary is not None:
                weights_seen.add(route.canary_weight)

        wait_until(lambda: _promoted_or_fail(d), 120, "promotion", every=watch, interval=0.3)
        # After the promotion the old version leaves the routes, then the fleet, once the gateway applied it.
        _wait_unloaded(unique_name, 1)
        served_before = load.by_version().get("2", 0)
        wait_until(lambda: load.by_version().get("2", 0) >= served_before + 20, 30, "v2 answering after promotion")
    assert weights_seen == {20, 50}
    assert load.failures == [], load.failures[:5]
    assert set(load.by_version()) == {"1", "2"}
    route = _routed(redis_client, unique_name)
    assert route.stable.version == "2" and route.canary is None
    assert mlflow_store.alias_version(unique_name, "champion") == 2
    actions = list(AuditEvent.objects.filter(target_type="deployment", target_id=str(d.pk))
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["deployment.create", "deployment.progressing", "deployment.progressing",
                       "deployment.promoted"]


@pytest.mark.parametrize("fault", ["error", "sleep:1.5"])
def test_a_faulty_canary_is_rolled_back_automatically_and_clients_see_only_its_own_errors(
        served, serving_version, model_archive, unique_name, tmp_path, fault):
    redis_client = served["redis"]
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    fault_file = tmp_path / "fault"
    v2 = serving_version(unique_name, model_archive, 2.0, fault_file=fault_file)
    with Load(served["gateway"]["port"], unique_name) as load:
        d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[30, 60],
                                       **{**FAST, "step_interval_s": 60})
        _reconcile_until(d, {RolloutStatus.PROGRESSING})
        wait_until(lambda: load.by_version().get("2", 0) >= 10, 30, "the canary answering")
        fault_file.write_text(fault)  # the fault starts now
        d = _reconcile_until(d, {RolloutStatus.ROLLED_BACK, RolloutStatus.PROMOTED}, timeout=60)
        wait_until(lambda: (r := _routed(redis_client, unique_name)) is not None and r.canary is None, 10,
                   "canary out of the routes")
        answered_after = load.total()
        wait_until(lambda: load.total() >= answered_after + 30, 30, "more answers after the rollback")
    assert d.status == RolloutStatus.ROLLED_BACK
    expected = r"canary (error rate .* is above|errors .* against stable)" if fault == "error" else \
        r"canary (p99 latency is above the 1000 ms limit|slower than stable)"
    assert re.match("automatic rollback: " + expected, d.reason), d.reason
    assert load.failed_outside("2") == [], load.failed_outside("2")[:5]
    if fault == "error":
        assert load.failures and all(f[0] >= 500 for f in load.failures)
    assert mlflow_store.alias_version(unique_name, "champion") == 1
    assert Endpoint.objects.get(model=v2.model).stable_version.version == 1
    _wait_unloaded(unique_name, 2)


def _running_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still running (not zombies), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_triton_node_killed_during_a_canary_costs_no_client_request(
        served, serving_version, model_archive, unique_name):
    redis_client = served["redis"]
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    v2 = serving_version(unique_name, model_archive, 2.0)
    with Load(served["gateway"]["port"], unique_name) as load:
        d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[50], **{**FAST, "step_interval_s": 600})
        _reconcile_until(d, {RolloutStatus.PROGRESSING})
        wait_until(lambda: load.by_version().get("2", 0) >= 10, 30, "the canary answering")
        victim = read_nodes(redis_client)[0]
        info = __import__("json").loads(redis_client.hget("fleet:local:nodes", victim.name))
        os.kill(info["pid"], signal.SIGKILL)
        before = load.total()
        wait_until(lambda: load.total() >= before + 100, 60, "100 answers with a node down")
        # The supervisor restarts the node, which loads its repository again before it listens.
        wait_until(lambda: (n := {x.name: x for x in read_nodes(redis_client)}.get(victim.name)) is not None
                   and n.ready and __import__("json").loads(redis_client.hget("fleet:local:nodes", victim.name))
                   ["restarts"] >= 1, 90, "the node restarted")
        # Nothing of the dead server is left: its Python backend stubs held the connections it had accepted.
        assert _running_in_group(info["pid"]) == []
        placed = wait_until(lambda: (p := services.fleet().placed()).get(d.triton_model, []) and
                            len(p[d.triton_model]) == 2 and p, 60, "the canary ready on both nodes again")
        services.deployment_abort(SYSTEM, d)
        services.rollouts_reconcile()
    assert victim.http in placed[d.triton_model]
    assert load.failures == [], load.failures[:5]
    assert load.by_version().get("2", 0) > 0


def test_the_reconciler_finishes_a_promotion_whose_worker_died_before_acting_on_it(
        served, serving_version, model_archive, unique_name):
    redis_client = served["redis"]
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    v2 = serving_version(unique_name, model_archive, 2.0)
    d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[50], **FAST)
    _reconcile_until(d, {RolloutStatus.PROGRESSING})
    # The decision commits, then the worker dies: nothing outside PostgreSQL has followed yet.
    services.deployment_promote(SYSTEM, d)
    assert _routed(redis_client, unique_name).canary is not None
    assert mlflow_store.alias_version(unique_name, "champion") == 1
    services.rollouts_reconcile()
    route = _routed(redis_client, unique_name)
    assert route.stable.version == "2" and route.canary is None
    assert mlflow_store.alias_version(unique_name, "champion") == 2
    _wait_unloaded(unique_name, 1)


def test_a_deployer_worker_killed_mid_rollout_leaves_nothing_the_next_worker_does_not_finish(
        served, serving_version, model_archive, unique_name, platform_process, tmp_path):
    redis_client = served["redis"]
    _first_deployment(unique_name, model_archive, serving_version, redis_client)
    v2 = serving_version(unique_name, model_archive, 2.0)
    worker = ["celery", "-A", "config", "worker", "--pool", "solo", "--queues", "deployer", "--loglevel", "INFO"]
    beat = ["celery", "-A", "config", "beat", "--schedule", str(tmp_path / "beat-schedule")]
    env = {"PLATFORM_ROLLOUT_WINDOW_S": "5", "PLATFORM_ROLLOUT_DRAIN_S": "0.5"}
    with Load(served["gateway"]["port"], unique_name) as load, platform_process(beat, "beat", env):
        d = services.deployment_create(SYSTEM, v2.model, v2.version, steps=[30, 60],
                                       **{**FAST, "step_interval_s": 3})
        with platform_process([*worker, "--hostname", "first@%h"], "worker-1", env) as first:
            wait_until(lambda: Deployment.objects.get(pk=d.pk).status == RolloutStatus.PROGRESSING, 60,
                       "the first worker to start the canary", first)
            os.kill(first.pid, signal.SIGKILL)  # whatever it was doing, mid-pass or between passes
            first.wait(10)
        d.refresh_from_db()
        assert d.status == RolloutStatus.PROGRESSING
        with platform_process([*worker, "--hostname", "second@%h"], "worker-2", env) as second:
            wait_until(lambda: Deployment.objects.get(pk=d.pk).status == RolloutStatus.PROMOTED, 120,
                       "the second worker to finish the rollout", second)
            _wait_unloaded(unique_name, 1, second)
    assert load.failures == [], load.failures[:5]
    route = _routed(redis_client, unique_name)
    assert route.stable.version == "2" and route.canary is None
    assert mlflow_store.alias_version(unique_name, "champion") == 2
