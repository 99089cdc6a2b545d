from django.urls import path

from deployer import api

urlpatterns = [
    path("deployments/", api.DeploymentListView.as_view(), name="deployment-list"),
    path("deployments/<int:deployment_id>/", api.DeploymentDetailView.as_view(), name="deployment-detail"),
    path("deployments/<int:deployment_id>/pause/", api.DeploymentPauseView.as_view(), name="deployment-pause"),
    path("deployments/<int:deployment_id>/resume/", api.DeploymentResumeView.as_view(), name="deployment-resume"),
    path("deployments/<int:deployment_id>/promote/", api.DeploymentPromoteView.as_view(), name="deployment-promote"),
    path("deployments/<int:deployment_id>/abort/", api.DeploymentAbortView.as_view(), name="deployment-abort"),
    path("deployments/<int:deployment_id>/promotion/", api.DeploymentPromotionView.as_view(),
         name="deployment-promotion"),
    path("deployments/<int:deployment_id>/break-glass/", api.DeploymentBreakGlassView.as_view(),
         name="deployment-break-glass"),
    path("promotions/", api.PromotionListView.as_view(), name="promotion-list"),
    path("promotions/<int:req_id>/", api.PromotionDetailView.as_view(), name="promotion-detail"),
    path("promotions/<int:req_id>/approve/", api.PromotionApproveView.as_view(), name="promotion-approve"),
    path("promotions/<int:req_id>/reject/", api.PromotionRejectView.as_view(), name="promotion-reject"),
    path("promotions/<int:req_id>/cancel/", api.PromotionCancelView.as_view(), name="promotion-cancel"),
    path("endpoints/", api.EndpointListView.as_view(), name="endpoint-list"),
    path("models/<str:name>/rollback/", api.ChampionRollbackView.as_view(), name="champion-rollback"),
    path("models/<str:name>/history/", api.ModelHistoryView.as_view(), name="model-history"),
]
