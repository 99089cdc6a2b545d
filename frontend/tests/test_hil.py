"""HIL runs in the UI through Django's test client: the run page (verdict, checks, objectives, memory, the
points side by side with the champion, the charts' data), its live part while it waits or runs, each kept
engine's latest runs and the Run HIL button on the version page, and the HIL gate on the deployment form."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from html import unescape
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from deployer.models import Deployment
from deployer.testing import servable_model
from frontend.tests.test_pages import version_url
from pipelines.models import BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.testing import finished_hil_run
from registry.models import AuditEvent
from registry.roles import Role

pytestmark = pytest.mark.django_db

PROFILE = "cpu-x86-avx2"


def engines(name: str) -> tuple[EngineBuild, EngineBuild]:
    """(champion v1's engine, candidate v2's engine) of a new model whose versions are ready with a kept engine."""
    servable_model(name, int8=False)
    v1, v2 = (EngineBuild.objects.select_related("version__model").get(version__model__name=name, version__version=n)
              for n in (1, 2))
    return v1, v2


def hil_url(run: HilRun) -> str:
    return f"/hil/{run.pk}/"


def text_of(html: str, element_id: str) -> str:
    """The words of the element with `element_id` (up to its closing tag of the same name), tags dropped."""
    start = html.index(f'id="{element_id}"')
    tag = html[html.rindex("<", 0, start) + 1:start].split()[0]
    end = html.index(f"</{tag}>", start)
    words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[start:end].split(">", 1)[1])).strip()
    return re.sub(r" ([:;,.)])", r"\1", unescape(words))


def point_row(html: str, batch: int, concurrency: int) -> str:
    start = html.index(f'data-batch="{batch}" data-concurrency="{concurrency}"')
    return html[html.rindex("<tr", 0, start):html.index("</tr>", start)]


def chart_data(html: str) -> dict[str, Any]:
    found = re.search(r'<script id="hil-chart-data" type="application/json">(.*?)</script>', html, re.S)
    assert found is not None
    return json.loads(found.group(1))


# ---- the run page -------------------------------------------------------------------------------

def test_a_passed_run_shows_its_verdict_checks_objectives_memory_and_points_beside_the_champion(browser_as,
                                                                                                unique_name):
    champion, candidate = engines(unique_name)
    run = finished_hil_run(candidate, champion)
    assert run.status == HilStatus.PASSED
    resp = browser_as(Role.ONCALL).get(hil_url(run))
    assert resp.status_code == 200
    html = resp.content.decode()

    assert 'class="badge badge-passed"' in html
    assert text_of(html, "hil-verdict") == run.verdict and run.verdict.startswith("Passed: every point settled")
    status = text_of(html, "hil-status")
    for fact in (unique_name, "v2", "cpu-fp32-onnxruntime", PROFILE, "hil-3f9a2c@bench-07", "Xeon(R) Gold 6338",
                 "v1 cpu-fp32-onnxruntime"):
        assert fact in status, fact
    assert "CPUs during the measurement Triton on CPU 0, the load clients on CPU 1" in text_of(html, "hil-hardware")
    checks = dict(re.findall(r'data-check="(\w+)" data-outcome="(\w+)"', html))
    assert checks == {"stability": "ok", "errors": "ok", "accuracy": "ok", "slo_p99": "ok", "champion": "ok"}
    assert "within the 25 ms budget (version tag hil.p99_ms)" in text_of(html, "hil-checks")
    slo = text_of(html, "hil-slo")
    assert "p99 latency budget 25 ms version tag hil.p99_ms" in slo
    assert "Regression against the champion at most 10" in slo and "default" in slo
    assert "passed ✓: label agreement with the original model 1.0000 on 360 reference rows" in text_of(
        html, "hil-accuracy")
    memory = text_of(html, "hil-memory")
    assert "Triton with no model loaded 188.0" in memory
    assert "with v2 (cpu-fp32-onnxruntime) 231.0 43.0" in memory
    assert "with champion v1 (cpu-fp32-onnxruntime) 229.0 41.0" in memory

    # The table: every point of the sweep, the champion's figures beside it, the difference with its noise band.
    assert html.count('<tr class="point') == 8
    row = point_row(html, 32, 4)
    compared = next(r for r in run.results["comparison"] if (r["batch_size"], r["concurrency"]) == (32, 4))
    assert f"{compared['p99_pct']:+.1f}%" in row and f"± {compared['p99_band_pct']:.1f}%" in row
    assert "point-unstable" not in row and "diff-regressed" not in row and "stable" in row
    # The charts' data, embedded: both engines' points and the p99 budget; uPlot and the chart script loaded.
    data = chart_data(html)
    assert data["candidate"]["label"] == "v2 (cpu-fp32-onnxruntime)" and len(data["candidate"]["points"]) == 8
    assert data["champion"]["label"] == "champion v1 (cpu-fp32-onnxruntime)" and len(data["champion"]["points"]) == 8
    assert data["p99_budget_ms"] == 25.0 and data["min_throughput"] is None
    assert "vendor/uPlot.iife.min.js" in html and "frontend/hil-charts.js" in html
    assert "hx-trigger" not in html  # a finished run does not change
    assert "candidate: concurrency 1, batch 1: stable" in text_of(html, "hil-log")


def test_a_run_slower_than_the_champion_fails_and_its_regressed_points_are_marked(browser_as, unique_name):
    champion, candidate = engines(unique_name)
    run = finished_hil_run(candidate, champion, slower_pct=40)
    html = browser_as(Role.DATA_SCIENTIST).get(hil_url(run)).content.decode()
    assert run.status == HilStatus.FAILED and 'class="badge badge-failed"' in html
    verdict = text_of(html, "hil-verdict")
    assert verdict.startswith("Failed: regressed against champion v1 (cpu-fp32-onnxruntime) beyond the 10% allowed")
    assert 'class="verdict verdict-fail"' in html
    assert re.search(r'data-check="champion" data-outcome="fail"', html)
    row = point_row(html, 1, 1)
    assert "figure-fail" in row and "diff-regressed" in row and "+40.0%" in row and "✗" in row


def test_an_unstable_run_judges_only_what_settled_and_marks_the_point_that_never_did(browser_as, unique_name):
    champion, candidate = engines(unique_name)
    run = finished_hil_run(candidate, champion, unstable_at=(32, 8))
    html = browser_as(Role.RELEASE_MANAGER).get(hil_url(run)).content.decode()
    assert run.status == HilStatus.UNSTABLE and 'class="badge badge-unstable"' in html
    verdict = text_of(html, "hil-verdict")
    assert verdict.startswith("Unstable, not passed: v2 (cpu-fp32-onnxruntime) at batch 32, concurrency 8 did not "
                              "settle")
    assert "Judged and met: " in verdict  # what settled was judged
    unsettled = point_row(html, 32, 8)
    assert "point-unstable" in unsettled and ">unstable</span>" in unsettled
    assert "point-unstable" not in point_row(html, 32, 4)
    assert [p["status"] for p in chart_data(html)["candidate"]["points"]].count("unstable") == 1


def test_a_run_without_a_champion_shows_its_own_figures_only(browser_as, unique_name):
    _, candidate = engines(unique_name)
    run = finished_hil_run(candidate, slo={"min_throughput": {"value": 500.0, "source": "the model's HIL policy"}})
    html = browser_as(Role.ONCALL).get(hil_url(run)).content.decode()
    assert run.status == HilStatus.PASSED
    assert "Δ p99" not in html and "none measured beside it" in text_of(html, "hil-status")
    assert re.search(r'data-check="champion" data-outcome="skipped"', html)
    data = chart_data(html)
    assert data["champion"] is None and data["min_throughput"] == 500.0 and data["p99_budget_ms"] is None
    assert "Throughput at least 500 inferences/s the model's HIL policy" in text_of(html, "hil-slo")


def test_a_waiting_run_says_why_then_a_running_one_shows_its_log_and_the_page_reloads_once_it_ends(browser_as,
                                                                                                  unique_name):
    _, candidate = engines(unique_name)
    run = HilRun.objects.create(build=candidate, profile="cpu-arm64", wait_deadline=timezone.now() + timedelta(hours=1),
                                sweep={"concurrencies": [1, 2]})
    client = browser_as(Role.ONCALL)
    html = client.get(hil_url(run)).content.decode()
    live = f'hx-get="/hil/{run.pk}/live/" hx-trigger="every 2s" hx-swap="outerMorph"'
    assert live in html and 'class="badge badge-waiting"' in html
    waiting = text_of(html, "hil-waiting")
    assert waiting.startswith("Waiting: ") and "cpu-arm64" in waiting and "it times out at" in waiting
    assert "hil-charts" not in html and "hil-points" not in html and "uPlot" not in html

    HilRun.objects.filter(pk=run.pk).update(status=HilStatus.RUNNING, worker="hil-arm@pi", started_at=timezone.now(),
                                            log="fetching the engines\ncandidate: concurrency 1, batch 1\n")
    fragment = client.get(f"/hil/{run.pk}/live/", headers={"HX-Request": "true"})
    text = fragment.content.decode()
    assert fragment.status_code == 200 and text.lstrip().startswith('<div id="hil-live"') and "<html" not in text
    assert live in text and "Measuring on hil-arm@pi" in text
    assert "candidate: concurrency 1, batch 1" in text_of(text, "hil-log")

    HilRun.objects.filter(pk=run.pk).update(status=HilStatus.ERROR, finished_at=timezone.now(),
                                            verdict="Error: Triton did not load the engine")
    done = client.get(f"/hil/{run.pk}/live/", headers={"HX-Request": "true"})
    assert done.status_code == 204 and done["HX-Refresh"] == "true"
    page = client.get(hil_url(run)).content.decode()
    assert "hx-trigger" not in page and text_of(page, "hil-verdict") == "Error: Triton did not load the engine"
    assert "Nothing was judged" in text_of(page, "hil-checks")


def test_hil_pages_need_read_access(client, browser_as, unique_name):
    champion, candidate = engines(unique_name)
    run = finished_hil_run(candidate, champion)
    anonymous = client.get(hil_url(run))
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/?next=")
    polled = client.get(f"/hil/{run.pk}/live/", headers={"HX-Request": "true"})
    assert polled.status_code == 204 and "HX-Redirect" in polled
    assert browser_as().get(hil_url(run)).status_code == 403
    assert browser_as(Role.CI).get(f"/hil/{run.pk + 1000}/").status_code == 404


# ---- the version page ---------------------------------------------------------------------------

def test_each_kept_engine_shows_its_newest_run_on_each_profile_with_a_link(browser_as, unique_name):
    champion, candidate = engines(unique_name)
    old = finished_hil_run(candidate, champion, slower_pct=40)
    new = finished_hil_run(candidate, champion)
    arm = HilRun.objects.create(build=candidate, profile="cpu-arm64", wait_deadline=timezone.now() + timedelta(hours=1))
    html = browser_as(Role.ONCALL).get(version_url(unique_name, 2)).content.decode()
    hil = html[html.index(f'id="build-{candidate.pk}-hil"'):]
    hil = hil[:hil.index("</div>")]
    runs = re.findall(r'data-hil-run="(\d+)" data-profile="([\w-]+)" data-status="(\w+)"', hil)
    assert sorted(runs) == sorted([(str(new.pk), PROFILE, "passed"), (str(arm.pk), "cpu-arm64", "waiting")])
    assert f'href="/hil/{new.pk}/"' in hil and f'href="/hil/{old.pk}/"' not in hil
    # A run still waiting: the engines section follows it.
    assert 'hx-get="/models/' in html[html.index('id="engines"') - 200:html.index('id="engines"') + 300]
    v1 = browser_as(Role.ONCALL).get(version_url(unique_name, 1)).content.decode()
    assert "not measured yet" in v1 and "hx-trigger" not in v1


@pytest.mark.parametrize(("role", "shown"), [
    (Role.DATA_SCIENTIST, True), (Role.CI, True), (Role.ADMIN, True), (Role.ONCALL, False),
    (Role.RELEASE_MANAGER, False),
])
def test_the_run_hil_button_is_shown_only_to_roles_that_may_register(browser_as, unique_name, role, shown):
    _, candidate = engines(unique_name)
    html = browser_as(role).get(version_url(unique_name, 2)).content.decode()
    action = f'action="/models/{unique_name}/versions/2/engines/{candidate.pk}/hil/"'
    assert (action in html) is shown
    assert ("Run HIL</button>" in html) is shown


def test_the_button_asks_for_a_run_once_audited_and_asking_again_keeps_it(browser_as, unique_name, settings):
    settings.PLATFORM = {**settings.PLATFORM, "HIL_PROFILES": [PROFILE]}
    _, candidate = engines(unique_name)
    client = browser_as(Role.DATA_SCIENTIST)
    url = f"/models/{unique_name}/versions/2/engines/{candidate.pk}/hil/"
    resp = client.post(url)
    assert resp.status_code == 302 and resp["Location"] == f"{version_url(unique_name, 2)}#build-{candidate.pk}"
    [run] = HilRun.objects.filter(build=candidate)
    assert (run.status, run.profile, run.requested_by) == (HilStatus.WAITING, PROFILE, client.user)
    event = AuditEvent.objects.get(action="hil.request", target_id=str(run.pk))
    assert event.via == "web"
    page = client.get(resp["Location"]).content.decode()
    assert f"run {run.pk} on {PROFILE} waits for a worker of its profile" in page
    assert f'data-hil-run="{run.pk}"' in page and "badge-waiting" in page

    again = client.post(url, follow=True).content.decode()
    assert f"run {run.pk} on {PROFILE} is already waiting" in again
    assert HilRun.objects.filter(build=candidate).count() == 1


def test_asking_for_a_run_of_an_engine_that_was_not_kept_says_why(browser_as, unique_name):
    _, candidate = engines(unique_name)
    EngineBuild.objects.filter(pk=candidate.pk).update(status=BuildStatus.REJECTED)
    page = browser_as(Role.CI).post(f"/models/{unique_name}/versions/2/engines/{candidate.pk}/hil/", follow=True)
    assert "only kept engines are measured" in page.content.decode()
    assert not HilRun.objects.filter(build=candidate).exists()


def test_the_run_hil_button_needs_the_register_role_a_post_and_a_csrf_token(browser_as, make_user, unique_name):
    champion, candidate = engines(unique_name)
    url = f"/models/{unique_name}/versions/2/engines/{candidate.pk}/hil/"
    refused = browser_as(Role.RELEASE_MANAGER).post(url)
    assert refused.status_code == 403 and "Register models and versions" in refused.content.decode()
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user(Role.DATA_SCIENTIST))
    assert client.get(url).status_code == 405
    assert client.post(url).status_code == 403
    # An engine of another version is not this page's to measure.
    other = f"/models/{unique_name}/versions/2/engines/{champion.pk}/hil/"
    assert browser_as(Role.ADMIN).post(other).status_code == 404
    assert not HilRun.objects.filter(build__in=[champion, candidate]).exists()


# ---- the deployment form and page ---------------------------------------------------------------

@pytest.fixture
def gate_on(settings):
    """The HIL gate on, the fleet on a named profile (not this machine's best, which varies)."""
    settings.PLATFORM = {**settings.PLATFORM, "HIL_GATE": True, "FLEET_PROFILE": PROFILE}


FORM = {"version": 2, "target": "cpu", "steps": "10, 50"}


@pytest.mark.parametrize(("role", "offered"), [(Role.RELEASE_MANAGER, True), (Role.ADMIN, True), (Role.CI, False)])
def test_the_override_field_is_offered_only_to_those_who_may_deploy_without_a_passing_run(browser_as, role, offered):
    html = browser_as(role).get("/deployments/new/").content.decode()
    assert ('name="hil_override"' in html) is offered
    assert ("Deploy without a passing HIL run: reason" in html) is offered


def test_the_gate_refuses_on_the_form_and_a_release_manager_deploys_with_a_written_reason(browser_as, unique_name,
                                                                                         gate_on):
    engines(unique_name)
    client = browser_as(Role.RELEASE_MANAGER)
    refused = client.post("/deployments/new/", {"model": unique_name, **FORM})
    html = refused.content.decode()
    assert refused.status_code == 409
    assert "The deployment was not started." in html
    assert f"has no finished HIL run on {PROFILE}, the fleet's hardware" in unescape(html)
    hint = html[html.index('id="hil-refused"'):]
    assert f'href="/models/{unique_name}/versions/2/#engines"' in hint[:hint.index("</p>")]
    assert "give the reason to deploy without one below" in text_of(html, "hil-refused")

    short = client.post("/deployments/new/", {"model": unique_name, **FORM, "hil_override": "urgent"})
    assert short.status_code == 400 and "at least 10 characters" in short.content.decode()
    assert not Deployment.objects.filter(model__name=unique_name).exists()

    reason = "the arm workers are down; this fixes the outage of 2 March"
    resp = client.post("/deployments/new/", {"model": unique_name, **FORM, "hil_override": reason})
    d = Deployment.objects.get(model__name=unique_name)
    assert resp.status_code == 302 and d.hil_override == reason and d.hil_run is None
    assert AuditEvent.objects.get(action="deployment.create", target_id=str(d.pk)).after["hil"]["override"] == reason
    page = client.get(f"/deployments/{d.pk}/").content.decode()
    assert text_of(page, "deployment-hil") == f"deployed without a passing HIL run: {reason}"


def test_those_who_may_not_override_get_the_refusal_whatever_they_post(browser_as, unique_name, gate_on):
    engines(unique_name)
    resp = browser_as(Role.CI).post("/deployments/new/", {"model": unique_name, **FORM,
                                                          "hil_override": "a reason nobody asked this role for"})
    html = resp.content.decode()
    assert resp.status_code == 409 and "has no finished HIL run" in html
    assert "deploying without one needs a release manager" in text_of(html, "hil-refused")
    assert not Deployment.objects.filter(model__name=unique_name).exists()


def test_a_deployment_on_a_passing_run_links_to_its_evidence(browser_as, unique_name, gate_on):
    champion, candidate = engines(unique_name)
    run = finished_hil_run(candidate, champion, profile=PROFILE)
    client = browser_as(Role.RELEASE_MANAGER)
    resp = client.post("/deployments/new/", {"model": unique_name, **FORM})
    d = Deployment.objects.get(model__name=unique_name)
    assert resp.status_code == 302 and d.hil_run == run and d.hil_override == ""
    page = client.get(f"/deployments/{d.pk}/").content.decode()
    assert f'<a href="/hil/{run.pk}/">HIL run #{run.pk}</a> on {PROFILE}' in page
    assert text_of(page, "deployment-hil").endswith("passed")
