from django.urls import path

from pipelines import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/builds/", api.BuildListView.as_view(), name="build-list"),
    path("models/<str:name>/versions/<int:version>/builds/<int:build_id>/", api.BuildDetailView.as_view(),
         name="build-detail"),
    path("targets/", api.TargetListView.as_view(), name="target-list"),
]
