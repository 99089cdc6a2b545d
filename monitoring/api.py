"""Monitoring in the REST API: a version's drift checks (newest first, paginated) and a check's Evidently
report (HTML, self-contained); notification receivers (webhooks) and their deliveries."""

from __future__ import annotations

import gzip

from django.http import Http404, HttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring import notify
from monitoring.models import Delivery, DeliveryStatus, DriftCheck, DriftReport, Receiver, ReceiverKind
from registry.api.permissions import request_roles
from registry.api.views import BaseView, actor_of, version_or_404
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


# ---- notifications: receivers (webhooks) and their deliveries --------------------------------------------------


def _full_urls(request: Request) -> bool:
    """Receivers' URLs in full only for those who manage them: a Slack webhook URL is itself a credential."""
    return roles_allow(request_roles(request), Cap.RECEIVER_MANAGE)


class ReceiverOut(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    url = serializers.SerializerMethodField(help_text="in full for receiver managers; scheme and host for others")

    class Meta:
        model = Receiver
        fields = ["id", "name", "kind", "url", "enabled", "created_by", "created_at", "updated_at"]

    def get_url(self, receiver: Receiver) -> str:
        return receiver.url if self.context.get("full_urls") else notify.url_hint(receiver.url)


class ReceiverCreatedOut(ReceiverOut):
    secret = serializers.CharField(help_text="The signing secret (Standard Webhooks, whsec_...). Shown once: "
                                             "store it now in the receiver's configuration.")

    class Meta(ReceiverOut.Meta):
        fields = [*ReceiverOut.Meta.fields, "secret"]


class ReceiverCreateIn(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    kind = serializers.ChoiceField(choices=ReceiverKind.choices)
    url = serializers.CharField(max_length=2000, help_text="http:// or https:// URL the events are POSTed to")
    enabled = serializers.BooleanField(default=True)


class ReceiverUpdateIn(serializers.Serializer):
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
