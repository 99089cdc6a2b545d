"""Celery tasks: thin, take ids, safe to run twice."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

from celery import shared_task
from django.utils import timezone

from registry import services
from registry.mlflow_store import MlflowError
from registry.models import ModelVersion, VersionStatus


@shared_task(bind=True, max_retries=5, acks_late=True)
def version_validate(self, version_id: int) -> str:  # type: ignore[no-untyped-def]
    """Open the version's model in the isolated sandbox (registry.inspection); it becomes ready or
    invalid. The model is never loaded in this process: pickles run code."""
    from registry.archives import uses_pickle
    from registry.inspection import inspect_model

    version = ModelVersion.objects.filter(pk=version_id).first()
    if version is None or version.status != VersionStatus.VALIDATING:
        return "nothing to do"
    try:
        with tempfile.TemporaryDirectory(prefix="inspect-") as tmp:
            model_dir = services.model_download(version, Path(tmp) / "model")
            report = inspect_model(model_dir, unpickles=uses_pickle(version.flavors))
    except OSError as exc:  # artifact store unreachable: try again later, then give up visibly
        if self.request.retries < self.max_retries:
            raise self.retry(exc=exc, countdown=10) from exc
        report = {"ok": False, "error": f"the model's artifacts could not be downloaded: {exc}"}
    except MlflowError as exc:  # the artifacts are not in the platform's store: retrying cannot help
        report = {"ok": False, "error": f"the model's artifacts could not be downloaded: {exc}"}
    ok = bool(report.get("ok"))
    if not ok:
        detail = str(report.get("error", ""))[:4000]
    elif "predict_s" in report:
        detail = "loaded and predicted on its input example in isolation"
    else:
        detail = "loaded in isolation (no input example to predict on)"
    try:
        services.version_transition(version_id, VersionStatus.READY if ok else VersionStatus.INVALID,
                                    detail=detail, inspection=report)
    except services.TransitionError:  # another run of this task (or an archive) got there first
        return "nothing to do"
    return "ready" if ok else "invalid"


@shared_task
def registry_reconcile() -> int:
    """Record MLflow versions the platform missed, and validate again any version whose validation
    message was lost (enqueued after commit, so a broker outage at that moment would strand it)."""
    recorded = services.registry_reconcile()
    stale = timezone.now() - timedelta(minutes=10)
    for version_id in ModelVersion.objects.filter(status=VersionStatus.VALIDATING, updated_at__lt=stale) \
            .values_list("pk", flat=True):
        ModelVersion.objects.filter(pk=version_id).update(updated_at=timezone.now())
        version_validate.delay(version_id)
    return recorded
