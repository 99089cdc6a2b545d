"""Outbound events: what happened in the platform, told to the receivers that subscribe to it.

Every change is already recorded once, in the transaction that made it: the audit log (registry/audit.py,
the lifecycle mechanism's "<prefix>.<state>" rows). The dispatcher reads that log past its cursor, in id
order, turns the rows that are public events (ACTIONS) into the payload below, and records a delivery for
each subscribed receiver through notify's mechanism (signed, retried, logged; monitoring/notify.py). Lower
apps (registry, pipelines) stay unaware of it, and so does the deployer above: nothing calls the
dispatcher but its periodic task (monitoring.tasks.events_dispatch, every 5 s: config/settings.py).

    {"event": "rollout.promoted", "at": "<the audit row's time, ISO 8601>", "model": "digits", "version": 3,
     "actor": "alice", "summary": "digits v3 promoted: ...", "url": "<platform page>", "detail": {<row's after>}}

Exactly once per audit row and receiver:
- a pass is one transaction that holds the cursor row (SELECT ... FOR UPDATE SKIP LOCKED): a second
  dispatcher finds it held and leaves at once, and a dispatcher that crashes mid-pass rolls back its
  deliveries with its cursor move, so the next pass does that work again, once;
- each dispatched row is marked (DispatchedEvent, unique audit id) in that transaction, and each delivery's
  webhook-id is derived from the audit row and the receiver (unique): even a pass that somehow ran beside
  another could not record a row twice.

Rows committed late (the id gap): ids come from a sequence when the row is inserted, but a transaction that
took id 100 may commit after one that took 101; a cursor moved to 101 on seeing it would skip 100 forever.
So the cursor only moves past rows older than SETTLE, and each pass scans everything above the cursor again
(catalogue actions only, minus the rows marked dispatched): a row committed late but within SETTLE of being
written is found by the next pass. A transaction that commits more than SETTLE after writing its audit row
would be missed; the platform's write transactions last milliseconds to seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from monitoring import notify
from monitoring.models import DispatchedEvent, EventCursor, Receiver
from pipelines.models import EngineBuild, HilRun
from registry.models import AuditEvent, ModelVersion

log = logging.getLogger("monitoring.events")

CURSOR = "events"
SETTLE = timedelta(minutes=2)  # how long a transaction may take to commit after writing its audit row
BATCH = 500  # audit rows per pass (a pass is one transaction: kept short)

# Audit action -> public event type (notify.EVENT_TYPES). "deployment.progressing" is decided by the row
# (started or advanced, see _event_type_of). The alert events are not here: monitoring/alerts.py notifies
# them itself, in the transaction that raised or resolved the alert (with the silences applied).
ACTIONS: dict[str, str] = {
    "version.register": "version.registered",
    "version.ready": "version.validated",
    "build.succeeded": "engine.built",
    "hil.passed": "hil.passed",
    # every end of a HIL run that is not a pass: measured and missed (failed), no verdict possible
    # (unstable), not measurable (error), no worker came (timed_out); detail.status says which
    "hil.failed": "hil.failed",
    "hil.unstable": "hil.failed",
    "hil.error": "hil.failed",
    "hil.timed_out": "hil.failed",
    "deployment.progressing": "canary.*",
    "deployment.promoted": "rollout.promoted",
    "deployment.rolled_back": "rollout.rolled_back",
    # promotion requests (deployer): target "promotion", after {"model", "version", "deployment", ...}
    "promotion.requested": "promotion.requested",
    "promotion.approved": "promotion.approved",
    "promotion.rejected": "promotion.rejected",
    "promotion.break_glass": "promotion.break_glass",
    # who approves, and what is protected, changed (administrators; target the registered model)
    "promotion_policy.update": "promotion.policy_changed",
}


@dataclass(frozen=True)
class Subject:
    """What an audit row is about: the model and version, and the platform page that shows it."""

    model: str | None
    version: int | None
    path: str  # "/deployments/5/"; "" when there is no page

    @property
    def words(self) -> str:
        if self.model is None:
            return "an unknown model"
        return f"{self.model} v{self.version}" if self.version is not None else self.model


def _version_path(model: str | None, version: int | None) -> str:
    return f"/models/{model}/versions/{version}/" if model and version is not None else \
        f"/models/{model}/" if model else ""


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _of_version(version: ModelVersion | None, path: str) -> Subject:
    return Subject(version.model.name, version.version, path) if version else Subject(None, None, "")


def subject_of(row: AuditEvent) -> Subject:
    """The row's model and version, from the row where it says them, else from the thing it names."""
    after = row.after or {}
    pk = _int(row.target_id) or 0  # of a target named by its id (no row has id 0)
    if row.target_type == "model_version":  # target id "<model>/<number>"
        name, _, number = row.target_id.rpartition("/")
        return Subject(name or None, _int(number), _version_path(name, _int(number)))
    if row.target_type == "promotion":
        model = str(after["model"]) if after.get("model") else None
        version = _int(after.get("version"))
        return Subject(model, version, f"/approvals/{pk}/")  # the request's page, with its evidence
    if row.target_type == "registered_model":  # target id the model's name
        return Subject(row.target_id, None, f"/models/{row.target_id}/")
    if row.target_type == "engine_build":
        build = EngineBuild.objects.select_related("version__model").filter(pk=pk).first()
        v = build.version if build else None
        return _of_version(v, _version_path(v.model.name, v.version) if v else "")
    if row.target_type == "hil_run":
        run = HilRun.objects.select_related("build__version__model").filter(pk=pk).first()
        return _of_version(run.build.version if run else None, f"/hil/{pk}/")
    if row.target_type == "deployment":
        if after.get("model") and _int(after.get("version")) is not None:  # the deployer's rows say both
            return Subject(str(after["model"]), _int(after.get("version")), f"/deployments/{pk}/")
        # Older rows: the deployment is reached through the version's reverse relation (a query), never by
        # importing the deployer, which sits above monitoring.
        found = ModelVersion.objects.select_related("model").filter(deployments=pk).first()
        return _of_version(found, f"/deployments/{pk}/")
    return Subject(str(after["model"]) if after.get("model") else None, _int(after.get("version")), "")


