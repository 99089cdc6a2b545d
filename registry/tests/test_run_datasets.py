"""A dataset the version's run logged (mlflow.log_input) becomes its reference sample when the platform can
read its rows from its own artifact store; any other dataset leaves the input example in charge, with the
reason on the version. Registered here through the REST API's runs:/ source (the mlflow client's path is
tests/test_mlflow_client.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from registry import mlflow_store, samples
from registry.models import AuditEvent, ModelVersion
from registry.tests.test_register_api import upload

pytestmark = pytest.mark.django_db(transaction=True)


def _digits(rows: int, start: int = 0) -> Any:
    import pandas as pd
    from sklearn.datasets import load_digits

    X = load_digits(return_X_y=True)[0][start:start + rows]
    return pd.DataFrame(X, columns=[f"px{i}" for i in range(64)])


def _log_dataset(run_id: str, dataset: Any, context: str) -> None:
    """What mlflow.log_input(dataset, context=...) sends, written to the run through the tracking store.
    MLflow keeps one dataset per experiment, name and digest, with the source it was first logged with; the
    runs here share the upload experiment, so each gets its own digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    e = dataset._to_mlflow_entity()
    entity = Dataset(e.name, f"{e.digest[:4]}{run_id[:28]}", e.source_type, e.source, e.schema, e.profile)
    mlflow_store.tracking_store().log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", context)])])


def _log_file(run_id: str, relative: str, content: bytes, tmp_path: Path) -> None:
    """What mlflow.log_artifact(file, artifact_path=<folder>) stores."""
    folder = tmp_path / "artifact" / relative
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_bytes(content)
    artifact_uri = mlflow_store.run_artifact_uri(run_id)
    assert artifact_uri
    parent = str(Path(relative).parent)
    mlflow_store.upload_artifacts(folder.parent, artifact_uri, "" if parent == "." else parent)


def _log_csv(run_id: str, frame: Any, relative: str, context: str, tmp_path: Path, name: str | None = None) -> None:
    """The convention the README gives: the rows as an artifact of the run, and a dataset whose source is its path."""
    import mlflow.data

    _log_file(run_id, relative, frame.to_csv(index=False).encode(), tmp_path)
    _log_dataset(run_id, mlflow.data.from_pandas(frame, source=relative, name=name), context)


def _run_of_an_upload(scientist: Any, name: str, archive: Path) -> str:
    resp = upload(scientist, f"{name}-run", archive)
    assert resp.status_code == 201, resp.content
    return str(resp.json()["lineage"]["run_id"])


def _register_from_run(scientist: Any, name: str, run_id: str, **extra: Any) -> ModelVersion:
    resp = scientist.post(f"/api/v1/models/{name}/versions/", {"source": f"runs:/{run_id}/model", **extra},
                          format="json")
    assert resp.status_code == 201, resp.content
    return ModelVersion.objects.get(model__name=name, version=resp.json()["version"])


def test_a_csv_the_run_logged_as_its_reference_dataset_becomes_the_reference_sample(scientist, model_archive,
                                                                                    unique_name, tmp_path):
    import mlflow.data

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    holdout = _digits(40, start=1000)
    # Written as pandas writes it by default (its index first), logged under data/, named by that path.
    _log_file(run_id, "data/holdout.csv", holdout.to_csv().encode(), tmp_path)
    _log_dataset(run_id, mlflow.data.from_pandas(holdout, source="data/holdout.csv", name="holdout"), "reference")
    version = _register_from_run(scientist, unique_name, run_id)
    assert version.reference_sample_rows == 40
    assert samples.load_sample(version.reference_sample_uri) == holdout.to_numpy(dtype=float).tolist()
    assert version.reference_sample_note.startswith("run dataset 'holdout' (context 'reference'): 40 rows from "
                                                    "mlflow-artifacts:/")
    assert version.reference_sample_note.endswith("/artifacts/data/holdout.csv")
    detail = scientist.get(f"/api/v1/models/{unique_name}/versions/{version.version}/").json()
    assert detail["lineage"]["reference_sample_rows"] == 40
    assert detail["lineage"]["reference_sample_note"] == version.reference_sample_note
    event = AuditEvent.objects.get(action="version.register", target_id=f"{unique_name}/{version.version}")
    assert event.after["reference_sample"] == version.reference_sample_note


