"""The web server as production runs it (uWSGI with platform/uwsgi.ini, started by config.web)."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from config.stack import free_port, wait_for_port
from deployer.testing import wait_until


def _connection(base_url: str) -> http.client.HTTPConnection:
    url = urlsplit(base_url)
    return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)


def test_a_chunked_body_is_refused_with_411_and_what_to_do(platform_server: str) -> None:
    def body() -> Iterator[bytes]:
        yield b"PK\x03\x04"
        yield b"rest of an archive"

    for path in ("/api/v1/models/chunked/versions/", "/api/2.0/mlflow-artifacts/artifacts/0/x.bin"):
        resp = requests.post(f"{platform_server}{path}", data=body(), timeout=30)  # requests sends it chunked
        assert resp.status_code == 411, (path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "length_required"
        assert "Content-Length" in error["message"] and "--data-binary @file.zip" in error["message"]


def test_keep_alive_and_long_headers(platform_server: str) -> None:
    conn = _connection(platform_server)
    try:
        for _ in range(3):  # one connection, three requests
            conn.request("GET", "/api/v1/me/", headers={"Cookie": "c=" + "x" * 20_000})  # over uWSGI's 4 KiB default
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 401  # reached the app, which asks for credentials
            assert not resp.will_close
    finally:
        conn.close()


def test_sigterm_stops_the_server_and_its_workers(platform_process, tmp_path: Path) -> None:
    port = free_port()
    with platform_process(["config.web", "--http11-socket", f"127.0.0.1:{port}", "--processes", "2"], "web") as proc:
        wait_for_port(port, 60, proc)
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/me/", timeout=30).status_code == 401
        # Both workers import the app after the fork; a signal in the middle of that is a failed start.
        wait_until(lambda: (tmp_path / "web.log").read_text(errors="replace").count(" ready in ") == 2, 60,
                   "both uWSGI workers to load the app", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # uWSGI's default on SIGTERM is to reload; die-on-term makes it exit
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"port {port} still accepts connections after the server exited")
