"""The inference gateway against a real Triton server (two python-backend models) and the stack's Redis,
driven by the unmodified tritonclient.http client. Loopback and free ports only."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from config.stack import free_port
from deployer.gateway.echo_model import write_echo_model
from deployer.gateway.routing import INSTANCES_KEY, ROUTES_KEY, ROUTES_VERSION_KEY, publish_routes
from deployer.testing import Load, children, dataplane_process, gateway_process, process_gone, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    import tritonclient.http as triton_http

    from pipelines.triton_local import TritonServer

    base = tmp_path_factory.mktemp("gw-triton")
    write_echo_model(base / "repo", "echo_v1", 1)
    write_echo_model(base / "repo", "echo_v2", 2)
    server = TritonServer(base / "repo", base / "work")
    server.start()
    try:
        client = triton_http.InferenceServerClient(server.url)
        client.load_model("echo_v1")
        client.load_model("echo_v2")
        client.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(redis_client, triton, tmp_path_factory):
    # The keys a gateway reads are global to the Redis; this module's gateway is the only one of the test run
    # following database 0 (see the read-timeout test for another).
    stream = f"gateway:samples:test-{uuid.uuid4().hex[:8]}"
    try:
        with gateway_process(os.environ["REDIS_URL"], tmp_path_factory.mktemp("gw") / "gateway.log",
                              "--sample-rate", "0.5", "--sample-stream", stream, "--node-down-s", "30",
                              "--routes-poll-s", "0.2") as (port, proc):
            yield {"port": port, "proc": proc, "stream": stream, "url": f"127.0.0.1:{port}"}
    finally:
        redis_client.delete(stream)


@pytest.fixture
def own_routes():
    """A Redis database of the test's own for its gateways' routing tables: (its URL, a client). The module's
    gateway follows database 0."""
    import redis

    url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url)
    client.delete(ROUTES_KEY, ROUTES_VERSION_KEY, INSTANCES_KEY)
    yield url, client
    client.delete(ROUTES_KEY, ROUTES_VERSION_KEY, INSTANCES_KEY)
    client.close()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _route(redis_client, gateway, triton, weight: int | None, stable_nodes: list[str] | None = None) -> None:
    """Publish a table for the logical model "echo" (v1 stable, v2 canary at `weight`) and wait until the
    running gateway reports that table's version in use."""
    table = {"echo": {"stable": {"version": "1", "triton_model": "echo_v1", "nodes": stable_nodes or [triton.url]},
                      "canary": None if weight is None else
                      {"version": "2", "triton_model": "echo_v2", "nodes": [triton.url], "weight": weight}}}
    _wait_applied(gateway["port"], publish_routes(redis_client, table))


def _wait_applied(port: int, version: int) -> None:
    wait_until(lambda: re.search(rf"^gateway_routes_version {version}(\.0)?$", _metrics(port), re.M), 10,
               f"the gateway to apply routing table version {version}", interval=0.02)


def _infer(client, key: str | None = None, values=(1.0, 2.0, 3.0)) -> tuple[float, str]:
    """(factor applied, Triton model that answered) for one inference through `client`."""
    import tritonclient.http as triton_http

    x = np.asarray(values, dtype=np.float32)
    inp = triton_http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("echo", [inp], headers={"x-request-key": key} if key else None)
    y = result.as_numpy("y")
    factor = float(y[0] / x[0])
    assert np.allclose(y, x * factor)
    return factor, result.get_response()["model_name"]


@pytest.fixture
def client(gateway):
    import tritonclient.http as triton_http

    c = triton_http.InferenceServerClient(gateway["url"])
    yield c
    c.close()


