"""Protected aliases (registry/governance.py): a protected model's `champion` moves only through an approved
promotion or a rollback. Setting or deleting it is refused through /api/v1 and through MLflow's REST API served
by the platform, for every role, with nothing changed in MLflow; other aliases stay free, and every alias that
moves is in the audit log."""

from __future__ import annotations

import json

import pytest

from registry import governance, mlflow_store
from registry.models import AuditEvent, ModelVersion, PromotionPolicy, RegisteredModel, VersionStatus
from registry.roles import Cap, Role, roles_allow


def _champion_model(scientist, model_archive, name: str) -> RegisteredModel:
    """A model registered through the API (so in MLflow too) with `champion` on v1 and protection on."""
    with open(model_archive, "rb") as fh:
        resp = scientist.post(f"/api/v1/models/{name}/versions/", {"archive": fh}, format="multipart")
    assert resp.status_code == 201, resp.content
    mlflow_store.alias_set(name, "champion", 1)
    model = RegisteredModel.objects.get(name=name)
    PromotionPolicy.objects.create(model=model, protected=True)
    return model


def _alias_rows(name: str) -> list[str]:
    return list(AuditEvent.objects.filter(target_type="registered_model", target_id=name,
                                          action__startswith="alias.").values_list("action", flat=True))


@pytest.mark.django_db
@pytest.mark.parametrize("role", Role.values)
def test_the_champion_of_a_protected_model_is_refused_through_the_api_for_every_role(client_as, scientist,
                                                                                    model_archive, unique_name, role):
    _champion_model(scientist, model_archive, unique_name)
    client = client_as(role)
    put = client.put(f"/api/v1/models/{unique_name}/aliases/champion/", {"version": 1}, format="json")
    delete = client.delete(f"/api/v1/models/{unique_name}/aliases/champion/")
    for resp in (put, delete):
        assert resp.status_code == 403, resp.content
        if roles_allow({role}, Cap.MODEL_EDIT):  # past the capability check: the protection speaks
            message = resp.json()["error"]["message"]
            assert "is protected" in message and "/api/v1/deployments/<id>/promotion/" in message
    assert mlflow_store.aliases(unique_name) == {"champion": 1}
    assert _alias_rows(unique_name) == []


@pytest.mark.django_db
def test_other_aliases_stay_free_and_every_move_is_audited(scientist, model_archive, unique_name):
    _champion_model(scientist, model_archive, unique_name)
    assert scientist.put(f"/api/v1/models/{unique_name}/aliases/staging/", {"version": 1},
                         format="json").status_code == 200
    listed = scientist.get(f"/api/v1/models/{unique_name}/aliases/").json()
    assert listed == {"model": unique_name, "aliases": {"champion": 1, "staging": 1}, "protected": ["champion"]}
    assert scientist.delete(f"/api/v1/models/{unique_name}/aliases/staging/").status_code == 204
    assert scientist.delete(f"/api/v1/models/{unique_name}/aliases/staging/").status_code == 404
    assert scientist.put(f"/api/v1/models/{unique_name}/aliases/latest/", {"version": 1},
                         format="json").status_code == 400
    assert scientist.put(f"/api/v1/models/{unique_name}/aliases/staging/", {"version": 9},
                         format="json").status_code == 404
    ModelVersion.objects.filter(model__name=unique_name, version=1).update(status=VersionStatus.ARCHIVED)
    archived = scientist.put(f"/api/v1/models/{unique_name}/aliases/staging/", {"version": 1}, format="json")
    assert archived.status_code == 409 and "is archived" in archived.json()["error"]["message"]
    rows = AuditEvent.objects.filter(target_id=unique_name, action__startswith="alias.").order_by("id")
    assert [(r.action, r.actor_name, r.before["version"], r.after["version"]) for r in rows] == [
        ("alias.set", scientist.user.username, None, 1), ("alias.delete", scientist.user.username, 1, None)]


