"""Every role against every API endpoint: allowed calls are not refused, others get 403."""

from __future__ import annotations

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from deployer.testing import champion_after, servable_model
from registry.api.views import BaseView
from registry.roles import CAPABILITIES, Cap, Role, roles_allow

pytestmark = pytest.mark.django_db

# (method, path template, capability, body). {m} is a model that exists, {t} a token id of another user,
# {receiver} a notification receiver and {delivery} a failed delivery to it, {hil_run} a HIL run of {free}'s engine.
ENDPOINTS = [
    ("GET", "/api/v1/me/", Cap.MODEL_READ, None),
    ("GET", "/api/v1/models/", Cap.MODEL_READ, None),
    ("POST", "/api/v1/models/", Cap.MODEL_REGISTER, {"name": "{new}"}),
    ("GET", "/api/v1/models/{m}/", Cap.MODEL_READ, None),
    ("PATCH", "/api/v1/models/{m}/", Cap.MODEL_EDIT, {"description": "x"}),
    ("GET", "/api/v1/models/{m}/versions/", Cap.MODEL_READ, None),
    ("POST", "/api/v1/models/{m}/versions/", Cap.MODEL_REGISTER, {"source": "models:/{m}/1"}),
    ("GET", "/api/v1/models/{m}/versions/1/", Cap.MODEL_READ, None),
    ("PATCH", "/api/v1/models/{m}/versions/1/", Cap.MODEL_EDIT, {"description": "y"}),
    ("GET", "/api/v1/tokens/", Cap.MODEL_READ, None),
    ("POST", "/api/v1/tokens/", Cap.MODEL_READ, {"name": "mine"}),
    ("GET", "/api/v1/users/", Cap.USER_MANAGE, None),
    ("POST", "/api/v1/users/", Cap.USER_MANAGE, {"username": "{new}", "roles": ["oncall"]}),
    ("GET", "/api/v1/users/{owner}/", Cap.USER_MANAGE, None),
    ("PATCH", "/api/v1/users/{owner}/", Cap.USER_MANAGE, {"roles": ["data_scientist"]}),
    ("GET", "/api/v1/audit/", Cap.AUDIT_READ, None),
    ("GET", "/api/v1/deployments/", Cap.DEPLOY_READ, None),
    ("POST", "/api/v1/deployments/", Cap.DEPLOY_CREATE, {"model": "{free}", "version": 1}),
    ("POST", "/api/v1/deployments/", Cap.HIL_OVERRIDE, {"model": "{free}", "version": 1,
                                                        "hil_override": "incident 7: the HIL box is down"}),
    ("GET", "/api/v1/deployments/{progressing}/", Cap.DEPLOY_READ, None),
    ("POST", "/api/v1/deployments/{progressing}/pause/", Cap.DEPLOY_CONTROL, None),
    ("POST", "/api/v1/deployments/{paused}/resume/", Cap.DEPLOY_CONTROL, None),
    ("POST", "/api/v1/deployments/{progressing}/abort/", Cap.DEPLOY_CONTROL, None),
    ("POST", "/api/v1/deployments/{progressing}/promote/", Cap.DEPLOY_PROMOTE, None),
    ("POST", "/api/v1/deployments/{progressing}/promotion/", Cap.PROMOTION_REQUEST, {"reason": "release 7"}),
    ("POST", "/api/v1/deployments/{progressing}/break-glass/", Cap.BREAK_GLASS,
     {"reason": "INC-9: the champion mislabels every request"}),
    ("GET", "/api/v1/promotions/", Cap.DEPLOY_READ, None),
    ("GET", "/api/v1/promotions/{promotion}/", Cap.DEPLOY_READ, None),
    ("POST", "/api/v1/promotions/{promotion}/approve/", Cap.DEPLOY_PROMOTE, {"comment": "evidence read"}),
    ("POST", "/api/v1/promotions/{promotion}/reject/", Cap.DEPLOY_PROMOTE, {"comment": "drift"}),
    # its requester may withdraw it too (deployer/tests/test_promotions.py); anyone else needs deploy.promote
    ("POST", "/api/v1/promotions/{promotion}/cancel/", Cap.DEPLOY_PROMOTE, {"comment": "not now"}),
    ("GET", "/api/v1/models/{m}/aliases/", Cap.MODEL_READ, None),
    ("PUT", "/api/v1/models/{m}/aliases/canary-eu/", Cap.MODEL_EDIT, {"version": 1}),
    ("DELETE", "/api/v1/models/{m}/aliases/staging/", Cap.MODEL_EDIT, None),
    ("GET", "/api/v1/models/{m}/promotion-policy/", Cap.MODEL_READ, None),
    ("PATCH", "/api/v1/models/{m}/promotion-policy/", Cap.POLICY_EDIT, {"approvals_required": 2}),
    ("GET", "/api/v1/models/{m}/history/", Cap.DEPLOY_READ, None),
    ("GET", "/api/v1/models/{m}/history/?at=2026-01-01T00:00:00Z", Cap.DEPLOY_READ, None),
    ("GET", "/api/v1/endpoints/", Cap.DEPLOY_READ, None),
    ("GET", "/api/v1/targets/", Cap.MODEL_READ, None),
    ("GET", "/api/v1/models/{free}/versions/1/hil/", Cap.MODEL_READ, None),
    ("POST", "/api/v1/models/{free}/versions/1/hil/", Cap.MODEL_REGISTER, {"profiles": ["cpu-arm64"]}),
    ("GET", "/api/v1/hil/{hil_run}/", Cap.MODEL_READ, None),
    ("GET", "/api/v1/models/{m}/hil-policy/", Cap.MODEL_READ, None),
    ("PATCH", "/api/v1/models/{m}/hil-policy/", Cap.MONITOR_EDIT, {"p99_ms": 50}),
    ("POST", "/api/v1/models/{champion}/rollback/", Cap.DEPLOY_CONTROL, {"reason": "answers wrong"}),
    ("GET", "/api/v1/models/{m}/monitoring/", Cap.MODEL_READ, None),
    ("PATCH", "/api/v1/models/{m}/monitoring/", Cap.MONITOR_EDIT, {"rollback_on_slo": True}),
    ("GET", "/api/v1/receivers/", Cap.ALERT_READ, None),
    ("POST", "/api/v1/receivers/", Cap.RECEIVER_MANAGE, {"name": "{new}", "kind": "json",
                                                         "url": "https://hooks.example.com/{new}"}),
    ("GET", "/api/v1/receivers/{receiver}/", Cap.ALERT_READ, None),
    ("PATCH", "/api/v1/receivers/{receiver}/", Cap.RECEIVER_MANAGE, {"enabled": False}),
    ("DELETE", "/api/v1/receivers/{receiver}/", Cap.RECEIVER_MANAGE, None),
    ("POST", "/api/v1/receivers/{receiver}/test/", Cap.RECEIVER_MANAGE, None),
    ("GET", "/api/v1/deliveries/", Cap.ALERT_READ, None),
    ("GET", "/api/v1/deliveries/{delivery}/", Cap.ALERT_READ, None),
    ("POST", "/api/v1/deliveries/{delivery}/redeliver/", Cap.RECEIVER_MANAGE, None),
]


