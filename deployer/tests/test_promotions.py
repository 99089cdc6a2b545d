"""Promotion requests (deployer/promotions.py): filed when a protected model's rollout waits for approval, with
its evidence and the champion's; approved by eligible people only (four eyes, never CI), rejected with a
comment, or promoted at once by an administrator's audited break-glass."""

from __future__ import annotations

from typing import Any

import pytest

from deployer import promotions, services
from deployer.models import (
    Deployment,
    Endpoint,
    PromotionRequest,
    PromotionStatus,
    RolloutStatus,
)
from deployer.testing import awaiting_rollout
from registry.audit import SYSTEM
from registry.models import AuditEvent, PromotionPolicy
from registry.roles import Role

pytestmark = pytest.mark.django_db


@pytest.fixture
def waiting(unique_name, make_user) -> dict[str, Any]:
    return awaiting_rollout(unique_name, make_user)


def _filed(waiting: dict[str, Any]) -> PromotionRequest:
    assert promotions.promotions_reconcile()["filed"] == 1
    return PromotionRequest.objects.get(deployment=waiting["deployment"])


def test_a_waiting_rollout_gets_a_request_with_its_evidence_and_the_champions_side_by_side(waiting, client_as):
    req = _filed(waiting)
    assert (req.status, req.requested_by, req.version.version) == (PromotionStatus.PENDING, waiting["releaser"], 3)
    sections = {s["name"]: s for s in req.evidence["sections"]}
    assert list(sections) == ["lineage", "parity", "hil", "canary", "traffic", "alerts"]
    assert f"registered by {waiting['author'].username}" in sections["lineage"]["words"]
    assert sections["canary"]["outcome"] == "ok" and "p99 12 ms <= 500 ms" in sections["canary"]["words"]
    assert sections["alerts"]["words"] == "no open alert on v3"
    assert req.champion_evidence["version"] == 2
    assert promotions.promotions_reconcile()["filed"] == 0  # once
    body = client_as(Role.ONCALL).get(f"/api/v1/promotions/{req.pk}/").json()
    assert (body["approvals"], body["approvals_required"], body["policy"]["protected"]) == (0, 1, True)
    assert body["your_review"].startswith("approving needs deploy.promote")
    row = AuditEvent.objects.get(action="promotion.requested", target_id=str(req.pk))
    assert (row.after["model"], row.after["version"], row.after["deployment"]) == (
        waiting["model"].name, 3, waiting["deployment"].pk)


def test_four_eyes_neither_the_author_nor_the_requester_nor_ci_can_approve(waiting, client_as, make_user, token_for):
    from rest_framework.test import APIClient

    req = _filed(waiting)
    url = f"/api/v1/promotions/{req.pk}/approve/"
    for user, why in ((waiting["releaser"], "you requested this promotion"),):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
        resp = client.post(url, {"comment": "mine"}, format="json")
        assert resp.status_code == 403 and why in resp.json()["error"]["message"]
    # the version's author, even holding the release manager role too
    author = waiting["author"]
    author.profile.roles = [Role.DATA_SCIENTIST, Role.RELEASE_MANAGER]
    author.profile.save()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(author)}")
    resp = client.post(url, {}, format="json")
    assert resp.status_code == 403 and "you registered v3" in resp.json()["error"]["message"]
    # CI: refused by its role, and a release manager's roles carried with CI's are refused too
    assert client_as(Role.CI).post(url, {}, format="json").status_code == 403
    both = make_user(Role.RELEASE_MANAGER, Role.CI)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(both)}")
    resp = client.post(url, {}, format="json")
    assert resp.status_code == 403 and "never approve" in resp.json()["error"]["message"]
    # an administrator is not a release manager: the policy counts release managers only
    resp = client_as(Role.ADMIN).post(url, {}, format="json")
    assert resp.status_code == 403 and "release managers only" in resp.json()["error"]["message"]
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.PENDING
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.AWAITING_APPROVAL

    approver = client_as(Role.RELEASE_MANAGER)
    resp = approver.post(url, {"comment": "HIL and canary look right"}, format="json")
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert (body["status"], body["approvals"]) == ("approved", 1)
    assert body["outcome"] == f"approved by {approver.user.username} (1 of 1)"
    d = Deployment.objects.get(pk=waiting["deployment"].pk)
    assert d.status == RolloutStatus.PROMOTED and d.decided_by == approver.user
    assert Endpoint.objects.get(model=waiting["model"]).stable_version.version == 3
    approved = AuditEvent.objects.get(action="promotion.approved", target_id=str(req.pk))
    assert approved.after["approvers"] == [approver.user.username]