def test_health_metadata_and_inference_speak_the_triton_protocol(redis_client, gateway, triton, client):
    _route(redis_client, gateway, triton, None)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("echo")
    meta = client.get_model_metadata("echo")
    assert meta["name"] == "echo" and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["x"] and [o["name"] for o in meta["outputs"]] == ["y"]
    assert _infer(client) == (1.0, "echo_v1")
    assert not client.is_model_ready("no_such_model")
    # the routed version comes back in a header
    req = urllib.request.Request(f"http://{gateway['url']}/v2/models/echo/infer", method="POST",
                                 data=b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}')
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["x-model-version"] == "1"
        assert b'"data":[1.0,2.0]' in resp.read()


def test_weights_route_as_configured_and_change_without_restart(redis_client, gateway, triton, client):
    pid = gateway["proc"].pid
    _route(redis_client, gateway, triton, 0)
    assert {_infer(client) for _ in range(20)} == {(1.0, "echo_v1")}
    _route(redis_client, gateway, triton, 100)
    assert {_infer(client) for _ in range(20)} == {(2.0, "echo_v2")}
    _route(redis_client, gateway, triton, 50)
    factors = [_infer(client)[0] for _ in range(400)]
    # unkeyed requests are spread evenly: exactly `weight` of every 100 go to the canary
    assert factors.count(2.0) == 200 and factors.count(1.0) == 200
    _route(redis_client, gateway, triton, 10)
    factors = [_infer(client)[0] for _ in range(100)]
    assert factors.count(2.0) == 10
    assert gateway["proc"].poll() is None and gateway["proc"].pid == pid


def sticky_arm(key: str, weight: int) -> str:
    """The data plane's rule, written again as the test's oracle: crc32 of the key (zlib's), modulo 100,
    below the canary weight lands on the canary, on every gateway."""
    return "canary" if zlib.crc32(key.encode()) % 100 < weight else "stable"


def test_request_keys_are_sticky_to_an_arm(redis_client, gateway, triton, client):
    _route(redis_client, gateway, triton, 30)
    keys = [f"user-{i}" for i in range(60)]
    expected = {k: 2.0 if sticky_arm(k, 30) == "canary" else 1.0 for k in keys}
    assert 0 < sum(v == 2.0 for v in expected.values()) < len(keys)  # both arms are exercised
    for _ in range(2):
        assert {k: _infer(client, k)[0] for k in keys} == expected


def test_a_dead_node_is_retried_on_a_live_one_without_a_client_error(redis_client, gateway, triton, client):
    dead = f"127.0.0.1:{free_port()}"
    _route(redis_client, gateway, triton, None, stable_nodes=[dead, triton.url])
    assert [_infer(client) for _ in range(10)] == [(1.0, "echo_v1")] * 10
    text = _metrics(gateway["port"])
    assert re.search(r'^gateway_upstream_retries_total\{model="echo",version="1"\} [1-9]', text, re.M)
    assert f'gateway_node_marked_down_total{{node="{dead}"}} 1.0' in text


def test_metrics_count_requests_per_version(redis_client, gateway, triton, client):
    _route(redis_client, gateway, triton, 100)
    before = _count(_metrics(gateway["port"]), "2")
    for _ in range(7):
        _infer(client)
    text = _metrics(gateway["port"])
    assert _count(text, "2") == before + 7
    assert _count(text, "1") > 0
    assert 'gateway_requests_in_flight{model="echo",version="2"} 0.0' in text


