"""The web UI through Django's test client: who may open what, what each page shows, and what its
forms change."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from registry.audit import SYSTEM, Actor
from registry.models import ApiToken, AuditEvent, ModelVersion, RegisteredModel, VersionOrigin, VersionStatus
from registry.roles import Role
from registry.services import version_transition
from registry.tokens import token_authenticate, token_create

PASSWORD = "correct-horse-battery-staple"


def make_model(name: str, versions: int = 0, status: str = VersionStatus.READY, **fields) -> RegisteredModel:
    """Rows only (no MLflow): enough for pages that read the platform's tables."""
    model = RegisteredModel.objects.create(name=name, latest_version=versions, version_count=versions, **fields)
    for number in range(1, versions + 1):
        ModelVersion.objects.create(
            model=model, version=number, status=status, origin=VersionOrigin.UPLOAD,
            source=f"mlflow-artifacts:/1/run{number}/artifacts/model",
            storage_location=f"mlflow-artifacts:/1/run{number}/artifacts/model",
            run_id=f"{number:032x}", params={"C": "1.0", "max_iter": "200"}, metrics={"accuracy": 0.93},
            flavors={"python_function": {"loader_module": "mlflow.sklearn"}, "sklearn": {"sklearn_version": "1.5"}},
            signature={"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 64]}}],
                       "outputs": [{"type": "long", "name": "digit", "required": True}]},
            input_example={"inputs": [[0.0, 1.5, 2.25]]},
            inspection={"ok": True, "prediction_shape": [1]} if status == VersionStatus.READY else {},
        )
    return model


def version_url(name: str, number: int) -> str:
    return reverse("frontend:version-detail", args=[name, number])


# ---- who may open what --------------------------------------------------------------------------

PAGES = ["/", "/models/some-model/", "/models/some-model/versions/1/", "/register/", "/tokens/", "/audit/",
         "/targets/"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", PAGES)
def test_anonymous_people_are_sent_to_the_login_page(client, path):
    resp = client.get(path)
    assert resp.status_code == 302
    assert resp["Location"] == f"{reverse('frontend:login')}?next={path}"


@pytest.mark.django_db
def test_an_htmx_poll_without_a_session_redirects_the_whole_page_to_login(client):
    resp = client.get("/models/m/versions/1/status/", headers={"HX-Request": "true",
                                                               "HX-Current-URL": "http://testserver/models/m/"})
    assert resp.status_code == 204
    assert resp["HX-Redirect"].startswith(reverse("frontend:login") + "?next=")
    assert "models/m/" in resp["HX-Redirect"]


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "path"), [
    (Role.RELEASE_MANAGER, "/register/"),
    (Role.ONCALL, "/register/"),
    (Role.DATA_SCIENTIST, "/audit/"),
    (Role.CI, "/audit/"),
])
def test_a_role_without_the_capability_gets_a_403_page_naming_what_is_missing(browser_as, role, path):
    resp = browser_as(role).get(path)
    assert resp.status_code == 403
    assert "You can’t open this page" in resp.content.decode()
    assert role in resp.content.decode()  # tells people which roles they have


@pytest.mark.django_db
def test_a_person_without_any_role_cannot_read_models(browser_as):
    client = browser_as()
    assert client.get("/").status_code == 403
    assert client.get("/tokens/").status_code == 403


@pytest.mark.django_db
def test_a_403_on_post_registers_nothing(browser_as, unique_name):
    resp = browser_as(Role.RELEASE_MANAGER).post("/register/", {"name": unique_name, "source": "models:/x/1"})
    assert resp.status_code == 403
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


@pytest.mark.django_db
def test_the_nav_shows_only_links_the_person_may_use(browser_as):
    scientist = browser_as(Role.DATA_SCIENTIST).get("/").content.decode()
    assert 'href="/deployments/"' in scientist  # everyone may watch rollouts
    assert 'href="/register/"' in scientist
    assert 'href="/audit/"' not in scientist
    assert "data_scientist" in scientist

    manager = browser_as(Role.RELEASE_MANAGER).get("/").content.decode()
    assert 'href="/register/"' not in manager
    assert 'href="/audit/"' in manager
    assert "release_manager" in manager


