"""Fixtures shared by every app's tests. The suite runs against real PostgreSQL and Redis, started by
`python -m config.stack exec` (make test) or named by DATABASE_URL / REDIS_URL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from registry.roles import Role

# HIL runs take a minute of both cores each: tests that deploy do so without them (the gate off, no runs
# requested when an engine is kept), here and in the platform processes they start (which inherit this
# environment). The HIL tests turn both on (the `hil_on` fixture, pipelines/tests).
HIL_OFF = {"PLATFORM_HIL_GATE": "false", "PLATFORM_HIL_AUTO": "false"}
os.environ.update(HIL_OFF)
# Likewise the protection a deployed model gets by default (its champion moves only through an approved
# promotion): the rollout tests deploy a model again and again and test the rollout's own mechanics. The
# governance tests turn it on (the `governed` fixture), as do `make run` and the demo.
os.environ["PLATFORM_PROTECT_DEPLOYED"] = "false"


@pytest.fixture(autouse=True, scope="session")
def _hil_off_in_process() -> None:
    from django.conf import settings

    settings.PLATFORM["HIL_GATE"] = settings.PLATFORM["HIL_AUTO"] = False
    settings.PLATFORM["PROTECT_DEPLOYED"] = False


@pytest.fixture
def hil_on(settings: Any) -> None:
    """The HIL gate and automatic runs on, for this test (in this process)."""
    settings.PLATFORM = {**settings.PLATFORM, "HIL_GATE": True, "HIL_AUTO": True}


@pytest.fixture
def governed(settings: Any) -> None:
    """Deployed models protected, as outside the tests, for this test (in this process)."""
    settings.PLATFORM = {**settings.PLATFORM, "PROTECT_DEPLOYED": True}


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
    signature = infer_signature(X[:5], model.predict(X[:5]))
    # Requirements given: MLflow's inference of them loads the model in a subprocess (6-8 s, 25 s on a busy machine).
    mlflow.sklearn.save_model(model, str(path), input_example=X[:5], signature=signature,
                              pip_requirements=["scikit-learn"])
    return path


@pytest.fixture(scope="session")
def model_archive(sklearn_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    base = tmp_path_factory.mktemp("archives") / "digits-logreg"
    return Path(shutil.make_archive(str(base), "gztar", root_dir=sklearn_model_dir))


# ---- the platform served over HTTP --------------------------------------------------------------

def _die_with_parent() -> None:
    """Child processes of the test run end when it ends, however it ends (Linux parent-death signal)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _test_database_url() -> str:
    from urllib.parse import urlsplit, urlunsplit

    from django.conf import settings

    return urlunsplit(urlsplit(settings.DATABASE_URL)._replace(path="/" + settings.DATABASES["default"]["NAME"]))


@contextmanager
def _child_process(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[
        subprocess.Popen[bytes]]:
    """A platform process on the test database, logging to log_path, stopped at the end."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args],
                                env={**os.environ, "DATABASE_URL": _test_database_url(), **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="session")
def _platform_process(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The platform as production runs it (uWSGI, config.wsgi) on a free port, on the test database.
    A separate process, so the mlflow client under test and MLflow's server share no globals."""
    from config.stack import free_port, wait_for_port
    from registry import mlflow_store

    mlflow_store.init_store()  # MLflow's tables first: two workers must not both run its migrations
    port = free_port()
    args = ["config.web", "--http11-socket", f"127.0.0.1:{port}", "--processes", "2", "--threads", "16"]
    with _child_process(args, tmp_path_factory.mktemp("server") / "web.log") as proc:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def platform_server(_platform_process: str, transactional_db: None) -> str:
    """Base URL of the running platform; the test's data is committed so the server sees it."""
    return _platform_process


@pytest.fixture(scope="session")
def _worker_process(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real Celery worker on the test database and the embedded Redis broker."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    args = ["celery", "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "2",
            "--queues", "default,pipelines", "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h"]
    with _child_process(args, log_path):
        yield log_path


@pytest.fixture
def platform_process(tmp_path: Path, transactional_db: None) -> Callable[..., Any]:
    """Start a platform process, `python -m <args>`, on the test database: a context manager that stops it
    (`with platform_process(["celery", ...], "worker", {"VAR": "1"}) as proc:`); logs in tmp_path."""
    return lambda args, name, env=None: _child_process(args, tmp_path / f"{name}.log", env)


@pytest.fixture
def celery_worker_process(_worker_process: Path, transactional_db: None) -> Path:
    """Path of the worker's log; tasks enqueued after commit run in the real worker."""
    return _worker_process


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A page of Debian's headless Chromium driven by Playwright; fails the test on a page error, a server
    error or a missing static asset."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (run `make browser` as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 500 or (
            "/static/" in r.url and r.status >= 400) else None)
        try:
            yield page
        finally:
            context.close()
            browser.close()
        assert not errors, errors
