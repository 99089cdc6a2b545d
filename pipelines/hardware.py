"""Hardware targets: what a machine has (`detect`), the profiles HIL runs target (`PROFILES`), which of them
a machine serves (`matching`), and which live workers serve each (`profile_presence`).

A worker started with the pseudo-queue `hil` in its --queues consumes, instead of it, the queue of every
profile its machine matches (`hil.<profile>`), and announces itself in Redis with its facts every
PLATFORM_HIL_HEARTBEAT_S seconds; an announcement lives three heartbeats (config/celery.py connects this).
Times are the Redis server's clock, so workers on machines whose clocks disagree are judged alike.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from django.conf import settings

from registry.kv import redis_client

log = logging.getLogger(__name__)

HIL_PSEUDO_QUEUE = "hil"
QUEUE_PREFIX = "hil."
NVIDIA_SMI_TIMEOUT_S = 10
# Sorted set: member a worker's hostname, score its last heartbeat; the facts under WORKER_KEY.
WORKERS_KEY = "platform:hil:workers"
WORKER_KEY = "platform:hil:worker:{hostname}"
# Hash: profile name -> the last heartbeat of any worker serving it (kept for good: "none since when").
PROFILE_SEEN_KEY = "platform:hil:profile-seen"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int
    driver: str


@dataclass(frozen=True)
class Facts:
    arch: str
    cpu_model: str
    cpu_flags: tuple[str, ...]
    cores: int
    memory_bytes: int
    gpus: tuple[Gpu, ...] = ()
    cuda: str = ""  # the CUDA version the driver supports (nvidia-smi), "" without a GPU
    tensorrt: str = ""  # the installed TensorRT Python package's version, "" if none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """A hardware target. A machine matches when it has the architecture, every CPU flag and, if `gpu` is
    set, a GPU whose name holds it as a word (case-insensitive: `L4` is in "NVIDIA L4", not "NVIDIA L40S")."""

    name: str
    description: str
    arch: str
    cpu_flags: tuple[str, ...] = ()
    gpu: str = ""

    @property
    def queue(self) -> str:
        return QUEUE_PREFIX + self.name

    @property
    def target(self) -> str:
        """The deployment target (engine build target) it serves: gpu or cpu."""
        return "gpu" if self.gpu else "cpu"

    def requirements(self) -> dict[str, Any]:
        return {"arch": self.arch, "cpu_flags": list(self.cpu_flags), "gpu": self.gpu or None}

    def matches(self, facts: Facts) -> bool:
        if facts.arch != self.arch or not set(self.cpu_flags) <= set(facts.cpu_flags):
            return False
        word = re.compile(rf"\b{re.escape(self.gpu)}\b", re.IGNORECASE)
        return not self.gpu or any(word.search(gpu.name) for gpu in facts.gpus)


PROFILES: tuple[Profile, ...] = (
    Profile("cpu-x86-avx2", "x86-64 CPU with AVX2 and FMA", "x86_64", ("avx2", "fma")),
    Profile("cpu-x86-avx512-vnni", "x86-64 CPU with AVX-512 and VNNI (int8 dot products)", "x86_64",
            ("avx2", "fma", "avx512f", "avx512_vnni")),
    Profile("cpu-arm64", "64-bit Arm CPU", "aarch64"),
    Profile("gpu-h100", "NVIDIA H100", "x86_64", gpu="H100"),
    Profile("gpu-a100", "NVIDIA A100", "x86_64", gpu="A100"),
    Profile("gpu-l4", "NVIDIA L4", "x86_64", gpu="L4"),
)
PROFILES_BY_NAME = {profile.name: profile for profile in PROFILES}


def matching(facts: Facts) -> list[Profile]:
    return [profile for profile in PROFILES if profile.matches(facts)]


def best_match(facts: Facts, gpu: bool) -> Profile | None:
    """The most specific profile of a kind (cpu or gpu) a machine matches: the one that asks the most."""
    found = [p for p in matching(facts) if bool(p.gpu) == gpu]
    return max(found, key=lambda p: len(p.cpu_flags), default=None)


@functools.cache
def local_profile(gpu: bool = False) -> Profile | None:
    """This machine's best profile of a kind (detected once per process)."""
    return best_match(detect(), gpu)


# --- detection -------------------------------------------------------------------------------------------

def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """CPU model name and flags from /proc/cpuinfo (the first processor's; x86 says `flags`, Arm `Features`)."""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value
    return model, tuple(sorted(set(flags.split())))


def parse_meminfo(text: str) -> int:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def parse_nvidia_smi_gpus(csv: str) -> tuple[Gpu, ...]:
    """Output of `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            continue
        name, memory, driver = parts
        gpus.append(Gpu(name=name, memory_mib=int(memory) if memory.isdigit() else 0, driver=driver))
    return tuple(gpus)


def parse_nvidia_smi_cuda(text: str) -> str:
    """The CUDA version in plain `nvidia-smi` output's banner."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return match.group(1) if match else ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _nvidia_smi(*args: str) -> str:
    """nvidia-smi's output, or "" where there is none, it fails, or it hangs (a wedged driver does)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return ""
    try:
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi %s: %s", " ".join(args), exc)
        return ""
    return done.stdout if done.returncode == 0 else ""


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def detect() -> Facts:
    """This machine's facts: CPU, cores this process may use, memory, and GPUs where nvidia-smi sees some."""
    model, flags = parse_cpuinfo(_read("/proc/cpuinfo"))
    gpus = parse_nvidia_smi_gpus(_nvidia_smi("--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader,nounits"))
    return Facts(
        arch=platform.machine(),
        cpu_model=model or platform.processor(),
        cpu_flags=flags,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        memory_bytes=parse_meminfo(_read("/proc/meminfo")),
        gpus=gpus,
        cuda=parse_nvidia_smi_cuda(_nvidia_smi()) if gpus else "",
        tensorrt=_package_version("tensorrt"),
    )


