"""Run registry/sandbox.py in a child process with a scrubbed environment and a time limit.

The child gets a fresh session (its own process group) so that when it finishes or runs out of time
everything it started is killed with it, and its output goes to files read back with a size cap, so
a model that spawns background processes or prints gigabytes cannot stall or flood the worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from django.conf import settings

SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
RESULT_PREFIX = "SANDBOX-RESULT "
# Only what Python needs to start. Nothing from the platform's environment is passed on.
_PASSED = ("LANG", "LC_ALL", "TZ")
_OUTPUT_CAP = 1024 * 1024


def sandbox_env(home: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MLFLOW_TRACKING_URI": "file://" + str(home / "mlruns"),
        # The model's code has no business on the network; nor has MLflow's usage telemetry.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    })
    return env


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


def inspect_model(model_dir: Path) -> dict[str, Any]:
    """Load the model (and predict on its input example) in the sandbox. Returns the sandbox's report:
    {"ok": True, "loaded": True, ...} or {"ok": False, "error": "<what went wrong>"}."""
    platform: dict[str, Any] = settings.PLATFORM
    timeout = int(platform["INSPECT_TIMEOUT_S"])
    with tempfile.TemporaryDirectory(prefix="sandbox-home-") as home, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(SANDBOX), str(model_dir)],
            env=sandbox_env(Path(home)), cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"loading the model took longer than {timeout}s "
                                          "(PLATFORM_INSPECT_TIMEOUT_S) and was stopped"}
        finally:
            _kill_group(proc)  # also whatever the model started in the background
        stdout, stderr = _tail(out), _tail(err)
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                break
            if not isinstance(result, dict):
                break
            result["exit_code"] = proc.returncode
            return result
    tail = (stderr or stdout)[-2000:]
    return {"ok": False, "error": f"the inspection process exited with code {proc.returncode} without a report: "
                                  f"{tail}"}
