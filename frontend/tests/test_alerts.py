"""The alert pages through Django's test client: the inbox's order and filters, what an alert's page shows,
who may act on it, and what acknowledging, silencing and resolving do; the model page's Monitoring section."""

from __future__ import annotations

import gzip
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.alerts import alert_acknowledge, alert_resolve, alert_seen
from monitoring.models import Alert, AlertKind, AlertStatus, DriftCheck, DriftOutcome, DriftReport, MonitorPolicy
from registry.audit import SYSTEM
from registry.models import ModelVersion, RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db


def version(name: str, number: int = 1) -> ModelVersion:
    model, _ = RegisteredModel.objects.get_or_create(name=name, defaults={"latest_version": number,
                                                                          "version_count": number})
    return ModelVersion.objects.create(model=model, version=number, status="ready", source="x", origin="test")


def drift_alert(v: ModelVersion, title: str = "drift in its inputs", with_check: bool = True) -> Alert:
    check_id = 0
    if with_check:
        check = DriftCheck.objects.create(version=v, outcome=DriftOutcome.DRIFT, dataset_drift=True, drifted_share=0.6,
                                          summary="drift: 3 of 5 columns drifted", columns=[])
        DriftReport.objects.create(drift_check=check, html_gz=gzip.compress(b"<html><body>report</body></html>"))
        check_id = check.pk
    return alert_seen(v, AlertKind.DRIFT, title, "drift: 3 of 5 columns drifted (60%) in 300 rows: input_0 (K-S)", {
        "drift_check": check_id, "drifted_share": 0.6,
        "drifted_columns": [{"column": "input_0", "method": "K-S p_value", "threshold": 0.05, "score": 1.2e-09},
                            {"column": "input_3", "method": "Wasserstein distance (normed)", "threshold": 0.1,
                             "score": 0.42}],
        "report": f"/api/v1/models/{v.model.name}/versions/{v.version}/drift/{check_id}/report/"})


def rows(html: str) -> list[int]:
    """The alert ids of the inbox's rows, in order."""
    return [int(i) for i in re.findall(r'<tr data-alert="(\d+)"', html)]


def test_the_inbox_lists_firing_then_acknowledged_alerts_newest_first_and_hides_resolved_ones(browser_as, unique_name):
    client = browser_as(Role.DATA_SCIENTIST)
    older = drift_alert(version(unique_name, 1))
    acked = drift_alert(version(unique_name, 2))
    newer = drift_alert(version(unique_name, 3))
    done = drift_alert(version(unique_name, 4))
    alert_acknowledge(SYSTEM, acked.pk)
    alert_resolve(SYSTEM, done.pk, "a known upstream change")
    Alert.objects.filter(pk=acked.pk).update(last_seen_at=timezone.now() + timedelta(minutes=5))  # newest of all

    html = client.get("/alerts/", {"model": unique_name}).content.decode()
    assert rows(html) == [newer.pk, older.pk, acked.pk]
    assert f'href="/models/{unique_name}/versions/3/"' in html and "drift in its inputs" in html
    everything = client.get("/alerts/", {"model": unique_name, "status": "all"}).content.decode()
    assert rows(everything) == [newer.pk, older.pk, acked.pk, done.pk]
    resolved = client.get("/alerts/", {"model": unique_name, "status": "resolved"}).content.decode()
    assert rows(resolved) == [done.pk]


def test_the_inbox_filters_by_model_and_pages_and_the_nav_counts_firing_alerts(browser_as, unique_name):
    client = browser_as(Role.DATA_SCIENTIST)
    mine = [drift_alert(version(unique_name, n), with_check=False) for n in range(1, 28)]
    other = drift_alert(version(f"{unique_name}-b"), with_check=False)
    first = client.get("/alerts/", {"model": unique_name}).content.decode()
    assert len(rows(first)) == 25 and other.pk not in rows(first)
    assert "Page 1 of 2 · 27 alerts" in first
    second = client.get("/alerts/", {"model": unique_name, "page": 2}).content.decode()
    assert rows(second) == [mine[1].pk, mine[0].pk]
    firing = Alert.objects.filter(status=AlertStatus.FIRING).count()
    assert re.search(rf'id="firing-count"[^>]*>{firing}</span>', first)


