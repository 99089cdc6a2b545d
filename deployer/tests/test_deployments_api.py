"""The deployments API: clear refusals for bad requests, and the manual controls moving the state machine."""

from __future__ import annotations

import pytest

from deployer.models import Deployment, Endpoint, RolloutStatus
from deployer.testing import servable_model as _model
from pipelines.models import EngineBuild
from registry.audit import SYSTEM as SYSTEM_ACTOR
from registry.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def manager(client_as):
    return client_as("release_manager")


def test_a_deployment_starts_pending_with_the_default_steps_and_the_fp32_engine(manager, unique_name, settings):
    _model(unique_name)
    resp = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 2}, format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["status"] == "pending" and body["weight"] == 0 and body["active"] is True
    assert body["steps"] == settings.PLATFORM["ROLLOUT_STEPS"] and body["engine"] == "cpu-fp32-onnxruntime"
    assert body["history"][0]["action"] == "deployment.create"
    assert Endpoint.objects.filter(model__name=unique_name).exists()


def test_a_shadow_deployment_has_one_step_at_no_traffic_and_its_mirrored_share(manager, unique_name):
    _model(unique_name)
    resp = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 2, "mode": "shadow",
                                                 "shadow_share": 20}, format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert (body["mode"], body["shadow_share"], body["steps"], body["weight"]) == ("shadow", 20, [0], 0)
    d = manager.get(f"/api/v1/deployments/{body['id']}/").json()
    assert d["mode"] == "shadow"


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"version": 9}, 404, "has no version 9"),
    ({"version": 1, "steps": [50, 10]}, 400, "weights must increase"),
    ({"version": 1, "steps": [0, 10]}, 400, "1..100"),
    ({"version": 1, "steps": []}, 400, "at least one"),
    ({"version": 1, "max_error_rate": 2}, 400, "max_error_rate"),
    ({"version": 1, "target": "tpu"}, 400, "target"),
    ({"version": 1, "mode": "blue-green"}, 400, "mode"),
    ({"version": 1, "mode": "shadow", "steps": [10]}, 400, "a shadow rollout takes no client traffic"),
    ({"version": 1, "shadow_share": 20}, 400, "only a shadow rollout mirrors requests"),
    ({"version": 1, "mode": "shadow", "shadow_share": 101}, 400, "shadow_share"),
])
def test_bad_deployment_requests_are_refused_saying_what_is_wrong(manager, unique_name, body, status, says):
    _model(unique_name)
    resp = manager.post("/api/v1/deployments/", {"model": unique_name, **body}, format="json")
    assert resp.status_code == status, resp.content
    assert says in resp.content.decode()
    assert not Deployment.objects.filter(model__name=unique_name).exists()


def test_a_version_that_is_not_ready_or_has_no_kept_engine_is_refused(manager, unique_name):
    _model(unique_name, status="validating")
    resp = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 1}, format="json")
    assert resp.status_code == 409 and "is validating" in resp.json()["error"]["message"]
    _model(unique_name + "-x", engines=False)
    resp = manager.post("/api/v1/deployments/", {"model": unique_name + "-x", "version": 1}, format="json")
    assert resp.status_code == 409 and "no engine that passed" in resp.json()["error"]["message"]


def test_a_second_rollout_of_a_model_waits_for_the_first(manager, unique_name):
    _model(unique_name)
    first = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 1}, format="json").json()
    resp = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 2}, format="json")
    assert resp.status_code == 409
    assert f"deployment {first['id']} of version 1 is pending" in resp.json()["error"]["message"]


