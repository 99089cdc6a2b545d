"""Celery tasks for engine builds: thin, take ids, safe to run twice."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from pipelines.builder import engine_build_execute
from pipelines.models import BuildStatus, EngineBuild
from pipelines.services import build_enqueue, build_transition
from registry.services import TransitionError


@shared_task(bind=True, acks_late=True)
def engine_build_run(self, build_id: int) -> str:  # type: ignore[no-untyped-def]
    # The task id is the claim token: a redelivery of this same task may take over its own build.
    return engine_build_execute(build_id, worker=self.request.id or "local")


@shared_task
def engine_builds_reconcile() -> int:
    """Requeue builds whose worker died (no heartbeat) and queued builds whose message was lost."""
    stale = timezone.now() - timedelta(seconds=settings.PLATFORM["BUILD_STALE_S"])
    healed = 0
    for build in EngineBuild.objects.filter(status=BuildStatus.RUNNING, heartbeat_at__lt=stale):
        try:
            build_transition(build.pk, BuildStatus.QUEUED, only_from={BuildStatus.RUNNING}, step="requeued",
                             claimed_by="")
        except TransitionError:
            continue
        build_enqueue(build.pk, build.target)
        healed += 1
    for build in EngineBuild.objects.filter(status=BuildStatus.QUEUED, updated_at__lt=stale):
        EngineBuild.objects.filter(pk=build.pk).update(updated_at=timezone.now())
        build_enqueue(build.pk, build.target)
        healed += 1
    return healed
