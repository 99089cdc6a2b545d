"""A trivial python-backend Triton model (y = x * factor, FP32 vectors) for the gateway's tests and benchmark."""

from __future__ import annotations

from pathlib import Path

MODEL_PY = '''import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.factor = np.float32(config["parameters"]["factor"]["string_value"])

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * self.factor)]) for r in requests]
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
parameters: {{ key: "factor" value: {{ string_value: "{factor}" }} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
'''


def write_echo_model(repo: Path, name: str, factor: float, instances: int = 1) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "config.pbtxt").write_text(CONFIG.format(name=name, factor=factor, instances=instances))
    return folder
