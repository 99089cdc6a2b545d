"""Open a model in a throw-away process. Run as a script by registry.inspection, never imported by
the platform: loading a pickle-based flavor runs code from the artifact, so it happens here, in a
child whose environment holds no platform secrets (no database, broker or key), in a scratch HOME.

    python -I registry/sandbox.py <model_dir>     # last line: SANDBOX-RESULT <json>
"""

import json
import os
import sys
import time


class _StageError(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"{stage} failed: {type(exc).__name__}: {exc}")


def main(model_dir: str) -> dict:
    started = time.monotonic()
    import mlflow.pyfunc  # noqa: PLC0415 - heavy import kept inside the sandbox

    try:
        model = mlflow.pyfunc.load_model(model_dir)
    except Exception as exc:  # noqa: BLE001
        raise _StageError("loading the model", exc) from exc
    report: dict = {"loaded": True, "load_s": round(time.monotonic() - started, 3), "pid": os.getpid()}
    example = None
    try:
        example = model.input_example
    except Exception as exc:  # noqa: BLE001
        report["input_example_error"] = str(exc)
    if example is not None:
        t0 = time.monotonic()
        try:
            output = model.predict(example)
        except Exception as exc:  # noqa: BLE001
            raise _StageError("predicting on the model's input example", exc) from exc
        report["predict_s"] = round(time.monotonic() - t0, 4)
        shape = getattr(output, "shape", None)
        report["output_shape"] = list(shape) if shape is not None else None
        report["output_type"] = type(output).__name__
    return report


if __name__ == "__main__":
    try:
        result = main(sys.argv[1])
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - any failure (even SystemExit from the model) is reported as data
        message = str(exc) if isinstance(exc, _StageError) else f"{type(exc).__name__}: {exc}"
        result = {"ok": False, "error": message[:4000]}
    sys.stdout.flush()
    print("SANDBOX-RESULT " + json.dumps(result, default=str), flush=True)
