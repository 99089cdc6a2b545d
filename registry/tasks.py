"""Celery tasks: thin, take ids, safe to run twice."""

from __future__ import annotations

import tempfile
from pathlib import Path

from celery import shared_task

from registry import services
from registry.models import ModelVersion, VersionStatus


@shared_task(bind=True, max_retries=5, acks_late=True)
def version_validate(self, version_id: int) -> str:  # type: ignore[no-untyped-def]
    """Open the version's model in the isolated sandbox; it becomes ready or invalid."""
    from registry.inspection import inspect_model

    version = ModelVersion.objects.filter(pk=version_id).first()
    if version is None or version.status != VersionStatus.VALIDATING:
        return "nothing to do"
    try:
        with tempfile.TemporaryDirectory(prefix="inspect-") as tmp:
            model_dir = services.model_dir_for_inspection(version, Path(tmp) / "model")
            report = inspect_model(model_dir)
    except OSError as exc:  # artifact store unreachable: try again later
        raise self.retry(exc=exc, countdown=10) from exc
    if report.get("ok"):
        services.version_transition(version_id, VersionStatus.READY, detail="loaded and predicted in isolation",
                                    inspection=report)
        return "ready"
    services.version_transition(version_id, VersionStatus.INVALID, detail=str(report.get("error", ""))[:4000],
                                inspection=report)
    return "invalid"


@shared_task
def registry_reconcile() -> int:
    return services.registry_reconcile()