def test_the_alert_page_shows_the_evidence_the_runbook_the_report_and_no_buttons_to_a_data_scientist(
        browser_as, unique_name):
    alert = drift_alert(version(unique_name))
    client = browser_as(Role.DATA_SCIENTIST)
    resp = client.get(f"/alerts/{alert.pk}/")
    html = resp.content.decode()
    assert resp.status_code == 200
    assert "drift: 3 of 5 columns drifted (60%) in 300 rows" in html
    table = re.search(r'<table[^>]*id="drifted-columns".*?</table>', html, re.S)
    assert table is not None
    assert "input_0" in table.group(0) and "K-S p_value" in table.group(0) and "1.2e-09" in table.group(0)
    assert "Wasserstein distance (normed)" in table.group(0) and "0.42" in table.group(0)
    assert '<pre class="runbook">1. Open the drift check' in html
    assert alert.fingerprint in html
    report = alert.evidence["report"]
    assert f'<iframe class="drift-report" sandbox="allow-scripts" src="{report}"' in html
    assert client.get(report)["X-Frame-Options"] == "SAMEORIGIN"
    assert 'id="alert-actions"' not in html and 'data-action="acknowledge"' not in html

    for action in ("acknowledge", "resolve", "silence"):
        assert client.post(f"/alerts/{alert.pk}/{action}/", {"resolution": "x", "reason": "x"}).status_code == 403
    alert.refresh_from_db()
    assert alert.status == AlertStatus.FIRING and alert.silenced_until is None


def test_an_slo_alert_shows_its_burn_rates_per_window(browser_as, unique_name):
    alert = alert_seen(version(unique_name), AlertKind.LATENCY, "latency burning", "burn rates 1h 20.0, 5m 31.0",
                       {"burn_rates": {"1h": 20.0, "5m": 31.0, "6h": 3.2}, "pair": ["1h", "5m"]})
    html = browser_as(Role.ONCALL).get(f"/alerts/{alert.pk}/").content.decode()
    table = re.search(r'<table[^>]*id="burn-rates".*?</table>', html, re.S)
    assert table is not None
    assert re.findall(r"<tr><td>(\w+)</td><td class=\"num\">([\d.]+)</td></tr>", table.group(0)) == [
        ("1h", "20"), ("5m", "31"), ("6h", "3.2")]
    assert "<iframe" not in html


