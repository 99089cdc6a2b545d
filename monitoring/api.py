"""Monitoring in the REST API: a version's drift checks (newest first, paginated) and a check's Evidently
report (HTML, self-contained); alerts (open ones first) and what on-call does with them; notification
receivers (webhooks) and their deliveries."""

from __future__ import annotations

import gzip
from typing import Any

from django.db.models import Case, Value, When
from django.http import Http404, HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring import alerts, drift, notify, services
from monitoring.models import (
    Alert,
    AlertStatus,
    Delivery,
    DeliveryStatus,
    DriftCheck,
    DriftReport,
    MonitorPolicy,
    Receiver,
    ReceiverKind,
)
from monitoring.selectors import DEFAULT_POLICY, policy_for
from registry.api.permissions import request_roles
from registry.api.views import BaseView, actor_of, model_or_404, version_or_404
from registry.roles import Cap, roles_allow


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
        check = DriftCheck.objects.filter(pk=check_id, version=version_or_404(name, version)).first()
        if check is None:
            raise Http404(f"no drift check {check_id} of {name} v{version}")
        report = services.drift_report(check)  # a quiet window's report is drawn now, the first time
        response = HttpResponse(gzip.decompress(bytes(report.html_gz)), content_type="text/html; charset=utf-8")
        # Evidently's page runs its own inlined scripts on data that came from client requests (column names):
        # a sandboxed, unique origin with no network at all, so nothing in it can reach the platform's API.
        response["Content-Security-Policy"] = (
            "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
            "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; frame-ancestors 'self'")
        response["X-Frame-Options"] = "SAMEORIGIN"  # the alert page frames it (sandboxed); no other site may
        return response


class ReferencePinIn(serializers.Serializer):
    window_from = serializers.DateTimeField(required=False)
    window_to = serializers.DateTimeField(required=False)
    drift_check = serializers.IntegerField(required=False, help_text="pin the window this drift check judged")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        times = "window_from" in attrs and "window_to" in attrs
        if times == ("drift_check" in attrs):
            raise ValidationError("give window_from and window_to, or drift_check (one of the two)")
        return attrs


class ReferencePinView(BaseView):
    """Pin a window of the version's captured traffic as its reference set: drift is judged against it from
    the next check (the rows as captured, with the predictions the version answered)."""

    capabilities = {"POST": Cap.MONITOR_EDIT}

    @extend_schema(request=ReferencePinIn, responses={201: dict})
    def post(self, request: Request, name: str, version: int) -> Response:
        data = ReferencePinIn(data=request.data)
        data.is_valid(raise_exception=True)
        found = version_or_404(name, version)
        args = data.validated_data
        if "drift_check" in args:
            check = DriftCheck.objects.filter(pk=args["drift_check"], version=found).first()
            if check is None or check.window_from is None or check.window_to is None:
                raise ValidationError({"drift_check": f"no drift check {args['drift_check']} of {name} v{version} "
                                                      "with a window of captured rows"})
            args = {"window_from": check.window_from, "window_to": check.window_to}
        pinned = services.reference_pin(actor_of(request), found, args["window_from"], args["window_to"])
        return Response(pinned, status=status.HTTP_201_CREATED)


# ---- a model's monitoring policy -----------------------------------------------------------------------------

_FRACTIONS = ("capture_fraction", "drift_share", "slo_latency_target", "slo_availability")


