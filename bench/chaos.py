"""Chaos drills (issue 11): SIGKILL one part of a running platform at a time, under constant inference
traffic, a stream of registrations and a rollout in progress, and measure what users saw and how long the
platform took to be whole again.

The platform is the one `make run` starts (`python -m config.stack run --no-demo`, its own state folder
and ports). Before each kill: a rollout of the serving model is progressing (versions 1 and 2 take
turns), a client sends inference requests through the gateway at a steady rate, and another registers a
version every few seconds (each with its own Idempotency-Key, retried with the same key on a lost
connection, 502, 503 or 504, honouring Retry-After, until a definite answer). The faults, in turn:

    redis     the embedded Redis server                     back: PING answers (a new process)
    postgres  the embedded PostgreSQL's postmaster          back: SQL answers (a new postmaster)
    worker    the Celery worker (default, pipelines, hardware targets) with its pool and build processes, while an
              engine build runs                             back: the new worker logs "ready"
    deployer  the deployer's Celery worker, while a rollout progresses     back: it logs "ready"
    beat      Celery beat                                   back: the new beat logs "Starting"
    web       one uWSGI worker process                      back: the master's new worker loaded the app
    gateway   the gateway's control plane (only it: its data plane should keep serving)
                                                            back: a new control plane announced itself
    triton    one of the two local Triton nodes, with its backend processes
                                                            back: the node is ready again (its models loaded)

Measured per trial:
- failed inference: requests that got anything but a 200, or no answer, during the trial;
- lost: registrations answered 201, or never given a definite answer, that are not in the registry;
- duplicated: versions beyond the one the client was told about (two for one registration, or one for a
  registration answered with an error), in the platform's registry or in MLflow's, counted once the
  registry reconciler has had its turn (a version a registration left in MLflow when it was cut off before
  the platform's commit is deleted by it, within REGISTRY_SETTLE_S);
- stuck: the trial's versions still `validating`, or their builds still queued or running, STUCK_AFTER_S
  after recovery; rollouts stuck: the trial's rollout still active STUCK_AFTER_S after recovery;
- recovery: seconds from "back" (above) until all of: no inference request fails any more; a
  registration sent at that moment is answered 201; both Celery workers answer a ping through the broker;
  the rollout reconciler runs a pass (its analysis is stamped, or the rollout ended); and every validation
  or build that a worker had claimed when the kill came is taken over: claimed again by a live worker, in
  line again (a build requeued, a validation sent again) or finished. Waiting in line for a busy worker
  is capacity, not recovery, and is not counted.

Targets (the issue's): 0 failed inference requests for every fault but the loss of the last Triton node
(here one node of two dies, so 0 there too), 0 lost, duplicated or stuck, 0 rollouts stuck, recovery
under 10 s. The bench reports what it saw and says which targets were missed; it asserts nothing.

    python -m bench.chaos [--quick] [--trials N] [--faults redis,web,...]

Prints a table and ends with one line of JSON. tests/test_chaos.py runs one trial of each and asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import requests

from bench._common import fmt, free_port, table
from config.stack import env_for_own_servers
from deployer.testing import wait_until

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("redis", "postgres", "worker", "deployer", "beat", "web", "gateway", "triton")
RECOVERY_TARGET_S = 10.0
STUCK_AFTER_S = 60.0  # a validation takes ~13 s and a build ~25 s on a loaded 2-core machine
BACK_TIMEOUT_S = 180.0
REGISTRY_SETTLE_S = 90.0  # the registry reconciler's period (60 s) and some
GIVE_UP_S = 180.0  # a registration with no definite answer after this long counts as unanswered
SERVING = "chaos-serving"  # the model taking traffic and being rolled out
REGISTERED = "chaos-registrations"  # the model the registration stream adds versions to
ROLLOUT = {"steps": [20, 50], "step_interval_s": 8, "bake_s": 0, "max_p99_ms": 2000.0}
RETRYABLE = {502, 503, 504}
REGISTERED_AGAIN = "a registration answered 201"
TAKEN_OVER = "taken over: "  # a validation or build claimed when the kill came, claimed again or finished

# Trains the demo model in a process of its own (it imports Django's models, so it needs settings).
TRAIN = """
import sys
from pathlib import Path
import django
django.setup()
from registry.management.commands.seed_demo import train_demo_model
print(train_demo_model(Path(sys.argv[1])))
"""


# ---- the platform ------------------------------------------------------------------------------------


@dataclass
class Platform:
    """`python -m config.stack run --no-demo` on free ports, with a state folder of its own."""

    state: Path
    proc: subprocess.Popen[str]
    web_port: int
    gateway_port: int
    password: str = ""
    database_url: str = ""
    redis_url: str = ""
    output: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, state: Path, timeout_s: float = 420.0) -> Platform:
        env = env_for_own_servers()
        web_port, gateway_port = free_port(), free_port()
        env.update(PLATFORM_PORT=str(web_port), PLATFORM_GATEWAY_PORT=str(gateway_port))
        proc = subprocess.Popen([sys.executable, "-m", "config.stack", "--state", str(state), "run", "--no-demo"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        platform = cls(state, proc, web_port, gateway_port)
        threading.Thread(target=platform._read_output, name="stack-output", daemon=True).start()
        try:
            wait_until(lambda: any(line.startswith("Logs:") for line in platform.output), timeout_s,
                       "the platform to start", proc=proc)  # type: ignore[arg-type]
        except BaseException:
            platform.stop()
            raise
        for line in platform.output:
            if line.startswith("Admin login:"):
                platform.password = line.rsplit("/", 1)[1].strip()
            elif m := re.match(r"\s+postgres\s+127\.0\.0\.1:(\d+)", line):
                pg_password = (state / "pg_password").read_text().strip()
                platform.database_url = f"postgresql://postgres:{pg_password}@127.0.0.1:{m[1]}/platform"
            elif m := re.match(r"\s+redis\s+(redis://\S+)", line):
                platform.redis_url = m[1]
        return platform

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: the stack stops everything
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.database_url, connect_timeout=2, autocommit=True) as conn:
            return conn.execute(query, args).fetchall()  # type: ignore[arg-type]

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)

    def workers_answer(self, names: tuple[str, ...] = ("worker", "deployer")) -> bool:
        """Whether a Celery worker of each name answers a ping through the broker (it is consuming)."""
        from celery import Celery

        app = Celery("chaos-probe", broker=self.redis_url, set_as_current=False, fixups=[])
        app.conf.broker_connection_timeout = 2
        try:
            replies = app.control.ping(timeout=0.5)
        finally:
            app.close()
        answered = {name.partition("@")[0] for reply in replies for name in reply}
        return set(names) <= answered


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (zombies left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state_and_rest = (entry / "stat").read_text().rpartition(")")[2].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if state_and_rest[0] != "Z" and command:
            found[int(entry.name)] = (int(state_and_rest[1]), command)
    return found


def _children(pid: int, procs: dict[int, tuple[int, str]]) -> list[int]:
    return sorted(p for p, (parent, _) in procs.items() if parent == pid)


def _tree(pid: int, procs: dict[int, tuple[int, str]]) -> list[int]:
    """The process and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p, procs))
    return out


