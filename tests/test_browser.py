"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright against the whole
platform served on a loopback port (Django, whitenoise static files and the MLflow mount)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from registry.models import ModelVersion, VersionStatus
from registry.roles import Role
from registry.services import version_transition

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "browser-test-password-1"

pytestmark = pytest.mark.browser


def test_a_data_scientist_uploads_a_model_and_watches_it_become_ready(platform_server, browser_page, make_user,
                                                                      model_archive, unique_name):
    page = browser_page
    user = make_user(Role.DATA_SCIENTIST, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)

    # Signing in: any page sends an anonymous visitor to the login form first.
    page.goto(f"{platform_server}/register/")
    assert "/login/" in page.url
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{platform_server}/register/")

    # The vendored assets loaded from this site: htmx is defined and the stylesheet applied.
    assert page.evaluate("typeof htmx") == "object"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(245, 246, 250)"
    assert page.locator(".nav-links").inner_text().split() == ["Models", "Deployments", "Approvals", "Alerts",
                                                                        "Receivers", "Targets", "Register", "Tokens",
                                                                        "API"]

    # Register: upload the archive for a new model name.
    page.fill("#id_name", unique_name)
    page.set_input_files("#id_archive", str(model_archive))
    page.fill("#id_description", "digits, logistic regression")
    page.click("#register-form button[type=submit]")
    page.wait_for_url(re.compile(rf"/models/{re.escape(unique_name)}/versions/1/$"))

    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert page.locator("h1").inner_text() == f"{unique_name} version 1"
    assert f"Registered {unique_name} version 1" in page.locator(".messages").inner_text()
    lineage = page.locator("#lineage").inner_text()
    assert "Uploaded archive" in lineage
    assert version.run_id and version.run_id in lineage
    assert version.storage_location in lineage
    assert user.username in lineage
    assert "tensor (float64)" in page.locator("#signature").inner_text()
    assert "sklearn" in page.locator("#flavors").inner_text()
    assert page.locator("#version-status .badge-validating").is_visible()

    # No worker runs here: the test decides the validation, and the page picks it up by itself.
    version_transition(version.pk, VersionStatus.READY, detail="loaded and predicted on its input example in isolation",
                       inspection={"ok": True, "flavor": "sklearn", "prediction_shape": [5]})
    page.locator("#version-status .badge-ready").wait_for(timeout=15_000)
    assert "Ready: loaded and predicted on its input example in isolation." in page.locator(
        "#version-status .status-text").inner_text()
    assert page.url.endswith(f"/models/{unique_name}/versions/1/")  # updated in place, not reloaded
    assert page.locator("#version-status[hx-trigger]").count() == 0  # and the poll stopped
    page.locator("#version-status summary").click()
    assert "prediction_shape" in page.locator("#version-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-version-page.png"), full_page=True)

    # The model list shows the model; typing in the search box filters live.
    page.click(".nav-links >> text=Models")
    page.wait_for_url(f"{platform_server}/")
    row = page.locator("#model-results tr", has=page.locator(f"a[href='/models/{unique_name}/']"))
    assert row.count() == 1
    assert "v1" in row.inner_text() and "ready" in row.inner_text()
    page.fill("#model-search", unique_name + "-nothing-like-this")
    page.locator("#model-results .empty").wait_for()
    page.fill("#model-search", unique_name)
    page.locator(f"#model-results a[href='/models/{unique_name}/']").wait_for()
    page.screenshot(path=str(ARTIFACTS / "ui-model-list.png"), full_page=True)

    # The model page: versions newest first, and its table refreshes while a version validates.
    page.click(f"#model-results a[href='/models/{unique_name}/']")
    page.wait_for_url(f"{platform_server}/models/{unique_name}/")
    assert page.locator("#version-rows tr").count() == 1
    assert page.locator("#version-rows .badge-ready").count() == 1

    # A second version still validating: the model page polls its table until that one is decided.
    second = ModelVersion.objects.create(model=version.model, version=2, origin=version.origin, source=version.source,
                                         storage_location=version.storage_location, run_id=version.run_id)
    page.reload()
    assert page.locator("#version-rows[hx-trigger]").count() == 1
    assert [page.locator("#version-rows tr").nth(i).get_attribute("data-version") for i in range(2)] == ["2", "1"]
    version_transition(second.pk, VersionStatus.INVALID, detail="could not load")
    page.locator("#version-rows tr[data-version='2'] .badge-invalid").wait_for(timeout=15_000)
    assert page.locator("#version-rows[hx-trigger]").count() == 0
    assert page.locator("#version-filters [data-status=invalid]").inner_text() == "invalid · 1"
    assert page.locator("#version-filters [data-status=validating]").inner_text() == "validating"
    page.screenshot(path=str(ARTIFACTS / "ui-model-page.png"), full_page=True)


