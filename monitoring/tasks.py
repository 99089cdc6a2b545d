"""Monitoring's periodic work (config/settings.py's beat schedule)."""

from __future__ import annotations

from celery import shared_task

from deployer.services import redis_client
from monitoring import capture, services


@shared_task
def capture_ingest() -> int:
    """Store the rows the gateway sampled since the last pass."""
    return capture.capture_pass(redis_client())


@shared_task
def capture_forget() -> int:
    return capture.forget_old()


@shared_task
def drift_checks() -> int:
    return services.drift_checks()