def _count(text: str, version: str) -> float:
    m = re.search(rf'^gateway_request_duration_seconds_count\{{model="echo",version="{version}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_samples_of_inputs_and_outputs_reach_the_redis_stream(redis_client, gateway, triton, client):
    _route(redis_client, gateway, triton, 100)
    for i in range(40):
        _infer(client, values=(float(i + 1), 5.0))
    deadline = time.monotonic() + 10
    entries = []
    while time.monotonic() < deadline:
        entries = [e for _, e in redis_client.xrange(gateway["stream"]) if e[b"version"] == b"2"]
        if len(entries) >= 5:
            break
        time.sleep(0.1)
    assert len(entries) >= 5  # half sampled; 40 requests leave at least 5 unless the rate were broken
    entry = entries[-1]
    assert entry[b"model"] == b"echo" and entry[b"triton_model"] == b"echo_v2" and entry[b"status"] == b"200"
    assert b"inference-header-content-length" in entry[b"request_head"].lower()
    assert entry[b"request"] and entry[b"response"] and float(entry[b"latency_ms"]) > 0


def test_chunked_bodies_pipelined_requests_and_connection_close_are_handled(redis_client, gateway, triton):
    _route(redis_client, gateway, triton, None)
    body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[3,4]}]}'
    conn = http.client.HTTPConnection("127.0.0.1", gateway["port"], timeout=5)
    conn.request("POST", "/v2/models/echo/infer", body=iter([body[:10], body[10:]]), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200 and b'"data":[3.0,4.0]' in resp.read()
    conn.close()
    # two pipelined requests on one connection, the second asking to close: two answers in order, then EOF
    one = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    two = (b"GET /v2/models/echo/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", gateway["port"]), timeout=5) as sock:
        sock.sendall(one + two)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2 and b'"data":[3.0,4.0]' in received


class StuckUpstream:
    """A model server that is stuck: it accepts connections and reads requests but never answers (or, for a
    Triton model name containing "stall", sends a response head and the first bytes of the body, then
    nothing). Runs its own event loop in a thread; counts connections and those the peer closed."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed_by_peer = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.addr = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader, writer) -> None:
        self.accepted += 1
        head = await reader.readuntil(b"\r\n\r\n")
        if b"stall" in head.split(b"\r\n", 1)[0]:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod")
        while await reader.read(65536):
            pass
        self.closed_by_peer += 1
        writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_stuck_upstream_gets_a_504_and_its_connection_is_dropped(own_routes, triton, tmp_path):
    """A gateway of its own (--read-timeout-s 0.5), following a routing table in another Redis database,
    so the module's gateway is left alone."""
    url, routes = own_routes
    stuck = StuckUpstream()
    try:
        with gateway_process(url, tmp_path / "gateway.log", "--sample-rate", "0", "--read-timeout-s", "0.5",
                              "--routes-poll-s", "0.2") as (port, _):
            _stuck_upstream_checks(routes, stuck, port, triton)
    finally:
        stuck.close()


def _stuck_upstream_checks(routes, stuck: StuckUpstream, port: int, triton) -> None:
    import tritonclient.http as triton_http

    version = publish_routes(routes, {
        "slow": {"stable": {"version": "7", "triton_model": "slow_v7", "nodes": [stuck.addr]}},
        "half": {"stable": {"version": "3", "triton_model": "stall_v3", "nodes": [stuck.addr]}},
        "echo": {"stable": {"version": "1", "triton_model": "echo_v1", "nodes": [triton.url]}}})
    _wait_applied(port, version)
    body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}'
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    for n in (1, 2):
        conn.request("POST", "/v2/models/slow/infer", body=body)
        resp = conn.getresponse()
        assert resp.status == 504
        assert "error" in json.loads(resp.read())
        # the connection to the stuck server was closed, not pooled: the next request opens another
        def closed(n: int = n) -> bool:
            return stuck.closed_by_peer == n

        wait_until(closed, 10, "the gateway closes the stuck connection", interval=0.02)
        assert stuck.accepted == n
    conn.close()
    # a response that started and then stalled: the client has the head, then the connection ends
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /v2/models/half/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\nx-model-version: 3\r\n") and received.endswith(b'{"mod')
    wait_until(lambda: stuck.closed_by_peer == 3, 10, "the gateway closes the stalled connection", interval=0.02)
    text = _metrics(port)
    assert 'gateway_request_errors_total{model="slow",reason="upstream_timeout",version="7"} 2.0' in text
    assert 'gateway_request_errors_total{model="half",reason="upstream_timeout",version="3"} 1.0' in text
    assert 'gateway_requests_in_flight{model="slow",version="7"} 0.0' in text
    # the gateway goes on serving the models whose servers answer
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert _infer(client) == (1.0, "echo_v1")
    finally:
        client.close()


