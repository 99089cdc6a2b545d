from django.urls import path

from registry.api import views

urlpatterns = [
    path("me/", views.MeView.as_view(), name="me"),
    path("models/", views.ModelListView.as_view(), name="model-list"),
    path("models/<str:name>/", views.ModelDetailView.as_view(), name="model-detail"),
    path("models/<str:name>/versions/", views.VersionListView.as_view(), name="version-list"),
    path("models/<str:name>/versions/<int:version>/", views.VersionDetailView.as_view(), name="version-detail"),
    path("models/<str:name>/aliases/", views.AliasListView.as_view(), name="alias-list"),
    path("models/<str:name>/aliases/<str:alias>/", views.AliasDetailView.as_view(), name="alias-detail"),
    path("models/<str:name>/promotion-policy/", views.PromotionPolicyView.as_view(), name="promotion-policy"),
    path("tokens/", views.TokenListView.as_view(), name="token-list"),
    path("tokens/<int:token_id>/", views.TokenDetailView.as_view(), name="token-detail"),
    path("users/", views.UserListView.as_view(), name="user-list"),
    path("users/<str:username>/", views.UserDetailView.as_view(), name="user-detail"),
    path("audit/", views.AuditListView.as_view(), name="audit-list"),
]