def test_a_numpy_dataset_logged_with_an_absolute_path_is_read_from_the_file_of_that_name_in_the_run(
        scientist, model_archive, unique_name, tmp_path):
    import io

    import mlflow.data

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    X = _digits(25).to_numpy()
    buffer = io.BytesIO()
    np.save(buffer, X)
    # mlflow.log_artifact("/home/me/work/holdout.npy") stores it as holdout.npy at the run's root.
    _log_file(run_id, "holdout.npy", buffer.getvalue(), tmp_path)
    _log_dataset(run_id, mlflow.data.from_numpy(X, source="/home/me/work/holdout.npy", name="h"), "eval")
    version = _register_from_run(scientist, unique_name, run_id)
    assert samples.load_sample(version.reference_sample_uri) == X.astype(float).tolist()
    assert "run dataset 'h' (context 'eval'): 25 rows" in version.reference_sample_note


def test_a_registrations_own_reference_sample_wins_over_the_runs_dataset(scientist, model_archive, unique_name,
                                                                        tmp_path):

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    _log_csv(run_id, _digits(40), "holdout.csv", "reference", tmp_path)
    given = tmp_path / "given.json"
    given.write_text(json.dumps(_digits(3).to_numpy().tolist()))
    with open(given, "rb") as fh:
        resp = scientist.post(f"/api/v1/models/{unique_name}/versions/",
                              {"source": f"runs:/{run_id}/model", "reference_sample": fh}, format="multipart")
    assert resp.status_code == 201, resp.content
    assert resp.json()["lineage"]["reference_sample_rows"] == 3
    assert resp.json()["lineage"]["reference_sample_note"] == "given with the registration (3 rows)"


def test_the_reference_context_is_preferred_and_an_unreadable_one_is_passed_over(scientist, model_archive,
                                                                                unique_name, tmp_path):
    import mlflow.data

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    training, evaluation = _digits(60), _digits(30, start=100)
    _log_csv(run_id, training, "train.csv", "training", tmp_path, name="train")
    _log_csv(run_id, evaluation, "eval.csv", "eval", tmp_path, name="eval")
    _log_dataset(run_id, mlflow.data.from_pandas(_digits(10), name="ref"), "reference")  # no file behind it
    version = _register_from_run(scientist, unique_name, run_id)
    assert version.reference_sample_rows == 30
    assert samples.load_sample(version.reference_sample_uri) == evaluation.to_numpy(dtype=float).tolist()
    note = version.reference_sample_note
    assert note.startswith("run dataset 'eval' (context 'eval'): 30 rows from ")
    assert "; run dataset 'ref' (context 'reference') not used: its source (code) names no file" in note


def test_a_run_that_logged_only_training_data_keeps_the_input_example(scientist, model_archive, unique_name,
                                                                      tmp_path):

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    _log_csv(run_id, _digits(60), "train.csv", "training", tmp_path)
    version = _register_from_run(scientist, unique_name, run_id)
    assert (version.reference_sample_uri, version.reference_sample_rows, version.reference_sample_note) == ("", 0, "")


