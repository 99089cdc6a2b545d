"""WSGI entry point: MLflow's REST paths go through the registry's gate to MLflow's app; everything
else is Django."""

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
    if is_mlflow_path(environ.get("PATH_INFO", "")):
        return mlflow_gate(environ, start_response)
    return django_app(environ, start_response)
