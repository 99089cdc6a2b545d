"""The local Triton fleet: N Triton servers on this machine, each with its own model repository, in
explicit model-control mode, on loopback ports, supervised. The embedded default that `make run` starts.

Two halves:
- `FleetSupervisor` (a process: `python -m deployer.fleet_local --state DIR --nodes 2`) starts the
  servers, restarts one that dies, and announces every node in Redis (hash NODES_KEY, with a heartbeat).
  A restarted server comes back with `--load-model=*`: it loads everything its repository holds before
  it accepts connections, so it never answers "unknown model" for what it served before dying.
- `LocalFleet` (the `deployer.fleet.Fleet` backend the deployer uses) reads the nodes from Redis, copies
  an engine's Triton entry into each node's repository and asks the node to load or unload it.
  This module is the only place that imports tritonclient for the deployer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.fleet import FleetError, FleetNotReady, Placement
from pipelines.triton_local import TritonServer, TritonUnavailable

log = logging.getLogger("deployer.fleet")

NODES_KEY = "fleet:local:nodes"
HEARTBEAT_S = 1.0
STALE_S = 5.0  # a node whose supervisor has not written for this long is taken as gone


@dataclass(frozen=True)
class LocalNode:
    name: str
    http: str  # host:port of Triton's HTTP endpoint
    metrics: str  # host:port of its Prometheus endpoint
    repo: str  # its model repository folder
    ready: bool


def read_nodes(redis_client: Any, now: float | None = None) -> list[LocalNode]:
    """The nodes announced by a live supervisor, ready or not, in name order."""
    now = time.time() if now is None else now
    nodes = []
    for name, raw in sorted(redis_client.hgetall(NODES_KEY).items()):
        info = json.loads(raw)
        if now - float(info.get("seen", 0)) > STALE_S:
            continue
        nodes.append(LocalNode(name.decode() if isinstance(name, bytes) else name, info["http"], info["metrics"],
                               info["repo"], bool(info.get("ready"))))
    return nodes


# ---- the supervisor process ---------------------------------------------------------------------------------


class _Node:
    """One supervised Triton server; a thread keeps it running."""

    def __init__(self, name: str, folder: Path, ports: dict[str, int]) -> None:
        self.name, self.folder = name, folder
        self.server = TritonServer(folder / "models", folder / "work", http_port=ports["http"],
                                   grpc_port=ports["grpc"], metrics_port=ports["metrics"],
                                   extra_args=["--load-model=*"])
        self.ready = False
        self.restarts = 0

    def info(self) -> dict[str, Any]:
        s = self.server
        pid = s.proc.pid if s.proc is not None else None
        return {"http": s.url, "metrics": f"127.0.0.1:{s.metrics_port}", "repo": str(s.model_repository),
                "ready": self.ready, "pid": pid, "restarts": self.restarts, "seen": time.time()}

    def keep_running(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self.server.start(timeout=300)
            except TritonUnavailable as exc:
                log.error("node %s did not start: %s", self.name, exc)
                self.server.stop()
                stopping.wait(2)
                continue
            self.ready = True
            log.info("node %s ready at %s (pid %s)", self.name, self.server.url, self.server.proc.pid)  # type: ignore[union-attr]
            while not stopping.is_set() and self.server.proc is not None and self.server.proc.poll() is None:
                stopping.wait(0.2)
            self.ready = False
            if stopping.is_set():
                break
            self.server.kill_leftovers()  # it died: its backend stubs must not hold its connections open
            code = self.server.proc.returncode if self.server.proc is not None else None
            self.restarts += 1
            log.warning("node %s exited with code %s; restarting", self.name, code)
        self.server.stop()


def _ports(state: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """Ports are kept in the state folder so a node keeps its address across restarts of the fleet (the
    routing table names nodes by address); a kept port that is now taken is replaced."""
    from config.stack import free_port

    path = state / "ports.json"
    kept: dict[str, dict[str, int]] = json.loads(path.read_text()) if path.exists() else {}
    ports = {}
    for name in names:
        mine = kept.get(name, {})
        ports[name] = {kind: mine[kind] if _free(mine.get(kind)) else free_port()
                       for kind in ("http", "grpc", "metrics")}
    path.write_text(json.dumps(ports, indent=1))
    return ports


def _free(port: int | None) -> bool:
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class FleetSupervisor:
    def __init__(self, state: Path, count: int, redis_url: str) -> None:
        if count < 1:
            raise ValueError("a fleet has at least one node")
        self.state, self.redis_url = state, redis_url
        state.mkdir(parents=True, exist_ok=True)
        names = [f"node-{i}" for i in range(count)]
        ports = _ports(state, names)
        self.nodes = [_Node(name, state / name, ports[name]) for name in names]
        self.stopping = threading.Event()

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        threads = [threading.Thread(target=n.keep_running, args=(self.stopping,), name=n.name, daemon=True)
                   for n in self.nodes]
        for t in threads:
            t.start()
        try:
            while not self.stopping.is_set():
                try:
                    pipe = client.pipeline()
                    for node in self.nodes:
                        pipe.hset(NODES_KEY, node.name, json.dumps(node.info()))
                    pipe.execute()
                except (OSError, redis.RedisError) as exc:
                    log.warning("cannot announce nodes in redis: %s", exc)
                self.stopping.wait(HEARTBEAT_S)
        finally:
            self.stopping.set()
            for t in threads:
                t.join(40)
            try:
                client.hdel(NODES_KEY, *[n.name for n in self.nodes])
            except (OSError, redis.RedisError):
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployer.fleet_local", description=__doc__)
    parser.add_argument("--state", required=True, help="folder for the nodes' repositories and logs")
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("PLATFORM_FLEET_NODES", "2")))
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", ""))
    args = parser.parse_args(argv)
    if not args.redis:
        parser.error("--redis (or REDIS_URL) is required")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet %(levelname)s %(message)s")
    supervisor = FleetSupervisor(Path(args.state).resolve(), args.nodes, args.redis)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    supervisor.run()


# ---- the backend the deployer uses --------------------------------------------------------------------------


class LocalFleet:
    kind = "local"

    def __init__(self, redis_client: Any, cache: Path, timeout_s: float = 120.0) -> None:
        self.redis, self.cache, self.timeout_s = redis_client, cache, timeout_s

    def nodes(self) -> list[LocalNode]:
        return read_nodes(self.redis)

    def _client(self, node: LocalNode, timeout: float | None = None) -> Any:
        """A client for one node; use it as a context manager, which closes its connections."""
        import tritonclient.http as triton_http

        t = timeout or self.timeout_s
        return triton_http.InferenceServerClient(node.http, connection_timeout=min(t, 5.0), network_timeout=t)

    def _entry(self, placement: Placement) -> Path:
        """The engine's python-backend Triton entry, fetched once into the local cache."""
        from registry import mlflow_store

        key = placement.engine_uri.rstrip("/").rsplit("/", 1)[-1]
        folder = self.cache / key
        entry = folder / "repo" / placement.triton_model
        if (folder / "COMPLETE").exists() and entry.is_dir():
            return entry
        tmp = self.cache / f".{key}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            mlflow_store.download_model(f"{placement.engine_uri.rstrip('/')}/triton/python", tmp / "repo")
        except Exception as exc:  # the artifact store's own errors vary by backend
            shutil.rmtree(tmp, ignore_errors=True)
            raise FleetNotReady(f"could not fetch the engine {placement.engine_uri}: {exc}") from exc
        if not (tmp / "repo" / placement.triton_model).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FleetError(f"the engine {placement.engine_uri} has no Triton entry named {placement.triton_model}")
        (tmp / "COMPLETE").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return entry

    def place(self, placement: Placement) -> list[str]:
        if placement.target != "cpu":
            raise FleetError(f"the local fleet serves the cpu target only, not {placement.target!r}")
        nodes = [n for n in self.nodes() if n.ready]
        if not nodes:
            raise FleetNotReady("no local Triton node is up")
        entry = self._entry(placement)
        ready, waiting = [], []
        for node in nodes:
            dest = Path(node.repo) / placement.triton_model
            if not dest.is_dir():
                tmp = Path(node.repo) / f".{placement.triton_model}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(entry, tmp)
                tmp.rename(dest)  # Triton never sees a half-copied entry
            if self._load(node, placement.triton_model):
                ready.append(node.http)
            else:
                waiting.append(node.name)
        if not ready:
            raise FleetNotReady(f"{placement.triton_model} is not ready on any node yet ({', '.join(waiting)})")
        return ready

    def _load(self, node: LocalNode, name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            with self._client(node) as client:
                if client.is_model_ready(name):
                    return True
                client.load_model(name)
                return bool(client.is_model_ready(name))
        except InferenceServerException as exc:
            if "failed to load" in str(exc) or "load failed" in str(exc):
                raise FleetError(f"Triton on {node.name} refused {name}: {exc}") from exc
            log.warning("node %s: %s", node.name, exc)
            return False
        except (OSError, ConnectionError) as exc:  # the node went away mid-call: the supervisor restarts it
            log.warning("node %s unreachable: %s", node.name, exc)
            return False

    def remove(self, triton_model: str) -> None:
        from tritonclient.utils import InferenceServerException

        for node in self.nodes():
            if node.ready:
                try:
                    with self._client(node) as client:
                        client.unload_model(triton_model)
                except (InferenceServerException, OSError, ConnectionError) as exc:
                    log.warning("node %s: unload of %s: %s", node.name, triton_model, exc)
            shutil.rmtree(Path(node.repo) / triton_model, ignore_errors=True)

    def placed(self) -> dict[str, list[str]]:
        from tritonclient.utils import InferenceServerException

        found: dict[str, list[str]] = {}
        for node in self.nodes():
            names = {p.name for p in Path(node.repo).iterdir() if p.is_dir() and not p.name.startswith(".")} \
                if Path(node.repo).is_dir() else set()
            for name in names:
                found.setdefault(name, [])
            if not node.ready:
                continue
            try:
                with self._client(node, timeout=10) as client:
                    index = client.get_model_repository_index()
            except (InferenceServerException, OSError, ConnectionError):
                continue
            for item in index:
                if item.get("state") == "READY":
                    found.setdefault(item["name"], []).append(node.http)
        return found

    def metrics_urls(self) -> list[str]:
        return [f"http://{n.metrics}/metrics" for n in self.nodes() if n.ready]


if __name__ == "__main__":
    main()
