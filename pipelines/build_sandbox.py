"""Build one inference engine in a throw-away process (the model's pickle is opened here, never in
the platform's processes). Run by pipelines.builder as

    python -I pipelines/build_sandbox.py <spec.json>

spec: {"model_dir", "out_dir", "target", "precision", "runtime", "flavor", "signature", "sample",
       "thresholds": {...}, "opset": 17}
Writes into out_dir: engine.onnx and report.json (io, parity figures, toolchain, log). Prints
BUILD-RESULT <json> as its last line.
"""

import json
import sys
import time
import traceback
from pathlib import Path

LOG: list[str] = []


def log(message: str) -> None:
    LOG.append(f"{time.strftime('%H:%M:%S')} {message}")


class BuildRefused(Exception):
    """The model cannot be turned into an engine; the message says why and what is supported."""


SUPPORTED = "sklearn (pipelines, linear models, trees and ensembles, MLP), pytorch, onnx"


def pick_flavor(flavors: dict) -> str:
    for name in ("onnx", "sklearn", "pytorch"):
        if name in flavors:
            return name
    names = ", ".join(sorted(f for f in flavors if f != "python_function")) or "python_function only"
    raise BuildRefused(f"cannot build an engine from flavor(s) {names}; supported: {SUPPORTED}")


def sample_array(spec: dict):
    import numpy as np

    x = np.asarray(spec["sample"], dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    return x


# ---- export -------------------------------------------------------------------------------------

def export_sklearn(model_dir: str, n_features: int, opset: int, out: Path):
    import mlflow.sklearn
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    model = mlflow.sklearn.load_model(model_dir)
    options = {"zipmap": False} if is_classifier(model) else None
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, n_features]))],
                          target_opset=opset,
                          options={id(model): options} if options else None)
    out.write_bytes(onx.SerializeToString())
    kind = "classifier" if is_classifier(model) else "regressor"

    def reference(x):
        result = {"label" if kind == "classifier" else "value": model.predict(x)}
        if kind == "classifier" and hasattr(model, "predict_proba"):
            result["probabilities"] = model.predict_proba(x)
        return result

    return kind, reference


def export_pytorch(model_dir: str, sample, opset: int, out: Path):
    import mlflow.pytorch
    import numpy as np
    import torch

    model = mlflow.pytorch.load_model(model_dir, map_location="cpu")
    try:
        model.eval()
    except NotImplementedError:
        pass  # MLflow 3 saves a torch.export program; its module is already in inference form
    example = torch.from_numpy(sample[: max(2, min(len(sample), 4))])
    # torch's export-based ONNX exporter, with a dynamic batch axis (opset 18 is its minimum).
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), str(out), input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: batch},), opset_version=max(opset, 18), dynamo=True,
                      external_data=False)

    def reference(x):
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
        if y.ndim == 2 and y.shape[1] > 1:
            return {"label": np.argmax(y, axis=1), "scores": y}
        return {"value": y}

    with torch.no_grad():
        y = model(example).numpy()
    kind = "classifier" if y.ndim == 2 and y.shape[1] > 1 else "regressor"
    return kind, reference


def export_onnx(model_dir: str, flavor_conf: dict, out: Path):
    import onnxruntime as ort

    src = Path(model_dir) / flavor_conf.get("data", "model.onnx")
    out.write_bytes(src.read_bytes())
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])

    def reference(x):
        return engine_outputs(session, x)  # the original graph, read the same way as the engine

    return "unknown", reference


def normalize_opsets(path: Path) -> None:
    """One opset entry per domain (some exporters repeat the default domain; the quantizer refuses that)."""
    import onnx

    model = onnx.load(str(path))
    best: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in ("", "ai.onnx") else entry.domain
        best[domain] = max(best.get(domain, 0), entry.version)
    del model.opset_import[:]
    for domain, version in best.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    onnx.save(model, str(path))


# ---- optimize and variants ----------------------------------------------------------------------

def optimize(src: Path, dst: Path, target: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Extended fusions are portable across CPU and CUDA providers; "all" adds layout ones tied to one.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def make_variant(src: Path, dst: Path, precision: str) -> None:
    import onnx

    if precision == "fp32":
        dst.write_bytes(src.read_bytes())
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # MatMul only: ONNX Runtime's CPU ConvInteger is slower than fp32 convolutions (measured by
        # bench/engines: a small CNN ran 3x slower with quantized convolutions).
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    elif precision == "fp16":
        from onnxconverter_common.float16 import convert_float_to_float16

        model = drop_float_casts(onnx.load(str(src)))
        onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dst))
    else:
        raise BuildRefused(f"unknown precision {precision!r}")


