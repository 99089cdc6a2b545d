"""The hardware targets page: each target, its queue, and the live workers serving it with their hardware."""

from __future__ import annotations

import uuid

import pytest

from pipelines import hardware
from pipelines.hardware import Facts, Gpu
from registry.roles import Role

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def presence_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setattr(hardware, "WORKERS_KEY", f"test:{tag}:workers")
    monkeypatch.setattr(hardware, "WORKER_KEY", f"test:{tag}:worker:{{hostname}}")
    monkeypatch.setattr(hardware, "PROFILE_SEEN_KEY", f"test:{tag}:profile-seen")


def _row(body: str, name: str) -> str:
    start = body.index(f'id="target-{name}"')
    return body[start:body.index("</tr>", start)]


def test_the_targets_page_shows_which_workers_serve_which_target(browser_as) -> None:
    facts = Facts(arch="x86_64", cpu_model="Test CPU", cpu_flags=("avx2", "fma"), cores=8, memory_bytes=16 << 30,
                  gpus=(Gpu("NVIDIA H100 80GB HBM3", 81559, "550.54.15"),), cuda="12.4")
    hardware.worker_announce("gpu-1@host", facts, hardware.matching(facts))
    hardware.worker_announce("gone@host", facts, [hardware.PROFILES_BY_NAME["gpu-a100"]])
    hardware.worker_withdraw("gone@host")

    resp = browser_as(Role.ONCALL).get("/targets/")
    assert resp.status_code == 200
    body = resp.content.decode()
    h100 = _row(body, "gpu-h100")
    assert "gpu-1@host" in h100 and "NVIDIA H100 80GB HBM3" in h100 and "CUDA 12.4" in h100 and "live" in h100
    assert "hil.gpu-h100" in h100
    assert "gpu-1@host" in _row(body, "cpu-x86-avx2")
    assert "none since" in _row(body, "gpu-a100")
    assert "never had a worker" in _row(body, "gpu-l4")
    assert 'aria-current="page">Targets' in body
