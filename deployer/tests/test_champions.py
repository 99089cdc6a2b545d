"""Champion rollback (deployer/champions.py): by hand through the API and the alert page, and automatically
on a champion's firing alert where the model's policy asks for it, only when a person would sign it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_wine

from deployer import champions, services
from deployer.models import Deployment, Endpoint, RolloutMode, RolloutStatus
from deployer.testing import champion_after, servable_model
from monitoring import alerts
from monitoring.models import AlertKind, MonitorPolicy
from monitoring.testing import capture_rows, write_reference
from registry.audit import SYSTEM
from registry.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)


class _PlacingFleet:
    """A fleet that has the model loaded at once (loading itself is tested end to end in test_rollouts.py)."""

    kind = "placing"

    def place(self, placement):
        return None


def test_on_call_rolls_the_champion_back_and_the_previous_one_serves_once_loaded(client_as, unique_name, monkeypatch):
    oncall = client_as("oncall")
    model = servable_model(unique_name)
    champion_after(model, 1, 2)
    assert client_as("data_scientist").post(f"/api/v1/models/{unique_name}/rollback/", {"reason": "x"},
                                            format="json").status_code == 403
    assert oncall.post(f"/api/v1/models/{unique_name}/rollback/", {}, format="json").status_code == 400
    resp = oncall.post(f"/api/v1/models/{unique_name}/rollback/", {"reason": "answers wrong since 10:00"},
                       format="json")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert (body["mode"], body["version"], body["previous_version"], body["steps"], body["status"]) == (
        "restore", 1, 2, [100], "pending")
    again = oncall.post(f"/api/v1/models/{unique_name}/rollback/", {"reason": "twice"}, format="json")
    assert again.status_code == 409 and "abort it first" in again.json()["error"]["message"]

    monkeypatch.setattr(services, "fleet", lambda: _PlacingFleet())
    services.rollout_advance(Deployment.objects.get(pk=body["id"]))
    d = Deployment.objects.get(pk=body["id"])
    assert d.status == RolloutStatus.PROMOTED
    assert d.reason == (f"champion rollback: v1 restored in place of v2: answers wrong since 10:00 (by "
                        f"{oncall.user.username})")
    assert Endpoint.objects.get(model=model).stable_version.version == 1


def test_there_is_nothing_to_roll_back_to_from_a_first_champion_and_restore_is_not_a_rollout_mode(client_as,
                                                                                                  unique_name):
    manager = client_as("release_manager")
    model = servable_model(unique_name)
    Endpoint.objects.create(model=model, stable_version=model.versions.get(version=1))
    resp = manager.post(f"/api/v1/models/{unique_name}/rollback/", {"reason": "x"}, format="json")
    assert resp.status_code == 409
    assert resp.json()["error"]["message"] == (f"v1 of {unique_name} is its first champion; there is no previous "
                                               "champion to go back to")
    sneaky = manager.post("/api/v1/deployments/", {"model": unique_name, "version": 2, "mode": "restore"},
                          format="json")
    assert sneaky.status_code == 400


@pytest.fixture
def drifting_champion(unique_name):
    """v2 is champion after v1; both have reference sets from the wine data; v2's traffic is captured."""
    X, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    model = servable_model(unique_name)
    champion_after(model, 1, 2)
    v1, v2 = model.versions.get(version=1), model.versions.get(version=2)
    write_reference(v1, X[:89], y[:89].tolist())
    write_reference(v2, X[:89], y[:89].tolist())
    MonitorPolicy.objects.create(model=model, min_rows=50, rollback_on_drift=True)
    return model, v1, v2, X[89:], y[89:]


def _decisions(alert):
    return list(AuditEvent.objects.filter(target_type="alert", target_id=str(alert.pk)).exclude(
        action="alert.firing").values_list("action", "after"))


