"""The measuring part of a hardware-in-the-loop run: closed-loop load against a model already loaded in a
running Triton server, point by point (concurrency x batch size), until the windows agree.

Pure measurement: no models, no verdict. The client (`HttpClient`) sends KServe v2 binary tensors on a plain
socket: each request, head and body, is built once per batch size and sent with one `sendall` on a
kept-alive connection with TCP_NODELAY, and the answer is read by its Content-Length: the least client
cost Python allows, which matters on a small machine where the client and Triton share the CPUs.

Stability follows perf_analyzer: a window lasts `window_s` and until `min_window_requests` were answered (at
most `max_window_s`); a point is stable when its last three windows agree, max/min within
`1 + stability_pct/100`, both on throughput and on mean latency; after `max_trials` windows without that it
is `unstable`, and its figures are those of its last three windows all the same.

CPUs: on a machine with two or more, the server and the load clients run on CPUs of their own (`cpu_split`:
the clients on the last one, the server on the rest). Sharing them, the scheduler puts a client thread on the
core where the server is computing now and then, and the point flips between a fast and a slow mode every
second or two: on 2 cores, batch 64 at 2 clients measured p50s from 0.36 to 0.73 ms a second apart, and
10-second measurements still 25% apart; pinned, 1-second windows were within 13% and 3-second ones within 3%.
A serving engine does not share its cores with the load generator either.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

STABLE = "stable"
UNSTABLE = "unstable"

NUMPY_TYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
                "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class HilError(RuntimeError):
    pass


@dataclass(frozen=True)
class InputSpec:
    """One input of the model: its KServe datatype and the shape of ONE sample (no batch axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Settings:
    concurrencies: tuple[int, ...] = (1, 2, 4)
    batch_sizes: tuple[int, ...] | None = None  # None: 1 and the config's max_batch_size
    window_s: float = 1.0
    stability_pct: float = 10.0
    stable_windows: int = 3
    max_trials: int = 10
    # A window lasts at least window_s and until this many requests were answered (at most max_window_s): with
    # a slow engine a 1 s window holds 3 or 4 requests, 33% apart for counting alone.
    min_window_requests: int = 20
    max_window_s: float = 10.0
    warmup_requests: int = 20  # per batch size, one after another
    request_timeout_s: float = 30.0
    client_cpus: tuple[int, ...] | None = None  # the CPUs the load clients run on (None: wherever)


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs the server gets and which the load clients get."""

    server: tuple[int, ...]
    clients: tuple[int, ...]

    def words(self) -> str:
        return f"Triton on {_cpus(self.server)}, the load clients on {_cpus(self.clients)}"


def cpu_split(available: Sequence[int] | None = None) -> CpuSplit | None:
    """Split the CPUs this process may use (or `available`) between the server and the load clients: the
    clients get the last one (the last two from 16 on: they are Python threads under one lock, and need
    little), the server the rest. None with fewer than two CPUs: nothing to split."""
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    clients = 2 if len(cpus) >= 16 else 1
    return CpuSplit(server=tuple(cpus[:-clients]), clients=tuple(cpus[-clients:]))


def _cpus(cpus: Sequence[int]) -> str:
    return f"CPU{'s' if len(cpus) > 1 else ''} {', '.join(map(str, cpus))}"


@dataclass
class Window:
    """What one measurement window saw."""

    seconds: float
    latencies_ns: list[int]
    errors: int
    batch_size: int
    server: dict[str, int]  # deltas of the model's statistics over the window

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ns) / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile_ms(self.latencies_ns, 50)

    @property
    def p99_ms(self) -> float:
        return percentile_ms(self.latencies_ns, 99)

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies_ns) / len(self.latencies_ns) / 1e6 if self.latencies_ns else math.nan


@dataclass
class Point:
    concurrency: int
    batch_size: int
    status: str  # STABLE or UNSTABLE
    windows: int  # how many windows it took
    requests: int  # successful requests in the windows the figures come from
    errors: int  # failed requests in those windows
    first_error: str | None  # the first failure of the whole point, in words
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_s: float
    inferences_per_s: float
    queue_ms: float | None  # Triton's mean queue time per request, None when it counted no request
    compute_ms: float | None  # Triton's mean compute_infer time per request
    server_requests: int  # successes Triton counted over the same windows
    memory_pss_bytes: int  # the server's PSS when the point ended
    throughput_spread_pct: float  # max/min - 1 over the windows the figures come from, in percent
    latency_spread_pct: float  # the same for mean latency (the stability rule's)
    p99_spread_pct: float  # the same for p99 (not part of the stability rule: the noise band of a p99 comparison)
    trials: list[tuple[float, float]]  # every window's (requests/s, mean latency ms), in order: stability's evidence

    def words(self) -> str:
        server = (f"Triton queue {self.queue_ms:.3f} ms, compute {self.compute_ms:.3f} ms per request"
                  if self.queue_ms is not None and self.compute_ms is not None else "no Triton statistics")
        return (f"concurrency {self.concurrency}, batch {self.batch_size}: {self.status} after {self.windows} "
                f"window(s), the figures' windows {self.throughput_spread_pct:.1f}% apart in throughput and "
                f"{self.latency_spread_pct:.1f}% in mean latency; p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
                f"p95 {self.p95_ms:.2f} ms, p99 {self.p99_ms:.2f} ms; {self.inferences_per_s:.1f} inferences/s "
                f"({self.requests_per_s:.1f} requests/s); {server}; {self.errors} error(s)"
                + (f", the first: {self.first_error}" if self.first_error else ""))


@dataclass
class Measurement:
    model: str
    max_batch_size: int
    settings: Settings
    points: list[Point] = field(default_factory=list)
    memory_pss_bytes: int = 0  # the largest PSS of the server seen (after warm-up and after each point)
    memory_after_warmup_bytes: int = 0
    seconds: float = 0.0

    @property
    def unstable(self) -> list[Point]:
        return [p for p in self.points if p.status != STABLE]

    def words(self) -> str:
        s = self.settings
        lines = [f"{self.model}: {len(self.points)} point(s) in {self.seconds:.1f} s, windows of {s.window_s:g} s, "
                 f"stable when {s.stable_windows} in a row agree within {s.stability_pct:g}% "
                 f"(at most {s.max_trials}); {len(self.unstable)} unstable; server memory (PSS) "
                 f"{self.memory_pss_bytes / 2**20:.1f} MiB at most, {self.memory_after_warmup_bytes / 2**20:.1f} MiB "
                 f"after warm-up"]
        lines += [p.words() for p in self.points]
        return "\n".join(lines)


def percentile_ms(latencies_ns: Sequence[int], q: float) -> float:
    """The nearest-rank percentile (perf_analyzer's), in ms; NaN for no sample."""
    if not latencies_ns:
        return math.nan
    ordered = sorted(latencies_ns)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1] / 1e6


def windows_agree(windows: Sequence[Window], stability_pct: float) -> bool:
    """perf_analyzer's rule over the given windows: none without throughput, and max/min within the
    percentage on throughput and on mean latency (its default; a median can flip between the modes of a
    bimodal latency, as two clients' requests queue behind each other or not, where the mean moves smoothly)."""
    limit = 1 + stability_pct / 100
    rates = [w.requests_per_s for w in windows]
    means = [w.mean_ms for w in windows]
    if not windows or min(rates) <= 0 or any(math.isnan(m) or m <= 0 for m in means):
        return False
    return max(rates) / min(rates) <= limit and max(means) / min(means) <= limit


def server_pss_bytes(server_pid: int) -> int:
    """PSS summed over the server and every process of its session (the Python backend stubs): the
    server is started as a session leader (`start_new_session`)."""
    total = 0
    for proc in psutil.process_iter():
        try:
            if proc.pid != server_pid and os.getsid(proc.pid) != server_pid:
                continue
            total += proc.memory_full_info().pss
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to read
    return total


MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers, at most
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # an answer's body, at most


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port or 80)


