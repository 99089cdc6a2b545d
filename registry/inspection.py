"""Run registry/sandbox.py in a child process with a scrubbed environment and a time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings

SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
# Only what Python needs to start. Nothing from the platform's environment is passed on.
_PASSED = ("LANG", "LC_ALL", "TZ")


def sandbox_env(home: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED if k in os.environ}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MLFLOW_TRACKING_URI": "file://" + str(home / "mlruns"),
    })
    return env


def inspect_model(model_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sandbox-home-") as home:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", str(SANDBOX), str(model_dir)],
                env=sandbox_env(Path(home)), cwd=home, capture_output=True, text=True,
                timeout=settings.PLATFORM["INSPECT_TIMEOUT_S"],
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"loading the model took longer than "
                                          f"{settings.PLATFORM['INSPECT_TIMEOUT_S']}s and was stopped"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("SANDBOX-RESULT "):
            result: dict[str, Any] = json.loads(line[len("SANDBOX-RESULT "):])
            result["exit_code"] = proc.returncode
            return result
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"ok": False, "error": f"the inspection process exited with code {proc.returncode}: {tail}"}
