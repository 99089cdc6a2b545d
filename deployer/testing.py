"""Support for the deployer's tests and benchmarks (bench/rollback): a gateway process (or a data plane on
its own) and stopping what a killed one leaves, waiting for a condition, versions whose engines are the
fault-injectable echo model, and a constant client load through the gateway that records every answer."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.stack import free_port, wait_for_port
from deployer.gateway.dataplane import BINARY_NAME, DataPlane
from deployer.gateway.echo_model import write_echo_model

REPO = Path(__file__).resolve().parents[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
               every: Callable[[], Any] | None = None, interval: float = 0.2) -> Any:
    """Poll `check` (after calling `every`, if given) until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if every is not None:
            every()
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the process exited with {proc.returncode}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def gateway_process(redis_url: str, log_path: Path, *args: str,
                    port: int | None = None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A gateway process following the routing table in `redis_url`: (its port, the process). With `port`, on
    that port (a data plane serving it is adopted). A data plane it started that is left running at the end
    (its control plane was killed, by the test or by the timeout here) is stopped then."""
    port = port or free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deployer.gateway", "--port", str(port), "--routes-from",
                                 redis_url, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        started: list[int] = []
        try:
            wait_for_port(port, 30, proc)
            started = children(proc.pid)
            yield port, proc
        finally:
            stop_process(proc, 10)
            for pid in started:
                stop_dataplane(pid, 10)


@contextlib.contextmanager
def dataplane_process(*args: str, on_sample: Callable[[dict[str, bytes]], bool] | None = None,
                      ) -> Iterator[tuple[DataPlane, int]]:
    """A data plane on a free loopback port with `args`, this process its control plane: (it, its port)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gw-") as tmp:
        dataplane = DataPlane.attach(Path(tmp) / "control.sock", ["--listen", f"127.0.0.1:{port}", *args],
                                     on_sample=on_sample)
        try:
            yield dataplane, port
        finally:
            assert dataplane.stop() == 0


def children(pid: int) -> list[int]:
    """The processes `pid` started that are still its children."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    found = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie not yet reaped by whoever it was handed to counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop_dataplane(pid: int, timeout_s: float) -> None:
    """SIGTERM to a gateway data plane (not our child), then SIGKILL if it has not exited within `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if process_gone(pid) or os.path.basename(os.readlink(f"/proc/{pid}/exe")) != BINARY_NAME:
                return  # gone, perhaps reaped and its pid taken by another process
            os.kill(pid, sig)
        except (FileNotFoundError, ProcessLookupError):
            return
        deadline = time.monotonic() + timeout_s
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def echo_version(model: str, archive: Path, factor: float, workdir: Path, fault_file: Path | None = None) -> Any:
    """A ready version of `model` whose kept cpu/fp32 engine is the echo model multiplying by `factor`
    (failing or slow while `fault_file` holds a fault), stored in MLflow's artifact store like a real build."""
    from pipelines.models import BuildStatus, EngineBuild
    from registry import mlflow_store
    from registry.audit import SYSTEM
    from registry.models import ModelVersion, VersionStatus
    from registry.services import version_register_from_archive

    version = version_register_from_archive(SYSTEM, model, archive)
    # Granted directly: validation and engine builds are tested in registry/ and pipelines/.
    ModelVersion.objects.filter(pk=version.pk).update(status=VersionStatus.READY)
    triton_model = f"{model}_v{version.version}_cpu-fp32-onnxruntime"
    key = f"echo-{model}-{version.version}"
    entry_root = workdir / key
    write_echo_model(entry_root / "python", triton_model, factor, fault_file=fault_file)
    uri = f"mlflow-artifacts:/engines/{key}"
    mlflow_store.upload_artifacts(entry_root, uri, "triton")
    EngineBuild.objects.create(version=version, target="cpu", precision="fp32", runtime="onnxruntime",
                               content_key=key, status=BuildStatus.SUCCEEDED, engine_uri=uri,
                               io={"triton_model_name": triton_model})
    version.refresh_from_db()
    return version


@dataclass
class Load:
    """Client threads sending inference requests to the gateway back to back, recording each outcome:
    (status, the version that answered, factor seen)."""

    port: int
    model: str
    threads: int = 3
    pause_s: float = 0.004
    outcomes: Counter[tuple[int, str, float]] = field(default_factory=Counter)
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (status, version, detail)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)
    last_answer: dict[str, float] = field(default_factory=dict)  # version -> time.monotonic() of its last answer

    def __enter__(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self.workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.workers:
            t.join(30)

    def _run(self) -> None:
        body = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopping.is_set():
            try:
                conn.request("POST", f"/v2/models/{self.model}/infer", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                version = resp.getheader("x-model-version") or ""
                factor = 0.0
                if resp.status == 200:
                    factor = float(json.loads(data)["outputs"][0]["data"][0])
                with self.lock:
                    self.outcomes[(resp.status, version, factor)] += 1
                    self.last_answer[version] = time.monotonic()
                    if resp.status != 200:
                        self.failures.append((resp.status, version, data[:200].decode(errors="replace")))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                with self.lock:
                    self.failures.append((0, "", f"client error: {exc!r}"))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.stopping.wait(self.pause_s)
        conn.close()

    def total(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())

    def by_version(self, status: int = 200) -> dict[str, int]:
        with self.lock:
            out: Counter[str] = Counter()
            for (s, version, _), n in self.outcomes.items():
                if s == status:
                    out[version] += n
            return dict(out)

    def failed_outside(self, version: str | None = None) -> list[tuple[int, str, str]]:
        """Failures not returned by `version` itself: connection errors, errors of other versions, no route."""
        with self.lock:
            return [f for f in self.failures if version is None or f[1] != version]


def servable_model(name: str, versions: int = 2, status: str = "ready", engines: bool = True,
                   int8: bool = True) -> Any:
    """Rows only: a model with versions 1..`versions`, each with a kept fp32 CPU engine and (`int8`) an int8
    one (content keys `<name>-<n>` and `<name>-<n>-i8`, Triton names `<name>_v<n>`), for tests that start at
    the API or a page."""
    from pipelines.models import EngineBuild
    from registry.models import ModelVersion, RegisteredModel

    model = RegisteredModel.objects.create(name=name, latest_version=versions, version_count=versions)
    for n in range(1, versions + 1):
        v = ModelVersion.objects.create(model=model, version=n, status=status, source="x", origin="upload")
        if engines:
            EngineBuild.objects.create(version=v, target="cpu", precision="fp32", runtime="onnxruntime",
                                       content_key=f"{name}-{n}", status="succeeded", engine_uri="mlflow-artifacts:/x",
                                       io={"triton_model_name": f"{name}_v{n}"})
        if engines and int8:
            EngineBuild.objects.create(version=v, target="cpu", precision="int8", runtime="onnxruntime",
                                       content_key=f"{name}-{n}-i8", status="succeeded",
                                       engine_uri="mlflow-artifacts:/y", io={"triton_model_name": f"{name}_v{n}_i8"})
    return model


def champion_after(model: Any, previous: int, current: int, *, restored: bool = False) -> Any:
    """Rows only: version `current` serving as champion, promoted by a rollout that replaced `previous` (a
    champion rollback's restore when `restored`); returns that deployment."""
    from django.utils import timezone

    from deployer.models import Deployment, Endpoint, RolloutMode, RolloutStatus
    from pipelines.models import EngineBuild

    v_prev, v_cur = model.versions.get(version=previous), model.versions.get(version=current)
    engine = EngineBuild.objects.get(content_key=f"{model.name}-{current}")
    Endpoint.objects.update_or_create(model=model, defaults={
        "stable_version": v_cur, "stable_engine": engine, "stable_triton_model": f"{model.name}_v{current}"})
    return Deployment.objects.create(
        model=model, version=v_cur, previous_version=v_prev, engine=engine, triton_model=f"{model.name}_v{current}",
        steps=[100], status=RolloutStatus.PROMOTED, step_index=0, weight=100, finished_at=timezone.now(),
        mode=RolloutMode.RESTORE if restored else RolloutMode.CANARY)


def awaiting_rollout(name: str, make_user: Callable[..., Any], **policy: Any) -> dict[str, Any]:
    """Rows only: a deployed, protected model (its promotion policy's other fields from `policy`): v2 its
    champion, v3's canary waiting for approval; v3 registered by `author` (a data scientist), its rollout
    started by `releaser` (a release manager). No promotion request is filed yet (the reconciler files it)."""
    from deployer.models import Deployment, RolloutStatus
    from registry import governance
    from registry.models import PromotionPolicy
    from registry.roles import Role

    model = servable_model(name, versions=3)
    champion_after(model, 1, 2)
    governance.model_mark_deployed(model)
    PromotionPolicy.objects.filter(model=model).update(protected=True, **policy)  # whatever the settings say
    author, releaser = make_user(Role.DATA_SCIENTIST), make_user(Role.RELEASE_MANAGER)
    v3 = model.versions.get(version=3)
    v3.created_by = author
    v3.save()
    d = Deployment.objects.create(model=model, version=v3, engine=v3.engine_builds.get(precision="fp32"),
                                  previous_version=model.versions.get(version=2), triton_model=f"{name}_v3",
                                  steps=[10, 50], step_index=1, weight=50, status=RolloutStatus.AWAITING_APPROVAL,
                                  requested_by=releaser, analysis={"outcome": "pass", "reason": "p99 12 ms <= 500 ms",
                                                                   "canary_requests": 400, "canary_p99_ms": 12.0})
    return {"model": model, "deployment": d, "author": author, "releaser": releaser}
