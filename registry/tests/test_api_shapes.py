"""The hand-written read shapes (registry/api/serializers.py) give exactly what DRF would give from the
fields they declare, and the hot reads cost a fixed number of queries whatever the number of versions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers

from registry.api import serializers as s
from registry.models import ModelVersion, RegisteredModel, VersionOrigin, VersionStatus
from registry.roles import Role

pytestmark = pytest.mark.django_db


def drf_default(serializer: serializers.Serializer, instance: Any) -> dict[str, Any]:
    """What DRF's own field-by-field representation gives for the declared fields."""
    return dict(serializers.ModelSerializer.to_representation(serializer, instance))


@pytest.fixture
def model_with_versions(make_user: Any) -> RegisteredModel:
    owner = make_user(Role.DATA_SCIENTIST)
    model = RegisteredModel.objects.create(name="shapes", description="d", tags={"team": "vision"},
                                           created_by=owner, latest_version=2, version_count=2)
    lineage = {"source": "mlflow-artifacts:/1/r/artifacts/model", "storage_location": "mlflow-artifacts:/x",
               "run_id": "r1", "experiment_id": "1", "flavors": {"sklearn": {"v": "1"}},
               "signature": {"inputs": [{"type": "tensor"}]}, "input_example": [[1.5, 2]], "params": {"a": "1"},
               "metrics": {"acc": 0.9}, "run_tags": {"t": "x"}, "reference_sample_uri": "s3://x",
               "reference_sample_rows": 3}
    ModelVersion.objects.create(model=model, version=1, origin=VersionOrigin.UPLOAD, created_by=owner,
                                tags={"k": "v"}, description="one", status_detail="fine",
                                inspection={"ok": True}, **lineage)
    ModelVersion.objects.create(model=model, version=2, origin=VersionOrigin.MLFLOW_CLIENT, created_by=None,
                                status=VersionStatus.READY, source="runs:/r2/model", signature=None,
                                input_example=None)
    # A timestamp with microseconds and one in another time zone: both written as DRF writes them.
    ModelVersion.objects.filter(version=2).update(created_at=datetime(2024, 5, 1, 12, 0, 0, 123456, UTC))
    return model


def test_version_shapes_equal_drfs_own_output(model_with_versions: RegisteredModel) -> None:
    for version in ModelVersion.objects.select_related("model", "created_by").filter(model=model_with_versions):
        out, detail = s.VersionOut(), s.VersionDetailOut()
        assert out.to_representation(version) == drf_default(out, version)
        expected = drf_default(detail, version)
        expected["lineage"] = dict(expected["lineage"])
        assert detail.to_representation(version) == expected
        assert list(detail.to_representation(version)) == list(s.VersionDetailOut.Meta.fields)


def test_model_shape_equals_drfs_own_output(model_with_versions: RegisteredModel, make_user: Any) -> None:
    orphan = RegisteredModel.objects.create(name="orphan")
    for model in (model_with_versions, orphan):
        out = s.ModelOut()
        assert out.to_representation(model) == drf_default(out, model)


def test_when_writes_utc_with_z_like_drf() -> None:
    field = serializers.DateTimeField()
    for value in (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
                  datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))):
        assert s.when(value) == field.to_representation(value)


def test_hot_reads_cost_a_fixed_number_of_queries(model_with_versions: RegisteredModel, scientist: Any) -> None:
    scientist.get("/api/v1/me/")  # the token is looked up once, then remembered for a few seconds
    counts = {}
    for path in ("/api/v1/models/shapes/", "/api/v1/models/shapes/versions/?page_size=50",
                 "/api/v1/models/shapes/versions/1/"):
        with CaptureQueriesContext(connection) as queries:
            assert scientist.get(path).status_code == 200
        counts[path] = len(queries)
    assert counts == {"/api/v1/models/shapes/": 1, "/api/v1/models/shapes/versions/?page_size=50": 2,
                      "/api/v1/models/shapes/versions/1/": 1}


def test_a_missing_version_and_a_missing_model_are_told_apart(model_with_versions: RegisteredModel,
                                                              scientist: Any) -> None:
    assert "no version 9" in scientist.get("/api/v1/models/shapes/versions/9/").json()["error"]["message"]
    assert "'nope'" in scientist.get("/api/v1/models/nope/versions/1/").json()["error"]["message"]


def test_version_list_rows_equal_the_version_shape(model_with_versions: RegisteredModel) -> None:
    from registry import selectors

    rows = selectors.version_rows(model_with_versions.pk)
    versions = list(selectors.version_list(model_with_versions))
    assert [r["version"] for r in rows] == [v.version for v in versions] == [2, 1]
    for row, version in zip(rows, versions, strict=True):
        assert s.version_row("shapes", row) == s.VersionOut().to_representation(version)


def test_version_detail_row_equals_the_version_detail_shape(model_with_versions: RegisteredModel) -> None:
    from registry import selectors

    for version in ModelVersion.objects.select_related("model", "created_by").filter(model=model_with_versions):
        row = selectors.version_detail_row("shapes", version.version)
        assert row is not None
        assert s.version_detail_row(row) == s.VersionDetailOut().to_representation(version)
    assert selectors.version_detail_row("shapes", 3) is None
    assert selectors.version_detail_row("other", 1) is None


def test_version_list_pages_and_filters(model_with_versions: RegisteredModel, scientist: Any) -> None:
    def versions(query: str) -> tuple[int, list[int]]:
        body = scientist.get(f"/api/v1/models/shapes/versions/?{query}").json()
        return body["count"], [v["version"] for v in body["results"]]

    assert versions("page_size=1") == (2, [2])
    assert versions("page_size=1&page=2") == (2, [1])
    assert versions("status=ready") == (1, [2])
    assert versions("origin=upload") == (1, [1])
    assert versions("status=ready&origin=upload") == (0, [])
    assert scientist.get("/api/v1/models/shapes/versions/?page_size=1&page=3").status_code == 404
