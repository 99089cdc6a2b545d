"""Outbound notifications: signed webhooks, the one delivery mechanism for alerts and events.

    notify("alert.firing", {"title": ..., "text": ..., "url": ..., "severity": "page", "alert": {...}})

is called inside the transaction that made the event happen: it records one `Delivery` per enabled
receiver and, in the outbox (registry/outbox.py), the task that sends it; so nothing is sent for a change
that rolls back, and nothing is lost while the broker is away. A worker sends each delivery
(`delivery_send`, the `deliver` task), signed as Standard Webhooks says (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<HMAC-SHA256>`), within a bounded time; timeouts, connection errors, 5xx and 429 are
tried again with exponential backoff (a Celery countdown), any other answer outside 2xx fails the delivery
at once with the receiver's reason. Every attempt is logged on the delivery. A retry whose message is lost
(a broker or worker gone) is sent by the reconciler (`deliveries_reconcile`). Delivery is at least once: a
receiver drops repeats by `webhook-id`, the same on every attempt and redelivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from monitoring.models import DELIVERY_TRANSITIONS, Delivery, DeliveryStatus, Receiver, ReceiverKind
from registry import locks
from registry.audit import Actor, audit_record
from registry.errors import RegistryError, TransitionError
from registry.lifecycle import Lifecycle
from registry.outbox import outbox_enqueue

log = logging.getLogger("monitoring.notify")

DELIVER_TASK = "monitoring.tasks.deliver"
TEST_EVENT = "test"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks: 24 to 64 random bytes
USER_AGENT = "mlops-platform-webhooks/1"
ANSWER_KEPT_BYTES = 16 * 1024  # of a receiver's answer, read at most this much (for the reason it gives)
LOG_KEPT = 100  # attempts kept in a delivery's log, the newest
DUE_SLACK = timedelta(seconds=0.2)  # a countdown may fire a little early (clocks of two workers differ)
_EVENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_URL = URLValidator(schemes=["http", "https"])


class NotifyError(RegistryError):
    pass


# The public events a receiver may subscribe to (README, "Events"). The lifecycle ones come from the audit log
# through the events dispatcher (monitoring/events.py); the alert ones straight from monitoring/alerts.py.
EVENT_TYPES: dict[str, str] = {
    "version.registered": "a model version was registered",
    "version.validated": "a version passed validation and is ready",
    "engine.built": "an engine build of a version succeeded (passed its parity gate)",
    "hil.passed": "a hardware-in-the-loop run passed",
    "hil.failed": "a HIL run ended without passing: failed, unstable, error or timed_out (detail.status)",
    "canary.started": "a rollout's canary was loaded and takes its first traffic step",
    "canary.advanced": "a rollout's canary moved to its next traffic step",
    "rollout.promoted": "a rollout ended promoted: its version serves all traffic",
    "rollout.rolled_back": "a rollout ended rolled back",
    "promotion.requested": "someone asked for a promotion that needs approval",
    "promotion.approved": "a release manager approved a promotion request",
    "promotion.rejected": "a release manager rejected a promotion request",
    "promotion.break_glass": "a promotion was forced past its approval (break glass)",
    "promotion.policy_changed": "an administrator changed a model's promotion policy (protection, approvals)",
    "alert.firing": "an alert started firing",
    "alert.acknowledged": "someone took a firing alert",
    "alert.renotify": "a firing alert nobody acknowledged, again",
    "alert.resolved": "an alert was resolved",
}


def _delivery_view(d: Delivery) -> dict[str, Any]:
    return {"status": d.status, "event_type": d.event_type, "receiver": d.receiver.name, "attempts": d.attempts}


DELIVERIES: Lifecycle[Delivery] = Lifecycle(
    Delivery, DELIVERY_TRANSITIONS, action="delivery", target_type="delivery", target_id=lambda d: d.pk,
    describe=lambda d: f"delivery {d.pk} ({d.event_type} to {d.receiver.name})", view=_delivery_view,
    related=("receiver",), stamps={"delivered_at": {DeliveryStatus.DELIVERED}})


# ---- secrets and signatures (https://www.standardwebhooks.com) ---------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_event_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: HMAC-SHA256 over "{id}.{timestamp}.{body}" with the secret's key bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, event_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    at = int(time.time()) if timestamp is None else timestamp
    return {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": event_id,
            "webhook-timestamp": str(at), "webhook-signature": sign(secret, event_id, at, body)}


# ---- what is sent ------------------------------------------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


_SLACK_LABELS = {"alert.firing": "FIRING", "alert.resolved": "RESOLVED", "alert.acknowledged": "ACKNOWLEDGED",
                 "alert.renotify": "STILL FIRING", TEST_EVENT: "TEST"}


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads these three as markup (links, mentions); everything else is shown as written.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def slack_message(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (Block Kit): the title as header, the evidence, severity and a
    button to the alert's page; `text` is the fallback shown in notifications. An event (monitoring/events.py)
    has no title: its summary is the header, and who did it to which version the text."""
    title = str(payload.get("title") or payload.get("summary") or event_type)
    text = str(payload.get("text") or "")
    if not text and payload.get("event"):
        subject = (f"{payload['model']} v{payload['version']}" if payload.get("version") is not None else
                   str(payload.get("model") or ""))
        text = " · ".join(part for part in (subject, f"by {payload.get('actor')}" if payload.get("actor") else "")
                          if part)
    url = str(payload.get("url") or "")
    severity = str(payload.get("severity") or "")
    headline = f"[{_SLACK_LABELS.get(event_type, event_type)}] {title}"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(headline, 150)}}]
    if text:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(_slack_escape(text), 3000)}})
    context = " · ".join(part for part in (f"*{_slack_escape(severity)}*" if severity else "",
                                             _slack_escape(event_type)) if part)
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    if url:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Open in the platform"}, "url": url[:3000]}]})
    fallback = _slack_escape(headline) + (f"\n{url}" if url else "")
    return {"text": _clip(fallback, 4000), "blocks": blocks}


