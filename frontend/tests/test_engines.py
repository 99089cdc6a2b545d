"""The version page's Engines section: each build with its state, step, parity figures against their
thresholds and its log; the live refresh while builds run; the button that asks for builds."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from frontend.tests.test_pages import make_model, version_url
from pipelines.models import BuildStatus, EngineBuild
from pipelines.services import planned_variants
from registry.models import AuditEvent, ModelVersion, VersionStatus
from registry.roles import Role

SHA = "3f2a9c" + "0" * 52 + "abcdef"
KEY = "9" * 64


def engines_url(name: str, number: int = 1) -> str:
    return reverse("frontend:version-engines", args=[name, number])


def build_url(name: str, number: int = 1) -> str:
    return reverse("frontend:version-engines-request", args=[name, number])


def add_build(version: ModelVersion, precision: str = "fp32", status: str = BuildStatus.QUEUED,
              **fields) -> EngineBuild:
    return EngineBuild.objects.create(version=version, target="cpu", precision=precision, runtime="onnxruntime",
                                      content_key=fields.pop("content_key", ""), status=status, **fields)


def succeeded_fields(version: ModelVersion, precision: str = "fp32") -> dict:
    name = f"{version.model.name}_v{version.version}_cpu-{precision}-onnxruntime"
    return {
        "step": "done", "attempts": 1, "content_key": KEY,
        "parity": {"kind": "classification", "passed": True, "failures": [],
                   "figures": {"label_agreement": 1.0, "max_probability_diff": 2.2e-07},
                   "thresholds": {"label_agreement": 0.999, "max_probability_diff": 1e-4}},
        "io": {"inputs": [{"name": "input", "elem_type": "FLOAT", "shape": [-1, 64]}],
               "outputs": [{"name": "label", "elem_type": "INT64", "shape": [-1]},
                           {"name": "probabilities", "elem_type": "FLOAT", "shape": [-1, 10]}],
               "triton_model_name": name},
        "toolchain": {"onnxruntime": "1.20.1", "opset": "17"},
        "size_bytes": 24_576, "sha256": SHA, "build_seconds": 3.21,
        "engine_uri": f"mlflow-artifacts:/engines/{KEY}",
        "log": "fetching mlflow-artifacts:/1/x/artifacts/model\nexported to ONNX\nparity on 256 rows: ok -> pass\n",
        "started_at": timezone.now(), "finished_at": timezone.now(),
    }


def section(body: str) -> str:
    start = body.index('id="engines"')
    return body[body.rindex("<section", 0, start):body.index("</section>", start)]


def card(body: str, build: EngineBuild) -> str:
    start = body.index(f'id="build-{build.pk}"')
    return body[body.rindex("<article", 0, start):body.index("</article>", start)]


def figure_row(html: str, metric: str) -> str:
    start = html.index(f'data-metric="{metric}"')
    row = html[html.rindex("<tr", 0, start):html.index("</tr>", start)]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip() + (" FAIL" if "figure-fail" in row else "")


@pytest.fixture
def ready(unique_name):
    make_model(unique_name, versions=1)
    return ModelVersion.objects.get(model__name=unique_name, version=1)


# ---- what is shown ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_each_build_shows_variant_state_figures_against_thresholds_and_where_the_engine_is(browser_as, ready):
    good = add_build(ready, "fp32", BuildStatus.SUCCEEDED, **succeeded_fields(ready))
    missed = add_build(ready, "int8", BuildStatus.REJECTED, **{
        **succeeded_fields(ready, "int8"),
        "parity": {"kind": "classification", "passed": False, "failures": ["label_agreement 0.9500 < 0.97"],
                   "figures": {"label_agreement": 0.95, "max_probability_diff": 0.031},
                   "thresholds": {"label_agreement": 0.97, "max_probability_diff": 0.05}},
        "error": "missed the parity gate: label_agreement 0.9500 < 0.97",
    })
    body = browser_as(Role.ONCALL).get(version_url(ready.model.name, 1)).content.decode()
    engines = section(body)

    shown = card(engines, good)
    assert 'data-variant="cpu-fp32-onnxruntime"' in shown
    assert re.search(r"cpu <span class=\"sep\">/</span> fp32 <span class=\"sep\">/</span> onnxruntime", shown)
    assert 'class="badge badge-succeeded"' in shown
    assert "passed ✓" in shown
    assert figure_row(shown, "label_agreement") == "label agreement 1.000 ≥ 0.999 ✓"
    assert figure_row(shown, "max_probability_diff") == "max probability diff 2.2e-7 ≤ 1e-4 ✓"
    assert "24.0\xa0KB" in shown  # engine size
    assert "3.2 s" in shown  # build time
    assert f'<code title="{SHA}">{SHA[:12]}…</code>' in shown
    assert f"mlflow-artifacts:/engines/{KEY}" in shown
    assert f"{ready.model.name}_v1_cpu-fp32-onnxruntime" in shown  # the Triton model name
    assert "input float (?, 64)" in shown and "probabilities float (?, 10)" in shown
    assert "onnxruntime 1.20.1 · opset 17" in shown
    assert '<details class="engine-log"' in shown and "parity on 256 rows: ok -&gt; pass" in shown
    assert "(3 lines)" in shown
    assert "engine-error" not in shown

    rejected = card(engines, missed)
    assert 'class="badge badge-rejected"' in rejected
    assert "missed ✗" in rejected
    assert figure_row(rejected, "label_agreement") == "label agreement 0.950 ≥ 0.97 ✗ FAIL"  # highlighted
    assert figure_row(rejected, "max_probability_diff") == "max probability diff 0.031 ≤ 0.05 ✓"
    assert '<pre class="engine-error">missed the parity gate: label_agreement 0.9500 &lt; 0.97</pre>' in rejected
    assert engines.index(f'id="build-{good.pk}"') < engines.index(f'id="build-{missed.pk}"')


@pytest.mark.django_db
def test_running_failed_and_reused_builds_show_their_step_error_and_origin(browser_as, ready, unique_name):
    running = add_build(ready, "fp32", BuildStatus.RUNNING, step="package", attempts=2, started_at=timezone.now(),
                        log="fetching\nbuilding cpu-fp32-onnxruntime in an isolated process\n")
    failed = add_build(ready, "int8", BuildStatus.FAILED, step="build", attempts=1, finished_at=timezone.now(),
                       error="ValueError: the version has no input example to check parity on")
    other = ModelVersion.objects.get(model=make_model(unique_name + "-other", versions=1))
    source = add_build(other, "fp32", BuildStatus.SUCCEEDED, **succeeded_fields(other))
    reused = add_build(other, "int8", BuildStatus.SUCCEEDED, **{**succeeded_fields(other), "reused_from": source,
                                                                 "build_seconds": 0.0, "step": "done"})
    client = browser_as(Role.DATA_SCIENTIST)
    body = client.get(version_url(unique_name, 1)).content.decode()

    shown = card(body, running)
    assert 'class="badge badge-running"' in shown and "spinner" in shown
    assert re.findall(r'class="step step-(\w+)"[^>]*>(\w+)<', shown) == [
        ("done", "claimed"), ("done", "fetch"), ("done", "build"), ("current", "package"), ("pending", "store"),
        ("pending", "done")]
    assert "attempt 2" in shown
    assert "Parity figures appear when the engine is built" in shown
    assert "building cpu-fp32-onnxruntime in an isolated process" in shown  # the log so far

    broken = card(body, failed)
    assert 'class="badge badge-failed"' in broken
    assert 'class="step step-failed">build<' in broken
    assert "ValueError: the version has no input example to check parity on" in broken

    page = client.get(version_url(other.model.name, 1)).content.decode()
    copied = card(page, reused)
    assert f"build #{source.pk}" in copied
    assert f'href="{version_url(other.model.name, 1)}#build-{source.pk}"' in copied
    assert "none (reused)" in copied
    assert re.findall(r'class="step step-(\w+)"[^>]*>(\w+)<', copied) == [
        ("done", "claimed"), ("done", "fetch"), ("done", "reuse"), ("done", "done")]


@pytest.mark.django_db
def test_a_regression_gate_shows_its_relative_thresholds_in_absolute_terms(browser_as, ready):
    build = add_build(ready, "fp32", BuildStatus.REJECTED, **{
        **succeeded_fields(ready),
        "parity": {"kind": "regression", "passed": False,
                   "failures": ["mean_abs_error 0.005 > 0.0012 (1e-05 x mean |reference|)"],
                   "figures": {"max_abs_error": 0.01, "mean_abs_error": 0.005, "reference_scale": 120.0},
                   "thresholds": {"max_abs_error": 1e-4, "mean_abs_error": 1e-5}},
    })
    shown = card(browser_as(Role.DATA_SCIENTIST).get(version_url(ready.model.name, 1)).content.decode(), build)
    assert figure_row(shown, "max_abs_error") == "max abs error 0.01 ≤ 0.012 1e-4 × mean |reference| ✓"
    assert figure_row(shown, "mean_abs_error").endswith("✗ FAIL")
    assert figure_row(shown, "reference_scale") == "mean |reference| 120 —"


@pytest.mark.django_db
@pytest.mark.parametrize(("detail", "absent"), [
    ("loaded and predicted on its input example in isolation", "no input example"),
    ("loaded in isolation (no input example to predict on)", "predicted"),
])
def test_a_ready_version_shows_what_its_inspection_actually_did(browser_as, ready, detail, absent):
    ModelVersion.objects.filter(pk=ready.pk).update(status_detail=detail)
    body = browser_as(Role.DATA_SCIENTIST).get(version_url(ready.model.name, 1)).content.decode()
    status = body[body.index('id="version-status"'):body.index("</section>", body.index('id="version-status"'))]
    text = re.sub(r"\s+", " ", status)
    assert f"Ready: {detail}." in text
    assert absent not in text


# ---- live refresh -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_section_polls_while_a_build_is_queued_or_running_and_stops_when_all_are_done(browser_as, ready):
    client = browser_as(Role.ONCALL)
    name = ready.model.name
    fp32 = add_build(ready, "fp32", BuildStatus.SUCCEEDED, **succeeded_fields(ready))
    int8 = add_build(ready, "int8", BuildStatus.QUEUED)
    poll = f'hx-get="{engines_url(name)}" hx-trigger="every 2s" hx-swap="outerMorph"'

    assert poll in client.get(version_url(name, 1)).content.decode()
    EngineBuild.objects.filter(pk=int8.pk).update(status=BuildStatus.RUNNING, step="build")
    fragment = client.get(engines_url(name), headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    text = fragment.content.decode()
    assert text.lstrip().startswith('<section class="card engines" id="engines"')
    assert "<html" not in text
    assert poll in text
    assert 'class="step step-current" aria-current="step">build<' in text

    EngineBuild.objects.filter(pk=int8.pk).update(status=BuildStatus.FAILED, step="build", error="boom")
    done = client.get(engines_url(name), headers={"HX-Request": "true"}).content.decode()
    assert "hx-trigger" not in done and "data-polling" not in done  # the morphed-in section stops the poll
    assert done.count("badge-failed") == 1 and done.count("badge-succeeded") == 1
    assert "hx-trigger" not in client.get(version_url(name, 1)).content.decode()
    assert fp32.pk  # kept for the count above


@pytest.mark.django_db
def test_a_validating_version_polls_for_the_builds_it_will_get(browser_as, unique_name):
    make_model(unique_name, versions=1, status=VersionStatus.VALIDATING)
    body = browser_as(Role.DATA_SCIENTIST).get(version_url(unique_name, 1)).content.decode()
    engines = section(body)
    assert f'hx-get="{engines_url(unique_name)}"' in engines
    assert "Engines are built once the version is ready" in engines
    assert "Build engines" not in engines  # nothing to ask for yet


@pytest.mark.django_db
def test_the_engines_poll_needs_read_access(client, browser_as, ready):
    assert browser_as().get(engines_url(ready.model.name)).status_code == 403
    anonymous = client.get(engines_url(ready.model.name), headers={"HX-Request": "true"})
    assert anonymous.status_code == 204 and "HX-Redirect" in anonymous
    assert browser_as(Role.ONCALL).get(engines_url(ready.model.name, 9)).status_code == 404


# ---- asking for builds --------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize(("role", "shown"), [
    (Role.DATA_SCIENTIST, True), (Role.CI, True), (Role.ADMIN, True),
    (Role.ONCALL, False), (Role.RELEASE_MANAGER, False),
])
def test_the_build_button_is_shown_only_to_roles_that_may_register(browser_as, ready, role, shown):
    engines = section(browser_as(role).get(version_url(ready.model.name, 1)).content.decode())
    assert (f'action="{build_url(ready.model.name)}"' in engines) is shown
    assert ("Build engines</button>" in engines) is shown
    assert "No engines have been asked for yet." in engines


@pytest.mark.django_db
def test_the_button_queues_the_builds_once_and_asking_again_changes_nothing(browser_as, ready):
    client = browser_as(Role.DATA_SCIENTIST)
    name = ready.model.name
    page = client.get(version_url(name, 1)).content.decode()
    assert 'name="csrfmiddlewaretoken"' in section(page)

    resp = client.post(build_url(name))
    assert resp.status_code == 302
    assert resp["Location"] == f"{version_url(name, 1)}#engines"
    builds = list(EngineBuild.objects.filter(version=ready))
    assert sorted((b.target, b.precision, b.runtime) for b in builds) == sorted(planned_variants())
    assert all(b.status == BuildStatus.QUEUED for b in builds)
    events = AuditEvent.objects.filter(action="build.request", target_id__in=[str(b.pk) for b in builds])
    assert events.count() == len(builds) and {e.via for e in events} == {"web"}

    after = client.get(resp["Location"]).content.decode()
    assert f"Queued {len(builds)} engine builds for {name} version 1" in after
    assert after.count('class="badge badge-queued"') == len(builds)
    assert "hx-trigger" in section(after)  # and the section now follows them
    assert f'action="{build_url(name)}"' not in section(after)  # nothing left to ask for

    again = client.post(build_url(name), follow=True)
    assert "Nothing to build" in again.content.decode()
    assert EngineBuild.objects.filter(version=ready).count() == len(builds)
    assert sorted(b.pk for b in EngineBuild.objects.filter(version=ready)) == sorted(b.pk for b in builds)


@pytest.mark.django_db
def test_rebuild_failed_queues_the_failed_build_again(browser_as, ready):
    ok = add_build(ready, "fp32", BuildStatus.SUCCEEDED, **succeeded_fields(ready))
    failed = add_build(ready, "int8", BuildStatus.FAILED, step="build", error="RuntimeError: out of memory")
    client = browser_as(Role.CI)
    assert "Rebuild failed</button>" in section(client.get(version_url(ready.model.name, 1)).content.decode())

    assert client.post(build_url(ready.model.name)).status_code == 302
    failed.refresh_from_db()
    ok.refresh_from_db()
    assert failed.status == BuildStatus.QUEUED and failed.error == "" and failed.step == ""
    assert ok.status == BuildStatus.SUCCEEDED
    page = client.get(version_url(ready.model.name, 1)).content.decode()
    assert "Queued 1 engine build for" in page and "cpu-int8-onnxruntime" in page


@pytest.mark.django_db
def test_asking_for_engines_of_a_version_that_is_not_ready_says_why(browser_as, unique_name):
    make_model(unique_name, versions=1, status=VersionStatus.VALIDATING)
    resp = browser_as(Role.DATA_SCIENTIST).post(build_url(unique_name))
    assert resp.status_code == 409
    engines = section(resp.content.decode())
    assert "No engines were queued." in engines
    assert "is validating; engines are built for ready versions" in engines
    assert 'role="alert"' in engines
    assert not EngineBuild.objects.filter(version__model__name=unique_name).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.ONCALL, Role.RELEASE_MANAGER])
def test_a_role_that_may_not_register_gets_a_403_and_nothing_is_built(browser_as, ready, role):
    resp = browser_as(role).post(build_url(ready.model.name))
    assert resp.status_code == 403
    assert "Register models and versions" in resp.content.decode()
    assert not EngineBuild.objects.filter(version=ready).exists()


@pytest.mark.django_db
def test_the_build_button_needs_a_post_and_a_csrf_token(make_user, ready):
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user(Role.DATA_SCIENTIST))
    assert client.get(build_url(ready.model.name)).status_code == 405
    assert client.post(build_url(ready.model.name)).status_code == 403
    assert not EngineBuild.objects.filter(version=ready).exists()


# ---- one real build -----------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_real_build_is_shown_with_the_figures_the_parity_gate_measured(browser_as, model_archive, unique_name):
    from pipelines.builder import engine_build_execute
    from registry.audit import SYSTEM
    from registry.services import version_register_from_archive, version_transition

    version = version_register_from_archive(SYSTEM, unique_name, model_archive)
    version = version_transition(version.pk, VersionStatus.READY, detail="granted by the test")
    fp32 = EngineBuild.objects.get(version=version, precision="fp32")  # asked for when it became ready
    assert engine_build_execute(fp32.pk, "ui-test") == BuildStatus.SUCCEEDED
    fp32.refresh_from_db()

    body = browser_as(Role.ONCALL).get(version_url(unique_name, 1)).content.decode()
    shown = card(section(body), fp32)
    assert 'class="badge badge-succeeded"' in shown and "passed ✓" in shown
    assert figure_row(shown, "label_agreement") == "label agreement 1.000 ≥ 0.999 ✓"
    assert figure_row(shown, "max_probability_diff").startswith("max probability diff ")
    assert figure_row(shown, "max_probability_diff").endswith("≤ 1e-4 ✓")
    assert fp32.io["triton_model_name"] in shown and fp32.engine_uri in shown and fp32.sha256[:12] in shown
    assert "parity on 256 rows" in shown
    assert "hx-trigger" in section(body)  # the int8 build is still queued
