"""A Triton Inference Server process from the nvidia-pytriton wheel (CPU, python backend), on loopback.

Facts this relies on (see ../shared/DESIGN.md): the python backend needs its stub beside it in one
backends folder; the stub must load the same libpython as our interpreter, plus the wheel's bundled
libraries; explicit model control gives the load/unload API.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class TritonUnavailable(RuntimeError):
    pass


def _wheel_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonUnavailable("the nvidia-pytriton package is not installed")
    return Path(spec.origin).parent / "tritonserver"


def prepare_backends(into: Path) -> Path:
    """One backends folder: the python backend with the stub for this interpreter's version."""
    wheel = _wheel_dir()
    python_dir = into / "python"
    stub = wheel / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not stub.exists():
        raise TritonUnavailable(f"no Triton python backend stub for Python {sys.version_info[:2]}")
    if not (python_dir / "triton_python_backend_stub").exists():
        python_dir.mkdir(parents=True, exist_ok=True)
        for item in (wheel / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python_dir / item.name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return into


def triton_env() -> dict[str, str]:
    site = Path(_wheel_dir()).parent.parent  # site-packages
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [libdir, str(site / "nvidia_pytriton.libs"),
                                                   env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


_PIN = "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); os.execv(sys.argv[2], sys.argv[2:])"


@dataclass
class TritonServer:
    model_repository: Path
    workdir: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    cpus: tuple[int, ...] | None = None  # the CPUs the server (and its backend stubs) may run on; None: any

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> None:
        from config.stack import free_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_repository.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.workdir / "backends")
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        log = open(self.workdir / "triton.log", "ab")
        # Pinned, the command is exec'd by a Python that sets its CPUs first (preexec_fn is not safe in a
        # threaded worker): the server's threads and the stubs it starts inherit them, from the first one.
        pin = [sys.executable, "-c", _PIN, ",".join(map(str, self.cpus))] if self.cpus else []
        self.proc = subprocess.Popen(
            [*pin, str(_wheel_dir() / "bin" / "tritonserver"), f"--model-repository={self.model_repository}",
             "--model-control-mode=explicit", f"--backend-directory={backends}",
             "--http-address=127.0.0.1", f"--http-port={self.http_port}",
             "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
             "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
             "--allow-metrics=true", "--log-verbose=0", "--exit-on-error=false", "--exit-timeout-secs=3",
             *self.extra_args],
            env=triton_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.workdir / "triton.log").read_text(errors="replace")[-3000:]
                raise TritonUnavailable(f"tritonserver exited with code {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TritonUnavailable(f"tritonserver not ready within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """Kill what the server left in its process group (it is the group's leader): a tritonserver killed
        outright leaves its Python backend stubs running, and they hold the client connections it had
        accepted, so a gateway waiting on one of them gets neither an answer nor a closed connection."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
