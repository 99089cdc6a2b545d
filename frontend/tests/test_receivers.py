"""The receivers pages through Django's test client: who sees what, creating a receiver with its subscription
(the secret shown once), editing it, and the services' refusals shown on the form."""

from __future__ import annotations

import re

import pytest

from monitoring import notify
from monitoring.models import Receiver
from registry.audit import SYSTEM
from registry.models import AuditEvent
from registry.roles import Role

pytestmark = pytest.mark.django_db


def test_on_call_adds_a_receiver_subscribed_to_some_events_of_some_models_and_sees_its_secret_once(browser_as):
    oncall = browser_as(Role.ONCALL)
    page = oncall.get("/receivers/")
    assert page.status_code == 200 and b'id="receiver-form"' in page.content
    assert b"promotion.break_glass" in page.content  # the catalogue is offered
    assert re.search(rb'name="enabled"[^>]*checked', page.content)  # a new receiver is enabled unless unticked

    created = oncall.post("/receivers/", {"name": "releases", "kind": "slack", "url": "https://hooks.example/T1/x",
                                          "enabled": "on", "event_types": ["rollout.promoted", "canary.started"],
                                          "models": "digits\nfraud, digits"})
    assert created.status_code == 201, created.content
    receiver = Receiver.objects.get(name="releases")
    assert receiver.event_types == ["canary.started", "rollout.promoted"]
    assert receiver.model_names == ["digits", "fraud"] and receiver.enabled
    assert receiver.secret.encode() in created.content and created["Cache-Control"] == "no-store"
    listed = oncall.get("/receivers/").content.decode()
    assert receiver.secret not in listed
    row = listed[listed.index(f'id="receiver-{receiver.pk}"'):]
    row = row[:row.index("</tr>")]
    assert "rollout.promoted" in row and "fraud" in row and "https://hooks.example/T1/x" in row


def test_the_form_shows_the_services_refusals_and_keeps_what_was_typed(browser_as):
    oncall = browser_as(Role.ONCALL)
    notify.receiver_create(SYSTEM, "taken", "json", "https://hooks.example/taken")

    bad_url = oncall.post("/receivers/", {"name": "team", "kind": "json", "url": "ftp://hooks.example/x",
                                          "event_types": ["hil.failed"]})
    assert bad_url.status_code == 400 and b"url must be an http:// or https:// URL" in bad_url.content
    assert re.search(rb'value="hil.failed"[^>]*checked', bad_url.content)  # what was ticked stays ticked
    unknown = oncall.post("/receivers/", {"name": "team", "kind": "json", "url": "https://hooks.example/x",
                                          "event_types": ["model.deleted"]})
    assert unknown.status_code == 400 and b"model.deleted" in unknown.content
    twin = oncall.post("/receivers/", {"name": "taken", "kind": "json", "url": "https://hooks.example/y"})
    assert twin.status_code == 409 and b"exists already" in twin.content
    assert list(Receiver.objects.values_list("name", flat=True)) == ["taken"]


def test_editing_a_receiver_changes_its_subscription_and_is_audited(browser_as):
    oncall = browser_as(Role.ONCALL)
    receiver = notify.receiver_create(SYSTEM, "team", "json", "https://hooks.example/team",
                                      event_types=["alert.firing"])
    page = oncall.get(f"/receivers/{receiver.pk}/")
    assert page.status_code == 200 and b'value="alert.firing"' in page.content

    saved = oncall.post(f"/receivers/{receiver.pk}/", {"name": "team", "url": "https://hooks.example/team",
                                                       "enabled": "on", "event_types": [], "models": "digits"})
    assert saved.status_code == 302, saved.content
    receiver.refresh_from_db()
    assert receiver.event_types == [] and receiver.model_names == ["digits"] and receiver.kind == "json"
    update = AuditEvent.objects.get(action="receiver.update", target_id=str(receiver.pk))
    assert update.actor_name == oncall.user.username
    assert update.after["changed"] == ["event_types", "model_names"]


def test_others_see_the_receivers_with_urls_cut_to_their_host_and_cannot_change_them(browser_as):
    receiver = notify.receiver_create(SYSTEM, "oncall-slack", "slack", "https://hooks.slack.example/T1/B2/secret",
                                      models=["digits"])
    scientist = browser_as(Role.DATA_SCIENTIST)
    page = scientist.get("/receivers/")
    assert page.status_code == 200
    assert b"https://hooks.slack.example/" in page.content and b"/T1/B2/secret" not in page.content
    assert b'id="receiver-form"' not in page.content and b"digits" in page.content
    assert scientist.post("/receivers/", {"name": "mine", "kind": "json", "url": "https://x.example/"}).status_code \
        == 403
    assert scientist.get(f"/receivers/{receiver.pk}/").status_code == 403
    assert Receiver.objects.count() == 1
