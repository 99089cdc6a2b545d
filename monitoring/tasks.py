"""Monitoring's periodic work (config/settings.py's beat schedule)."""

from __future__ import annotations

from celery import shared_task

from deployer.services import redis_client
from monitoring import alerts, capture, services, slo


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


@shared_task
def alerts_tick() -> int:
    return alerts.alerts_tick()


@shared_task
def slo_tick() -> int:
    """Sample the serving versions' SLO figures at every live gateway and judge their burn rates."""
    from deployer.services import live_gateways

    gateways = [info["metrics"] for info in live_gateways(redis_client()).values() if info.get("metrics")]
    return slo.slo_tick(gateways, services.serving_versions())
