"""Celery tasks for engine builds: thin, take ids, safe to run twice."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from pipelines import hardware, hil_runner
from pipelines.builder import engine_build_execute
from pipelines.models import BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import (
    BuildError,
    build_enqueue,
    build_transition,
    engine_builds_request,
    hil_enqueue,
    hil_runs_request,
    hil_transition,
)
from registry import locks
from registry.audit import SYSTEM
from registry.errors import TransitionError
from registry.models import ModelVersion, VersionStatus
from registry.services import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)


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


@shared_task(bind=True, acks_late=True)
def hil_run_execute(self, run_id: int) -> str:  # type: ignore[no-untyped-def]
    # Taken from the queue of the run's profile. A database that goes away, or a machine busy measuring
    # another run, is waited out (the run stays waiting, and times out by its deadline).
    try:
        return hil_runner.hil_run_execute(run_id, worker=self.request.hostname or "local")
    except DATABASE_UNAVAILABLE as exc:
        raise self.retry(exc=exc, countdown=2, max_retries=30) from exc
    except hil_runner.MachineBusy as exc:
        raise self.retry(exc=exc, countdown=10, max_retries=None) from exc


@shared_task
def hil_runs_reconcile() -> int:
    """Time out runs that waited past their deadline for a worker; hand back silent running runs that no live
    worker holds (their worker died); send again the message of a waiting run that a live
    worker of its profile should have taken; and plan the runs of kept engines that have none."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.PLATFORM["HIL_STALE_S"])
    healed = 0
    presence = hardware.presences_by_name()  # read once for the whole pass
    for run in HilRun.objects.filter(status=HilStatus.WAITING, wait_deadline__lt=now):
        why = (f"Timed out: no worker of {run.profile} took it within its wait of "
               f"{run.sweep.get('wait_timeout_s', 0):.0f} s"
               + ("" if presence[run.profile].live else "; none has ever announced itself"
                  if presence[run.profile].none_since is None else f"; {presence[run.profile].words()}"))
        try:
            hil_transition(run.pk, HilStatus.TIMED_OUT, only_from={HilStatus.WAITING}, verdict=why)
            healed += 1
        except TransitionError:
            continue
    for run in HilRun.objects.filter(status=HilStatus.RUNNING, heartbeat_at__lt=stale):
        # Silent, and no live worker holds its claim (the database drops a dead worker's at once): a worker
        # still holding it is measuring a long point (every wait in a run is bounded), not to be cut short.
        if locks.claimed_elsewhere("hil.run", run.pk):
            continue
        try:
            hil_transition(run.pk, HilStatus.WAITING, only_from={HilStatus.RUNNING}, worker="")
        except TransitionError:
            continue
        hil_enqueue(run)
        healed += 1
    for run in HilRun.objects.filter(status=HilStatus.WAITING, updated_at__lt=stale):
        if locks.claimed_elsewhere("hil.run", run.pk) or not presence[run.profile].live:
            continue  # held, or nobody to send it to: the message already waits in the profile's queue
        HilRun.objects.filter(pk=run.pk).update(updated_at=now)
        hil_enqueue(run)
        healed += 1
    if settings.PLATFORM["HIL_AUTO"]:
        settled = now - timedelta(seconds=settings.PLATFORM["REDISPATCH_S"])
        unplanned = EngineBuild.objects.filter(status=BuildStatus.SUCCEEDED, hil_runs__isnull=True,
                                               updated_at__lt=settled)
        for build in unplanned.select_related("version__model"):
            try:
                hil_runs_request(SYSTEM, build)
                healed += 1
            except BuildError as exc:
                log.warning("HIL runs of build %s not requested: %s", build.pk, exc)
    return healed
