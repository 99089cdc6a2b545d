"""The platform's drift and alert figures at GET /metrics, as a Prometheus reads them: each version's latest
check of the last day, figures only for a judged one, per-column scores (bounded), open alerts by model, kind
and status; a platform token is needed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from monitoring.models import Alert, AlertKind, AlertStatus, DriftCheck, DriftOutcome
from registry.models import ModelVersion, RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db

COLUMNS = [
    {"column": "input_0", "method": "K-S p_value", "threshold": 0.05, "score": 1.2e-09, "drifted": True,
     "is_output": False},
    {"column": "input_1", "method": "K-S p_value", "threshold": 0.05, "score": 0.41, "drifted": False,
     "is_output": False},
    {"column": "prediction", "method": "chi-square p_value", "threshold": 0.05, "score": 0.003, "drifted": True,
     "is_output": True},
]


def _versions(name: str, n: int) -> list[ModelVersion]:
    model = RegisteredModel.objects.create(name=name)
    return [ModelVersion.objects.create(model=model, version=i, origin="upload", source="s", status="ready")
            for i in range(1, n + 1)]


def _check(version: ModelVersion, outcome: str, age: timedelta = timedelta(0), **fields) -> DriftCheck:
    check = DriftCheck.objects.create(version=version, outcome=outcome, summary="s", current_rows=250,
                                      reference_rows=180, **fields)
    DriftCheck.objects.filter(pk=check.pk).update(created_at=timezone.now() - age)
    return check


def _samples(text: str, model: str) -> dict[tuple, float]:
    """{(sample name, label values but model...): value} of the model's series."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == model:
                out[(s.name, *(v for k, v in sorted(s.labels.items()) if k != "model"))] = s.value
    return out


def test_each_versions_latest_check_of_the_last_day_is_exported_with_figures_only_when_judged(unique_name):
    v1, v2, v3 = _versions(unique_name, 3)
    _check(v1, DriftOutcome.NO_DRIFT, timedelta(hours=2))
    latest = _check(v1, DriftOutcome.DRIFT, timedelta(minutes=5), dataset_drift=True, prediction_drift=True,
                    drifted_share=2 / 3, drift_share=0.5, columns=COLUMNS)
    _check(v2, DriftOutcome.DRIFT, timedelta(hours=1), drifted_share=1.0, columns=COLUMNS)
    _check(v2, DriftOutcome.NOT_ENOUGH_DATA)  # newest: it says so, and shows no figures
    _check(v3, DriftOutcome.DRIFT, timedelta(days=1, minutes=1), drifted_share=1.0)  # too old
    got = _samples(metrics.exposition().decode(), unique_name)

    assert got[("mlops_drift_drifted_share", "1")] == pytest.approx(2 / 3)
    assert got[("mlops_drift_share_threshold", "1")] == 0.5
    assert got[("mlops_drift_dataset_drift", "1")] == 1 and got[("mlops_drift_prediction_drift", "1")] == 1
    assert got[("mlops_drift_check_timestamp_seconds", "1")] == pytest.approx(
        DriftCheck.objects.get(pk=latest.pk).created_at.timestamp())
    assert got[("mlops_drift_check_outcome", "drift", "1")] == 1
    assert got[("mlops_drift_check_outcome", "no_drift", "1")] == 0
    assert got[("mlops_drift_rows", "current", "1")] == 250 and got[("mlops_drift_rows", "reference", "1")] == 180
    # labels sorted by name: column, method, version
    assert got[("mlops_drift_column_score", "input_0", "K-S p_value", "1")] == pytest.approx(1.2e-09)
    assert got[("mlops_drift_column_threshold", "input_0", "K-S p_value", "1")] == 0.05
    assert got[("mlops_drift_column_drifted", "input_1", "K-S p_value", "1")] == 0
    assert got[("mlops_drift_column_drifted", "prediction", "chi-square p_value", "1")] == 1
    assert got[("mlops_drift_columns_left_out", "1")] == 0

    assert got[("mlops_drift_check_outcome", "not_enough_data", "2")] == 1
    assert got[("mlops_drift_check_outcome", "drift", "2")] == 0
    assert ("mlops_drift_drifted_share", "2") not in got
    assert not any(key[0] == "mlops_drift_column_score" and key[-1] == "2" for key in got)
    assert not any(key[-1] == "3" for key in got)


def test_columns_past_the_bound_are_left_out_drifted_ones_kept_and_counted(unique_name, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_COLUMNS", 2)
    (v1,) = _versions(unique_name, 1)
    _check(v1, DriftOutcome.DRIFT, columns=COLUMNS, drifted_share=2 / 3)
    got = _samples(metrics.exposition().decode(), unique_name)
    scored = {key[1] for key in got if key[0] == "mlops_drift_column_score"}
    assert scored == {"input_0", "prediction"}
    assert got[("mlops_drift_columns_left_out", "1")] == 1


def test_open_alerts_are_counted_by_model_kind_and_status(unique_name):
    v1, v2 = _versions(unique_name, 2)
    now = timezone.now()

    def alert(version: ModelVersion, kind: str, status: str) -> None:
        Alert.objects.create(fingerprint=f"{unique_name}/{version.version}/{kind}/{status}", model=version.model,
                             version=version, kind=kind, status=status, title="t", summary="s", runbook="r",
                             last_seen_at=now)

    alert(v1, AlertKind.DRIFT, AlertStatus.FIRING)
    alert(v2, AlertKind.DRIFT, AlertStatus.FIRING)
    alert(v2, AlertKind.ERRORS, AlertStatus.ACKNOWLEDGED)
    alert(v1, AlertKind.LATENCY, AlertStatus.RESOLVED)
    got = {k: v for k, v in _samples(metrics.exposition().decode(), unique_name).items()
           if k[0] == "mlops_alerts_open"}
    assert got[("mlops_alerts_open", "drift", "firing")] == 2
    assert got[("mlops_alerts_open", "errors", "acknowledged")] == 1
    assert got[("mlops_alerts_open", "latency", "firing")] == 0  # resolved ones are not open
    assert len(got) == len(AlertKind.values) * 2  # every kind and open status of the model, zeros included


def test_the_endpoint_needs_a_platform_token_and_serves_every_family_in_prometheus_text(client_as, unique_name):
    from rest_framework.test import APIClient

    (v1,) = _versions(unique_name, 1)
    _check(v1, DriftOutcome.DRIFT, columns=COLUMNS, drifted_share=2 / 3)
    Alert.objects.create(fingerprint=unique_name, model=v1.model, version=v1, kind=AlertKind.DRIFT, title="t",
                         summary="s", runbook="r", last_seen_at=timezone.now())
    assert APIClient().get("/metrics").status_code == 401
    prometheus_accepts = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                          "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    resp = client_as(Role.CI).get("/metrics", HTTP_ACCEPT=prometheus_accepts)
    assert resp.status_code == 200
    assert resp["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(resp.content.decode()) if f.samples}
    assert names == set(metrics.FAMILIES)


def test_a_scrape_reads_a_bounded_number_of_rows_whatever_the_history(unique_name, django_assert_max_num_queries):
    versions = _versions(unique_name, 3)
    for v in versions:
        for minutes in range(0, 60, 5):
            _check(v, DriftOutcome.NO_DRIFT, timedelta(minutes=minutes), columns=COLUMNS)
    with django_assert_max_num_queries(3):  # the newest ids, their checks, the open alerts
        text = metrics.exposition().decode()
    assert text.count(f'mlops_drift_drifted_share{{model="{unique_name}"') == 3