def render_body(delivery: Delivery) -> bytes:
    """The exact bytes sent (and signed): the generic JSON event, or a Slack message."""
    if delivery.receiver.kind == ReceiverKind.SLACK:
        document = slack_message(delivery.event_type, delivery.payload)
    else:
        document = {"type": delivery.event_type, "timestamp": _iso(delivery.created_at), "data": delivery.payload}
    return json.dumps(document, cls=DjangoJSONEncoder, separators=(",", ":")).encode()


# ---- the transport -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One POST's outcome: the status code the receiver answered (None when none came) or what went wrong."""

    status_code: int | None
    error: str  # "" when delivered
    seconds: float
    transient: bool  # worth another try: timeouts, connection errors, 5xx, 429
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def url_hint(url: str) -> str:
    """The URL without what may be a credential (path, query, user info): Slack's webhook URLs hold a token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…" if parts.path not in ("", "/") or parts.query else \
        f"{parts.scheme}://{host}{port}/"


def _scrub(message: str, url: str) -> str:
    """An error message with the URL's path and query taken out (requests names them)."""
    parts = urlsplit(url)
    for secret_part in (url, parts.path + ("?" + parts.query if parts.query else ""), parts.path):
        if secret_part not in ("", "/"):
            message = message.replace(secret_part, "/…")
    return message


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - timezone.now()).total_seconds())


def _read_capped(response: requests.Response, deadline: float) -> bytes:
    """At most ANSWER_KEPT_BYTES of the answer, and nothing after the deadline (a receiver trickling bytes)."""
    data = b""
    try:
        for chunk in response.iter_content(chunk_size=4096):
            data += chunk
            if len(data) >= ANSWER_KEPT_BYTES or time.monotonic() > deadline:
                break
    except requests.RequestException:  # the status line came: the answer is that, whatever the body does
        pass
    return data[:ANSWER_KEPT_BYTES]


def _excerpt(body: bytes) -> str:
    return _clip(" ".join(body.decode("utf-8", errors="replace").split()), 300)