def _event_type_of(row: AuditEvent) -> str | None:
    event = ACTIONS.get(row.action)
    if event != "canary.*":
        return event
    before, after = row.before or {}, row.after or {}
    if before.get("status") == "pending":  # the canary was loaded and takes its first step
        return "canary.started"
    if before.get("status") == "progressing" and before.get("step") != after.get("step"):
        return "canary.advanced"
    return None  # resumed after a pause, or a step extended: no traffic moved


def _percent(value: Any) -> str:
    return f"{value:g}%" if isinstance(value, int | float) else "?%"


def summary_of(event: str, row: AuditEvent, subject: Subject) -> str:
    """The event in words, for people (the Slack message's header)."""
    after, who, it = row.after or {}, row.actor_name, subject.words
    reason = f": {after['reason']}" if after.get("reason") else ""
    target = f"{row.target_type.replace('_', ' ')} {row.target_id}"
    words = {
        "version.registered": f"{it} registered by {who}",
        "version.validated": f"{it} passed validation and is ready",
        "engine.built": f"{it}: engine {after.get('variant', '?')} built and kept ({target})",
        "hil.passed": f"{it}: HIL run {row.target_id} passed ({after.get('variant', '?')} on "
                      f"{after.get('profile', '?')})",
        "hil.failed": f"{it}: HIL run {row.target_id} ended {after.get('status', 'failed')} "
                      f"({after.get('variant', '?')} on {after.get('profile', '?')})",
        "canary.started": f"{it}: canary started with {_percent(after.get('weight'))} of traffic "
                          f"(deployment {row.target_id})",
        "canary.advanced": f"{it}: canary moved to step {(_int(after.get('step')) or 0) + 1}, "
                           f"{_percent(after.get('weight'))} of traffic (deployment {row.target_id})",
        "rollout.promoted": f"{it} promoted: it serves all traffic (deployment {row.target_id}){reason}",
        "rollout.rolled_back": f"{it} rolled back (deployment {row.target_id}){reason}",
        "promotion.requested": f"promotion of {it} requested by {after.get('requested_by') or who}",
        "promotion.approved": f"promotion of {it} approved by {', '.join(after.get('approvers') or [who])}",
        "promotion.policy_changed": f"{it}: promotion policy changed by {who}: "
                                    + ", ".join(f"{k} {v}" for k, v in after.items()),
        "promotion.rejected": f"promotion of {it} rejected by {who}",
        "promotion.break_glass": f"promotion of {it} forced by {who} without approval (break glass)",
    }
    return words.get(event, f"{event}: {it}")


