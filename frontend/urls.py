from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html", redirect_authenticated_user=True),
         name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.model_list, name="model-list"),
    path("models/<str:name>/", views.model_detail, name="model-detail"),
    path("models/<str:name>/versions-table/", views.model_version_rows, name="model-version-rows"),
    path("models/<str:name>/versions/<int:version>/", views.version_detail, name="version-detail"),
    path("models/<str:name>/versions/<int:version>/status/", views.version_status, name="version-status"),
    path("models/<str:name>/versions/<int:version>/engines/", views.version_engines, name="version-engines"),
    path("models/<str:name>/versions/<int:version>/engines/build/", views.version_engines_request,
         name="version-engines-request"),
    path("models/<str:name>/versions/<int:version>/engines/<int:build_id>/hil/", views.build_hil_request,
         name="build-hil-request"),
    path("hil/<int:run_id>/", views.hil_detail, name="hil-detail"),
    path("hil/<int:run_id>/live/", views.hil_live, name="hil-live"),
    path("register/", views.register, name="register"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", views.token_revoke_view, name="token-revoke"),
    path("audit/", views.audit, name="audit"),
    path("targets/", views.targets, name="targets"),
    path("alerts/", views.alert_list, name="alert-list"),
    path("alerts/<int:alert_id>/", views.alert_detail, name="alert-detail"),
    path("alerts/<int:alert_id>/rollback/", views.alert_rollback, name="alert-rollback"),
    path("alerts/<int:alert_id>/series/", views.alert_series, name="alert-series"),
    path("alerts/<int:alert_id>/<str:action>/", views.alert_action, name="alert-action"),
    path("deployments/", views.deployment_list, name="deployment-list"),
    path("deployments/live/", views.deployment_list_live, name="deployment-list-live"),
    path("deployments/new/", views.deployment_new, name="deployment-new"),
    path("deployments/<int:deployment_id>/", views.deployment_detail, name="deployment-detail"),
    path("deployments/<int:deployment_id>/live/", views.deployment_live, name="deployment-live"),
    path("deployments/<int:deployment_id>/points/", views.deployment_points, name="deployment-points"),
    path("deployments/<int:deployment_id>/<str:action>/", views.deployment_action, name="deployment-action"),
]
