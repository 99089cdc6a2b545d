"""The models under test (trained on scikit-learn's bundled data sets), saved with MLflow and built into
engines by pipelines/build_sandbox.py in this process, with the platform's default parity thresholds."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0


@dataclass
class Subject:
    """One trained model: its framework's own predict, the held-out rows it is measured on, and the
    MLflow model folder the engines are built from."""

    key: str
    description: str
    framework: str  # how the baseline is called, e.g. "scikit-learn predict_proba"
    predict: Callable[[Any], Any]  # the baseline, on the framework's own input type
    to_native: Callable[[np.ndarray], Any]  # float32 rows -> the baseline's input (same memory where possible)
    labels: Callable[[Any], np.ndarray]  # the baseline's output -> class labels
    X: np.ndarray  # held-out rows, float32, the engines' input
    y: np.ndarray
    model_dir: Path
    torch_module: Any = None  # the eager nn.Module (PyTorch subjects), for the GPU comparison
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> build result


@contextlib.contextmanager
def quiet(log_path: Path) -> Iterator[None]:
    """Send everything written to stdout/stderr (Python prints, logging, C++ libraries) to a log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "ab") as log:
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def default_thresholds() -> dict[str, dict[str, dict[str, float]]]:
    """The platform's parity thresholds (pipelines.services imports Django models, so Django is set up
    first; no database connection is ever opened: the URL below is a placeholder, used only when unset)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DATABASE_URL", "postgresql://bench:unused@127.0.0.1:9/never-connected")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-engines-unused")
    import django

    django.setup()
    from pipelines.services import DEFAULT_THRESHOLDS

    return {str(p): {kind: dict(v) for kind, v in by_kind.items()} for p, by_kind in DEFAULT_THRESHOLDS.items()}


def _split(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    Xtr, Xte, ytr, yte = train_test_split(X.astype(np.float32), y, test_size=0.25, random_state=SEED, stratify=y)
    return np.ascontiguousarray(Xtr), np.ascontiguousarray(Xte), ytr, yte


def _save_sklearn(model: Any, X: np.ndarray, path: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature

    # cloudpickle (MLflow 3 defaults to skops, which refuses tree models' types unless trusted); explicit
    # requirements skip MLflow's slow inference of them.
    mlflow.sklearn.save_model(model, str(path), serialization_format="cloudpickle", input_example=X[:5],
                              signature=infer_signature(X[:5], model.predict(X[:5])),
                              pip_requirements=["scikit-learn"])


def sklearn_mlp(work: Path, log: Path) -> Subject:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X / 16.0, y)
    model = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=200, random_state=SEED).fit(Xtr, ytr)
    with quiet(log):
        _save_sklearn(model, Xte, work / "mlp-digits")
    return Subject("mlp-digits", "scikit-learn MLPClassifier (64-256-128-10, relu) on digits",
                   "scikit-learn predict_proba", model.predict_proba, lambda x: x,
                   lambda p: model.classes_[np.argmax(p, axis=1)], Xte, yte, work / "mlp-digits")


def sklearn_gbt(work: Path, log: Path) -> Subject:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X, y)
    model = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=SEED).fit(Xtr, ytr)
    with quiet(log):
        _save_sklearn(model, Xte, work / "gbt-cancer")
    return Subject("gbt-cancer", "scikit-learn GradientBoostingClassifier (100 trees, depth 3) on breast_cancer",
                   "scikit-learn predict_proba", model.predict_proba, lambda x: x,
                   lambda p: model.classes_[np.argmax(p, axis=1)], Xte, yte, work / "gbt-cancer")


def torch_cnn(work: Path, log: Path, epochs: int) -> Subject:
    import mlflow.pytorch
    import torch
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X / 16.0, y)
    Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    torch.manual_seed(SEED)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            optimizer.step()
    net.eval()
    with quiet(log):
        mlflow.pytorch.save_model(net, str(work / "cnn-digits"), input_example=Xte[:4], pip_requirements=["torch"])

    def eager(x: Any) -> Any:
        with torch.no_grad():
            return net(x)

    return Subject("cnn-digits", "PyTorch CNN (conv16-conv32-maxpool-fc64-fc10) on digits 8x8",
                   "PyTorch eager, no_grad", eager, torch.from_numpy,
                   lambda out: np.argmax(out.numpy(), axis=1), Xte, yte, work / "cnn-digits", torch_module=net)


def build(subject: Subject, precision: str, thresholds: dict[str, Any], log: Path, target: str = "cpu") -> dict:
    """build_sandbox.build on the saved model, in this process; the saved sample is the first 256
    held-out rows (the parity gate then runs on real rows, not jitter). Failures come back as data."""
    import yaml

    from pipelines import build_sandbox

    mlmodel = yaml.safe_load((subject.model_dir / "MLmodel").read_text())
    signature = {k: json.loads(v) for k, v in (mlmodel.get("signature") or {}).items() if isinstance(v, str)}
    out_dir = subject.model_dir.parent / f"engine-{subject.key}-{target}-{precision}"
    spec = {"model_dir": str(subject.model_dir), "out_dir": str(out_dir), "target": target, "precision": precision,
            "runtime": "onnxruntime", "flavors": mlmodel["flavors"], "signature": signature,
            "sample": subject.X[:256].tolist(), "opset": 17, "thresholds": thresholds[precision]}
    build_sandbox.LOG.clear()
    started = time.perf_counter()
    try:
        with quiet(log):
            result = build_sandbox.build(spec)
    except build_sandbox.BuildRefused as exc:
        result = {"ok": False, "error": f"refused: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a failed build is a figure of the benchmark, not a crash
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    result["seconds"] = time.perf_counter() - started
    result["engine"] = out_dir / "engine.onnx"
    if result["ok"]:
        import onnx

        ops = [node.op_type for node in onnx.load(str(result["engine"])).graph.node]
        result["integer_ops"] = sum(("Integer" in op or "Quant" in op) for op in ops)
        result["ops"] = sorted(set(ops))
    return result