def http_request(host: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request, head and body, as the bytes to send (built once, sent as often as needed)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpClient:
    """One kept-alive connection to Triton's HTTP endpoint, as lean as Python allows: each request is a
    prebuilt bytes object sent with one `sendall` on a socket with TCP_NODELAY, and the answer is read by its
    Content-Length. (http.client sends head and body apart, without TCP_NODELAY, and parses every answer's
    headers with the email package: on a small machine, where client and server share the CPUs, that cost
    showed in the figures; see bench/hil.)"""

    def __init__(self, url: str, timeout: float):
        self.host, self.port = host_port(url)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, request: bytes) -> tuple[int, bytes]:
        """Send a request built by `http_request`; returns the answer's status and body."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        try:
            self.sock.sendall(request)
            return self._answer()
        except (OSError, HilError):
            self.close()
            raise

    def _fill(self, at_least: int) -> None:
        assert self.sock is not None
        while len(self.buffer) < at_least:
            chunk = self.sock.recv(max(65536, at_least - len(self.buffer)))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk

    def _answer(self) -> tuple[int, bytes]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise HilError(f"an answer's head is over {MAX_HEAD_BYTES} bytes")
            self._fill(len(self.buffer) + 1)
        head, self.buffer = self.buffer[:end].split(b"\r\n"), self.buffer[end + 4:]
        parts = head[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HilError(f"not an HTTP answer: {head[0][:100]!r}")
        fields = {}
        for line in head[1:]:
            key, _, value = line.partition(b":")
            fields[key.strip().lower()] = value.strip().lower()
        if b"content-length" not in fields:
            raise HilError("an answer without Content-Length (chunked answers are not read)")
        length = int(fields[b"content-length"])
        if length > MAX_ANSWER_BYTES:
            raise HilError(f"an answer of {length} bytes, over {MAX_ANSWER_BYTES}")
        self._fill(length)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if fields.get(b"connection") == b"close":
            self.close()
        return int(parts[1]), body

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return self.send(http_request(self.host, method, path, body, headers))

    def json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise HilError(f"GET {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def inputs_from_config(config: dict[str, Any], dynamic_dim: int = 1) -> list[InputSpec]:
    """The inputs of a model from its Triton config (`GET /v2/models/<m>/config`); a variable dimension
    (-1) becomes `dynamic_dim`."""
    return [InputSpec(i["name"], i["data_type"].removeprefix("TYPE_"),
                      tuple(int(d) if int(d) > 0 else dynamic_dim for d in i["dims"])) for i in config["input"]]


def infer_body(inputs: Sequence[InputSpec], batch_size: int, batched: bool, seed: int = 0) -> tuple[bytes, int]:
    """A KServe v2 inference request with binary tensors (and binary outputs asked for): the body and
    the length of its JSON header. Values are seeded random numbers in [0, 1)."""
    rng = np.random.default_rng(seed)
    header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True}}
    blobs = []
    for spec in inputs:
        if spec.datatype not in NUMPY_TYPES:
            raise HilError(f"input {spec.name}: datatype {spec.datatype} is not supported by the HIL client")
        shape = (batch_size, *spec.shape) if batched else spec.shape
        blob = rng.random(shape).astype(NUMPY_TYPES[spec.datatype]).tobytes()
        header["inputs"].append({"name": spec.name, "shape": list(shape), "datatype": spec.datatype,
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def _stats_totals(stats: dict[str, Any]) -> dict[str, int]:
    """The counters a window needs, summed over the model's versions."""
    totals = {"success": 0, "fail": 0, "queue_ns": 0, "compute_infer_ns": 0, "inferences": 0}
    for version in stats.get("model_stats", []):
        inference = version.get("inference_stats", {})
        totals["success"] += int(inference.get("success", {}).get("count", 0))
        totals["fail"] += int(inference.get("fail", {}).get("count", 0))
        totals["queue_ns"] += int(inference.get("queue", {}).get("ns", 0))
        totals["compute_infer_ns"] += int(inference.get("compute_infer", {}).get("ns", 0))
        totals["inferences"] += int(version.get("inference_count", 0))
    return totals


