"""Reads of HIL runs for the pages (writes are in pipelines/services.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from django.db.models import QuerySet

from pipelines.models import EngineBuild, HilRun


def hil_runs() -> QuerySet[HilRun]:
    """HIL runs with what their page shows beside them: the engine, its version and model, the champion's engine."""
    return HilRun.objects.select_related("build__version__model", "champion_build__version", "requested_by")


def hil_run_get(run_id: int) -> HilRun | None:
    return hil_runs().filter(pk=run_id).first()


def hil_runs_latest(builds: Iterable[EngineBuild]) -> dict[int, list[HilRun]]:
    """The newest run of each engine on each profile, whatever its state: {build id: runs by profile name}."""
    ids = [b.pk for b in builds]
    latest = (HilRun.objects.filter(build_id__in=ids).order_by("build_id", "profile", "-created_at", "-pk")
              .distinct("build_id", "profile"))
    found: dict[int, list[HilRun]] = defaultdict(list)
    for run in latest:
        found[run.build_id].append(run)
    return dict(found)
