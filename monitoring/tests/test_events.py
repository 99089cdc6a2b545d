"""Outbound events (monitoring/events.py): receivers subscribe by event type and model; the dispatcher turns
the audit log's rows, written by the platform's real services and lifecycle moves, into deliveries through
notify's mechanism, once per audit row and receiver however passes race, crash or meet rows committed late.
Sending them is notify's (monitoring/tests/test_notify.py); one event is sent here to a real receiver that
verifies its signature."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from deployer.models import Deployment, RolloutStatus
from deployer.services import deployment_transition
from monitoring import alerts, events, notify, tasks
from monitoring.models import AlertKind, Delivery, DispatchedEvent, EventCursor, Receiver
from monitoring.tests.webhooks import receiver_at
from pipelines.models import BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import build_transition, engine_builds_request, hil_transition
from registry.audit import SYSTEM, Actor, audit_record
from registry.models import AuditEvent, ModelVersion, RegisteredModel, VersionStatus
from registry.roles import Role
from registry.services import version_register_from_archive, version_transition

ALL_TYPES = list(notify.EVENT_TYPES)


def _receiver(name: str, event_types: list[str] | None = None, models: list[str] | None = None) -> Receiver:
    return notify.receiver_create(SYSTEM, name, "json", f"http://127.0.0.1:9/{name}", event_types=event_types,
                                  models=models)


def _got(receiver: Receiver) -> list[tuple[str, str | None]]:
    """(event type, model) of each delivery the receiver got, oldest first."""
    return [(d.event_type, d.payload.get("model"))
            for d in Delivery.objects.filter(receiver=receiver).order_by("pk")]


def _version(name: str, number: int = 1, status: str = VersionStatus.READY) -> ModelVersion:
    model, _ = RegisteredModel.objects.get_or_create(name=name)
    return ModelVersion.objects.create(model=model, version=number, origin="upload", source="s", status=status)


def _promotion_row(action: str, model: str, version: int, deployment: int | None, actor: Actor = SYSTEM,
                   request_id: int = 41) -> AuditEvent:
    """A promotion request's audit row as the deployer writes it (target "promotion", the request's id)."""
    return audit_record(actor, action, "promotion", request_id,
                        after={"model": model, "version": version, "deployment": deployment, "status": action[10:]})


# ---- subscriptions ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_receiver_gets_only_the_event_types_and_the_models_it_subscribes_to(unique_name):
    other = f"{unique_name}-other"
    everything = _receiver("everything")
    this_model = _receiver("this-model", models=[unique_name])
    rollouts = _receiver("rollouts", event_types=["rollout.promoted", "rollout.rolled_back"])
    this_models_rollouts = _receiver("this-models-rollouts", event_types=["rollout.promoted"], models=[unique_name])
    disabled = notify.receiver_update(SYSTEM, _receiver("disabled"), enabled=False)

    notify.notify("rollout.promoted", {"model": unique_name}, model=unique_name)
    notify.notify("rollout.promoted", {"model": other}, model=other)
    notify.notify("version.registered", {"model": unique_name}, model=unique_name)
    notify.notify("alert.firing", {"model": None})  # about no model: only receivers of every model

    assert _got(everything) == [("rollout.promoted", unique_name), ("rollout.promoted", other),
                                ("version.registered", unique_name), ("alert.firing", None)]
    assert _got(this_model) == [("rollout.promoted", unique_name), ("version.registered", unique_name)]
    assert _got(rollouts) == [("rollout.promoted", unique_name), ("rollout.promoted", other)]
    assert _got(this_models_rollouts) == [("rollout.promoted", unique_name)]
    assert _got(disabled) == []


@pytest.mark.django_db
def test_an_alert_reaches_the_receivers_of_its_model_with_the_events_common_fields(unique_name):
    mine = _receiver("mine", event_types=["alert.firing"], models=[unique_name])
    theirs = _receiver("theirs", models=[f"{unique_name}-other"])
    version = _version(unique_name, 2)

    alert = alerts.alert_seen(version, AlertKind.LATENCY, "p99 over its SLO", "p99 812 ms", {"p99_ms": 812})
    events.events_dispatch()  # the alert's audit row is not dispatched again: alerts notify for themselves

    [delivery] = Delivery.objects.filter(receiver=mine)
    assert delivery.payload["event"] == "alert.firing" and delivery.payload["model"] == unique_name
    assert delivery.payload["version"] == 2 and delivery.payload["summary"] == "p99 over its SLO"
    assert delivery.payload["detail"]["id"] == alert.pk and delivery.payload["title"] == "p99 over its SLO"
    assert not Delivery.objects.filter(receiver=theirs).exists()


# ---- the catalogue, from the platform's own audit rows -------------------------------------------------------


@pytest.mark.django_db
def test_a_version_registered_and_validated_by_the_registry_is_told_as_version_registered_then_validated(
        unique_name, model_archive, settings):
    settings.PLATFORM = {**settings.PLATFORM, "BASE_URL": "https://mlops.example"}
    receiver = _receiver("versions", event_types=["version.registered", "version.validated"], models=[unique_name])
    alice = Actor(None, "api")

    version = version_register_from_archive(alice, unique_name, model_archive)
    version_transition(version.pk, VersionStatus.READY)
    events.events_dispatch()

    registered, validated = Delivery.objects.filter(receiver=receiver).order_by("pk")
    audit = AuditEvent.objects.get(action="version.register", target_id=f"{unique_name}/{version.version}")
    assert registered.payload == {
        "event": "version.registered", "at": audit.at.isoformat(), "model": unique_name, "version": version.version,
        "actor": "system", "summary": f"{unique_name} v{version.version} registered by system",
        "url": f"https://mlops.example/models/{unique_name}/versions/{version.version}/", "detail": audit.after}
    assert registered.event_id == f"msg_audit{audit.pk}_r{receiver.pk}"
    assert validated.event_type == "version.validated" and validated.payload["version"] == version.version
    assert validated.payload["summary"] == f"{unique_name} v{version.version} passed validation and is ready"
    assert validated.payload["detail"]["status"] == "ready"


@pytest.mark.django_db
def test_engine_builds_and_hil_runs_are_told_built_passed_and_failed_for_every_end_that_is_not_a_pass(unique_name):
    receiver = _receiver("pipelines", event_types=["engine.built", "hil.passed", "hil.failed"])
    version = _version(unique_name)
    build, failed_build = engine_builds_request(SYSTEM, version, [("cpu", "fp32", "onnxruntime"),
                                                                  ("cpu", "int8", "onnxruntime")])
    for b, end in ((build, BuildStatus.SUCCEEDED), (failed_build, BuildStatus.FAILED)):
        build_transition(b.pk, BuildStatus.RUNNING)
        build_transition(b.pk, end, **({"error": "export failed"} if end == BuildStatus.FAILED else {}))
    runs = {}
    for profile, end in (("p-pass", HilStatus.PASSED), ("p-fail", HilStatus.FAILED), ("p-unstable", HilStatus.UNSTABLE),
                         ("p-error", HilStatus.ERROR), ("p-timeout", HilStatus.TIMED_OUT)):
        run = HilRun.objects.create(build=build, profile=profile, wait_deadline=timezone.now() + timedelta(hours=1))
        if end != HilStatus.TIMED_OUT:
            hil_transition(run.pk, HilStatus.RUNNING)
        hil_transition(run.pk, end)
        runs[end] = run

    events.events_dispatch()

    got = list(Delivery.objects.filter(receiver=receiver).order_by("pk"))
    assert [d.event_type for d in got] == ["engine.built", "hil.passed"] + ["hil.failed"] * 4
    assert got[0].payload["summary"] == f"{unique_name} v1: engine cpu-fp32-onnxruntime built and kept " \
                                        f"(engine build {build.pk})"
    assert got[0].payload["url"] == f"/models/{unique_name}/versions/1/"
    assert got[1].payload["url"] == f"/hil/{runs[HilStatus.PASSED].pk}/"
    assert [d.payload["detail"]["status"] for d in got[2:]] == ["failed", "unstable", "error", "timed_out"]
    assert got[3].payload["summary"] == (f"{unique_name} v1: HIL run {runs[HilStatus.UNSTABLE].pk} ended unstable "
                                         "(cpu-fp32-onnxruntime on p-unstable)")
    assert all(d.payload["model"] == unique_name and d.payload["version"] == 1 for d in got)


@pytest.mark.django_db
def test_a_rollout_is_told_canary_started_advanced_then_promoted_or_rolled_back(unique_name):
    receiver = _receiver("rollouts", event_types=["canary.started", "canary.advanced", "rollout.promoted",
                                                  "rollout.rolled_back"], models=[unique_name])
    v1, v2 = _version(unique_name, 1), _version(unique_name, 2)
    engine = EngineBuild.objects.create(version=v2, target="cpu", precision="fp32", runtime="onnxruntime",
                                        content_key=unique_name, status=BuildStatus.SUCCEEDED)

    def rollout() -> Deployment:  # one active rollout per model: the second starts when the first has ended
        return Deployment.objects.create(model=v2.model, version=v2, previous_version=v1, engine=engine,
                                         triton_model=f"{unique_name}_v2", steps=[10, 50])

    first = rollout()
    deployment_transition(first.pk, RolloutStatus.PROGRESSING, weight=10)
    deployment_transition(first.pk, RolloutStatus.PAUSED, reason="too little evidence")
    deployment_transition(first.pk, RolloutStatus.PROGRESSING)  # resumed at the same step: no traffic moved
    deployment_transition(first.pk, RolloutStatus.PROGRESSING, step_index=1, weight=50, reason="step 1 passed")
    deployment_transition(first.pk, RolloutStatus.PROMOTED, weight=100, reason="every step passed")
    second = rollout()
    deployment_transition(second.pk, RolloutStatus.PROGRESSING, weight=10)
    deployment_transition(second.pk, RolloutStatus.ROLLED_BACK, weight=0, reason="automatic rollback at step 1")

    events.events_dispatch()

    got = list(Delivery.objects.filter(receiver=receiver).order_by("pk"))
    assert [(d.event_type, d.payload["detail"].get("weight")) for d in got] == [
        ("canary.started", 10), ("canary.advanced", 50), ("rollout.promoted", 100), ("canary.started", 10),
        ("rollout.rolled_back", 0)]
    assert got[1].payload["summary"] == f"{unique_name} v2: canary moved to step 2, 50% of traffic " \
                                        f"(deployment {first.pk})"
    assert got[2].payload["summary"] == f"{unique_name} v2 promoted: it serves all traffic (deployment {first.pk})" \
                                        ": every step passed"
    assert got[4].payload["url"] == f"/deployments/{second.pk}/"
    assert {(d.payload["model"], d.payload["version"]) for d in got} == {(unique_name, 2)}


@pytest.mark.django_db
def test_promotion_requests_are_told_from_the_deployers_audit_rows(unique_name, make_user):
    receiver = _receiver("releases", event_types=["promotion.requested", "promotion.approved",
                                                  "promotion.rejected", "promotion.break_glass"])
    ana, rm = Actor(make_user(Role.DATA_SCIENTIST), "web"), Actor(make_user(Role.RELEASE_MANAGER), "web")
    _promotion_row("promotion.requested", unique_name, 3, 12, ana, request_id=7)
    _promotion_row("promotion.approved", unique_name, 3, 12, rm, request_id=7)
    _promotion_row("promotion.requested", unique_name, 4, None, ana, request_id=8)
    _promotion_row("promotion.rejected", unique_name, 4, None, rm, request_id=8)
    _promotion_row("promotion.break_glass", unique_name, 5, 13, rm, request_id=9)

    events.events_dispatch()

    got = [d.payload for d in Delivery.objects.filter(receiver=receiver).order_by("pk")]
    assert [(p["event"], p["version"], p["actor"]) for p in got] == [
        ("promotion.requested", 3, ana.name), ("promotion.approved", 3, rm.name), ("promotion.requested", 4, ana.name),
        ("promotion.rejected", 4, rm.name), ("promotion.break_glass", 5, rm.name)]
    assert got[1]["summary"] == f"promotion of {unique_name} v3 approved by {rm.name}"
    assert got[1]["url"] == "/approvals/7/" and got[3]["url"] == "/approvals/8/"  # the request's page
    assert got[4]["summary"] == f"promotion of {unique_name} v5 forced by {rm.name} without approval (break glass)"
    assert got[0]["detail"] == {"model": unique_name, "version": 3, "deployment": 12, "status": "requested"}


@pytest.mark.django_db
def test_audit_rows_that_are_not_events_are_told_to_nobody(unique_name):
    _receiver("everything")
    version = _version(unique_name, status=VersionStatus.VALIDATING)
    version_transition(version.pk, VersionStatus.INVALID, detail="no MLmodel")
    audit_record(SYSTEM, "model.update", "registered_model", unique_name, after={"description": "x"})

    assert events.events_dispatch() == 0
    assert not Delivery.objects.exists()


# ---- once per audit row and receiver -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_second_pass_records_nothing_more(unique_name):
    a, b = _receiver("a"), _receiver("b", models=[unique_name])
    _promotion_row("promotion.requested", unique_name, 1, None)
    _promotion_row("promotion.approved", unique_name, 1, None)

    assert events.events_dispatch() == 4
    assert events.events_dispatch() == 0

    assert len(_got(a)) == len(_got(b)) == 2
    assert DispatchedEvent.objects.count() == 2  # marked: above the cursor until they settle


@pytest.mark.django_db
def test_a_pass_that_crashes_midway_records_nothing_and_the_next_pass_records_each_event_once(
        unique_name, monkeypatch):
    receiver = _receiver("r")
    for version in (1, 2, 3):
        _promotion_row("promotion.requested", unique_name, version, None, request_id=version)
    real_notify, calls = notify.notify, []

    def crashing(*args: Any, **kwargs: Any) -> list[Delivery]:
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return real_notify(*args, **kwargs)

    monkeypatch.setattr(notify, "notify", crashing)
    with pytest.raises(RuntimeError):
        events.events_dispatch()
    assert not Delivery.objects.exists() and not DispatchedEvent.objects.exists()
    monkeypatch.setattr(notify, "notify", real_notify)

    assert events.events_dispatch() == 3
    assert [d.payload["version"] for d in Delivery.objects.filter(receiver=receiver).order_by("pk")] == [1, 2, 3]


@pytest.mark.django_db(transaction=True)
def test_two_passes_at_once_record_each_event_once(unique_name, monkeypatch):
    receiver = _receiver("r")
    for version in (1, 2):
        _promotion_row("promotion.requested", unique_name, version, None, request_id=version)
    inside, go_on = threading.Event(), threading.Event()
    real_dispatch = events._dispatch

    def slow_dispatch(row: AuditEvent) -> int:
        sent = real_dispatch(row)
        if threading.current_thread().name == "first-pass":
            inside.set()  # deliveries recorded, not committed yet: the other pass runs now
            go_on.wait(30)
        return sent

    monkeypatch.setattr(events, "_dispatch", slow_dispatch)
    results: list[int] = []

    def first_pass() -> None:
        try:
            results.append(events.events_dispatch())
        finally:
            connection.close()

    first = threading.Thread(target=first_pass, name="first-pass")
    first.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        assert events.events_dispatch() == 0  # the cursor is held: this pass leaves at once, without waiting
        assert time.monotonic() - started < 5
    finally:
        go_on.set()
        first.join(10)
    assert results == [2]
    assert events.events_dispatch() == 0
    assert sorted(d.payload["version"] for d in Delivery.objects.filter(receiver=receiver)) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_an_event_committed_after_a_later_one_was_dispatched_is_still_dispatched(unique_name, monkeypatch):
    receiver = _receiver("r")
    written, commit = threading.Event(), threading.Event()

    def slow_transaction() -> None:
        try:
            with transaction.atomic():
                _promotion_row("promotion.requested", unique_name, 1, None, request_id=1)  # the lower id
                written.set()
                commit.wait(10)
        finally:
            connection.close()

    slow = threading.Thread(target=slow_transaction)
    slow.start()
    try:
        assert written.wait(10)
        later = _promotion_row("promotion.requested", unique_name, 2, None, request_id=2)
        assert events.events_dispatch() == 1  # only the later one is visible yet
        assert EventCursor.objects.get(name=events.CURSOR).last_id < later.pk  # not settled: not moved past
    finally:
        commit.set()
        slow.join(10)

    assert events.events_dispatch() == 1  # the re-scan above the cursor finds the row committed late
    assert [d.payload["version"] for d in Delivery.objects.filter(receiver=receiver).order_by("pk")] == [2, 1]

    monkeypatch.setattr(events, "SETTLE", timedelta(0))  # both settled now: the cursor moves past them
    assert events.events_dispatch() == 0
    assert EventCursor.objects.get(name=events.CURSOR).last_id >= later.pk
    assert not DispatchedEvent.objects.exists()  # marks below the cursor are dropped
    assert Delivery.objects.filter(receiver=receiver).count() == 2


# ---- sent, signed ----------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_event_reaches_a_real_receiver_signed_and_a_slack_one_in_words(
        receiver_server, broker, fast, unique_name):
    hook = receiver_at(receiver_server, "/events", event_types=["promotion.approved"], models=[unique_name])
    slack = receiver_at(receiver_server, "/slack", kind="slack", event_types=["promotion.approved"])
    row = _promotion_row("promotion.approved", unique_name, 3, 12)
    assert tasks.events_dispatch() == 2  # the periodic task, as beat runs it

    for receiver in (hook, slack):
        [delivery] = Delivery.objects.filter(receiver=receiver)
        assert tasks.deliver(delivery.pk) == "delivered"
    [got] = receiver_server.at("/events")
    assert got.verified, got.problem
    assert got.headers["webhook-id"] == f"msg_audit{row.pk}_r{hook.pk}"
    assert got.json["type"] == "promotion.approved"
    assert got.json["data"]["summary"] == f"promotion of {unique_name} v3 approved by system"
    assert got.json["data"]["detail"]["deployment"] == 12
    [words] = receiver_server.at("/slack")
    assert words.verified, words.problem
    assert words.json["blocks"][0]["text"]["text"] == (f"[promotion.approved] promotion of {unique_name} v3 "
                                                       "approved by system")
    assert words.json["blocks"][1]["text"]["text"] == f"{unique_name} v3 · by system"


def test_beat_runs_the_dispatcher_every_few_seconds_on_the_reconcilers_queue(settings):
    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["events-dispatch"]
    assert entry["task"] == tasks.events_dispatch.name and entry["task"] in app.tasks
    assert entry["schedule"] <= 10 and entry["options"]["queue"] == "reconcile"


# ---- the API -----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_receiver_api_takes_shows_and_checks_subscriptions(client_as, unique_name):
    oncall = client_as(Role.ONCALL)
    base = {"name": "releases", "kind": "json", "url": "https://hooks.example/releases"}

    unknown = oncall.post("/api/v1/receivers/", {**base, "event_types": ["rollout.promoted", "model.deleted"]},
                          format="json")
    assert unknown.status_code == 400
    message = unknown.json()["error"]["message"]
    assert "unknown event type 'model.deleted'" in message and "the known ones are version.registered" in message
    assert all(event in message for event in ALL_TYPES)
    for bad in ({"event_types": "rollout.promoted"}, {"models": unique_name}, {"models": [""]}):
        assert oncall.post("/api/v1/receivers/", {**base, **bad}, format="json").status_code == 400, bad
    assert not Receiver.objects.exists()

    created = oncall.post("/api/v1/receivers/", {**base, "event_types": ["rollout.promoted", "canary.started",
                                                                         "rollout.promoted"],
                                                 "models": [unique_name]}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["event_types"] == ["canary.started", "rollout.promoted"]
    assert created.json()["models"] == [unique_name]
    receiver_id = created.json()["id"]

    changed = oncall.patch(f"/api/v1/receivers/{receiver_id}/", {"event_types": [], "models": [unique_name, "b"]},
                           format="json")
    assert changed.status_code == 200, changed.content
    shown = client_as(Role.DATA_SCIENTIST).get(f"/api/v1/receivers/{receiver_id}/")
    assert shown.status_code == 200, shown.content
    assert shown.json()["event_types"] == [] and shown.json()["models"] == sorted([unique_name, "b"])
    assert oncall.patch(f"/api/v1/receivers/{receiver_id}/", {"event_types": ["nope"]},
                        format="json").status_code == 400
    update = AuditEvent.objects.get(action="receiver.update", target_id=str(receiver_id))
    assert update.after["changed"] == ["event_types", "model_names"] and update.after["event_types"] == []
