from django.urls import path

from deployer import api

urlpatterns = [
    path("deployments/", api.DeploymentListView.as_view(), name="deployment-list"),
    path("deployments/<int:deployment_id>/", api.DeploymentDetailView.as_view(), name="deployment-detail"),
    path("deployments/<int:deployment_id>/pause/", api.DeploymentPauseView.as_view(), name="deployment-pause"),
    path("deployments/<int:deployment_id>/resume/", api.DeploymentResumeView.as_view(), name="deployment-resume"),
    path("deployments/<int:deployment_id>/promote/", api.DeploymentPromoteView.as_view(), name="deployment-promote"),
    path("deployments/<int:deployment_id>/abort/", api.DeploymentAbortView.as_view(), name="deployment-abort"),
    path("endpoints/", api.EndpointListView.as_view(), name="endpoint-list"),
    path("models/<str:name>/rollback/", api.ChampionRollbackView.as_view(), name="champion-rollback"),
    path("models/<str:name>/history/", api.ModelHistoryView.as_view(), name="model-history"),
]
