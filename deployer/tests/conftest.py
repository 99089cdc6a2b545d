"""Serving fixtures: a real local Triton fleet (the supervisor process), a real gateway process, and versions
whose engines are the fault-injectable echo model (deployer.testing)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.testing import echo_version, gateway_process, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]
KEYS = ["fleet:local:nodes", "gateway:instances", "gateway:routes", "gateway:routes:version", "deployer:retiring"]


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    import redis

    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("REDIS_URL is not set: run under `python -m config.stack exec`")
    client = redis.Redis.from_url(url)
    client.delete(*KEYS)
    yield client
    client.delete(*KEYS)
    client.close()


@pytest.fixture(scope="module")
def local_fleet(redis_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two supervised Triton nodes, as `make run` starts them."""
    from deployer.fleet_local import read_nodes

    state = tmp_path_factory.mktemp("fleet")
    log = open(state / "supervisor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "deployer.fleet_local", "--state", str(state), "--nodes", "2"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len([n for n in read_nodes(redis_client) if n.ready]) == 2, 90,
                   "two ready Triton nodes", proc)
        yield {"proc": proc, "state": state}
    finally:
        stop_process(proc, 40)
        log.close()


@pytest.fixture(scope="module")
def gateway(redis_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with gateway_process(os.environ["REDIS_URL"], tmp_path_factory.mktemp("gateway") / "gateway.log",
                         "--sample-rate", "0", "--routes-poll-s", "0.2") as (port, proc):
        yield {"port": port, "proc": proc}


@pytest.fixture
def serving_version(tmp_path: Path) -> Callable[..., Any]:
    def make(model: str, archive: Path, factor: float, fault_file: Path | None = None) -> Any:
        return echo_version(model, archive, factor, tmp_path, fault_file)

    return make