@pytest.mark.parametrize(("case", "words"), [
    ("web", "its source 'http://127.0.0.1:9/holdout.csv' (http) is outside the platform's artifact store"),
    ("s3", "its source 's3://bucket/holdout.csv' (s3) is outside the platform's artifact store"),
    ("platform disk", "there is no file mlflow-artifacts:/"),
    ("not logged", "there is no file mlflow-artifacts:/"),
    ("climbs out", "is not a path inside the run's artifacts"),
    ("parquet", "is not one of .csv, .json, .npy"),
    ("other rows", "holds 40 rows, the dataset logged 12: not the same rows"),
    ("with target", "its rows have 65 values, the model's signature takes 64"),
    ("not numbers", "is not a numeric table"),
    ("too big", "bytes; the limit is 2000"),
])
def test_a_dataset_the_platform_cannot_read_leaves_the_input_example_and_says_why(
        scientist, model_archive, unique_name, tmp_path, monkeypatch, case, words):
    import mlflow.data

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    holdout = _digits(40)
    csv = holdout.to_csv(index=False).encode()
    source, frame = "holdout.csv", holdout
    if case == "web":
        source = "http://127.0.0.1:9/holdout.csv"  # nothing listens there; the platform never fetches it anyway
    elif case == "s3":
        source = "s3://bucket/holdout.csv"
    elif case == "platform disk":
        on_disk = tmp_path / "on-the-platform.csv"  # a file on the platform's own disk is never read
        on_disk.write_bytes(csv)
        source = str(on_disk)
    elif case == "climbs out":
        source = "../other-run/holdout.csv"
    elif case == "parquet":
        source = "holdout.parquet"
        _log_file(run_id, source, b"PAR1", tmp_path)
    elif case == "other rows":
        frame = holdout.head(12)
    elif case == "with target":
        frame = holdout.assign(label=0)
        csv = frame.to_csv(index=False).encode()
    elif case == "not numbers":
        frame = holdout.assign(px0="a")
        csv = frame.to_csv(index=False).encode()
    elif case == "too big":
        monkeypatch.setattr(samples, "MAX_SAMPLE_BYTES", 2000)
    if case != "not logged":
        _log_file(run_id, "holdout.csv", csv, tmp_path)
    _log_dataset(run_id, mlflow.data.from_pandas(frame, source=source, name="holdout"), "reference")
    version = _register_from_run(scientist, unique_name, run_id)
    assert (version.reference_sample_uri, version.reference_sample_rows) == ("", 0)
    assert version.input_example is not None
    note = version.reference_sample_note
    assert note.startswith("run dataset 'holdout' (context 'reference') not used: "), note
    assert words in note, note
    assert note.endswith("; the input example is used instead")


def test_a_dataset_longer_than_the_row_limit_gives_its_first_rows(scientist, model_archive, unique_name, tmp_path,
                                                                   monkeypatch):

    monkeypatch.setattr(samples, "MAX_SAMPLE_ROWS", 25)
    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    holdout = _digits(40)
    _log_csv(run_id, holdout, "holdout.csv", "reference", tmp_path)
    version = _register_from_run(scientist, unique_name, run_id)
    assert samples.load_sample(version.reference_sample_uri) == holdout.head(25).to_numpy(dtype=float).tolist()
    assert "the first 25 of its 40 rows from" in version.reference_sample_note


def test_a_run_whose_datasets_cannot_be_read_at_all_still_registers(scientist, model_archive, unique_name,
                                                                     monkeypatch):
    run_id = _run_of_an_upload(scientist, unique_name, model_archive)

    def broken(_run_id: str) -> list[Any]:
        raise RuntimeError("the store hiccuped")

    monkeypatch.setattr(mlflow_store, "run_datasets", broken)
    version = _register_from_run(scientist, unique_name, run_id)
    assert version.reference_sample_rows == 0
    assert version.reference_sample_note == ("the run's datasets could not be read (RuntimeError: the store "
                                             "hiccuped); the input example is used instead")


@pytest.mark.parametrize("form", ["runs", "mlflow-artifacts", "missing run"])
def test_a_source_written_as_an_artifact_uri_is_read_from_the_store(scientist, model_archive, unique_name, tmp_path,
                                                                    form):
    """mlflow.data refuses runs:/ and mlflow-artifacts:/ sources, but MlflowClient.log_inputs takes a Dataset
    entity with any source: such a URI is read from the platform's store too."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run_id = _run_of_an_upload(scientist, unique_name, model_archive)
    holdout = _digits(40)
    _log_file(run_id, "holdout.csv", holdout.to_csv(index=False).encode(), tmp_path)
    uri = {"runs": f"runs:/{run_id}/holdout.csv",
           "mlflow-artifacts": f"{mlflow_store.run_artifact_uri(run_id)}/holdout.csv",
           "missing run": "runs:/0123456789abcdef/holdout.csv"}[form]
    entity = Dataset("holdout", run_id[:32], "uri", json.dumps({"uri": uri}), None, json.dumps({"num_rows": 40}))
    mlflow_store.tracking_store().log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context",
                                                                                      "reference")])])
    version = _register_from_run(scientist, unique_name, run_id)
    if form == "missing run":
        assert version.reference_sample_rows == 0
        assert "names run '0123456789abcdef', which does not exist" in version.reference_sample_note
    else:
        assert samples.load_sample(version.reference_sample_uri) == holdout.to_numpy(dtype=float).tolist()
        assert version.reference_sample_note.endswith(f"/{run_id}/artifacts/holdout.csv")
