"""A Celery worker outlives a restart of its Redis broker (the stack's supervisor restarts a killed Redis
within a second or two, with its data): the same process consumes again within seconds, and the tasks that
were running at the kill are acknowledged or redelivered, none lost. Before the patch in config/celery.py,
kombu's close of the broken channel raised AttributeError: 'NoneType' object has no attribute 'hostname' and
the worker exited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from config.stack import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent

# The worker's tasks: our app (config.celery, with the settings production runs: acks_late,
# reject_on_worker_lost, prefetch 1) and one probe task that notes when it starts and ends.
PROBE = r'''
import os, time
from config.celery import app

LOG = os.environ["BROKER_LOSS_PROBE_LOG"]


def note(*words):
    with open(LOG, "a") as f:
        f.write(" ".join(map(str, words)) + "\n")


@app.task(name="broker_loss_probe.probe")
def probe(tag, seconds=0.0, crash_once=False):
    marker = f"{LOG}.{tag}.crashed"
    note("start", tag)
    if crash_once and os.path.exists(marker):
        note("done", tag)
        return
    time.sleep(seconds)
    if crash_once:
        open(marker, "w").close()
        os._exit(1)  # its pool process dies: reject_on_worker_lost puts the message back on the queue
    note("done", tag)
'''


def _wait_for(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_worker_outlives_a_redis_restart_and_loses_no_task(tmp_path: Path) -> None:
    import redis as redis_py

    from config.celery import app

    broker = EmbeddedRedis(tmp_path / "redis", tmp_path / "redis.log")  # of its own, on a free port
    url = broker.start()
    client = redis_py.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    (tmp_path / "broker_loss_probe.py").write_text(PROBE)
    probe_log, worker_log = tmp_path / "probe.log", tmp_path / "worker.log"
    probe_log.touch()
    env = {**os.environ, "REDIS_URL": url, "BROKER_LOSS_PROBE_LOG": str(probe_log),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    # Three processes for two long tasks: one stays free, so the worker has a BRPOP in flight when Redis
    # dies, the case that killed it.
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "broker_loss_probe", "worker", "--loglevel", "INFO",
         "--concurrency", "3", "--queues", "default", "--hostname", f"broker-loss-{uuid.uuid4().hex[:6]}@%h"],
        env=env, cwd=REPO, stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def send(*args: Any) -> None:
        with app.connection_for_write(url) as conn:
            app.send_task("broker_loss_probe.probe", args=args, queue="default", connection=conn)

    def probe_lines() -> list[str]:
        return probe_log.read_text().splitlines()

    try:
        _wait_for(lambda: "ready." in worker_log.read_text() or worker.poll() is not None, 90, "the worker")
        assert worker.poll() is None, worker_log.read_text()
        send("kept", 6.0)  # still running when Redis is back: acknowledged then, through the old channel
        send("crashed", 6.0, True)  # its process dies after Redis is back: redelivered and run again
        _wait_for(lambda: {"start kept", "start crashed"} <= set(probe_lines()), 30, "both tasks to start")
        assert client.hlen("unacked") == 2
        time.sleep(1.5)  # Redis writes its append-only file every second

        os.kill(broker.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        broker.proc.wait(10)  # type: ignore[union-attr]
        time.sleep(0.5)  # the stack's supervisor notices within 0.5 s
        broker.launch()  # same port, same data, as the supervisor restarts it
        back = time.monotonic()

        send("after")
        took = _wait_for(lambda: "done after" in probe_lines() or worker.poll() is not None, 30, "a new task")
        assert worker.poll() is None, f"the worker exited:\n{worker_log.read_text()[-4000:]}"
        assert took < 10, f"a task sent once Redis was back ran only {took:.1f}s later"

        _wait_for(lambda: {"done kept", "done crashed"} <= set(probe_lines()) and client.hlen("unacked") == 0,
                  30, "the running tasks to be acknowledged or redelivered")
        lines = probe_lines()
        assert lines.count("start crashed") >= 2, lines  # redelivered after its process died
        assert client.llen("default") == 0
        assert worker.poll() is None and "Unrecoverable error" not in worker_log.read_text()
        print(f"a task sent after the restart ran {took:.1f}s after Redis was back "
              f"({time.monotonic() - back:.1f}s for everything)")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        broker.stop()
