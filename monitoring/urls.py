from django.urls import path

from monitoring import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/drift/", api.DriftCheckListView.as_view(), name="drift-list"),
    path("models/<str:name>/versions/<int:version>/drift/<int:check_id>/report/", api.DriftReportView.as_view(),
         name="drift-report"),
    path("receivers/", api.ReceiverListView.as_view(), name="receiver-list"),
    path("receivers/<int:receiver_id>/", api.ReceiverDetailView.as_view(), name="receiver-detail"),
    path("receivers/<int:receiver_id>/test/", api.ReceiverTestView.as_view(), name="receiver-test"),
    path("deliveries/", api.DeliveryListView.as_view(), name="delivery-list"),
    path("deliveries/<int:delivery_id>/", api.DeliveryDetailView.as_view(), name="delivery-detail"),
    path("deliveries/<int:delivery_id>/redeliver/", api.DeliveryRedeliverView.as_view(), name="delivery-redeliver"),
]
