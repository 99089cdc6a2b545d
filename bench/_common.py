"""Helpers shared by the benchmarks: a keep-alive HTTP load generator, percentiles, servers started
and stopped by their process ids, and table printing. Loopback only."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.stack import free_port  # noqa: F401 - one place for it; the benchmarks import it from here

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadResult:
    ok: int
    errors: int
    elapsed_s: float
    latencies_ms: list[float]
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def merged(self, other: LoadResult) -> LoadResult:
        return LoadResult(self.ok + other.ok, self.errors + other.errors, self.elapsed_s + other.elapsed_s,
                          self.latencies_ms + other.latencies_ms, self.first_error or other.first_error)

    def figures(self) -> dict[str, Any]:
        return {"rps": round(self.rps, 1), "p50_ms": round(self.percentile(50), 2),
                "p99_ms": round(self.percentile(99), 2), "requests": self.ok, "errors": self.errors}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples p99 is the slowest one)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _Client:
    """One keep-alive connection, reopened if the server closes it."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def send(self, req: Request) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self.conn.request(req.method, req.path, body=req.body, headers=req.headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # a keep-alive connection closed by the server between requests
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def fetch_json(port: int, req: Request, timeout_s: float = 120.0) -> tuple[int, Any]:
    """One request; the status and the decoded JSON body (None if it is not JSON)."""
    client = _Client(port, timeout_s)
    try:
        status, data = client.send(req)
    finally:
        client.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, None


def run_load(port: int, make_request: Callable[[int], Request], *, concurrency: int, duration_s: float,
             warmup_s: float, min_requests: int = 0, ok_statuses: tuple[int, ...] = (200, 201),
             timeout_s: float = 120.0, first_index: int = 0, warmup_concurrency: int = 16) -> LoadResult:
    """`concurrency` threads, each on its own keep-alive connection, send requests back to back for
    `duration_s`; if fewer than `min_requests` completed by then, they go on until they have (at most
    three times the duration). Before that, a warm-up (not counted) of `warmup_s` and at least two
    requests per connection on `warmup_concurrency` connections: enough that every worker process of
    the server has served the endpoint (first requests pay lazy imports and connections). make_request(i)
    builds the i-th request (warm-up requests count down from first_index - 1, never repeating measured ones)."""
    if warmup_s > 0:
        _with_clients(port, timeout_s, warmup_concurrency,
                      lambda clients: _phase(clients, lambda i: make_request(first_index - 1 - i), warmup_s,
                                             2 * warmup_concurrency, ok_statuses))
    return _with_clients(port, timeout_s, concurrency,
                         lambda clients: _phase(clients, lambda i: make_request(first_index + i), duration_s,
                                                min_requests, ok_statuses))


def _with_clients(port: int, timeout_s: float, n: int, run: Callable[[list[_Client]], LoadResult]) -> LoadResult:
    clients = [_Client(port, timeout_s) for _ in range(n)]
    try:
        return run(clients)
    finally:
        for client in clients:
            client.close()


def _phase(clients: list[_Client], make_request: Callable[[int], Request], duration_s: float, min_requests: int,
           ok_statuses: tuple[int, ...]) -> LoadResult:
    lock = threading.Lock()
    latencies: list[float] = []
    state = {"next": 0, "done": 0, "errors": 0, "first_error": ""}
    start_gate = threading.Barrier(len(clients) + 1)
    times: dict[str, float] = {}

    def more() -> bool:
        now = time.perf_counter()
        if now < times["deadline"]:
            return True
        return state["done"] < min_requests and now < times["hard_deadline"]

    def worker(client: _Client) -> None:
        start_gate.wait()
        while more():
            with lock:
                i = state["next"]
                state["next"] += 1
            req = make_request(i)
            t0 = time.perf_counter()
            try:
                status, data = client.send(req)
                error = "" if status in ok_statuses else f"HTTP {status}: {data[:300]!r}"
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            took_ms = (time.perf_counter() - t0) * 1000
            with lock:
                if error:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or error
                else:
                    state["done"] += 1
                    latencies.append(took_ms)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    times.update(deadline=begin + duration_s, hard_deadline=begin + 3 * duration_s)
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    return LoadResult(ok=int(state["done"]), errors=int(state["errors"]), elapsed_s=elapsed, latencies_ms=latencies,
                      first_error=str(state["first_error"]))


# ---- servers ------------------------------------------------------------------------------------

def stack_bench_args(prog: str, description: str | None, quick_help: str,
                     argv: list[str] | None) -> Any:
    """Arguments of a benchmark that runs beside the stack's servers (`--quick`), once Django is set up
    on them; exits with how to run it when they are not there."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    if not os.environ.get("REDIS_URL") or not os.environ.get("DATABASE_URL"):
        sys.exit(f"run under `python -m config.stack exec --fresh -- python -m {prog}`")
    setup_django()
    return args


def setup_django() -> None:
    """Django on the stack's database (`config.stack exec`), migrated, with MLflow's store ready."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from registry import mlflow_store

    call_command("migrate", "--noinput", verbosity=0)
    mlflow_store.init_store()


def start_serving(tmp: Path, repo: Path, nodes: int = 2) -> tuple[list[subprocess.Popen[bytes]], int]:
    """The local fleet (`nodes` Triton servers) and the gateway, as `make run` starts them; returns the
    processes (stop them with stop_server) and the gateway's port, once every node is ready."""
    import sys

    from deployer.fleet_local import read_nodes
    from deployer.services import redis_client
    from deployer.testing import wait_until

    gateway_port = free_port()
    py = sys.executable
    procs = [start_server([py, "-m", "deployer.fleet_local", "--state", str(tmp / "fleet"), "--nodes", str(nodes)],
                          tmp / "fleet.log", cwd=repo),
             start_server([py, "-m", "deployer.gateway", "--port", str(gateway_port)], tmp / "gateway.log", cwd=repo)]
    try:
        wait_until(lambda: len([n for n in read_nodes(redis_client()) if n.ready]) == nodes, 120,
                   f"{nodes} Triton nodes")
    except BaseException:
        for proc in procs:
            stop_server(proc, timeout=40)
        raise
    return procs, gateway_port



def start_server(command: list[str], log_file: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own process group (so its worker processes stop with it)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "ab")  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM to the group this process leads (started by start_server), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log_file: Path, timeout_s: float = 120.0,
              headers: dict[str, str] | None = None) -> None:
    """Wait until GET path answers 200, or fail with the end of the server's log."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{tail(log_file)}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}: {body[:300]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TimeoutError(f"{HOST}:{port}{path} did not answer 200 within {timeout_s:.0f}s ({last}):\n{tail(log_file)}")


def _cpu_ticks_of_group(pgid: int) -> int:
    """utime+stime of every process in a process group, from /proc (Linux)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total


def wait_idle(procs: Sequence[subprocess.Popen[bytes]], max_cpu: float = 0.05, window_s: float = 1.0,
              timeout_s: float = 90.0) -> float:
    """Wait until the servers' process groups (workers and helpers they spawned at start-up) use less
    than `max_cpu` of a core over `window_s`. Returns the seconds waited (Linux; elsewhere returns 0)."""
    if not Path("/proc/self/stat").exists():
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    before = sum(_cpu_ticks_of_group(p.pid) for p in procs)
    while time.monotonic() - start < timeout_s:
        time.sleep(window_s)
        after = sum(_cpu_ticks_of_group(p.pid) for p in procs)
        if (after - before) / hz / window_s < max_cpu:
            break
        before = after
    return time.monotonic() - start


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- output -------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
