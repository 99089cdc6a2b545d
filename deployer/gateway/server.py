"""The gateway's data path: one asyncio protocol per client connection, pooled keep-alive upstream
connections per Triton node, callbacks rather than coroutines on the hot path (a task is created only
to open a new upstream connection).

Per request: split the head with a few bytes searches, look the request line up in a cache of resolved
targets (model, kind, the rewritten line for each arm), pick the arm (weighted or by the hash of the
x-request-key header), and write the rewritten request line plus the client's header block and body,
forwarded verbatim, to a pooled connection of the next healthy node. The response is relayed as it
arrives with x-model-version inserted after the status line; it is delimited by its Content-Length
(chunked and close-delimited responses are relayed too); its body is not parsed or copied (only sampled
requests keep it). A response not complete within `read_timeout_s` of the request gets a 504.

This file is the one place where speed matters more than brevity (the budget is < 100 us of CPU per
request, kernel included, on a machine shared with Triton): comments say why each trick is there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from random import random
from time import perf_counter
from typing import Any

import httptools

from deployer.gateway.metrics import GatewayMetrics
from deployer.gateway.routing import Arm, RoutingTable
from deployer.gateway.sampling import Sampler

log = logging.getLogger("deployer.gateway")

REQUEST_KEY_HEADER = b"x-request-key"
VERSION_HEADER = b"x-model-version"
_HOP = frozenset({b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"proxy-connection",
                  b"upgrade", b"te", b"trailer", REQUEST_KEY_HEADER})
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large",
            502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}
INFER, META, OTHER = 0, 1, 2
MAX_HEAD = 64 * 1024
MAX_TARGETS = 4096  # cached request lines; the cache is emptied when full (arbitrary query strings)


@dataclass
class Settings:
    node_down_s: float = 5.0  # a node that failed a connection is skipped this long
    pool_max_idle: int = 64  # idle upstream connections kept per node
    sample_rate: float = 0.01
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0  # from the request's dispatch to the upstream response's last byte


class Node:
    __slots__ = ("addr", "host", "port", "idle", "down_until")

    def __init__(self, addr: str) -> None:
        self.addr = addr
        host, _, port = addr.rpartition(":")
        self.host, self.port = host, int(port)
        self.idle: list[Upstream] = []
        self.down_until = 0.0  # 0.0: in service (checked without reading the clock)


class ArmState:
    """An arm of a model's route with everything the hot path needs resolved in advance."""

    __slots__ = ("model", "version", "triton_model", "nodes", "rr", "prefix", "header", "header_crlf", "stats",
                 "metrics", "_errors", "retries", "model_b")

    def __init__(self, model: str, arm: Arm, nodes: list[Node], metrics: GatewayMetrics) -> None:
        self.model, self.version, self.triton_model = model, arm.version, arm.triton_model
        self.model_b = model.encode()
        self.nodes = nodes
        self.rr = 0
        self.prefix = b"/v2/models/" + arm.triton_model.encode()
        self.header = b"\r\n" + VERSION_HEADER + b": " + arm.version.encode()
        self.header_crlf = self.header + b"\r\n"
        self.metrics = metrics
        self.stats = metrics.arm(model, arm.version)
        self.retries = metrics.retries.labels(model, arm.version)
        self._errors: dict[str, Any] = {}

    def error(self, reason: str) -> None:
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = self.metrics.errors.labels(self.model, self.version, reason)
        child.inc()

    def choose(self, tried: list[Node] | None) -> Node | None:
        """Next node round robin, skipping nodes already tried for this request and nodes taken out;
        if every untried node is out, the one out the longest is tried anyway."""
        nodes = self.nodes
        self.rr += 1
        if tried is None:  # first attempt, the usual case: the next node, if in service (no clock read)
            node = nodes[self.rr % len(nodes)]
            if not node.down_until:
                return node
            tried = []
        n = len(nodes)
        now = time.monotonic()
        fallback = None
        for i in range(n):
            node = nodes[(self.rr + i) % n]
            if node in tried:
                continue
            if node.down_until:
                if node.down_until > now:
                    if fallback is None or node.down_until < fallback.down_until:
                        fallback = node
                    continue
                node.down_until = 0.0  # its time out is over
            return node
        return fallback


