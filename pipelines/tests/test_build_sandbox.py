"""The engine builder on a zoo of models, called in-process (tests may unpickle; the platform never does)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.services import DEFAULT_THRESHOLDS

_spec = importlib.util.spec_from_file_location("build_sandbox", Path(__file__).parents[1] / "build_sandbox.py")
assert _spec and _spec.loader
sandbox = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sandbox)


def _save_sklearn(model, X, path: Path) -> dict:
    import mlflow.sklearn
    from mlflow.models import infer_signature

    # Requirements given: MLflow's inference of them loads the model in a subprocess (seconds per model).
    mlflow.sklearn.save_model(model, str(path), serialization_format="cloudpickle", input_example=X[:5],
                              signature=infer_signature(X[:5], model.predict(X[:5])), pip_requirements=["scikit-learn"])
    return _spec_for(path, X[:5])


def _spec_for(path: Path, sample, precision: str = "fp32") -> dict:
    import yaml

    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    signature = {k: json.loads(v) for k, v in (mlmodel.get("signature") or {}).items() if isinstance(v, str)}
    return {"model_dir": str(path), "out_dir": str(path.parent / f"out-{path.name}-{precision}"), "target": "cpu",
            "precision": precision, "runtime": "onnxruntime", "flavors": mlmodel["flavors"],
            "signature": signature, "sample": np.asarray(sample).tolist(), "opset": 17,
            "thresholds": {k: dict(v) for k, v in DEFAULT_THRESHOLDS[precision].items()}}


def _zoo():
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    digits, wine = load_digits(return_X_y=True), load_wine(return_X_y=True)
    cancer, diabetes = load_breast_cancer(return_X_y=True), load_diabetes(return_X_y=True)
    return {
        "pipeline-logreg-wine": (make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)), *wine),
        "gradient-boosting-cancer": (GradientBoostingClassifier(n_estimators=30, random_state=0), *cancer),
        "mlp-digits": (MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0), *digits),
        "ridge-diabetes": (Ridge(alpha=1.0), *diabetes),
        "random-forest-diabetes": (RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0), *diabetes),
    }


@pytest.mark.parametrize("name", list(_zoo()))
def test_each_sklearn_model_exports_and_passes_the_fp32_parity_gate(name, tmp_path):
    model, X, y = _zoo()[name]
    model.fit(X, y)
    spec = _save_sklearn(model, X, tmp_path / name)
    result = sandbox.build(spec)
    assert result["ok"] and result["parity"]["passed"], result["parity"]
    assert result["io"]["inputs"][0]["shape"][-1] == X.shape[1]
    figures = result["parity"]["figures"]
    if "label_agreement" in figures:
        assert figures["label_agreement"] == 1.0
    else:
        assert figures["max_abs_error"] < 1e-3 * figures["reference_scale"]


def test_int8_quantizes_an_mlp_and_reports_its_figures(tmp_path):
    model, X, y = _zoo()["mlp-digits"]
    model.fit(X, y)
    fp32 = sandbox.build(_save_sklearn(model, X, tmp_path / "mlp"))
    spec = _spec_for(tmp_path / "mlp", X[:5], "int8")
    int8 = sandbox.build(spec)
    assert int8["ok"]
    assert int8["parity"]["figures"]["max_probability_diff"] > 0  # really quantized, not a copy
    assert Path(spec["out_dir"], "engine.onnx").stat().st_size < Path(fp32_out(tmp_path), "engine.onnx").stat().st_size
    assert "label_agreement" in int8["parity"]["figures"] and fp32["parity"]["passed"]


def fp32_out(tmp_path: Path) -> Path:
    return tmp_path / "out-mlp-fp32"


def test_a_parity_miss_is_reported_with_the_failing_figure(tmp_path):
    model, X, y = _zoo()["mlp-digits"]
    model.fit(X, y)
    spec = _save_sklearn(model, X, tmp_path / "mlp")
    spec["precision"] = "int8"
    spec["thresholds"] = {"classification": {"label_agreement": 1.0, "max_probability_diff": 0.0}}
    result = sandbox.build(spec)
    assert result["ok"] and not result["parity"]["passed"]
    assert any("max_probability_diff" in failure for failure in result["parity"]["failures"])


def test_a_pytorch_cnn_exports_with_the_torch_exporter(tmp_path):
    torch = pytest.importorskip("torch")
    import mlflow.pytorch
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    images = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    mlflow.pytorch.save_model(net, str(tmp_path / "cnn"), input_example=images[:4], pip_requirements=["torch"])
    result = sandbox.build(_spec_for(tmp_path / "cnn", images[:4]))
    assert result["ok"], result.get("error")
    assert result["parity"]["passed"] and result["parity"]["figures"]["label_agreement"] == 1.0
    assert result["io"]["inputs"][0]["shape"][1:] == [1, 8, 8]


def test_an_onnx_model_is_taken_as_it_is(tmp_path):
    import mlflow.onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    X, y = load_wine(return_X_y=True)
    X = X.astype(np.float32)
    onx = to_onnx(LogisticRegression(max_iter=2000).fit(X, y), X[:1], options={"zipmap": False})
    mlflow.onnx.save_model(onx, str(tmp_path / "onnx-model"), input_example=X[:5], pip_requirements=["onnxruntime"])
    result = sandbox.build(_spec_for(tmp_path / "onnx-model", X[:5]))
    assert result["ok"] and result["parity"]["passed"], result


def test_an_unsupported_flavor_is_refused_naming_it_and_what_is_supported():
    with pytest.raises(sandbox.BuildRefused, match="xgboost.*supported: sklearn"):
        sandbox.pick_flavor({"xgboost": {}, "python_function": {}})


def test_a_signature_that_disagrees_with_the_graph_is_refused():
    io = {"inputs": [{"name": "input", "elem_type": "FLOAT", "shape": [-1, 64]}]}
    signature = {"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 30]}}]}
    with pytest.raises(sandbox.BuildRefused, match="30 input features .* expects 64"):
        sandbox.check_signature(signature, io)


def test_fp16_conversion_handles_the_casts_skl2onnx_adds_to_an_mlp(tmp_path):
    model, X, y = _zoo()["mlp-digits"]
    model.fit(X, y)
    _save_sklearn(model, X, tmp_path / "mlp")
    result = sandbox.build(_spec_for(tmp_path / "mlp", X[:5], "fp16"))
    assert result["ok"], result.get("error")
    assert result["parity"]["passed"], result["parity"]


def test_an_int8_variant_of_a_model_with_nothing_to_quantize_is_not_kept(tmp_path):
    model, X, y = _zoo()["gradient-boosting-cancer"]
    model.fit(X, y)
    _save_sklearn(model, X, tmp_path / "gbt")
    result = sandbox.build(_spec_for(tmp_path / "gbt", X[:5], "int8"))
    assert result["ok"] and not result["parity"]["passed"]
    assert any("nothing to quantize" in failure for failure in result["parity"]["failures"])


def test_scores_of_a_classifier_network_are_judged_as_probabilities():
    reference = {"label": np.array([0, 1]), "scores": np.array([[2.0, 0.0], [0.0, 2.0]])}
    engine = {"label": np.array([0, 1]), "scores": np.array([[2.0, 0.0], [0.0, 3.0]])}
    verdict = sandbox.parity(reference, engine, {"classification": {"max_probability_diff": 0.01}})
    assert verdict["figures"]["max_score_diff"] == 1.0
    assert 0.07 < verdict["figures"]["max_probability_diff"] < 0.08
    assert not verdict["passed"]
