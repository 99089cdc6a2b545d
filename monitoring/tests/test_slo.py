"""SLO burn rates from sampled gateway counters, and the SRE workbook's multi-window alerts: a short burst
does not page, a sustained one does (with its figures in words), and a restarted gateway's counters are
counted from zero."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from monitoring import canary, slo
from monitoring.models import Alert, AlertKind, AlertStatus, MonitorPolicy, SloSample
from registry.models import ModelVersion, RegisteredModel

pytestmark = pytest.mark.django_db(transaction=True)


def _version(name: str) -> ModelVersion:
    model = RegisteredModel.objects.create(name=name)
    MonitorPolicy.objects.create(model=model, slo_availability=0.999, slo_latency_ms=100, slo_latency_target=0.99)
    return ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")


def _series(version: ModelVersion, now: datetime, minutes: int, rps: float, error_share_at, slow_share_at=None,
            source: str = "http://gw:1/metrics") -> None:
    """One sample a minute for `minutes` up to now; error_share_at(minutes_ago) gives that minute's share."""
    requests = errors = slow = 0.0
    rows = []
    for ago in range(minutes, -1, -1):
        n = rps * 60
        requests += n
        errors += n * error_share_at(ago)
        slow += n * (slow_share_at(ago) if slow_share_at else 0.0)
        rows.append(SloSample(version=version, source=source, at=now - timedelta(minutes=ago), requests=requests,
                              errors=errors, slow=slow, latency_ms=100))
    SloSample.objects.bulk_create(rows)


def test_a_short_burst_does_not_page_a_sustained_one_does_and_says_so(unique_name):
    now = timezone.now()
    version = _version(unique_name)
    # 10 minutes at 5% errors after 6 quiet hours: the 5 min window burns 50x, the hour only 8.3x.
    _series(version, now, 360, 10, lambda ago: 0.05 if ago < 10 else 0.0)
    burns = {b.kind: b for b in slo.check(version, MonitorPolicy.objects.get(model=version.model), now)}
    assert burns[AlertKind.ERRORS].rates["5m"] == pytest.approx(50, rel=0.05)
    assert burns[AlertKind.ERRORS].rates["1h"] == pytest.approx(8.33, rel=0.05)
    assert burns[AlertKind.ERRORS].firing_pair is None and not Alert.objects.exists()

    SloSample.objects.all().delete()
    _series(version, now, 360, 10, lambda ago: 0.2 if ago < 10 else 0.0)  # 20%: the hour burns 33x
    burns = {b.kind: b for b in slo.check(version, MonitorPolicy.objects.get(model=version.model), now)}
    assert burns[AlertKind.ERRORS].firing_pair == "1h/5m at 14.4x"
    alert = Alert.objects.get(kind=AlertKind.ERRORS)
    assert alert.status == AlertStatus.FIRING
    assert alert.title == f"{unique_name} v1: error budget burning (1h/5m at 14.4x)"
    assert alert.summary.startswith("objective 99.900% of requests without an error; burn rates ")
    assert "in the last 1h: 1200 of 36000 requests failed" in alert.summary
    assert not Alert.objects.filter(kind=AlertKind.LATENCY).exists()


def test_a_slow_version_burns_its_latency_budget_over_six_hours(unique_name):
    now = timezone.now()
    version = _version(unique_name)
    _series(version, now, 360, 5, lambda ago: 0.0, slow_share_at=lambda ago: 0.08)  # 8% over 100 ms: 8x the 1%
    burns = {b.kind: b for b in slo.check(version, MonitorPolicy.objects.get(model=version.model), now)}
    assert burns[AlertKind.LATENCY].firing_pair == "6h/30m at 6x"
    assert Alert.objects.get(kind=AlertKind.LATENCY).evidence["pair"] == "6h/30m at 6x"


def test_a_gateway_restart_is_counted_from_zero_not_as_a_negative_increase(unique_name):
    now = timezone.now()
    version = _version(unique_name)
    values = [(60, 1000, 0), (40, 1600, 0), (20, 100, 10), (0, 700, 10)]  # restarted between 40 and 20 min ago
    SloSample.objects.bulk_create(SloSample(version=version, source="gw", at=now - timedelta(minutes=ago),
                                            requests=r, errors=e, slow=0, latency_ms=100) for ago, r, e in values)
    counts = slo.window_counts(version, timedelta(hours=1), now)
    assert counts.requests == 600 + 100 + 600 and counts.errors == 10


def test_samples_count_slow_requests_from_the_gateways_histogram(unique_name):
    version = _version(unique_name)
    text = "\n".join([
        "# TYPE gateway_request_duration_seconds histogram",
        *(f'gateway_request_duration_seconds_bucket{{le="{le}",model="{unique_name}",version="1"}} {n}'
          for le, n in (("0.05", 90), ("0.1", 95), ("0.25", 99), ("+Inf", 100))),
        f'gateway_request_duration_seconds_count{{model="{unique_name}",version="1"}} 100',
        f'gateway_request_duration_seconds_sum{{model="{unique_name}",version="1"}} 3.0',
        "# TYPE gateway_request_errors_total counter",
        f'gateway_request_errors_total{{model="{unique_name}",version="1"}} 2',
    ])
    figures = canary.gateway_figures(text, unique_name)["1"]
    slo.record(version, MonitorPolicy.objects.get(model=version.model), {"gw": figures}, timezone.now())
    sample = SloSample.objects.get(version=version)
    assert (sample.requests, sample.errors, sample.slow) == (100, 2, 5)  # 5 slower than the 100 ms objective


def test_the_promql_bucket_is_the_gateways_largest_bound_not_above_the_objective():
    assert slo._bucket_at_or_below(0.1) == "0.1"
    assert slo._bucket_at_or_below(0.3) == "0.25"
    assert slo._bucket_at_or_below(1.0) == "1.0"


def test_the_promql_bucket_matches_the_bound_however_prometheus_spells_it():
    import re

    one, quarter = slo._le_matcher("1.0"), slo._le_matcher("0.25")
    assert all(re.fullmatch(one, le) for le in ("1.0", "1"))  # as scraped, and as Prometheus 3 stores it
    assert not any(re.fullmatch(one, le) for le in ("10.0", "1.05", "0.1", "+Inf"))
    assert re.fullmatch(quarter, "0.25") and not re.fullmatch(quarter, "0x25")


def test_the_promql_query_asks_for_each_figure_of_each_window_of_this_version_only(unique_name):
    version = _version(unique_name)
    query = slo.promql_counts_query(version, MonitorPolicy.objects.get(model=version.model),
                                    [timedelta(minutes=5), timedelta(hours=1)])
    for window in ("300000", "3600000"):
        for figure in ("requests", "errors", "slow"):
            assert f'"figure", "{window}:{figure}"' in query
    assert f'model="{unique_name}",version="1"' in query and 'le=~"0\\\\.1"' in query


def test_an_unreachable_prometheus_leaves_the_version_unjudged_and_the_tick_goes_on(unique_name, settings, caplog):
    from config.stack import free_port

    settings.PLATFORM = {**settings.PLATFORM, "PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}"}
    version = _version(unique_name)
    assert slo.slo_tick([], [version, version]) == 2
    assert not Alert.objects.exists()
    assert caplog.text.count(f"SLO of {unique_name} v1 not judged: Prometheus at ") == 2
