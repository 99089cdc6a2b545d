"""Alerts on real PostgreSQL: one open alert per fingerprint, its lifecycle by role through the API, a
drift check raising and clearing it, notifications to the receivers (rows only here; sending is
monitoring/tests/test_notify.py's), resolving by itself and notifying again on time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring import alerts
from monitoring.models import Alert, AlertKind, AlertStatus, Delivery, Receiver
from registry.models import AuditEvent, ModelVersion, RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)


def _version(name: str) -> ModelVersion:
    model = RegisteredModel.objects.create(name=name)
    return ModelVersion.objects.create(model=model, version=2, origin="upload", source="s", status="ready")


@pytest.fixture
def receiver(db):
    return Receiver.objects.create(name="oncall-hook", kind="json", url="http://127.0.0.1:9/hook")


def _events() -> list[str]:
    return list(Delivery.objects.order_by("pk").values_list("event_type", flat=True))


def test_a_condition_seen_again_refreshes_the_one_open_alert_and_notifies_once(unique_name, receiver):
    version = _version(unique_name)
    first = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "2 of 13 columns drifted", {"n": 1})
    again = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "5 of 13 columns drifted", {"n": 2})
    assert again.pk == first.pk and again.summary == "5 of 13 columns drifted" and again.evidence == {"n": 2}
    assert first.fingerprint == f"{unique_name}:2:drift" and first.status == AlertStatus.FIRING
    assert "roll back to the previous champion" in first.runbook
    assert Alert.objects.filter(fingerprint=first.fingerprint).count() == 1
    assert _events() == ["alert.firing"]
    payload = Delivery.objects.get().payload
    assert payload["title"] == "drift" and payload["alert"]["model"] == unique_name
    assert payload["url"].endswith(f"/alerts/{first.pk}/")


def test_clear_long_enough_resolves_by_itself_and_the_condition_coming_back_is_a_new_alert(
        unique_name, receiver, settings):
    settings.PLATFORM = {**settings.PLATFORM, "ALERT_RESOLVE_AFTER_S": 600.0}
    version = _version(unique_name)
    alert = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "x", {})
    alerts.alert_clear(version, AlertKind.DRIFT)
    assert Alert.objects.get(pk=alert.pk).status == AlertStatus.FIRING  # clear just now: not yet
    Alert.objects.filter(pk=alert.pk).update(clear_since=timezone.now() - timedelta(minutes=11))
    done = alerts.alert_clear(version, AlertKind.DRIFT)
    assert done.status == AlertStatus.RESOLVED and done.resolution.startswith("resolved by itself: its condition "
                                                                             "has been clear for 11 min")
    assert _events() == ["alert.firing", "alert.resolved"]
    new = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "back", {})
    assert new.pk != alert.pk and new.status == AlertStatus.FIRING


def test_seen_again_while_clearing_stays_open(unique_name):
    version = _version(unique_name)
    alert = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "x", {})
    Alert.objects.filter(pk=alert.pk).update(clear_since=timezone.now() - timedelta(hours=2))
    alerts.alert_seen(version, AlertKind.DRIFT, "drift", "y", {})
    assert Alert.objects.get(pk=alert.pk).clear_since is None
    assert alerts.alert_clear(version, AlertKind.DRIFT).status == AlertStatus.FIRING


def test_unacknowledged_alerts_are_notified_again_silenced_ones_are_not(unique_name, receiver, settings):
    settings.PLATFORM = {**settings.PLATFORM, "ALERT_RENOTIFY_S": 3600.0}
    version = _version(unique_name)
    loud = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "x", {})
    quiet = alerts.alert_seen(version, AlertKind.ERRORS, "errors", "y", {})
    assert alerts.alerts_tick() == 0
    an_hour_ago = timezone.now() - timedelta(minutes=61)
    Alert.objects.update(last_notified_at=an_hour_ago)
    Alert.objects.filter(pk=quiet.pk).update(silenced_until=timezone.now() + timedelta(hours=1))
    alerts.alerts_tick()
    assert _events() == ["alert.firing", "alert.firing", "alert.renotify"]
    assert Delivery.objects.last().payload["alert"]["id"] == loud.pk


def test_on_call_acknowledges_silences_and_resolves_through_the_api_and_others_cannot(unique_name, client_as):
    version = _version(unique_name)
    alert = alerts.alert_seen(version, AlertKind.DRIFT, "drift", "x", {})
    other = alerts.alert_seen(_version(unique_name + "-b"), AlertKind.DRIFT, "drift", "z", {})
    alerts.alert_acknowledge(alerts.SYSTEM, other.pk)
    scientist, oncall = client_as(Role.DATA_SCIENTIST), client_as(Role.ONCALL)

    listed = scientist.get("/api/v1/alerts/").json()["results"]
    assert [a["id"] for a in listed] == [alert.pk, other.pk]  # firing before acknowledged
    assert scientist.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").status_code == 403

    acked = oncall.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").json()
    assert acked["status"] == "acknowledged" and acked["owner"] == oncall.user.username
    assert oncall.post(f"/api/v1/alerts/{alert.pk}/acknowledge/").status_code == 409
    bad = oncall.post(f"/api/v1/alerts/{alert.pk}/silence/", {"until": "2000-01-01T00:00:00Z", "reason": "x"},
                      format="json")
    assert bad.status_code == 400 and "in the future" in bad.json()["error"]["message"]
    until = (timezone.now() + timedelta(hours=2)).isoformat()
    silenced = oncall.post(f"/api/v1/alerts/{alert.pk}/silence/", {"until": until, "reason": "upstream fix at 3"},
                           format="json").json()
    assert silenced["silenced"] and silenced["silence_reason"] == "upstream fix at 3"
    done = oncall.post(f"/api/v1/alerts/{alert.pk}/resolve/", {"resolution": "units fixed upstream"},
                       format="json").json()
    assert done["status"] == "resolved" and done["resolution"] == "units fixed upstream"
    assert [a["id"] for a in oncall.get("/api/v1/alerts/").json()["results"]] == [other.pk]
    actions = set(AuditEvent.objects.filter(target_type="alert", target_id=str(alert.pk))
                  .values_list("action", flat=True))
    assert actions == {"alert.firing", "alert.acknowledged", "alert.silence", "alert.resolved"}
