"""Celery tasks: thin, take ids, safe to run twice."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from registry import locks, services
from registry.errors import TransitionError
from registry.mlflow_store import MlflowError
from registry.models import ModelVersion, VersionStatus

VALIDATING_ON = "being validated on "  # the status detail a worker writes when it takes a validation


@shared_task(bind=True, max_retries=5, acks_late=True)
def version_validate(self, version_id: int) -> str:  # type: ignore[no-untyped-def]
    """Open the version's model in the isolated sandbox (registry.inspection); it becomes ready or
    invalid. The model is never loaded in this process: pickles run code. A database that goes away
    meanwhile is waited out (a retry in 2 s), never recorded as the model's failure."""
    try:
        with locks.claim("version.validate", version_id) as mine:
            if not mine:
                return "being validated by another worker"
            # Said on the version (people see it), and how the reconciler tells a validation cut off by its
            # worker's death from one still waiting in line: it sends the first again at once.
            ModelVersion.objects.filter(pk=version_id, status=VersionStatus.VALIDATING).update(
                status_detail=f"{VALIDATING_ON}{self.request.hostname or 'a worker'}", updated_at=timezone.now())
            return _validate(self, version_id)
    except services.DATABASE_UNAVAILABLE as exc:
        raise self.retry(exc=exc, countdown=2, max_retries=30) from exc


def _validate(self, version_id: int) -> str:  # type: ignore[no-untyped-def]
    from registry.archives import uses_pickle
    from registry.inspection import inspect_model  # looked up per call: tests stand in for it

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
    except TransitionError:  # another run of this task (or an archive) got there first
        return "nothing to do"
    return "ready" if ok else "invalid"


@shared_task
def registry_reconcile() -> int:
    """Record MLflow versions the platform missed (the web process died between MLflow's write and ours),
    and forget Idempotency-Keys past their 24 hours."""
    from registry.api.idempotency import forget_old

    forget_old()
    return services.registry_reconcile()


@shared_task
def validations_reconcile() -> int:
    """Send again the validation of every `validating` version that no live worker holds and that a
    worker had taken (that worker died mid-task), or that was last sent more than PLATFORM_REDISPATCH_S
    ago (its message was lost with a broker or a worker). A duplicate is harmless: the claim and the
    conditional transition let one run do the work."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.PLATFORM["REDISPATCH_S"])
    sent = 0
    started = Q(status_detail__startswith=VALIDATING_ON)  # a worker took it: no claim now means it died
    for version_id in ModelVersion.objects.filter(Q(updated_at__lt=stale) | started, status=VersionStatus.VALIDATING) \
            .values_list("pk", flat=True):
        if locks.claimed_elsewhere("version.validate", version_id):
            continue
        ModelVersion.objects.filter(pk=version_id).update(updated_at=now, status_detail="")
        version_validate.delay(version_id)
        sent += 1
    return sent
