from django.urls import path

from monitoring import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/drift/", api.DriftCheckListView.as_view(), name="drift-list"),
    path("models/<str:name>/versions/<int:version>/drift/<int:check_id>/report/", api.DriftReportView.as_view(),
         name="drift-report"),
    path("models/<str:name>/versions/<int:version>/reference/", api.ReferencePinView.as_view(), name="reference-pin"),
    path("models/<str:name>/monitoring/", api.MonitorPolicyView.as_view(), name="monitor-policy"),
    path("alerts/", api.AlertListView.as_view(), name="alert-list"),
    path("alerts/<int:alert_id>/", api.AlertDetailView.as_view(), name="alert-detail"),
    path("alerts/<int:alert_id>/acknowledge/", api.AlertAcknowledgeView.as_view(), name="alert-acknowledge"),
    path("alerts/<int:alert_id>/resolve/", api.AlertResolveView.as_view(), name="alert-resolve"),
    path("alerts/<int:alert_id>/silence/", api.AlertSilenceView.as_view(), name="alert-silence"),
    path("receivers/", api.ReceiverListView.as_view(), name="receiver-list"),
    path("receivers/<int:receiver_id>/", api.ReceiverDetailView.as_view(), name="receiver-detail"),
    path("receivers/<int:receiver_id>/test/", api.ReceiverTestView.as_view(), name="receiver-test"),
    path("deliveries/", api.DeliveryListView.as_view(), name="delivery-list"),
    path("deliveries/<int:delivery_id>/", api.DeliveryDetailView.as_view(), name="delivery-detail"),
    path("deliveries/<int:delivery_id>/redeliver/", api.DeliveryRedeliverView.as_view(), name="delivery-redeliver"),
]
