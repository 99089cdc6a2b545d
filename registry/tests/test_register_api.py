from __future__ import annotations

from pathlib import Path

import pytest

from registry.models import AuditEvent, ModelVersion, VersionOrigin, VersionStatus

pytestmark = pytest.mark.django_db(transaction=True)


def upload(client, name: str, archive: Path, **extra):
    with open(archive, "rb") as fh:
        return client.post(f"/api/v1/models/{name}/versions/", {"archive": fh, **extra}, format="multipart")


def test_uploading_an_archive_registers_a_version_with_its_lineage(scientist, model_archive, unique_name):
    resp = upload(scientist, unique_name, model_archive, description="first cut")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["version"] == 1
    assert body["status"] == VersionStatus.VALIDATING
    assert body["origin"] == VersionOrigin.UPLOAD
    lineage = body["lineage"]
    assert "sklearn" in lineage["flavors"]
    assert lineage["signature"]["inputs"][0]["type"] == "tensor"
    assert lineage["input_example"] is not None
    assert lineage["run_id"]
    assert lineage["storage_location"].startswith("mlflow-artifacts:/")
    assert AuditEvent.objects.filter(action="version.register", target_id=f"{unique_name}/1").count() == 1


def test_second_upload_gets_the_next_version_number(scientist, model_archive, unique_name):
    assert upload(scientist, unique_name, model_archive).json()["version"] == 1
    assert upload(scientist, unique_name, model_archive).json()["version"] == 2
    resp = scientist.get(f"/api/v1/models/{unique_name}/")
    assert resp.json()["latest_version"] == 2
    assert resp.json()["version_count"] == 2


def test_version_list_is_paginated_and_filterable(scientist, model_archive, unique_name):
    for _ in range(3):
        upload(scientist, unique_name, model_archive)
    page = scientist.get(f"/api/v1/models/{unique_name}/versions/?page_size=2").json()
    assert page["count"] == 3
    assert [v["version"] for v in page["results"]] == [3, 2]
    assert page["next"]
    assert scientist.get(f"/api/v1/models/{unique_name}/versions/?status=ready").json()["count"] == 0
    bad = scientist.get(f"/api/v1/models/{unique_name}/versions/?status=nonsense")
    assert bad.status_code == 400
    assert "status" in bad.json()["error"]["message"]


def test_registering_from_a_models_uri_copies_the_source_version(scientist, model_archive, unique_name):
    upload(scientist, unique_name, model_archive)
    other = unique_name + "-copy"
    resp = scientist.post(f"/api/v1/models/{other}/versions/", {"source": f"models:/{unique_name}/1"}, format="json")
    assert resp.status_code == 201, resp.content
    first = ModelVersion.objects.get(model__name=unique_name, version=1)
    copy = ModelVersion.objects.get(model__name=other, version=1)
    assert copy.origin == VersionOrigin.MODEL_URI
    lineage = ("source", "storage_location", "run_id", "experiment_id", "params", "metrics", "run_tags", "flavors",
               "signature", "input_example")
    assert {f: getattr(copy, f) for f in lineage} == {f: getattr(first, f) for f in lineage}
    assert copy.signature and copy.input_example  # the archive has both: copied, not lost


def test_registering_from_a_runs_uri_uses_the_runs_artifacts(scientist, model_archive, unique_name):
    first = upload(scientist, unique_name, model_archive).json()
    run_id = first["lineage"]["run_id"]
    resp = scientist.post(f"/api/v1/models/{unique_name}/versions/", {"source": f"runs:/{run_id}/model"},
                          format="json")
    assert resp.status_code == 201, resp.content
    assert resp.json()["lineage"]["run_id"] == run_id
    assert resp.json()["origin"] == VersionOrigin.RUN_URI


def test_editing_description_and_tags_is_audited_with_before_and_after(scientist, model_archive, unique_name):
    upload(scientist, unique_name, model_archive)
    resp = scientist.patch(f"/api/v1/models/{unique_name}/versions/1/",
                           {"description": "better", "tags": {"team": "vision"}}, format="json")
    assert resp.status_code == 200, resp.content
    assert resp.json()["tags"] == {"team": "vision"}
    event = AuditEvent.objects.get(action="version.update", target_id=f"{unique_name}/1")
    assert event.before["description"] == ""
    assert event.after["description"] == "better"
    assert event.actor_name == scientist.user.username


def test_an_unknown_model_is_a_404_with_a_json_message(scientist):
    resp = scientist.get("/api/v1/models/does-not-exist/")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_the_reconciler_validates_again_a_version_whose_message_was_lost_unless_a_live_worker_holds_it(
        scientist, model_archive, unique_name, monkeypatch, settings):
    from datetime import timedelta

    from django.utils import timezone

    from registry import tasks
    from registry.tests.conftest import held_by_another_worker

    upload(scientist, unique_name, model_archive)
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    quiet_for = timedelta(seconds=settings.PLATFORM["REDISPATCH_S"] + 1)
    ModelVersion.objects.filter(pk=version.pk).update(updated_at=timezone.now() - quiet_for)
    sent = []
    monkeypatch.setattr(tasks.version_validate, "delay", sent.append)
    # A worker on another connection is validating it: left alone however quiet it has been.
    with held_by_another_worker("version.validate", version.pk):
        assert tasks.validations_reconcile() == 0 and sent == []
    # That worker died (its connection ended): sent again, once per quiet period.
    assert tasks.validations_reconcile() == 1 and sent == [version.pk]
    assert tasks.validations_reconcile() == 0 and sent == [version.pk]


def test_a_validation_whose_worker_died_is_sent_again_at_once_not_after_the_redispatch_delay(
        scientist, model_archive, unique_name, monkeypatch):
    from registry import tasks
    from registry.tests.conftest import held_by_another_worker

    upload(scientist, unique_name, model_archive)
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    sent = []
    monkeypatch.setattr(tasks.version_validate, "delay", sent.append)
    assert tasks.validations_reconcile() == 0  # just sent: waiting in line is not lost
    # A worker took it (it says so on the version) and is at work: left alone.
    ModelVersion.objects.filter(pk=version.pk).update(status_detail=f"{tasks.VALIDATING_ON}worker@a")
    with held_by_another_worker("version.validate", version.pk):
        assert tasks.validations_reconcile() == 0
    # Its worker died (the claim went with its connection): sent again now, once.
    assert tasks.validations_reconcile() == 1 and sent == [version.pk]
    assert ModelVersion.objects.get(pk=version.pk).status_detail == ""
    assert tasks.validations_reconcile() == 0 and sent == [version.pk]