def drop_float_casts(model):
    """Remove Cast(to=FLOAT) nodes whose input is already float (skl2onnx adds them): after fp16
    conversion they would feed float32 into float16 operators, which ONNX Runtime refuses."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    outputs = {o.name for o in model.graph.output}
    keep: list = []
    renames: dict[str, str] = {}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        float_to_float = to == onnx.TensorProto.FLOAT and types.get(node.input[0]) == onnx.TensorProto.FLOAT
        if node.op_type == "Cast" and float_to_float and node.output[0] not in outputs:
            renames[node.output[0]] = renames.get(node.input[0], node.input[0])
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def integer_ops(path: Path) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path)).graph.node
               if n.op_type.endswith("Integer") or n.op_type.startswith(("DynamicQuantize", "QLinear")))


def providers_for(target: str, runtime: str) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if target == "cpu":
        return ["CPUExecutionProvider"]
    wanted = "TensorrtExecutionProvider" if runtime == "tensorrt" else "CUDAExecutionProvider"
    if wanted not in available:
        raise BuildRefused(f"{wanted} is not available on this worker (has: {', '.join(available)}); "
                           "GPU builds run on a GPU worker")
    return [wanted, "CPUExecutionProvider"]


# ---- parity -------------------------------------------------------------------------------------

def validation_set(sample, rows: int = 256, seed: int = 0):
    """The saved sample, plus deterministic jitter around it so the gate sees more than a handful of rows."""
    import numpy as np

    if len(sample) >= rows:
        return sample[:rows]
    rng = np.random.default_rng(seed)
    scale = np.maximum(sample.std(axis=0), 0.05 * np.abs(sample).mean(axis=0) + 1e-3)
    picks = sample[rng.integers(0, len(sample), rows - len(sample))]
    jitter = rng.normal(0.0, 1.0, picks.shape).astype(np.float32) * scale * 0.1
    return np.concatenate([sample, (picks + jitter).astype(np.float32)])


def write_reference(path: Path, input_name: str, sample, original: dict) -> None:
    """The reference set drift is judged against: the sample's rows (named as the engine's input) and the
    original model's prediction for each (its label, or its value when it has one per row)."""
    import numpy as np

    predicted = original.get("label", original.get("value"))
    prediction = None
    if predicted is not None:
        column = np.asarray(predicted).reshape(len(sample), -1)
        if column.shape[1] == 1:
            prediction = column[:, 0].tolist()
    path.write_text(json.dumps({"input": input_name, "rows": sample.tolist(), "prediction": prediction}))


def engine_outputs(session, x) -> dict:
    import numpy as np

    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: x})
    result = dict(zip(names, values, strict=True))
    if "label" in result and "probabilities" in result:
        return {"label": result["label"], "probabilities": result["probabilities"]}
    first = values[0]
    if first.ndim == 2 and first.shape[1] > 1 and first.dtype.kind == "f":
        return {"label": np.argmax(first, axis=1), "scores": first}
    if "variable" in result:
        return {"value": result["variable"]}
    return {"value": first}


def _softmax(scores):
    import numpy as np

    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def parity(reference: dict, engine: dict, thresholds: dict) -> dict:
    import numpy as np

    figures: dict = {}
    if "label" in reference and "label" in engine:
        ref_label = np.asarray(reference["label"]).reshape(-1)
        eng_label = np.asarray(engine["label"]).reshape(-1)
        figures["label_agreement"] = float(np.mean(ref_label.astype(str) == eng_label.astype(str)))
        if "probabilities" in reference and "probabilities" in engine:
            diff = np.abs(np.asarray(reference["probabilities"], dtype=np.float64)
                          - np.asarray(engine["probabilities"], dtype=np.float64))
            figures["max_probability_diff"] = float(diff.max())
        elif "scores" in reference and "scores" in engine:
            ref_s = np.asarray(reference["scores"], dtype=np.float64)
            eng_s = np.asarray(engine["scores"], dtype=np.float64)
            figures["max_score_diff"] = float(np.abs(ref_s - eng_s).max())
            # Scores (logits) are judged as the probabilities they stand for.
            figures["max_probability_diff"] = float(np.abs(_softmax(ref_s) - _softmax(eng_s)).max())
        kind = "classification"
    else:
        ref = np.asarray(reference["value"], dtype=np.float64).reshape(len(reference["value"]), -1)
        eng = np.asarray(engine["value"], dtype=np.float64).reshape(ref.shape[0], -1)
        err = np.abs(ref - eng)
        figures["max_abs_error"] = float(err.max())
        figures["mean_abs_error"] = float(err.mean())
        figures["reference_scale"] = float(np.abs(ref).mean() + 1e-12)
        kind = "regression"
    failures = []
    for metric, limit in thresholds.get(kind, {}).items():
        if metric not in figures:
            continue
        value = figures[metric]
        if metric == "max_abs_error" or metric == "mean_abs_error":
            limit_abs = limit * figures["reference_scale"]
            ok = value <= limit_abs
            shown = f"{metric} {value:.3g} > {limit_abs:.3g} ({limit} x mean |reference|)"
        elif metric == "label_agreement":
            ok = value >= limit
            shown = f"{metric} {value:.4f} < {limit}"
        else:
            ok = value <= limit
            shown = f"{metric} {value:.3g} > {limit}"
        if not ok:
            failures.append(shown)
    return {"kind": kind, "figures": figures, "thresholds": thresholds.get(kind, {}), "passed": not failures,
            "failures": failures}


