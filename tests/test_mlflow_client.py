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
        mlflow.sklearn.log_model(model, name="model", input_example=X[:3], registered_model_name=unique_name)
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
