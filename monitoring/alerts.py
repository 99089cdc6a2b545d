"""Alerts: a condition on a serving version that needs a person (drift, an SLO burning), with its evidence
in words and figures, an owner and a runbook.

One open alert per fingerprint (model, version, kind): a condition seen again updates the open alert's
evidence rather than raising another. Lifecycle (registry/lifecycle.py): firing -> acknowledged ->
resolved, firing -> resolved; resolved is final, and the condition coming back raises a new alert. An
alert resolves by itself once its condition has been clear for PLATFORM_ALERT_RESOLVE_AFTER_S; a firing one
nobody acknowledged is notified again every PLATFORM_ALERT_RENOTIFY_S; a silenced one notifies no one
until its silence ends. Every notification goes to the receivers (monitoring/notify.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from monitoring import notify
from monitoring.models import ALERT_TRANSITIONS, Alert, AlertKind, AlertStatus
from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import RegistryError
from registry.lifecycle import Lifecycle
from registry.models import ModelVersion

MAX_SILENCE = timedelta(days=7)

RUNBOOKS = {
    AlertKind.DRIFT: (
        "1. Open the drift check's report: which inputs moved, by how much, and did the predictions move "
        "with them?\n"
        "2. Ask the owners of the upstream data whether a change explains it (units, a new source, a bug, a "
        "new population).\n"
        "3. If the model's answers are wrong for the new data: roll back to the previous champion (the button "
        "on this page), or retrain on recent data and register the new version.\n"
        "4. If the shift is real and harmless, say so in the resolution and resolve; it fires again if the "
        "window drifts further."),
    AlertKind.LATENCY: (
        "1. Look at the latency chart: is it this version only (compare the other versions on the fleet) or "
        "the whole node?\n"
        "2. Check the fleet's nodes (CPU, memory, a node restarting) and the request sizes (batch sizes grow?).\n"
        "3. If this version is slower than the one before it: roll back to the previous champion.\n"
        "4. Otherwise add capacity or lower the load, and resolve once the burn rate is back under 1."),
    AlertKind.ERRORS: (
        "1. Look at the errors: their status codes and the gateway's and Triton's logs for this version.\n"
        "2. Client errors (4xx) after a change in callers: tell them; server errors (5xx): check the Triton "
        "nodes and the engine.\n"
        "3. If this version fails where the one before it did not: roll back to the previous champion.\n"
        "4. Resolve once the error budget stops burning."),
}


def _view(alert: Alert) -> dict[str, Any]:
    return {"status": alert.status, "fingerprint": alert.fingerprint}


ALERTS: Lifecycle[Alert] = Lifecycle(
    Alert, ALERT_TRANSITIONS, action="alert", target_type="alert", target_id=lambda a: a.pk,
    describe=lambda a: f"alert {a.pk} ({a.fingerprint})", view=_view, related=("model", "version"),
    stamps={"resolved_at": {AlertStatus.RESOLVED}})


def fingerprint(version: ModelVersion, kind: str) -> str:
    return f"{version.model.name}:{version.version}:{kind}"


def _setting(name: str) -> float:
    return float(settings.PLATFORM[name])


def _runbook(version: ModelVersion, kind: str) -> str:
    """The model's own runbook for this kind (tag `runbook.<kind>`), else the platform's."""
    tags = {**version.model.tags, **version.tags}
    return str(tags.get(f"runbook.{kind}") or RUNBOOKS[AlertKind(kind)])


def _notify(alert: Alert, event_type: str, actor: Actor = SYSTEM) -> None:
    """Tell the receivers subscribed to the event and the alert's model (in this transaction: nothing is sent
    for a change that rolls back). The payload has the events' common fields (monitoring/events.py) besides
    the alert's own."""
    if alert.silenced_until and alert.silenced_until > timezone.now() and event_type != "alert.resolved":
        return
    detail = {"id": alert.pk, "fingerprint": alert.fingerprint, "kind": alert.kind, "status": alert.status,
              "model": alert.model.name, "version": alert.version.version, "evidence": alert.evidence,
              "first_seen_at": alert.first_seen_at.isoformat(), "last_seen_at": alert.last_seen_at.isoformat(),
              "owner": alert.owner.get_username() if alert.owner else None}
    notify.notify(event_type, notify.event_payload(
        event_type, timezone.now(), model=alert.model.name, version=alert.version.version, actor=actor.name,
        summary=alert.title, path=f"/alerts/{alert.pk}/", detail=detail,
        title=alert.title, text=alert.summary, severity=alert.severity, alert=detail), model=alert.model.name)
    Alert.objects.filter(pk=alert.pk).update(last_notified_at=timezone.now())