def post(url: str, body: bytes, headers: dict[str, str]) -> Attempt:
    """POST once, bounded: PLATFORM_WEBHOOK_CONNECT_TIMEOUT_S to connect, PLATFORM_WEBHOOK_READ_TIMEOUT_S for
    each read, the answer's body read for at most that long again and cut at ANSWER_KEPT_BYTES. Redirects are
    not followed (the signed request goes where the operator said, or nowhere)."""
    connect_s = float(settings.PLATFORM["WEBHOOK_CONNECT_TIMEOUT_S"])
    read_s = float(settings.PLATFORM["WEBHOOK_READ_TIMEOUT_S"])
    started = time.monotonic()
    try:
        with requests.post(url, data=body, headers=headers, timeout=(connect_s, read_s), stream=True,
                           allow_redirects=False) as response:
            answer = _read_capped(response, time.monotonic() + read_s)
            code, reason = response.status_code, response.reason or ""
            retry_after = _retry_after(response.headers.get("Retry-After"))
            location = response.headers.get("Location", "")
    except requests.ConnectTimeout:
        return Attempt(None, f"could not connect within {connect_s:g} s (connect timeout)",
                       time.monotonic() - started, transient=True)
    except requests.Timeout:
        return Attempt(None, f"no answer within {read_s:g} s (read timeout)", time.monotonic() - started,
                       transient=True)
    except requests.ConnectionError as exc:
        return Attempt(None, _clip(_scrub(f"connection failed: {exc}", url), 500), time.monotonic() - started,
                       transient=True)
    except requests.RequestException as exc:  # an URL requests cannot send to: trying again cannot help
        return Attempt(None, _clip(_scrub(f"could not send: {exc}", url), 500), time.monotonic() - started,
                       transient=False)
    seconds = time.monotonic() - started
    if 200 <= code < 300:
        return Attempt(code, "", seconds, transient=False)
    said = f"HTTP {code} {reason}".strip() + (f": {_excerpt(answer)}" if answer.strip() else "")
    if 300 <= code < 400:
        said += (f" (a redirect to {url_hint(location) if location else 'nowhere'}; redirects are not followed: "
                 "give the receiver's final URL)")
    transient = code >= 500 or code == 429
    return Attempt(code, said, seconds, transient=transient, retry_after_s=retry_after if transient else None)


def backoff_s(attempts: int, retry_after_s: float | None = None) -> float:
    """Seconds before the next attempt after `attempts` failed ones: BACKOFF_S doubling, at most BACKOFF_MAX_S;
    later if the receiver's Retry-After asks for it, but never past BACKOFF_MAX_S."""
    base = float(settings.PLATFORM["WEBHOOK_BACKOFF_S"])
    cap = float(settings.PLATFORM["WEBHOOK_BACKOFF_MAX_S"])
    delay = min(base * 2 ** max(attempts - 1, 0), cap)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap))
    return delay


# ---- receivers -----------------------------------------------------------------------------------------------


def _receiver_view(r: Receiver) -> dict[str, Any]:
    return {"name": r.name, "kind": r.kind, "url": url_hint(r.url), "enabled": r.enabled,
            "event_types": list(r.event_types), "models": list(r.model_names)}


def _subscription_list(values: Any, field: str, what: str) -> list[Any]:
    """A subscription's list as given (None: []), refused unless it is a list or tuple."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, list | tuple):
        raise NotifyError(f"{field} must be a list of {what} (empty: all), got {values!r}")
    return list(values)


def _valid_event_types(event_types: Any) -> list[str]:
    """The subscription's event types, each one of EVENT_TYPES, sorted and without repeats; [] is all."""
    event_types = _subscription_list(event_types, "event_types", "event types")
    unknown = sorted({str(t) for t in event_types} - EVENT_TYPES.keys())
    if unknown:
        raise NotifyError(f"unknown event type{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: "
                          f"the known ones are {', '.join(EVENT_TYPES)}")
    return sorted(set(event_types))


def _valid_model_names(names: Any) -> list[str]:
    """The subscription's model names, sorted and without repeats; [] is all. A model need not exist yet:
    a team subscribes before its first version is registered."""
    cleaned = {str(n).strip() for n in _subscription_list(names, "models", "model names")}
    bad = sorted(n for n in cleaned if not n or len(n) > 128)
    if bad:
        raise NotifyError(f"models: a model name has 1 to 128 characters, got {', '.join(map(repr, bad))}")
    return sorted(cleaned)


def _valid_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise NotifyError("give the receiver a name of 1 to 100 characters, e.g. 'oncall-slack'")
    return name


def _valid_url(url: str) -> str:
    url = (url or "").strip()
    try:
        _URL(url)
    except ValidationError:
        raise NotifyError(f"url must be an http:// or https:// URL, got {url_hint(url) if url else 'nothing'}") \
            from None
    if len(url) > 2000:
        raise NotifyError("url is longer than 2000 characters")
    return url


