"""Drift checks in the REST API: a version's checks (newest first, paginated) and a check's Evidently
report (HTML, self-contained)."""

from __future__ import annotations

import gzip

from django.http import Http404, HttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring.models import DriftCheck, DriftReport
from registry.api.views import BaseView, version_or_404
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