def test_a_drift_alert_rolls_back_only_if_the_previous_champion_would_not_drift_too(drifting_champion):
    model, v1, v2, X, y = drifting_champion
    shifted = X.copy()
    shifted[:, :8] *= 1.5
    capture_rows(v2, shifted, y.tolist())
    alert = alerts.alert_seen(v2, AlertKind.DRIFT, "drift", "inputs drifted", {})
    assert champions.champions_guard() == 0
    [(action, after)] = _decisions(alert)
    assert action == "alert.rollback_declined"
    assert after["reason"].startswith("the traffic drifts from the previous champion v1's reference set too (drift: ")
    assert "the older model would be no better" in after["reason"]
    assert champions.champions_guard() == 0 and len(_decisions(alert)) == 1  # decided once
    assert not Deployment.objects.filter(model=model, mode=RolloutMode.RESTORE).exists()


def test_a_drift_alert_rolls_back_to_a_previous_champion_whose_reference_fits_the_traffic(drifting_champion):
    model, v1, v2, X, y = drifting_champion
    capture_rows(v2, X, y.tolist())  # the traffic is like v1's data; say v2 was validated on other data
    shifted = X.copy()
    shifted[:, :8] *= 1.5
    write_reference(v2, shifted, y.tolist())
    alert = alerts.alert_seen(v2, AlertKind.DRIFT, f"{model.name} v2: drift in its inputs", "inputs drifted", {})
    MonitorPolicy.objects.filter(model=model).update(rollback_on_drift=False)
    assert champions.champions_guard() == 0 and _decisions(alert) == []  # off: on-call decides
    MonitorPolicy.objects.filter(model=model).update(rollback_on_drift=True)
    assert champions.champions_guard() == 1
    [(action, after)] = _decisions(alert)
    restore = Deployment.objects.get(model=model, mode=RolloutMode.RESTORE)
    assert action == "alert.rollback" and after["deployment"] == restore.pk
    assert (after["from_version"], after["to_version"]) == (2, 1)
    assert restore.version == v1 and restore.previous_version == v2 and restore.status == RolloutStatus.PENDING
    assert restore.analysis["restore"].startswith(f"alert {alert.pk} ({model.name} v2: drift in its inputs): "
                                                  "automatic rollback (the model's monitoring policy): inputs drifted")
    assert champions.champions_guard() == 0  # decided once


def test_slo_alerts_roll_back_by_policy_but_never_past_a_restored_champion(unique_name):
    model = servable_model(unique_name, versions=3)
    champion_after(model, 1, 2)
    v2 = model.versions.get(version=2)
    MonitorPolicy.objects.create(model=model, rollback_on_slo=True)
    alert = alerts.alert_seen(v2, AlertKind.LATENCY, "latency", "p99 burning 20x", {})
    assert champions.champions_guard() == 1
    assert _decisions(alert)[0][0] == "alert.rollback"

    other = servable_model(unique_name + "-r", versions=3)
    champion_after(other, 2, 1, restored=True)  # v1 came back by a rollback from v2
    MonitorPolicy.objects.create(model=other, rollback_on_slo=True)
    alert = alerts.alert_seen(other.versions.get(version=1), AlertKind.ERRORS, "errors", "5xx burning", {})
    assert champions.champions_guard() == 0
    [(action, after)] = _decisions(alert)
    assert action == "alert.rollback_declined"
    assert after["reason"] == "v1 is itself a restored champion; rolling back further than one champion is a " \
                              "person's call"


def test_an_alert_of_a_version_that_is_no_longer_champion_changes_nothing(unique_name):
    model = servable_model(unique_name)
    champion_after(model, 1, 2)
    MonitorPolicy.objects.create(model=model, rollback_on_slo=True)
    alert = alerts.alert_seen(model.versions.get(version=1), AlertKind.LATENCY, "latency", "burning", {})
    assert champions.champions_guard() == 0 and _decisions(alert) == []
    with pytest.raises(services.DeployError, match="not the champion any more"):
        champions.rollback_for_alert(SYSTEM, alert, "by hand")
