"""MLflow's own REST API served by the platform, behind the platform's authentication.

Requests under MLflow's standard paths go to MLflow's Flask app (in this process, on the platform's
store). Before that, the gate checks the caller's credentials and role; version creation runs under
the registry's per-model lock and is recorded by the platform in the same transaction, so a version
logged with the plain `mlflow` client is the same kind of citizen as one uploaded in the UI.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.handlers.wsgi import get_bytes_from_wsgi
from django.db import close_old_connections
from django.http.request import split_domain_port, validate_host
from django.utils.encoding import repercent_broken_unicode

from registry import archives, governance, mlflow_store, services
from registry.api.guard import url_problem
from registry.audit import Actor
from registry.auth import authenticate_header
from registry.mlflow_store import REGISTRATION_TAG
from registry.models import ModelVersion, VersionStatus
from registry.roles import Cap, roles_allow
from registry.tokens import effective_roles

PREFIXES = ("/api/2.0/mlflow", "/api/3.0/mlflow", "/ajax-api/2.0/mlflow", "/ajax-api/3.0/mlflow")
_ENDPOINT_RE = re.compile(r"^/(?:ajax-)?api/[23]\.0/mlflow/(.*)$")
# POSTs that only read.
_READ_POSTS = {"runs/search", "experiments/search", "logged-models/search", "experiments/get-by-name",
               "metrics/get-history-bulk-interval", "traces/search", "datasets/search"}
_ADMIN_ONLY = {"registered-models/delete", "model-versions/delete", "registered-models/rename",
               "experiments/delete", "runs/delete"}

StartResponse = Callable[..., Any]
log = logging.getLogger(__name__)


def is_mlflow_path(path: str) -> bool:
    return path.startswith(PREFIXES)


def _json_error(start_response: StartResponse, status: str, code: str, message: str,
                extra: list[tuple[str, str]] | None = None, exc_info: Any = None) -> list[bytes]:
    body = json.dumps({"error_code": code, "message": message}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            *(extra or [])], *([exc_info] if exc_info else []))
    return [body]


def _flask_app() -> Any:
    from registry import mlflow_store

    mlflow_store.configure_server_environment()
    import os

    os.environ.setdefault("MLFLOW_SERVER_ALLOWED_HOSTS", "*")  # the gate checks Host itself
    from mlflow.server import app, handlers

    # Let MLflow set its stores up as its server does (that also points its internal client at the
    # store), then swap in the platform's registry store: one connection pool, the faster model read.
    handlers._get_tracking_store()
    handlers._get_model_registry_store()
    handlers._model_registry_store = mlflow_store.registry_store()
    return app


class MlflowGate:
    def __init__(self) -> None:
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = _flask_app()
        return self._app

    def warm(self) -> None:
        self.app  # noqa: B018 - building it is the point

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        close_old_connections()
        try:
            return self._handle(environ, start_response)
        except Exception:
            # MLflow's wire format, not the web server's HTML page; the traceback stays in the log.
            log.exception("MLflow gate failed on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _json_error(start_response, "500 Internal Server Error", "INTERNAL_ERROR",
                               "internal error: the request failed on the server, which logged it",
                               exc_info=sys.exc_info())
        finally:
            close_old_connections()

    def _handle(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # The API's own check: a NUL would fail in MLflow's queries.
        path = repercent_broken_unicode(get_bytes_from_wsgi(environ, "PATH_INFO", "")).decode()  # as Django reads it
        refused = url_problem(path, get_bytes_from_wsgi(environ, "QUERY_STRING", ""))
        if refused:
            return _json_error(start_response, "400 Bad Request", "INVALID_PARAMETER_VALUE", refused[0])
        host = environ.get("HTTP_HOST", "")
        domain, _port = split_domain_port(host)
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            return _json_error(start_response, "400 Bad Request", "BAD_REQUEST", f"host {host!r} is not allowed")
        found = authenticate_header(environ.get("HTTP_AUTHORIZATION", ""))
        if found is None:
            return _json_error(start_response, "401 Unauthorized", "UNAUTHENTICATED",
                               "authenticate with MLFLOW_TRACKING_TOKEN (a platform API token) or "
                               "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD",
                               [("WWW-Authenticate", 'Bearer realm="mlflow"')])
        user, token = found
        roles = effective_roles(user, token)
        # Werkzeug routes `post` as POST: every check here must see the method as MLflow will.
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        match = _ENDPOINT_RE.match(environ.get("PATH_INFO", ""))
        endpoint = match.group(1).rstrip("/") if match else ""
        if environ.get("PATH_INFO", "").startswith(("/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts")):
            endpoint = "artifacts"
        needed = Cap.MODEL_READ
        if method not in ("GET", "HEAD") and endpoint not in _READ_POSTS:
            needed = Cap.USER_MANAGE if endpoint in _ADMIN_ONLY else Cap.MODEL_REGISTER
        if endpoint == "webhooks" or endpoint.startswith("webhooks/"):
            # MLflow's webhooks make the server call URLs of the caller's choosing: administrators only (the
            # platform's own are /api/v1/receivers/).
            needed = Cap.USER_MANAGE
        if not roles_allow(roles, needed):
            return _json_error(start_response, "403 Forbidden", "PERMISSION_DENIED",
                               f"your roles ({', '.join(sorted(roles)) or 'none'}) do not allow {method} {endpoint}")
        actor = Actor(user, "mlflow")  # type: ignore[arg-type]
        if method == "POST" and endpoint == "model-versions/create":
            return self._create_version(environ, start_response, actor)
        if method == "POST" and endpoint == "registered-models/create":
            return self._create_model(environ, start_response, actor)
        if endpoint == "registered-models/rename":
            return _json_error(start_response, "409 Conflict", "INVALID_STATE",
                               "renaming models is not supported: register the versions under a new name")
        if endpoint == "registered-models/delete":
            # A re-created model would number its versions from 1 again and clash with the history
            # the platform keeps; versions are deleted (archived) one by one instead.
            return _json_error(start_response, "409 Conflict", "INVALID_STATE",
                               "deleting a registered model is not supported: delete (archive) its versions")
        if method == "DELETE" and endpoint == "model-versions/delete":
            return self._delete_version(environ, start_response, actor)
        if method in ("POST", "DELETE") and endpoint == "registered-models/alias":
            return self._change_alias(environ, start_response, actor, method)
        return self.app(environ, start_response)

    # -- the endpoints the platform takes part in ------------------------------------------------

    def _call(self, environ: dict[str, Any], body: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        environ = dict(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return lambda _data: None

        chunks = self.app(environ, capture)
        try:
            data = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return captured["status"], captured["headers"], data

    @staticmethod
    def _read_json(environ: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            data = json.loads(body or b"{}")
            if isinstance(data, str):  # double-encoded, as old clients send it: MLflow decodes it again too
                data = json.loads(data)
        except json.JSONDecodeError:
            data = {}
        return body, data if isinstance(data, dict) else {}

    @staticmethod
    def _reply(start_response: StartResponse, status: str, headers: list[tuple[str, str]],
               data: bytes) -> list[bytes]:
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(data)))])
        return [data]

    def _create_model(self, environ: dict[str, Any], start_response: StartResponse, actor: Actor) -> list[bytes]:
        body, data = self._read_json(environ)
        name = str(data.get("name", ""))
        try:
            archives.check_model_name(name)
        except archives.ArchiveError as exc:
            return _json_error(start_response, "400 Bad Request", "INVALID_PARAMETER_VALUE", str(exc))
        status, headers, out = self._call(environ, body)
        if status.startswith("200"):
            services.model_record_from_mlflow(actor, name)
        return self._reply(start_response, status, headers, out)

    def _create_version(self, environ: dict[str, Any], start_response: StartResponse, actor: Actor) -> list[bytes]:
        body, data = self._read_json(environ)
        name, source = str(data.get("name", "")), str(data.get("source", ""))
        try:
            archives.check_model_name(name)
            services.version_check_mlflow_source(source)
        except (archives.ArchiveError, services.RegistryError) as exc:
            return _json_error(start_response, "400 Bad Request", "INVALID_PARAMETER_VALUE", str(exc))
        except archives.PolicyError as exc:
            return _json_error(start_response, "422 Unprocessable Entity", "INVALID_PARAMETER_VALUE", str(exc))
        tags = data.get("tags", [])
        if isinstance(tags, list):  # marked as the platform's (see mlflow_store.REGISTRATION_TAG)
            if any(isinstance(t, dict) and t.get("key") == REGISTRATION_TAG for t in tags):
                return _json_error(start_response, "400 Bad Request", "INVALID_PARAMETER_VALUE",
                                   f"tag key {REGISTRATION_TAG!r} is the platform's own (it marks the versions it "
                                   "registers)")
            data["tags"] = [*tags, {"key": REGISTRATION_TAG, "value": "mlflow-client"}]
            body = json.dumps(data).encode()
        reply: dict[str, Any] = {}

        def forward() -> int | None:
            reply["status"], reply["headers"], reply["data"] = self._call(environ, body)
            if not reply["status"].startswith("200"):
                return None
            return int(json.loads(reply["data"])["model_version"]["version"])

        services.version_create_via_mlflow(actor, name, forward)
        return self._reply(start_response, reply["status"], reply["headers"], reply["data"])

    def _delete_version(self, environ: dict[str, Any], start_response: StartResponse, actor: Actor) -> list[bytes]:
        body, data = self._read_json(environ)
        try:
            governance.version_guard(str(data.get("name", "")), int(data.get("version", 0) or 0))
        except governance.ProtectedAliasError as exc:
            return _json_error(start_response, "403 Forbidden", "PERMISSION_DENIED", str(exc))
        except (ValueError, TypeError):
            pass  # not a number: MLflow answers that
        status, headers, out = self._call(environ, body)
        if status.startswith("200"):
            version = ModelVersion.objects.filter(model__name=str(data.get("name", "")),
                                                  version=int(data.get("version", 0) or 0)).first()
            if version is not None and version.status != VersionStatus.ARCHIVED:
                services.version_transition(version.pk, VersionStatus.ARCHIVED, actor, "deleted through MLflow")
        return self._reply(start_response, status, headers, out)

    def _change_alias(self, environ: dict[str, Any], start_response: StartResponse, actor: Actor,
                      method: str) -> list[bytes]:
        """Set (POST) or delete (DELETE) an alias: refused for a protected model's production aliases, whoever
        asks; recorded in the audit log when it happens."""
        body, data = self._read_json(environ)
        name, alias = data.get("name"), data.get("alias")
        if not isinstance(name, str) or not isinstance(alias, str) or not name or not alias:
            return _json_error(start_response, "400 Bad Request", "INVALID_PARAMETER_VALUE",
                               "give the model's name and the alias as JSON strings: {\"name\": ..., \"alias\": ...}")
        try:
            governance.alias_guard(name, alias, "set" if method == "POST" else "delete")
        except governance.ProtectedAliasError as exc:
            return _json_error(start_response, "403 Forbidden", "PERMISSION_DENIED", str(exc))
        try:
            before = mlflow_store.aliases(name).get(alias)
        except Exception:  # noqa: BLE001 - no such model: MLflow's answer below says so
            before = None
        status, headers, out = self._call(environ, body)
        if status.startswith("200"):
            version = int(data["version"]) if method == "POST" and str(data.get("version", "")).isdigit() else None
            governance.alias_recorded(actor, name, alias, before, version)
        return self._reply(start_response, status, headers, out)
