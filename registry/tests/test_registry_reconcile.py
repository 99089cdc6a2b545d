"""registry_reconcile settles the MLflow versions the platform never recorded: one that a registration
through the platform left behind when it was cut off before the platform's commit is deleted (its caller
got an error or no answer, and may have registered again), but never while a registration of that model
is still open; one an mlflow client wrote to MLflow directly is recorded as `discovered`."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from django.db import connection

from registry import locks, services
from registry import mlflow_store as mlflow
from registry.models import AuditEvent, ModelVersion, VersionOrigin

pytestmark = pytest.mark.django_db(transaction=True)


def _register(scientist, name: str, archive: Path) -> dict:
    with open(archive, "rb") as fh:
        resp = scientist.post(f"/api/v1/models/{name}/versions/", {"archive": fh, "tags": '{"team": "a"}'},
                              format="multipart")
    assert resp.status_code == 201, resp.content
    return resp.json()


def _cut_off_registration(name: str, source: str, run_id: str) -> int:
    """What a web worker killed after MLflow's commit leaves: a marked MLflow version, no platform row."""
    return mlflow.create_model_version(name, source, run_id, "", {"team": "a", mlflow.REGISTRATION_TAG: "api"})


def test_a_registration_writes_its_tags_and_the_platforms_mark_to_mlflow_in_one_insert(scientist, model_archive,
                                                                                       unique_name):
    body = _register(scientist, unique_name, model_archive)
    tag, _ = mlflow.registration_tag_and_run(unique_name, body["version"])
    assert tag == "api"
    assert mlflow.registry_store().get_model_version(unique_name, "1").tags == {
        "team": "a", mlflow.REGISTRATION_TAG: "api"}
    assert body["tags"] == {"team": "a"}  # the platform's own record leaves the mark out


def test_the_platforms_mark_cannot_be_set_by_a_caller(scientist, model_archive, unique_name):
    with open(model_archive, "rb") as fh:
        resp = scientist.post(f"/api/v1/models/{unique_name}/versions/",
                              {"archive": fh, "tags": f'{{"{mlflow.REGISTRATION_TAG}": "x"}}'}, format="multipart")
    assert resp.status_code == 400
    assert mlflow.REGISTRATION_TAG in resp.json()["error"]["message"]
    assert not ModelVersion.objects.filter(model__name=unique_name).exists()


def test_a_cut_off_registration_is_deleted_from_mlflow_and_audited(scientist, model_archive, unique_name):
    first = _register(scientist, unique_name, model_archive)
    lineage = first["lineage"]
    number = _cut_off_registration(unique_name, lineage["storage_location"], "")
    assert number == 2 and sorted(mlflow.version_numbers(unique_name)) == [1, 2]

    assert services.registry_reconcile() >= 1
    assert sorted(mlflow.version_numbers(unique_name)) == [1]
    assert list(ModelVersion.objects.filter(model__name=unique_name).values_list("version", flat=True)) == [1]
    event = AuditEvent.objects.get(action="version.cut_off_deleted", target_id=f"{unique_name}/2")
    assert event.actor_name == "system" and event.before["registered_through"] == "api"
    # the next registration takes the next number: MLflow never gives a deleted version's number again
    assert _register(scientist, unique_name, model_archive)["version"] == 3


def test_a_cut_off_upload_takes_its_upload_run_with_it_but_never_a_run_a_recorded_version_uses(
        scientist, model_archive, unique_name):
    first = _register(scientist, unique_name, model_archive)
    run_id, _, artifact_uri = mlflow.create_upload_run(unique_name)
    _cut_off_registration(unique_name, f"{artifact_uri}/model", run_id)
    _cut_off_registration(unique_name, first["lineage"]["storage_location"], first["lineage"]["run_id"])
    services.registry_reconcile()
    assert sorted(mlflow.version_numbers(unique_name)) == [1]
    assert mlflow.tracking_store().get_run(run_id).info.lifecycle_stage == "deleted"
    assert mlflow.tracking_store().get_run(first["lineage"]["run_id"]).info.lifecycle_stage == "active"


def test_while_a_registration_of_the_model_is_open_its_unrecorded_version_is_left_alone(
        scientist, model_archive, unique_name):
    first = _register(scientist, unique_name, model_archive)
    number = _cut_off_registration(unique_name, first["lineage"]["storage_location"], "")
    params = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in params.items() if k in {"host", "port", "user", "password", "dbname"}},
                         autocommit=False) as other:  # a registration in another process, before its commit
        other.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)",
                      (locks.KINDS["model.register"], locks.name_key(unique_name)))
        services.registry_reconcile()
        assert number in mlflow.version_numbers(unique_name)
        other.rollback()  # it failed (or its worker died): the lock goes with its transaction
    services.registry_reconcile()
    assert number not in mlflow.version_numbers(unique_name)


def test_a_version_an_mlflow_client_wrote_to_mlflow_directly_is_recorded_as_discovered(
        scientist, model_archive, unique_name):
    first = _register(scientist, unique_name, model_archive)
    number = mlflow.create_model_version(unique_name, first["lineage"]["storage_location"], "", "", {"team": "b"})
    services.registry_reconcile()
    found = ModelVersion.objects.get(model__name=unique_name, version=number)
    assert found.origin == VersionOrigin.DISCOVERED and found.tags == {"team": "b"}