# ---- login --------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_signing_in_with_a_password_lands_on_the_model_list(client, make_user):
    user = make_user(Role.DATA_SCIENTIST, password=PASSWORD)
    page = client.get("/login/")
    assert page.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in page.content.decode()
    resp = client.post("/login/", {"username": user.username, "password": PASSWORD})
    assert resp.status_code == 302
    assert resp["Location"] == "/"
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_a_wrong_password_shows_an_error_and_keeps_the_username(client, make_user):
    user = make_user(Role.DATA_SCIENTIST, password=PASSWORD)
    resp = client.post("/login/", {"username": user.username, "password": "wrong-password-here"})
    assert resp.status_code == 200
    body = resp.content.decode()
    assert "alert-error" in body
    assert f'value="{user.username}"' in body


@pytest.mark.django_db
def test_signing_out_needs_a_post_and_ends_the_session(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    resp = client.post("/logout/")
    assert resp.status_code == 302
    assert resp["Location"] == reverse("frontend:login")
    assert client.get("/").status_code == 302


# ---- model list ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_an_empty_registry_invites_people_to_register_a_model(browser_as):
    RegisteredModel.objects.all().delete()
    body = browser_as(Role.DATA_SCIENTIST).get("/").content.decode()
    assert "No models yet — register one" in body
    assert 'href="/register/"' in body


@pytest.mark.django_db
def test_the_model_list_shows_latest_version_count_and_status(browser_as, unique_name):
    make_model(unique_name, versions=3, description="Reads handwritten digits")
    ModelVersion.objects.filter(model__name=unique_name, version=3).update(status=VersionStatus.VALIDATING)
    body = browser_as(Role.ONCALL).get("/", {"q": unique_name}).content.decode()
    row = body[body.index(f'href="/models/{unique_name}/"'):]
    row = row[:row.index("</tr>")]
    assert "Reads handwritten digits" in row
    assert f'href="{version_url(unique_name, 3)}">v3</a>' in row
    assert "badge-validating" in row
    assert '<td class="num">3</td>' in row


@pytest.mark.django_db
def test_searching_filters_by_name_and_description(browser_as, unique_name):
    make_model(unique_name + "-alpha")
    make_model(unique_name + "-beta", description="uses the zebra dataset")
    client = browser_as(Role.DATA_SCIENTIST)
    by_name = client.get("/", {"q": unique_name + "-alpha"}).content.decode()
    assert unique_name + "-alpha" in by_name
    assert unique_name + "-beta" not in by_name
    by_description = client.get("/", {"q": "zebra dataset"}).content.decode()
    assert unique_name + "-beta" in by_description
    nothing = client.get("/", {"q": unique_name + "-nothing"}).content.decode()
    assert "No models match" in nothing


@pytest.mark.django_db
def test_the_model_list_is_paginated(browser_as, unique_name):
    for i in range(30):
        make_model(f"{unique_name}-{i:02d}")
    client = browser_as(Role.DATA_SCIENTIST)
    first = client.get("/", {"q": unique_name}).content.decode()
    second = client.get("/", {"q": unique_name, "page": 2}).content.decode()
    assert first.count(f'href="/models/{unique_name}-') == 25
    assert second.count(f'href="/models/{unique_name}-') == 5
    assert "Page 1 of 2" in first
    assert f"?q={unique_name}&amp;page=2" in first  # the next link keeps the search
    assert f"{unique_name}-29" in second


# ---- model page ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_model_page_lists_versions_newest_first_with_badges(browser_as, unique_name):
    make_model(unique_name, versions=3, description="digits", tags={"team": "vision"})
    ModelVersion.objects.filter(model__name=unique_name, version=2).update(status=VersionStatus.INVALID)
    body = browser_as(Role.DATA_SCIENTIST).get(f"/models/{unique_name}/").content.decode()
    assert [int(n) for n in re.findall(r'<tr data-version="(\d+)">', body)] == [3, 2, 1]
    assert "badge-invalid" in body and "badge-ready" in body
    assert "team: vision" in body
    assert "digits" in body


@pytest.mark.django_db
def test_the_versions_table_polls_only_while_a_shown_version_is_validating(browser_as, unique_name):
    make_model(unique_name, versions=2, status=VersionStatus.VALIDATING)
    client = browser_as(Role.DATA_SCIENTIST)
    body = client.get(f"/models/{unique_name}/").content.decode()
    assert 'hx-trigger="every 2s"' in body
    assert f'hx-get="/models/{unique_name}/versions-table/?page=1"' in body

    ModelVersion.objects.filter(model__name=unique_name).update(status=VersionStatus.READY)
    rows = client.get(f"/models/{unique_name}/versions-table/", {"page": 1}, headers={"HX-Request": "true"})
    assert rows.status_code == 200
    fragment = rows.content.decode()
    assert fragment.lstrip().startswith('<tbody id="version-rows"')
    assert "hx-trigger" not in fragment  # the swapped-in body stops the poll
    assert fragment.count("badge-ready") == 2
    assert "<html" not in fragment
    # the status counts above the table come along, so they agree with the rows
    assert '<hx-partial hx-target="#version-filters" hx-swap="outerHTML">' in fragment
    assert 'data-status="ready">ready · 2</a>' in fragment


@pytest.mark.django_db
def test_the_versions_table_is_paginated(browser_as, unique_name):
    make_model(unique_name, versions=23)
    client = browser_as(Role.DATA_SCIENTIST)
    first = client.get(f"/models/{unique_name}/").content.decode()
    second = client.get(f"/models/{unique_name}/", {"page": 2}).content.decode()
    assert len(re.findall(r"<tr data-version=", first)) == 20
    assert [int(n) for n in re.findall(r'<tr data-version="(\d+)">', second)] == [3, 2, 1]


@pytest.mark.django_db
def test_an_unknown_model_is_a_404(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    assert client.get("/models/no-such-model/").status_code == 404
    assert client.get("/models/no-such-model/versions/1/").status_code == 404


@pytest.mark.django_db
def test_a_model_without_versions_says_so(browser_as, unique_name):
    make_model(unique_name)
    body = browser_as(Role.DATA_SCIENTIST).get(f"/models/{unique_name}/").content.decode()
    assert "No versions yet — register one" in body
    assert f'href="/register/?model={unique_name}"' in body


# ---- version page -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_version_page_shows_lineage_signature_example_and_inspection(browser_as, unique_name):
    make_model(unique_name, versions=1)
    body = browser_as(Role.ONCALL).get(version_url(unique_name, 1)).content.decode()
    assert "version 1" in body
    assert "Uploaded archive" in body
    assert "mlflow-artifacts:/1/run1/artifacts/model" in body
    assert f"{1:032x}" in body  # run id
    assert "max_iter" in body and "accuracy" in body and "0.93" in body
    assert "sklearn_version" in body
    assert "tensor (float64)" in body and "(?, 64)" in body  # signature input as a table row
    assert "<code>digit</code>" in body  # signature output
    assert "[0.0, 1.5, 2.25]" in body  # input example, pretty-printed
    assert "prediction_shape" in body  # inspection report
    assert "hx-trigger" not in body  # ready: nothing polls
    assert "none given: the input example" in body and "written by the first engine build" in body
    ModelVersion.objects.filter(model__name=unique_name, version=1).update(
        reference_sample_rows=450, reference_sample_note="run dataset 'holdout' (context 'reference'): 450 rows",
        reference_uri="mlflow-artifacts:/references/abc.json")
    body = browser_as(Role.ONCALL).get(version_url(unique_name, 1)).content.decode()
    assert "450 rows<span class=\"by\">run dataset &#x27;holdout&#x27; (context &#x27;reference&#x27;)" in body
    assert "mlflow-artifacts:/references/abc.json" in body


@pytest.mark.django_db
def test_the_version_status_polls_while_validating_and_stops_when_decided(browser_as, unique_name):
    make_model(unique_name, versions=1, status=VersionStatus.VALIDATING)
    client = browser_as(Role.DATA_SCIENTIST)
    page = client.get(version_url(unique_name, 1)).content.decode()
    assert f'hx-get="/models/{unique_name}/versions/1/status/"' in page
    assert 'hx-trigger="every 2s"' in page

    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    version_transition(version.pk, VersionStatus.INVALID, SYSTEM, detail="ModuleNotFoundError: no module named x",
                       inspection={"ok": False, "error": "ModuleNotFoundError"})
    fragment = client.get(f"/models/{unique_name}/versions/1/status/", headers={"HX-Request": "true"})
    text = fragment.content.decode()
    assert text.lstrip().startswith('<section class="card status-card status-invalid" id="version-status"')
    assert "hx-trigger" not in text
    assert "ModuleNotFoundError: no module named x" in text


@pytest.mark.django_db
def test_a_huge_input_example_is_truncated(browser_as, unique_name):
    make_model(unique_name, versions=1)
    ModelVersion.objects.filter(model__name=unique_name).update(input_example={"inputs": ["x" * 10_000]})
    body = browser_as(Role.DATA_SCIENTIST).get(version_url(unique_name, 1)).content.decode()
    assert "more characters)" in body
    assert "x" * 10_000 not in body


# ---- register -----------------------------------------------------------------------------------

def _upload(client: Client, name: str, archive: Path | io.BytesIO, **extra):
    if isinstance(archive, Path):
        with open(archive, "rb") as fh:
            return client.post("/register/", {"name": name, "archive": fh, **extra})
    return client.post("/register/", {"name": name, "archive": archive, **extra})


@pytest.mark.django_db(transaction=True)
def test_uploading_an_archive_on_the_register_page_creates_a_version(browser_as, model_archive, unique_name):
    client = browser_as(Role.DATA_SCIENTIST)
    resp = _upload(client, unique_name, model_archive, description="first cut", tags="team=vision")
    assert resp.status_code == 302, resp.content.decode()[:2000]
    assert resp["Location"] == version_url(unique_name, 1)

    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert version.origin == VersionOrigin.UPLOAD
    assert version.status == VersionStatus.VALIDATING
    assert version.description == "first cut"
    assert version.tags == {"team": "vision"}
    assert "sklearn" in version.flavors
    assert version.created_by == client.user
    event = AuditEvent.objects.get(action="version.register", target_id=f"{unique_name}/1")
    assert event.via == "web"
    assert event.actor_name == client.user.username

    page = client.get(resp["Location"])
    body = page.content.decode()
    assert f"Registered {unique_name} version 1" in body  # the flash message
    assert version.run_id in body
    assert "badge-validating" in body


@pytest.mark.django_db(transaction=True)
def test_a_second_upload_through_the_page_gets_the_next_number(browser_as, model_archive, unique_name):
    client = browser_as(Role.CI)
    assert _upload(client, unique_name, model_archive)["Location"] == version_url(unique_name, 1)
    assert _upload(client, unique_name, model_archive)["Location"] == version_url(unique_name, 2)
    assert RegisteredModel.objects.get(name=unique_name).version_count == 2


@pytest.mark.django_db(transaction=True)
def test_registering_from_a_models_uri_through_the_page(browser_as, model_archive, unique_name):
    client = browser_as(Role.DATA_SCIENTIST)
    _upload(client, unique_name, model_archive)
    copy = unique_name + "-copy"
    resp = client.post("/register/", {"name": copy, "source": f"models:/{unique_name}/1"})
    assert resp.status_code == 302, resp.content.decode()[:2000]
    assert ModelVersion.objects.get(model__name=copy, version=1).origin == VersionOrigin.MODEL_URI


def _zip_without_mlmodel() -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/README.txt", "not an MLflow model")
    buf.seek(0)
    buf.name = "broken.zip"
    return buf


@pytest.mark.django_db(transaction=True)
def test_a_bad_archive_shows_the_error_keeps_the_form_and_registers_nothing(browser_as, unique_name):
    client = browser_as(Role.DATA_SCIENTIST)
    events_before = AuditEvent.objects.count()
    resp = _upload(client, unique_name, _zip_without_mlmodel(), description="my notes")
    assert resp.status_code == 422
    body = resp.content.decode()
    assert "The model was not registered." in body
    assert "no MLmodel file at the archive root" in body
    assert f'value="{unique_name}"' in body  # the form keeps what was typed
    assert "my notes</textarea>" in body
    assert not RegisteredModel.objects.filter(name=unique_name).exists()
    assert not ModelVersion.objects.filter(model__name=unique_name).exists()
    assert AuditEvent.objects.count() == events_before


@pytest.mark.django_db(transaction=True)
def test_a_file_that_is_no_archive_is_refused_with_its_reason(browser_as, unique_name):
    junk = io.BytesIO(b"just some text, not a zip")
    junk.name = "model.zip"
    resp = _upload(browser_as(Role.DATA_SCIENTIST), unique_name, junk)
    assert resp.status_code == 422
    assert "not a model archive" in resp.content.decode()
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


@pytest.mark.django_db
def test_a_malformed_source_uri_is_refused_on_the_form(browser_as, unique_name):
    resp = browser_as(Role.DATA_SCIENTIST).post("/register/", {"name": unique_name, "source": "file:///etc/passwd"})
    assert resp.status_code == 422
    assert "file:, http(s): and local paths are not accepted" in resp.content.decode()
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("data", "message"), [
    ({"name": "ok-name"}, "Choose a model archive to upload"),
    ({"name": "bad name!", "source": "models:/x/1"}, "invalid model name"),
    ({"name": "ok-name", "source": "models:/x/1", "tags": "no-equals-sign"}, "is not a tag"),
])
def test_an_incomplete_form_is_a_400_that_says_what_to_fix(browser_as, data, message):
    resp = browser_as(Role.DATA_SCIENTIST).post("/register/", data)
    assert resp.status_code == 400
    assert message in resp.content.decode()
    assert not RegisteredModel.objects.filter(name=data["name"]).exists()


@pytest.mark.django_db
def test_the_register_page_explains_the_mlflow_client_with_this_sites_url(browser_as):
    body = browser_as(Role.DATA_SCIENTIST).get("/register/", {"model": "prefilled"}).content.decode()
    assert "export MLFLOW_TRACKING_URI=http://testserver\n" in body
    assert "MLFLOW_TRACKING_TOKEN" in body
    assert 'value="prefilled"' in body
    assert 'enctype="multipart/form-data"' in body
    assert 'name="csrfmiddlewaretoken"' in body


def test_forms_are_csrf_protected(db, make_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user(Role.DATA_SCIENTIST))
    assert client.post("/register/", {"name": "x", "source": "models:/x/1"}).status_code == 403
    assert client.post("/tokens/", {"name": "x", "roles": ["data_scientist"], "expires_in_days": 1}).status_code == 403
    assert not ApiToken.objects.exists()


# ---- tokens -------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_creating_a_token_shows_it_once_and_it_authenticates(browser_as):
    client = browser_as(Role.DATA_SCIENTIST, Role.ONCALL)
    resp = client.post("/tokens/", {"name": "laptop", "roles": [Role.ONCALL], "expires_in_days": 30})
    assert resp.status_code == 201
    assert resp["Cache-Control"] == "no-store"
    raw = re.search(r'<code id="raw-token">(mlp_[^<]+)</code>', resp.content.decode()).group(1)
    user, token = token_authenticate(raw)
    assert user == client.user
    assert token.roles == [Role.ONCALL]
    assert token.name == "laptop"
    assert token.expires_at is not None

    later = client.get("/tokens/").content.decode()
    assert raw not in later
    assert token.prefix in later
    assert "laptop" in later


@pytest.mark.django_db
def test_the_role_boxes_offer_only_the_persons_roles_and_refuse_others(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    body = client.get("/tokens/").content.decode()
    assert 'value="data_scientist"' in body
    assert 'value="admin"' not in body
    resp = client.post("/tokens/", {"name": "sneaky", "roles": [Role.ADMIN], "expires_in_days": 1})
    assert resp.status_code == 400
    assert not ApiToken.objects.filter(user=client.user).exists()


@pytest.mark.django_db
def test_a_token_needs_at_least_one_role(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    resp = client.post("/tokens/", {"name": "no roles", "expires_in_days": 1})
    assert resp.status_code == 400
    assert "Tick at least one role" in resp.content.decode()
    assert not ApiToken.objects.filter(user=client.user).exists()


@pytest.mark.django_db
def test_the_tokens_page_lists_only_your_own_tokens(browser_as, make_user):
    client = browser_as(Role.DATA_SCIENTIST)
    token_create(SYSTEM, client.user, "mine-token")
    token_create(SYSTEM, make_user(Role.DATA_SCIENTIST), "someone-elses-token")
    body = client.get("/tokens/").content.decode()
    assert "mine-token" in body
    assert "someone-elses-token" not in body


@pytest.mark.django_db
def test_revoking_a_token_is_a_post_that_stops_it_working(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    issued = token_create(Actor(client.user, "web"), client.user, "ci")
    url = reverse("frontend:token-revoke", args=[issued.token.pk])
    assert client.get(url).status_code == 405
    resp = client.post(url)
    assert resp.status_code == 302
    assert token_authenticate(issued.raw) is None
    body = client.get(resp["Location"]).content.decode()
    assert "Revoked token" in body
    assert "badge-revoked" in body
    assert AuditEvent.objects.filter(action="token.revoke", target_id=str(issued.token.pk), via="web").exists()


@pytest.mark.django_db
def test_nobody_can_revoke_someone_elses_token(browser_as, make_user):
    other = token_create(SYSTEM, make_user(Role.DATA_SCIENTIST), "theirs")
    resp = browser_as(Role.DATA_SCIENTIST).post(reverse("frontend:token-revoke", args=[other.token.pk]))
    assert resp.status_code == 404
    assert token_authenticate(other.raw) is not None


# ---- audit --------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_audit_log_shows_before_and_after_and_filters(browser_as, unique_name):
    from registry.audit import audit_record

    audit_record(SYSTEM, "model.update", "model", unique_name, before={"description": "old words"},
                 after={"description": "new words"})
    audit_record(SYSTEM, "token.create", "token", "999", after={"name": "other"})
    client = browser_as(Role.RELEASE_MANAGER)
    body = client.get("/audit/").content.decode()
    assert "old words" in body and "new words" in body
    assert 'class="diff-changed"' in body

    filtered = client.get("/audit/", {"action": "model.", "target": unique_name}).content.decode()
    assert "new words" in filtered
    assert "token.create" not in filtered
    assert client.get("/audit/", {"actor": "nobody-at-all"}).content.decode().count("No events match") == 1


@pytest.mark.django_db
def test_the_audit_log_is_paginated(browser_as, unique_name):
    from registry.audit import audit_record

    for i in range(55):
        audit_record(SYSTEM, "test.event", "thing", f"{unique_name}-{i}")
    client = browser_as(Role.ONCALL)
    first = client.get("/audit/", {"target": unique_name}).content.decode()
    second = client.get("/audit/", {"target": unique_name, "page": 2}).content.decode()
    assert first.count("<code>test.event</code>") == 50
    assert second.count("<code>test.event</code>") == 5
    assert f"{unique_name}-0</code>" in second  # oldest last


# ---- assets -------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_pages_load_css_and_htmx_from_this_site_not_a_cdn(browser_as):
    client = browser_as(Role.DATA_SCIENTIST)
    body = client.get("/register/").content.decode()
    assets = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', body)
    assert "/static/frontend/app.css" in assets
    assert "/static/frontend/vendor/htmx.min.js" in assets
    assert all(url.startswith("/static/") for url in assets), assets
    served = {}
    for url in assets:
        resp = client.get(url)
        assert resp.status_code == 200, url
        served[url] = b"".join(resp.streaming_content) if resp.streaming else resp.content
    assert served["/static/frontend/vendor/htmx.min.js"].startswith(b"var htmx=")
    assert b".badge-validating" in served["/static/frontend/app.css"]