def test_on_call_acknowledges_silences_and_resolves_an_alert_and_the_page_shows_the_trail(browser_as, unique_name):
    alert = drift_alert(version(unique_name))
    client = browser_as(Role.ONCALL)
    assert 'data-action="acknowledge"' in client.get(f"/alerts/{alert.pk}/").content.decode()

    resp = client.post(f"/alerts/{alert.pk}/acknowledge/", follow=True)
    alert.refresh_from_db()
    assert alert.status == AlertStatus.ACKNOWLEDGED and alert.owner == client.user
    html = resp.content.decode()
    assert f"Acknowledged alert {alert.pk}" in html
    assert 'data-action="acknowledge"' not in html and 'data-action="resolve"' in html
    assert re.search(r'id="alert-owner">' + re.escape(client.user.username), html)

    # Bad input: the reason is shown on the page and nothing changes.
    past = (timezone.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    html = client.post(f"/alerts/{alert.pk}/silence/", {"until": past, "reason": "known"}, follow=True).content.decode()
    assert "Could not silence alert" in html and "a silence must end in the future" in html
    html = client.post(f"/alerts/{alert.pk}/silence/", {"until": "soon", "reason": ""}, follow=True).content.decode()
    assert "Until must be a date and time" in html and "Say why the alert is silenced" in html
    alert.refresh_from_db()
    assert alert.silenced_until is None

    until = (timezone.now() + timedelta(hours=2)).replace(second=0, microsecond=0)
    html = client.post(f"/alerts/{alert.pk}/silence/", {"until": until.strftime("%Y-%m-%dT%H:%M"),
                                                        "reason": "upstream backfill until noon"},
                       follow=True).content.decode()
    alert.refresh_from_db()
    assert alert.silenced_until == until and alert.silence_reason == "upstream backfill until noon"
    assert f"until {until:%Y-%m-%d %H:%M} UTC" in html

    html = client.post(f"/alerts/{alert.pk}/resolve/", {"resolution": "new sensor firmware; retrained"},
                       follow=True).content.decode()
    alert.refresh_from_db()
    assert alert.status == AlertStatus.RESOLVED and alert.resolution == "new sensor firmware; retrained"
    assert 'id="alert-actions"' not in html and "new sensor firmware; retrained" in html

    # A second resolve is refused by the lifecycle, and said so.
    html = client.post(f"/alerts/{alert.pk}/resolve/", {"resolution": "again"}, follow=True).content.decode()
    assert "Could not resolve alert" in html

    history = re.search(r'id="alert-history".*?</section>', html, re.S)
    assert history is not None
    actions = re.findall(r'<tr data-action="([\w.]+)">', history.group(0))
    assert actions == ["alert.resolved", "alert.silence", "alert.acknowledged", "alert.firing"]
    assert client.user.username in history.group(0) and "upstream backfill until noon" in history.group(0)


def test_the_model_page_shows_its_open_alerts_and_each_versions_latest_drift_check(browser_as, unique_name):
    v1, v2 = version(unique_name, 1), version(unique_name, 2)
    alert = drift_alert(v2)
    DriftCheck.objects.create(version=v1, outcome=DriftOutcome.NOT_ENOUGH_DATA, summary="only 12 captured rows")
    html = browser_as(Role.DATA_SCIENTIST).get(f"/models/{unique_name}/").content.decode()
    section = re.search(r'id="model-monitoring".*?</section>', html, re.S)
    assert section is not None
    text = section.group(0)
    assert f'href="/alerts/{alert.pk}/"' in text
    assert re.findall(r'<tr data-version="(\d+)">', text) == ["2", "1"]
    assert "only 12 captured rows" in text and "Not enough captured rows" in text
    check = DriftCheck.objects.filter(version=v2).get()
    assert f'href="/api/v1/models/{unique_name}/versions/2/drift/{check.pk}/report/"' in text
    assert "Policy (the defaults): drift judged on the last 60 min of captured traffic" in text
    assert "automatic champion rollback on no alert (on-call decides)" in text
    MonitorPolicy.objects.create(model=v1.model, rollback_on_drift=True, window_minutes=15)
    text = browser_as(Role.DATA_SCIENTIST).get(f"/models/{unique_name}/").content.decode()
    assert "Policy: drift judged on the last 15 min" in text and "automatic champion rollback on drift alerts" in text


def test_the_alert_page_offers_a_rollback_only_to_a_champion_with_a_previous_one(browser_as, unique_name):
    from deployer.testing import champion_after, servable_model

    model = servable_model(unique_name, versions=3)
    champion_after(model, 1, 2)
    alert = drift_alert(model.versions.get(version=2))
    oncall = browser_as(Role.ONCALL)
    html = oncall.get(f"/alerts/{alert.pk}/").content.decode()
    assert "Restore <a" in html and ">v1</a>, the champion before v2" in html
    assert f'action="/alerts/{alert.pk}/rollback/"' in html
    scientist = browser_as(Role.DATA_SCIENTIST).get(f"/alerts/{alert.pk}/").content.decode()
    assert "Rolling back needs the on-call engineer or release manager role" in scientist
    assert browser_as(Role.DATA_SCIENTIST).post(f"/alerts/{alert.pk}/rollback/", {"reason": "x"}).status_code == 403
    old = drift_alert(model.versions.get(version=3))  # v3 never served
    html = oncall.get(f"/alerts/{old.pk}/").content.decode()
    assert "No rollback from here: v3 is not the champion any more." in html
