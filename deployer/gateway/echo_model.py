"""A trivial python-backend Triton model (y = x * factor, FP32 vectors) for the gateway's and the deployer's
tests and benchmarks. With a `fault_file`, a fault is injected while that file exists: "error" makes every
request fail, "error:0.05" a random 5% of them, "sleep:0.2" delays each by that many seconds (how tests
start a canary fault at a chosen time)."""

from __future__ import annotations

from pathlib import Path

MODEL_PY = '''import json
import os
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.factor = np.float32(config["parameters"]["factor"]["string_value"])
        self.fault_file = config["parameters"].get("fault_file", {}).get("string_value", "")

    def _fault(self):
        if not self.fault_file or not os.path.exists(self.fault_file):
            return None
        with open(self.fault_file) as f:
            fault = f.read().strip()
        if fault.startswith("sleep:"):
            time.sleep(float(fault[6:]))
            return None
        if fault.startswith("error:"):
            return fault if random.random() < float(fault[6:]) else None
        return fault or "error"

    def execute(self, requests):
        responses = []
        for r in requests:
            fault = self._fault()
            if fault is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"injected fault: {fault}")))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(
                "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * self.factor)]))
        return responses
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
parameters: {{ key: "factor" value: {{ string_value: "{factor}" }} }}
parameters: {{ key: "fault_file" value: {{ string_value: "{fault_file}" }} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
'''


def write_echo_model(repo: Path, name: str, factor: float, instances: int = 1, fault_file: Path | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "config.pbtxt").write_text(CONFIG.format(name=name, factor=factor, instances=instances,
                                                       fault_file=fault_file or ""))
    return folder