def _name_free(name: str, but: int | None = None) -> None:
    others = Receiver.objects.filter(name=name)
    if (others.exclude(pk=but) if but is not None else others).exists():
        raise NotifyError(f"a receiver named {name!r} exists already", 409)


@transaction.atomic
def receiver_create(actor: Actor, name: str, kind: str, url: str, enabled: bool = True,
                    event_types: list[str] | None = None, models: list[str] | None = None) -> Receiver:
    """A new receiver with a new signing secret (on the returned row: show it once, then never again),
    subscribed to `event_types` of `models` (None or empty: all)."""
    name, url = _valid_name(name), _valid_url(url)
    if kind not in ReceiverKind.values:
        raise NotifyError(f"kind must be one of {', '.join(ReceiverKind.values)}, got {kind!r}")
    types, names = _valid_event_types(event_types), _valid_model_names(models)
    _name_free(name)
    try:
        with transaction.atomic():
            receiver = Receiver.objects.create(name=name, kind=kind, url=url, secret=new_secret(), enabled=enabled,
                                               event_types=types, model_names=names, created_by=actor.user_or_none)
    except IntegrityError:  # created by someone else since the check
        raise NotifyError(f"a receiver named {name!r} exists already", 409) from None
    audit_record(actor, "receiver.create", "receiver", receiver.pk, after=_receiver_view(receiver))
    return receiver


@transaction.atomic
def receiver_update(actor: Actor, receiver: Receiver, *, name: str | None = None, url: str | None = None,
                    enabled: bool | None = None, event_types: list[str] | None = None,
                    models: list[str] | None = None) -> Receiver:
    """Change what is given (None: leave it); an empty list of event types or models subscribes to all."""
    current = Receiver.objects.select_for_update().get(pk=receiver.pk)
    before = _receiver_view(current)
    changed = []
    if name is not None and _valid_name(name) != current.name:
        current.name = _valid_name(name)
        _name_free(current.name, but=current.pk)
        changed.append("name")
    if url is not None and _valid_url(url) != current.url:
        current.url = _valid_url(url)
        changed.append("url")
    if enabled is not None and enabled != current.enabled:
        current.enabled = enabled
        changed.append("enabled")
    if event_types is not None and (types := _valid_event_types(event_types)) != list(current.event_types):
        current.event_types = types
        changed.append("event_types")
    if models is not None and (names := _valid_model_names(models)) != list(current.model_names):
        current.model_names = names
        changed.append("model_names")
    if changed:
        try:
            with transaction.atomic():
                current.save(update_fields=[*changed, "updated_at"])
        except IntegrityError:
            raise NotifyError(f"a receiver named {current.name!r} exists already", 409) from None
        audit_record(actor, "receiver.update", "receiver", current.pk, before=before,
                     after={**_receiver_view(current), "changed": changed})
    return current


@transaction.atomic
def receiver_delete(actor: Actor, receiver: Receiver) -> None:
    """The receiver and its deliveries' log go (disable it instead to keep them); pending ones are not sent."""
    deliveries = Delivery.objects.filter(receiver=receiver).count()
    audit_record(actor, "receiver.delete", "receiver", receiver.pk, before=_receiver_view(receiver),
                 after={"deliveries_deleted": deliveries})
    Receiver.objects.filter(pk=receiver.pk).delete()