class ModelState:
    __slots__ = ("name", "stable", "canary", "weight", "acc")

    def __init__(self, name: str, stable: ArmState, canary: ArmState | None, weight: int) -> None:
        self.name, self.stable, self.canary, self.weight = name, stable, canary, weight if canary else 0
        self.acc = 0

    def pick(self, key: bytes | None) -> ArmState:
        weight = self.weight
        if weight <= 0:
            return self.stable
        if weight >= 100:
            return self.canary  # type: ignore[return-value]
        if key is not None:  # sticky: the same key lands in the same bucket of 100 on every gateway
            return self.canary if zlib.crc32(key) % 100 < weight else self.stable  # type: ignore[return-value]
        # Unkeyed: an even spread, exactly `weight` of every 100 requests (error diffusion, no randomness).
        self.acc += weight
        if self.acc >= 100:
            self.acc -= 100
            return self.canary  # type: ignore[return-value]
        return self.stable


class Target:
    """What one request line ("POST /v2/models/m/infer HTTP/1.1") resolves to under the current routing
    table, cached by the raw line: the usual request skips splitting and routing its URL."""

    __slots__ = ("model", "kind", "head", "stable_line", "canary_line")

    def __init__(self, model: ModelState, kind: int, method: bytes, tail: bytes) -> None:
        self.model, self.kind, self.head = model, kind, method == b"HEAD"
        self.stable_line = method + b" " + model.stable.prefix + tail + b" HTTP/1.1"
        self.canary_line = b"" if model.canary is None else method + b" " + model.canary.prefix + tail + b" HTTP/1.1"


def sticky_arm(key: str, weight: int) -> str:
    """Which arm ("stable" / "canary") a request key lands on at a canary weight: what the gateway does."""
    if weight <= 0:
        return "stable"
    if weight >= 100:
        return "canary"
    return "canary" if zlib.crc32(key.encode()) % 100 < weight else "stable"