def test_pause_resume_and_promote_move_the_state_machine_and_the_stable_version(manager, unique_name):
    model = _model(unique_name)
    d = Deployment.objects.create(model=model, version=model.versions.get(version=2),
                                  engine=EngineBuild.objects.get(content_key=f"{unique_name}-2"), triton_model="t",
                                  steps=[10, 50], status=RolloutStatus.PROGRESSING, step_index=0, weight=10)
    assert manager.post(f"/api/v1/deployments/{d.pk}/pause/").json()["status"] == "paused"
    assert manager.post(f"/api/v1/deployments/{d.pk}/pause/").status_code == 409
    assert manager.post(f"/api/v1/deployments/{d.pk}/resume/").json()["status"] == "progressing"
    body = manager.post(f"/api/v1/deployments/{d.pk}/promote/").json()
    assert body["status"] == "promoted" and body["weight"] == 100 and body["decided_by"] == manager.user.username
    assert Endpoint.objects.get(model=model).stable_version.version == 2
    resp = manager.post(f"/api/v1/deployments/{d.pk}/abort/")
    assert resp.status_code == 409 and "is promoted" in resp.json()["error"]["message"]
    actions = list(AuditEvent.objects.filter(target_type="deployment", target_id=str(d.pk)).order_by("id")
                   .values_list("action", flat=True))
    assert actions == ["deployment.paused", "deployment.progressing", "deployment.promoted"]


def test_abort_rolls_back_and_keeps_the_stable_version(client_as, unique_name):
    oncall = client_as("oncall")
    model = _model(unique_name)
    Endpoint.objects.create(model=model, stable_version=model.versions.get(version=1), stable_triton_model="t1")
    d = Deployment.objects.create(model=model, version=model.versions.get(version=2),
                                  engine=EngineBuild.objects.get(content_key=f"{unique_name}-2"), triton_model="t",
                                  steps=[10], status=RolloutStatus.PROGRESSING, step_index=0, weight=10)
    body = oncall.post(f"/api/v1/deployments/{d.pk}/abort/").json()
    assert body["status"] == "rolled_back" and body["weight"] == 0 and "aborted by" in body["reason"]
    assert Endpoint.objects.get(model=model).stable_version.version == 1
    assert oncall.post(f"/api/v1/deployments/{d.pk}/promote/").status_code == 403


def test_deployments_list_filters_by_model_and_activity(manager, unique_name):
    _model(unique_name)
    _model(unique_name + "-b")
    manager.post("/api/v1/deployments/", {"model": unique_name, "version": 1}, format="json")
    manager.post("/api/v1/deployments/", {"model": unique_name + "-b", "version": 1}, format="json")
    only = manager.get(f"/api/v1/deployments/?model={unique_name}&active=true").json()
    assert [d["model"] for d in only["results"]] == [unique_name]
    assert manager.get("/api/v1/deployments/?status=nonsense").status_code == 400


class _LoadingFleet:
    """A fleet on which the canary is still loading (the timeout logic alone; loading itself is tested
    end to end in test_rollouts.py)."""

    kind = "loading"

    def place(self, placement):
        from deployer.fleet import FleetNotReady

        raise FleetNotReady("1 of 2 nodes loading")


def test_a_canary_that_never_loads_is_rolled_back_after_the_load_timeout_counted_from_its_last_resume(
        manager, unique_name, monkeypatch, settings):
    from datetime import timedelta

    from django.utils import timezone

    from deployer import services

    monkeypatch.setattr(services, "fleet", lambda: _LoadingFleet())
    model = _model(unique_name)
    d = services.deployment_create(SYSTEM_ACTOR, model, 1)
    long_ago = timezone.now() - timedelta(seconds=settings.PLATFORM["ROLLOUT_LOAD_TIMEOUT_S"] + 5)
    Deployment.objects.filter(pk=d.pk).update(created_at=long_ago, step_started_at=timezone.now())
    services.rollout_advance(Deployment.objects.get(pk=d.pk))  # resumed just now: still waiting
    d.refresh_from_db()
    assert d.status == RolloutStatus.PENDING and d.reason == "loading: 1 of 2 nodes loading"
    Deployment.objects.filter(pk=d.pk).update(step_started_at=None)
    services.rollout_advance(Deployment.objects.get(pk=d.pk))
    d.refresh_from_db()
    assert d.status == RolloutStatus.ROLLED_BACK and "did not become ready within" in d.reason
