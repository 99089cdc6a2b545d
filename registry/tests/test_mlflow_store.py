"""The platform's registered-model read (one statement, see registry/mlflow_store.py) answers exactly
what MLflow's own store answers, stages, tags, aliases and deleted versions included."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from registry.mlflow_store import registry_store


def as_dict(entity: Any) -> dict[str, Any]:
    """The entity as MLflow's REST API writes it, repeated fields in a stable order."""
    data = MessageToDict(entity.to_proto(), preserving_proto_field_name=True)
    for key in ("tags", "aliases"):
        data[key] = sorted(data.get(key, []), key=str)
    data["latest_versions"] = sorted(
        ({**v, "tags": sorted(v.get("tags", []), key=str)} for v in data.get("latest_versions", [])),
        key=lambda v: int(v["version"]))
    return data


def mlflows_own(store: Any, name: str) -> dict[str, Any]:
    return as_dict(SqlAlchemyStore.get_registered_model(store, name))


def test_the_model_read_equals_mlflows_own_through_stages_tags_aliases_and_deletions(unique_name: str) -> None:
    store = registry_store()
    store.create_registered_model(unique_name, description="read me")
    assert as_dict(store.get_registered_model(unique_name)) == mlflows_own(store, unique_name)  # no versions

    for _ in range(7):
        store.create_model_version(unique_name, "mlflow-artifacts:/0/x/artifacts/model", run_id=None)
    store.set_registered_model_tag(unique_name, RegisteredModelTag("team", "vision"))
    store.set_registered_model_tag(unique_name, RegisteredModelTag("tier", "1"))
    store.set_registered_model_alias(unique_name, "champion", "3")
    store.set_model_version_tag(unique_name, "5", ModelVersionTag("checked", "yes"))
    store.transition_model_version_stage(unique_name, "2", "Production", archive_existing_versions=False)
    store.transition_model_version_stage(unique_name, "5", "Staging", archive_existing_versions=False)
    store.transition_model_version_stage(unique_name, "4", "Archived", archive_existing_versions=False)
    store.delete_model_version(unique_name, "7")  # the newest version is deleted: "None" falls back to 6

    ours = as_dict(store.get_registered_model(unique_name))
    assert ours == mlflows_own(store, unique_name)
    assert {(v["current_stage"], v["version"]) for v in ours["latest_versions"]} == {
        ("None", "6"), ("Production", "2"), ("Staging", "5"), ("Archived", "4")}
    assert ours["aliases"] == [{"alias": "champion", "version": "3"}]


def test_an_unknown_model_is_mlflows_not_found(unique_name: str) -> None:
    with pytest.raises(MlflowException) as raised:
        registry_store().get_registered_model(unique_name)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_a_created_version_is_what_mlflow_then_reads(unique_name: str) -> None:
    store = registry_store()
    store.create_registered_model(unique_name)
    first = store.create_model_version(unique_name, "mlflow-artifacts:/0/x/artifacts/model", run_id=None)
    store.delete_model_version(unique_name, first.version)  # a deleted number is never given again
    created = store.create_model_version(unique_name, "mlflow-artifacts:/0/y/artifacts/model", run_id=None,
                                         tags=[ModelVersionTag("k", "v")], run_link="http://run",
                                         description="second")
    assert (int(first.version), int(created.version)) == (1, 2)
    read = store.get_model_version(unique_name, created.version)
    assert MessageToDict(created.to_proto()) == MessageToDict(read.to_proto())
    assert read.tags == {"k": "v"} and read.description == "second" and read.current_stage == "None"
    assert int(store.get_registered_model(unique_name).last_updated_timestamp) == created.creation_timestamp


def test_creating_a_version_of_an_unknown_model_is_mlflows_not_found(unique_name: str) -> None:
    with pytest.raises(MlflowException) as raised:
        registry_store().create_model_version(unique_name, "mlflow-artifacts:/0/x/artifacts/model")
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"
