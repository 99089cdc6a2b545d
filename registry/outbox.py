"""The outbox: follow-up work recorded with the change that needs it, sent to the broker when it is
reachable. The one way the platform enqueues work caused by a write (validation, engine builds,
rollout steps); periodic tasks and retries inside a worker go straight to Celery.

    outbox_enqueue("registry.tasks.version_validate", [version.pk])   # inside the write's transaction

After commit the message is sent at once (a failure only logs: the change is committed, and the
answer to the request must say so); the dispatcher (`manage.py outbox_dispatcher`, a process of its
own that needs neither beat nor a worker) sends whatever is left as soon as the broker answers again.
Sending twice is possible (a crash between send and delete) and harmless: every task is idempotent.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.db import DatabaseError, transaction
from django.db.models import F

from registry.models import OutboxMessage

log = logging.getLogger(__name__)


def outbox_enqueue(task: str, args: list[Any], queue: str = "") -> None:
    message = OutboxMessage.objects.create(task=task, args=args, queue=queue)
    transaction.on_commit(lambda: outbox_send([message.pk]))


def outbox_send(ids: list[int] | None = None, limit: int = 500) -> int:
    """Send pending messages (these ids, or the oldest `limit`); returns how many the broker took.
    Never raises: a broker or database that is away leaves the rows for the next try."""
    try:
        return _send(ids, limit)
    except DatabaseError as exc:
        log.warning("outbox: database unavailable, will retry: %s", exc)
        return 0


def _send(ids: list[int] | None, limit: int) -> int:
    from config.celery import app

    sent = 0
    with transaction.atomic():
        pending = OutboxMessage.objects.select_for_update(skip_locked=True).order_by("pk")
        if ids is not None:
            pending = pending.filter(pk__in=ids)
        for message in pending[:limit]:
            try:
                app.send_task(message.task, args=message.args, queue=message.queue or None, retry=False)
            except Exception as exc:  # noqa: BLE001 - any broker failure: keep the row, try later
                OutboxMessage.objects.filter(pk=message.pk).update(attempts=F("attempts") + 1,
                                                                   last_error=f"{type(exc).__name__}: {exc}"[:500])
                log.warning("outbox: broker unavailable, %s kept for later: %s", message, exc)
                break
            message.delete()
            sent += 1
    return sent


def nudge(task: str, queue: str = "", expires: float | None = None) -> None:
    """Wake a periodic reconciler early (after a change it should act on soon). Best effort: when the
    broker is away its next periodic run does the same, so nothing is recorded."""
    from config.celery import app

    try:
        app.send_task(task, queue=queue or None, expires=expires, retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker failure
        log.info("could not nudge %s now (%s); its periodic run will", task, exc)


def outbox_dispatch_forever(stop: threading.Event, interval_s: float = 0.5) -> None:
    """The dispatcher's loop: send what is pending, wait a little, again, until `stop` is set."""
    while not stop.is_set():
        try:
            sent = outbox_send()
        except Exception:  # noqa: BLE001 - the loop outlives any one failure
            log.exception("outbox: dispatch pass failed")
            sent = 0
        if not sent:
            stop.wait(interval_s)