def payload_of(event: str, row: AuditEvent, subject: Subject) -> dict[str, Any]:
    return notify.event_payload(event, row.at, model=subject.model, version=subject.version, actor=row.actor_name,
                                summary=summary_of(event, row, subject), path=subject.path, detail=row.after or {})


def event_id_for(audit_id: int, receiver: Receiver) -> str:
    """The delivery's webhook-id: one audit row, one receiver, one id (Delivery.event_id is unique)."""
    return f"msg_audit{audit_id}_r{receiver.pk}"


def _cursor() -> None:
    """The cursor row exists (the migration makes it, starting at the end of the log it found; one lost
    since, as a test database's flush loses it, starts from the beginning)."""
    EventCursor.objects.get_or_create(name=CURSOR, defaults={"last_id": 0})


def _dispatch(row: AuditEvent) -> int:
    """The row's deliveries and its mark, in the pass's transaction; how many deliveries."""
    event = _event_type_of(row)
    if event is None:
        return 0
    subject = subject_of(row)
    with transaction.atomic():  # a savepoint: a row marked by another pass meanwhile is left to that one
        deliveries = notify.notify(event, payload_of(event, row, subject), model=subject.model,
                                   event_id=lambda receiver: event_id_for(row.pk, receiver))
        DispatchedEvent.objects.create(audit_id=row.pk, event_type=event, deliveries=len(deliveries))
    return len(deliveries)


def events_dispatch(limit: int = BATCH) -> int:
    """One pass: the audit rows past the cursor that are events, dispatched in id order; returns how many
    deliveries it recorded. Safe to run anywhere, any number of times, at once (see the module's notes)."""
    _cursor()
    with transaction.atomic():
        cursor = EventCursor.objects.select_for_update(skip_locked=True).filter(name=CURSOR).first()
        if cursor is None:
            return 0  # another pass holds it
        # Read before the rows: what the cursor may move past is settled whatever commits meanwhile.
        settled = AuditEvent.objects.filter(pk__gt=cursor.last_id, at__lt=timezone.now() - SETTLE).aggregate(
            last=Max("pk"))["last"]
        marked = DispatchedEvent.objects.filter(audit_id__gt=cursor.last_id).values("audit_id")
        rows = list(AuditEvent.objects.filter(pk__gt=cursor.last_id, action__in=ACTIONS).exclude(pk__in=marked)
                    .order_by("pk")[:limit])
        sent = 0
        for row in rows:
            try:
                sent += _dispatch(row)
            except IntegrityError:  # marked by a pass that ran beside this one: it delivered the row
                continue
            except (LookupError, TypeError, ValueError):  # a row of a shape nobody expected: told nobody,
                # marked so that it is not tried again at every pass (and the log says so once)
                log.exception("audit row %s (%s) could not be told as an event; skipped", row.pk, row.action)
                DispatchedEvent.objects.create(audit_id=row.pk, event_type="unreadable")
        if settled is not None:
            # A full batch may have left events above its last row: the cursor stays below them.
            upto = min(settled, rows[-1].pk) if len(rows) == limit else settled
            if upto > cursor.last_id:
                EventCursor.objects.filter(pk=cursor.pk).update(last_id=upto, updated_at=timezone.now())
                DispatchedEvent.objects.filter(audit_id__lte=upto).delete()  # below the cursor: never scanned
    return sent