@dataclass
class Gateway:
    settings: Settings = field(default_factory=Settings)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    sampler: Sampler | None = None
    models: dict[bytes, ModelState] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    targets: dict[bytes, Target] = field(default_factory=dict)
    clients: set[Client] = field(default_factory=set)
    routes_version: int = 0
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        return self.routes_version > 0

    def apply(self, version: int, table: RoutingTable) -> None:
        """Swap in a new table (on the event loop thread: one assignment, requests in flight finish on
        the arm they were given). Nodes, with their pooled connections and health, outlive tables."""
        models: dict[bytes, ModelState] = {}
        for name, route in table.items():
            stable = ArmState(name, route.stable, [self._node(a) for a in route.stable.nodes], self.metrics)
            canary = None
            if route.canary is not None:
                canary = ArmState(name, route.canary, [self._node(a) for a in route.canary.nodes], self.metrics)
            models[name.encode()] = ModelState(name, stable, canary, route.canary_weight)
        self.models = models
        self.targets = {}
        self.routes_version = version
        self.metrics.routes_version.set(version)
        log.info("routing table version %d applied: %s", version,
                 {n: (r.stable.version, r.canary and r.canary.version, r.canary_weight) for n, r in table.items()})

    def apply_threadsafe(self, version: int, table: RoutingTable) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.apply, version, table)

    def _node(self, addr: str) -> Node:
        node = self.nodes.get(addr)
        if node is None:
            node = self.nodes[addr] = Node(addr)
        return node

    def resolve(self, line: bytes) -> Target | None:
        """The target of a request line that routes to a model (cached), or None: the caller answers
        it locally (health, metrics, an unknown model, a bad line...)."""
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/v2/models/"):
            return None
        method, url, _ = parts
        path, sep, query = url.partition(b"?")
        name, _, tail = path[11:].partition(b"/")
        model = self.models.get(name)
        if model is None:
            return None
        if tail == b"infer" or tail.endswith(b"/infer"):
            if method != b"POST":
                return None
            kind = INFER
        else:
            kind = META if tail == b"" else OTHER
        target = Target(model, kind, method, (b"/" + tail if tail else b"") + sep + query)
        if len(self.targets) >= MAX_TARGETS:
            self.targets.clear()
        self.targets[line] = target
        return target

    def mark_down(self, node: Node) -> None:
        node.down_until = time.monotonic() + self.settings.node_down_s
        for conn in node.idle:
            conn.close()
        node.idle.clear()
        self.metrics.node_down.labels(node.addr).inc()
        log.warning("node %s taken out for %.1fs", node.addr, self.settings.node_down_s)

    def sweep_interval(self) -> float:
        # A tenth of the timeout (at most 1 s, at least 10 ms): a 30 s deadline is kept to within ~3%.
        return max(0.01, min(1.0, self.settings.read_timeout_s / 10))

    def _sweep(self) -> None:
        """Upstream read timeouts: a periodic look at the connected clients rather than a timer per
        request (a timer armed and cancelled for every request costs more than this scan, which is
        per connection and a few times a second)."""
        assert self.loop is not None
        limit = perf_counter() - self.settings.read_timeout_s
        late = [c for c in self.clients if c.upstream is not None and c.t0 < limit]
        for client in late:
            client.up_timeout()
        self.loop.call_later(self.sweep_interval(), self._sweep)

    async def serve(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.AbstractServer:
        self.loop = asyncio.get_running_loop()
        self.loop.call_later(self.sweep_interval(), self._sweep)
        return await self.loop.create_server(lambda: Client(self), host, port, backlog=1024, reuse_port=reuse_port)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a Triton node; relays one response at a time to its sink."""

    __slots__ = ("node", "gw", "transport", "sink", "got_any", "buf", "remaining", "mode", "tail", "closed")

    def __init__(self, node: Node, gw: Gateway) -> None:
        self.node, self.gw = node, gw
        self.transport: asyncio.Transport | None = None
        self.sink: Client | None = None
        self.got_any = False
        self.buf = b""
        self.remaining = 0
        self.mode = 0  # 0 headers pending, 1 content-length body, 2 chunked, 3 until close
        self.tail = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, sink: Client) -> None:
        self.sink, self.got_any, self.mode = sink, False, 0
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self.got_any = True
        mode = self.mode
        if mode == 1:
            self.remaining -= len(data)
            sink.up_body(data)
            if self.remaining <= 0:
                self._done()
            return
        if mode == 0:
            if self.buf:
                data, self.buf = self.buf + data, b""
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = int(data[9:12])
            # Searched in place with Triton's spelling first (bounded to the head): no lower-cased copy
            # of the head for the usual response.
            i = data.find(b"\r\nContent-Length:", 0, end)
            lower = None
            if i < 0:
                lower = data[:end].lower()
                i = lower.find(b"\r\ncontent-length:")
            if sink.head or status in (204, 304) or status < 200:
                self.remaining, self.mode = 0, 1
            elif i >= 0:
                self.remaining = int(data[i + 17:data.find(b"\r\n", i + 17)]) - (len(data) - end - 4)
                self.mode = 1
            elif b"\r\ntransfer-encoding: chunked" in (lower or data[:end].lower()):
                self.mode, self.tail = 2, b""
            else:
                self.mode = 3
            sink.up_head(status, data, end)
            if self.mode == 1:
                if self.remaining <= 0:
                    self._done()
                return
            data = data[end + 4:]
        else:
            sink.up_body(data)
        if self.mode == 2:  # chunked: ends with the zero-size chunk (no trailers from Triton)
            self.tail = (self.tail + data)[-5:]
            if self.tail == b"0\r\n\r\n":
                self._done()

    def _done(self) -> None:
        sink, self.sink = self.sink, None
        idle = self.node.idle
        if not self.closed and len(idle) < self.gw.settings.pool_max_idle:
            idle.append(self)
        else:
            self.close()
        sink.up_done()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self.sink = self.sink, None
        if sink is None:
            try:
                self.node.idle.remove(self)
            except ValueError:
                pass
            return
        if self.mode == 3:
            sink.up_done()
        else:
            sink.up_lost(self.got_any)


def _response(status: int, body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, b"Error"), content_type, len(body), extra)) + body


def _error(status: int, message: str) -> bytes:
    return _response(status, json.dumps({"error": message}).encode())


class Client(asyncio.Protocol):
    """One client connection. Requests are served one at a time in order (pipelined ones wait)."""

    # Slots: the hot path sets a dozen attributes per request; slot stores are cheaper than a dict's.
    __slots__ = ("gw", "loop", "parser", "inbuf", "partial", "need", "have", "chunks", "transport", "pending",
                 "busy", "closed", "url", "headers", "body", "key", "head", "keep_alive", "arm", "kind", "req",
                 "body_len", "tried", "node", "reused", "upstream", "head_sent", "t0", "sample", "meta", "status")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.loop = gw.loop
        self.parser: httptools.HttpRequestParser | None = None
        self.inbuf = b""
        self.partial: tuple[Any, ...] | None = None
        self.need = 0
        self.have = 0
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Any, ...]] = deque()
        self.busy = False
        self.closed = False
        # httptools' callbacks (chunked request bodies)
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.key: bytes | None = None
        # the request being served
        self.head = False  # a HEAD request: its response has no body
        self.keep_alive = True
        self.arm: ArmState | None = None
        self.kind = OTHER
        self.req = b""  # as forwarded: the rewritten request line, the client's header block, the body
        self.body_len = 0
        self.tried: list[Node] | None = None  # nodes that failed this request (None until one has)
        self.node: Node | None = None
        self.reused = False
        self.upstream: Upstream | None = None  # set while the request waits on an upstream connection
        self.head_sent = False
        self.t0 = 0.0
        self.sample: list[bytes] | None = None  # [response head, response body parts...] when sampled
        self.meta: list[bytes] | None = None
        self.status = 0

    # ---- client side ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gw.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.clients.discard(self)
        if not self.busy:
            return
        up = self.upstream
        if up is not None:  # mid-exchange: that upstream connection is out of step now
            self.upstream = None
            up.sink = None
            up.close()
        self.sample = None
        self._finish_metrics(None)

    def data_received(self, data: bytes) -> None:
        """Requests with a Content-Length (what Triton clients send) are split here with a few bytes
        searches, and their header block and body are forwarded as they came (one slice); a chunked
        request body switches this connection to httptools' parser."""
        if self.parser is not None:
            return self._feed_parser(data)
        if self.partial is not None:  # a head is parsed, its body still arriving
            self.chunks.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            buf = b"".join(self.chunks)
            line, rest_head, length, key, keep_alive = self.partial
            self.partial, self.chunks = None, []
            self._complete(line, rest_head + buf[:length], length, key, keep_alive)
            data = buf[length:]
        elif self.inbuf:
            data, self.inbuf = self.inbuf + data, b""
        while data:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    return self._reply_and_close(_error(431, "request head too large"))
                self.inbuf = data
                return
            line_end = data.find(b"\r\n")
            line = data[:line_end]
            lower = data[line_end:end + 2].lower()  # "\r\n" + the header lines, each ending "\r\n"
            # find() rather than `in`: bytes.__contains__ first tries its argument as an integer and
            # builds (then drops) a TypeError, which costs more than the search.
            if lower.find(b"\r\ntransfer-encoding:") >= 0:
                self.parser = httptools.HttpRequestParser(self)
                return self._feed_parser(data)
            length = 0
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                if lower.find(b"\r\ncontent-length:", j) >= 0:
                    return self._reply_and_close(_error(400, "more than one Content-Length"))
                try:
                    length = int(lower[i + 17:j])
                except ValueError:
                    return self._reply_and_close(_error(400, "bad Content-Length"))
                if length < 0:
                    return self._reply_and_close(_error(400, "bad Content-Length"))
            key = None
            i = lower.find(b"\r\nx-request-key:")
            if i >= 0:
                key = data[line_end + i + 16:line_end + lower.find(b"\r\n", i + 2)].strip()
            keep_alive = line.endswith(b" HTTP/1.1")
            start = end + 4
            if lower.find(b"\r\nconnection:") >= 0:  # hop-by-hop: decides this connection, is not forwarded
                lines = data[line_end + 2:end].split(b"\r\n")
                conn = [ln.partition(b":")[2].strip().lower() for ln in lines if ln[:11].lower() == b"connection:"]
                keep_alive = b"close" not in conn if keep_alive else b"keep-alive" in conn
                rest_head = b"".join([b"\r\n", *(ln + b"\r\n" for ln in lines if ln[:11].lower() != b"connection:"),
                                      b"\r\n"])
            elif len(data) - start >= length:  # the usual request: head and body forwarded as one slice
                if self.busy:
                    self.pending.append((line, data[line_end:start + length], length, key, keep_alive))
                else:
                    self._dispatch(line, data[line_end:start + length], length, key, keep_alive)
                if len(data) == start + length:  # nothing pipelined behind it (no empty slice to make)
                    return
                data = data[start + length:]
                continue
            else:
                rest_head = data[line_end:start]
            if len(data) - start < length:
                self.partial = (line, rest_head, length, key, keep_alive)
                self.need, self.chunks, self.have = length, [data[start:]], len(data) - start
                return
            self._complete(line, rest_head + data[start:start + length], length, key, keep_alive)
            data = data[start + length:]

    def _complete(self, line: bytes, rest: bytes, length: int, key: bytes | None, keep_alive: bool) -> None:
        if self.busy:
            self.pending.append((line, rest, length, key, keep_alive))
        else:
            self._dispatch(line, rest, length, key, keep_alive)

    def _feed_parser(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            self._reply_and_close(_error(400, "upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._reply_and_close(_error(400, f"bad request: {exc}"))

    def _reply_and_close(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.transport.close()
        self.closed = True

    # httptools callbacks (chunked request bodies only)
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.key = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _HOP:
            if lname == REQUEST_KEY_HEADER:
                self.key = value
            return
        self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        body = b"".join(self.body)
        line = b"%s %s HTTP/%s" % (parser.get_method(), self.url, parser.get_http_version().encode())
        rest = b"".join([b"\r\n", *self.headers, b"content-length: %d\r\n\r\n" % len(body), body])
        self._complete(line, rest, len(body), self.key, parser.should_keep_alive())

    def _dispatch(self, line: bytes, rest: bytes, length: int, key: bytes | None, keep_alive: bool) -> None:
        self.busy, self.keep_alive = True, keep_alive
        gw = self.gw
        target = gw.targets.get(line) or gw.resolve(line)
        if target is None:
            return self._serve_locally(line)
        model = target.model
        kind = target.kind
        if kind == INFER:
            arm = model.pick(key)
            arm.stats.in_flight += 1
            self.sample = [] if gw.sampler is not None and random() < gw.settings.sample_rate else None
            self.meta = None
        else:
            arm, self.sample = model.stable, None
            self.meta = [] if kind == META else None
        self.req = (target.stable_line if arm is model.stable else target.canary_line) + rest
        self.arm, self.kind, self.head, self.body_len = arm, kind, target.head, length
        self.tried, self.head_sent = None, False
        self.t0 = perf_counter()
        self._attempt()

    def _serve_locally(self, line: bytes) -> None:
        """Everything the gateway answers itself: health, metrics, server metadata and the errors."""
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.keep_alive = False  # what follows cannot be trusted to be a request
            return self._local(_error(400, "bad request line"))
        method, url, _ = parts
        path = url.partition(b"?")[0]
        if path.startswith(b"/v2/models/"):
            name, _, tail = path[11:].partition(b"/")
            if name not in self.gw.models:
                return self._local(_error(404, f"unknown model '{name.decode(errors='replace')}'"))
            return self._local(_error(405, "infer takes POST"))  # the only line resolve() turns down
        if path == b"/v2/health/ready":
            self._local(_response(200 if self.gw.ready else 503, b""))
        elif path == b"/v2/health/live":
            self._local(_response(200, b""))
        elif path == b"/metrics":
            self._local(_response(200, self.gw.metrics.exposition(), b"text/plain; version=0.0.4; charset=utf-8"))
        elif path == b"/v2":
            self._local(_response(200, json.dumps({"name": "mlops-gateway", "version": "1",
                                                    "extensions": ["binary_tensor_data"]}).encode()))
        else:
            self._local(_error(404, "not served by the gateway"))

    def _local(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]
        self._next()

    def _next(self) -> None:
        self.busy = False
        self.arm = None
        if self.closed:
            return
        if not self.keep_alive:
            self.transport.close()  # type: ignore[union-attr]
            self.closed = True
            return
        if self.pending:
            self._dispatch(*self.pending.popleft())

    # ---- upstream side -------------------------------------------------------------------------

    def _attempt(self) -> None:
        arm = self.arm
        assert arm is not None
        node = arm.choose(self.tried)
        if node is None:
            return self._fail(503, "unavailable", "no node of the routed version is reachable")
        self.node = node
        if node.idle:
            self.reused = True
            up = self.upstream = node.idle.pop()
            up.send(self.req, self)
        else:
            self.reused = False
            self.upstream = None
            self.loop.create_task(self._connect(node))  # type: ignore[union-attr]

    async def _connect(self, node: Node) -> None:
        try:
            _, up = await asyncio.wait_for(
                self.loop.create_connection(lambda: Upstream(node, self.gw), node.host, node.port),  # type: ignore[union-attr]
                self.gw.settings.connect_timeout_s)
        except (TimeoutError, OSError):
            self.gw.mark_down(node)
            return self._retry(node)
        if self.closed:
            up.close()
            return
        self.upstream = up  # type: ignore[assignment]
        up.send(self.req, self)  # type: ignore[attr-defined]

    def _retry(self, failed: Node | None) -> None:
        """Again on another node (`failed` joins the nodes not to try), or on the same node when None."""
        if self.closed:
            return
        if failed is not None:
            if self.tried is None:
                self.tried = []
            self.tried.append(failed)
        self.arm.retries.inc()  # type: ignore[union-attr]
        self._attempt()

    def up_head(self, status: int, data: bytes, end: int) -> None:
        """The response head is data[:end] (then "\r\n\r\n", then the first body bytes, if any)."""
        self.status = status
        if self.meta is not None:
            self.meta.append(data[end + 4:])
            return
        if self.sample is not None:
            self.sample += (data[:end], data[end + 4:])
        self.head_sent = True
        if not self.closed:
            arm = self.arm
            # x-model-version goes right after the status line: one replace() of the first CRLF makes the
            # whole relayed segment in one call (no slices, no join).
            extra = arm.header_crlf if self.keep_alive else arm.header + b"\r\nconnection: close\r\n"  # type: ignore[union-attr]
            self.transport.write(data.replace(b"\r\n", extra, 1))  # type: ignore[union-attr]

    def up_body(self, data: bytes) -> None:
        if self.meta is not None:
            self.meta.append(data)
            return
        if self.sample is not None:
            self.sample.append(data)
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def up_done(self) -> None:
        self.upstream = None
        if self.kind == INFER:  # the _finish_metrics of a complete response, inline: once per request
            self.kind = OTHER
            took = perf_counter() - self.t0
            arm = self.arm
            stats = arm.stats  # type: ignore[union-attr]
            stats.in_flight -= 1
            stats.observe(took)
            if self.status >= 500:
                arm.error("upstream_5xx")  # type: ignore[union-attr]
            if self.sample is not None:
                self._offer_sample(took)
        elif self.meta is not None:
            self._send_metadata()
        self._next()

    def up_lost(self, got_any: bool) -> None:
        self.upstream = None
        if not got_any:
            # Nothing came back: the request was not answered; safe to send again (every request the
            # gateway forwards is idempotent: reads, and inference, which changes no state).
            if self.reused:  # a pooled connection the node had closed: the node may well be fine
                return self._retry(None)
            self.gw.mark_down(self.node)  # type: ignore[arg-type]
            return self._retry(self.node)
        self._abort("upstream_lost", 502, "the upstream connection ended mid-response")

    def up_timeout(self) -> None:
        """The response did not complete within read_timeout_s: that connection is closed, never pooled
        (a late answer would arrive out of step), and the client gets a 504 if nothing was relayed yet."""
        up = self.upstream
        if up is None:
            return
        self.upstream = None
        up.sink = None
        up.close()
        self._abort("upstream_timeout", 504,
                    f"no response from the model server within {self.gw.settings.read_timeout_s:g}s")

    def _abort(self, reason: str, status: int, message: str) -> None:
        if self.head_sent:  # the response started: the client sees the connection end
            if self.kind == INFER:
                self.arm.error(reason)  # type: ignore[union-attr]
            self._finish_metrics(None)
            self.keep_alive = False
            self._next()
            return
        self._fail(status, reason, message)

    def _fail(self, status: int, reason: str, message: str) -> None:
        arm = self.arm
        if self.kind == INFER and arm is not None:
            arm.stats.in_flight -= 1
            arm.error(reason)
            self.kind = OTHER
        self.meta = None
        self._local(_error(status, message))

    def _finish_metrics(self, status: int | None) -> None:
        """A request that ended without a complete response (complete ones: up_done)."""
        arm = self.arm
        if self.kind != INFER or arm is None:
            return
        self.kind = OTHER
        stats = arm.stats
        stats.in_flight -= 1
        stats.observe(perf_counter() - self.t0)

    def _offer_sample(self, took: float) -> None:
        arm, sample, req = self.arm, self.sample, self.req
        assert arm is not None and sample is not None and self.gw.sampler is not None
        self.sample = None
        split = len(req) - self.body_len
        self.gw.sampler.offer({
            "model": arm.model, "version": arm.version, "triton_model": arm.triton_model, "status": self.status,
            "latency_ms": round(took * 1000, 3), "ts": time.time(),
            "request": req[split:], "request_head": req[:split],
            "response_head": sample[0], "response": b"".join(sample[1:]),
        })

    def _send_metadata(self) -> None:
        arm = self.arm
        raw = b"".join(self.meta or [])
        self.meta = None
        try:
            doc = json.loads(raw)
            if isinstance(doc, dict) and self.status == 200:
                doc["name"] = arm.model  # type: ignore[union-attr]
                doc["versions"] = [arm.version]  # type: ignore[union-attr]
                raw = json.dumps(doc).encode()
        except ValueError:
            pass
        extra = arm.header[2:] + b"\r\n"  # type: ignore[union-attr]
        if not self.closed:
            self.transport.write(_response(self.status, raw, extra=extra))  # type: ignore[union-attr]
