"""WSGI entry point: MLflow's REST paths go through the registry's gate to MLflow's app; everything
else is Django."""

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

django_app = get_wsgi_application()

from registry.mlflow_server import MlflowGate, is_mlflow_path  # noqa: E402 - needs Django set up

mlflow_gate = MlflowGate()
mlflow_gate.warm()  # import MLflow's server at worker start, not on a client's first request


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and not environ.get("CONTENT_LENGTH"):
        return _length_required(start_response)
    if is_mlflow_path(environ.get("PATH_INFO", "")):
        return mlflow_gate(environ, start_response)
    return django_app(environ, start_response)


def _length_required(start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A chunked request body would reach the app empty (uWSGI does not decode it, Django reads
    Content-Length bytes): refuse it plainly instead."""
    message = ("send the request body with a Content-Length: chunked bodies (Transfer-Encoding: chunked) are not "
               "accepted. With curl, upload a file (--data-binary @file.zip or -T file.zip), not standard input.")
    body = json.dumps({"error": {"status": 411, "code": "length_required", "message": message}}).encode()
    start_response("411 Length Required", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                           ("Connection", "close")])
    return [body]
