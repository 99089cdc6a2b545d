"""Model code runs confined (registry/confinement.py): spy models, opened the ways the platform opens
models (validation, engine builds), write down what they can reach, and each property is checked:
another uid with no capabilities, no secret readable, no connection anywhere (loopback included), no
write outside scratch, no view of other processes, nothing left running, and limits that stop a
payload with the reason recorded."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from registry import confinement
from registry.inspection import inspect_model
from registry.models import ModelVersion, VersionStatus
from registry.tasks import version_validate
from registry.tests.conftest import model_code
from registry.tests.test_sandbox import assert_nothing_registered, post_archive, running_with, tar_gz

SECRET_NAMES = ("DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_TRACKING_TOKEN",
                "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "PLATFORM_API_TOKEN")

if not confinement.status()[0]:
    pytest.skip(f"the model sandbox cannot be set up on this machine: {confinement.status()[1]}",
                allow_module_level=True)

SPY_SOURCE = '''
import json
import os
import socket
import subprocess
import sys
import time

import mlflow.pyfunc
from sklearn.linear_model import LogisticRegression


def _attempt(action):
    try:
        return "REACHED: " + repr(action())[:40]
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"[:80]


def _connect(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"


def _write(path):
    with open(path, "w") as fh:
        return fh.write("spy")


def spy(plan):
    """Everything a hostile model would try, written down, then raised so the platform records it."""
    found = {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]}
    with open("/proc/self/status") as fh:
        found["cap_eff"] = next(line.split()[1] for line in fh if line.startswith("CapEff"))
    found["env"] = dict(os.environ)
    found["reads"] = {path: _attempt(lambda path=path: open(path, "rb").read(8))
                      for path in [*plan["secrets"], f"/proc/{os.getppid()}/environ", "/proc/1/environ"]}
    found["connects"] = {f"{host}:{port}": _attempt(lambda host=host, port=port: _connect(host, port))
                         for host, port in plan["targets"]}
    found["udp"] = _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)))
    found["unix"] = {path: _attempt(lambda path=path: socket.socket(socket.AF_UNIX).connect(path))
                     for path in plan["sockets"]}
    found["writes"] = {path: _attempt(lambda path=path: _write(path)) for path in plan["outside"]}
    found["scratch"] = _attempt(lambda: _write(os.path.join(os.environ["HOME"], "notes")))
    found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    processes = []
    for pid in found["pids"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                processes.append(fh.read().replace(b"\\0", b" ").decode(errors="replace")[:60])
        except OSError as exc:
            processes.append(f"unreadable: {exc}")
    found["processes"] = processes
    # Something meant to outlive the model: its own session, ignoring hang-ups.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", plan["marker"]],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    raise RuntimeError("SPY " + json.dumps(found))


def exceed(limit):
    """Run into one of the sandbox's limits."""
    if limit == "cpu":
        while True:
            pass
    if limit == "memory":
        hoard = [bytearray(256 * 1024 * 1024) for _ in range(64)]
        return len(hoard)
    if limit == "file":
        with open(os.path.join(os.environ["HOME"], "big"), "wb") as fh:
            for _ in range(64):
                fh.write(b"x" * (1024 * 1024))
    if limit == "processes":
        return [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(64)]
    if limit == "time":
        time.sleep(600)
    raise AssertionError(f"unknown limit {limit}")


class SpyModel(mlflow.pyfunc.PythonModel):
    """A pyfunc model: validation opens it with mlflow.pyfunc.load_model."""

    def __init__(self, plan):
        self.plan = plan

    def load_context(self, context):
        if self.plan.get("exceed"):
            exceed(self.plan["exceed"])
        spy(self.plan)

    def predict(self, context, model_input, params=None):
        return model_input


class SpyEstimator(LogisticRegression):
    """A scikit-learn model: engine builds unpickle it to export it."""

    def __setstate__(self, state):
        plan = state.pop("spy_plan")
        super().__setstate__(state)
        if plan.get("exceed"):
            exceed(plan["exceed"])
        spy(plan)
