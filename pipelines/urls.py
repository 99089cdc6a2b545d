from django.urls import path

from pipelines import api

urlpatterns = [
    path("models/<str:name>/versions/<int:version>/builds/", api.BuildListView.as_view(), name="build-list"),
    path("models/<str:name>/versions/<int:version>/builds/<int:build_id>/", api.BuildDetailView.as_view(),
         name="build-detail"),
    path("targets/", api.TargetListView.as_view(), name="target-list"),
    path("models/<str:name>/versions/<int:version>/hil/", api.HilRunListView.as_view(), name="hil-run-list"),
    path("hil/<int:run_id>/", api.HilRunDetailView.as_view(), name="hil-run-detail"),
    path("models/<str:name>/hil-policy/", api.HilPolicyView.as_view(), name="hil-policy"),
]
