"""Reads of the registry. Each query costs the same whatever the number of versions: lists are
paginated in the database and detail views never load all versions."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from registry.models import AuditEvent, ModelVersion, RegisteredModel, VersionStatus
from registry.prepared import Prepared

MODEL_ORDERINGS = {"name", "-name", "updated_at", "-updated_at", "created_at", "-created_at"}


def model_list(search: str = "", tag: str = "", ordering: str = "name") -> QuerySet[RegisteredModel]:
    qs = RegisteredModel.objects.select_related("created_by")
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(description__icontains=search))
    if tag:
        key, sep, value = tag.partition(":")
        qs = qs.filter(**{f"tags__{key}": value}) if sep else qs.filter(tags__has_key=key)
    return qs.order_by(ordering if ordering in MODEL_ORDERINGS else "name")


VERSION_LIST_FIELDS = ("model__name", "version", "status", "status_detail", "origin", "description", "tags",
                       "created_by__username", "created_at", "updated_at")


def version_list(model: RegisteredModel, status: str = "", origin: str = "") -> QuerySet[ModelVersion]:
    """Newest first, with only the columns a list shows (lineage stays in the detail)."""
    qs = ModelVersion.objects.filter(model=model).select_related("model", "created_by").only(*VERSION_LIST_FIELDS)
    if status:
        qs = qs.filter(status=status)
    if origin:
        qs = qs.filter(origin=origin)
    return qs.order_by("-version")


def model_get(name: str) -> RegisteredModel | None:
    return RegisteredModel.objects.select_related("created_by").filter(name=name).first()


VERSION_ROW_FIELDS = ("version", "status", "status_detail", "origin", "description", "tags", "created_by__username",
                      "created_at", "updated_at")
LINEAGE_FIELDS = ("source", "storage_location", "run_id", "experiment_id", "params", "metrics", "run_tags", "flavors",
                  "reference_sample_uri", "reference_sample_rows", "reference_sample_note",
                  "reference_uri", "signature", "input_example")
VERSION_DETAIL_FIELDS = ("model__name", *VERSION_ROW_FIELDS, *LINEAGE_FIELDS, "inspection")


def _model_summary(name: str) -> QuerySet[RegisteredModel, Any]:
    return RegisteredModel.objects.filter(name=name).values("id", "name", "version_count")


def _version_rows(model_id: int, status: str | None, origin: str | None) -> QuerySet[ModelVersion, dict[str, Any]]:
    qs = ModelVersion.objects.filter(model_id=model_id)
    if status is not None:
        qs = qs.filter(status=status)
    if origin is not None:
        qs = qs.filter(origin=origin)
    return qs.order_by("-version").values(*VERSION_ROW_FIELDS)


def _version_detail(model_name: str, number: int) -> QuerySet[ModelVersion, dict[str, Any]]:
    return ModelVersion.objects.filter(model__name=model_name, version=number).values(*VERSION_DETAIL_FIELDS)


def _version_lineage(model_name: str, number: int, archived: str) -> QuerySet[ModelVersion, dict[str, Any]]:
    return ModelVersion.objects.filter(model__name=model_name, version=number).exclude(status=archived) \
        .values(*LINEAGE_FIELDS)


# The API's hot reads, compiled once per process (see registry/prepared.py).
_MODEL_SUMMARY = Prepared(_model_summary)
_VERSION_ROWS = Prepared(_version_rows)
_VERSION_DETAIL = Prepared(_version_detail)
_VERSION_LINEAGE = Prepared(_version_lineage)


def model_summary(name: str) -> dict[str, Any] | None:
    """The model's id, name and version_count: what a version list needs of it."""
    return _MODEL_SUMMARY.first(name)


def version_rows(model_id: int, status: str | None = None, origin: str | None = None, *, offset: int = 0,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """A page of version_list as plain rows of the columns the API's list shows, newest first."""
    return _VERSION_ROWS.rows(model_id, status, origin, offset=offset, limit=limit)


def version_rows_count(model_id: int, status: str | None = None, origin: str | None = None) -> int:
    return _version_rows(model_id, status, origin).count()


def version_detail_row(model_name: str, number: int) -> dict[str, Any] | None:
    """A version with its model's name and its author's username, as one row: one query by the unique
    (model, version) index, whatever the number of versions."""
    return _VERSION_DETAIL.first(model_name, number)


def version_lineage(model_name: str, number: int) -> dict[str, Any] | None:
    """The lineage columns of a version that is not archived: what registering `models:/name/number`
    again copies from it (one indexed query, compiled and planned once)."""
    return _VERSION_LINEAGE.first(model_name, number, VersionStatus.ARCHIVED.value)


def version_get(model: RegisteredModel, number: int) -> ModelVersion | None:
    return ModelVersion.objects.select_related("model", "created_by").filter(model=model, version=number).first()


def version_get_by_name(model_name: str, number: int) -> ModelVersion | None:
    """One query, by the unique (model, version) index, whatever the number of versions."""
    return ModelVersion.objects.select_related("model", "created_by").filter(model__name=model_name,
                                                                             version=number).first()


def version_status_counts(model: RegisteredModel) -> dict[str, int]:
    from django.db.models import Count

    rows = ModelVersion.objects.filter(model=model).values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def audit_list(action: str = "", target: str = "", actor: str = "") -> QuerySet[AuditEvent]:
    qs = AuditEvent.objects.all()
    if action:
        qs = qs.filter(action__startswith=action)
    if target:
        qs = qs.filter(target_id__startswith=target)
    if actor:
        qs = qs.filter(actor_name=actor)
    return qs.order_by("-at", "-id")
