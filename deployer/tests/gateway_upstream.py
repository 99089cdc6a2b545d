"""Support for the gateway's hardening tests: a model server that records exactly what reaches it, framed
by llhttp (httptools), and a data plane started on its own in front of it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httptools

from deployer.gateway.dataplane import DataPlane
from deployer.gateway.routing import parse_table
from deployer.testing import dataplane_process

MODEL = "m"  # the logical model the data plane routes
TRITON_MODEL = "m_triton"  # the upstream model name it rewrites it to
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
              b"proxy-connection", b"x-request-key", b"expect", b"content-length"}


@dataclass
class Message:
    """One request as llhttp framed it."""
    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)  # read and dropped by the gateway

    def end_to_end_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers a proxy relays as they came (Content-Length is the framing's, compared by body)."""
        return [(n.lower(), v) for n, v in self.headers if n.lower() not in HOP_BY_HOP]


class _Collector:
    """httptools callbacks: each complete message is appended to `done`."""

    def __init__(self) -> None:
        self.done: list[Message] = []
        self.current = Message()
        self.in_trailers = False
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()
        self.in_trailers = True

    def on_message_begin(self) -> None:
        self.current = Message()
        self.in_trailers = False

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.current.trailers if self.in_trailers else self.current.headers).append((name, value))

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)


@dataclass
class Framed:
    """What llhttp makes of a byte stream: the complete requests in it, and how it ended ("ok": all of
    it read, "error", or "upgrade": what follows is no longer HTTP)."""
    messages: list[Message]
    end: str


def llhttp_frame(data: bytes) -> Framed:
    collector = _Collector()
    end = "ok"
    try:
        collector.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        end = "upgrade"
    except httptools.HttpParserError:
        end = "error"
    return Framed(collector.done, end)


class RecordingUpstream:
    """A model server on a free loopback port that frames what reaches it with its own llhttp parser,
    records each request, and answers each with 200, an `x-upstream-seq: <n>` header and body b"seq=<n>"
    (or, with `chunks`, that body in chunked encoding). A request it cannot frame is recorded in
    `errors` and its connection closed."""

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self.chunks = chunks
        self.received: list[Message] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.errors.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _answer(self, seq: int) -> bytes:
        body = b"seq=%d" % seq
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-upstream-seq: %d\r\n" % seq
        if self.chunks is None:
            return head + b"content-length: %d\r\n\r\n" % len(body) + body
        coded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunks if c)
        return head + b"transfer-encoding: chunked\r\n\r\n" + coded + b"0\r\n\r\n"

    def _serve(self, conn: socket.socket) -> None:
        collector = _Collector()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    collector.parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    with self.lock:
                        self.errors.append(f"{exc!r} in {data[:200]!r}")
                    return
                answers = []
                for message in collector.done:
                    with self.lock:
                        self.received.append(message)
                        answers.append(self._answer(len(self.received) - 1))
                collector.done.clear()
                try:
                    conn.sendall(b"".join(answers))
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def dataplane_before(upstream: RecordingUpstream, *flags: str,
                     on_sample: Callable[[dict[str, bytes]], bool] | None = None) -> Iterator[tuple[DataPlane, int]]:
    """A data plane routing the logical model `m` to `upstream` (as Triton model `m_triton`): (it, its port)."""
    with dataplane_process(*flags, on_sample=on_sample) as (dataplane, port):
        table = parse_table({MODEL: {"stable": {"version": "1", "triton_model": TRITON_MODEL,
                                                "nodes": [upstream.addr]}}})
        assert dataplane.apply(1, table)
        yield dataplane, port


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def split_responses(data: bytes) -> list[Response]:
    """The responses in what a client received from the gateway. Every response the gateway writes
    (its own and those it relays from RecordingUpstream) has a Content-Length; one to a HEAD request has
    none of the body it announces, which shows as another response, or the end, right after its head."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"a response cut short: {data[:300]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        if status < 200 or rest.startswith(b"HTTP/1.") or not rest:
            length = 0
        responses.append(Response(status, headers, rest[:length]))
        data = rest[length:]
    return responses


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Sends `request` on a new connection, shuts the sending side, and returns all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway refused and closed before the end was sent: what it answered still counts
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received
