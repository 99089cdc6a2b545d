"""`make run`'s supervisor: starts embedded servers and processes, stops on Ctrl-C, keeps its state."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from config.stack import env_for_own_servers

REPO = Path(__file__).resolve().parent.parent


def _start(state: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    env = env_for_own_servers()  # embedded servers of its own, not the test run's
    env["PLATFORM_PORT"] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "config.stack", "--state", str(state), "run", "--no-demo"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Logs:"):
            return proc, lines
    proc.kill()
    raise AssertionError("the platform did not come up:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=90)
    return out


def _children_alive(state: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(state) in line and "config.stack" not in line]


def test_run_starts_everything_stops_cleanly_and_a_second_run_keeps_what_was_registered():
    import shutil
    import uuid

    from config.stack import free_port

    # Under the repository's state folder: as root, PostgreSQL runs as 'nobody', which cannot enter /tmp/pytest-of-root.
    state = REPO / ".state" / f"stack-test-{uuid.uuid4().hex[:8]}"
    try:
        _run_twice(state, free_port())
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _run_twice(state: Path, port: int) -> None:
    proc, lines = _start(state, port)
    base = f"http://127.0.0.1:{port}"
    try:
        admin_line = next(line for line in lines if line.startswith("Admin login:"))
        password = admin_line.split("/")[-1].strip()
        resp = requests.post(f"{base}/api/v1/models/", json={"name": "kept-across-restarts"},
                             auth=("admin", password), timeout=30)
        assert resp.status_code == 201, resp.text
    finally:
        out = _stop(proc)
    assert "Stopped." in out
    assert proc.returncode == 0
    assert _children_alive(state) == []  # postgres, redis, web, worker and beat all gone

    proc, lines = _start(state, port)
    try:
        assert any(line.strip() == admin_line.strip() for line in lines)  # same admin, same password
        resp = requests.get(f"{base}/api/v1/models/kept-across-restarts/", auth=("admin", password), timeout=30)
        assert resp.status_code == 200
    finally:
        _stop(proc)
