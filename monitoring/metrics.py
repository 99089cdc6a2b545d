"""The platform's own figures in Prometheus' text format, for a Prometheus to scrape (`GET /metrics`): each
version's latest drift check of the last day (verdict, drifted share, per-column scores) and the open alerts.
The gateways export their traffic themselves; the SLO burn rates are computed from those by
platform/prometheus/rules.yml, not here (from SloSample they would cost four window queries per version per
scrape). Read from the database at each scrape, at a bounded cost: the newest SCAN_CHECKS checks of the last
day (a backward scan of the primary key), at most MAX_VERSIONS versions, MAX_COLUMNS columns each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from django.db.models import Count
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from rest_framework.request import Request

from monitoring.models import Alert, AlertKind, AlertStatus, DriftCheck, DriftOutcome
from registry.api.views import BaseView
from registry.roles import Cap

SCAN_CHECKS = 20_000  # every version is checked each PLATFORM_DRIFT_INTERVAL_S: the newest hold each one's latest
MAX_VERSIONS = 1_000
MAX_COLUMNS = 100  # per version: the drifted ones first, then by name
RECENT = timedelta(days=1)
JUDGED = (DriftOutcome.DRIFT, DriftOutcome.NO_DRIFT)
VERSION = ["model", "version"]
COLUMN = ["model", "version", "column", "method"]

# Every family this module exports (the dashboards' test checks their queries name only these and the gateway's).
FAMILIES = {
    "mlops_drift_check_timestamp_seconds": "When the version's latest drift check (of the last day) ran",
    "mlops_drift_check_outcome": "1 for the outcome of the version's latest drift check, 0 for the others",
    "mlops_drift_drifted_share": "Share of the columns that drifted in the latest judged check",
    "mlops_drift_share_threshold": "Share of drifted columns from which the dataset counts as drifted",
    "mlops_drift_dataset_drift": "1 when the latest judged check found the dataset drifted",
    "mlops_drift_prediction_drift": "1 when the latest judged check found the model's outputs drifted",
    "mlops_drift_rows": "Rows the latest check compared: the captured window (set=current) and the reference set",
    "mlops_drift_column_score": "A column's drift score in the latest judged check, by Evidently's method "
                                "(a p-value drifts below its threshold, a distance above it)",
    "mlops_drift_column_threshold": "The threshold the column's score was judged against",
    "mlops_drift_column_drifted": "1 when the column drifted in the latest judged check",
    "mlops_drift_columns_left_out": "Columns of the latest judged check not exported (over MAX_COLUMNS)",
    "mlops_alerts_open": "Open alerts (firing or acknowledged) by model, kind and status",
}


def latest_checks(now: datetime) -> list[DriftCheck]:
    """Each version's newest drift check of the last day."""
    newest: dict[int, int] = {}
    ids = (DriftCheck.objects.filter(created_at__gte=now - RECENT).order_by("-pk")
           .values_list("pk", "version_id")[:SCAN_CHECKS])
    for pk, version_id in ids:
        newest.setdefault(version_id, pk)
        if len(newest) >= MAX_VERSIONS:
            break
    return list(DriftCheck.objects.filter(pk__in=newest.values()).select_related("version__model")
                .defer("summary").order_by("version__model__name", "version__version"))


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, FAMILIES[name], labels=labels)


def drift_families(checks: Iterable[DriftCheck]) -> list[Metric]:
    g = {name: _gauge(name, labels) for name, labels in (
        ("mlops_drift_check_timestamp_seconds", VERSION), ("mlops_drift_check_outcome", [*VERSION, "outcome"]),
        ("mlops_drift_drifted_share", VERSION), ("mlops_drift_share_threshold", VERSION),
        ("mlops_drift_dataset_drift", VERSION), ("mlops_drift_prediction_drift", VERSION),
        ("mlops_drift_rows", [*VERSION, "set"]), ("mlops_drift_column_score", COLUMN),
        ("mlops_drift_column_threshold", COLUMN), ("mlops_drift_column_drifted", COLUMN),
        ("mlops_drift_columns_left_out", VERSION))}
    for check in checks:
        v = [check.version.model.name, str(check.version.version)]
        g["mlops_drift_check_timestamp_seconds"].add_metric(v, check.created_at.timestamp())
        for outcome in DriftOutcome.values:
            g["mlops_drift_check_outcome"].add_metric([*v, outcome], float(check.outcome == outcome))
        g["mlops_drift_rows"].add_metric([*v, "current"], check.current_rows)
        g["mlops_drift_rows"].add_metric([*v, "reference"], check.reference_rows)
        if check.outcome not in JUDGED:
            continue  # not enough data, no reference, failed: no figures to show, rather than zeros
        g["mlops_drift_drifted_share"].add_metric(v, check.drifted_share)
        g["mlops_drift_share_threshold"].add_metric(v, check.drift_share)
        g["mlops_drift_dataset_drift"].add_metric(v, float(check.dataset_drift))
        g["mlops_drift_prediction_drift"].add_metric(v, float(check.prediction_drift))
        columns = [c for c in check.columns if isinstance(c, dict) and "column" in c and "score" in c]
        columns.sort(key=lambda c: (not c.get("drifted"), str(c["column"])))
        for c in columns[:MAX_COLUMNS]:
            labels = [*v, str(c["column"]), str(c.get("method", ""))]
            g["mlops_drift_column_score"].add_metric(labels, float(c["score"]))
            if c.get("threshold") is not None:
                g["mlops_drift_column_threshold"].add_metric(labels, float(c["threshold"]))
            g["mlops_drift_column_drifted"].add_metric(labels, float(bool(c.get("drifted"))))
        g["mlops_drift_columns_left_out"].add_metric(v, max(0, len(columns) - MAX_COLUMNS))
    return list(g.values())


def alert_family() -> Metric:
    family = _gauge("mlops_alerts_open", ["model", "kind", "status"])
    counts = {(r["model__name"], r["kind"], r["status"]): r["n"] for r in Alert.objects.exclude(
        status=AlertStatus.RESOLVED).values("model__name", "kind", "status").annotate(n=Count("pk")).order_by()}
    for model in sorted({m for m, _, _ in counts}):  # every kind and status of a model with open alerts: 0s too
        for kind in AlertKind.values:
            for status in (AlertStatus.FIRING, AlertStatus.ACKNOWLEDGED):
                family.add_metric([model, kind, status], counts.get((model, kind, status), 0))
    return family


class PlatformCollector(Collector):
    """Reads the figures at each collect (one scrape)."""

    def collect(self) -> Iterator[Metric]:
        yield from drift_families(latest_checks(timezone.now()))
        yield alert_family()


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)  # no describe(): registering reads nothing
    registry.register(PlatformCollector())
    return generate_latest(registry)


class MetricsView(BaseView):
    """GET /metrics: a Prometheus scrapes it with a platform token (`authorization` in its scrape config)."""

    capabilities = {"GET": Cap.ALERT_READ}

    @extend_schema(responses={(200, "text/plain"): str}, description="The platform's drift and alert figures, "
                   "in Prometheus' text format")
    def get(self, request: Request) -> HttpResponse:
        return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