def _sign_in(page, base: str, username: str) -> None:
    page.goto(f"{base}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def test_errors_tokens_and_the_audit_log_in_the_browser(platform_server, browser_page, make_user, tmp_path,
                                                        unique_name):
    page = browser_page
    user = make_user(Role.DATA_SCIENTIST, Role.RELEASE_MANAGER, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)
    _sign_in(page, platform_server, user.username)

    # A file that is no archive: the reason is shown on the form, which keeps what was typed.
    junk = tmp_path / "model.zip"
    junk.write_text("not a zip at all")
    page.goto(f"{platform_server}/register/")
    page.fill("#id_name", unique_name)
    page.set_input_files("#id_archive", str(junk))
    page.fill("#id_description", "should not be kept anywhere")
    page.click("#register-form button[type=submit]")
    page.locator(".alert-error").wait_for()
    assert "not a model archive" in page.locator(".alert-error").inner_text()
    assert page.input_value("#id_name") == unique_name
    page.screenshot(path=str(ARTIFACTS / "ui-register-error.png"), full_page=True)

    # A token: shown once, with a copy button.
    page.goto(f"{platform_server}/tokens/")
    page.fill("#id_name", "laptop")
    page.uncheck(f"input[name=roles][value={Role.RELEASE_MANAGER}]")
    page.click("#token-form button[type=submit]")
    raw = page.locator("#raw-token").inner_text()
    assert raw.startswith("mlp_")
    page.click("[data-copy-target='#raw-token']")
    page.locator("[data-copy-target='#raw-token']", has_text="Copied").wait_for()
    row = page.locator("#token-table tbody tr").first
    assert "laptop" in row.inner_text() and "data_scientist" in row.inner_text()
    assert "release_manager" not in row.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-tokens.png"), full_page=True)

    # Revoking asks first, then the token is listed as revoked.
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    page.locator("#token-table .badge-revoked").wait_for()
    assert page.locator("#raw-token").count() == 0

    # The audit log shows both token events with their before and after.
    page.click(".nav-links >> text=Audit log")
    page.wait_for_url(f"{platform_server}/audit/")
    actions = page.locator(".audit-table > tbody > tr > td:nth-child(3)").all_inner_texts()
    assert actions[:2] == ["token.revoke", "token.create"]
    page.screenshot(path=str(ARTIFACTS / "ui-audit.png"), full_page=True)


BUILD_STEPS = ["", "claimed", "fetch", "build", "package", "store", "done"]