def _control_socket(port: int) -> Path:
    """The documented default, restated as the tests' oracle: in the state folder, named by host and port."""
    return Path(os.environ["PLATFORM_STATE_DIR"]) / f"gateway-127.0.0.1-{port}.sock"


def _echo_table(triton, version: str) -> dict:
    return {"echo": {"stable": {"version": version, "triton_model": f"echo_v{version}", "nodes": [triton.url]}}}


def test_a_killed_control_plane_leaves_its_data_plane_serving_until_a_new_one_adopts_it(triton, own_routes,
                                                                                          tmp_path):
    url, routes = own_routes
    flags = ("--sample-rate", "0", "--routes-poll-s", "0.2")
    with gateway_process(url, tmp_path / "first.log", *flags) as (port, first):
        _wait_applied(port, publish_routes(routes, _echo_table(triton, "1")))
        (dataplane,) = children(first.pid)
        with Load(port, "echo", threads=2) as load:
            wait_until(lambda: load.total() >= 20, 30, "answers through the gateway")
            first.kill()
            first.wait(10)
            answered = load.total()
            wait_until(lambda: load.total() >= answered + 200, 60, "answers with no control plane")
            assert not process_gone(dataplane) and _control_socket(port).exists()
            second_log = tmp_path / "second.log"
            with gateway_process(url, second_log, *flags, port=port) as (_, second):
                wait_until(lambda: b"adopted the data plane" in second_log.read_bytes(), 30, "the adoption", second)
                assert f"adopted the data plane (pid {dataplane})".encode() in second_log.read_bytes()
                assert children(second.pid) == []
                # A routing change published now reaches the data plane through its new control plane
                _wait_applied(port, publish_routes(routes, _echo_table(triton, "2")))
                wait_until(lambda: load.by_version().get("2", 0) >= 20, 30, "answers from version 2")
                load.stop()
                assert load.failures == []
                assert set(load.outcomes) == {(200, "1", 1.0), (200, "2", 2.0)}
                # and stopping that control plane stops the data plane it adopted
                second.terminate()
                assert second.wait(10) == 0
                wait_until(lambda: process_gone(dataplane), 10, "the adopted data plane exits", interval=0.02)
                assert not _control_socket(port).exists()


