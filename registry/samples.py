"""Reference data samples: rows of real input that the engine builds check parity on (when a version
has one, it is used instead of the few rows of its input example), and from which its first build writes
the reference set drift is judged against. A sample comes with the registration (`reference_sample`), or
from a dataset the version's run logged with `mlflow.log_input` (sample_from_run): the one place that
reads data the platform did not receive itself, and only from the platform's own artifact store."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from registry.archives import ArchiveError

if TYPE_CHECKING:
    from registry import mlflow_store

MAX_SAMPLE_BYTES = 20 * 1024 * 1024
MAX_SAMPLE_ROWS = 10_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSample:
    rows: list[Any]
    cut_from: int = 0  # how many rows the file held when only its first MAX_SAMPLE_ROWS were kept

    @property
    def payload(self) -> bytes:
        return json.dumps(self.rows, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def parse_reference_sample(path: Path, filename: str = "", cut: bool = False) -> ReferenceSample:
    """Accept JSON (a list of rows, or {"data"|"inputs"|"instances": rows}), CSV of numbers (a header
    row is skipped, and with it the unnamed index column pandas' to_csv writes first) or a .npy array
    (never unpickled). Every row must have the same shape. More than MAX_SAMPLE_ROWS rows are refused,
    or with `cut`, only the first MAX_SAMPLE_ROWS are kept."""
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
    cut_from = 0
    if len(array) > MAX_SAMPLE_ROWS:
        if not cut:
            raise ArchiveError(f"the reference sample has {len(array)} rows; the limit is {MAX_SAMPLE_ROWS}")
        cut_from, array = len(array), array[:MAX_SAMPLE_ROWS]
    if not np.isfinite(array.astype(np.float64)).all():
        raise ArchiveError("the reference sample contains NaN or infinite values")
    return ReferenceSample(rows=array.astype(np.float64).tolist(), cut_from=cut_from)


def _read_csv(text: str) -> Any:
    import numpy as np

    rows = list(csv.reader(io.StringIO(text)))
    if rows and not _numeric(rows[0]):
        if rows[0] and rows[0][0] == "":  # pandas' to_csv without index=False: an unnamed index column first
            rows = [row[1:] for row in rows]
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


def load_reference_set(uri: str) -> dict[str, Any] | None:
    """A version's reference set (`reference_uri`: the sample and the original model's predictions, written by
    its first engine build, or pinned from captured traffic); None when there is none or it is gone."""
    from registry import mlflow_store

    if not uri:
        return None
    folder, _, name = uri.rpartition("/")
    text = mlflow_store.read_artifact_text(folder, name, limit=256 * 1024 * 1024)
    return None if text is None else dict(json.loads(text))


# ---- a dataset logged with the version's run ------------------------------------------------------

# The contexts (the tag mlflow.log_input(dataset, context=...) writes) whose dataset may become a version's
# reference sample, best first: "reference" is the platform's own; the others are what people and MLflow
# itself call held-out data ("eval": the sklearn, xgboost and lightgbm autologgers; "training" is left out).
REFERENCE_CONTEXTS = ("reference", "eval", "evaluation", "validation", "test", "testing", "holdout")
SAMPLE_SUFFIXES = (".csv", ".json", ".npy")
HOW_TO = ("log the rows as an artifact of the run (mlflow.log_artifact('holdout.csv')) and give that path as the "
          "dataset's source (mlflow.data.from_pandas(df, source='holdout.csv'))")


@dataclass(frozen=True)
class RunSample:
    """What sample_from_run found: a sample, or None; `note` says in words where it came from, or why a
    dataset the run logged was not used (empty when the run logged none in REFERENCE_CONTEXTS)."""

    sample: ReferenceSample | None
    note: str


def sample_from_run(run_id: str, signature: dict[str, Any] | None) -> RunSample:
    """The reference sample a run logged: its dataset input of the best REFERENCE_CONTEXTS whose source
    is a .csv, .json or .npy file in the platform's artifact store (an artifact of the run, named by the
    path it was logged under), holding the rows the dataset logged, as wide as the model's signature.
    Nothing else is read: MLflow keeps a dataset's metadata, not its rows, and the platform fetches
    nothing from outside its own store. Never raises: a dataset it cannot use is a reason in the note."""
    from registry import mlflow_store

    refused: list[str] = []
    try:
        datasets = mlflow_store.run_datasets(run_id)
        ranked = sorted((d for d in datasets if d.context.lower() in REFERENCE_CONTEXTS),
                        key=lambda d: REFERENCE_CONTEXTS.index(d.context.lower()))
        for dataset in ranked:
            described = f"run dataset {dataset.name!r} (context {dataset.context!r})"
            try:
                sample, where = _run_dataset_rows(run_id, dataset, signature)
            except ArchiveError as exc:
                refused.append(f"{described} not used: {exc}")
                continue
            rows = f"the first {len(sample.rows)} of its {sample.cut_from} rows" if sample.cut_from \
                else f"{len(sample.rows)} rows"
            return RunSample(sample, "; ".join([f"{described}: {rows} from {where}", *refused]))
    except Exception as exc:  # noqa: BLE001 - a run's datasets never fail a registration
        log.exception("could not read the datasets of run %s", run_id)
        return RunSample(None, f"the run's datasets could not be read ({type(exc).__name__}: {exc}); "
                               "the input example is used instead")
    if not refused:
        return RunSample(None, "")
    return RunSample(None, "; ".join(refused) + "; the input example is used instead")


def _run_dataset_rows(run_id: str, dataset: mlflow_store.RunDataset,
                      signature: dict[str, Any] | None) -> tuple[ReferenceSample, str]:
    from registry import mlflow_store

    location, relative = _artifact_of(run_id, dataset)
    where = f"{location.rstrip('/')}/{relative}"
    if PurePosixPath(relative).suffix.lower() not in SAMPLE_SUFFIXES:
        raise ArchiveError(f"its file {where} is not one of {', '.join(SAMPLE_SUFFIXES)}")
    size = mlflow_store.artifact_size(location, relative)
    if size is None:
        raise ArchiveError(f"there is no file {where} in the artifact store; {HOW_TO}")
    if size > MAX_SAMPLE_BYTES:
        raise ArchiveError(f"its file {where} is {size} bytes; the limit is {MAX_SAMPLE_BYTES}")
    with tempfile.TemporaryDirectory(prefix="run-sample-") as tmp:
        local = mlflow_store.download_file(location, relative, Path(tmp))
        if local.stat().st_size > MAX_SAMPLE_BYTES:  # the listing said otherwise: trust the bytes
            raise ArchiveError(f"its file {where} is over {MAX_SAMPLE_BYTES} bytes")
        try:
            sample = parse_reference_sample(local, relative, cut=True)
        except ArchiveError as exc:
            raise ArchiveError(f"its file {where}: {exc}") from exc
    held = sample.cut_from or len(sample.rows)
    logged = _logged_rows(dataset.profile)
    if logged is not None and logged != held:
        raise ArchiveError(f"its file {where} holds {held} rows, the dataset logged {logged}: not the same rows")
    width, wanted = len(sample.rows[0]) if isinstance(sample.rows[0], list) else 1, _signature_width(signature)
    if wanted is not None and width != wanted:
        raise ArchiveError(f"its rows have {width} values, the model's signature takes {wanted} (log the model's "
                           "inputs only: no target column)")
    return sample, where


def _artifact_of(run_id: str, dataset: mlflow_store.RunDataset) -> tuple[str, str]:
    """(artifact location, relative path) of the file a dataset's source names. A local path is a path in
    the run's artifacts (an absolute one: the file of its name at their root, where mlflow.log_artifact
    puts it); never a file on the platform's own disk."""
    from registry import mlflow_store

    try:
        source = json.loads(dataset.source) if dataset.source else {}
    except ValueError:
        source = {}
    uri = (source.get("uri") or source.get("url")) if isinstance(source, dict) else None
    if not isinstance(uri, str) or not uri:
        raise ArchiveError(f"its source ({dataset.source_type or 'of no type'}) names no file; {HOW_TO}")
    if uri.startswith("runs:/"):  # not from mlflow.data (it refuses these), but MlflowClient.log_inputs takes any
        run_id, _, relative = uri[len("runs:/"):].partition("/")
    elif uri.startswith(mlflow_store.ARTIFACT_SCHEME):
        folder, _, relative = uri.rpartition("/")
        return folder, _relative(relative, uri)
    elif dataset.source_type == "local":
        relative = urlsplit(uri).path if uri.startswith("file:") else uri
        if relative.startswith("/"):
            relative = posixpath.basename(relative)
    else:
        raise ArchiveError(f"its source {uri!r} ({dataset.source_type}) is outside the platform's artifact store, "
                           f"the only place it reads data from; {HOW_TO}")
    location = mlflow_store.run_artifact_uri(run_id)
    if location is None:
        raise ArchiveError(f"its source {uri!r} names run {run_id!r}, which does not exist")
    return location, _relative(relative, uri)


def _relative(path: str, uri: str) -> str:
    clean = posixpath.normpath(path.replace("\\", "/")) if path else ""
    if not clean or clean in (".", "..") or clean.startswith(("../", "/")):
        raise ArchiveError(f"its source {uri!r} is not a path inside the run's artifacts")
    return clean


def _logged_rows(profile: str) -> int | None:
    """How many rows the dataset had when it was logged, from MLflow's profile (pandas: num_rows;
    numpy: features_shape)."""
    try:
        data = json.loads(profile) if profile else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    rows = data.get("num_rows")
    shape = data.get("features_shape")
    if rows is None and isinstance(shape, list) and shape:
        rows = shape[0]
    return rows if isinstance(rows, int) else None


def _signature_width(signature: dict[str, Any] | None) -> int | None:
    """How many values a row of the model's input has, when its signature says: one tensor [-1, n], or n columns."""
    inputs = (signature or {}).get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        return None
    if len(inputs) == 1 and inputs[0].get("type") == "tensor":
        shape = (inputs[0].get("tensor-spec") or {}).get("shape")
        if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
        return None
    if any(i.get("type") == "tensor" for i in inputs):
        return None
    return len(inputs)
