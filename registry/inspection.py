"""Open a model in the sandbox (registry/confinement.py runs registry/sandbox.py there) and read back
its report: loaded, predicted on its input example, or what went wrong."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings

from registry import confinement

SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
RESULT_PREFIX = "SANDBOX-RESULT "


def inspect_model(model_dir: Path, unpickles: bool = True) -> dict[str, Any]:
    """Load the model (and predict on its input example) in the sandbox. Returns the sandbox's report:
    {"ok": True, "loaded": True, ...} or {"ok": False, "error": "<what went wrong>"}."""
    timeout = int(settings.PLATFORM["INSPECT_TIMEOUT_S"])
    with tempfile.TemporaryDirectory(prefix="inspect-scratch-") as scratch:
        outcome = confinement.run(confinement.Job(
            script=SANDBOX, args=[str(model_dir)], read_only=[model_dir], writable=[Path(scratch) / "home"],
            timeout_s=timeout, timeout_setting="PLATFORM_INSPECT_TIMEOUT_S", what="loading the model",
            unpickles=unpickles))
    result = outcome.report(RESULT_PREFIX)
    if result is None:
        return {"ok": False, "error": outcome.failure(), "confined": outcome.confined}
    if not result.get("ok"):
        result["error"] = outcome.explain(str(result.get("error", "")))
    result["exit_code"] = outcome.returncode
    result["confined"] = outcome.confined
    return result
