"""What the registry's tests share: a scikit-learn model saved as a pickle, an ONNX model, and model
code written at test time, importable here and shipped inside models (code_paths), and a work claim
held the way another worker holds it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from django.db import connection


@contextmanager
def held_by_another_worker(kind: str, key: int) -> Iterator[Any]:
    """The claim, held on a connection of its own, as a worker in another process holds it."""
    from registry import locks

    params = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in params.items() if k in {"host", "port", "user", "password", "dbname"}},
                         autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (locks.KINDS[kind], key))
        try:
            yield other
        finally:
            # Released before the connection closes: the server ends a closed session's backend (and drops
            # its locks) a moment later, and on a loaded machine the next claim could come first.
            other.execute("SELECT pg_advisory_unlock(%s, %s)", (locks.KINDS[kind], key))


@contextmanager
def model_code(folder: Path, name: str, source: str) -> Iterator[ModuleType]:
    """`source` as module `name`, importable while the block runs; its file is `module.FILE`, for
    code_paths, so the sandbox imports it the way it would any model's code."""
    path = folder / f"{name}.py"
    path.write_text(source)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(name)
        module.FILE = path  # type: ignore[attr-defined]
        yield module
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def pickled_sklearn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn saved as a cloudpickle (MLflow 3 defaults to skops, which is not a pickle)."""
    import mlflow.sklearn
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=200).fit(X[:500], y[:500])
    path = tmp_path_factory.mktemp("pickled") / "digits-cloudpickle"
    mlflow.sklearn.save_model(model, str(path), serialization_format="cloudpickle", input_example=X[:3],
                              pip_requirements=["scikit-learn"])
    return path


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.onnx
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    model = LogisticRegression(max_iter=200).fit(X[:500], y[:500])
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 64]))], target_opset=17)
    path = tmp_path_factory.mktemp("onnx") / "digits-onnx"
    mlflow.onnx.save_model(onx, str(path), input_example=X[:3], pip_requirements=["onnxruntime"])
    return path