def test_engine_builds_appear_and_follow_a_real_build_live(platform_server, browser_page, make_user, model_archive,
                                                           unique_name):
    from django.db import connection

    from pipelines.builder import engine_build_execute
    from pipelines.models import BuildStatus, EngineBuild
    from pipelines.services import build_transition
    from registry.audit import SYSTEM
    from registry.services import version_register_from_archive

    page = browser_page
    user = make_user(Role.DATA_SCIENTIST, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)
    version = version_register_from_archive(SYSTEM, unique_name, model_archive, description="digits")
    _sign_in(page, platform_server, user.username)
    page.goto(f"{platform_server}/models/{unique_name}/versions/1/")
    engines = page.locator("#engines")
    assert "Engines are built once the version is ready" in engines.inner_text()
    assert page.locator("#engines[hx-trigger]").count() == 1  # watching for the builds it will get
    page.evaluate("window.notReloaded = true")

    # Ready: the platform asks for the engines, and they show up without a reload.
    version_transition(version.pk, VersionStatus.READY, detail="loaded and predicted on its input example in isolation")
    fp32 = page.locator("#engines [data-variant='cpu-fp32-onnxruntime']")
    int8 = page.locator("#engines [data-variant='cpu-int8-onnxruntime']")
    fp32.locator(".badge-queued").wait_for(timeout=15_000)
    int8.locator(".badge-queued").wait_for()
    assert "Ready: loaded and predicted on its input example in isolation." in page.locator(
        "#version-status").inner_text()
    fp32.locator(".engine-log summary").click()  # opened by the reader: stays open while the section refreshes

    # One build, run here; the page follows its steps as the section refreshes itself.
    build = EngineBuild.objects.get(version=version, precision="fp32")
    outcome: list[str] = []

    def run() -> None:
        try:
            outcome.append(engine_build_execute(build.pk, "browser-test"))
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = (fp32.get_attribute("data-status") or "", fp32.get_attribute("data-step") or "")
        if not seen or seen[-1] != state:
            seen.append(state)
            if state == ("running", "build"):
                page.locator("#engines").screenshot(path=str(ARTIFACTS / "ui-engines-running.png"))
        if state[0] in ("succeeded", "rejected", "failed"):
            break
        page.wait_for_timeout(150)
    worker.join(60)
    assert outcome == [BuildStatus.SUCCEEDED], (outcome, seen)
    assert seen[-1] == ("succeeded", "done"), seen
    assert any(status == "running" for status, _ in seen), seen  # it was shown running ...
    steps = [BUILD_STEPS.index(step) for _, step in seen]
    assert steps == sorted(steps), seen  # ... its steps moving forward only
    assert page.evaluate("window.notReloaded") is True and page.url.endswith(f"/models/{unique_name}/versions/1/")

    # The finished build: the parity figures next to their thresholds, size, hash, where it is.
    build.refresh_from_db()
    rows = {row.get_attribute("data-metric"): " ".join(row.inner_text().split())
            for row in fp32.locator("tr.figure").all()}
    assert rows["label_agreement"] == "label agreement 1.000 ≥ 0.999 ✓"
    assert rows["max_probability_diff"].startswith("max probability diff ") and rows["max_probability_diff"].endswith(
        "≤ 1e-4 ✓")
    text = fp32.inner_text()
    assert "Parity gate (classification): passed ✓" in text
    assert build.io["triton_model_name"] in text and build.engine_uri in text and build.sha256[:12] in text
    assert fp32.locator("details.engine-log[open]").count() == 1  # still open after the refreshes
    assert "parity on 256 rows" in fp32.locator(".engine-log pre").inner_text()
    assert page.locator("#engines[hx-trigger]").count() == 1  # the int8 build is still queued

    # The last one fails: every build is decided, the refreshing stops, and a rebuild is offered.
    other = EngineBuild.objects.get(version=version, precision="int8")
    build_transition(other.pk, BuildStatus.FAILED, error="RuntimeError: the build worker ran out of memory")
    int8.locator(".badge-failed").wait_for(timeout=15_000)
    page.locator("#engines:not([hx-trigger])").wait_for()
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/engines/" in r.url else None)
    page.wait_for_timeout(2_500)
    assert polls == []
    assert "RuntimeError: the build worker ran out of memory" in int8.locator(".engine-error").inner_text()
    rebuild = page.locator("#engines button", has_text="Rebuild failed")
    assert rebuild.is_visible()
    page.locator("#engines").screenshot(path=str(ARTIFACTS / "ui-engines.png"))
    page.screenshot(path=str(ARTIFACTS / "ui-engines-page.png"), full_page=True)

    # Rebuilding queues the failed one again, and the page follows it once more.
    rebuild.click()
    page.wait_for_url(re.compile(r"/versions/1/#engines$"))
    assert "Queued 1 engine build" in page.locator(".messages").inner_text()
    int8.locator(".badge-queued").wait_for()
    assert page.locator("#engines[hx-trigger]").count() == 1
    other.refresh_from_db()
    assert other.status == BuildStatus.QUEUED and other.error == ""