def toolchain() -> dict:
    import onnx
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("skl2onnx", "torch", "sklearn"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "")
    return versions


def describe_io(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path))

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "elem_type": onnx.TensorProto.DataType.Name(t.elem_type), "shape": dims})
        return out

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output), "opsets": opsets}


def check_signature(signature: dict | None, io: dict) -> int | None:
    """Feature count from the signature, checked against the exported graph's input."""
    if not signature or not signature.get("inputs"):
        return None
    spec = signature["inputs"]
    if len(spec) == 1 and spec[0].get("type") == "tensor":
        shape = spec[0]["tensor-spec"]["shape"]
        n = shape[-1] if len(shape) >= 2 else None
    else:
        n = len(spec)  # column-based signature: one feature per column
    graph_in = io["inputs"][0]["shape"]
    if n is not None and n > 0 and graph_in and graph_in[-1] not in (-1, n):
        raise BuildRefused(f"the signature has {n} input features but the exported graph expects {graph_in[-1]}")
    return n


def build(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    started = time.monotonic()
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    flavors = spec["flavors"]
    flavor = pick_flavor(flavors)
    sample = sample_array(spec)
    log(f"flavor {flavor}; sample {sample.shape[0]} rows x {sample.shape[1]} features")
    exported = out_dir / "exported.onnx"
    if flavor == "sklearn":
        kind, reference = export_sklearn(spec["model_dir"], sample.shape[1], spec["opset"], exported)
    elif flavor == "pytorch":
        kind, reference = export_pytorch(spec["model_dir"], sample, spec["opset"], exported)
    else:
        kind, reference = export_onnx(spec["model_dir"], flavors["onnx"], exported)
    normalize_opsets(exported)
    log(f"exported to ONNX ({exported.stat().st_size} bytes)")
    io = describe_io(exported)
    check_signature(spec.get("signature"), io)
    # Precision first (the quantizer wants a plain opset-stamped graph), then ORT's offline optimization.
    variant = out_dir / "variant.onnx"
    make_variant(exported, variant, spec["precision"])
    log(f"{spec['precision']} variant made ({variant.stat().st_size} bytes)")
    engine = out_dir / "engine.onnx"
    optimize(variant, engine, spec["target"])
    log(f"graph optimized offline (ORT_ENABLE_EXTENDED), engine {engine.stat().st_size} bytes")
    providers = providers_for(spec["target"], spec["runtime"])
    session = ort.InferenceSession(str(engine), providers=providers)
    x = validation_set(sample)
    verdict = parity(reference(x), engine_outputs(session, x), spec["thresholds"])
    if spec["precision"] == "int8" and integer_ops(variant) == 0:
        # Nothing in this graph is quantizable (tree ensembles, linear-model operators): the "int8"
        # engine would be the fp32 one under another name.
        verdict["passed"] = False
        verdict["failures"].append("nothing to quantize (no MatMul): identical to the fp32 engine, not kept")
    log(f"parity on {len(x)} rows: {json.dumps(verdict['figures'])} -> {'pass' if verdict['passed'] else 'MISS'}")
    write_reference(out_dir / "reference.json", io["inputs"][0]["name"], sample, reference(sample))
    for stale in (exported, variant):
        stale.unlink()
    return {"ok": True, "io": describe_io(engine), "parity": verdict, "toolchain": toolchain(), "kind": kind,
            "build_seconds": round(time.monotonic() - started, 3), "providers": providers,
            "sample_rows": int(len(x)), "dtype": str(np.float32.__name__)}


if __name__ == "__main__":
    try:
        spec = json.loads(Path(sys.argv[1]).read_text())
        result = build(spec)
    except BuildRefused as exc:
        result = {"ok": False, "refused": True, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure is reported as data
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result["log"] = LOG
    print("BUILD-RESULT " + json.dumps(result, default=str))