def _stack_child(p: Platform, marker: str) -> int | None:
    """The stack's process whose command line holds `marker` (the stack restarts it when it dies)."""
    procs = _processes()
    return next((c for c in _children(p.proc.pid, procs) if marker in procs[c][1]), None)


def _log_after(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---- the faults ----------------------------------------------------------------------------------------


@dataclass
class Target:
    """What one kill hits: the processes SIGKILLed together, and what tells that it is back."""

    pids: list[int]
    what: str
    is_back: Callable[[], bool]


def _redis_target(p: Platform) -> Target:
    old = int(p.redis().info("server")["process_id"])

    def back() -> bool:
        try:
            return int(p.redis().info("server")["process_id"]) != old
        except Exception:  # noqa: BLE001 - not answering yet
            return False

    return Target([old], f"redis-server pid {old}", back)


def _postgres_target(p: Platform) -> Target:
    pid_file = p.state / "pgdata" / "postmaster.pid"
    old = int(pid_file.read_text().split()[0])

    def back() -> bool:
        try:
            return int(pid_file.read_text().split()[0]) != old and p.sql("select 1") == [(1,)]
        except Exception:  # noqa: BLE001 - not answering yet
            return False

    return Target([old], f"postmaster pid {old}", back)


def _celery_target(p: Platform, name: str) -> Target:
    """A Celery worker of the stack (`--hostname <name>@`): its main process, pool and what they run."""
    marker = f"--hostname {name}@"
    main = _stack_child(p, marker)
    if main is None:
        raise RuntimeError(f"no {name} process under the stack")
    pids = _tree(main, _processes())
    log, offset = p.log(name), _size(p.log(name))

    def back() -> bool:
        new = _stack_child(p, marker)
        return new not in (None, main) and re.search(rf"{name}@\S+ ready\.", _log_after(log, offset)) is not None

    return Target(pids, f"celery {name} pid {main} and its {len(pids) - 1} children", back)


def _beat_target(p: Platform) -> Target:
    main = _stack_child(p, "config beat")
    if main is None:
        raise RuntimeError("no beat process under the stack")
    log, offset = p.log("beat"), _size(p.log("beat"))

    def back() -> bool:
        return _stack_child(p, "config beat") not in (None, main) and "beat: Starting" in _log_after(log, offset)

    return Target([main], f"celery beat pid {main}", back)


def _web_target(p: Platform) -> Target:
    master = _stack_child(p, "config.web")
    if master is None:
        raise RuntimeError("no web server under the stack")
    workers = _children(master, _processes())
    if not workers:
        raise RuntimeError("the web server has no worker processes")
    victim, log, offset = workers[0], p.log("web"), _size(p.log("web"))

    def back() -> bool:
        # lazy-apps: a respawned worker imports the app, then uWSGI logs "... ready in N seconds ... pid: N"
        new = [w for w in _children(master, _processes()) if w not in workers]
        text = _log_after(log, offset)
        return any(re.search(rf"ready in \d+ seconds .* pid: {w}\b", text) for w in new)

    return Target([victim], f"uWSGI worker pid {victim} (of {len(workers)})", back)


def _gateway_target(p: Platform) -> Target:
    from deployer.gateway.routing import INSTANCES_KEY

    control = _stack_child(p, "deployer.gateway")
    if control is None:
        raise RuntimeError("no gateway under the stack")
    killed_at = time.time()

    def back() -> bool:
        if _stack_child(p, "deployer.gateway") in (None, control):
            return False
        try:
            raw = p.redis().hget(INSTANCES_KEY, f"127.0.0.1:{p.gateway_port}")
        except Exception:  # noqa: BLE001
            return False
        return raw is not None and float(json.loads(raw).get("seen", 0)) > killed_at + 0.5

    return Target([control], f"gateway control plane pid {control} (not its data plane)", back)


def _triton_target(p: Platform) -> Target:
    from deployer.fleet_local import NODES_KEY

    nodes = {k.decode(): json.loads(v) for k, v in p.redis().hgetall(NODES_KEY).items()}
    ready = sorted(name for name, info in nodes.items() if info.get("ready") and info.get("pid"))
    if len(ready) < 2:
        raise RuntimeError(f"two ready Triton nodes expected, found {ready}")
    name, old = ready[0], int(nodes[ready[0]]["pid"])
    pids = _tree(old, _processes())

    def back() -> bool:
        try:
            info = json.loads(p.redis().hget(NODES_KEY, name) or "{}")
        except Exception:  # noqa: BLE001
            return False
        return bool(info.get("ready")) and info.get("pid") not in (None, old)

    return Target(pids, f"Triton {name} pid {old} with {len(pids) - 1} backend processes ({len(ready)} nodes "
                        "ready)", back)


TARGETS: dict[str, Callable[[Platform], Target]] = {
    "redis": _redis_target, "postgres": _postgres_target, "worker": lambda p: _celery_target(p, "worker"),
    "deployer": lambda p: _celery_target(p, "deployer"), "beat": _beat_target, "web": _web_target,
    "gateway": _gateway_target, "triton": _triton_target,
}


# ---- clients -------------------------------------------------------------------------------------------


class Api:
    """The platform's REST API, retried the way a careful client does: on a lost connection, 502, 503
    or 504 (after Retry-After), with the same Idempotency-Key for a POST, until a definite answer."""

    def __init__(self, port: int, token: str = "", auth: tuple[str, str] | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.auth = auth

    def call(self, method: str, path: str, *, give_up_s: float = GIVE_UP_S, key: str = "",
             files: Callable[[], dict[str, Any]] | None = None, **kwargs: Any) -> tuple[requests.Response | None, int]:
        """The definite answer (None if there was none within give_up_s) and how many attempts it took."""
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        deadline, attempts = time.monotonic() + give_up_s, 0
        while True:
            attempts += 1
            wait = 1.0
            try:
                resp = requests.request(method, self.base + path, headers=headers, auth=self.auth, timeout=60,
                                        files=files() if files else None, **kwargs)
                if resp.status_code not in RETRYABLE:
                    return resp, attempts
                wait = float(resp.headers.get("Retry-After") or 1.0)
            except requests.RequestException:
                pass
            if time.monotonic() + wait > deadline:
                return None, attempts
            time.sleep(wait)

    def json(self, path: str) -> Any:
        resp, _ = self.call("GET", path)
        if resp is None or resp.status_code != 200:
            raise RuntimeError(f"GET {path}: {resp.status_code if resp is not None else 'no answer'}")
        return resp.json()

    def post(self, path: str, body: dict[str, Any], idempotent: bool = True) -> Any:
        resp, _ = self.call("POST", path, key=uuid.uuid4().hex if idempotent else "", json=body)
        if resp is None or resp.status_code != 201:
            raise RuntimeError(f"POST {path}: {resp.status_code if resp is not None else 'no answer'} "
                               f"{resp.text[:500] if resp is not None else ''}")
        return resp.json()


@dataclass
class Registration:
    """One logical registration (one Idempotency-Key), tagged chaos.id = id."""

    id: str
    trial: str
    started: float
    finished: float = 0.0
    outcome: str = ""  # created | refused | unanswered
    version: int | None = None
    attempts: int = 0
    detail: str = ""


class Registrar:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.done: list[Registration] = []
        self.lock = threading.Lock()

    def register(self, archive: Path, trial: str, model: str = REGISTERED) -> Registration:
        reg = Registration(uuid.uuid4().hex[:16], trial, time.monotonic())
        form = {"tags": json.dumps({"chaos.id": reg.id, "chaos.trial": trial}), "description": f"chaos {trial}"}
        resp, reg.attempts = self.api.call(
            "POST", f"/api/v1/models/{model}/versions/", key=reg.id, data=form,
            files=lambda: {"archive": (archive.name, archive.read_bytes(), "application/gzip")})
        reg.finished = time.monotonic()
        if resp is None:
            reg.outcome = "unanswered"
        elif resp.status_code == 201:
            reg.outcome, reg.version = "created", int(resp.json()["version"])
        else:
            reg.outcome, reg.detail = "refused", f"{resp.status_code} {resp.text[:300]}"
        if model == REGISTERED:
            with self.lock:
                self.done.append(reg)
        return reg


class RegistrationStream:
    """A client registering a version every `interval_s` while the drill lets it (one at a time: a
    registration that is being retried holds the next one back, as a CI job would)."""

    def __init__(self, registrar: Registrar, archive: Path, interval_s: float) -> None:
        self.registrar, self.archive, self.interval_s = registrar, archive, interval_s
        self.trial = ""
        self.active, self.idle, self.stopping = threading.Event(), threading.Event(), threading.Event()
        self.idle.set()
        self.thread = threading.Thread(target=self._run, name="registrations", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.active.wait(0.2):
                continue
            self.idle.clear()
            try:
                self.registrar.register(self.archive, self.trial)
            finally:
                self.idle.set()
            self.stopping.wait(self.interval_s)

    def pause(self) -> None:
        self.active.clear()
        self.idle.wait(GIVE_UP_S + 60)

    def stop(self) -> None:
        self.stopping.set()
        self.active.clear()
        self.thread.join(GIVE_UP_S + 60)


class Traffic:
    """Inference clients at a steady total rate through the gateway; every failure kept with its time."""

    def __init__(self, port: int, model: str, rate: float, threads: int = 2) -> None:
        from sklearn.datasets import load_digits

        self.port, self.path, self.rate, self.threads = port, f"/v2/models/{model}/infer", rate, threads
        self.rows = load_digits().data.astype("float32")[:100].tolist()
        self.failures: list[tuple[float, str]] = []
        self.ok = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.workers = [threading.Thread(target=self._run, args=(i,), name=f"inference-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.workers:
            t.start()

    def _run(self, index: int) -> None:
        import http.client

        every, sent, started = self.threads / self.rate, 0, time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopping.is_set():
            row = self.rows[(sent * self.threads + index) % len(self.rows)]
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]})
            error = ""
            try:
                conn.request("POST", self.path, body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self.lock:
                if error:
                    self.failures.append((time.monotonic(), error))
                else:
                    self.ok += 1
            sent += 1
            self.stopping.wait(max(0.0, started + sent * every - time.monotonic()))
        conn.close()

    def failed_between(self, t0: float, t1: float) -> list[tuple[float, str]]:
        with self.lock:
            return [f for f in self.failures if t0 <= f[0] <= t1]

    def stop(self) -> None:
        self.stopping.set()
        for t in self.workers:
            t.join(40)


# ---- the drill -----------------------------------------------------------------------------------------


def _with_nonce(archive: Path, nonce: str, into: Path) -> Path:
    """The same model with one more file: other bytes, so its engines are built anew (not reused)."""
    out = into / f"model-{nonce}.tar.gz"
    data = nonce.encode()
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("./chaos-nonce.txt")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return out


@dataclass
class Drill:
    platform: Platform
    api: Api
    registrar: Registrar
    archive: Path
    work: Path
    rate: float
    stable: int = 1
    traffic: Traffic | None = None
    stream: RegistrationStream | None = None
    log: Callable[[str], None] = print

    # -- set-up

    def wait_built(self, model: str, number: int, timeout_s: float = 900) -> None:
        """Wait until the version is ready and its builds are done, one of them kept."""
        def built() -> bool:
            version = self.api.json(f"/api/v1/models/{model}/versions/{number}/")
            if version["status"] == "invalid":
                raise RuntimeError(f"{model} v{number} is invalid: {version['status_detail']}")
            if version["status"] != "ready":
                return False
            states = {b["status"] for b in self._builds(model, number)}
            return bool(states) and not states & {"queued", "running"} and "succeeded" in states

        wait_until(built, timeout_s, f"{model} v{number} to be validated and built", interval=2)

    def _builds(self, model: str, number: int) -> list[dict[str, Any]]:
        data = self.api.json(f"/api/v1/models/{model}/versions/{number}/builds/")
        return list(data["results"] if isinstance(data, dict) else data)

    def deploy(self, version: int, settings: dict[str, Any]) -> dict[str, Any]:
        # Without an Idempotency-Key: with one, the platform answers a 500 when it keeps the answer (its
        # history holds datetimes its JSON encoder refuses) and rolls the deployment back.
        return dict(self.api.post("/api/v1/deployments/", {"model": SERVING, "version": version, **settings},
                                  idempotent=False))

    def deployment(self, pk: int) -> dict[str, Any]:
        return dict(self.api.json(f"/api/v1/deployments/{pk}/"))

    def set_up(self) -> None:
        self.log("set-up: registering the serving model's two versions and waiting for their engines")
        for number, archive in ((1, self.archive), (2, _with_nonce(self.archive, "serving-v2", self.work))):
            reg = self.registrar.register(archive, "set-up", model=SERVING)
            if reg.version != number:
                raise RuntimeError(f"registering {SERVING} v{number}: {reg.outcome} {reg.detail}")
        for number in (1, 2):
            self.wait_built(SERVING, number)
        first = self.deploy(1, {})
        wait_until(lambda: self.deployment(first["id"])["status"] == "promoted", 300, "the first deployment",
                   interval=1)
        self.traffic = Traffic(self.platform.gateway_port, SERVING, self.rate)
        wait_until(lambda: self.traffic is not None and self.traffic.ok >= 20, 120, "inference answering")
        # The stream registers the bytes of the serving model's version 1: its engines are reused, not built.
        self.stream = RegistrationStream(self.registrar, self.archive, interval_s=10.0)

    def tear_down(self) -> None:
        if self.stream is not None:
            self.stream.stop()
        if self.traffic is not None:
            self.traffic.stop()

    # -- one trial

    def claims(self) -> dict[tuple[int, int], int]:
        """(kind, key) -> holding backend, for validations and builds claimed now (registry/locks.py)."""
        from registry.locks import KINDS

        kinds = [KINDS["version.validate"], KINDS["build.run"]]
        rows = self.platform.sql("select classid::int, objid::int, pid from pg_locks where locktype = 'advisory' "
                                 "and objsubid = 2 and granted and classid::int = any(%s)", kinds)
        return {(r[0], r[1]): r[2] for r in rows}

    def _resumed(self, kind: int, key: int, since_wall: float) -> bool:
        """Whether the validation or build is no longer left behind: finished, or in line again (a build
        requeued, a validation sent again: the reconcilers stamp it), or claimed by a live worker."""
        from registry.locks import KINDS

        if (kind, key) in self.claims():
            return True
        if kind == KINDS["version.validate"]:
            rows = self.platform.sql("select status, extract(epoch from updated_at) from registry_modelversion "
                                     "where id = %s", key)
            return not rows or rows[0][0] != "validating" or float(rows[0][1]) >= since_wall
        rows = self.platform.sql("select status from pipelines_enginebuild where id = %s", key)
        return not rows or rows[0][0] != "running"

    def _running_build(self, number: int) -> dict[str, Any] | None:
        return next((b for b in self._builds(REGISTERED, number) if b["status"] == "running"), None)

    def trial(self, fault: str, label: str) -> dict[str, Any]:
        """One kill of `fault` and what followed (see the module's docstring)."""
        assert self.stream is not None and self.traffic is not None
        started = time.monotonic()
        result: dict[str, Any] = {"fault": fault, "trial": label}
        self.stream.trial = label
        self.stream.active.set()
        rollout, version = self._arrange(fault, label, result)
        claimed = self.claims()
        target = TARGETS[fault](self.platform)
        killed_wall, killed = time.time(), time.monotonic()
        for pid in target.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log(f"{label}: SIGKILL {target.what}")
        result["killed"] = target.what
        try:
            wait_until(target.is_back, BACK_TIMEOUT_S, f"{fault} to be back", interval=0.1)
            result["back_s"] = round(time.monotonic() - killed, 2)
        except AssertionError:
            result.update(back_s=None, note=f"not back within {BACK_TIMEOUT_S:.0f}s")
        self._watch_recovery(label, rollout, claimed, killed_wall, result)
        self.stream.pause()  # no more registrations in this trial: its work and its rollout must finish
        settle_until = time.monotonic() + STUCK_AFTER_S
        final = self._rollout_end(rollout, settle_until)
        result.update(rollout=final["status"], rollout_reason=final.get("reason", ""),
                      rollouts_stuck=int(final["status"] not in ("promoted", "rolled_back")))
        if final["status"] == "promoted":
            self.stable = version
        stuck = self._settle(label, settle_until)
        result["stuck"] = len(stuck)
        if stuck:
            result["stuck_detail"] = stuck
        fails = self.traffic.failed_between(started, time.monotonic())
        result["failed_inference"] = len(fails)
        if fails:
            result["first_failures"] = sorted({f"{t - killed:+.1f}s {e}" for t, e in fails})[:5]
        return result

    def _arrange(self, fault: str, label: str, result: dict[str, Any]) -> tuple[int, int]:
        """What must be going on when the kill comes: a rollout progressing (its id and version), and for
        the worker an engine build of new bytes (not reused) running."""
        number = 0
        if fault == "worker":
            fresh = self.registrar.register(_with_nonce(self.archive, label, self.work), label)
            if fresh.version is None:
                raise RuntimeError(f"the fresh registration failed: {fresh.outcome} {fresh.detail}")
            number = fresh.version
            wait_until(lambda: self._running_build(number), 300, "an engine build to run", interval=0.5)
        version = 2 if self.stable == 1 else 1
        rollout = int(self.deploy(version, ROLLOUT)["id"])
        wait_until(lambda: self.deployment(rollout)["status"] != "pending", 180, "the canary to load", interval=0.5)
        if fault == "worker":
            result["build_running_at_kill"] = self._running_build(number) is not None
        return rollout, version

    def _watch_recovery(self, label: str, rollout: int, claimed: dict[tuple[int, int], int], killed_wall: float,
                        result: dict[str, Any]) -> None:
        """From "back": when each check first passed, each on its own clock. A registration sent at once
        (in a thread of its own: it may be retried for a while); both Celery workers consuming; the rollout
        reconciler ticking; the work in progress at the kill taken over (claimed again by a live worker, in
        line again, or finished). The database is read directly, so a failing web server hides none of it."""
        assert self.traffic is not None
        back_wall, back = time.time(), time.monotonic()
        probe: list[Registration] = []
        threading.Thread(target=lambda: probe.append(self.registrar.register(self.archive, label)),
                         name="probe-registration", daemon=True).start()
        checks: dict[str, Callable[[], bool]] = {
            REGISTERED_AGAIN: lambda: bool(probe) and probe[0].outcome == "created",
            "workers answer a ping": self.platform.workers_answer,
            "a rollout reconciler pass": lambda: self._reconciled_since(rollout, back_wall),
            # a claim is held only by a live worker: the database drops a dead one's with its connection
            **{f"{TAKEN_OVER}{self._claim_name(kind)} {key}": partial(self._resumed, kind, key, killed_wall)
               for kind, key in claimed},
        }
        seen: dict[str, float] = {}
        while len(seen) < len(checks) and time.monotonic() < back + STUCK_AFTER_S:
            for name, check in checks.items():
                try:
                    if name not in seen and check():
                        seen[name] = probe[0].finished if name == REGISTERED_AGAIN else time.monotonic()
                except Exception:  # noqa: BLE001 - the database or the broker still away: look again
                    pass
            time.sleep(0.3)
        if probe and probe[0].outcome != "created":
            result["probe_registration"] = f"{probe[0].outcome} {probe[0].detail}"
        missing = [name for name in checks if name not in seen]
        background = [t for name, t in seen.items() if name != REGISTERED_AGAIN]
        last_failure = max((t for t, _ in self.traffic.failed_between(back, time.monotonic())), default=back)
        parts = {"registration": seen[REGISTERED_AGAIN] - back if REGISTERED_AGAIN in seen else None,
                 "background": max(background, default=back) - back if not missing else None,
                 "inference": last_failure - back}
        known = [v for v in parts.values() if v is not None]
        result["recovery_s"] = round(max(known), 2) if len(known) == len(parts) and "note" not in result else None
        result["recovery_parts"] = {k: (round(v, 2) if v is not None else None) for k, v in parts.items()}
        result["background_s"] = {name: round(t - back, 2) for name, t in sorted(seen.items(), key=lambda i: i[1])}
        if missing:
            result["not_recovered"] = missing

    @staticmethod
    def _claim_name(kind: int) -> str:
        from registry.locks import KINDS

        return "validation" if kind == KINDS["version.validate"] else "build"

    def _reconciled_since(self, deployment_id: int, since_wall: float) -> bool:
        """Whether the rollout reconciler has passed over the deployment since then (each pass records its
        analysis with its time), or the rollout has ended (nothing is left to reconcile)."""
        rows = self.platform.sql("select extract(epoch from (analysis->>'at')::timestamptz), finished_at is not null "
                                 "from deployer_deployment where id = %s", deployment_id)
        return bool(rows) and (rows[0][1] or (rows[0][0] is not None and float(rows[0][0]) >= since_wall))

    def _rollout_end(self, deployment_id: int, until: float) -> dict[str, Any]:
        """The deployment once it ended, or as it is at `until`."""
        d = self.deployment(deployment_id)
        while d["status"] not in ("promoted", "rolled_back") and time.monotonic() < until:
            time.sleep(1)
            d = self.deployment(deployment_id)
        return d

    def _settle(self, label: str, until: float) -> list[str]:
        """The trial's versions still validating, or with builds queued or running, at `until` (waited for)."""
        while True:
            versions = [v for v in self.versions() if v["tags"].get("chaos.trial") == label]
            stuck = [f"v{v['version']} {v['status']}" for v in versions if v["status"] == "validating"]
            for v in versions:
                if v["status"] == "ready":
                    stuck += [f"v{v['version']} build {b['variant']} {b['status']}"
                              for b in self._builds(REGISTERED, v["version"]) if b["status"] in ("queued", "running")]
            if not stuck or time.monotonic() >= until:
                return stuck
            time.sleep(2)

    def versions(self, model: str = REGISTERED) -> list[dict[str, Any]]:
        out, page = [], 1
        while True:
            data = self.api.json(f"/api/v1/models/{model}/versions/?page_size=500&page={page}")
            out += data["results"]
            if not data.get("next"):
                return out
            page += 1

    def mlflow_versions(self, model: str = REGISTERED) -> list[dict[str, Any]]:
        """MLflow's own versions of the model, read through the platform's MLflow endpoint."""
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            params: dict[str, Any] = {"filter": f"name='{model}'", "max_results": 1000}
            if token:
                params["page_token"] = token
            resp, _ = self.api.call("GET", "/api/2.0/mlflow/model-versions/search", params=params)
            if resp is None or resp.status_code != 200:
                raise RuntimeError(f"MLflow's version search: {resp.status_code if resp is not None else 'no answer'}")
            data = resp.json()
            out += data.get("model_versions", [])
            token = data.get("next_page_token", "")
            if not token:
                return out


def account(registrations: list[Registration], platform_versions: list[dict[str, Any]],
            mlflow_versions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trial: registrations made, lost, duplicated, unanswered, refused (see the module's docstring),
    and what each lost or duplicated one was."""
    in_platform: dict[str, list[dict[str, Any]]] = {}
    for v in platform_versions:
        in_platform.setdefault(v["tags"].get("chaos.id", ""), []).append(v)
    in_mlflow: dict[str, list[str]] = {}
    for v in mlflow_versions:
        tags = {t["key"]: t["value"] for t in v.get("tags", [])}
        in_mlflow.setdefault(tags.get("chaos.id", ""), []).append(str(v["version"]))
    out: dict[str, dict[str, Any]] = {}
    for reg in registrations:
        row = out.setdefault(reg.trial, {"registrations": 0, "lost": 0, "duplicated": 0, "unanswered": 0,
                                         "refused": 0, "registration_detail": []})
        row["registrations"] += 1
        told = 1 if reg.outcome == "created" else 0
        found, in_ml = in_platform.get(reg.id, []), in_mlflow.get(reg.id, [])
        lost = int(reg.outcome in ("created", "unanswered") and not found)
        extra = max(0, max(len(found), len(in_ml)) - told)
        row["lost"] += lost
        row["duplicated"] += extra
        row["unanswered"] += int(reg.outcome == "unanswered")
        row["refused"] += int(reg.outcome == "refused")
        if lost or extra:
            row["registration_detail"].append({
                "id": reg.id, "answer": reg.outcome, "version": reg.version, "error": reg.detail,
                "attempts": reg.attempts, "mlflow_versions": in_ml,
                "platform_versions": {str(v["version"]): v["origin"] for v in found}})
    return out


def _mlflow_only_extras(per_trial: dict[str, dict[str, Any]]) -> int:
    return sum(len(d["mlflow_versions"]) - len(d["platform_versions"]) for row in per_trial.values()
               for d in row["registration_detail"] if len(d["mlflow_versions"]) > len(d["platform_versions"]))


def _settled_accounts(drill: Drill, registrar: Registrar, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The accounts, once the registry reconciler has had its turn: a registration cut off between MLflow's
    commit and the platform's leaves an MLflow version that the reconciler (every 60 s, config/settings.py)
    deletes. One still there after that is counted as a duplicate."""
    time.sleep(2)
    deadline = time.monotonic() + REGISTRY_SETTLE_S
    while True:
        per_trial = account(registrar.done, drill.versions(), drill.mlflow_versions())
        extras = _mlflow_only_extras(per_trial)
        if not extras or time.monotonic() > deadline:
            return per_trial
        log(f"{extras} MLflow version(s) not in the platform's registry: waiting for the registry reconciler")
        time.sleep(5)


# ---- running it ----------------------------------------------------------------------------------------


@contextmanager
def _training(work: Path) -> Iterator[subprocess.Popen[str]]:
    """Train the demo model while the platform starts: it needs Django's settings, not their database."""
    env = env_for_own_servers()
    env.update(DATABASE_URL="postgresql://unused@127.0.0.1:1/unused", PLATFORM_STATE_DIR=str(work / "training"),
               DJANGO_SETTINGS_MODULE="config.settings")
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(work)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _trained(proc: subprocess.Popen[str]) -> Path:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"training the demo model failed:\n{out}\n{err}")
    return Path(out.strip().splitlines()[-1])


@contextmanager
def platform_for_drills(state: Path, log: Callable[[str], None] = print) -> Iterator[Platform]:
    """A fresh platform in `state` (under the repository's .state/: PostgreSQL runs as 'nobody' as root)."""
    shutil.rmtree(state, ignore_errors=True)
    log(f"starting the platform in {state}")
    platform = Platform.start(state)
    try:
        yield platform
    finally:
        platform.stop()


def run_drills(state: Path, faults: tuple[str, ...] = FAULTS, trials: int = 1, rate: float = 25.0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start a platform, run `trials` trials of each fault, stop it; the figures (see summarize)."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp, _training(Path(tmp)) as training, \
            platform_for_drills(state, log) as platform:
        work = Path(tmp)
        admin = Api(platform.web_port, auth=("admin", platform.password))
        token = admin.post("/api/v1/tokens/", {"name": "chaos drills"})["token"]
        api = Api(platform.web_port, token=token)
        archive = _trained(training)
        registrar = Registrar(api)
        drill = Drill(platform, api, registrar, archive, work, rate, log=log)
        try:
            drill.set_up()
            for n in range(trials):
                for fault in faults:
                    try:
                        result = drill.trial(fault, f"{fault}-{n + 1}")
                    except Exception as exc:  # noqa: BLE001 - reported as a trial that did not recover
                        result = _broken_trial(fault, f"{fault}-{n + 1}", exc)
                        if drill.stream is not None:
                            drill.stream.pause()
                    log(f"{result['trial']}: back {fmt(result.get('back_s'), 1)}s, recovery "
                        f"{fmt(result.get('recovery_s'), 1)}s {result['recovery_parts']}, failed inference "
                        f"{result['failed_inference']}, stuck {result['stuck']}, rollout {result['rollout']}")
                    results.append(result)
            per_trial = _settled_accounts(drill, registrar, log)
        finally:
            drill.tear_down()
    for r in results:
        r.update(per_trial.get(r["trial"], {"registrations": 0, "lost": 0, "duplicated": 0, "unanswered": 0,
                                            "refused": 0, "registration_detail": []}))
    return summarize(results, trials)


def _broken_trial(fault: str, label: str, exc: Exception) -> dict[str, Any]:
    return {"fault": fault, "trial": label, "error": f"{type(exc).__name__}: {exc}"[:1000], "back_s": None,
            "recovery_s": None, "recovery_parts": {}, "failed_inference": 0, "stuck": 0, "rollouts_stuck": 0,
            "rollout": "unknown"}


def summarize(results: list[dict[str, Any]], trials: int) -> dict[str, Any]:
    per_fault: dict[str, dict[str, Any]] = {}
    for fault in dict.fromkeys(r["fault"] for r in results):
        rs = [r for r in results if r["fault"] == fault]
        recoveries = [r["recovery_s"] for r in rs]
        known = [x for x in recoveries if x is not None]
        per_fault[fault] = {
            "trials": len(rs),
            "failed_inference": sum(r["failed_inference"] for r in rs),
            "registrations": sum(r["registrations"] for r in rs),
            "lost": sum(r["lost"] for r in rs), "duplicated": sum(r["duplicated"] for r in rs),
            "unanswered": sum(r["unanswered"] for r in rs), "refused": sum(r["refused"] for r in rs),
            "stuck": sum(r["stuck"] for r in rs), "rollouts_stuck": sum(r["rollouts_stuck"] for r in rs),
            "rollouts_rolled_back": sum(r["rollout"] == "rolled_back" for r in rs),
            "back_s_max": max((r["back_s"] for r in rs if r["back_s"] is not None), default=None),
            "recovery_s_p50": round(statistics.median(known), 2) if known else None,
            # a trial that never recovered counts as infinitely slow
            "recovery_s_max": max(known) if len(known) == len(recoveries) else None,
            "trial_details": rs,
        }
    maxima = [f["recovery_s_max"] for f in per_fault.values()]
    return {
        "bench": "chaos", "trials": len(results), "trials_per_fault": trials,
        "failed_inference_total": sum(f["failed_inference"] for f in per_fault.values()),
        "lost": sum(f["lost"] for f in per_fault.values()),
        "duplicated": sum(f["duplicated"] for f in per_fault.values()),
        "stuck": sum(f["stuck"] for f in per_fault.values()),
        "rollouts_stuck": sum(f["rollouts_stuck"] for f in per_fault.values()),
        "recovery_s_max": max(maxima) if maxima and None not in maxima else None,
        "recovery_target_s": RECOVERY_TARGET_S,
        "per_fault": per_fault,
    }


def _missed(r: dict[str, Any]) -> bool:
    """Whether a trial missed a target (or rolled its rollout back, which is worth a look)."""
    return bool(r["failed_inference"] or r["lost"] or r["duplicated"] or r["stuck"] or r["rollouts_stuck"]
                or r["recovery_s"] is None or r["recovery_s"] >= RECOVERY_TARGET_S or r["rollout"] == "rolled_back")


def misses(summary: dict[str, Any]) -> list[str]:
    """Each target a fault missed, in words."""
    out = []
    for fault, f in summary["per_fault"].items():
        for key in ("failed_inference", "lost", "duplicated", "stuck", "rollouts_stuck"):
            if f[key]:
                out.append(f"{fault}: {key.replace('_', ' ')} {f[key]} (target 0)")
        if f["recovery_s_max"] is None:
            out.append(f"{fault}: did not recover (see the trial's not_recovered)")
        elif f["recovery_s_max"] >= RECOVERY_TARGET_S:
            out.append(f"{fault}: recovery {f['recovery_s_max']:.1f}s (target under {RECOVERY_TARGET_S:.0f}s)")
    return out


def report(summary: dict[str, Any]) -> str:
    rows = [[fault, str(f["trials"]), str(f["failed_inference"]), str(f["registrations"]), str(f["lost"]),
             str(f["duplicated"]), str(f["stuck"]), str(f["rollouts_stuck"]), fmt(f["back_s_max"], 1),
             fmt(f["recovery_s_p50"], 1), fmt(f["recovery_s_max"], 1)]
            for fault, f in summary["per_fault"].items()]
    lines = [table(["fault", "trials", "failed inference", "registrations", "lost", "duplicated", "stuck",
                    "rollouts stuck", "back s max", "recovery s p50", "recovery s max"], rows),
             f"back: kill -> the restarted part answers; recovery: back -> inference, registration and background "
             f"work all work again (target under {RECOVERY_TARGET_S:.0f}s; see `python -m bench.chaos --help`)"]
    missed = misses(summary)
    lines += ["targets missed:", *(f"  {m}" for m in missed)] if missed else ["every target met"]
    for f in summary["per_fault"].values():
        for r in f["trial_details"]:
            if _missed(r):
                lines.append(f"  {r['trial']}: " + json.dumps({k: r.get(k) for k in (
                    "error", "killed", "back_s", "recovery_parts", "background_s", "not_recovered", "first_failures",
                    "registration_detail", "stuck_detail", "rollout", "rollout_reason") if r.get(k) not in (None, [])}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one trial per fault (default: five)")
    parser.add_argument("--trials", type=int, help="trials per fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--rate", type=float, default=25.0, help="inference requests per second")
    parser.add_argument("--state", default=str(REPO / ".state" / "bench-chaos"), help="the platform's state folder")
    args = parser.parse_args(argv)
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    trials = args.trials or (1 if args.quick else 5)
    summary = run_drills(Path(args.state).resolve(), faults, trials, args.rate,
                         log=lambda s: print(f"{time.strftime('%H:%M:%S')} {s}", file=sys.stderr, flush=True))
    print(report(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_fault"} | {"per_fault": {
        fault: {k: v for k, v in f.items() if k != "trial_details"} for fault, f in summary["per_fault"].items()}}))


if __name__ == "__main__":
    main()
