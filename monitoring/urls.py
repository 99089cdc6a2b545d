from django.urls import path

from monitoring import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/drift/", api.DriftCheckListView.as_view(), name="drift-list"),
    path("models/<str:name>/versions/<int:version>/drift/<int:check_id>/report/", api.DriftReportView.as_view(),
         name="drift-report"),
    path("alerts/", api.AlertListView.as_view(), name="alert-list"),
    path("alerts/<int:alert_id>/", api.AlertDetailView.as_view(), name="alert-detail"),
    path("alerts/<int:alert_id>/acknowledge/", api.AlertAcknowledgeView.as_view(), name="alert-acknowledge"),
    path("alerts/<int:alert_id>/resolve/", api.AlertResolveView.as_view(), name="alert-resolve"),
    path("alerts/<int:alert_id>/silence/", api.AlertSilenceView.as_view(), name="alert-silence"),
]