@pytest.fixture
def registered(scientist, model_archive, unique_name):
    with open(model_archive, "rb") as fh:
        resp = scientist.post(f"/api/v1/models/{unique_name}/versions/", {"archive": fh}, format="multipart")
    assert resp.status_code == 201
    from registry import mlflow_store

    mlflow_store.alias_set(unique_name, "staging", 1)  # a free alias to delete
    return unique_name, scientist.user.username


def _servable(name: str):
    """A model row with a ready version 1 and a kept engine (rows only: the API checks come first)."""
    from pipelines.models import EngineBuild
    from registry.models import ModelVersion, RegisteredModel

    model = RegisteredModel.objects.create(name=name, latest_version=1, version_count=1)
    version = ModelVersion.objects.create(model=model, version=1, status="ready", source="x", origin="test")
    engine = EngineBuild.objects.create(version=version, target="cpu", precision="fp32", runtime="onnxruntime",
                                        content_key=name, status="succeeded", engine_uri="mlflow-artifacts:/x",
                                        io={"triton_model_name": f"{name}_v1"})
    return model, version, engine


@pytest.fixture
def deployments(unique_name):
    from django.utils import timezone

    from deployer import promotions
    from deployer.models import Deployment
    from pipelines.models import HilRun
    from registry.audit import SYSTEM
    from registry.models import PromotionPolicy

    ids = {}
    for state in ("progressing", "paused"):
        model, version, engine = _servable(f"{unique_name}-{state}")
        ids[state] = Deployment.objects.create(model=model, version=version, engine=engine, triton_model="t",
                                               steps=[10], status=state, step_index=0, weight=10).pk
    _, _, free_engine = _servable(f"{unique_name}-free")
    champion = servable_model(f"{unique_name}-champion")
    champion_after(champion, 1, 2)  # v2 replaced v1: it can be rolled back
    hil_run = HilRun.objects.create(build=free_engine, profile="cpu-arm64", wait_deadline=timezone.now())
    # a promotion request waiting for approval; its policy counts administrators' approvals too
    waiting = servable_model(f"{unique_name}-waiting")
    champion_after(waiting, 1, 2)
    PromotionPolicy.objects.create(model=waiting, release_manager_required=False)
    v2 = waiting.versions.get(version=2)
    awaiting = Deployment.objects.create(model=waiting, version=v2, engine=v2.engine_builds.get(precision="fp32"),
                                         triton_model="t", steps=[10], status="awaiting_approval", step_index=0,
                                         weight=10)
    promotion = promotions.promotion_request(SYSTEM, awaiting, "the canary passed")
    return {"free": f"{unique_name}-free", "champion": champion.name, "hil_run": hil_run.pk,
            "promotion": promotion.pk, **ids}


