"""Reads of monitoring's settings: a model's policy, with the defaults for a model that has no row."""

from __future__ import annotations

from monitoring.models import MonitorPolicy

DEFAULT_POLICY = MonitorPolicy()


def policy_for(model_id: int) -> MonitorPolicy:
    return MonitorPolicy.objects.filter(model_id=model_id).first() or DEFAULT_POLICY


def policies_for(model_ids: list[int]) -> dict[int, MonitorPolicy]:
    """Each model's policy in one query (DEFAULT_POLICY for those without a row)."""
    found = {p.model_id: p for p in MonitorPolicy.objects.filter(model_id__in=model_ids)}
    return {m: found.get(m, DEFAULT_POLICY) for m in model_ids}