def event_payload(event: str, at: datetime, *, model: str | None, version: int | None, actor: str, summary: str,
                  path: str, detail: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What every event's delivery carries (alerts add their own fields as `extra`); `url` is `path` on the
    platform's BASE_URL ("" without a path)."""
    base = str(settings.PLATFORM.get("BASE_URL", "") or "").rstrip("/")
    return {"event": event, "at": at.isoformat(), "model": model, "version": version, "actor": actor,
            "summary": summary, "url": f"{base}{path}" if path else "", "detail": detail, **extra}


def _delivery_create(receiver: Receiver, event_type: str, payload: dict[str, Any],
                     event_id: str | None = None) -> Delivery:
    delivery = Delivery.objects.create(receiver=receiver, event_type=event_type, event_id=event_id or new_event_id(),
                                       payload=payload, next_attempt_at=timezone.now())
    outbox_enqueue(DELIVER_TASK, [delivery.pk])
    return delivery


@transaction.atomic
def receiver_test(actor: Actor, receiver: Receiver) -> Delivery:
    """Send a `test` event to the receiver now (also to a disabled one: check it before enabling it)."""
    payload = {
        "title": f"Test notification to {receiver.name}",
        "text": f"{actor.name} sent a test to receiver {receiver.name} ({receiver.kind}). If you read this, "
                "notifications from the platform reach you.",
        "url": str(settings.PLATFORM.get("BASE_URL", "") or ""),
        "severity": "ticket",
        "alert": None,
    }
    delivery = _delivery_create(receiver, TEST_EVENT, payload)
    audit_record(actor, "receiver.test", "receiver", receiver.pk, after={"delivery": delivery.pk,
                                                                         "event_id": delivery.event_id})
    return delivery


# ---- deliveries ------------------------------------------------------------------------------------------------


def subscribed(event_type: str, model: str | None) -> QuerySet[Receiver]:
    """The enabled receivers whose subscription takes this event: its type listed (or all types) and its
    model listed (or all models; an event about no model reaches only those)."""
    of_model = Q(model_names=[])
    if model:
        of_model |= Q(model_names__contains=[model])
    return Receiver.objects.filter(of_model, Q(event_types=[]) | Q(event_types__contains=[event_type]),
                                   enabled=True)


def notify(event_type: str, payload: dict[str, Any], model: str | None = None,
           event_id: Callable[[Receiver], str] | None = None) -> list[Delivery]:
    """One delivery of the event for each enabled receiver subscribed to it (its type, about `model`), in
    the caller's transaction; each is sent after commit (through the outbox). `payload`: for alerts
    {"title", "text", "url", "severity": "page"|"ticket", "alert", ...}, for events monitoring/events.py's.
    `event_id(receiver)`, when given, names each delivery (its webhook-id) instead of a random id: a caller
    that could record the same event twice gets an IntegrityError rather than a second delivery."""
    if not _EVENT_TYPE.match(event_type or ""):
        raise NotifyError(f"event type must be lowercase words with dots, e.g. 'alert.firing'; got {event_type!r}")
    if not isinstance(payload, dict):
        raise NotifyError(f"payload must be a dict, got {type(payload).__name__}")
    with transaction.atomic():
        receivers = list(subscribed(event_type, model).order_by("pk"))
        return [_delivery_create(receiver, event_type, payload, event_id(receiver) if event_id else None)
                for receiver in receivers]


def delivery_redeliver(actor: Actor, delivery: Delivery) -> Delivery:
    """Send a delivered or failed delivery again (same webhook-id), with a new round of attempts."""
    with transaction.atomic():
        receiver = Receiver.objects.get(pk=delivery.receiver_id)
        if not receiver.enabled and delivery.event_type != TEST_EVENT:
            raise NotifyError(f"receiver {receiver.name} is disabled: enable it first", 409)
        current = Delivery.objects.get(pk=delivery.pk)
        if current.status == DeliveryStatus.PENDING:
            raise NotifyError(f"delivery {delivery.pk} is still being sent (attempt {current.attempts}); "
                              "wait for it to be delivered or failed", 409)
        moved = DELIVERIES.move(delivery.pk, DeliveryStatus.PENDING, actor, note={"redelivery": True},
                                attempts=0, next_attempt_at=timezone.now(), delivered_at=None)
        outbox_enqueue(DELIVER_TASK, [moved.pk])
    return moved


def _schedule(delivery_id: int, countdown: float | None = None) -> None:
    """Send the delivery's task (after `countdown` seconds). Best effort: a message the broker did not take,
    or lost later, is sent again by deliveries_reconcile once the attempt is due."""
    from config.celery import app

    try:
        app.send_task(DELIVER_TASK, args=[delivery_id], countdown=countdown, retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker failure
        log.warning("could not schedule delivery %s (%s); the reconciler will send it", delivery_id, exc)


def delivery_send(delivery_id: int) -> str:
    """One attempt at a pending delivery that is due, by whichever worker holds its claim: run twice (a
    duplicate message, the reconciler and a countdown together), it sends once. A transient failure
    schedules the next attempt after the claim is let go; the last one, or a refusal, fails it."""
    retry_in: float | None = None
    with locks.claim("monitoring.deliver", delivery_id) as mine:
        if not mine:
            return "being sent by another worker"
        delivery = Delivery.objects.select_related("receiver").filter(pk=delivery_id).first()
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            return "nothing to do"
        now = timezone.now()
        if delivery.next_attempt_at is not None and delivery.next_attempt_at > now + DUE_SLACK:
            return f"not due until {delivery.next_attempt_at:%H:%M:%S}"
        receiver = delivery.receiver
        try:
            if not receiver.enabled and delivery.event_type != TEST_EVENT:
                reason = f"receiver {receiver.name} was disabled before it was sent"
                DELIVERIES.move(delivery.pk, DeliveryStatus.FAILED, only_from={DeliveryStatus.PENDING},
                                note={"error": reason}, last_error=reason, next_attempt_at=None)
                return "failed"
            body = render_body(delivery)
            attempt = post(receiver.url, body, signed_headers(receiver.secret, delivery.event_id, body))
            outcome, retry_in = _record(delivery, attempt, now)
        except (TransitionError, Delivery.DoesNotExist):  # its receiver was deleted meanwhile
            return "nothing to do"
    if retry_in is not None:
        _schedule(delivery_id, retry_in)
    return outcome


def _record(delivery: Delivery, attempt: Attempt, at: datetime) -> tuple[str, float | None]:
    attempts = delivery.attempts + 1
    entry = {"at": _iso(at), "attempt": attempts, "status_code": attempt.status_code, "error": attempt.error,
             "seconds": round(attempt.seconds, 3)}
    fields: dict[str, Any] = {"attempts": attempts, "log": [*delivery.log, entry][-LOG_KEPT:],
                              "last_status_code": attempt.status_code, "last_error": attempt.error}
    if attempt.ok:
        DELIVERIES.move(delivery.pk, DeliveryStatus.DELIVERED, only_from={DeliveryStatus.PENDING},
                        next_attempt_at=None, **fields)
        return "delivered", None
    most = max(int(settings.PLATFORM["WEBHOOK_ATTEMPTS"]), 1)
    if not attempt.transient or attempts >= most:
        if attempt.transient:
            fields["last_error"] = f"{attempt.error} (gave up after {attempts} attempt{'s' * (attempts > 1)})"
        DELIVERIES.move(delivery.pk, DeliveryStatus.FAILED, only_from={DeliveryStatus.PENDING},
                        note={"error": fields["last_error"][:500]}, next_attempt_at=None, **fields)
        return "failed", None
    delay = backoff_s(attempts, attempt.retry_after_s)
    Delivery.objects.filter(pk=delivery.pk, status=DeliveryStatus.PENDING).update(
        next_attempt_at=timezone.now() + timedelta(seconds=delay), **fields)
    return f"attempt {attempts} failed, next in {delay:g} s", delay


def deliveries_reconcile() -> int:
    """Send pending deliveries whose attempt has been due for PLATFORM_REDISPATCH_S and that no live worker
    holds: their message was lost (a broker gone with a countdown, a worker killed mid-attempt). Each is
    marked due now, so it is sent again only if this message is lost too."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.PLATFORM["REDISPATCH_S"])
    due = Delivery.objects.filter(Q(next_attempt_at__lt=stale) | Q(next_attempt_at__isnull=True),
                                  status=DeliveryStatus.PENDING).order_by("next_attempt_at")
    sent = 0
    for delivery_id in list(due.values_list("pk", flat=True)[:500]):
        if locks.claimed_elsewhere("monitoring.deliver", delivery_id):
            continue
        if Delivery.objects.filter(pk=delivery_id, status=DeliveryStatus.PENDING).update(next_attempt_at=now):
            _schedule(delivery_id)
            sent += 1
    return sent


# ---- reads -------------------------------------------------------------------------------------------------------


def receiver_list() -> QuerySet[Receiver]:
    return Receiver.objects.select_related("created_by").order_by("name")


def delivery_list(receiver_id: int | None = None, status: str | None = None,
                  event_type: str | None = None) -> QuerySet[Delivery]:
    deliveries = Delivery.objects.select_related("receiver").order_by("-created_at", "-pk")
    if receiver_id is not None:
        deliveries = deliveries.filter(receiver_id=receiver_id)
    if status:
        deliveries = deliveries.filter(status=status)
    if event_type:
        deliveries = deliveries.filter(event_type=event_type)
    return deliveries