def test_a_policy_of_two_approvals_promotes_on_the_second(waiting, client_as):
    PromotionPolicy.objects.filter(model=waiting["model"]).update(approvals_required=2)
    req = _filed(waiting)
    first, second = client_as(Role.RELEASE_MANAGER), client_as(Role.RELEASE_MANAGER)
    url = f"/api/v1/promotions/{req.pk}/approve/"
    assert first.post(url, {}, format="json").json()["approvals"] == 1
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.AWAITING_APPROVAL
    again = first.post(url, {}, format="json")
    assert again.status_code == 403 and "already reviewed" in again.json()["error"]["message"]
    assert second.post(url, {}, format="json").json()["status"] == "approved"
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.PROMOTED


def test_a_rejection_needs_a_comment_and_rolls_the_canary_back(waiting, client_as):
    req = _filed(waiting)
    manager = client_as(Role.RELEASE_MANAGER)
    url = f"/api/v1/promotions/{req.pk}/reject/"
    assert manager.post(url, {}, format="json").status_code == 400
    resp = manager.post(url, {"comment": "p99 is fine but the drift check is stale"}, format="json")
    assert resp.status_code == 200 and resp.json()["status"] == "rejected"
    d = Deployment.objects.get(pk=waiting["deployment"].pk)
    assert d.status == RolloutStatus.ROLLED_BACK
    assert d.reason == (f"promotion request {req.pk} rejected by {manager.user.username}: p99 is fine but the drift "
                        "check is stale")
    assert Endpoint.objects.get(model=waiting["model"]).stable_version.version == 2


def test_approval_waits_until_every_canary_step_has_passed(waiting, client_as):
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING, step_index=0,
                                                                  weight=10)
    resp = client_as(Role.DATA_SCIENTIST).post(f"/api/v1/deployments/{waiting['deployment'].pk}/promotion/",
                                               {"reason": "the release train leaves at 5"}, format="json")
    assert resp.status_code == 201, resp.content
    again = client_as(Role.CI).post(f"/api/v1/deployments/{waiting['deployment'].pk}/promotion/", {}, format="json")
    assert again.status_code == 409 and "pending already" in again.json()["error"]["message"]
    early = client_as(Role.RELEASE_MANAGER).post(f"/api/v1/promotions/{resp.json()['id']}/approve/", {},
                                                 format="json")
    assert early.status_code == 409 and "still progressing" in early.json()["error"]["message"]


def test_break_glass_is_for_administrators_with_a_written_reason_and_is_audited(waiting, client_as):
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING, step_index=0,
                                                                  weight=10)
    url = f"/api/v1/deployments/{waiting['deployment'].pk}/break-glass/"
    assert client_as(Role.RELEASE_MANAGER).post(url, {"reason": "x" * 40}, format="json").status_code == 403
    admin = client_as(Role.ADMIN)
    short = admin.post(url, {"reason": "urgent"}, format="json")
    assert short.status_code == 400 and "at least 20 characters" in short.json()["error"]["message"]
    reason = "INC-412: v2 mislabels every EU request; v3 fixes it and the release managers are unreachable"
    resp = admin.post(url, {"reason": reason}, format="json")
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert (body["status"], body["break_glass"]) == ("approved", reason)
    assert [r["decision"] for r in body["reviews"]] == ["break_glass"]
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.PROMOTED
    row = AuditEvent.objects.get(action="promotion.break_glass", target_id=str(body["id"]))
    assert (row.actor_name, row.after["reason"]) == (admin.user.username, reason)


def test_a_protected_models_canary_cannot_be_promoted_by_hand_but_an_unprotected_ones_can(waiting, client_as):
    manager = client_as(Role.RELEASE_MANAGER)
    resp = manager.post(f"/api/v1/deployments/{waiting['deployment'].pk}/promote/", format="json")
    assert resp.status_code == 403
    assert "only through an approved promotion request" in resp.json()["error"]["message"]
    PromotionPolicy.objects.filter(model=waiting["model"]).update(protected=False)
    assert manager.post(f"/api/v1/deployments/{waiting['deployment'].pk}/promote/",
                        format="json").json()["status"] == "promoted"


def test_the_pending_request_of_a_rollout_that_ended_is_cancelled(waiting):
    req = _filed(waiting)
    services.deployment_abort(SYSTEM, waiting["deployment"])
    assert promotions.promotions_reconcile()["cancelled"] == 1
    req.refresh_from_db()
    assert req.status == PromotionStatus.CANCELLED
    assert req.outcome.startswith(f"deployment {waiting['deployment'].pk} ended (rolled_back)")


