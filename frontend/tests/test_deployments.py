"""The deployment pages through Django's test client: what each role sees and may press, what pressing
does to the rollout, the start form, and the charts' data."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from deployer.models import AnalysisPoint, Deployment, Endpoint, RolloutStatus
from deployer.testing import servable_model
from registry.models import AuditEvent, ModelVersion, RegisteredModel, VersionStatus
from registry.roles import Role

pytestmark = pytest.mark.django_db


def servable(name: str, versions: int = 2, status: str = VersionStatus.READY) -> RegisteredModel:
    """A model whose versions are ready and have a kept CPU engine (rows only: no fleet, no MLflow)."""
    return servable_model(name, versions, status=status, int8=False)


def rollout(name: str, status: str = RolloutStatus.PROGRESSING, **fields) -> Deployment:
    """Version 2 of a new model rolling out over version 1, which serves it, in `status`."""
    model = servable(name)
    stable, canary = ModelVersion.objects.filter(model=model).order_by("version")
    Endpoint.objects.create(model=model, stable_version=stable, stable_engine=stable.engine_builds.get(),
                            stable_triton_model=f"{name}_v1")
    values = {"steps": [10, 50], "step_index": 0, "weight": 10, "max_p99_ms": 250.0, "max_error_rate": 0.02,
              **fields}
    return Deployment.objects.create(model=model, version=canary, engine=canary.engine_builds.get(),
                                     triton_model=f"{name}_v2", previous_version=stable, status=status, **values)


def buttons(html: str) -> dict[str, str]:
    """The action buttons on a deployment page: {action: label}."""
    return dict(re.findall(r'data-action="(\w+)"[^>]*>([^<]+)</button>', html))


# ---- pages --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/deployments/", "/deployments/new/", "/deployments/1/"])
def test_anonymous_people_are_sent_to_the_login_page_from_deployment_pages(client, path):
    resp = client.get(path)
    assert resp.status_code == 302
    assert resp["Location"].startswith("/login/?next=")


def test_the_deployments_page_shows_what_serves_each_model_and_the_rollouts(browser_as, unique_name):
    d = rollout(unique_name)
    done = rollout(f"{unique_name}-b", RolloutStatus.ROLLED_BACK, reason="automatic rollback: canary error rate 9%")
    html = browser_as(Role.DATA_SCIENTIST).get("/deployments/").content.decode()

    serving = re.search(rf'<tr data-model="{unique_name}">(.*?)</tr>', html, re.S)
    assert serving is not None
    assert "v1" in serving.group(1) and "v2" in serving.group(1) and "10%" in serving.group(1)
    assert "Progressing" in serving.group(1)
    assert f'data-deployment="{d.pk}"' in html and f'data-deployment="{done.pk}"' in html
    assert "automatic rollback: canary error rate 9%" in html
    assert 'id="deployments-live" hx-get="/deployments/live/' in html  # polls: a rollout is active
    assert "+ Start a deployment" not in html  # a data scientist cannot start one


def test_the_deployments_page_filters_active_rollouts_and_stops_polling_when_none_is_active(browser_as, unique_name):
    active = rollout(unique_name)
    ended = rollout(f"{unique_name}-b", RolloutStatus.PROMOTED)
    client = browser_as(Role.ONCALL)
    only_active = client.get("/deployments/", {"show": "active"}).content.decode()
    assert f'data-deployment="{active.pk}"' in only_active
    assert f'data-deployment="{ended.pk}"' not in only_active

    Deployment.objects.filter(status__in=["pending", "progressing", "paused", "awaiting_approval"]).update(
        status=RolloutStatus.ROLLED_BACK)
    live = client.get("/deployments/live/", headers={"HX-Request": "true"}).content.decode()
    assert live.startswith('<div id="deployments-live"')
    assert "hx-trigger" not in live.split(">", 1)[0]


def test_the_deployment_page_shows_state_steps_thresholds_verdict_and_history(browser_as, unique_name):
    d = rollout(unique_name, analysis={"outcome": "inconclusive", "reason": "3 of 20 canary requests in the last 10s",
                                       "canary_requests": 3, "canary_error_rate": 0.0, "canary_p99_ms": 12.5,
                                       "stable_requests": 40, "stable_error_rate": 0.0, "stable_p99_ms": 9.0,
                                       "window_s": 10.0, "at": timezone.now().isoformat()})
    AuditEvent.objects.create(actor_name="ci-bot", via="api", action="deployment.create", target_type="deployment",
                              target_id=str(d.pk), after={"weight": 0})
    html = browser_as(Role.DATA_SCIENTIST).get(f"/deployments/{d.pk}/").content.decode()

    assert 'class="badge badge-progressing"' in html
    assert "Canary v2 takes 10% of traffic (step 1 of 2) while it is analysed." in html
    assert re.search(r'class="step step-current" data-weight="10"', html)
    assert re.search(r'class="step step-pending" data-weight="50"', html)
    assert "Not enough evidence yet</strong>: 3 of 20 canary requests in the last 10s" in html
    assert "250 ms" in html and "2%" in html  # the thresholds
    assert "Started" in html and "ci-bot" in html  # the history
    assert 'id="deployment-live" hx-get' in html and 'data-points-url="/deployments/' in html
    assert "/static/frontend/vendor/uPlot.iife.min.js" in html
    assert buttons(html) == {}
    assert "pausing, aborting or promoting it needs" in html
    assert 'id="analysis-traffic"' not in html  # judged only as a step ends


def test_the_deployment_page_shows_how_the_captured_traffic_was_judged(browser_as, unique_name):
    d = rollout(unique_name, status=RolloutStatus.ROLLED_BACK, analysis={
        "outcome": "pass", "reason": "no regression against stable", "canary_requests": 400,
        "traffic_reason": "the canary answers unlike stable: total variation distance 0.47", "traffic": {}})
    html = browser_as(Role.DATA_SCIENTIST).get(f"/deployments/{d.pk}/").content.decode()
    assert "Captured traffic</strong> (judged as the step ended): the canary answers unlike stable: total " \
           "variation distance 0.47" in html


def test_a_shadow_deployment_page_says_what_share_is_mirrored_and_that_no_client_sees_its_answers(
        browser_as, unique_name):
    d = rollout(unique_name, mode="shadow", shadow_share=30, steps=[0], weight=0)
    html = browser_as(Role.DATA_SCIENTIST).get(f"/deployments/{d.pk}/").content.decode()
    assert "shadow: 30% of stable's requests mirrored to v2, its answers seen by no client" in html
    plain = rollout(unique_name + "-c").pk
    assert 'id="shadow-share"' not in browser_as(Role.DATA_SCIENTIST).get(f"/deployments/{plain}/").content.decode()


def test_a_finished_deployment_page_does_not_poll(browser_as, unique_name):
    d = rollout(unique_name, RolloutStatus.PROMOTED, weight=100, step_index=1)
    html = browser_as(Role.RELEASE_MANAGER).get(f"/deployments/{d.pk}/live/").content.decode()
    assert html.startswith('<div id="deployment-live" data-status="promoted"')
    assert "v2 is now the stable version of" in html
    assert '<hx-partial hx-target="#deployment-history"' in html  # the history below the charts comes along
    assert buttons(html) == {}


def test_the_charts_data_lists_each_analysis_window_oldest_first_with_the_limits(browser_as, unique_name):
    d = rollout(unique_name)
    start = timezone.now() - timedelta(seconds=30)
    for i in range(3):
        AnalysisPoint.objects.create(deployment=d, at=start + timedelta(seconds=2 * i), weight=10, outcome="pass",
                                     canary_requests=30 + i, canary_p99_ms=20.0 + i, stable_requests=300,
                                     stable_p99_ms=15.0, canary_error_rate=0.01 * i)
    data = browser_as(Role.DATA_SCIENTIST).get(f"/deployments/{d.pk}/points/").json()
    assert data["active"] is True
    assert (data["max_p99_ms"], data["max_error_rate"], data["canary"], data["stable"]) == (250.0, 0.02, "v2", "v1")
    assert [p["canary_p99_ms"] for p in data["points"]] == [20.0, 21.0, 22.0]
    assert data["points"][0]["at"] == pytest.approx(start.timestamp())


# ---- the buttons --------------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "status", "expected"), [
    (Role.ONCALL, RolloutStatus.PROGRESSING, {"pause": "Pause", "abort": "Abort and roll back"}),
    (Role.ONCALL, RolloutStatus.PAUSED, {"resume": "Resume", "abort": "Abort and roll back"}),
    (Role.RELEASE_MANAGER, RolloutStatus.PROGRESSING,
     {"pause": "Pause", "promote": "Promote now", "abort": "Abort and roll back"}),
    (Role.RELEASE_MANAGER, RolloutStatus.AWAITING_APPROVAL,
     {"pause": "Pause", "promote": "Approve and promote", "abort": "Abort and roll back"}),
    (Role.ADMIN, RolloutStatus.PAUSED, {"resume": "Resume", "promote": "Promote now", "abort": "Abort and roll back"}),
    (Role.DATA_SCIENTIST, RolloutStatus.PROGRESSING, {}),
    (Role.CI, RolloutStatus.AWAITING_APPROVAL, {}),
    (Role.ADMIN, RolloutStatus.PROMOTED, {}),
    (Role.RELEASE_MANAGER, RolloutStatus.ROLLED_BACK, {}),
])
def test_buttons_are_shown_only_to_roles_allowed_and_in_states_where_they_apply(browser_as, unique_name, role,
                                                                               status, expected):
    d = rollout(unique_name, status)
    html = browser_as(role).get(f"/deployments/{d.pk}/").content.decode()
    assert buttons(html) == expected
    assert html.count("data-confirm=") == len(expected)  # each asks first


def test_a_canary_still_loading_can_be_paused_or_aborted_but_not_promoted(browser_as, unique_name):
    d = rollout(unique_name, RolloutStatus.PENDING, step_index=-1, weight=0)
    html = browser_as(Role.ADMIN).get(f"/deployments/{d.pk}/").content.decode()
    assert set(buttons(html)) == {"pause", "abort"}


@pytest.mark.parametrize(("role", "status", "action", "after", "message"), [
    (Role.ONCALL, RolloutStatus.PROGRESSING, "pause", RolloutStatus.PAUSED, "Paused the rollout"),
    (Role.ONCALL, RolloutStatus.PAUSED, "resume", RolloutStatus.PROGRESSING, "Resumed the rollout"),
    (Role.ONCALL, RolloutStatus.PROGRESSING, "abort", RolloutStatus.ROLLED_BACK, "Aborted the rollout"),
    (Role.RELEASE_MANAGER, RolloutStatus.AWAITING_APPROVAL, "promote", RolloutStatus.PROMOTED, "Promoted the rollout"),
])
def test_pressing_a_button_changes_the_deployment_state(browser_as, unique_name, role, status, action, after,
                                                       message):
    d = rollout(unique_name, status)
    client = browser_as(role)
    resp = client.post(f"/deployments/{d.pk}/{action}/", follow=True)
    assert resp.redirect_chain == [(f"/deployments/{d.pk}/", 302)]
    d.refresh_from_db()
    assert d.status == after
    assert f"{message} of {unique_name} v2." in resp.content.decode()
    assert AuditEvent.objects.filter(target_type="deployment", target_id=str(d.pk), action=f"deployment.{after}",
                                     actor_name=client.user.username, via="web").exists()
    if action == "promote":
        assert Endpoint.objects.get(model=d.model).stable_version == d.version


@pytest.mark.parametrize(("role", "action"), [(Role.ONCALL, "promote"), (Role.DATA_SCIENTIST, "pause"),
                                              (Role.CI, "abort")])
def test_a_forbidden_button_press_gets_a_403_and_changes_nothing(browser_as, unique_name, role, action):
    d = rollout(unique_name, RolloutStatus.PROGRESSING)
    resp = browser_as(role).post(f"/deployments/{d.pk}/{action}/")
    assert resp.status_code == 403
    d.refresh_from_db()
    assert d.status == RolloutStatus.PROGRESSING


def test_a_press_the_state_no_longer_allows_shows_the_reason_as_a_message(browser_as, unique_name):
    d = rollout(unique_name, RolloutStatus.ROLLED_BACK)  # e.g. rolled back by the analysis a moment ago
    resp = browser_as(Role.ONCALL).post(f"/deployments/{d.pk}/pause/", follow=True)
    html = resp.content.decode()
    assert 'class="flash flash-error"' in html
    assert f"Could not pause the rollout of {unique_name} v2: deployment {d.pk} is rolled_back" in html
    d.refresh_from_db()
    assert d.status == RolloutStatus.ROLLED_BACK


def test_an_unknown_action_is_a_404(browser_as, unique_name):
    d = rollout(unique_name)
    assert browser_as(Role.ADMIN).post(f"/deployments/{d.pk}/explode/").status_code == 404


# ---- starting a deployment ----------------------------------------------------------------------

def test_the_start_form_is_prefilled_from_the_version_page_link(browser_as, unique_name):
    servable(unique_name)
    client = browser_as(Role.RELEASE_MANAGER)
    version_page = client.get(f"/models/{unique_name}/versions/2/").content.decode()
    link = re.search(r'id="deploy-version" href="([^"]+)"', version_page)
    assert link is not None
    form = client.get(link.group(1).replace("&amp;", "&")).content.decode()
    assert f'name="model" value="{unique_name}"' in form
    assert 'name="version" value="2"' in form
    assert 'name="steps" value="10, 25, 50"' in form  # the platform's default steps


def test_deploy_links_are_offered_only_to_roles_that_may_start_one_and_only_on_ready_versions(browser_as,
                                                                                             unique_name):
    servable(unique_name, versions=1)
    ModelVersion.objects.create(model=RegisteredModel.objects.get(name=unique_name), version=2, source="x",
                                origin="test", status=VersionStatus.VALIDATING)
    manager = browser_as(Role.RELEASE_MANAGER).get(f"/models/{unique_name}/").content.decode()
    assert 'data-deploy="1"' in manager and 'data-deploy="2"' not in manager
    scientist = browser_as(Role.DATA_SCIENTIST)
    assert "data-deploy=" not in scientist.get(f"/models/{unique_name}/").content.decode()
    assert 'id="deploy-version"' not in scientist.get(f"/models/{unique_name}/versions/1/").content.decode()
    assert scientist.get("/deployments/new/").status_code == 403


def test_starting_a_deployment_from_the_form_creates_it_and_opens_its_page(browser_as, unique_name):
    servable(unique_name)
    client = browser_as(Role.RELEASE_MANAGER)
    resp = client.post("/deployments/new/", {
        "model": unique_name, "version": 2, "target": "cpu", "steps": "5, 20%, 60", "max_p99_ms": "120",
        "max_error_rate_pct": "0.5", "require_approval": "on"})
    d = Deployment.objects.get(model__name=unique_name)
    assert resp.status_code == 302 and resp["Location"] == f"/deployments/{d.pk}/"
    assert (d.version.version, d.status, d.steps, d.max_p99_ms, d.require_approval) == (
        2, RolloutStatus.PENDING, [5, 20, 60], 120.0, True)
    assert d.max_error_rate == pytest.approx(0.005)
    assert d.requested_by == client.user
    assert d.min_requests == 20  # left empty: the platform's default


def test_the_start_form_shows_why_the_service_refused(browser_as, unique_name):
    servable(unique_name, versions=1, status=VersionStatus.VALIDATING)
    resp = browser_as(Role.RELEASE_MANAGER).post("/deployments/new/", {
        "model": unique_name, "version": 1, "target": "cpu", "steps": "10, 50"})
    html = resp.content.decode()
    assert resp.status_code == 409
    assert "The deployment was not started." in html
    assert f"version 1 of {unique_name} is validating; only ready versions are deployed" in html
    assert not Deployment.objects.filter(model__name=unique_name).exists()


@pytest.mark.parametrize(("fields", "error"), [
    ({"steps": "10, ten"}, "“ten” is not a whole percent"),
    ({"steps": "50, 10"}, "steps: weights must increase"),
    ({"model": "no-such-model"}, "There is no model named “no-such-model”."),
])
def test_the_start_form_explains_bad_input(browser_as, unique_name, fields, error):
    servable(unique_name)
    data = {"model": unique_name, "version": 2, "target": "cpu", "steps": "10", **fields}
    resp = browser_as(Role.ADMIN).post("/deployments/new/", data)
    assert resp.status_code >= 400
    assert error in resp.content.decode()
    assert not Deployment.objects.filter(model__name=unique_name).exists()