@pytest.mark.django_db
def test_a_model_is_protected_from_its_first_champion_on_unless_its_policy_says_otherwise(unique_name, governed,
                                                                                          settings, client_as):
    model = RegisteredModel.objects.create(name=unique_name)
    assert governance.protected_aliases(model) == set()
    governance.model_mark_deployed(model)
    assert governance.protected_aliases(model) == {"champion"}
    admin = client_as(Role.ADMIN)
    resp = admin.patch(f"/api/v1/models/{unique_name}/promotion-policy/", {"protected_aliases": ["prod-eu"]},
                       format="json")
    assert resp.status_code == 200 and resp.json()["protected_now"] is True
    assert governance.protected_aliases(model) == {"champion", "prod-eu"}
    assert admin.patch(f"/api/v1/models/{unique_name}/promotion-policy/", {"protected_aliases": ["v2"]},
                       format="json").status_code == 400
    assert client_as(Role.RELEASE_MANAGER).patch(f"/api/v1/models/{unique_name}/promotion-policy/",
                                                 {"protected": False}, format="json").status_code == 403
    assert admin.patch(f"/api/v1/models/{unique_name}/promotion-policy/", {"protected": False},
                       format="json").json()["protected_now"] is False
    assert governance.protected_aliases(model) == set()
    assert AuditEvent.objects.filter(action="promotion_policy.update", target_id=unique_name).count() == 2
    # the platform-wide default: deployed models unprotected unless their policy says so
    PromotionPolicy.objects.filter(model=model).update(protected=None)
    settings.PLATFORM = {**settings.PLATFORM, "PROTECT_DEPLOYED": False}
    assert governance.protected_aliases(model) == set()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", Role.values)
def test_the_champion_of_a_protected_model_is_refused_through_mlflows_api_for_every_role(
        platform_server, scientist, model_archive, make_user, token_for, unique_name, role):
    import requests

    _champion_model(scientist, model_archive, unique_name)
    headers = {"Authorization": f"Bearer {token_for(make_user(role))}"}
    url = f"{platform_server}/api/2.0/mlflow/registered-models/alias"
    tries = [requests.post(url, headers=headers, json={"name": unique_name, "alias": "champion", "version": "1"},
                           timeout=30),
             requests.delete(url, headers=headers, json={"name": unique_name, "alias": "champion"}, timeout=30),
             # as old clients send it: the JSON body encoded twice (MLflow decodes it twice)
             requests.post(url, headers=headers, timeout=30, data=json.dumps(json.dumps(
                 {"name": unique_name, "alias": "champion", "version": "1"})),
                 ),
             requests.post(f"{platform_server}/ajax-api/2.0/mlflow/registered-models/alias", headers=headers,
                           json={"name": unique_name, "alias": "champion", "version": "1"}, timeout=30)]
    for resp in tries:
        assert resp.status_code == 403, (resp.status_code, resp.text[:300])
        assert resp.json()["error_code"] == "PERMISSION_DENIED"
        if roles_allow({role}, Cap.MODEL_REGISTER):
            assert "is protected" in resp.json()["message"]
    deleted = requests.delete(f"{platform_server}/api/2.0/mlflow/model-versions/delete", headers=headers,
                              json={"name": unique_name, "version": "1"}, timeout=30)
    assert deleted.status_code == 403
    assert mlflow_store.aliases(unique_name) == {"champion": 1}
    assert _alias_rows(unique_name) == []
    webhooks = requests.get(f"{platform_server}/api/2.0/mlflow/webhooks", headers=headers, timeout=30)
    assert webhooks.status_code == (200 if roles_allow({role}, Cap.USER_MANAGE) else 403), webhooks.text[:300]


@pytest.mark.django_db(transaction=True)
def test_other_aliases_move_through_mlflows_api_and_are_audited(platform_server, scientist, model_archive, token_for,
                                                                unique_name):
    import requests

    _champion_model(scientist, model_archive, unique_name)
    headers = {"Authorization": f"Bearer {token_for(scientist.user)}"}
    url = f"{platform_server}/api/2.0/mlflow/registered-models/alias"
    assert requests.post(url, headers=headers, json={"name": unique_name, "alias": "staging", "version": "1"},
                         timeout=30).status_code == 200
    assert requests.delete(url, headers=headers, json={"name": unique_name, "alias": "staging"},
                           timeout=30).status_code == 200
    assert mlflow_store.aliases(unique_name) == {"champion": 1}
    assert _alias_rows(unique_name) == ["alias.delete", "alias.set"]  # newest first


@pytest.mark.django_db(transaction=True)
def test_a_lowercase_method_is_checked_as_mlflow_routes_it(platform_server, scientist, model_archive, token_for,
                                                           unique_name):
    import http.client
    from urllib.parse import urlsplit

    _champion_model(scientist, model_archive, unique_name)
    where = urlsplit(platform_server)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    body = json.dumps({"name": unique_name, "alias": "champion", "version": "1"})
    for method in ("post", "delete", "Post"):  # Werkzeug routes each as its upper case
        conn.request(method, "/api/2.0/mlflow/registered-models/alias", body=body, headers={
            "Authorization": f"Bearer {token_for(scientist.user)}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert (resp.status, answer["error_code"]) == (403, "PERMISSION_DENIED"), (method, answer)
    conn.close()
    assert mlflow_store.aliases(unique_name) == {"champion": 1}