class PolicyIO(serializers.ModelSerializer):
    window_minutes = serializers.IntegerField(min_value=1, max_value=7 * 24 * 60, required=False)
    min_rows = serializers.IntegerField(min_value=10, max_value=100_000, required=False)
    max_rows = serializers.IntegerField(min_value=10, max_value=100_000, required=False)
    capture_floor_per_s = serializers.IntegerField(min_value=0, max_value=10_000, required=False)
    retention_hours = serializers.IntegerField(min_value=1, max_value=24 * 90, required=False)
    slo_latency_ms = serializers.FloatField(min_value=0.1, max_value=600_000, required=False)

    class Meta:
        model = MonitorPolicy
        fields = ["capture_floor_per_s", "capture_fraction", "window_minutes", "min_rows", "max_rows", "drift_share",
                  "drift_method", "drift_threshold", "slo_latency_ms", "slo_latency_target", "slo_availability",
                  "canary_drift_gate", "rollback_on_drift", "rollback_on_slo", "retention_hours", "updated_at"]
        read_only_fields = ["updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name in _FRACTIONS:
            if name in attrs and not 0 < attrs[name] <= 1:
                raise ValidationError({name: f"a fraction in (0, 1], got {attrs[name]}"})
        if attrs.get("capture_fraction") == 0:
            raise ValidationError({"capture_fraction": "0 would capture nothing beyond the floor; give (0, 1]"})
        current = self.instance
        low = attrs.get("min_rows", current.min_rows if current else DEFAULT_POLICY.min_rows)
        high = attrs.get("max_rows", current.max_rows if current else DEFAULT_POLICY.max_rows)
        if low > high:
            raise ValidationError({"min_rows": f"min_rows ({low}) is above max_rows ({high})"})
        if attrs.get("drift_method"):
            known = drift.METHODS
            if attrs["drift_method"] not in known:
                raise ValidationError({"drift_method": f"one of {', '.join(sorted(known))}, or blank for "
                                                       "Evidently's choice per column"})
        return attrs


class MonitorPolicyView(BaseView):
    """A model's monitoring policy: capture, drift, SLOs, the canary's traffic checks and automatic rollback.
    A model without one has the defaults shown."""

    capabilities = {"GET": Cap.MODEL_READ, "PATCH": Cap.MONITOR_EDIT}

    @extend_schema(responses=PolicyIO)
    def get(self, request: Request, name: str) -> Response:
        return Response(PolicyIO(policy_for(model_or_404(name).pk)).data)

    @extend_schema(request=PolicyIO, responses=PolicyIO)
    def patch(self, request: Request, name: str) -> Response:
        body = request.data  # read first: a body PostgreSQL cannot store is a 400, whatever the model
        model = model_or_404(name)
        current = policy_for(model.pk)
        data = PolicyIO(current if current.pk else None, data=body, partial=True)
        data.is_valid(raise_exception=True)
        return Response(PolicyIO(services.policy_update(actor_of(request), model, dict(data.validated_data))).data)


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
# ---- notifications: receivers (webhooks) and their deliveries --------------------------------------------------


def _full_urls(request: Request) -> bool:
    """Receivers' URLs in full only for those who manage them: a Slack webhook URL is itself a credential."""
    return roles_allow(request_roles(request), Cap.RECEIVER_MANAGE)


class ReceiverOut(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    url = serializers.SerializerMethodField(help_text="in full for receiver managers; scheme and host for others")
    event_types = serializers.ListField(child=serializers.CharField(), help_text="subscribed event types; [] all")
    models = serializers.ListField(child=serializers.CharField(), source="model_names",
                                   help_text="names of the models whose events it gets; [] all")

    class Meta:
        model = Receiver
        fields = ["id", "name", "kind", "url", "enabled", "event_types", "models", "created_by", "created_at",
                  "updated_at"]

    def get_url(self, receiver: Receiver) -> str:
        return receiver.url if self.context.get("full_urls") else notify.url_hint(receiver.url)


class ReceiverCreatedOut(ReceiverOut):
    secret = serializers.CharField(help_text="The signing secret (Standard Webhooks, whsec_...). Shown once: "
                                             "store it now in the receiver's configuration.")

    class Meta(ReceiverOut.Meta):
        fields = [*ReceiverOut.Meta.fields, "secret"]


# The subscription's lists are checked by the service (notify._valid_event_types: an unknown type is a 400
# that names the known ones), the same for the API, the pages and any other caller.
_EVENT_TYPES_HELP = "Event types it gets, of: " + ", ".join(notify.EVENT_TYPES) + ". Empty or absent: all."
_MODELS_HELP = "Names of the models whose events it gets. Empty or absent: all models."


class _SubscriptionIn(serializers.Serializer):
    event_types = serializers.ListField(child=serializers.CharField(max_length=64), required=False,
                                        help_text=_EVENT_TYPES_HELP)
    models = serializers.ListField(child=serializers.CharField(max_length=128), required=False,
                                   help_text=_MODELS_HELP)


class ReceiverCreateIn(_SubscriptionIn):
    name = serializers.CharField(max_length=100)
    kind = serializers.ChoiceField(choices=ReceiverKind.choices)
    url = serializers.CharField(max_length=2000, help_text="http:// or https:// URL the events are POSTed to")
    enabled = serializers.BooleanField(default=True)


class ReceiverUpdateIn(_SubscriptionIn):
    name = serializers.CharField(max_length=100, required=False)
    url = serializers.CharField(max_length=2000, required=False)
    enabled = serializers.BooleanField(required=False)


class DeliveryOut(serializers.ModelSerializer):
    receiver_name = serializers.CharField(source="receiver.name")

    class Meta:
        model = Delivery
        fields = ["id", "receiver", "receiver_name", "event_type", "event_id", "status", "attempts",
                  "last_status_code", "last_error", "next_attempt_at", "created_at", "updated_at", "delivered_at"]


class DeliveryDetailOut(DeliveryOut):
    class Meta(DeliveryOut.Meta):
        fields = [*DeliveryOut.Meta.fields, "payload", "log"]


class DeliveryFilterIn(serializers.Serializer):
    receiver = serializers.IntegerField(min_value=1, required=False)
    status = serializers.ChoiceField(choices=DeliveryStatus.choices, required=False)
    event_type = serializers.CharField(max_length=64, required=False)


def receiver_or_404(receiver_id: int) -> Receiver:
    found = notify.receiver_list().filter(pk=receiver_id).first()
    if found is None:
        raise Http404(f"no receiver {receiver_id}")
    return found


def delivery_or_404(delivery_id: int) -> Delivery:
    found = notify.delivery_list().filter(pk=delivery_id).first()
    if found is None:
        raise Http404(f"no delivery {delivery_id}")
    return found


class ReceiverListView(BaseView):
    capabilities = {"GET": Cap.ALERT_READ, "POST": Cap.RECEIVER_MANAGE}
    idempotency_secret_fields = ("secret",)

    @extend_schema(responses=ReceiverOut(many=True))
    def get(self, request: Request) -> Response:
        return self.paginate(notify.receiver_list(), ReceiverOut, context={"full_urls": _full_urls(request)})

    @extend_schema(request=ReceiverCreateIn, responses={201: ReceiverCreatedOut},
                   description="A receiver with a new signing secret, shown in this answer only.")
    def post(self, request: Request) -> Response:
        data = ReceiverCreateIn(data=request.data)
        data.is_valid(raise_exception=True)
        receiver = notify.receiver_create(actor_of(request), **data.validated_data)
        return Response(ReceiverCreatedOut(receiver, context={"full_urls": True}).data, status=status.HTTP_201_CREATED)


class ReceiverDetailView(BaseView):
    capabilities = {"GET": Cap.ALERT_READ, "PATCH": Cap.RECEIVER_MANAGE, "DELETE": Cap.RECEIVER_MANAGE}

    @extend_schema(responses=ReceiverOut)
    def get(self, request: Request, receiver_id: int) -> Response:
        return Response(ReceiverOut(receiver_or_404(receiver_id), context={"full_urls": _full_urls(request)}).data)

    @extend_schema(request=ReceiverUpdateIn, responses=ReceiverOut)
    def patch(self, request: Request, receiver_id: int) -> Response:
        data = ReceiverUpdateIn(data=request.data)
        data.is_valid(raise_exception=True)
        receiver = notify.receiver_update(actor_of(request), receiver_or_404(receiver_id), **data.validated_data)
        return Response(ReceiverOut(receiver, context={"full_urls": True}).data)

    @extend_schema(responses={204: None}, description="The receiver and its deliveries (disable it to keep them).")
    def delete(self, request: Request, receiver_id: int) -> Response:
        notify.receiver_delete(actor_of(request), receiver_or_404(receiver_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ReceiverTestView(BaseView):
    capabilities = {"POST": Cap.RECEIVER_MANAGE}

    @extend_schema(request=None, responses={202: DeliveryDetailOut},
                   description="Send a `test` event to the receiver now; follow it at /deliveries/<id>/.")
    def post(self, request: Request, receiver_id: int) -> Response:
        delivery = notify.receiver_test(actor_of(request), receiver_or_404(receiver_id))
        return Response(DeliveryDetailOut(delivery_or_404(delivery.pk)).data, status=status.HTTP_202_ACCEPTED)


class DeliveryListView(BaseView):
    capabilities = {"GET": Cap.ALERT_READ}

    @extend_schema(parameters=[DeliveryFilterIn], responses=DeliveryOut(many=True))
    def get(self, request: Request) -> Response:
        filters = DeliveryFilterIn(data=request.query_params)
        filters.is_valid(raise_exception=True)
        v = filters.validated_data
        return self.paginate(notify.delivery_list(v.get("receiver"), v.get("status"), v.get("event_type")),
                             DeliveryOut)


class DeliveryDetailView(BaseView):
    capabilities = {"GET": Cap.ALERT_READ}

    @extend_schema(responses=DeliveryDetailOut)
    def get(self, request: Request, delivery_id: int) -> Response:
        return Response(DeliveryDetailOut(delivery_or_404(delivery_id)).data)


class DeliveryRedeliverView(BaseView):
    capabilities = {"POST": Cap.RECEIVER_MANAGE}

    @extend_schema(request=None, responses={202: DeliveryDetailOut},
                   description="Send a delivered or failed delivery again (the same webhook-id), with a new "
                               "round of attempts.")
    def post(self, request: Request, delivery_id: int) -> Response:
        notify.delivery_redeliver(actor_of(request), delivery_or_404(delivery_id))
        return Response(DeliveryDetailOut(delivery_or_404(delivery_id)).data, status=status.HTTP_202_ACCEPTED)
