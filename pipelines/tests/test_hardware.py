"""Hardware targets: detection from recorded machine output, profile matching, worker presence in Redis,
the targets API, and a real worker that serves the queues of its hardware and announces itself."""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipelines import hardware
from pipelines.hardware import Facts, Gpu

# The first processor of /proc/cpuinfo on an Ice Lake server (flags shortened).
CPUINFO_X86_AVX512 = """\
processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd \
avx512bw avx512vl avx512_vnni avx512_bitalg
bogomips	: 5800.00

processor	: 1
model name	: something else
flags		: fpu
"""
CPUINFO_X86_OLD = """\
processor	: 0
model name	: Intel(R) Xeon(R) CPU E5-2680 v2 @ 2.80GHz
flags		: fpu sse sse2 ssse3 sse4_1 sse4_2 avx
"""
# An Arm Neoverse (Graviton) /proc/cpuinfo: no model name, `Features` instead of `flags`.
CPUINFO_ARM = """\
processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
"""
MEMINFO = "MemTotal:       65842332 kB\nMemFree:        12345678 kB\n"
# nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits on a two-GPU host
NVIDIA_SMI_QUERY = "NVIDIA H100 80GB HBM3, 81559, 550.54.15\nNVIDIA H100 80GB HBM3, 81559, 550.54.15\n"
NVIDIA_SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def _facts(arch: str = "x86_64", flags: tuple[str, ...] = (), gpus: tuple[str, ...] = ()) -> Facts:
    return Facts(arch=arch, cpu_model="test", cpu_flags=flags, cores=4, memory_bytes=1 << 30,
                 gpus=tuple(Gpu(name, 1024, "550") for name in gpus))


def test_cpuinfo_gives_the_first_processors_model_and_flags() -> None:
    model, flags = hardware.parse_cpuinfo(CPUINFO_X86_AVX512)
    assert model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert {"avx2", "fma", "avx512f", "avx512_vnni"} <= set(flags)
    assert list(flags) == sorted(flags)


def test_arm_cpuinfo_gives_its_features_as_flags() -> None:
    model, flags = hardware.parse_cpuinfo(CPUINFO_ARM)
    assert model == ""
    assert "asimd" in flags


def test_meminfo_gives_total_memory_in_bytes() -> None:
    assert hardware.parse_meminfo(MEMINFO) == 65842332 * 1024
    assert hardware.parse_meminfo("nonsense") == 0


def test_nvidia_smi_output_gives_each_gpu_and_the_cuda_version() -> None:
    gpus = hardware.parse_nvidia_smi_gpus(NVIDIA_SMI_QUERY)
    assert gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559, "550.54.15"),) * 2
    assert hardware.parse_nvidia_smi_cuda(NVIDIA_SMI_BANNER) == "12.4"
    assert hardware.parse_nvidia_smi_gpus("") == ()


