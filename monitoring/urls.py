from django.urls import path

from monitoring import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/drift/", api.DriftCheckListView.as_view(), name="drift-list"),
    path("models/<str:name>/versions/<int:version>/drift/<int:check_id>/report/", api.DriftReportView.as_view(),
         name="drift-report"),
]