def test_a_stopped_control_plane_stops_its_data_plane_which_has_a_session_and_a_private_socket_of_its_own(
        own_routes, tmp_path):
    with gateway_process(own_routes[0], tmp_path / "gateway.log", "--sample-rate", "0") as (port, proc):
        (dataplane,) = children(proc.pid)
        assert os.path.basename(os.readlink(f"/proc/{dataplane}/exe")) == "mlops-gateway-dataplane"
        mode = os.stat(_control_socket(port)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert os.getsid(dataplane) == dataplane != os.getsid(proc.pid)  # a killed process group spares it
        proc.terminate()
        assert proc.wait(10) == 0
        wait_until(lambda: process_gone(dataplane), 10, "the data plane exits", interval=0.02)
        assert not _control_socket(port).exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _first_frame(path: Path) -> tuple[bytes, bytes]:
    """What the data plane at `path` sends a new control connection first: (kind, payload)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        data = b""
        while len(data) < 5 or len(data) < 5 + int.from_bytes(data[1:5], "little"):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    return data[:1], data[5:]


def test_a_stale_control_socket_is_replaced(own_routes, tmp_path):
    port = free_port()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(_control_socket(port)))
    stale.close()  # its file stays, with nobody listening: as a killed data plane leaves it
    with pytest.raises(ConnectionRefusedError):
        _first_frame(_control_socket(port))
    log = tmp_path / "gateway.log"
    with gateway_process(own_routes[0], log, "--sample-rate", "0", port=port) as (_, proc):
        (dataplane,) = children(proc.pid)
        wait_until(lambda: f"started the data plane (pid {dataplane})".encode() in log.read_bytes(), 30,
                   "the data plane to be connected", proc)
        # A live data plane listens there now (and refuses a second control connection)
        kind, why = _first_frame(_control_socket(port))
        assert kind == b"R" and b"another control plane is connected" in why
        assert stat.S_IMODE(os.stat(_control_socket(port)).st_mode) == 0o600
        assert proc.poll() is None


def test_a_second_control_plane_is_refused_while_the_first_is_connected(triton, own_routes, tmp_path):
    import tritonclient.http as triton_http

    url, routes = own_routes
    flags = ("--sample-rate", "0", "--routes-poll-s", "0.2")
    with gateway_process(url, tmp_path / "gateway.log", *flags) as (port, first):
        _wait_applied(port, publish_routes(routes, _echo_table(triton, "1")))
        (dataplane,) = children(first.pid)
        second = subprocess.run([sys.executable, "-m", "deployer.gateway", "--port", str(port), "--routes-from", url,
                                 "--sample-rate", "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stderr
        assert "has a control plane already" in second.stderr
        # The first keeps the gateway: its data plane, and the routing changes
        _wait_applied(port, publish_routes(routes, _echo_table(triton, "2")))
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert _infer(client) == (2.0, "echo_v2")
        finally:
            client.close()
        assert first.poll() is None and children(first.pid) == [dataplane]


def test_a_missing_data_plane_binary_is_a_clear_error(tmp_path):
    env = {**os.environ, "GATEWAY_DATAPLANE": str(tmp_path / "nowhere")}
    result = subprocess.run([sys.executable, "-m", "deployer.gateway", "--port", str(free_port())], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "data plane binary is not at $GATEWAY_DATAPLANE" in result.stderr and "make install" in result.stderr


def test_a_table_whose_names_hold_control_characters_is_refused(redis_client):
    with pytest.raises(ValueError, match="bad model name"):
        publish_routes(redis_client, {"a\tb": {"stable": {"version": "1", "triton_model": "m", "nodes": ["h:1"]}}})
    with pytest.raises(ValueError, match="version"):
        publish_routes(redis_client, {"m": {"stable": {"version": "1\n", "triton_model": "m", "nodes": ["h:1"]}}})


def _with_capture(capture) -> dict:
    return {"m": {"stable": {"version": "1", "triton_model": "m_v1", "nodes": ["h:1"]}, "capture": capture}}


def test_a_capture_setting_is_refused_unless_it_is_a_fraction_and_a_bounded_floor():
    from deployer.gateway.routing import parse_table

    fraction = "m.capture.fraction must be a number 0..1"
    floor = "m.capture.floor_per_s must be a whole number of requests a second, 0 to at most 10000"
    for capture, message in [
        (5, "m.capture must be an object with fraction and floor_per_s"),
        ([0.1, 5], "m.capture must be an object with fraction and floor_per_s"),
        ({"fraction": 0.1, "floor_per_s": 5, "floor": 5}, "m.capture takes fraction and floor_per_s only, not floor"),
        ({"floor_per_s": 5}, f"{fraction}, not None"),
        ({"fraction": 1.5, "floor_per_s": 5}, f"{fraction}, not 1.5"),
        ({"fraction": -0.1, "floor_per_s": 5}, f"{fraction}, not -0.1"),
        ({"fraction": float("nan"), "floor_per_s": 5}, f"{fraction}, not nan"),
        ({"fraction": "0.5", "floor_per_s": 5}, f"{fraction}, not '0.5'"),
        ({"fraction": True, "floor_per_s": 5}, f"{fraction}, not True"),
        ({"fraction": 0.1}, f"{floor}, not None"),
        ({"fraction": 0.1, "floor_per_s": -1}, f"{floor}, not -1"),
        ({"fraction": 0.1, "floor_per_s": 10_001}, f"{floor}, not 10001"),
        ({"fraction": 0.1, "floor_per_s": 2.5}, f"{floor}, not 2.5"),
        ({"fraction": 0.1, "floor_per_s": True}, f"{floor}, not True"),
    ]:
        with pytest.raises(ValueError) as refused:
            parse_table(_with_capture(capture))
        assert str(refused.value) == message, capture


def test_a_capture_setting_is_kept_through_the_table_and_sent_to_the_data_plane_only_where_set():
    from deployer.gateway.dataplane import encode_table
    from deployer.gateway.routing import Capture, parse_table, table_to_dict

    for capture, kept in [({"fraction": 0, "floor_per_s": 0}, Capture(0.0, 0)),
                          ({"fraction": 1, "floor_per_s": 10_000}, Capture(1.0, 10_000)),
                          ({"fraction": 0.05, "floor_per_s": 20}, Capture(0.05, 20))]:
        table = parse_table(_with_capture(capture))
        assert table["m"].capture == kept
        assert table_to_dict(table)["m"]["capture"] == capture
        assert parse_table(table_to_dict(table)) == table
    assert encode_table(3, table).decode().splitlines()[1:3] == ["model\tm\t0", "capture\t0.05\t20"]
    # A table without one keeps the shape it always had, and the data plane gets no capture line.
    for plain in [_with_capture(None), {"m": {"stable": _with_capture(None)["m"]["stable"]}}]:
        table = parse_table(plain)
        assert table["m"].capture is None
        assert set(table_to_dict(table)["m"]) == {"stable", "canary"}
        assert b"capture" not in encode_table(3, table)


def test_a_models_capture_floor_samples_each_of_its_requests_whatever_the_sample_rate(own_routes, triton, tmp_path):
    """--sample-rate 0. A model whose capture floor is above its traffic (fraction 0) has every request
    sampled; one with floor 0 and fraction 0 has none, as has a model without a capture (the global rate)."""
    url, routes = own_routes
    stream = f"gateway:samples:test-{uuid.uuid4().hex[:8]}"
    stable = {"version": "1", "triton_model": "echo_v1", "nodes": [triton.url]}
    table = {"every": {"stable": stable, "capture": {"fraction": 0, "floor_per_s": 10_000}},
             "never": {"stable": stable, "capture": {"fraction": 0, "floor_per_s": 0}},
             "plain": {"stable": stable}}
    body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}'
    n = 30
    try:
        with gateway_process(url, tmp_path / "gateway.log", "--sample-rate", "0", "--sample-stream", stream,
                             "--routes-poll-s", "0.2") as (port, _):
            _wait_applied(port, publish_routes(routes, table))
            # "every" last: samples reach the stream in order, so any of the others' would be there before its.
            for model in ("never", "plain", "every"):
                for _ in range(n):
                    assert _call(port, "POST", f"/v2/models/{model}/infer", body)[0] == 200

            def sampled() -> list[bytes]:
                return [e[b"model"] for _, e in routes.xrange(stream)]

            wait_until(lambda: len(sampled()) >= n, 10, f"{n} samples in the stream", interval=0.05)
            assert sampled() == [b"every"] * n
            text = _metrics(port)
            assert f'gateway_samples_total{{model="every",version="1"}} {n}.0' in text
            assert 'gateway_samples_total{model="never",version="1"} 0.0' in text
            assert 'gateway_samples_total{model="plain",version="1"} 0.0' in text
    finally:
        routes.delete(stream)


def test_samples_the_control_plane_drops_are_counted_by_the_data_plane(triton):
    from deployer.gateway.routing import parse_table
    from deployer.gateway.sampling import Sampler

    sampler = Sampler("redis://127.0.0.1:1/0", queue_size=1)  # never started: its queue stays full
    with dataplane_process("--sample-rate", "1", on_sample=sampler.offer) as (dataplane, port):
        assert dataplane.apply(1, parse_table({"echo": {"stable": {
            "version": "1", "triton_model": "echo_v1", "nodes": [triton.url]}}}))
        body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}'
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(3):
            conn.request("POST", "/v2/models/echo/infer", body=body)
            assert conn.getresponse().read()
        conn.close()
        assert sampler.queue.qsize() == 1
        wait_until(lambda: "gateway_samples_dropped_total 2.0" in _metrics(port), 10, "two samples counted as dropped",
                   interval=0.02)


def test_a_failed_head_request_gets_no_body_and_the_connection_goes_on(redis_client, gateway):
    dead = f"127.0.0.1:{free_port()}"
    _wait_applied(gateway["port"], publish_routes(redis_client, {
        "gone": {"stable": {"version": "1", "triton_model": "gone_v1", "nodes": [dead]}}}))
    with socket.create_connection(("127.0.0.1", gateway["port"]), timeout=10) as sock:
        # Pipelined: a stray body after the HEAD answer would sit where the second answer should start.
        sock.sendall(b"HEAD /v2/models/gone HTTP/1.1\r\nHost: gw\r\n\r\n"
                     b"GET /v2/health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
        data = b""
        while data.count(b"\r\n\r\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.split(b" ")[1] in (b"502", b"503") and b"content-length:" in head.lower()
    assert rest.startswith(b"HTTP/1.1 200 "), rest


def test_a_silent_client_is_disconnected():
    with dataplane_process("--client-idle-ms", "300") as (_, port):
        for first in (b"", b"GET /v2/health/ready HTTP/1.1\r\n"):  # an idle connection, half a request head
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(first)
                assert sock.recv(1) == b""  # closed by the gateway (a timeout here fails the test)


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_tritons_control_and_statistics_endpoints_are_refused_by_the_gateway(redis_client, gateway, triton):
    _route(redis_client, gateway, triton, None)
    trace_on = json.dumps({"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}).encode()
    for method, path, body in [
        ("GET", "/v2/models/echo/stats", None), ("GET", "/v2/models/echo/versions/1/stats", None),
        ("GET", "/v2/models/stats", None), ("POST", "/v2/models/echo/trace/setting", trace_on),
        ("POST", "/v2/trace/setting", trace_on), ("GET", "/v2/models/echo/config", None),
        ("POST", "/v2/repository/index", b"{}"), ("POST", "/v2/repository/models/echo_v1/unload", b"{}"),
        ("POST", "/v2/logging", b'{"log_verbose_level": 1}'), ("GET", "/v2/systemsharedmemory/status", None),
        ("GET", "/v2/cudasharedmemory/status", None),
    ]:
        status, data = _call(gateway["port"], method, path, body)
        assert status == 404 and "error" in json.loads(data), (path, data)
    assert _call(gateway["port"], "GET", "/v2/models/echo/infer")[0] == 405
    # None of it reached Triton: tracing is still off and the model still loaded there
    triton_port = int(triton.url.rsplit(":", 1)[1])
    status, data = _call(triton_port, "GET", "/v2/models/echo_v1/trace/setting")
    assert status == 200 and json.loads(data)["trace_level"] == ["OFF"]
    assert _call(triton_port, "GET", "/v2/models/echo_v1/ready")[0] == 200


def test_the_control_plane_hands_its_limits_to_the_data_plane(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "1000")
    with gateway_process(os.environ["REDIS_URL"], tmp_path / "gateway.log", "--sample-rate", "0",
                         "--request-deadline-s", "0.5", "--body-buffer-bytes", "100000") as (port, proc):
        (dataplane,) = children(proc.pid)
        argv = open(f"/proc/{dataplane}/cmdline").read().split("\0")
        flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        assert (flags["--max-body-bytes"], flags["--request-deadline-ms"], flags["--body-buffer-bytes"],
                flags["--max-connections"]) == ("1000", "500", "100000", "4096")
        status, data = _call(port, "POST", "/v2/models/echo/infer", b"x" * 1001)
        assert status == 413 and b"limit of 1000 bytes" in data