def _fake_nvidia_smi(folder: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_detect_reads_gpus_and_cuda_from_nvidia_smi_where_there_is_one(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "query").write_text(NVIDIA_SMI_QUERY)
    (tmp_path / "banner").write_text(NVIDIA_SMI_BANNER)
    _fake_nvidia_smi(tmp_path, f'if [ -n "$1" ]; then cat {tmp_path}/query; else cat {tmp_path}/banner; fi',
                     monkeypatch)
    facts = hardware.detect()
    assert [gpu.name for gpu in facts.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert facts.cuda == "12.4"
    assert facts.cores >= 1 and facts.memory_bytes > 0 and facts.arch


def test_detect_gives_no_gpu_when_nvidia_smi_fails_or_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    assert hardware.detect().gpus == ()
    _fake_nvidia_smi(tmp_path, "exec sleep 60", monkeypatch)
    monkeypatch.setattr(hardware, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    facts = hardware.detect()
    assert facts.gpus == () and facts.cuda == ""


def test_a_machine_matches_every_profile_whose_requirements_it_has() -> None:
    _, flags = hardware.parse_cpuinfo(CPUINFO_X86_AVX512)
    names = lambda facts: [p.name for p in hardware.matching(facts)]  # noqa: E731
    assert names(_facts(flags=flags)) == ["cpu-x86-avx2", "cpu-x86-avx512-vnni"]
    assert names(_facts(flags=hardware.parse_cpuinfo(CPUINFO_X86_OLD)[1])) == []
    assert names(_facts(arch="aarch64", flags=hardware.parse_cpuinfo(CPUINFO_ARM)[1])) == ["cpu-arm64"]
    assert names(_facts(flags=("avx2", "fma"), gpus=("NVIDIA H100 80GB HBM3",))) == ["cpu-x86-avx2", "gpu-h100"]
    assert names(_facts(gpus=("NVIDIA A100-SXM4-80GB",))) == ["gpu-a100"]
    assert names(_facts(gpus=("NVIDIA L4",))) == ["gpu-l4"]
    assert names(_facts(gpus=("NVIDIA L40S",))) == []


def test_each_profile_has_its_own_queue() -> None:
    queues = [p.queue for p in hardware.PROFILES]
    assert len(set(queues)) == len(queues)
    assert hardware.PROFILES_BY_NAME["gpu-h100"].queue == "hil.gpu-h100"


@pytest.fixture
def presence_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys of this test's own, so workers announced by other tests (or a real worker) do not count."""
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setattr(hardware, "WORKERS_KEY", f"test:{tag}:workers")
    monkeypatch.setattr(hardware, "WORKER_KEY", f"test:{tag}:worker:{{hostname}}")
    monkeypatch.setattr(hardware, "PROFILE_SEEN_KEY", f"test:{tag}:profile-seen")


H100 = _facts(flags=("avx2", "fma"), gpus=("NVIDIA H100 80GB HBM3",))


def test_an_announced_worker_is_live_for_its_profiles_until_it_withdraws(presence_keys: None) -> None:
    never = hardware.profile_presence("gpu-h100")
    assert not never.live and never.last_seen is None and never.none_since is None

    seen = hardware.worker_announce("gpu-1@host", H100, hardware.matching(H100))
    presence = hardware.profile_presence("gpu-h100")
    assert presence.live and presence.none_since is None
    [worker] = presence.workers
    assert worker["hostname"] == "gpu-1@host"
    assert worker["facts"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert worker["queues"] == ["hil.cpu-x86-avx2", "hil.gpu-h100"]
    assert not hardware.profile_presence("gpu-a100").live

    hardware.worker_withdraw("gpu-1@host")
    gone = hardware.profile_presence("gpu-h100")
    assert not gone.live and gone.none_since == seen


def test_a_worker_silent_for_three_heartbeats_is_not_live(presence_keys: None) -> None:
    hardware.worker_announce("gpu-1@host", H100, hardware.matching(H100))
    hardware.worker_announce("gpu-2@host", H100, hardware.matching(H100))
    # gpu-2 died: its last beat is older than the presence TTL (its key would have expired too)
    from registry.kv import redis_client

    redis_client().zadd(hardware.WORKERS_KEY, {"gpu-2@host": hardware._now() - hardware.presence_ttl_s() - 1})
    assert [w["hostname"] for w in hardware.profile_presence("gpu-h100").workers] == ["gpu-1@host"]
    assert redis_client().zscore(hardware.WORKERS_KEY, "gpu-2@host") is None  # trimmed by the read


def test_a_heartbeat_keeps_the_worker_announced_with_its_first_start_time(presence_keys: None) -> None:
    beat = hardware.Heartbeat("cpu-1@host", H100, hardware.matching(H100))
    beat.beat()
    beat.beat()
    [worker] = hardware.live_workers()
    assert worker["started_at"] == beat.started_at and worker["last_seen"] >= worker["started_at"]
    beat.stop()
    assert hardware.live_workers() == []


@pytest.mark.django_db
def test_the_targets_api_lists_each_profile_with_the_live_workers_serving_it(presence_keys: None,
                                                                            scientist: Any) -> None:
    hardware.worker_announce("gpu-1@host", H100, hardware.matching(H100))
    resp = scientist.get("/api/v1/targets/")
    assert resp.status_code == 200
    rows = {row["name"]: row for row in resp.json()["results"]}
    assert set(rows) == {p.name for p in hardware.PROFILES}
    h100 = rows["gpu-h100"]
    assert h100["queue"] == "hil.gpu-h100" and h100["requires"]["gpu"] == "H100"
    assert h100["live"] and h100["none_since"] is None
    assert [w["hostname"] for w in h100["workers"]] == ["gpu-1@host"]
    assert h100["workers"][0]["facts"]["gpus"][0]["memory_mib"] == 1024
    assert rows["gpu-a100"] == {**rows["gpu-a100"], "live": False, "workers": [], "last_seen": None}


def test_a_worker_given_the_hil_queue_consumes_its_hardware_queues_and_announces_itself(platform_process: Any) -> None:
    from config.celery import app

    expected = hardware.matching(hardware.detect())
    name = f"hil-{uuid.uuid4().hex[:8]}"
    args = ["celery", "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "1", "--queues", "hil",
            "--hostname", f"{name}@%h"]
    with platform_process(args, "hil-worker", {"PLATFORM_HIL_HEARTBEAT_S": "1"}) as proc:
        deadline = time.monotonic() + 60
        mine: list[dict[str, Any]] = []
        while not mine and time.monotonic() < deadline and proc.poll() is None:
            mine = [w for w in hardware.live_workers() if w["hostname"].startswith(f"{name}@")]
            time.sleep(0.2)
        assert mine, "the worker did not announce itself within 60 s"
        [worker] = mine
        assert worker["profiles"] == [p.name for p in expected]
        # it announces itself before its consumer starts: ask for its queues once it answers
        replies: dict[str, Any] = {}
        while worker["hostname"] not in replies and time.monotonic() < deadline and proc.poll() is None:
            replies = app.control.inspect(destination=[worker["hostname"]], timeout=1).active_queues() or {}
        assert {q["name"] for q in replies[worker["hostname"]]} == {p.queue for p in expected}
        for profile in expected:
            assert worker["hostname"] in [w["hostname"] for w in hardware.profile_presence(profile.name).workers]
    assert not [w for w in hardware.live_workers() if w["hostname"].startswith(f"{name}@")]


def test_the_fleets_profile_is_the_most_specific_one_the_machine_matches() -> None:
    flags = ("avx2", "fma", "avx512f", "avx512_vnni")
    assert hardware.best_match(_facts(flags=flags), gpu=False).name == "cpu-x86-avx512-vnni"
    assert hardware.best_match(_facts(flags=("avx2", "fma")), gpu=False).name == "cpu-x86-avx2"
    assert hardware.best_match(_facts(flags=("avx2", "fma")), gpu=True) is None
