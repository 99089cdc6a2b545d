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

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "browser-test-password-1"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (run `make browser` as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if "/static/" in r.url and r.status >= 400
                else None)
        try:
            yield page
        finally:
            context.close()
            browser.close()
        assert not errors, errors


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
    assert page.locator(".nav-links").inner_text().split() == ["Models", "Register", "Tokens", "API"]

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
