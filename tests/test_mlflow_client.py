"""The unmodified mlflow client, pointed at the platform, logs, registers and downloads models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from registry.models import AuditEvent, ModelVersion, VersionOrigin
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def mlflow_as(platform_server, make_user, token_for, monkeypatch) -> Iterator:
    import mlflow

    def configure(*roles: str) -> object:
        user = make_user(*roles)
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token_for(user))
        mlflow.set_tracking_uri(platform_server)
        return user

    yield configure
    mlflow.set_tracking_uri(None)


def _train():
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y), X


def test_a_model_logged_with_the_mlflow_client_is_recorded_with_its_lineage(mlflow_as, unique_name):
    import mlflow
    import mlflow.sklearn

    user = mlflow_as(Role.DATA_SCIENTIST)
    model, X = _train()
    mlflow.set_experiment(f"exp-{unique_name}")
    with mlflow.start_run() as run:
        mlflow.log_param("max_iter", 500)
        mlflow.log_metric("train_accuracy", 0.97)
        mlflow.sklearn.log_model(model, name="model", input_example=X[:3], registered_model_name=unique_name,
                                 pip_requirements=["scikit-learn"])  # no inference: 25 s on a busy machine
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert version.origin == VersionOrigin.MLFLOW_CLIENT
    assert version.run_id == run.info.run_id
    assert version.params == {"max_iter": "500"}
    assert version.metrics == {"train_accuracy": 0.97}
    assert "sklearn" in version.flavors
    assert version.signature is not None and version.input_example is not None
    assert version.created_by == user
    assert AuditEvent.objects.filter(action="version.register", via="mlflow", target_id=f"{unique_name}/1").exists()
    # MLflow's copy is marked as registered through the platform (see registry_reconcile); the platform's is not.
    mv = mlflow.MlflowClient().get_model_version(unique_name, "1")
    assert mv.tags.get("platform.registration") == "mlflow-client"
    assert "platform.registration" not in version.tags

    # and the plain client loads it back through the artifact proxy
    loaded = mlflow.sklearn.load_model(f"models:/{unique_name}/1")
    assert np.array_equal(loaded.predict(X[:10]), model.predict(X[:10]))


def test_the_mlflow_api_refuses_requests_without_a_valid_token(platform_server):
    import requests

    resp = requests.get(f"{platform_server}/api/2.0/mlflow/registered-models/search", timeout=10)
    assert resp.status_code == 401
    assert "MLFLOW_TRACKING_TOKEN" in resp.json()["message"]
    resp = requests.get(f"{platform_server}/api/2.0/mlflow/registered-models/search",
                        headers={"Authorization": "Bearer mlp_not-a-real-token"}, timeout=10)
    assert resp.status_code == 401


def test_an_oncall_token_can_read_but_not_log_through_the_mlflow_api(mlflow_as, unique_name):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow_as(Role.ONCALL)
    mlflow.search_registered_models()  # reading is allowed
    with pytest.raises(MlflowException, match="do not allow"):
        mlflow.MlflowClient().create_registered_model(unique_name)
    assert not ModelVersion.objects.filter(model__name=unique_name).exists()


def test_the_mlflow_api_refuses_a_version_whose_source_is_outside_the_artifact_store(mlflow_as, unique_name,
                                                                                    tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow_as(Role.DATA_SCIENTIST)
    client = mlflow.MlflowClient()
    client.create_registered_model(unique_name)
    with pytest.raises(MlflowException, match="outside the platform's artifact store"):
        client.create_model_version(unique_name, f"file://{tmp_path}", run_id=None)
    assert not ModelVersion.objects.filter(model__name=unique_name).exists()


def test_the_mlflow_api_refuses_model_names_the_platform_cannot_address(mlflow_as):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow_as(Role.DATA_SCIENTIST)
    with pytest.raises(MlflowException, match="invalid model name"):
        mlflow.MlflowClient().create_registered_model("has/slash and space")


def test_basic_auth_with_username_and_password_works_for_the_mlflow_client(platform_server, make_user,
                                                                          monkeypatch, unique_name):
    import mlflow

    make_user(Role.DATA_SCIENTIST, username=f"ds-{unique_name}", password="correct horse battery")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", f"ds-{unique_name}")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "correct horse battery")
    mlflow.set_tracking_uri(platform_server)
    try:
        mlflow.MlflowClient().create_registered_model(unique_name)
    finally:
        mlflow.set_tracking_uri(None)
    assert AuditEvent.objects.filter(action="model.create", target_id=unique_name, via="mlflow").exists()
    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)


def test_deleting_a_version_with_the_mlflow_client_archives_it_in_the_platform(mlflow_as, make_user, unique_name,
                                                                              model_archive):
    import mlflow

    from registry.audit import SYSTEM
    from registry.models import VersionStatus
    from registry.services import version_register_from_archive

    version_register_from_archive(SYSTEM, unique_name, model_archive)
    mlflow_as(Role.ADMIN)
    mlflow.MlflowClient().delete_model_version(unique_name, "1")
    assert ModelVersion.objects.get(model__name=unique_name, version=1).status == VersionStatus.ARCHIVED
    # the number is not reused
    assert version_register_from_archive(SYSTEM, unique_name, model_archive).version == 2


def test_a_dataset_logged_with_the_models_run_becomes_its_reference_set(mlflow_as, unique_name, tmp_path):
    """The convention the README gives: the rows logged as an artifact of the run, and a dataset whose source
    is that file, logged with context "reference". The first engine build turns them into the reference set."""
    import json
    import tempfile
    from pathlib import Path

    import mlflow
    import mlflow.data
    import mlflow.sklearn
    import pandas as pd

    from pipelines.builder import engine_build_execute
    from pipelines.models import BuildStatus, EngineBuild
    from registry import mlflow_store, samples
    from registry.models import VersionStatus
    from registry.services import version_transition

    mlflow_as(Role.DATA_SCIENTIST)
    model, X = _train()
    holdout = pd.DataFrame(X[::3], columns=[f"f{i}" for i in range(X.shape[1])])
    path = tmp_path / "holdout.csv"
    holdout.to_csv(path)  # pandas' default, its index first
    mlflow.set_experiment(f"exp-{unique_name}")
    with mlflow.start_run():
        mlflow.log_artifact(str(path))
        mlflow.log_input(mlflow.data.from_pandas(holdout, source=str(path), name="holdout"), context="reference")
        mlflow.sklearn.log_model(model, name="model", input_example=X[:3], registered_model_name=unique_name,
                                 pip_requirements=["scikit-learn"])  # no inference: 25 s on a busy machine
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert version.origin == VersionOrigin.MLFLOW_CLIENT
    assert version.reference_sample_rows == len(holdout) == 60
    assert samples.load_sample(version.reference_sample_uri) == holdout.to_numpy(dtype=float).tolist()
    assert version.reference_sample_note.startswith("run dataset 'holdout' (context 'reference'): 60 rows from ")

    # Validation is tested elsewhere; granted here, so the builds are planned.
    version = version_transition(version.pk, VersionStatus.READY, detail="granted by the test")
    fp32 = EngineBuild.objects.get(version=version, precision="fp32")
    assert engine_build_execute(fp32.pk, "test-worker") == BuildStatus.SUCCEEDED
    version.refresh_from_db()
    folder, _, name = version.reference_uri.rpartition("/")
    reference = json.loads(mlflow_store.read_artifact_text(folder, name) or "{}")
    # the rows as the engine takes them (its input is float32), each with the original model's prediction
    assert np.array_equal(np.asarray(reference["rows"], dtype=np.float32), holdout.to_numpy(dtype=np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        original = mlflow.sklearn.load_model(str(mlflow_store.download_model(version.storage_location, Path(tmp))))
    assert reference["prediction"] == original.predict(holdout.to_numpy()).tolist()


def test_a_dataset_the_platform_cannot_read_leaves_the_input_example_with_the_reason(mlflow_as, unique_name):
    import mlflow
    import mlflow.data
    import mlflow.sklearn
    import pandas as pd

    from pipelines.builder import sample_rows

    mlflow_as(Role.DATA_SCIENTIST)
    model, X = _train()
    mlflow.set_experiment(f"exp-{unique_name}")
    with mlflow.start_run():
        # Rows that live only on a web server: the platform, air-gapped, never fetches them.
        mlflow.log_input(mlflow.data.from_pandas(pd.DataFrame(X[::3]), source="https://example.com/holdout.csv",
                                                 name="holdout"), context="reference")
        mlflow.sklearn.log_model(model, name="model", input_example=X[:3], registered_model_name=unique_name,
                                 pip_requirements=["scikit-learn"])  # no inference: 25 s on a busy machine
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert (version.reference_sample_uri, version.reference_sample_rows) == ("", 0)
    assert version.reference_sample_note.startswith(
        "run dataset 'holdout' (context 'reference') not used: its source 'https://example.com/holdout.csv' "
        "(http) is outside the platform's artifact store")
    assert version.reference_sample_note.endswith("; the input example is used instead")
    assert sample_rows(version) == X[:3].tolist()
    event = AuditEvent.objects.get(action="version.register", target_id=f"{unique_name}/1")
    assert event.after["reference_sample"] == version.reference_sample_note
