"""Safe retries (registry/api/idempotency.py): a POST retried with its Idempotency-Key gets the first
answer and changes nothing; a database that is away is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from django.db import OperationalError

from registry.models import IdempotencyRecord, ModelVersion, RegisteredModel
from registry.tests.test_sandbox import post_archive

pytestmark = pytest.mark.django_db(transaction=True)


def key() -> str:
    return str(uuid.uuid4())


def register(client: Any, name: str, archive: bytes, idempotency_key: str, description: str = "") -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("model.tar.gz", archive, content_type="application/gzip")
    return client.post(f"/api/v1/models/{name}/versions/", {"archive": upload, "description": description},
                       format="multipart", HTTP_IDEMPOTENCY_KEY=idempotency_key)


def test_a_registration_retried_with_its_key_returns_the_first_answer_and_registers_once(
        scientist, unique_name, model_archive):
    data, k = model_archive.read_bytes(), key()
    first = register(scientist, unique_name, data, k, "nightly")
    assert first.status_code == 201, first.content
    again = register(scientist, unique_name, data, k, "nightly")
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert ModelVersion.objects.filter(model__name=unique_name).count() == 1
    assert "Idempotent-Replayed" not in first


def test_the_same_key_with_another_body_or_path_is_a_422_and_changes_nothing(scientist, unique_name, model_archive):
    data, k = model_archive.read_bytes(), key()
    assert register(scientist, unique_name, data, k, "nightly").status_code == 201
    other = register(scientist, unique_name, data, k, "another description")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "was used with another request" in other.json()["error"]["message"]
    elsewhere = scientist.post("/api/v1/models/", {"name": unique_name + "-x"}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert elsewhere.status_code == 422
    assert ModelVersion.objects.filter(model__name=unique_name).count() == 1
    assert not RegisteredModel.objects.filter(name=unique_name + "-x").exists()


def test_keys_belong_to_their_user(scientist, client_as, unique_name):
    k = key()
    assert scientist.post("/api/v1/models/", {"name": unique_name}, format="json",
                          HTTP_IDEMPOTENCY_KEY=k).status_code == 201
    other = client_as("data_scientist")
    resp = other.post("/api/v1/models/", {"name": unique_name + "-b"}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert resp.status_code == 201 and resp.json()["name"] == unique_name + "-b"


def test_two_requests_racing_with_one_key_make_one_change_and_get_the_same_answer(client_as, unique_name):
    from django.db import connection

    k = key()
    client = client_as("data_scientist")
    answers: list[Any] = []

    def create() -> None:
        try:
            answers.append(client.post("/api/v1/models/", {"name": unique_name}, format="json",
                                           HTTP_IDEMPOTENCY_KEY=k))
        finally:
            connection.close()

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a.status_code for a in answers] == [201] * 4
    assert all(a.json() == answers[0].json() for a in answers)
    assert sum(1 for a in answers if a.get("Idempotent-Replayed") == "true") == 3
    assert RegisteredModel.objects.filter(name=unique_name).count() == 1


def test_an_error_answer_is_not_kept_so_the_key_can_be_used_again(scientist, unique_name):
    k = key()
    bad = scientist.post("/api/v1/models/", {"name": "bad name!"}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert bad.status_code == 400
    assert not IdempotencyRecord.objects.filter(key=k).exists()
    good = scientist.post("/api/v1/models/", {"name": unique_name}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert good.status_code == 201


@pytest.mark.parametrize("bad_key", ["", "x" * 256, "has space", "caf\u00e9"])
def test_a_malformed_key_is_a_400_saying_what_a_key_is(scientist, unique_name, bad_key):
    resp = scientist.post("/api/v1/models/", {"name": unique_name}, format="json",
                          HTTP_IDEMPOTENCY_KEY=bad_key)
    assert resp.status_code == 400
    assert "Idempotency-Key must be 1 to 255 visible ASCII characters" in resp.json()["error"]["message"]
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


def test_a_database_that_fails_mid_request_is_a_503_with_retry_after_and_the_retry_succeeds(
        scientist, unique_name, monkeypatch):
    from registry import services

    real = services.model_create
    calls = []

    def database_gone(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real(*args, **kwargs)

    monkeypatch.setattr(services, "model_create", database_gone)
    k = key()
    resp = scientist.post("/api/v1/models/", {"name": unique_name}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert resp.status_code == 503, resp.content
    assert resp["Retry-After"] == "2" and resp.json()["error"]["code"] == "unavailable"
    assert "retry in 2 s" in resp.json()["error"]["message"]
    again = scientist.post("/api/v1/models/", {"name": unique_name}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    plain = scientist.post("/api/v1/models/", {"name": unique_name + "-2"}, format="json")
    assert plain.status_code == 201  # without a key, as before


def test_every_post_endpoint_of_the_api_takes_a_key(scientist, unique_name, model_archive):
    """Replay works through the shared base view, whichever app the endpoint is in."""
    assert post_archive(scientist, unique_name, model_archive.read_bytes()).status_code == 201
    k = key()
    first = scientist.post(f"/api/v1/models/{unique_name}/versions/1/builds/", HTTP_IDEMPOTENCY_KEY=k)
    again = scientist.post(f"/api/v1/models/{unique_name}/versions/1/builds/", HTTP_IDEMPOTENCY_KEY=k)
    assert first.status_code == again.status_code
    model = scientist.post("/api/v1/models/", {"name": unique_name + "-m"}, format="json", HTTP_IDEMPOTENCY_KEY=k + "m")
    assert model.status_code == 201


def test_a_retried_token_creation_never_shows_or_keeps_the_secret_again(scientist):
    from registry.models import ApiToken

    k = key()
    token = scientist.post("/api/v1/tokens/", {"name": "ci"}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert token.status_code == 201 and token.json()["token"].startswith("mlp_")
    assert token.json()["token"] not in str(IdempotencyRecord.objects.get(key=k).body)
    again = scientist.post("/api/v1/tokens/", {"name": "ci"}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert again.status_code == 409 and again["Idempotent-Replayed"] == "true"
    message = again.json()["error"]["message"]
    assert "shown only once" in message and f'"id": {token.json()["id"]}' in message
    assert token.json()["token"] not in again.content.decode()
    assert ApiToken.objects.filter(name="ci").count() == 1


def test_an_answer_holding_datetimes_is_kept_and_replayed(scientist, unique_name, monkeypatch):
    """A deployment's answer has datetimes (bench/chaos found its POST with a key answered 500)."""
    from datetime import UTC, datetime

    from rest_framework.response import Response

    from registry.api import views

    def created(self: object, request: object) -> Response:
        return Response({"name": unique_name, "at": datetime(2026, 11, 29, 18, 0, tzinfo=UTC)}, status=201)

    monkeypatch.setattr(views.ModelListView, "post", created)
    k = key()
    first = scientist.post("/api/v1/models/", {"name": unique_name}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert first.status_code == 201, first.content
    again = scientist.post("/api/v1/models/", {"name": unique_name}, format="json", HTTP_IDEMPOTENCY_KEY=k)
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() == {"name": unique_name, "at": "2026-11-29T18:00:00Z"}