class _Load:
    """N client threads in a closed loop, each sending the same request again as soon as its answer is in.
    Each completed request is recorded with its end time; the measuring thread takes them per window."""

    def __init__(self, url: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, timeout: float,
                 cpus: Sequence[int] | None = None):
        self.url, self.timeout, self.cpus = url, timeout, cpus
        self.request = http_request(host_port(url)[0], "POST", path, body, headers)
        self.lock = threading.Lock()
        self.latencies: list[int] = []
        self.errors = 0
        self.first_error: str | None = None
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"hil-client-{i}")
                        for i in range(concurrency)]

    def _run(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # this thread only (Linux: 0 is the calling thread)
        client = HttpClient(self.url, self.timeout)
        try:
            while not self.stopping.is_set():
                start = time.perf_counter_ns()
                broken = False
                try:
                    status, answer = client.send(self.request)
                    error = None if status == 200 else f"HTTP {status}: {answer[:300]!r}"
                except (OSError, HilError) as exc:
                    error, broken = f"{type(exc).__name__}: {exc}", True
                elapsed = time.perf_counter_ns() - start
                with self.lock:
                    if error is None:
                        self.latencies.append(elapsed)
                    else:
                        self.errors += 1
                        self.first_error = self.first_error or error
                if broken:
                    time.sleep(0.01)  # a refused connection would otherwise spin
        finally:
            client.close()

    def answered(self) -> int:
        """Requests answered (or failed) since the last take."""
        with self.lock:
            return len(self.latencies) + self.errors

    def take(self) -> tuple[list[int], int]:
        """The latencies of the requests answered since the last take, and the errors."""
        with self.lock:
            latencies, errors = self.latencies, self.errors
            self.latencies, self.errors = [], 0
        return latencies, errors

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 5)


