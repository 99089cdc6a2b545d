"""Open a model in a throw-away process. Run as a script by registry.inspection, never imported by
the platform: loading a pickle-based flavor runs code from the artifact, so it happens here, in a
child whose environment holds no platform secrets (no database, broker or key), in a scratch HOME.

    python registry/sandbox.py <model_dir>     # prints one line of JSON
"""

import json
import sys
import time


def main(model_dir: str) -> dict:
    started = time.monotonic()
    import mlflow.pyfunc  # noqa: PLC0415 - heavy import kept inside the sandbox

    model = mlflow.pyfunc.load_model(model_dir)
    report: dict = {"loaded": True, "load_s": round(time.monotonic() - started, 3)}
    example = None
    try:
        example = model.input_example
    except Exception as exc:  # noqa: BLE001
        report["input_example_error"] = str(exc)
    if example is not None:
        t0 = time.monotonic()
        output = model.predict(example)
        report["predict_s"] = round(time.monotonic() - t0, 4)
        shape = getattr(output, "shape", None)
        report["output_shape"] = list(shape) if shape is not None else None
        report["output_type"] = type(output).__name__
    return report


if __name__ == "__main__":
    try:
        result = main(sys.argv[1])
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - any failure is the model's, reported as data
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    print("SANDBOX-RESULT " + json.dumps(result, default=str))
