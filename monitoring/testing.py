"""Support for monitoring's tests and benchmarks, and for the deployer's that judge captured traffic: a
version's reference set written as its first engine build writes it, and captured rows stored as the
capture pass stores them."""

from __future__ import annotations

import json
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from django.utils import timezone

from monitoring.models import CapturedRow
from registry import mlflow_store
from registry.models import ModelVersion


def write_reference(version: ModelVersion, rows: Any, predictions: list[Any], input_name: str = "input") -> None:
    """Store `rows` (2-D) and the original model's `predictions` as the version's reference set."""
    data = json.dumps({"input": input_name, "rows": [[float(v) for v in row] for row in rows],
                       "prediction": predictions}).encode()
    name = f"{version.pk}-{uuid.uuid4().hex}.json"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(data)
        mlflow_store.upload_artifacts(Path(tmp), "mlflow-artifacts:/references", "")
    ModelVersion.objects.filter(pk=version.pk).update(reference_uri=f"mlflow-artifacts:/references/{name}")
    version.refresh_from_db()


def capture_rows(version: ModelVersion, rows: Any, predictions: list[Any], input_name: str = "input",
                 at: datetime | None = None) -> None:
    """Store rows as captured traffic of the version (columns `<input>_<j>`, as the capture names them)."""
    when = at or timezone.now()
    CapturedRow.objects.bulk_create(
        CapturedRow(version=version, at=when, inputs={f"{input_name}_{j}": float(v) for j, v in enumerate(row)},
                    prediction=p) for row, p in zip(rows, predictions, strict=True))
