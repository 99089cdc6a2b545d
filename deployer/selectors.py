"""Reads of deployments for the API and the UI (one place for each query)."""

from __future__ import annotations

from typing import Any

from deployer.models import ACTIVE_ROLLOUT_STATES, SERVING_ROLLOUT_STATES, AnalysisPoint, Deployment, Endpoint
from registry.models import AuditEvent, ModelVersion, RegisteredModel


def deployments() -> Any:
    """Deployments with everything their views show, in one query."""
    return Deployment.objects.select_related("model", "version", "previous_version", "engine", "requested_by",
                                             "decided_by", "hil_run")


def active_rollout(model: RegisteredModel) -> Deployment | None:
    return Deployment.objects.filter(model=model, status__in=ACTIVE_ROLLOUT_STATES).select_related("version").first()


def deployment_history(d: Deployment) -> Any:
    """The deployment's audit events, oldest first."""
    return AuditEvent.objects.filter(target_type="deployment", target_id=str(d.pk)).order_by("at", "id")


# What an analysis window shows, in the API (PointOut) and in the deployment page's charts.
POINT_FIELDS = ("at", "weight", "outcome", "canary_requests", "canary_error_rate", "canary_p99_ms", "stable_requests",
                "stable_error_rate", "stable_p99_ms")


def recent_points(d: Deployment, limit: int = 300) -> list[AnalysisPoint]:
    """The last `limit` analysis windows (10 minutes at the default tick), oldest first."""
    return list(d.points.order_by("-at")[:limit])[::-1]


def serving_versions() -> list[ModelVersion]:
    """The versions taking traffic: each endpoint's stable version and the canary of a rollout in progress."""
    ids = set(Endpoint.objects.exclude(stable_version=None).values_list("stable_version_id", flat=True))
    ids |= set(Deployment.objects.filter(status__in=SERVING_ROLLOUT_STATES).values_list("version_id", flat=True))
    return list(ModelVersion.objects.filter(pk__in=ids).select_related("model").order_by("model__name", "version"))


def promotion_requests() -> Any:
    """Promotion requests with what their lists and pages show."""
    from deployer.models import PromotionRequest

    return (PromotionRequest.objects.select_related("model", "version__created_by", "deployment", "requested_by")
            .prefetch_related("reviews"))
