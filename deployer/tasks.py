"""Celery tasks of the deployer: thin, idempotent. They run on their own queue ("deployer") so a rollout
never waits behind engine builds."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from deployer.services import rollouts_reconcile as _reconcile


@shared_task(ignore_result=True)
def rollouts_reconcile() -> dict[str, Any]:
    return _reconcile()
