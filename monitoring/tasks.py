"""Monitoring's periodic work (config/settings.py's beat schedule) and the sending of webhook deliveries.
The checks that need to know which versions serve and where the gateways are (drift, SLOs) are started by
the deployer's tasks, which know."""

from __future__ import annotations

from celery import shared_task

from monitoring import alerts, capture, events, notify
from registry.kv import redis_client
from registry.services import DATABASE_UNAVAILABLE


@shared_task
def capture_ingest() -> int:
    """Store the rows the gateway sampled since the last pass."""
    return capture.capture_pass(redis_client())


@shared_task
def capture_forget() -> int:
    return capture.forget_old()


@shared_task
def alerts_tick() -> int:
    return alerts.alerts_tick()


@shared_task(bind=True, acks_late=True)
def deliver(self, delivery_id: int) -> str:  # type: ignore[no-untyped-def]
    """One attempt at a webhook delivery (monitoring/notify.py); safe to run twice. A database that goes
    away is waited out (the reconciler also sends whatever is left due)."""
    try:
        return notify.delivery_send(delivery_id)
    except DATABASE_UNAVAILABLE as exc:
        raise self.retry(exc=exc, countdown=2, max_retries=30) from exc


@shared_task
def deliveries_reconcile() -> int:
    """Send again the deliveries due whose message was lost."""
    return notify.deliveries_reconcile()


@shared_task
def events_dispatch() -> int:
    """Tell the receivers what the audit log recorded since the last pass (monitoring/events.py)."""
    return events.events_dispatch()
