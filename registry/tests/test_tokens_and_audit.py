from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import DatabaseError, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from registry.models import ApiToken, AuditEvent
from registry.roles import Role
from registry.tokens import digest

pytestmark = pytest.mark.django_db


def _client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_a_created_token_is_shown_once_and_stored_only_as_a_digest(scientist):
    resp = scientist.post("/api/v1/tokens/", {"name": "gitlab-ci", "expires_in_days": 30}, format="json")
    assert resp.status_code == 201
    raw = resp.json()["token"]
    stored = ApiToken.objects.get(pk=resp.json()["id"])
    assert stored.digest == digest(raw) and raw not in (stored.digest, stored.prefix)
    assert raw.startswith(stored.prefix)
    listed = scientist.get("/api/v1/tokens/").json()["results"]
    assert all("token" not in item for item in listed)
    assert _client(raw).get("/api/v1/me/").json()["username"] == scientist.user.username


def test_a_revoked_token_stops_working_at_once(scientist):
    raw = scientist.post("/api/v1/tokens/", {"name": "temp"}, format="json").json()
    assert _client(raw["token"]).get("/api/v1/me/").status_code == 200
    assert scientist.delete(f"/api/v1/tokens/{raw['id']}/").status_code == 200
    resp = _client(raw["token"]).get("/api/v1/me/")
    assert resp.status_code == 401
    assert "revoked" in resp.json()["error"]["message"]
    assert AuditEvent.objects.filter(action="token.revoke", target_id=str(raw["id"])).exists()


def test_an_expired_token_is_refused(scientist):
    raw = scientist.post("/api/v1/tokens/", {"name": "short"}, format="json").json()
    ApiToken.objects.filter(pk=raw["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert _client(raw["token"]).get("/api/v1/me/").status_code == 401


def test_a_token_cannot_carry_roles_its_owner_lacks(scientist):
    resp = scientist.post("/api/v1/tokens/", {"name": "escalate", "roles": ["admin"]}, format="json")
    assert resp.status_code == 400
    assert "owner lacks: admin" in resp.json()["error"]["message"]


def test_people_cannot_revoke_each_others_tokens_but_admins_can(client_as):
    alice, bob, admin = client_as(Role.DATA_SCIENTIST), client_as(Role.DATA_SCIENTIST), client_as(Role.ADMIN)
    token = alice.post("/api/v1/tokens/", {"name": "alice"}, format="json").json()
    assert bob.delete(f"/api/v1/tokens/{token['id']}/").status_code == 404
    assert admin.delete(f"/api/v1/tokens/{token['id']}/").status_code == 200


def test_an_admin_creates_a_ci_service_account_and_a_token_for_it(client_as):
    admin = client_as(Role.ADMIN)
    resp = admin.post("/api/v1/users/", {"username": "gitlab-ci", "roles": ["ci"], "is_service_account": True},
                      format="json")
    assert resp.status_code == 201, resp.content
    token = admin.post("/api/v1/tokens/", {"name": "pipeline", "owner": "gitlab-ci"}, format="json").json()
    me = _client(token["token"]).get("/api/v1/me/").json()
    assert me["roles"] == ["ci"] and "model.register" in me["capabilities"]


def test_the_audit_log_refuses_updates_and_deletes_at_the_database(scientist):
    scientist.post("/api/v1/tokens/", {"name": "x"}, format="json")
    event = AuditEvent.objects.filter(action="token.create").latest("id")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(action="forged")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).action == "token.create"


def test_the_openapi_schema_describes_the_registry_api(client_as):
    client = client_as(Role.ONCALL)
    resp = client.get("/api/schema/?format=json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    assert "/api/v1/models/{name}/versions/" in paths
    assert "post" in paths["/api/v1/models/{name}/versions/"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content.lower()
    assert b"cdn" not in docs.content.lower()  # assets are served by the platform, not a CDN