def test_the_last_step_of_a_protected_models_rollout_waits_for_approval_where_an_unprotected_one_promotes(
        waiting, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from monitoring import canary

    passed = canary.Verdict("pass", "p99 12 ms <= 500 ms", {"canary_requests": 400, "canary_error_rate": 0.0,
                                                             "canary_p99_ms": 12.0})
    monkeypatch.setattr(services, "analyse", lambda d, now: passed)
    monkeypatch.setattr(services, "_with_traffic_inputs", lambda d, live: live)
    d = waiting["deployment"]
    Deployment.objects.filter(pk=d.pk).update(status=RolloutStatus.PROGRESSING,
                                              step_started_at=timezone.now() - timedelta(hours=1))
    services.rollout_advance(Deployment.objects.get(pk=d.pk))
    d.refresh_from_db()
    assert d.status == RolloutStatus.AWAITING_APPROVAL
    assert d.reason == "all steps passed (p99 12 ms <= 500 ms); waiting for its promotion request's approval (1 needed)"
    assert _filed(waiting).requested_by == waiting["releaser"]

    PromotionPolicy.objects.filter(model=waiting["model"]).update(protected=False)
    Deployment.objects.filter(pk=d.pk).update(status=RolloutStatus.PROGRESSING)
    services.rollout_advance(Deployment.objects.get(pk=d.pk))
    assert Deployment.objects.get(pk=d.pk).status == RolloutStatus.PROMOTED


def test_its_requester_may_withdraw_a_request_and_another_data_scientist_may_not(waiting, client_as):
    requester = client_as(Role.DATA_SCIENTIST)
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING)
    req = requester.post(f"/api/v1/deployments/{waiting['deployment'].pk}/promotion/", {}, format="json").json()
    other = client_as(Role.DATA_SCIENTIST).post(f"/api/v1/promotions/{req['id']}/cancel/", {}, format="json")
    assert other.status_code == 403 and "only its requester" in other.json()["error"]["message"]
    mine = requester.post(f"/api/v1/promotions/{req['id']}/cancel/", {"comment": "wrong version"}, format="json")
    assert mine.status_code == 200
    assert (mine.json()["status"], mine.json()["outcome"]) == (
        "cancelled", f"cancelled by {requester.user.username}: wrong version")


def test_the_demos_release_manager_approves_a_waiting_rollout_quoting_its_evidence(waiting):
    from io import StringIO

    from deployer.management.commands.demo_rollouts import DEMO_APPROVER, Command

    command = Command(stdout=StringIO())
    command._approve(waiting["deployment"])  # nothing filed yet: nothing to approve
    req = _filed(waiting)
    command._approve(Deployment.objects.get(pk=waiting["deployment"].pk))
    req.refresh_from_db()
    assert req.status == PromotionStatus.APPROVED
    [review] = req.reviews.all()
    assert review.reviewer_name == DEMO_APPROVER
    assert review.comment == ("demo: approved after reading the evidence (parity: none; hil: warn; canary: ok; "
                              "alerts: ok)")
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.PROMOTED


def test_a_ci_account_cannot_approve_through_a_token_scoped_to_its_release_manager_role(waiting, make_user, token_for):
    from rest_framework.test import APIClient

    req = _filed(waiting)
    both = make_user(Role.RELEASE_MANAGER, Role.CI)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(both, [Role.RELEASE_MANAGER])}")
    resp = client.post(f"/api/v1/promotions/{req.pk}/approve/", {}, format="json")
    assert resp.status_code == 403 and "never approve" in resp.json()["error"]["message"]


def test_whoever_started_the_rollout_cannot_approve_a_request_someone_else_filed(waiting, client_as, token_for):
    from rest_framework.test import APIClient

    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING)
    filed = client_as(Role.CI).post(f"/api/v1/deployments/{waiting['deployment'].pk}/promotion/", {}, format="json")
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.AWAITING_APPROVAL)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(waiting['releaser'])}")
    resp = client.post(f"/api/v1/promotions/{filed.json()['id']}/approve/", {}, format="json")
    assert resp.status_code == 403 and "you started this rollout" in resp.json()["error"]["message"]


def test_the_aliases_a_policy_lists_follow_the_champion(scientist, model_archive, unique_name):
    from registry import mlflow_store
    from registry.models import RegisteredModel

    with open(model_archive, "rb") as fh:
        assert scientist.post(f"/api/v1/models/{unique_name}/versions/", {"archive": fh},
                              format="multipart").status_code == 201
    model = RegisteredModel.objects.get(name=unique_name)
    PromotionPolicy.objects.create(model=model, protected=True, protected_aliases=["prod-eu"])
    endpoint = Endpoint.objects.create(model=model, stable_version=model.versions.get(version=1))
    services._move_champions([Endpoint.objects.select_related("model", "stable_version").get(pk=endpoint.pk)])
    assert mlflow_store.aliases(unique_name) == {"champion": 1, "prod-eu": 1}
    moved = AuditEvent.objects.filter(action="alias.set", target_id=unique_name, actor_name="system")
    assert sorted(r.after["alias"] for r in moved) == ["champion", "prod-eu"]