def test_a_release_manager_follows_a_canary_on_its_charts_then_pauses_and_aborts_it(platform_server, browser_page,
                                                                                      make_user, unique_name):
    from datetime import timedelta

    from django.utils import timezone

    from deployer.models import AnalysisPoint, Deployment, Endpoint, RolloutStatus
    from deployer.services import deployment_transition
    from deployer.testing import servable_model

    page = browser_page
    user = make_user(Role.RELEASE_MANAGER, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)
    model = servable_model(unique_name, int8=False)
    versions = list(model.versions.order_by("version"))
    engines = [v.engine_builds.get() for v in versions]
    Endpoint.objects.create(model=model, stable_version=versions[0], stable_engine=engines[0],
                            stable_triton_model=f"{unique_name}_v1")
    d = Deployment.objects.create(
        model=model, version=versions[1], engine=engines[1], triton_model=f"{unique_name}_v2",
        previous_version=versions[0], steps=[10, 25, 50], step_index=1, weight=25, max_p99_ms=80.0,
        max_error_rate=0.02, status=RolloutStatus.PROGRESSING,
        analysis={"outcome": "pass", "reason": "52 canary requests, error rate 0.0%, p99 41.0 ms",
                  "canary_requests": 52, "canary_error_rate": 0.0, "canary_p99_ms": 41.0, "stable_requests": 160,
                  "stable_error_rate": 0.0, "stable_p99_ms": 35.0, "window_s": 10.0, "at": timezone.now().isoformat()})
    start = timezone.now() - timedelta(seconds=80)
    for i in range(40):
        AnalysisPoint.objects.create(
            deployment=d, at=start + timedelta(seconds=2 * i), weight=10 if i < 20 else 25, outcome="pass",
            canary_requests=20 + i, canary_error_rate=0.004 * (i % 5), canary_p99_ms=30.0 + (i % 7) * 3,
            stable_requests=150, stable_error_rate=0.002 * (i % 3), stable_p99_ms=28.0 + (i % 4) * 2)

    _sign_in(page, platform_server, user.username)
    page.click(".nav-links >> text=Deployments")
    page.wait_for_url(f"{platform_server}/deployments/")
    serving = page.locator(f"#endpoints tr[data-model='{unique_name}']")
    assert "v1" in serving.inner_text() and "25%" in serving.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-deployments.png"), full_page=True)
    page.click(f"#deployment-table tr[data-deployment='{d.pk}'] a.strong")
    page.wait_for_url(f"{platform_server}/deployments/{d.pk}/")

    # The three charts drew from the vendored uPlot: every window, the canary's line in its colour.
    charts = page.locator("#deployment-charts")
    page.locator("#deployment-charts[data-points='40']").wait_for()
    assert page.evaluate("typeof uPlot") == "function"
    for chart in ("chart-latency", "chart-errors", "chart-weight"):
        assert page.locator(f"#{chart} .uplot canvas").count() == 1, chart
    canary_pixels = page.evaluate("""() => {
        const canvas = document.querySelector('#chart-latency canvas');
        const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (Math.abs(px[i] - 217) < 30 && Math.abs(px[i + 1] - 119) < 30 && px[i + 2] < 60 && px[i + 3] > 200) n++;
        }
        return n;
    }""")
    assert canary_pixels > 100, canary_pixels
    legend = page.locator("#chart-latency .u-legend").inner_text()
    assert "stable v1" in legend and "canary v2" in legend and "limit" in legend
    assert "Healthy: 52 canary requests" in page.locator("#deployment-analysis").inner_text()

    # A new analysis window appears on the charts by itself.
    AnalysisPoint.objects.create(deployment=d, at=timezone.now(), weight=25, outcome="pass", canary_requests=60,
                                 canary_p99_ms=44.0, stable_requests=150, stable_p99_ms=30.0)
    page.locator("#deployment-charts[data-points='41']").wait_for(timeout=15_000)

    # The reconciler takes the next step: the state, the traffic bar and the history follow, no reload.
    page.evaluate("window.notReloaded = true")
    deployment_transition(d.pk, RolloutStatus.PROGRESSING, only_from={RolloutStatus.PROGRESSING}, step_index=2,
                          weight=50, step_started_at=timezone.now(), reason="step 2 passed: 61 canary requests")
    page.locator("#canary-weight", has_text="50%").wait_for(timeout=15_000)
    page.locator("#deployment-history tr[data-action='deployment.progressing']").wait_for(timeout=15_000)
    assert "step 2 passed: 61 canary requests" in page.locator("#deployment-history").inner_text()
    assert page.locator(".rollout-steps .step-current").inner_text().endswith("50%")
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#chart-latency .uplot canvas").count() == 1  # the charts were left in place
    page.screenshot(path=str(ARTIFACTS / "ui-deployment.png"), full_page=True)

    # Pause asks first, then the page shows the paused state; Resume replaces the Pause button.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#deployment-actions button[data-action='pause']")
    page.locator("#deployment-status .badge-paused").wait_for()
    assert "Paused the rollout" in page.locator(".messages").inner_text()
    assert page.locator("#deployment-actions button[data-action='resume']").is_visible()
    assert page.locator("#deployment-actions button[data-action='pause']").count() == 0

    # Dismissing the question sends nothing.
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#deployment-actions button[data-action='abort']")
    page.wait_for_timeout(500)
    d.refresh_from_db()
    assert d.status == RolloutStatus.PAUSED

    # Abort: rolled back, and the page and its charts stop refreshing.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#deployment-actions button[data-action='abort']")
    page.locator("#deployment-status .badge-rolled_back").wait_for()
    d.refresh_from_db()
    assert d.status == RolloutStatus.ROLLED_BACK and d.decided_by == user
    assert page.locator("#deployment-live[hx-trigger]").count() == 0
    page.locator("#deployment-charts[data-live='false']").wait_for()
    assert charts.get_attribute("data-points") == "41"
    history = page.locator("#deployment-history").inner_text()
    assert "Rolled back" in history and "Paused" in history and user.username in history
    page.screenshot(path=str(ARTIFACTS / "ui-deployment-rolled-back.png"), full_page=True)


