"""Fixtures shared by every app's tests. The suite runs against real PostgreSQL and Redis, started by
`python -m config.stack exec` (make test) or named by DATABASE_URL / REDIS_URL."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from rest_framework.test import APIClient

from registry.roles import Role


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    from registry.audit import SYSTEM
    from registry.people import user_create

    def make(*roles: str, username: str | None = None, password: str = "") -> Any:
        return user_create(SYSTEM, username or f"user-{uuid.uuid4().hex[:8]}", list(roles), password=password)

    return make


@pytest.fixture
def token_for(db: None) -> Callable[..., str]:
    from registry.audit import SYSTEM
    from registry.tokens import token_create

    def issue(user: Any, roles: list[str] | None = None) -> str:
        return token_create(SYSTEM, user, "test", roles).raw

    return issue


@pytest.fixture
def client_as(make_user: Callable[..., Any], token_for: Callable[..., str]) -> Callable[..., APIClient]:
    """An API client authenticated with a bearer token of a new user holding `roles`."""

    def make(*roles: str) -> APIClient:
        client = APIClient()
        user = make_user(*roles)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
        client.user = user  # type: ignore[attr-defined]
        return client

    return make


@pytest.fixture
def scientist(client_as: Callable[..., APIClient]) -> APIClient:
    return client_as(Role.DATA_SCIENTIST)


@pytest.fixture
def unique_name() -> str:
    """MLflow's tables are not rolled back between tests: every test names its own models."""
    return f"m-{uuid.uuid4().hex[:10]}"


# ---- models to register -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sklearn_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logistic regression on scikit-learn's bundled digits, saved as an MLflow model folder."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=200).fit(X[:1000], y[:1000])
    path = tmp_path_factory.mktemp("models") / "digits-logreg"
    mlflow.sklearn.save_model(model, str(path), input_example=X[:5], signature=infer_signature(X[:5], model.predict(X[:5])))
    return path


@pytest.fixture(scope="session")
def model_archive(sklearn_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    base = tmp_path_factory.mktemp("archives") / "digits-logreg"
    return Path(shutil.make_archive(str(base), "gztar", root_dir=sklearn_model_dir))


# ---- the platform served over HTTP in-process ---------------------------------------------------

class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def platform_server(transactional_db: None) -> Iterator[str]:
    """The platform's full WSGI app (Django + the MLflow mount) on a free loopback port."""
    from config.wsgi import application

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server("127.0.0.1", port, application, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