@pytest.fixture
def notifications(unique_name):
    from monitoring import notify
    from monitoring.models import DeliveryStatus
    from registry.audit import SYSTEM

    receiver = notify.receiver_create(SYSTEM, f"{unique_name}-hook", "json", "https://hooks.example.com/x")
    [delivery] = notify.notify("alert.firing", {"title": "t", "text": "x", "url": "", "severity": "page"})
    notify.DELIVERIES.move(delivery.pk, DeliveryStatus.FAILED, last_error="HTTP 400 Bad Request")
    return {"receiver": receiver.pk, "delivery": delivery.pk}


def _fill(value, names):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return value


@pytest.mark.parametrize("role", Role.values)
@pytest.mark.parametrize(("method", "path", "capability", "body"), ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
def test_each_role_is_allowed_exactly_what_the_capability_table_says(client_as, request, role, method, path, capability,
                                                                     body, unique_name):
    # Only the rows a call names are made (an upload through the API is most of a call's cost).
    names = {"new": f"{unique_name}-{role.replace('_', '-')}"}
    wanted = f"{path} {body}"
    if "{m}" in wanted or "{owner}" in wanted:
        names["m"], names["owner"] = request.getfixturevalue("registered")
    if any(f"{{{k}}}" in wanted for k in ("progressing", "paused", "free", "champion", "hil_run", "promotion")):
        names.update(request.getfixturevalue("deployments"))
    if "{receiver}" in wanted or "{delivery}" in wanted:
        names.update(request.getfixturevalue("notifications"))
    client = client_as(role)
    resp = getattr(client, method.lower())(_fill(path, names), _fill(body, names), format="json")
    if roles_allow({role}, capability):
        assert resp.status_code < 400, (role, method, path, resp.status_code, resp.content[:300])
    else:
        assert resp.status_code == 403, (role, method, path, resp.status_code)
        assert resp.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/models/"), ("POST", "/api/v1/models/"),
                                              ("GET", "/api/v1/audit/"), ("GET", "/api/v1/me/")])
def test_anonymous_callers_are_refused_with_401(method, path):
    from rest_framework.test import APIClient

    resp = getattr(APIClient(), method.lower())(path, {}, format="json")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "not_authenticated"


def test_a_token_scoped_to_fewer_roles_acts_with_only_those(make_user, token_for):
    from rest_framework.test import APIClient

    user = make_user(Role.DATA_SCIENTIST, Role.RELEASE_MANAGER)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user, [Role.RELEASE_MANAGER])}")
    assert client.get("/api/v1/audit/").status_code == 200
    assert client.post("/api/v1/models/", {"name": "scoped-out"}, format="json").status_code == 403


def test_every_api_view_declares_a_capability_for_each_method_it_serves():
    def walk(patterns, prefix=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern), p.callback

    api_views = [(route, cb) for route, cb in walk(get_resolver().url_patterns) if route.startswith("api/v1/")]
    assert len(api_views) >= 10
    for route, callback in api_views:
        view = callback.view_class
        assert issubclass(view, BaseView), route
        for method in ("get", "post", "patch", "put", "delete"):
            if hasattr(view, method):
                assert view.capabilities.get(method.upper()) in CAPABILITIES, (route, method)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", Role.values)
def test_each_role_reads_and_writes_through_the_mlflow_mount_as_the_table_says(platform_server, make_user, token_for,
                                                                               role, unique_name):
    import requests

    headers = {"Authorization": f"Bearer {token_for(make_user(role))}"}
    read = requests.get(f"{platform_server}/api/2.0/mlflow/registered-models/search", headers=headers, timeout=10)
    write = requests.post(f"{platform_server}/api/2.0/mlflow/registered-models/create", headers=headers,
                          json={"name": unique_name}, timeout=10)
    delete = requests.delete(f"{platform_server}/api/2.0/mlflow/registered-models/delete", headers=headers,
                             json={"name": unique_name}, timeout=10)
    assert read.status_code == (200 if roles_allow({role}, Cap.MODEL_READ) else 403)
    assert write.status_code == (200 if roles_allow({role}, Cap.MODEL_REGISTER) else 403)
    # deleting a whole model is refused for everyone; only admins get as far as being told why
    assert delete.status_code == (409 if roles_allow({role}, Cap.USER_MANAGE) else 403)
