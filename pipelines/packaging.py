"""Triton model-repository entries for a built engine.

Two entries per engine: one for Triton's onnxruntime backend (what production Triton servers load),
and one for the python backend wrapping ONNX Runtime, which is what the local fleet runs (the Triton
binary in the nvidia-pytriton wheel ships the python backend only).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64", "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}
NUMPY_TYPES = {"FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT64": "int64", "INT32": "int32",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
DEFAULT_MAX_BATCH = 64
# Times Triton runs the warm-up sample on load; the model is ready (and takes traffic) only after.
WARMUP_RUNS = 3


def triton_model_name(model: str, version: int, variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model}_v{version}_{variant}")


def _dims(shape: list[int]) -> tuple[list[int], bool]:
    """Per-request dims (batch axis dropped) and whether a 1-D output needs reshaping to [1]."""
    rest = shape[1:] if shape else []
    if not rest:
        return [1], True
    return [d if d > 0 else -1 for d in rest], False


def _tensor_block(tensors: list[dict[str, Any]], allow_reshape: bool) -> str:
    items = []
    for t in tensors:
        dims, reshape = _dims(t["shape"])
        dtype = TRITON_TYPES.get(t["elem_type"])
        if dtype is None:
            raise ValueError(f"tensor {t['name']!r} has type {t['elem_type']}, which Triton configs do not map")
        extra = " reshape: { shape: [ ] }" if reshape and allow_reshape else ""
        items.append(f'  {{ name: "{t["name"]}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return "[\n" + ",\n".join(items) + "\n]"


def settings_from_metadata(tags: dict[str, str], target: str) -> dict[str, Any]:
    """Batching and instances, overridable with model version tags `triton.max_batch_size`,
    `triton.instances`, `triton.max_queue_delay_us`."""

    def number(key: str, default: int) -> int:
        try:
            return max(0, int(tags.get(key, default)))
        except (TypeError, ValueError):
            return default

    max_batch = number("triton.max_batch_size", DEFAULT_MAX_BATCH)
    preferred = [b for b in (8, 16, 32) if b <= max_batch] or [max_batch]
    return {
        "max_batch_size": max_batch,
        "preferred_batch_size": preferred,
        "max_queue_delay_us": number("triton.max_queue_delay_us", 100),
        "instances": number("triton.instances", 1) or 1,
        "kind": "KIND_GPU" if target == "gpu" else "KIND_CPU",
    }


def warmup(io: dict[str, Any], example: Any) -> tuple[str, dict[str, bytes]]:
    """Triton's `model_warmup` block and the files of its `warmup/` folder: the version's input example
    (one row) for the first input where it fits, zeros for any other input. Triton runs it
    WARMUP_RUNS times while loading, so the first client request never pays for cold caches."""
    import numpy as np

    files: dict[str, bytes] = {}
    items = []
    for i, t in enumerate(io["inputs"]):
        dims, _ = _dims(t["shape"])
        dtype = TRITON_TYPES.get(t["elem_type"])
        if dtype is None:
            raise ValueError(f"tensor {t['name']!r} has type {t['elem_type']}, which Triton configs do not map")
        source = "zero_data: true"
        row = np.asarray(example, dtype=NUMPY_TYPES.get(t["elem_type"], "float32")).ravel() \
            if i == 0 and example is not None and t["elem_type"] in NUMPY_TYPES else None
        if row is not None and (dims == [-1] or ([d for d in dims if d > 0] == dims and row.size == np.prod(dims))):
            dims = [row.size] if dims == [-1] else dims
            files[t["name"]] = row.tobytes()
            source = f'input_data_file: "{t["name"]}"'
        dims = [d if d > 0 else 1 for d in dims]
        items.append(f'    {{ key: "{t["name"]}" value: {{ data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] '
                     f"{source} }} }}")
    block = ['model_warmup [ {', '  name: "input_example"', "  batch_size: 1", f"  count: {WARMUP_RUNS}",
             "  inputs [", ",\n".join(items), "  ]", "} ]"]
    return "\n".join(block), files


def config_pbtxt(name: str, io: dict[str, Any], settings: dict[str, Any], backend: str,
                 precision: str = "fp32", runtime: str = "onnxruntime", warmup_block: str = "") -> str:
    head = 'platform: "onnxruntime_onnx"' if backend == "onnxruntime" else 'backend: "python"'
    lines = [
        f'name: "{name}"',
        head,
        f"max_batch_size: {settings['max_batch_size']}",
        "input " + _tensor_block(io["inputs"], allow_reshape=True),
        "output " + _tensor_block(io["outputs"], allow_reshape=backend == "onnxruntime"),
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, settings['preferred_batch_size']))} ]",
        f"  max_queue_delay_microseconds: {settings['max_queue_delay_us']}",
        "}",
        f"instance_group [ {{ count: {settings['instances']} kind: {settings['kind']} }} ]",
    ]
    if backend == "onnxruntime" and runtime == "tensorrt":
        mode = "FP16" if precision == "fp16" else "FP32"
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            f'  parameters {{ key: "precision_mode" value: "{mode}" }}',
            "} ] } }",
        ]
    if warmup_block:
        lines.append(warmup_block)
    return "\n".join(lines) + "\n"


PYTHON_WRAPPER = '''"""Triton python backend: runs model.onnx with ONNX Runtime (written by the platform's packager)."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(__file__).parent
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.get("model_instance_kind") == "GPU" \\
            else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        self.session = ort.InferenceSession(str(here / "model.onnx"), options,
                                            providers=[p for p in providers if p in available])
        self.input_names = [i["name"] for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        # Requests arrive together under dynamic batching: run them as one batch, then split.
        feeds = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(feeds[self.input_names[0]][-1]))
        batch = {name: np.concatenate(parts) for name, parts in feeds.items()}
        results = self.session.run([name for name, _ in self.outputs], batch)
        responses = []
        start = 0
        for size in sizes:
            tensors = []
            for (name, dtype), value in zip(self.outputs, results):
                part = value[start:start + size]
                if part.ndim == 1:
                    part = part.reshape(-1, 1)
                tensors.append(pb_utils.Tensor(name, part.astype(dtype)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def write_entries(engine: Path, into: Path, name: str, io: dict[str, Any], settings: dict[str, Any],
                  precision: str, runtime: str, example: Any = None) -> dict[str, Path]:
    """Write `into/onnxruntime/<name>/...` and `into/python/<name>/...`, each warmed up on load with
    `example` (one input row; zeros without it); return both entry folders."""
    entries = {}
    block, files = warmup(io, example)
    for backend in ("onnxruntime", "python"):
        folder = into / backend / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(engine, folder / "1" / "model.onnx")
        (folder / "config.pbtxt").write_text(config_pbtxt(name, io, settings, backend, precision, runtime, block))
        if files:
            (folder / "warmup").mkdir(exist_ok=True)
            for file_name, data in files.items():
                (folder / "warmup" / file_name).write_bytes(data)
        if backend == "python":
            (folder / "1" / "model.py").write_text(PYTHON_WRAPPER)
        entries[backend] = folder
    return entries