# --- worker presence -------------------------------------------------------------------------------------

def heartbeat_s() -> float:
    return float(settings.PLATFORM["HIL_HEARTBEAT_S"])


def presence_ttl_s() -> float:
    """An announcement not renewed for three heartbeats is a dead worker's."""
    return 3 * heartbeat_s()


def _now() -> float:
    seconds, micros = redis_client().time()
    return seconds + micros / 1e6


def worker_announce(hostname: str, facts: Facts, profiles: list[Profile], started_at: float | None = None) -> float:
    """Record that `hostname` is alive and serves `profiles`; returns the time recorded (Redis's clock)."""
    now = _now()
    entry = {"hostname": hostname, "facts": facts.as_dict(), "profiles": [p.name for p in profiles],
             "queues": [p.queue for p in profiles], "started_at": started_at or now, "last_seen": now}
    ttl_ms = int(presence_ttl_s() * 1000)
    pipe = redis_client().pipeline()
    pipe.set(WORKER_KEY.format(hostname=hostname), json.dumps(entry), px=ttl_ms)
    pipe.zadd(WORKERS_KEY, {hostname: now})
    if profiles:
        pipe.hset(PROFILE_SEEN_KEY, mapping={p.name: now for p in profiles})
    pipe.execute()
    return now


def worker_withdraw(hostname: str) -> None:
    """A worker stopping says so at once, rather than being taken for alive until its entry expires."""
    pipe = redis_client().pipeline()
    pipe.delete(WORKER_KEY.format(hostname=hostname))
    pipe.zrem(WORKERS_KEY, hostname)
    pipe.execute()


def live_workers() -> list[dict[str, Any]]:
    """Announcements of the workers heard from within the presence TTL, by hostname. Two reads and a trim."""
    client = redis_client()
    now = _now()
    client.zremrangebyscore(WORKERS_KEY, "-inf", now - presence_ttl_s())
    hostnames = [h.decode() for h in client.zrangebyscore(WORKERS_KEY, now - presence_ttl_s(), "+inf")]
    if not hostnames:
        return []
    entries = client.mget([WORKER_KEY.format(hostname=h) for h in hostnames])
    return sorted((json.loads(raw) for raw in entries if raw), key=lambda e: e["hostname"])


@dataclass
class Presence:
    profile: Profile
    workers: list[dict[str, Any]] = field(default_factory=list)
    last_seen: float | None = None  # the last heartbeat of any worker serving it; None: never

    @property
    def live(self) -> bool:
        return bool(self.workers)

    @property
    def none_since(self) -> float | None:
        """When the last worker serving it was last heard from, if none is live now (None: live, or never)."""
        return None if self.workers else self.last_seen

    def words(self) -> str:
        """Who serves the profile now, in words (what a waiting HIL run says)."""
        name = self.profile.name
        if self.workers:
            hosts = ", ".join(w["hostname"] for w in self.workers)
            return f"{len(self.workers)} live worker(s) ({hosts})"
        if self.none_since is not None:
            return f"no live worker of {name} since {_when(self.none_since):%Y-%m-%d %H:%M:%S} UTC"
        return f"no worker of {name} has ever announced itself"


def presences() -> list[Presence]:
    """Every profile with its live workers and when it last had one."""
    workers = live_workers()
    seen = {k.decode(): float(v) for k, v in redis_client().hgetall(PROFILE_SEEN_KEY).items()}
    return [Presence(profile, [w for w in workers if profile.name in w["profiles"]], seen.get(profile.name))
            for profile in PROFILES]


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)


def targets_overview() -> list[dict[str, Any]]:
    """Each profile as the API and the UI show it: requirements, queue, live workers, times as datetimes."""
    rows = []
    for presence in presences():
        profile = presence.profile
        workers = [{**w, "started_at": _when(w["started_at"]), "last_seen": _when(w["last_seen"])}
                   for w in presence.workers]
        rows.append({"name": profile.name, "description": profile.description, "queue": profile.queue,
                     "requires": profile.requirements(), "live": presence.live, "workers": workers,
                     "last_seen": _when(presence.last_seen), "none_since": _when(presence.none_since)})
    return rows


def presences_by_name() -> dict[str, Presence]:
    """Every profile's presence, read once (for a pass over many runs)."""
    return {p.profile.name: p for p in presences()}


def profile_presence(name: str) -> Presence:
    """Whether profile `name` has a live worker, and since when none (what a HIL run waits on)."""
    return presences_by_name()[name]


# --- the worker's side -----------------------------------------------------------------------------------

class Heartbeat:
    """Announces a worker now and every heartbeat until stopped; a Redis outage only skips beats."""

    def __init__(self, hostname: str, facts: Facts, profiles: list[Profile]) -> None:
        self.hostname, self.facts, self.profiles = hostname, facts, profiles
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hil-heartbeat", daemon=True)

    def beat(self) -> None:
        import redis

        try:
            seen = worker_announce(self.hostname, self.facts, self.profiles, self.started_at)
        except redis.RedisError as exc:
            log.warning("hardware announcement of %s failed (%s); trying again in %.0f s",
                        self.hostname, exc, heartbeat_s())
            return
        self.started_at = self.started_at or seen

    def _run(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            self.beat()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        import redis

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)  # a beat in flight waits at most Redis's socket timeout
        try:
            worker_withdraw(self.hostname)
        except redis.RedisError as exc:
            log.warning("could not withdraw %s (%s); its announcement expires by itself", self.hostname, exc)
