from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from monitoring.metrics import MetricsView

urlpatterns = [
    path("api/v1/", include(("registry.api.urls", "api"), namespace="api")),
    path("api/v1/", include(("pipelines.urls", "pipelines"), namespace="pipelines-api")),
    path("api/v1/", include(("deployer.urls", "deployer"), namespace="deployer-api")),
    path("api/v1/", include(("monitoring.urls", "monitoring"), namespace="monitoring-api")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("metrics", MetricsView.as_view(), name="metrics"),  # Prometheus (monitoring/metrics.py)
    path("", include(("frontend.urls", "frontend"), namespace="frontend")),
]
