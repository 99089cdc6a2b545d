"""Run model code confined: the one mechanism every place that opens a model uses (validation, engine
builds, parity, and what comes later).

The payload is one of the platform's own scripts (registry/sandbox.py, pipelines/build_sandbox.py)
that opens the model. It runs under util-linux `unshare` in new mount, PID, network, IPC, UTS and
cgroup namespaces; registry/jail.py, PID 1 there, gives it a filesystem holding only Python and its
libraries (read-only), the model's files (read-only) and its scratch folders, no network at all (the
new namespace's loopback is not even up), no view of other processes, resource limits, an
unprivileged uid other than the worker's, and an environment holding only what Python needs.

Why util-linux rather than bubblewrap: it is on every Debian-like machine (util-linux is an essential
package), so nothing has to be installed, and bubblewrap always brings the new namespace's loopback
up, where the platform wants no network at all.

Setting this up needs root (the worker's), `unshare` and a kernel that allows the namespaces. Where it
cannot be set up, `status()` says why; model code then runs in a plain child process with a scrubbed
environment, which is NOT isolation, so registration refuses pickle-based flavors unless the operator
sets PLATFORM_ALLOW_UNCONFINED_MODEL_CODE (registry.archives).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.conf import settings

JAIL = Path(__file__).resolve().parent / "jail.py"
# System libraries Python and the wheels' native code load; the rest of the host stays out of sight.
SYSTEM_PATHS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32",
                "/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo")
# Character devices every payload gets; a GPU build adds the GPU's (gpu_devices()).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# Only what Python needs to start. Nothing from the platform's environment is passed on.
_PASSED = ("LANG", "LC_ALL", "TZ")
_OUTPUT_CAP = 1024 * 1024
_SETUP_FAILED = 125  # registry/jail.py's code for "the sandbox itself could not be set up"
_SIGNAL_REASONS = {
    signal.SIGXCPU: "used more than {cpu_s} s of CPU (PLATFORM_SANDBOX_CPU_S) and was killed",
    signal.SIGKILL: "was killed (out of memory, or a hard limit reached)",
    signal.SIGXFSZ: "wrote a file larger than {file_bytes} bytes (PLATFORM_SANDBOX_FILE_BYTES) and was killed",
    signal.SIGSEGV: "crashed (segmentation fault)",
}


@dataclass
class Job:
    """What to run: one of the platform's scripts, its arguments, and which host paths it may see."""
    script: Path | None  # None: `args` go to `python -I` as they are (the availability probe's -c)
    args: list[str]
    read_only: list[Path]  # the model's folder, spec files: visible at the same paths, read-only
    writable: list[Path]  # scratch folders: created if missing, owned by the sandbox user; [0] is HOME
    timeout_s: float
    timeout_setting: str  # named in the message when the job runs out of time
    what: str = "the model process"
    unpickles: bool = True  # may run the model's code (unsure means yes); refused unconfined, see refusal()
    devices: list[str] = field(default_factory=list)  # host device nodes beyond DEVICES (a GPU)
    on_wait: Callable[[], None] | None = None  # called every couple of seconds while it runs


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    confined: bool
    what: str
    error: str = ""  # set when the platform stopped it (time, limits) or the sandbox could not start
    limits: dict[str, int] = field(default_factory=dict)

    def report(self, prefix: str) -> dict[str, Any] | None:
        """The payload's report: the JSON after `prefix` on its last such stdout line."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(prefix):
                try:
                    value = json.loads(line[len(prefix):])
                except ValueError:
                    return None
                return value if isinstance(value, dict) else None
        return None

    def failure(self) -> str:
        """Why there is no report, in words."""
        if self.error:
            return self.error
        tail = (self.stderr or self.stdout)[-2000:]
        return f"{self.what} exited with code {self.returncode} without a report: {tail}"

    def explain(self, message: str) -> str:
        """A payload's own error, with the limit it ran into where that is what happened."""
        if "MemoryError" in message or "std::bad_alloc" in message:
            return (f"{message} (the sandbox's memory limit is {self.limits.get('memory_bytes')} bytes, "
                    "PLATFORM_SANDBOX_MEMORY_BYTES)")
        if "File too large" in message:
            return (f"{message} (the largest file it may write is {self.limits.get('file_bytes')} bytes, "
                    "PLATFORM_SANDBOX_FILE_BYTES)")
        if "BlockingIOError" in message and "Resource temporarily unavailable" in message:
            return (f"{message} (the sandbox allows {self.limits.get('processes')} processes and threads, "
                    "PLATFORM_SANDBOX_PROCESSES)")
        return message


