"""The figures behind the alert page's charts: SLO counts per sampling interval summed over gateways (a
gateway that restarted counts from zero), and the drift checks that reached a verdict."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.models import DriftCheck, SloSample
from monitoring.selectors import drift_series, slo_series
from registry.models import ModelVersion, RegisteredModel

pytestmark = pytest.mark.django_db


def test_slo_series_sums_gateways_per_interval_and_counts_a_restart_from_zero(unique_name):
    model = RegisteredModel.objects.create(name=unique_name)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    start = timezone.now().replace(microsecond=0) - timedelta(minutes=10)
    start -= timedelta(seconds=start.second)  # on a minute: each sample falls in its own 60 s bucket
    cumulative = {"a": [(100, 1, 2), (200, 1, 4), (300, 3, 4), (40, 0, 1)],  # "a" restarted before the last sample
                  "b": [(50, 0, 0), (100, 0, 5), (150, 0, 5), (200, 2, 5)]}
    for source, counts in cumulative.items():
        for i, (requests, errors, slow) in enumerate(counts):
            SloSample.objects.create(version=version, source=source, at=start + timedelta(seconds=60 * i + 5),
                                     requests=requests, errors=errors, slow=slow, latency_ms=250)
    series = slo_series(version, start - timedelta(minutes=1), 60.0)
    assert [p["requests"] for p in series] == [150, 150, 90]
    assert [p["error_rate"] for p in series] == [0, 2 / 150, 2 / 90]
    assert [p["slow_share"] for p in series] == [7 / 150, 0, 1 / 90]
    assert series[0]["at"] == (start + timedelta(seconds=60)).timestamp()


def test_drift_series_keeps_only_checks_with_a_verdict(unique_name):
    model = RegisteredModel.objects.create(name=unique_name)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    for outcome, share in (("no_drift", 0.1), ("not_enough_data", 0.0), ("drift", 0.7)):
        DriftCheck.objects.create(version=version, outcome=outcome, drifted_share=share, summary="x")
    found = drift_series(version, timezone.now() - timedelta(hours=1))
    assert [(p["outcome"], p["drifted_share"]) for p in found] == [("no_drift", 0.1), ("drift", 0.7)]