@dataclass
class Target:
    """A model ready to be measured: its batch sizes and one request body per batch size, warmed up."""

    http_url: str  # Triton's HTTP address, host:port
    model: str
    server_pid: int  # the server's process; its session holds the Python backend stubs
    max_batch_size: int
    batch_sizes: list[int]
    requests: dict[int, tuple[bytes, dict[str, str]]]  # batch size: body, headers


def prepare(http_url: str, model: str, inputs: Sequence[InputSpec] | None = None, *, server_pid: int,
            settings: Settings = Settings()) -> Target:
    """Read the model's config (its max_batch_size decides the batch sizes; `inputs` default to the config's,
    variable dims as 1), build the requests, and warm up: `warmup_requests` per batch size. A request
    that fails here fails the whole measurement (HilError): the model or its inputs are wrong."""
    control = HttpClient(http_url, settings.request_timeout_s)
    try:
        config = control.json(f"/v2/models/{model}/config")
        max_batch = int(config.get("max_batch_size", 0))
        specs = list(inputs) if inputs is not None else inputs_from_config(config)
        target = Target(http_url, model, server_pid, max_batch, _batch_sizes(max_batch, settings.batch_sizes), {})
        for batch in target.batch_sizes:
            body, head = infer_body(specs, batch, batched=max_batch > 0)
            target.requests[batch] = (body, {"Inference-Header-Content-Length": str(head),
                                             "Content-Type": "application/octet-stream"})
            for _ in range(settings.warmup_requests):
                status, answer = control.request("POST", f"/v2/models/{model}/infer", *target.requests[batch])
                if status != 200:
                    raise HilError(f"warm-up of {model} at batch {batch}: HTTP {status}: {answer[:300]!r}")
        return target
    finally:
        control.close()


def measure(http_url: str, model: str, inputs: Sequence[InputSpec] | None = None, *, server_pid: int,
            settings: Settings = Settings(), progress: Callable[[str], None] | None = None) -> Measurement:
    """Warm up, then measure every point of the sweep: each batch size the model's config allows, at each
    concurrency. (To interleave two models point by point, call `prepare` and `measure_point` instead.)"""
    started = time.monotonic()
    target = prepare(http_url, model, inputs, server_pid=server_pid, settings=settings)
    result = Measurement(model=model, max_batch_size=target.max_batch_size, settings=settings)
    result.memory_after_warmup_bytes = result.memory_pss_bytes = server_pss_bytes(server_pid)
    for batch in target.batch_sizes:
        for concurrency in settings.concurrencies:
            point = measure_point(target, concurrency, batch, settings)
            result.points.append(point)
            result.memory_pss_bytes = max(result.memory_pss_bytes, point.memory_pss_bytes)
            if progress is not None:
                progress(point.words())
    result.seconds = time.monotonic() - started
    return result


