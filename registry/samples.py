"""Reference data samples given at registration: rows of real input that the engine builds check
parity on (when a version has one, it is used instead of the few rows of its input example)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.archives import ArchiveError

MAX_SAMPLE_BYTES = 20 * 1024 * 1024
MAX_SAMPLE_ROWS = 10_000


@dataclass(frozen=True)
class ReferenceSample:
    rows: list[Any]

    @property
    def payload(self) -> bytes:
        return json.dumps(self.rows, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def parse_reference_sample(path: Path, filename: str = "") -> ReferenceSample:
    """Accept JSON (a list of rows, or {"data"|"inputs"|"instances": rows}), CSV of numbers (a header
    row is skipped) or a .npy array (never unpickled). Every row must have the same shape."""
    import numpy as np

    size = path.stat().st_size
    if size == 0:
        raise ArchiveError("the reference sample is empty")
    if size > MAX_SAMPLE_BYTES:
        raise ArchiveError(f"the reference sample is {size} bytes; the limit is {MAX_SAMPLE_BYTES}")
    head = path.read_bytes()[:6]
    name = filename.lower()
    try:
        if head.startswith(b"\x93NUMPY") or name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        elif name.endswith(".csv"):
            array = _read_csv(path.read_text(errors="replace"))
        else:
            data = json.loads(path.read_text(errors="replace"))
            if isinstance(data, dict):
                data = next((data[k] for k in ("data", "inputs", "instances") if k in data), None)
            array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"the reference sample is not a numeric table: {exc}; give a JSON list of rows, "
                           "a CSV of numbers or a .npy array") from exc
    if array.dtype.kind not in "fiub" or array.ndim < 1:
        raise ArchiveError("the reference sample must hold numbers, one row per example")
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if not len(array):
        raise ArchiveError("the reference sample has no rows")
    if len(array) > MAX_SAMPLE_ROWS:
        raise ArchiveError(f"the reference sample has {len(array)} rows; the limit is {MAX_SAMPLE_ROWS}")
    if not np.isfinite(array.astype(np.float64)).all():
        raise ArchiveError("the reference sample contains NaN or infinite values")
    return ReferenceSample(rows=array.astype(np.float64).tolist())


def _read_csv(text: str) -> Any:
    import numpy as np

    rows = list(csv.reader(io.StringIO(text)))
    if rows and not _numeric(rows[0]):
        rows = rows[1:]
    return np.asarray([[float(cell) for cell in row] for row in rows if row], dtype=np.float64)


def _numeric(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def store_sample(sample: ReferenceSample) -> str:
    """Content-addressed in MLflow's artifact store; returns its URI."""
    from registry import mlflow_store

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{sample.digest}.json").write_bytes(sample.payload)
        mlflow_store.upload_artifacts(Path(tmp), "mlflow-artifacts:/reference-samples", "")
    return f"mlflow-artifacts:/reference-samples/{sample.digest}.json"


def load_sample(uri: str) -> list[Any]:
    from registry import mlflow_store

    folder, _, name = uri.rpartition("/")
    text = mlflow_store.read_artifact_text(folder, name, limit=MAX_SAMPLE_BYTES * 4)
    if text is None:
        raise ArchiveError(f"reference sample {uri} is missing from the artifact store")
    rows: list[Any] = json.loads(text)
    return rows