def test_on_call_opens_a_firing_drift_alert_from_the_inbox_and_acknowledges_it(platform_server, browser_page,
                                                                                make_user, unique_name):
    import gzip

    from monitoring.alerts import alert_seen
    from monitoring.models import Alert, AlertKind, AlertStatus, DriftCheck, DriftReport
    from registry.models import RegisteredModel

    page = browser_page
    user = make_user(Role.ONCALL, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)
    model = RegisteredModel.objects.create(name=unique_name, latest_version=1, version_count=1)
    version = ModelVersion.objects.create(model=model, version=1, status="ready", source="x", origin="test")
    check = DriftCheck.objects.create(version=version, outcome="drift", dataset_drift=True, drifted_share=0.6,
                                      summary="drift: 3 of 5 columns drifted", columns=[])
    DriftReport.objects.create(drift_check=check, html_gz=gzip.compress(
        b"<!doctype html><html><body><h1 id='evidently'>Data drift report</h1></body></html>"))
    alert = alert_seen(version, AlertKind.DRIFT, f"{unique_name} v1: drift in its inputs",
                       "drift: 3 of 5 columns drifted (60%) in 300 rows against 300 reference rows", {
                           "drift_check": check.pk, "drifted_share": 0.6,
                           "drifted_columns": [{"column": "input_0", "method": "K-S p_value", "threshold": 0.05,
                                                "score": 1.2e-09}],
                           "report": f"/api/v1/models/{unique_name}/versions/1/drift/{check.pk}/report/"})
    from datetime import timedelta

    from django.utils import timezone

    from monitoring.models import SloSample

    now = timezone.now()
    for minutes_ago, requests, errors in ((30, 100, 0), (20, 700, 3), (10, 1300, 30), (1, 1900, 33)):
        SloSample.objects.create(version=version, source="gw", at=now - timedelta(minutes=minutes_ago),
                                 requests=requests, errors=errors, slow=requests // 100, latency_ms=250)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))

    _sign_in(page, platform_server, user.username)
    assert page.locator(".nav-links #firing-count").inner_text() == "1"
    page.click(".nav-links >> text=Alerts")
    page.wait_for_url(f"{platform_server}/alerts/")
    row = page.locator(f"#alert-table tr[data-alert='{alert.pk}']")
    assert row.get_attribute("data-status") == "firing" and unique_name in row.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-alerts.png"), full_page=True)
    row.locator("a.strong").click()
    page.wait_for_url(f"{platform_server}/alerts/{alert.pk}/")

    assert "input_0" in page.locator("#drifted-columns").inner_text()
    assert "1. Open the drift check" in page.locator("#alert-runbook").inner_text()
    page.frame_locator("#alert-report iframe").locator("#evidently").wait_for()  # framed, sandboxed, same site
    page.locator("#alert-status .badge-firing").wait_for()
    page.locator("#alert-charts[data-loaded='true']").wait_for()
    assert page.locator("#chart-errors").get_attribute("data-points") == "3"  # four samples: three intervals
    assert page.locator("#chart-drift").get_attribute("data-points") == "1"
    assert page.locator("#alert-charts canvas").count() >= 3

    page.click("#alert-actions button[data-action='acknowledge']")
    page.locator("#alert-status .badge-acknowledged").wait_for()
    assert f"Acknowledged alert {alert.pk}" in page.locator(".messages").inner_text()
    assert page.locator("#alert-owner").inner_text() == user.username
    assert page.locator("#alert-actions button[data-action='acknowledge']").count() == 0
    assert page.locator("#alert-history tr[data-action='alert.acknowledged']").count() == 1
    assert page.locator(".nav-links #firing-count").count() == 0  # nothing firing any more
    alert.refresh_from_db()
    assert alert.status == AlertStatus.ACKNOWLEDGED and alert.owner == user
    assert Alert.objects.filter(status=AlertStatus.FIRING).count() == 0
    page.screenshot(path=str(ARTIFACTS / "ui-alert.png"), full_page=True)

    # Air-gapped: every resource the pages loaded (the framed report included) came from this server.
    outside = [url for url in requested if not url.startswith(platform_server) and not url.startswith(("data:", "blob:",
                                                                                                        "about:"))]
    assert requested and not outside, outside


def test_on_call_rolls_a_champion_back_from_its_alert_page(platform_server, browser_page, make_user, unique_name):
    from deployer.models import Deployment, RolloutMode
    from deployer.testing import champion_after, servable_model
    from monitoring.alerts import alert_seen
    from monitoring.models import AlertKind

    page = browser_page
    user = make_user(Role.ONCALL, password=PASSWORD)
    model = servable_model(unique_name)
    champion_after(model, 1, 2)
    alert = alert_seen(model.versions.get(version=2), AlertKind.ERRORS, f"{unique_name} v2: error budget burning",
                       "errors burning the budget 20x over 1 h and 5 min", {})

    _sign_in(page, platform_server, user.username)
    page.goto(f"{platform_server}/alerts/{alert.pk}/")
    assert "Restore v1, the champion before v2" in page.locator("#alert-rollback").inner_text()
    page.fill("#alert-rollback input[name='reason']", "5xx since the v2 promotion")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#alert-rollback button[data-action='rollback']")
    page.wait_for_url(f"{platform_server}/deployments/*/")
    restore = Deployment.objects.get(model=model, mode=RolloutMode.RESTORE)
    assert page.url == f"{platform_server}/deployments/{restore.pk}/"
    assert f"Restoring v1 of {unique_name} as champion (deployment {restore.pk})" in page.locator(
        ".messages").inner_text()
    assert restore.analysis["restore"] == (f"alert {alert.pk} ({unique_name} v2: error budget burning): 5xx since "
                                           f"the v2 promotion (by {user.username})")
    page.goto(f"{platform_server}/alerts/{alert.pk}/")
    assert page.locator("#alert-history tr[data-action='alert.rollback']").count() == 1


def test_a_release_manager_opens_a_hil_run_from_the_version_page_and_reads_its_charts(platform_server, browser_page,
                                                                                       make_user, unique_name):
    from deployer.testing import servable_model
    from pipelines.testing import finished_hil_run

    page = browser_page
    user = make_user(Role.RELEASE_MANAGER, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)
    model = servable_model(unique_name, int8=False)
    champion, candidate = (model.versions.get(version=n).engine_builds.get() for n in (1, 2))
    run = finished_hil_run(candidate, champion, slower_pct=4)  # within the 10% allowed: passes, lines apart

    # The version page lists the engine's newest run on its profile; its link opens the run's page.
    _sign_in(page, platform_server, user.username)
    page.goto(f"{platform_server}/models/{unique_name}/versions/2/")
    link = page.locator(f"#build-{candidate.pk}-hil a[data-hil-run='{run.pk}']")
    assert "passed" in link.inner_text()
    page.locator("#engines").screenshot(path=str(ARTIFACTS / "ui-version-hil.png"))
    link.click()
    page.wait_for_url(f"{platform_server}/hil/{run.pk}/")

    # The verdict in words, then both charts drawn from the embedded evidence with the vendored uPlot: one line per
    # batch size and engine (p50 and p99 for latency), the champion's over the candidate's, and the p99 budget.
    assert page.locator("#hil-verdict").inner_text() == run.verdict
    assert run.verdict.startswith("Passed:")
    page.locator("#hil-charts[data-drawn='true']").wait_for()
    assert page.evaluate("typeof uPlot") == "function"
    for chart, series in (("chart-hil-latency", 2 * 2 * 2 + 1), ("chart-hil-throughput", 2 * 2)):
        figure = page.locator(f"#{chart}")
        assert figure.locator(".uplot canvas").count() == 1, chart
        assert figure.get_attribute("data-series") == str(series) and figure.get_attribute("data-points") == "4"
        legend = figure.locator(".u-legend").inner_text()
        assert "v2 (cpu-fp32-onnxruntime) · batch 32" in legend
        assert "champion v1 (cpu-fp32-onnxruntime) · batch 1" in legend
    assert "p99 budget" in page.locator("#chart-hil-latency .u-legend").inner_text()
    # The candidate's first batch size is drawn in its colour on the throughput chart (not an empty canvas).
    drawn = page.evaluate("""() => {
        const canvas = document.querySelector('#chart-hil-throughput canvas');
        const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
            const blue = Math.abs(px[i] - 31) < 30 && Math.abs(px[i + 1] - 95) < 30 && Math.abs(px[i + 2] - 191) < 30;
            if (blue && px[i + 3] > 200) n++;
        }
        return n;
    }""")
    assert drawn > 100, drawn
    assert page.locator("#hil-points tbody tr").count() == 8
    assert page.locator("#hil-checks [data-check='champion'][data-outcome='ok']").count() == 1
    page.screenshot(path=str(ARTIFACTS / "ui-hil-run.png"), full_page=True)

    # A run still waiting says why and follows itself; once a worker has finished it, the page loads the evidence.
    from django.utils import timezone

    from pipelines.models import HilRun

    waiting = HilRun.objects.create(build=candidate, profile=run.profile, wait_deadline=timezone.now())
    page.goto(f"{platform_server}/hil/{waiting.pk}/")
    assert page.locator("#hil-waiting").inner_text().startswith("Waiting: ")
    assert page.locator("#hil-live[hx-trigger]").count() == 1 and page.locator("#hil-charts").count() == 0
    HilRun.objects.filter(pk=waiting.pk).update(**{f: getattr(run, f) for f in (
        "status", "champion_build", "slo", "results", "checks", "verdict", "worker", "hardware", "log",
        "started_at", "finished_at")})
    page.locator("#hil-charts[data-drawn='true']").wait_for(timeout=15_000)
    assert page.locator("#hil-verdict").inner_text() == run.verdict
    assert page.locator("#hil-live[hx-trigger]").count() == 0
