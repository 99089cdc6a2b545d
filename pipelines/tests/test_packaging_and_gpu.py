from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipelines.packaging import config_pbtxt, settings_from_metadata, triton_model_name, warmup, write_entries

IO = {"inputs": [{"name": "input", "elem_type": "FLOAT", "shape": [-1, 64]}],
      "outputs": [{"name": "label", "elem_type": "INT64", "shape": [-1]},
                  {"name": "probabilities", "elem_type": "FLOAT", "shape": [-1, 10]}]}

_spec = importlib.util.spec_from_file_location("build_sandbox", Path(__file__).parents[1] / "build_sandbox.py")
assert _spec and _spec.loader
sandbox = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sandbox)


def test_a_gpu_tensorrt_entry_asks_triton_for_the_tensorrt_accelerator_on_a_gpu_instance():
    settings = settings_from_metadata({"triton.instances": "2", "triton.max_batch_size": "128"}, "gpu")
    text = config_pbtxt("m_v1_gpu-fp16-tensorrt", IO, settings, "onnxruntime", "fp16", "tensorrt")
    assert "max_batch_size: 128" in text
    assert "instance_group [ { count: 2 kind: KIND_GPU } ]" in text
    assert 'name: "tensorrt"' in text and 'value: "FP16"' in text
    assert "preferred_batch_size: [ 8, 16, 32 ]" in text


def test_a_one_dimensional_output_is_reshaped_for_triton_batching():
    text = config_pbtxt("m", IO, settings_from_metadata({}, "cpu"), "onnxruntime")
    assert '{ name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }' in text
    python = config_pbtxt("m", IO, settings_from_metadata({}, "cpu"), "python")
    assert 'backend: "python"' in python and "reshape" not in python


def test_each_entry_warms_up_on_load_with_the_versions_input_example(tmp_path):
    import numpy as np

    row = list(range(64))
    engine = tmp_path / "engine.onnx"
    engine.write_bytes(b"onnx")
    entries = write_entries(engine, tmp_path / "triton", "m_v1", IO, settings_from_metadata({}, "cpu"), "fp32",
                            "onnxruntime", row)
    for folder in entries.values():
        config = (folder / "config.pbtxt").read_text()
        assert "model_warmup [ {" in config and "batch_size: 1" in config and "count: 3" in config
        assert '{ key: "input" value: { data_type: TYPE_FP32 dims: [ 64 ] input_data_file: "input" } }' in config
        data = np.frombuffer((folder / "warmup" / "input").read_bytes(), dtype=np.float32)
        assert data.tolist() == [float(v) for v in row]


def test_without_a_fitting_example_the_warm_up_sends_zeros():
    block, files = warmup(IO, [1.0, 2.0])  # 2 values for 64 inputs
    assert files == {} and '{ key: "input" value: { data_type: TYPE_FP32 dims: [ 64 ] zero_data: true } }' in block
    block, files = warmup(IO, None)
    assert files == {} and "zero_data: true" in block


def test_triton_model_names_are_safe_for_a_model_repository():
    assert triton_model_name("churn model", 3, "cpu-int8-onnxruntime") == "churn_model_v3_cpu-int8-onnxruntime"


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_a_cpu_worker_refuses_a_gpu_build_and_says_where_it_runs():
    if _has_cuda():
        pytest.skip("this worker has a GPU")
    with pytest.raises(sandbox.BuildRefused, match="CUDAExecutionProvider is not available on this worker"):
        sandbox.providers_for("gpu", "onnxruntime")


@pytest.mark.skipif(not _has_cuda(), reason="no GPU here: onnxruntime has no CUDAExecutionProvider; the fp16 and "
                                            "TensorRT variants are built and tested on a GPU worker")
@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorrt"])
def test_fp16_gpu_variants_pass_parity_on_a_gpu_worker(sklearn_model_dir, runtime, tmp_path):
    import json

    import yaml
    from sklearn.datasets import load_digits

    from pipelines.services import DEFAULT_THRESHOLDS

    mlmodel = yaml.safe_load((sklearn_model_dir / "MLmodel").read_text())
    spec = {"model_dir": str(sklearn_model_dir), "out_dir": str(tmp_path / "out"), "target": "gpu",
            "precision": "fp16", "runtime": runtime, "flavors": mlmodel["flavors"],
            "signature": {k: json.loads(v) for k, v in mlmodel["signature"].items() if isinstance(v, str)},
            "sample": load_digits(return_X_y=True)[0][:64].tolist(), "opset": 17,
            "thresholds": DEFAULT_THRESHOLDS["fp16"]}
    result = sandbox.build(spec)
    assert result["ok"] and result["parity"]["passed"], result