def limits() -> dict[str, int]:
    platform: dict[str, Any] = settings.PLATFORM
    return {"cpu_s": int(platform["SANDBOX_CPU_S"]), "memory_bytes": int(platform["SANDBOX_MEMORY_BYTES"]),
            "file_bytes": int(platform["SANDBOX_FILE_BYTES"]), "processes": int(platform["SANDBOX_PROCESSES"])}


def sandbox_env(home: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.update({
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MLFLOW_TRACKING_URI": "file://" + str(home / "mlruns"),
        # No network in the sandbox anyway; this keeps MLflow from trying its usage telemetry.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    })
    return env


def gpu_devices() -> list[str]:
    """NVIDIA's device nodes on this machine, for a build that runs on its GPU."""
    dev = Path("/dev")
    return sorted(str(p) for p in dev.glob("nvidia*") if p.is_char_device())


def python_paths() -> list[str]:
    """Python's installation and the environment's site-packages, as the payload's interpreter needs them."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(sys.executable).resolve().parent.parent), str(sysconfig.get_config_var("LIBDIR") or "")}
    return sorted(p for p in paths if p)


def _identity() -> tuple[int, int]:
    platform: dict[str, Any] = settings.PLATFORM
    return int(platform["SANDBOX_UID"]), int(platform["SANDBOX_GID"])


def _unshare_command(spec: dict[str, Any]) -> list[str]:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        raise FileNotFoundError("util-linux `unshare` was not found")
    return [unshare, "--mount", "--pid", "--net", "--ipc", "--uts", "--cgroup", "--fork", "--kill-child",
            "--propagation", "private", "--", sys.executable, "-I", "-S", str(JAIL), json.dumps(spec)]


@functools.lru_cache(maxsize=1)
def _probe() -> str:
    """"" when confinement works here, else why not. Tried for real once per process."""
    if os.geteuid() != 0:
        return "the worker does not run as root, which setting up the sandbox's namespaces needs"
    if shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
        return "util-linux `unshare` is not installed"
    uid, _ = _identity()
    state = Path(settings.STATE_DIR)
    owners = {p.stat().st_uid for p in (state, *state.iterdir())} if state.is_dir() else set()
    if uid == 0 or uid in owners:
        return (f"PLATFORM_SANDBOX_UID={uid} is root or owns the platform's state files; give the sandbox a uid "
                "of its own")
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as scratch:
        outcome = _run(Job(script=None, args=["-c", "print('confined', flush=True)"], read_only=[],
                           writable=[Path(scratch) / "home"], timeout_s=30, timeout_setting="(probe)"),
                       confined=True)
    if outcome.returncode == 0 and "confined" in outcome.stdout:
        return ""
    return f"a trial sandbox failed: {(outcome.error or outcome.stderr or outcome.stdout).strip()[-500:]}"


def status() -> tuple[bool, str]:
    """(available, why not) for this process's machine."""
    reason = _probe()
    return reason == "", reason


def refusal() -> str:
    """Why a model that may unpickle (run code) cannot be opened on this machine; "" when it can: the
    sandbox works here, or the operator allowed unconfined model code."""
    available, reason = status()
    if available or settings.PLATFORM["ALLOW_UNCONFINED_MODEL_CODE"]:
        return ""
    return (f"this platform cannot isolate model code here ({reason}), so it refuses pickle-based model flavors; "
            "register an ONNX model (mlflow.onnx) or a scikit-learn model saved with "
            "serialization_format='skops', or have the operator run the workers as root with util-linux "
            "(or, accepting the risk, set PLATFORM_ALLOW_UNCONFINED_MODEL_CODE=true)")


def run(job: Job) -> Outcome:
    """Run the job confined when this machine can; otherwise in a plain child process (the caller, or
    registration before it, has decided whether the model may be opened that way)."""
    available, _ = status()
    if not available and job.unpickles:
        why = refusal()
        if why:
            return Outcome(returncode=None, stdout="", stderr="", confined=False, what=job.what, error=why,
                           limits=limits())
    return _run(job, confined=available)


def _prepare(job: Job, uid: int, gid: int) -> None:
    for folder in job.writable:
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder, *folder.rglob("*")):
            os.chown(path, uid, gid, follow_symlinks=False)
    for top in job.read_only:  # readable by the sandbox user; it is mounted read-only anyway
        if not top.exists():
            continue
        for path in (top, *(top.rglob("*") if top.is_dir() else ())):
            if not path.is_symlink():
                os.chmod(path, path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _run(job: Job, confined: bool) -> Outcome:
    lims = limits()
    home = job.writable[0]
    script = [str(job.script)] if job.script is not None else []
    python_argv = [sys.executable, "-I", *script, *job.args]
    env = sandbox_env(home)
    if confined:
        uid, gid = _identity()
        _prepare(job, uid, gid)
        with tempfile.TemporaryDirectory(prefix="sandbox-root-") as root:
            spec = {"root": root, "uid": uid, "gid": gid, "cwd": str(home), "argv": python_argv, "env": env,
                    "limits": lims, "devices": [*DEVICES, *job.devices], "writable": [str(p) for p in job.writable],
                    "read_only": [*python_paths(), *SYSTEM_PATHS, *(str(p) for p in job.read_only),
                                  *script]}
            return _supervise(job, _unshare_command(spec), {"PATH": "/usr/bin:/bin"}, home, lims, True)
    for folder in job.writable:
        folder.mkdir(parents=True, exist_ok=True)
    return _supervise(job, python_argv, env, home, lims, False)


def _supervise(job: Job, argv: list[str], env: dict[str, str], cwd: Path, lims: dict[str, int],
               confined: bool) -> Outcome:
    """Start it in its own session, wait with a deadline, and kill its whole group whatever happens, so
    nothing it started outlives it. Output goes to files read back with a size cap, so a payload that
    prints gigabytes or keeps a pipe open cannot stall or flood the worker."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        deadline = time.monotonic() + job.timeout_s
        error = ""
        try:
            while True:
                try:
                    proc.wait(timeout=min(2.0, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        error = (f"{job.what} took longer than {job.timeout_s:g}s ({job.timeout_setting}) "
                                 "and was stopped")
                        break
                    if job.on_wait is not None:
                        job.on_wait()
        finally:
            _kill_group(proc)
        code = proc.returncode
        if not error:
            error = _limit_reason(job, code, lims, confined, _tail(err))
        return Outcome(returncode=code, stdout=_tail(out), stderr=_tail(err), confined=confined, what=job.what,
                       error=error, limits=lims)


def _limit_reason(job: Job, code: int | None, lims: dict[str, int], confined: bool, stderr: str) -> str:
    if code is None or code == 0:
        return ""
    if confined and code == _SETUP_FAILED and "sandbox setup failed" in stderr:
        return f"the sandbox could not be set up: {stderr.strip()[-1000:]}"
    signum = code - 128 if confined and code > 128 else -code if code < 0 else 0
    template = _SIGNAL_REASONS.get(signum)  # type: ignore[call-overload]
    return f"{job.what} {template.format(**lims)}" if template else ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(fh: IO[bytes]) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - _OUTPUT_CAP))
    return fh.read().decode(errors="replace")