def alert_seen(version: ModelVersion, kind: str, title: str, summary: str, evidence: dict[str, Any],
               severity: str = "page") -> Alert:
    """The condition holds now: raise an alert, or refresh the open one's evidence."""
    key = fingerprint(version, kind)
    now = timezone.now()
    with transaction.atomic():
        current = Alert.objects.select_for_update().filter(fingerprint=key).exclude(
            status=AlertStatus.RESOLVED).first()
        if current is None:
            try:
                with transaction.atomic():
                    current = Alert.objects.create(
                        fingerprint=key, model=version.model, version=version, kind=kind, severity=severity,
                        title=title, summary=summary, evidence=evidence, runbook=_runbook(version, kind),
                        last_seen_at=now)
            except IntegrityError:  # raised by another pass a moment ago: that one is the alert
                current = Alert.objects.select_for_update().get(fingerprint=key, status__in=[
                    AlertStatus.FIRING, AlertStatus.ACKNOWLEDGED])
            else:
                audit_record(SYSTEM, "alert.firing", "alert", current.pk, after={"fingerprint": key, "title": title,
                                                                                 "summary": summary[:500]})
                _notify(current, "alert.firing")
                return current
        Alert.objects.filter(pk=current.pk).update(title=title, summary=summary, evidence=evidence,
                                                   last_seen_at=now, clear_since=None)
    current.refresh_from_db()
    return current


def alert_clear(version: ModelVersion, kind: str) -> Alert | None:
    """The condition does not hold now: an open alert resolves once it has been clear long enough."""
    now = timezone.now()
    current = Alert.objects.filter(fingerprint=fingerprint(version, kind)).exclude(
        status=AlertStatus.RESOLVED).first()
    if current is None:
        return None
    if current.clear_since is None:
        Alert.objects.filter(pk=current.pk, clear_since=None).update(clear_since=now)
        return current
    if now - current.clear_since < timedelta(seconds=_setting("ALERT_RESOLVE_AFTER_S")):
        return current
    minutes = (now - current.clear_since).total_seconds() / 60
    with transaction.atomic():
        done = ALERTS.move(current.pk, AlertStatus.RESOLVED, SYSTEM, resolution=(
            f"resolved by itself: its condition has been clear for {minutes:.0f} min "
            f"(since {current.clear_since:%Y-%m-%d %H:%M:%S} UTC)"))
        _notify(done, "alert.resolved")
    return done


def alert_acknowledge(actor: Actor, alert_id: int) -> Alert:
    """Someone has it: they become its owner, and it is not notified again."""
    with transaction.atomic():
        done = ALERTS.move(alert_id, AlertStatus.ACKNOWLEDGED, actor, owner=actor.user_or_none)
        _notify(done, "alert.acknowledged", actor)
    return done


def alert_resolve(actor: Actor, alert_id: int, resolution: str = "") -> Alert:
    with transaction.atomic():
        done = ALERTS.move(alert_id, AlertStatus.RESOLVED, actor, note={"resolution": resolution[:500]},
                           resolution=resolution.strip() or f"resolved by {actor.name}")
        _notify(done, "alert.resolved", actor)
    return done


def alert_silence(actor: Actor, alert_id: int, until: datetime, reason: str) -> Alert:
    """No notifications for the alert until then (at most MAX_SILENCE ahead); the alert stays open."""
    now = timezone.now()
    if until <= now:
        raise RegistryError(f"a silence must end in the future, not at {until.isoformat()}")
    if until - now > MAX_SILENCE:
        raise RegistryError(f"a silence lasts at most {MAX_SILENCE.days} days; renew it when it ends")
    if not reason.strip():
        raise RegistryError("say why the alert is silenced (reason)")
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert_id)
        if alert.status == AlertStatus.RESOLVED:
            raise RegistryError(f"alert {alert_id} is resolved; there is nothing to silence", 409)
        before = {"silenced_until": alert.silenced_until.isoformat() if alert.silenced_until else None}
        Alert.objects.filter(pk=alert_id).update(silenced_until=until, silence_reason=reason.strip())
        audit_record(actor, "alert.silence", "alert", alert_id, before=before,
                     after={"silenced_until": until.isoformat(), "reason": reason.strip()[:500]})
    alert.refresh_from_db()
    return alert


def alerts_tick() -> int:
    """Notify again the firing alerts nobody acknowledged; returns how many."""
    due = timezone.now() - timedelta(seconds=_setting("ALERT_RENOTIFY_S"))
    sent = 0
    for alert in Alert.objects.filter(status=AlertStatus.FIRING, last_notified_at__lt=due).select_related(
            "model", "version", "owner"):
        with transaction.atomic():
            _notify(alert, "alert.renotify")
        sent += 1
    return sent
