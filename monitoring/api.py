"""Monitoring in the REST API: a version's drift checks (newest first, paginated) and a check's Evidently
report (HTML, self-contained); alerts (open ones first) and what on-call does with them."""

from __future__ import annotations

import gzip

from django.db.models import Case, Value, When
from django.http import Http404, HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring import alerts
from monitoring.models import Alert, AlertStatus, DriftCheck, DriftReport
from registry.api.views import BaseView, actor_of, version_or_404
from registry.roles import Cap


class DriftCheckOut(serializers.ModelSerializer):
    has_report = serializers.SerializerMethodField()

    class Meta:
        model = DriftCheck
        fields = ["id", "created_at", "outcome", "summary", "dataset_drift", "prediction_drift", "drifted_share",
                  "drift_share", "current_rows", "reference_rows", "window_from", "window_to", "columns", "seconds",
                  "has_report"]

    def get_has_report(self, check: DriftCheck) -> bool:
        return DriftReport.objects.filter(drift_check=check).exists()


class DriftCheckListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses=DriftCheckOut(many=True))
    def get(self, request: Request, name: str, version: int) -> Response:
        checks = DriftCheck.objects.filter(version=version_or_404(name, version)).order_by("-created_at", "-pk")
        return self.paginate(checks, DriftCheckOut)


class DriftReportView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses={(200, "text/html"): str})
    def get(self, request: Request, name: str, version: int, check_id: int) -> HttpResponse:
        report = DriftReport.objects.filter(drift_check_id=check_id,
                                            drift_check__version=version_or_404(name, version)).first()
        if report is None:
            raise Http404(f"no report for drift check {check_id} of {name} v{version} (only the newest are kept)")
        response = HttpResponse(gzip.decompress(bytes(report.html_gz)), content_type="text/html; charset=utf-8")
        # Evidently's page runs its own inlined scripts on data that came from client requests (column names):
        # a sandboxed, unique origin with no network at all, so nothing in it can reach the platform's API.
        response["Content-Security-Policy"] = (
            "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
            "style-src 'unsafe-inline'; img-src data: blob:; font-src data:")
        return response


# ---- alerts ----------------------------------------------------------------------------------------------

_STATUS_ORDER = Case(When(status=AlertStatus.FIRING, then=Value(0)), When(status=AlertStatus.ACKNOWLEDGED,
                                                                        then=Value(1)), default=Value(2))


class AlertOut(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.IntegerField(source="version.version")
    owner = serializers.CharField(source="owner.username", default=None)
    silenced = serializers.SerializerMethodField()

    class Meta:
        model = Alert
        fields = ["id", "fingerprint", "model", "version", "kind", "severity", "status", "title", "summary",
                  "evidence", "runbook", "owner", "silenced", "silenced_until", "silence_reason", "first_seen_at",
                  "last_seen_at", "clear_since", "last_notified_at", "resolved_at", "resolution"]

    def get_silenced(self, alert: Alert) -> bool:
        return bool(alert.silenced_until and alert.silenced_until > timezone.now())


def alert_or_404(alert_id: int) -> Alert:
    alert = Alert.objects.select_related("model", "version", "owner").filter(pk=alert_id).first()
    if alert is None:
        raise Http404(f"no alert {alert_id}")
    return alert


class AlertListView(BaseView):
    """Open alerts first (firing, then acknowledged), newest first; `?status=` and `?model=` filter."""

    capabilities = {"GET": Cap.ALERT_READ}

    @extend_schema(responses=AlertOut(many=True))
    def get(self, request: Request) -> Response:
        alerts = Alert.objects.select_related("model", "version", "owner")
        status = request.query_params.get("status", "open")
        if status == "open":
            alerts = alerts.exclude(status=AlertStatus.RESOLVED)
        elif status != "all":
            if status not in AlertStatus.values:
                raise ValidationError({"status": f"one of open, all, {', '.join(AlertStatus.values)}"})
            alerts = alerts.filter(status=status)
        if request.query_params.get("model"):
            alerts = alerts.filter(model__name=request.query_params["model"])
        return self.paginate(alerts.order_by(_STATUS_ORDER, "-last_seen_at", "-pk"), AlertOut)


class AlertDetailView(BaseView):
    capabilities = {"GET": Cap.ALERT_READ}

    @extend_schema(responses=AlertOut)
    def get(self, request: Request, alert_id: int) -> Response:
        return Response(AlertOut(alert_or_404(alert_id)).data)


class AlertAcknowledgeView(BaseView):
    """I have it: you become its owner, and it is not notified again."""

    capabilities = {"POST": Cap.ALERT_ACT}

    @extend_schema(request=None, responses=AlertOut)
    def post(self, request: Request, alert_id: int) -> Response:
        alerts.alert_acknowledge(actor_of(request), alert_or_404(alert_id).pk)
        return Response(AlertOut(alert_or_404(alert_id)).data)


class ResolveIn(serializers.Serializer):
    resolution = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)


class AlertResolveView(BaseView):
    capabilities = {"POST": Cap.ALERT_ACT}

    @extend_schema(request=ResolveIn, responses=AlertOut)
    def post(self, request: Request, alert_id: int) -> Response:
        body = ResolveIn(data=request.data)
        body.is_valid(raise_exception=True)
        alerts.alert_resolve(actor_of(request), alert_or_404(alert_id).pk, body.validated_data["resolution"])
        return Response(AlertOut(alert_or_404(alert_id)).data)


class SilenceIn(serializers.Serializer):
    until = serializers.DateTimeField(help_text="When notifications start again (at most 7 days ahead)")
    reason = serializers.CharField(max_length=5000)


class AlertSilenceView(BaseView):
    capabilities = {"POST": Cap.ALERT_ACT}

    @extend_schema(request=SilenceIn, responses=AlertOut)
    def post(self, request: Request, alert_id: int) -> Response:
        body = SilenceIn(data=request.data)
        body.is_valid(raise_exception=True)
        alerts.alert_silence(actor_of(request), alert_or_404(alert_id).pk, body.validated_data["until"],
                             body.validated_data["reason"])
        return Response(AlertOut(alert_or_404(alert_id)).data)
