"""Reads of the registry. Each query costs the same whatever the number of versions: lists are
paginated in the database and detail views never load all versions."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from registry.models import AuditEvent, ModelVersion, RegisteredModel

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


def version_rows(model: RegisteredModel, status: str = "", origin: str = "") -> QuerySet[ModelVersion, dict[str, Any]]:
    """version_list as plain rows of the columns the API's list shows (no model instances to build)."""
    return version_list(model, status, origin).values(*VERSION_ROW_FIELDS)


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
