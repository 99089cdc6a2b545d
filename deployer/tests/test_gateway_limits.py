"""The gateway's data plane against clients that would hold its threads or memory: bodies over the limit,
slow heads and bodies, more connections than it takes, HTTP/1.0 clients of chunked responses, and 500
concurrent oversized uploads while normal traffic goes on. A data plane of its own in front of a model
server that records what reaches it (deployer.tests.gateway_upstream); no Triton needed."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections import Counter

import pytest

from deployer.testing import wait_until
from deployer.tests.gateway_upstream import (
    MODEL,
    RecordingUpstream,
    dataplane_before,
    exchange,
    split_responses,
)

pytestmark = pytest.mark.timeout(120)

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture
def upstream():
    server = RecordingUpstream()
    yield server
    server.close()


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """What comes back until the gateway closes (or `timeout` passes: then what came so far)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def _status(data: bytes) -> int | None:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def test_a_declared_body_over_the_limit_gets_a_413_before_it_is_sent(upstream):
    with dataplane_before(upstream, "--max-body-bytes", "1000") as (_, port):
        for expect in (b"", b"Expect: 100-continue\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gw\r\n" + expect
                             + b"Content-Length: 10000000000\r\n\r\n")
                started = time.monotonic()
                received = _read_response(sock, 5)
            (response,) = split_responses(received)  # no 100 Continue first
            assert response.status == 413 and time.monotonic() - started < 4
            assert response.headers[b"connection"] == b"close"
            assert json.loads(response.body) == {"error": "request body larger than the gateway's limit of 1000 bytes"}
        # a body at the limit is served
        (response,) = split_responses(exchange(port, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
                                                     b"Content-Length: 1000\r\n\r\n" + b"x" * 1000))
        assert response.status == 200
    assert [m.body for m in upstream.received] == [b"x" * 1000]


def test_a_chunked_body_growing_past_the_limit_gets_a_413_when_a_chunk_says_so(upstream):
    with dataplane_before(upstream, "--max-body-bytes", "1000") as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"258\r\n" + b"a" * 600 + b"\r\n" + b"258\r\n")  # 600 bytes, then 600 more announced
            received = _read_response(sock, 5)
        (response,) = split_responses(received)
        assert response.status == 413 and b"limit of 1000 bytes" in response.body
    assert upstream.received == []


def test_a_request_dribbled_a_byte_at_a_time_is_cut_off_with_a_408(upstream):
    # --client-idle-ms is longer than the pauses between bytes: only the whole request's deadline ends it
    with dataplane_before(upstream, "--request-deadline-ms", "800", "--client-idle-ms", "5000") as (_, port):
        head = b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\n"
        for whole, dribbled in ((b"", head + b"hello"), (head, b"hello")):  # the head dribbled, or the body
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(whole)
                started = time.monotonic()
                for byte in dribbled:  # a byte every 0.25 s, until the gateway answers
                    sock.sendall(bytes([byte]))
                    if select.select([sock], [], [], 0.25)[0]:
                        break
                received = _read_response(sock, 5)
                took = time.monotonic() - started
            (response,) = split_responses(received)
            assert response.status == 408, received
            assert json.loads(response.body) == {"error": "the request did not arrive whole within 0.8s"}
            assert 0.7 < took < 4
    assert upstream.received == []


def test_tritons_other_endpoints_and_wrong_methods_never_reach_the_model_server(upstream):
    with dataplane_before(upstream) as (_, port):
        for method, path in [("GET", f"/v2/models/{MODEL}/stats"), ("POST", "/v2/trace/setting"),
                             ("POST", f"/v2/models/{MODEL}/trace/setting"), ("GET", f"/v2/models/{MODEL}/config"),
                             ("POST", "/v2/repository/index"), ("POST", f"/v2/repository/models/{MODEL}/unload"),
                             ("POST", "/v2/logging"), ("GET", "/v2/systemsharedmemory/status"),
                             ("POST", "/v2/cudasharedmemory/region/r/unregister"), ("GET", "/v2/models/stats")]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            resp = conn.getresponse()
            assert resp.status == 404, path
            assert "error" in json.loads(resp.read())
            conn.close()
        for method, path, allow in [("GET", INFER, "POST"), ("POST", f"/v2/models/{MODEL}/ready", "GET, HEAD"),
                                    ("PUT", INFER, "POST"), ("DELETE", f"/v2/models/{MODEL}", "GET, HEAD"),
                                    ("POST", "/v2/health/live", "GET, HEAD"), ("POST", "/metrics", "GET, HEAD")]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
            resp = conn.getresponse()
            assert (resp.status, resp.headers["allow"]) == (405, allow), (method, path)
            assert json.loads(resp.read())["error"] == f"method not allowed: this route takes {allow}"
            # a method the gateway serves keeps the connection; any other closes it
            assert resp.headers.get("connection") == (None if method in ("GET", "POST") else "close")
            conn.close()
        for method, path in [("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/versions/1/ready"),
                             ("POST", f"/v2/models/{MODEL}/versions/1/infer"), ("POST", INFER)]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            assert conn.getresponse().status == 200, path
            conn.close()
    assert [(m.method, m.url) for m in upstream.received] == [
        (b"GET", b"/v2/models/m_triton"), (b"GET", b"/v2/models/m_triton/versions/1/ready"),
        (b"POST", b"/v2/models/m_triton/versions/1/infer"), (b"POST", b"/v2/models/m_triton/infer")]


