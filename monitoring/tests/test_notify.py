"""Notifications (monitoring/notify.py): signed webhooks, retried, logged, sent only for committed changes.

The receivers here are a real HTTP server on a free loopback port that checks every request's signature and
timestamp with the Standard Webhooks reference library (`standardwebhooks`, not the platform's code) and
answers from a script per path (monitoring/tests/webhooks.py). The Celery tasks are called as functions;
what they hand to the broker (the outbox's message, a retry's countdown) is recorded instead of sent, and a
countdown is honoured by waiting it out before the next call."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from config.celery import app
from monitoring import notify, tasks
from monitoring.models import Delivery, DeliveryStatus, Receiver
from monitoring.tests.webhooks import HANG, Sent, deliver_until_settled, receiver_at, verify
from registry.audit import SYSTEM
from registry.models import AuditEvent, OutboxMessage
from registry.roles import Role

pytestmark = pytest.mark.django_db

PAYLOAD = {"title": "digits v3: p99 latency over its SLO", "text": "p99 was 812 ms over the last 10 min (SLO 500 ms)",
           "url": "https://platform.example/alerts/17", "severity": "page",
           "alert": {"id": 17, "kind": "latency", "model": "digits", "version": 3}}


def let_go(other: Any, delivery_id: int) -> None:
    """The other worker lets its claim go now (its connection closing lets it go a moment later, not at once)."""
    from registry.locks import KINDS

    other.execute("SELECT pg_advisory_unlock(%s, %s)", (KINDS["monitoring.deliver"], delivery_id))


def notify_committed(django_capture_on_commit_callbacks: Any, event_type: str = "alert.firing",
                     payload: dict[str, Any] | None = None) -> list[Delivery]:
    with django_capture_on_commit_callbacks(execute=True):
        return notify.notify(event_type, payload or PAYLOAD)


# ---- sending ----------------------------------------------------------------------------------------------------


def test_a_receiver_answering_503_twice_then_200_gets_the_event_on_the_third_attempt_signed_every_time(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver = receiver_at(receiver_server, "/flaky", 503, 503, 200)
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    assert [(s.task, s.args, s.countdown) for s in broker] == [(notify.DELIVER_TASK, [delivery.pk], None)]
    assert not OutboxMessage.objects.exists()  # handed to the broker after commit

    countdowns = deliver_until_settled(delivery.pk, broker)

    assert countdowns == [0.05, 0.1]  # PLATFORM_WEBHOOK_BACKOFF_S, doubling
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED and delivery.delivered_at is not None
    assert delivery.attempts == 3 and delivery.last_status_code == 200 and delivery.last_error == ""
    assert [entry["status_code"] for entry in delivery.log] == [503, 503, 200]
    assert [entry["attempt"] for entry in delivery.log] == [1, 2, 3]
    assert "HTTP 503" in delivery.log[0]["error"] and delivery.log[2]["error"] == ""
    assert all(0 <= entry["seconds"] < 2 for entry in delivery.log)

    got = receiver_server.at("/flaky")
    assert len(got) == 3
    assert all(r.verified for r in got), [r.problem for r in got]
    assert {r.headers["webhook-id"] for r in got} == {delivery.event_id}
    assert delivery.event_id.startswith("msg_")
    assert got[1].at - got[0].at >= 0.05 and got[2].at - got[1].at >= 0.1  # the backoff was waited out
    assert got[0].json == {"type": "alert.firing", "timestamp": got[0].json["timestamp"], "data": PAYLOAD}
    assert got[0].json["timestamp"].startswith(delivery.created_at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert got[0].headers["content-type"] == "application/json"
    assert AuditEvent.objects.filter(action="delivery.delivered", target_id=str(delivery.pk)).count() == 1
    assert receiver.deliveries.count() == 1


def test_a_receiver_refusing_with_400_fails_the_delivery_at_once_with_its_reason(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver_at(receiver_server, "/refuses", (400, "unknown channel #on-call", {}))
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    broker.clear()

    assert tasks.deliver(delivery.pk) == "failed"

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 1
    assert delivery.last_status_code == 400
    assert delivery.last_error == "HTTP 400 Bad Request: unknown channel #on-call"
    assert broker == []  # no retry
    assert len(receiver_server.at("/refuses")) == 1
    failed = AuditEvent.objects.get(action="delivery.failed", target_id=str(delivery.pk))
    assert "unknown channel" in failed.after["error"]


def test_a_redirect_is_not_followed_and_fails_the_delivery_saying_so(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver_at(receiver_server, "/moved", (301, "", {"Location": receiver_server.base_url + "/new/place?k=1"}))
    receiver_at(receiver_server, "/new/place", 200)
    [moved, _] = notify_committed(django_capture_on_commit_callbacks)

    assert tasks.deliver(moved.pk) == "failed"

    moved.refresh_from_db()
    assert moved.last_status_code == 301
    assert moved.last_error == (f"HTTP 301 Moved Permanently (a redirect to {receiver_server.base_url}/…; redirects "
                                "are not followed: give the receiver's final URL)")
    assert receiver_server.at("/new/place") == []


def test_a_receiver_that_never_answers_times_out_within_the_bound_and_fails_after_the_last_attempt(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    fast["WEBHOOK_ATTEMPTS"] = 2
    receiver_at(receiver_server, "/silent", HANG)
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    broker.clear()

    started = time.monotonic()
    countdowns = deliver_until_settled(delivery.pk, broker)
    took = time.monotonic() - started

    assert countdowns == [0.05]
    assert took < 5.0  # two attempts of a 0.5 s read timeout (and a 0.05 s wait), not the receiver's 30 s
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 2
    assert [entry["status_code"] for entry in delivery.log] == [None, None]
    assert all(entry["error"] == "no answer within 0.5 s (read timeout)" for entry in delivery.log)
    assert all(0.4 < entry["seconds"] < 2.5 for entry in delivery.log)
    assert delivery.last_error == "no answer within 0.5 s (read timeout) (gave up after 2 attempts)"
    assert len(receiver_server.at("/silent")) == 2  # it did get the requests


def test_429_and_5xx_wait_as_long_as_retry_after_asks_but_no_longer_than_the_cap(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver_at(receiver_server, "/busy", (429, "slow down", {"Retry-After": "1"}),
                (503, "maintenance", {"Retry-After": "3600"}), 200)
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    broker.clear()

    tasks.deliver(delivery.pk)
    tasks.deliver(delivery.pk)  # a duplicate message before the countdown: not due, nothing sent
    assert [s.countdown for s in broker] == [1.0]  # the receiver's 1 s, more than the 0.05 s backoff
    delivery.refresh_from_db()
    assert timedelta(seconds=0.5) < delivery.next_attempt_at - timezone.now() <= timedelta(seconds=1)
    assert len(receiver_server.at("/busy")) == 1

    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())  # the second passed
    tasks.deliver(delivery.pk)
    assert [s.countdown for s in broker] == [1.0, 2.0]  # 3600 s asked, PLATFORM_WEBHOOK_BACKOFF_MAX_S given
    delivery.refresh_from_db()
    assert [entry["status_code"] for entry in delivery.log] == [429, 503]
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_error == "HTTP 503 Service Unavailable: " \
                                                                                  "maintenance"


def test_an_unreachable_receiver_is_retried_and_its_error_does_not_show_the_secret_part_of_its_url(
        broker, fast, django_capture_on_commit_callbacks):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    notify.receiver_create(SYSTEM, "nobody-home", "slack", f"http://127.0.0.1:{port}/services/T0/B0/SeCrEtToKeN")
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    broker.clear()

    tasks.deliver(delivery.pk)

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.PENDING and delivery.last_status_code is None
    assert delivery.last_error.startswith("connection failed") and "refused" in delivery.last_error.lower()
    assert "SeCrEtToKeN" not in delivery.last_error
    assert [(s.args, s.countdown) for s in broker] == [([delivery.pk], 0.05)]


def test_slack_receivers_get_a_slack_message_with_title_text_and_link_signed_the_same_way(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver_at(receiver_server, "/slack", 200, kind="slack")
    payload = {**PAYLOAD, "text": "p99 > 500 ms & <rising>"}
    [delivery] = notify_committed(django_capture_on_commit_callbacks, "alert.firing", payload)

    assert tasks.deliver(delivery.pk) == "delivered"

    [got] = receiver_server.at("/slack")
    assert got.verified, got.problem
    message = got.json
    assert set(message) == {"text", "blocks"}
    assert PAYLOAD["title"] in message["text"] and PAYLOAD["url"] in message["text"]
    header, section, context, actions = message["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": f"[FIRING] {PAYLOAD['title']}"}}
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": "p99 &gt; 500 ms &amp; &lt;rising&gt;"}}
    assert context["type"] == "context" and context["elements"][0]["text"] == "*page* · alert.firing"
    assert actions["type"] == "actions"
    assert actions["elements"][0]["type"] == "button" and actions["elements"][0]["url"] == PAYLOAD["url"]


def test_a_signature_checked_with_another_secret_or_over_other_bytes_does_not_verify(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    receiver = receiver_at(receiver_server, "/good", 200)
    receiver_at(receiver_server, "/wrong-secret", 200, verify_with=notify.new_secret())
    deliveries = notify_committed(django_capture_on_commit_callbacks)
    for delivery in deliveries:
        tasks.deliver(delivery.pk)

    [good] = receiver_server.at("/good")
    [wrong] = receiver_server.at("/wrong-secret")
    assert good.verified
    assert not wrong.verified and "No matching signature" in wrong.problem
    refused = Delivery.objects.get(receiver__name="hook-wrong-secret")
    assert refused.status == DeliveryStatus.FAILED and refused.last_status_code == 401

    # The same request, checked by hand: the right secret passes; another secret, other bytes, another time fail.
    assert verify(receiver.secret, good.body, good.headers) == ""
    assert verify(notify.new_secret(), good.body, good.headers).startswith("signature")
    assert verify(receiver.secret, good.body.replace(b"812 ms", b"12 ms"), good.headers).startswith("signature")
    later = {**good.headers, "webhook-timestamp": str(int(good.headers["webhook-timestamp"]) + 1)}
    assert verify(receiver.secret, good.body, later).startswith("signature")
    # The secret is Standard Webhooks' format: whsec_ and the base64 of 32 random bytes.
    assert receiver.secret.startswith("whsec_") and len(base64.b64decode(receiver.secret[6:])) == 32


def test_a_delivery_task_run_twice_sends_once(receiver_server, broker, fast, django_capture_on_commit_callbacks):
    from registry.tests.conftest import held_by_another_worker

    receiver_at(receiver_server, "/once", 200)
    [delivery] = notify_committed(django_capture_on_commit_callbacks)

    with held_by_another_worker("monitoring.deliver", delivery.pk) as other:
        assert tasks.deliver(delivery.pk) == "being sent by another worker"
        let_go(other, delivery.pk)
    assert receiver_server.at("/once") == []

    assert tasks.deliver(delivery.pk) == "delivered"
    assert tasks.deliver(delivery.pk) == "nothing to do"
    assert len(receiver_server.at("/once")) == 1
    delivery.refresh_from_db()
    assert delivery.attempts == 1 and len(delivery.log) == 1


def test_redelivering_a_failed_delivery_sends_it_again_with_the_same_webhook_id(
        receiver_server, broker, fast, client_as, django_capture_on_commit_callbacks):
    receiver_at(receiver_server, "/fixed-later", (400, "no such channel", {}), 200)
    [delivery] = notify_committed(django_capture_on_commit_callbacks)
    assert tasks.deliver(delivery.pk) == "failed"
    broker.clear()

    oncall = client_as(Role.ONCALL)
    with django_capture_on_commit_callbacks(execute=True):
        resp = oncall.post(f"/api/v1/deliveries/{delivery.pk}/redeliver/")
    assert resp.status_code == 202, resp.content
    assert resp.json()["status"] == "pending" and resp.json()["attempts"] == 0
    assert [(s.task, s.args) for s in broker] == [(notify.DELIVER_TASK, [delivery.pk])]
    again = oncall.post(f"/api/v1/deliveries/{delivery.pk}/redeliver/")
    assert again.status_code == 409 and "still being sent" in again.json()["error"]["message"]

    assert tasks.deliver(delivery.pk) == "delivered"

    first, second = receiver_server.at("/fixed-later")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery.event_id
    assert second.verified and second.body == first.body
    detail = oncall.get(f"/api/v1/deliveries/{delivery.pk}/").json()
    assert detail["status"] == "delivered" and detail["attempts"] == 1
    assert [entry["status_code"] for entry in detail["log"]] == [400, 200]
    audit = AuditEvent.objects.get(action="delivery.pending", target_id=str(delivery.pk))
    assert audit.actor_name == oncall.user.username and audit.before == {
        "status": "failed", "event_type": "alert.firing", "receiver": "hook-fixed-later", "attempts": 1}
    assert audit.after["redelivery"] is True


@pytest.mark.django_db(transaction=True)
def test_notify_in_a_transaction_that_rolls_back_sends_nothing_and_a_broker_outage_loses_nothing(
        receiver_server, broker, fast, monkeypatch):
    from kombu.exceptions import OperationalError

    from registry.outbox import outbox_send

    receiver_at(receiver_server, "/rolled-back", 200)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert len(notify.notify("alert.firing", PAYLOAD)) == 1
        raise RuntimeError("the alert's change failed")
    assert not Delivery.objects.exists() and not OutboxMessage.objects.exists()
    assert broker == [] and receiver_server.received == []

    # The same call committed: sent after commit (the control that shows the above could have failed).
    with transaction.atomic():
        [delivery] = notify.notify("alert.firing", PAYLOAD)
    assert [(s.task, s.args) for s in broker] == [(notify.DELIVER_TASK, [delivery.pk])]
    assert tasks.deliver(delivery.pk) == "delivered"
    assert len(receiver_server.received) == 1

    # The broker away at commit: the delivery waits in the outbox and is sent when it answers again.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(app, "send_task", refuse)
    with transaction.atomic():
        [waiting] = notify.notify("alert.resolved", PAYLOAD)
    assert list(OutboxMessage.objects.values_list("task", "args")) == [(notify.DELIVER_TASK, [waiting.pk])]
    monkeypatch.setattr(app, "send_task", lambda name, args=(), **kw: broker.append(Sent(name, list(args), None)))
    assert outbox_send() == 1
    assert broker[-1].args == [waiting.pk] and not OutboxMessage.objects.exists()


def test_the_reconciler_sends_deliveries_due_whose_message_was_lost_unless_a_live_worker_holds_them(
        receiver_server, broker, fast):
    from registry.tests.conftest import held_by_another_worker

    receiver_at(receiver_server, "/late", 200)
    # No commit callbacks run in this test: every message of these four is lost.
    lost, held, waiting, just_due = (notify.notify("alert.firing", PAYLOAD)[0] for _ in range(4))
    now = timezone.now()
    Delivery.objects.filter(pk__in=[lost.pk, held.pk]).update(next_attempt_at=now - timedelta(minutes=5))
    Delivery.objects.filter(pk=waiting.pk).update(next_attempt_at=now + timedelta(minutes=5))  # a retry to come
    Delivery.objects.filter(pk=just_due.pk).update(next_attempt_at=now - timedelta(seconds=1))  # its message is on
    # its way: the reconciler gives it PLATFORM_REDISPATCH_S

    with held_by_another_worker("monitoring.deliver", held.pk) as other:
        assert tasks.deliveries_reconcile() == 1
        let_go(other, held.pk)
    assert [(s.task, s.args, s.countdown) for s in broker] == [(notify.DELIVER_TASK, [lost.pk], None)]
    assert tasks.deliveries_reconcile() == 1  # now the held one, free again; the lost one is not sent twice
    assert [s.args for s in broker] == [[lost.pk], [held.pk]]

    assert tasks.deliver(lost.pk) == "delivered"
    assert tasks.deliver(waiting.pk).startswith("not due")
    assert len(receiver_server.received) == 1


def test_only_enabled_receivers_are_notified_and_a_receiver_disabled_meanwhile_gets_nothing(
        receiver_server, broker, fast, django_capture_on_commit_callbacks):
    on = receiver_at(receiver_server, "/on", 200)
    later_off = receiver_at(receiver_server, "/later-off", 200)
    off = receiver_at(receiver_server, "/off", 200)
    notify.receiver_update(SYSTEM, off, enabled=False)

    deliveries = notify_committed(django_capture_on_commit_callbacks)

    assert sorted(d.receiver_id for d in deliveries) == sorted([on.pk, later_off.pk])
    notify.receiver_update(SYSTEM, later_off, enabled=False)
    results = {d.receiver_id: tasks.deliver(d.pk) for d in deliveries}
    assert results == {on.pk: "delivered", later_off.pk: "failed"}
    assert Delivery.objects.get(receiver=later_off).last_error == "receiver hook-later-off was disabled before " \
                                                                    "it was sent"
    assert [r.path for r in receiver_server.received] == ["/on"]


# ---- the API --------------------------------------------------------------------------------------------------


def test_the_create_answer_shows_the_secret_once_and_nothing_else_ever_does(client_as):
    from registry.models import IdempotencyRecord

    oncall, scientist = client_as(Role.ONCALL), client_as(Role.DATA_SCIENTIST)
    body = {"name": "oncall-slack", "kind": "slack", "url": "https://hooks.example.com/services/T0/B0/tok3n"}
    created = oncall.post("/api/v1/receivers/", body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")
    assert created.status_code == 201, created.content
    secret = created.json()["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    receiver_id = created.json()["id"]
    assert Receiver.objects.get(pk=receiver_id).secret == secret  # the one it signs with

    replay = oncall.post("/api/v1/receivers/", body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")
    assert replay.status_code == 409 and replay["Idempotent-Replayed"] == "true"
    assert f'"id": {receiver_id}' in replay.json()["error"]["message"]
    answers = [replay, oncall.get("/api/v1/receivers/"), oncall.get(f"/api/v1/receivers/{receiver_id}/"),
               scientist.get("/api/v1/receivers/"), scientist.get(f"/api/v1/receivers/{receiver_id}/"),
               oncall.patch(f"/api/v1/receivers/{receiver_id}/", {"enabled": False}, format="json")]
    for answer in answers[1:]:
        assert answer.status_code == 200, answer.content
    for answer in answers:
        assert secret not in answer.content.decode() and secret[6:30] not in answer.content.decode()
    assert secret not in json.dumps(list(AuditEvent.objects.values("before", "after")))
    assert secret not in json.dumps(list(IdempotencyRecord.objects.values("body")))

    # The URL (a Slack webhook URL is a credential) in full only for those who manage receivers.
    assert answers[2].json()["url"] == body["url"]
    assert answers[4].json()["url"] == "https://hooks.example.com/…"
    assert answers[5].json()["enabled"] is False
    update = AuditEvent.objects.get(action="receiver.update", target_id=str(receiver_id))
    assert update.actor_name == oncall.user.username and update.after["changed"] == ["enabled"]


def test_receivers_are_validated_tested_and_deleted_through_the_api(
        receiver_server, broker, fast, client_as, django_capture_on_commit_callbacks):
    oncall = client_as(Role.ONCALL)
    for bad in ("ftp://example.com/hook", "javascript:alert(1)", "hooks.example.com/x", ""):
        resp = oncall.post("/api/v1/receivers/", {"name": "bad", "kind": "json", "url": bad}, format="json")
        assert resp.status_code == 400, (bad, resp.content)
    wrong_kind = oncall.post("/api/v1/receivers/", {"name": "x", "kind": "email", "url": "https://example.com/"},
                             format="json")
    assert wrong_kind.status_code == 400

    created = oncall.post("/api/v1/receivers/", {"name": "team", "kind": "json", "url": receiver_server.base_url +
                                                 "/team", "enabled": False}, format="json").json()
    receiver_server.route("/team", created["secret"], 200)
    twin = oncall.post("/api/v1/receivers/", {"name": "team", "kind": "json", "url": "https://example.com/"},
                       format="json")
    assert twin.status_code == 409 and "exists already" in twin.json()["error"]["message"]

    with django_capture_on_commit_callbacks(execute=True):
        test = oncall.post(f"/api/v1/receivers/{created['id']}/test/")  # a disabled receiver can be tried
    assert test.status_code == 202, test.content
    assert test.json()["event_type"] == "test" and test.json()["status"] == "pending"
    assert tasks.deliver(test.json()["id"]) == "delivered"
    [got] = receiver_server.at("/team")
    assert got.verified and got.json["type"] == "test"
    assert got.json["data"]["title"] == "Test notification to team"
    assert AuditEvent.objects.filter(action="receiver.test", target_id=str(created["id"])).exists()

    assert oncall.delete(f"/api/v1/receivers/{created['id']}/").status_code == 204
    assert oncall.get(f"/api/v1/receivers/{created['id']}/").status_code == 404
    assert not Delivery.objects.filter(pk=test.json()["id"]).exists()
    assert AuditEvent.objects.get(action="receiver.delete", target_id=str(created["id"])).after == {
        "deliveries_deleted": 1}


def test_deliveries_are_listed_newest_first_filtered_by_receiver_and_status_with_the_log_in_detail(
        receiver_server, broker, fast, client_as):
    reader = client_as(Role.CI)
    a = receiver_at(receiver_server, "/a", 200)
    b = receiver_at(receiver_server, "/b", (400, "nope", {}))
    first = notify.notify("alert.firing", PAYLOAD)
    second = notify.notify("alert.resolved", PAYLOAD)
    for delivery in first + second:
        tasks.deliver(delivery.pk)

    listed = reader.get("/api/v1/deliveries/").json()
    assert listed["count"] == 4
    assert [d["id"] for d in listed["results"]] == sorted((d.pk for d in first + second), reverse=True)
    assert "log" not in listed["results"][0] and "payload" not in listed["results"][0]

    of_b = reader.get(f"/api/v1/deliveries/?receiver={b.pk}").json()["results"]
    assert {d["receiver_name"] for d in of_b} == {"hook-b"} and len(of_b) == 2
    failed = reader.get("/api/v1/deliveries/?status=failed").json()["results"]
    assert {d["receiver"] for d in failed} == {b.pk} and all(d["last_status_code"] == 400 for d in failed)
    delivered_to_a = reader.get(f"/api/v1/deliveries/?receiver={a.pk}&status=delivered&event_type=alert.resolved")
    assert [d["id"] for d in delivered_to_a.json()["results"]] == [d.pk for d in second if d.receiver_id == a.pk]
    assert reader.get("/api/v1/deliveries/?status=lost").status_code == 400

    detail = reader.get(f"/api/v1/deliveries/{failed[0]['id']}/").json()
    assert detail["payload"] == PAYLOAD
    [entry] = detail["log"]
    assert entry["status_code"] == 400 and entry["error"] == "HTTP 400 Bad Request: nope" and entry["attempt"] == 1
    assert set(entry) == {"at", "attempt", "status_code", "error", "seconds"}
    assert reader.get("/api/v1/deliveries/999999/").status_code == 404
    assert reader.post(f"/api/v1/deliveries/{failed[0]['id']}/redeliver/").status_code == 403


# ---- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_through_the_broker_and_a_real_worker_a_retry_waits_its_countdown_and_the_delivery_ends_delivered(
        receiver_server, platform_process):
    import uuid

    receiver_at(receiver_server, "/worker", 503, 200)
    worker = ["celery", "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "1", "--queues", "default",
              "--hostname", f"notify-{uuid.uuid4().hex[:6]}@%h"]
    with platform_process(worker, "worker", {"PLATFORM_WEBHOOK_BACKOFF_S": "0.5"}):
        with transaction.atomic():
            [delivery] = notify.notify("alert.firing", PAYLOAD)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            delivery.refresh_from_db()
            if delivery.status != DeliveryStatus.PENDING:
                break
            time.sleep(0.2)
    assert delivery.status == DeliveryStatus.DELIVERED, (delivery.status, delivery.log)
    assert [entry["status_code"] for entry in delivery.log] == [503, 200]
    first, second = receiver_server.at("/worker")
    assert first.verified and second.verified
    assert second.at - first.at >= 0.5  # the countdown, in the worker's settings