'''


@pytest.fixture(scope="module")
def spies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with model_code(tmp_path_factory.mktemp("spy-code"), "confinement_spies", SPY_SOURCE) as module:
        yield module


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A server on the host's loopback that no model may reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def make_plan(tmp_path: Path, listener: socket.socket, **extra: Any) -> dict[str, Any]:
    db = settings.DATABASES["default"]
    redis_url = settings.CELERY_BROKER_URL
    redis_host, redis_port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    state = Path(settings.STATE_DIR)
    outside = tmp_path / "outside.txt"
    marker = f"spy-marker-{os.getpid()}-{time.monotonic_ns()}"
    return {
        "secrets": [str(state / "secret_key"), str(state / "pg_password"), str(state / "admin_password"),
                    str(state / "pgdata" / "PG_VERSION"), str(Path(settings.BASE_DIR) / "config" / "settings.py"),
                    "/etc/shadow", "/root/.bash_history"],
        "targets": [[db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)], [redis_host, int(redis_port)],
                    ["127.0.0.1", listener.getsockname()[1]], ["1.1.1.1", 443]],
        "sockets": ["/var/run/postgresql/.s.PGSQL.5432", "/run/postgresql/.s.PGSQL.5432"],
        "outside": [str(outside), f"/tmp/{marker}", str(Path(sys.prefix) / marker), f"/{marker}"],
        "marker": marker,
        **extra,
    }


def save_pyfunc_spy(spies: Any, dest: Path, plan: dict[str, Any]) -> Path:
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(str(dest), python_model=spies.SpyModel(plan), code_paths=[str(spies.FILE)],
                             pip_requirements=["mlflow"])
    return dest


def findings(error: str) -> dict[str, Any]:
    assert "SPY " in error, error
    found: dict[str, Any] = json.loads(error.split("SPY ", 1)[1])
    return found


def assert_contained(found: dict[str, Any], plan: dict[str, Any], listener: socket.socket) -> None:
    uid, gid = settings.PLATFORM["SANDBOX_UID"], settings.PLATFORM["SANDBOX_GID"]
    assert found["ids"] == [uid, uid, gid, gid, []] and uid not in (0, os.getuid())
    assert int(found["cap_eff"], 16) == 0
    leaked = {k: v for k, v in found["env"].items()
              if any(w in k for w in ("SECRET", "PASSWORD", "TOKEN", "DATABASE", "REDIS", "BROKER", "KEY"))}
    assert not leaked
    given = {k for k in found["env"] if not k.startswith("KMP_")}  # KMP_*: set by OpenMP as torch loads
    assert given <= {"PATH", "HOME", "TMPDIR", "PYTHONNOUSERSITE", "PYTHONDONTWRITEBYTECODE", "LANG",
                                 "LC_ALL", "TZ", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    for table in ("reads", "connects", "unix", "writes"):
        reached = {k: v for k, v in found[table].items() if v.startswith("REACHED")}
        assert not reached, (table, reached)
    assert "Network is unreachable" in found["connects"][f"127.0.0.1:{listener.getsockname()[1]}"]
    assert not found["udp"].startswith("REACHED"), found["udp"]
    assert found["scratch"].startswith("REACHED"), found["scratch"]  # and yet its own scratch is writable
    # Only the sandbox's own processes, numbered from 1 in its own PID namespace: its init and the model.
    assert found["pids"] == [1, 2], found["processes"]
    with pytest.raises(BlockingIOError):
        listener.accept()
    deadline = time.monotonic() + 5
    while running_with(plan["marker"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_with(plan["marker"]) == []
    for path in plan["outside"]:
        assert not Path(path).exists(), path


# ---- what a model can reach ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_model_validated_by_the_worker_reaches_no_secret_no_network_no_other_file_and_leaves_nothing_running(
        scientist, unique_name, spies, tmp_path, listener, monkeypatch):
    for name in SECRET_NAMES:  # whatever the platform holds, the worker holds too
        monkeypatch.setenv(name, os.environ.get(name) or f"secret-value-of-{name.lower()}")
    plan = make_plan(tmp_path, listener)
    folder = save_pyfunc_spy(spies, tmp_path / "spy", plan)
    assert post_archive(scientist, unique_name, tar_gz(folder)).status_code == 201
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    version_validate(version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.INVALID  # the spy raises to report what it found
    assert version.inspection["confined"] is True
    found = findings(version.status_detail)
    assert_contained(found, plan, listener)
    for name in SECRET_NAMES:
        assert all(os.environ[name] not in value for value in found["env"].values()), name


@pytest.mark.django_db(transaction=True)
def test_an_engine_build_unpickles_the_model_only_inside_the_sandbox(unique_name, spies, tmp_path, listener):
    import mlflow.sklearn
    from sklearn.datasets import load_digits

    from pipelines.builder import engine_build_execute
    from pipelines.models import BuildStatus, EngineBuild
    from pipelines.tests.test_builds import _ready_version

    plan = make_plan(tmp_path, listener)
    X, y = load_digits(return_X_y=True)
    model = spies.SpyEstimator(max_iter=50).fit(X[:200], y[:200])
    model.spy_plan = plan  # pickled with the model, read back by __setstate__ when the build opens it
    folder = tmp_path / "spy-sklearn"
    mlflow.sklearn.save_model(model, str(folder), serialization_format="cloudpickle", code_paths=[str(spies.FILE)],
                              input_example=X[:3], pip_requirements=["scikit-learn"])
    archive = tmp_path / "spy.tar.gz"
    archive.write_bytes(tar_gz(folder))
    version = _ready_version(unique_name, archive)
    build = EngineBuild.objects.filter(version=version, precision="fp32").get()
    assert engine_build_execute(build.pk, "test-worker") == BuildStatus.FAILED
    build.refresh_from_db()
    assert_contained(findings(build.error), plan, listener)


def test_the_sandbox_runs_as_the_configured_uid_and_a_payload_that_cannot_start_says_why(settings, tmp_path):
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_UID": 4242, "SANDBOX_GID": 4343}
    job = confinement.Job(script=None, args=["-c", "import os; print(os.getuid(), os.getgid())"], read_only=[],
                          writable=[tmp_path / "home"], timeout_s=60, timeout_setting="(test)")
    outcome = confinement.run(job)
    assert (outcome.confined, outcome.returncode, outcome.stdout.split()) == (True, 0, ["4242", "4343"])
    missing = confinement.Job(script=tmp_path / "not-there.py", args=[], read_only=[tmp_path / "absent-model"],
                              writable=[tmp_path / "home2"], timeout_s=60, timeout_setting="(test)")
    outcome = confinement.run(missing)
    assert outcome.returncode != 0 and outcome.report("X") is None
    assert "not-there.py" in outcome.failure()


# ---- limits ----------------------------------------------------------------------------------------

def _inspect_exceeding(spies: Any, tmp_path: Path, listener: socket.socket, limit: str) -> dict[str, Any]:
    plan = make_plan(tmp_path, listener, exceed=limit)
    return inspect_model(save_pyfunc_spy(spies, tmp_path / f"exceeds-{limit}", plan))


@pytest.mark.django_db(transaction=True)
def test_a_model_that_hoards_memory_is_stopped_and_the_limit_is_recorded_on_the_version(
        scientist, unique_name, spies, tmp_path, listener, settings):
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_MEMORY_BYTES": 3 * 1024**3}
    folder = save_pyfunc_spy(spies, tmp_path / "hoarder", make_plan(tmp_path, listener, exceed="memory"))
    assert post_archive(scientist, unique_name, tar_gz(folder)).status_code == 201
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    version_validate(version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.INVALID
    assert "MemoryError" in version.status_detail
    assert f"memory limit is {3 * 1024**3} bytes, PLATFORM_SANDBOX_MEMORY_BYTES" in version.status_detail


def test_a_model_that_spins_is_killed_at_its_cpu_limit(spies, tmp_path, listener, settings):
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_CPU_S": 12, "INSPECT_TIMEOUT_S": 120}
    started = time.monotonic()
    report = _inspect_exceeding(spies, tmp_path, listener, "cpu")
    assert report["ok"] is False
    assert report["error"] == ("loading the model used more than 12 s of CPU (PLATFORM_SANDBOX_CPU_S) "
                               "and was killed")
    assert time.monotonic() - started < 60


def test_a_model_that_writes_a_huge_file_is_stopped_at_the_file_size_limit(spies, tmp_path, listener, settings):
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_FILE_BYTES": 8 * 1024 * 1024}
    report = _inspect_exceeding(spies, tmp_path, listener, "file")
    assert report["ok"] is False
    assert "File too large" in report["error"]
    assert f"largest file it may write is {8 * 1024 * 1024} bytes, PLATFORM_SANDBOX_FILE_BYTES" in report["error"]


def test_a_model_that_forks_without_end_is_stopped_at_the_process_limit(spies, tmp_path, listener, settings):
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_PROCESSES": 24}
    report = _inspect_exceeding(spies, tmp_path, listener, "processes")
    assert report["ok"] is False
    assert "Resource temporarily unavailable" in report["error"]
    assert "allows 24 processes and threads, PLATFORM_SANDBOX_PROCESSES" in report["error"]


# ---- where the sandbox cannot be set up -------------------------------------------------------------

@pytest.fixture
def no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement, "_probe", lambda: "the worker does not run as root (simulated by the test)")


@pytest.mark.django_db
def test_without_a_sandbox_pickle_flavors_are_refused_at_registration_with_a_422_naming_the_opt_in(
        scientist, unique_name, no_sandbox, pickled_sklearn_dir):
    resp = post_archive(scientist, unique_name, tar_gz(pickled_sklearn_dir))
    assert resp.status_code == 422, resp.content
    message = resp.json()["error"]["message"]
    assert "cannot isolate model code here (the worker does not run as root" in message
    assert "PLATFORM_ALLOW_UNCONFINED_MODEL_CODE=true" in message
    assert_nothing_registered(unique_name)


@pytest.mark.django_db
def test_without_a_sandbox_pickle_free_models_still_register_and_the_opt_in_lets_pickles_through(
        scientist, unique_name, no_sandbox, pickled_sklearn_dir, onnx_dir, settings):
    assert post_archive(scientist, unique_name, tar_gz(onnx_dir)).status_code == 201
    settings.PLATFORM = {**settings.PLATFORM, "ALLOW_UNCONFINED_MODEL_CODE": True}
    assert post_archive(scientist, unique_name, tar_gz(pickled_sklearn_dir)).status_code == 201


def test_without_a_sandbox_a_worker_does_not_open_a_pickle_it_was_handed(no_sandbox, tmp_path, settings):
    report = inspect_model(tmp_path / "any-model", unpickles=True)
    assert report["ok"] is False and report["confined"] is False
    assert "PLATFORM_ALLOW_UNCONFINED_MODEL_CODE" in report["error"]


def test_a_sandbox_uid_that_owns_the_platforms_state_files_is_refused(settings):
    owner = next(p.stat().st_uid for p in Path(settings.STATE_DIR).iterdir() if p.stat().st_uid != 0)
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_UID": owner}
    assert "owns the platform's state files" in confinement._probe.__wrapped__()
    settings.PLATFORM = {**settings.PLATFORM, "SANDBOX_UID": 0}
    assert "is root" in confinement._probe.__wrapped__()