def _batch_sizes(max_batch: int, wanted: tuple[int, ...] | None) -> list[int]:
    if max_batch <= 0:
        return [1]  # the model takes no batch axis: one sample per request
    if wanted is None:
        return sorted({1, max_batch})
    allowed = sorted({b for b in wanted if 1 <= b <= max_batch})
    if not allowed:
        raise HilError(f"none of the batch sizes {list(wanted)} is within the model's max_batch_size {max_batch}")
    return allowed


def measure_point(target: Target, concurrency: int, batch: int, settings: Settings = Settings()) -> Point:
    """Closed-loop load at `concurrency` with requests of `batch` samples, window after window until the
    last `stable_windows` agree or `max_trials` windows are spent."""
    stats_path = f"/v2/models/{target.model}/stats"
    path = f"/v2/models/{target.model}/infer"
    body, headers = target.requests[batch]
    windows: list[Window] = []
    stable = False
    control = HttpClient(target.http_url, settings.request_timeout_s)
    try:
        with _Load(target.http_url, path, body, headers, concurrency, settings.request_timeout_s,
                   settings.client_cpus) as load:
            # The first window starts once every client has had time to send: what came before is dropped.
            time.sleep(min(0.1, settings.window_s / 4))
            load.take()
            before = _stats_totals(control.json(stats_path))
            start = time.perf_counter()
            while len(windows) < settings.max_trials:
                time.sleep(settings.window_s)
                limit = start + max(settings.max_window_s, settings.window_s)
                while load.answered() < settings.min_window_requests and time.perf_counter() < limit:
                    time.sleep(min(0.05, settings.window_s / 4))
                latencies, errors = load.take()
                end = time.perf_counter()
                after = _stats_totals(control.json(stats_path))
                windows.append(Window(seconds=end - start, latencies_ns=latencies, errors=errors, batch_size=batch,
                                      server={k: after[k] - before[k] for k in after}))
                before, start = after, end
                recent = windows[-settings.stable_windows:]
                if len(recent) == settings.stable_windows and windows_agree(recent, settings.stability_pct):
                    stable = True
                    break
    finally:
        control.close()
    point = _point(windows, settings.stable_windows, stable, concurrency, batch, server_pss_bytes(target.server_pid))
    point.first_error = load.first_error
    return point


def _point(windows: list[Window], last: int, stable: bool, concurrency: int, batch: int, pss: int) -> Point:
    """The point's figures from its last `last` windows (the ones that agreed, when it is stable)."""
    recent = windows[-last:]
    latencies = [ns for w in recent for ns in w.latencies_ns]
    seconds = sum(w.seconds for w in recent)
    server = {k: sum(w.server[k] for w in recent) for k in recent[0].server}
    per_request = server["success"]
    rps = len(latencies) / seconds if seconds > 0 else 0.0
    return Point(
        concurrency=concurrency, batch_size=batch, status=STABLE if stable else UNSTABLE, windows=len(windows),
        requests=len(latencies), errors=sum(w.errors for w in recent), first_error=None,
        p50_ms=percentile_ms(latencies, 50), p90_ms=percentile_ms(latencies, 90),
        p95_ms=percentile_ms(latencies, 95), p99_ms=percentile_ms(latencies, 99),
        requests_per_s=rps, inferences_per_s=rps * batch,
        queue_ms=server["queue_ns"] / per_request / 1e6 if per_request else None,
        compute_ms=server["compute_infer_ns"] / per_request / 1e6 if per_request else None,
        server_requests=per_request, memory_pss_bytes=pss,
        throughput_spread_pct=_spread_pct([w.requests_per_s for w in recent]),
        latency_spread_pct=_spread_pct([w.mean_ms for w in recent]),
        p99_spread_pct=_spread_pct([w.p99_ms for w in recent]),
        trials=[(w.requests_per_s, w.mean_ms) for w in windows],
    )


def _spread_pct(values: list[float]) -> float:
    if not values or min(values) <= 0 or any(math.isnan(v) for v in values):
        return math.inf
    return (max(values) / min(values) - 1) * 100