def test_an_http10_client_gets_a_chunked_response_decoded_and_samples_hold_it_decoded():
    upstream = RecordingUpstream(chunks=[b"hello ", b"chunked ", b"world"])
    samples: list[dict[str, bytes]] = []

    def collect(sample: dict[str, bytes]) -> bool:
        samples.append(sample)
        return True

    try:
        with dataplane_before(upstream, "--sample-rate", "1", on_sample=collect) as (_, port):
            body = b"HTTP/1.0 body"
            request = b"POST " + INFER.encode() + b" HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)  # no keep-alive asked: the close ends the body
                received = _read_response(sock, 5)
            head, _, payload = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower(), head
            assert b"connection: close" in head.lower()
            assert payload == b"hello chunked world"
            # even one that asks to keep the connection: the close is what delimits the body it gets
            keep = request.replace(b"HTTP/1.0\r\n", b"HTTP/1.0\r\nConnection: keep-alive\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(keep)
                received = _read_response(sock, 5)
            assert received.endswith(b"\r\n\r\nhello chunked world") and b"transfer-encoding" not in received.lower()
            # an HTTP/1.1 client gets the chunks as they came
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", INFER, body=body)
            resp = conn.getresponse()
            assert resp.headers["transfer-encoding"] == "chunked" and resp.read() == b"hello chunked world"
            conn.close()
            wait_until(lambda: len(samples) == 3, 10, "three samples", interval=0.02)
    finally:
        upstream.close()
    assert [s["response"] for s in samples] == [b"hello chunked world"] * 3
    assert all(s["request"] == body for s in samples)


def test_a_connection_over_the_limit_reads_its_503_while_sending_its_body(upstream):
    with dataplane_before(upstream, "--max-connections", "1") as (_, port):
        def take_the_one_connection() -> http.client.HTTPConnection | None:
            # (until the connection wait_for_port made has been counted out)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/live")
            if conn.getresponse().status == 200:
                return conn
            conn.close()
            return None

        held = wait_until(take_the_one_connection, 10, "a connection the gateway serves", interval=0.02)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        # A body the kernel's buffers cannot take while nobody reads: without the gateway reading it away,
        # sending it meets a reset and the client never sees the answer.
        conn.request("POST", INFER, body=b"x" * (512 * 1024))
        resp = conn.getresponse()
        assert resp.status == 503 and json.loads(resp.read()) == {"error": "too many connections"}
        conn.close()
        held.close()
    assert upstream.received == []


def test_a_large_body_waits_for_memory_another_one_holds_then_is_served(upstream):
    # 100 KB of body memory in all: each of these bodies needs about 86 KB of it past its connection's buffer
    with dataplane_before(upstream, "--max-body-bytes", "150000", "--body-buffer-bytes", "150000",
                          "--request-deadline-ms", "3000") as (_, port):
        body = b"b" * 150_000
        head = b"POST " + INFER.encode() + b" HTTP/1.1\r\nConnection: close\r\nContent-Length: 150000\r\n\r\n"
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        first.sendall(head + body[:1000])
        time.sleep(0.2)  # the first has its memory (were it later, the second would have it: same outcome)
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        second.sendall(head + body[:1000])
        time.sleep(0.2)
        first.sendall(body[1000:])
        second.sendall(body[1000:])
        answers = sorted(_status(_read_response(s, 10)) or 0 for s in (first, second))
        first.close()
        second.close()
        assert answers == [200, 200]
        # One whose request started earlier waits for the memory another holds (and never gives back, as
        # it never finishes its body): at its deadline it gets a 503; the other one a 408 at its own.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        waiting.sendall(head[:20])  # its deadline runs from here
        time.sleep(0.2)
        holding = socket.create_connection(("127.0.0.1", port), timeout=5)
        holding.sendall(head + body[:1000])
        time.sleep(0.2)
        waiting.sendall(head[20:] + body[:1000])
        assert [_status(_read_response(s, 10)) for s in (waiting, holding)] == [503, 408]
        waiting.close()
        holding.close()
    assert [len(m.body) for m in upstream.received] == [150_000, 150_000]


def _rss_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


RSS_BOUND_MB = 300  # what the data plane may take under the load below (see the README's memory bound)


def test_memory_stays_bounded_under_500_concurrent_oversized_uploads_and_traffic_flows(upstream):
    """400 clients declare 20 MB (over the 8 MB limit) and push as fast as they can; 100 declare 6 MB
    (allowed) and send 64 KB at a time, more than the 32 MB body budget takes at once. Meanwhile a health
    check and an inference go through every 0.2 s, each answered within a few seconds."""
    flags = ["--max-body-bytes", "8000000", "--body-buffer-bytes", "32000000", "--request-deadline-ms", "4000",
             "--max-connections", "2000", "--sample-rate", "0"]
    with dataplane_before(upstream, *flags) as (dataplane, port):
        pid = dataplane.proc.pid
        base = _rss_kb(pid)["VmRSS"]
        probes: list[tuple[str, int, float]] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                for method, path in (("GET", "/v2/health/ready"), ("POST", INFER)):
                    started = time.monotonic()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    try:
                        conn.request(method, path, body=b"{}" if method == "POST" else None)
                        status = conn.getresponse().status
                    except OSError:
                        status = 0
                    finally:
                        conn.close()
                    probes.append((path, status, time.monotonic() - started))
                stop.wait(0.2)

        prober = threading.Thread(target=probe)
        clients: dict[socket.socket, dict] = {}
        chunk = b"u" * 65536
        peak_kb = 0
        try:
            for i in range(500):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                oversized = i % 5 != 0
                size = 20_000_000 if oversized else 6_000_000
                sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                sock.setblocking(False)
                clients[sock] = {"oversized": oversized, "left": size, "got": b"", "done": False}
            prober.start()
            ends = time.monotonic() + 6
            while time.monotonic() < ends and not all(c["done"] for c in clients.values()):
                peak_kb = max(peak_kb, _rss_kb(pid)["VmRSS"])
                if peak_kb > RSS_BOUND_MB * 1024:
                    break  # the bound is broken: no need to push further
                for sock, c in clients.items():
                    if c["done"]:
                        continue
                    try:  # the answer, then the gateway's close
                        data = sock.recv(65536)
                        c["got"] += data
                        c["done"] = not data
                    except BlockingIOError:
                        pass
                    except OSError:
                        c["done"] = True
                    if c["done"]:
                        continue
                    # the oversized push all they can; the allowed ones 64 KB a round
                    for _ in range(16 if c["oversized"] else 1):
                        if c["left"] <= 0:
                            break
                        try:
                            c["left"] -= sock.send(chunk[:c["left"]])
                        except (BlockingIOError, OSError):
                            break
                time.sleep(0.02)
            peak_kb = max(peak_kb, _rss_kb(pid)["VmHWM"])
        finally:
            stop.set()
            if prober.is_alive():
                prober.join(10)
            for sock in clients:
                sock.close()
        statuses = Counter((c["oversized"], _status(c["got"])) for c in clients.values())
        after_kb = wait_until(lambda: (kb := _rss_kb(pid)["VmRSS"]) < base + 64 * 1024 and kb, 10,
                              "the data plane's memory to go back after the load")
        slowest = max(t for _, _, t in probes)
        print(f"\ndata plane RSS: {base / 1024:.0f} MB before, peak {peak_kb / 1024:.0f} MB, "
              f"{after_kb / 1024:.0f} MB after; answers {dict(statuses)}; {len(probes)} probes, "
              f"slowest {slowest:.2f}s")
        assert peak_kb < RSS_BOUND_MB * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
        assert statuses[(True, 413)] == 400, statuses  # every oversized upload refused, and it read why
        allowed = {s: n for (oversized, s), n in statuses.items() if not oversized}
        assert set(allowed) <= {200, 408, 503} and allowed.get(503), allowed  # some waited for memory in vain
        assert len(probes) >= 20 and all(status == 200 for _, status, _ in probes), probes
        assert slowest < 5
