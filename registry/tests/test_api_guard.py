"""Bad input to the API is a 400 naming where it was, never a 500; every error under /api/ is JSON, 500s
included. Characters PostgreSQL refuses (NUL, lone surrogates, bytes that are not UTF-8) in query
strings, paths and bodies; the API's schema drives a sweep so that new endpoints are covered too."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory

from registry import selectors
from registry.mlflow_server import MlflowGate
from registry.models import AuditEvent, RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db


def assert_json_error(resp: Any, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.content
    assert resp["Content-Type"].startswith("application/json"), resp["Content-Type"]
    error = resp.json()["error"]
    assert error["status"] == status
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return str(error["message"])


@pytest.fixture
def admin(client_as: Any) -> Any:
    return client_as(Role.ADMIN)


# ---- query strings -----------------------------------------------------------------------------

def test_a_nul_in_the_tag_filter_is_a_400_naming_the_parameter(scientist):
    assert_json_error(scientist.get("/api/v1/models/?tag=%00"), 400, "query parameter 'tag'", "NUL")


def test_a_nul_inside_the_search_text_is_a_400_naming_the_parameter(scientist):
    assert_json_error(scientist.get("/api/v1/models/?search=a%00b"), 400, "query parameter 'search'", "NUL")


@pytest.mark.parametrize("param", ["ordering", "page", "page_size"])
def test_a_nul_in_ordering_or_paging_is_a_400(scientist, param):
    assert_json_error(scientist.get(f"/api/v1/models/?{param}=name%00"), 400, f"'{param}'", "NUL")


def test_a_nul_in_a_query_parameter_name_is_a_400(scientist):
    assert_json_error(scientist.get("/api/v1/models/?se%00arch=x"), 400, "its name", "NUL")


@pytest.mark.parametrize("value", ["%ff", "caf%E9", "%ED%A0%80"])  # a lone byte, latin-1, an encoded surrogate
def test_a_query_value_that_is_not_utf8_is_a_400_not_silently_replaced(scientist, value):
    assert_json_error(scientist.get(f"/api/v1/models/?search={value}"), 400, "'search'", "not valid UTF-8")


def test_ordinary_utf8_and_plus_signs_in_a_query_still_work(scientist, unique_name):
    scientist.post("/api/v1/models/", {"name": unique_name, "description": "café au lait"}, format="json")
    resp = scientist.get("/api/v1/models/?search=caf%C3%A9+au")
    assert resp.status_code == 200, resp.content
    assert [m["name"] for m in resp.json()["results"]] == [unique_name]


def test_a_nul_in_an_audit_filter_is_a_400(client_as):
    client = client_as(Role.ONCALL)
    assert_json_error(client.get("/api/v1/audit/?actor=%00"), 400, "'actor'", "NUL")


# ---- paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/models/a%00b/", "/api/v1/models/a%00b/versions/",
                                  "/api/v1/users/a%00b/"])
def test_a_path_segment_the_database_cannot_store_is_a_400(admin, path):
    assert_json_error(admin.get(path), 400, "path segment 'a\\")


# ---- JSON bodies -------------------------------------------------------------------------------

def test_a_nul_in_a_json_description_is_a_400_naming_the_field(scientist, unique_name):
    resp = scientist.post("/api/v1/models/", {"name": unique_name, "description": "a\x00b"}, format="json")
    assert_json_error(resp, 400, "description", "NUL character")
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


def test_a_nul_in_a_tag_key_is_a_400_naming_the_key(scientist, unique_name):
    resp = scientist.post("/api/v1/models/", {"name": unique_name, "tags": {"te\x00am": "x"}}, format="json")
    message = assert_json_error(resp, 400, "tags", "key 'te\\x00am'", "NUL")
    assert message.startswith("tags: ")
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


def test_a_nul_in_a_tag_key_of_an_edit_is_a_400_and_changes_nothing(scientist, unique_name):
    scientist.post("/api/v1/models/", {"name": unique_name, "tags": {"team": "a"}}, format="json")
    resp = scientist.patch(f"/api/v1/models/{unique_name}/", {"tags": {"\x00": "b"}}, format="json")
    assert_json_error(resp, 400, "tags", "NUL")
    assert RegisteredModel.objects.get(name=unique_name).tags == {"team": "a"}


def test_a_nul_deep_inside_a_body_is_named_by_its_path(scientist, unique_name):
    resp = scientist.post("/api/v1/models/", {"name": unique_name, "tags": {"team": ["ok", "a\x00"]}},
                          format="json")
    assert_json_error(resp, 400, "tags.team[1]: contains a NUL")


@pytest.mark.parametrize("body", [
    '{"name": "%s", "description": "\\ud800"}',
    '{"name": "%s", "tags": {"\\udfff": "x"}}',
    '{"name": "%s", "tags": {"team": "\\ud83d"}}',
])
def test_a_lone_surrogate_in_json_is_a_400(scientist, unique_name, body):
    resp = scientist.post("/api/v1/models/", body % unique_name, content_type="application/json")
    assert_json_error(resp, 400, "surrogate")
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


def test_json_nested_too_deeply_to_parse_is_a_400(scientist):
    resp = scientist.post("/api/v1/models/", "[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert_json_error(resp, 400, "nested too deeply")


# ---- form and multipart bodies -----------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "words"), [
    ("description", "a\x00b", ["description: contains a NUL"]),
    ("tags", '{"team\\u0000": "x"}', ["tags: key 'team\\x00'", "NUL"]),  # a NUL only once the JSON is read
])
def test_a_nul_in_a_field_of_an_archive_upload_is_a_400(scientist, unique_name, model_archive, field, value, words):
    upload = SimpleUploadedFile("model.tar.gz", model_archive.read_bytes())
    resp = scientist.post(f"/api/v1/models/{unique_name}/versions/", {"archive": upload, field: value},
                          format="multipart")
    assert_json_error(resp, 400, *words)
    assert not RegisteredModel.objects.filter(name=unique_name).exists()


def test_a_nul_in_a_form_field_name_is_a_400(scientist, unique_name):
    scientist.post("/api/v1/models/", {"name": unique_name}, format="json")
    resp = scientist.patch(f"/api/v1/models/{unique_name}/", "tags.a%00b=x",
                           content_type="application/x-www-form-urlencoded")
    assert_json_error(resp, 400, "key 'tags.a\\x00b'", "NUL")
    assert RegisteredModel.objects.get(name=unique_name).tags == {}


# ---- errors Django answers by itself -----------------------------------------------------------

@pytest.mark.parametrize("debug", [False, True])  # in DEBUG, Django's page would show traceback and settings
def test_an_exception_in_a_view_is_a_logged_json_500_that_leaks_nothing(scientist, monkeypatch, caplog, settings,
                                                                        debug):
    settings.DEBUG = debug

    def broken(*args: Any) -> Any:
        raise RuntimeError("password=hunter2 at db.internal:5432")

    monkeypatch.setattr(selectors, "model_list", broken)
    scientist.raise_request_exception = False
    with caplog.at_level(logging.ERROR, logger="django.request"):
        resp = scientist.get("/api/v1/models/", HTTP_ACCEPT="text/html")
    assert_json_error(resp, 500, "internal error")
    assert resp.json()["error"]["code"] == "server_error"
    assert b"hunter2" not in resp.content and b"Traceback" not in resp.content
    logged = [r for r in caplog.records if r.exc_info and "hunter2" in str(r.exc_info[1])]
    assert logged, "the exception and its traceback are logged"


@pytest.mark.parametrize("debug", [False, True])
def test_an_unknown_api_path_is_a_json_404(scientist, settings, debug):
    settings.DEBUG = debug
    resp = scientist.get("/api/v1/no-such-thing/", HTTP_ACCEPT="text/html")
    assert_json_error(resp, 404, "no API endpoint at '/api/v1/no-such-thing/'")
    assert resp.json()["error"]["code"] == "not_found"


def test_an_unknown_path_outside_the_api_keeps_its_html_page(scientist):
    resp = scientist.get("/no-such-page/")
    assert resp.status_code == 404
    assert not resp["Content-Type"].startswith("application/json")


def test_a_request_for_a_host_not_allowed_is_a_json_400(scientist):
    resp = scientist.get("/api/v1/models/", HTTP_HOST="evil.example")
    assert_json_error(resp, 400, "Bad Request")


# ---- the MLflow gate -----------------------------------------------------------------------------

class _StartResponse:
    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status, self.headers = status, dict(headers)
        return lambda data: None


def _call_gate(path: str) -> tuple[_StartResponse, dict[str, Any]]:
    environ = RequestFactory().get(path, HTTP_HOST="testserver").environ
    start = _StartResponse()
    body = b"".join(MlflowGate()(environ, start))
    return start, json.loads(body)


def test_a_crash_in_the_mlflow_gate_is_an_mlflow_json_500(monkeypatch, caplog):
    import registry.mlflow_server as gate

    def broken(header: str) -> Any:
        raise RuntimeError("password=hunter2")

    monkeypatch.setattr(gate, "authenticate_header", broken)
    with caplog.at_level(logging.ERROR, logger="registry.mlflow_server"):
        start, body = _call_gate("/api/2.0/mlflow/registered-models/search")
    assert start.status.startswith("500") and start.headers["Content-Type"] == "application/json"
    assert body["error_code"] == "INTERNAL_ERROR" and "hunter2" not in body["message"]
    assert any(r.exc_info for r in caplog.records)


def test_a_nul_in_an_mlflow_query_is_an_mlflow_json_400():
    start, body = _call_gate("/api/2.0/mlflow/registered-models/get?name=a%00b")
    assert start.status.startswith("400")
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "'name'" in body["message"]


# ---- a sweep over every endpoint the schema documents --------------------------------------------

def _schema(client: Any) -> dict[str, Any]:
    resp = client.get("/api/schema/?format=json")
    assert resp.status_code == 200
    return dict(resp.json())


def _fill(path: str, params: list[dict[str, Any]], nul_in: str = "") -> str:
    for p in params:
        if p["in"] == "path":
            value = "a%00b" if p["name"] == nul_in else ("1" if p["schema"].get("type") == "integer" else "x")
            path = path.replace("{" + p["name"] + "}", value)
    return path


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()
            if method in ("get", "post", "patch", "put", "delete")]


def test_every_documented_query_parameter_refuses_a_nul(admin):
    probes = [(path, op, p["name"]) for path, method, op in _operations(_schema(admin)) if method == "get"
              for p in op.get("parameters", []) if p["in"] == "query"]
    assert len(probes) >= 10  # the sweep sees the list endpoints' filters and paging
    for path, op, name in probes:
        url = f"{_fill(path, op.get('parameters', []))}?{name}=a%00b"
        assert_json_error(admin.get(url), 400, f"query parameter '{name}'", "NUL")


def test_every_documented_text_path_parameter_refuses_a_nul(admin):
    probes = [(path, method, op, p["name"]) for path, method, op in _operations(_schema(admin))
              for p in op.get("parameters", []) if p["in"] == "path" and p["schema"].get("type") == "string"]
    assert probes
    for path, method, op, name in probes:
        resp = getattr(admin, method)(_fill(path, op["parameters"], nul_in=name))
        assert_json_error(resp, 400, "path segment", "NUL")


def test_every_documented_json_body_field_refuses_a_nul_in_text_and_keys(admin):
    schema = _schema(admin)
    components = schema["components"]["schemas"]
    probes = []
    for path, method, op in _operations(schema):
        ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
        if not ref:
            continue
        for field, prop in components[ref.rsplit("/", 1)[1]].get("properties", {}).items():
            if prop.get("readOnly") or prop.get("format") == "binary":
                continue
            if prop.get("type") == "string":
                probes.append((path, method, op, field, "a\x00b"))
            elif prop.get("type") in (None, "object"):  # a dict or free JSON: its keys are text too
                probes.append((path, method, op, field, {"a\x00b": "x"}))
    assert {p[3] for p in probes} >= {"name", "description", "tags", "source", "model"}
    events = AuditEvent.objects.count()
    for path, method, op, field, value in probes:
        resp = getattr(admin, method)(_fill(path, op.get("parameters", [])), {field: value}, format="json")
        assert_json_error(resp, 400, field, "NUL")
    assert AuditEvent.objects.count() == events  # nothing was done
