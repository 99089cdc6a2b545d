"""Celery tasks for engine builds: thin, take ids, safe to run twice."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from pipelines.builder import engine_build_execute
from pipelines.models import BuildStatus, EngineBuild
from pipelines.services import build_enqueue, build_transition, engine_builds_request
from registry import locks
from registry.audit import SYSTEM
from registry.errors import TransitionError
from registry.models import ModelVersion, VersionStatus
from registry.services import DATABASE_UNAVAILABLE


@shared_task(bind=True, acks_late=True)
def engine_build_run(self, build_id: int) -> str:  # type: ignore[no-untyped-def]
    # The task id is the claim token: a redelivery (or retry) of this same task may take over its own build.
    # A database that goes away mid-build is waited out, never recorded as the build's failure.
    try:
        return engine_build_execute(build_id, worker=self.request.id or "local")
    except DATABASE_UNAVAILABLE as exc:
        raise self.retry(exc=exc, countdown=2, max_retries=30) from exc


@shared_task
def engine_builds_reconcile() -> int:
    """Requeue running builds that no live worker holds (their worker died; or one silent for
    PLATFORM_BUILD_STALE_S), queued builds whose message was lost, and plan the builds of ready versions
    that have none (the worker died between the version's commit and planning them)."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.PLATFORM["BUILD_STALE_S"])
    redispatch = now - timedelta(seconds=settings.PLATFORM["REDISPATCH_S"])
    healed = 0
    for build in EngineBuild.objects.filter(status=BuildStatus.RUNNING):
        # A running build's worker holds its claim from before it became running until it ends.
        silent = build.heartbeat_at is None or build.heartbeat_at < stale
        if not silent and locks.claimed_elsewhere("build.run", build.pk):
            continue  # a live worker has it, and it is not silent
        try:
            build_transition(build.pk, BuildStatus.QUEUED, only_from={BuildStatus.RUNNING}, step="requeued",
                             claimed_by="")
        except TransitionError:
            continue
        build_enqueue(build.pk, build.target)
        healed += 1
    for build in EngineBuild.objects.filter(status=BuildStatus.QUEUED, updated_at__lt=redispatch):
        if locks.claimed_elsewhere("build.run", build.pk):
            continue
        EngineBuild.objects.filter(pk=build.pk).update(updated_at=now)
        build_enqueue(build.pk, build.target)
        healed += 1
    unplanned = ModelVersion.objects.filter(status=VersionStatus.READY, engine_builds__isnull=True,
                                           updated_at__lt=redispatch)
    for version in unplanned.select_related("model"):
        engine_builds_request(SYSTEM, version)
        healed += 1
    return healed
