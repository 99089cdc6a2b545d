"""A model's monitoring policy through the API: the defaults until changed, validated changes by the roles
that answer for paging and serving, each audited."""

from __future__ import annotations

import pytest

from monitoring import drift
from registry.models import AuditEvent, RegisteredModel

pytestmark = pytest.mark.django_db


def test_the_policy_reads_as_defaults_then_changes_with_an_audit_row(client_as, unique_name):
    RegisteredModel.objects.create(name=unique_name)
    reader = client_as("data_scientist")
    body = reader.get(f"/api/v1/models/{unique_name}/monitoring/").json()
    assert (body["drift_share"], body["canary_drift_gate"], body["rollback_on_drift"], body["rollback_on_slo"]) == (
        0.5, True, False, False)
    assert reader.patch(f"/api/v1/models/{unique_name}/monitoring/", {"rollback_on_slo": True},
                        format="json").status_code == 403
    oncall = client_as("oncall")
    changed = oncall.patch(f"/api/v1/models/{unique_name}/monitoring/",
                           {"rollback_on_drift": True, "drift_method": "psi", "min_rows": 100}, format="json")
    assert changed.status_code == 200, changed.content
    assert (changed.json()["rollback_on_drift"], changed.json()["drift_method"], changed.json()["min_rows"]) == (
        True, "psi", 100)
    assert reader.get(f"/api/v1/models/{unique_name}/monitoring/").json()["rollback_on_drift"] is True
    event = AuditEvent.objects.get(action="monitor_policy.update", target_id=unique_name)
    assert event.before == {"rollback_on_drift": False, "drift_method": "", "min_rows": 200}
    assert event.actor_name == oncall.user.username


@pytest.mark.parametrize(("body", "says"), [
    ({"drift_share": 1.5}, "drift_share"),
    ({"capture_fraction": 0}, "capture_fraction"),
    ({"min_rows": 20_000, "max_rows": 10_000}, "min_rows (20000) is above max_rows (10000)"),
    ({"drift_method": "astrology"}, "one of TVD, anderson"),
    ({"window_minutes": 0}, "window_minutes"),
    ({"max_rows": 10_000_000}, "max_rows"),
])
def test_bad_policy_changes_are_refused_saying_what_is_wrong(client_as, unique_name, body, says):
    RegisteredModel.objects.create(name=unique_name)
    resp = client_as("release_manager").patch(f"/api/v1/models/{unique_name}/monitoring/", body, format="json")
    assert resp.status_code == 400
    assert says in resp.content.decode()
    assert not AuditEvent.objects.filter(action="monitor_policy.update", target_id=unique_name).exists()


def test_the_methods_a_policy_may_name_are_the_ones_evidently_knows():
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests

    tabular = {name for name in _registered_stat_tests if "text" not in name}
    assert tabular == drift.METHODS
