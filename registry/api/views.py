"""Thin API views: parse input, check the capability, call one service or selector, shape output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser, FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry import governance, mlflow_store, people, selectors, services
from registry.api import idempotency
from registry.api import serializers as s
from registry.api.errors import DATABASE_UNAVAILABLE, error_response, unavailable_response
from registry.api.guard import checked_parser
from registry.api.pagination import PagedRows, Pagination
from registry.api.permissions import HasCapability, request_roles
from registry.audit import Actor
from registry.errors import RegistryError
from registry.models import ApiToken, ModelVersion, PromotionPolicy, RegisteredModel, VersionStatus
from registry.roles import CAPABILITIES, Cap, roles_allow
from registry.samples import parse_reference_sample
from registry.tokens import token_create, token_revoke


def actor_of(request: Request) -> Actor:
    return Actor(request.user, "api")


class BaseView(APIView):
    permission_classes = [HasCapability]
    capabilities: dict[str, str] = {}
    idempotency_secret_fields: tuple[str, ...] = ()  # answer fields shown once, never kept for a replay

    def get_parsers(self) -> list[BaseParser]:
        # Every body, whatever parsers a view names, is refused (400) if it holds what PostgreSQL cannot store.
        return [checked_parser(parser)() for parser in self.parser_classes]

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """A POST with an Idempotency-Key runs in one transaction with the record of its answer
        (registry/api/idempotency.py); a database that fails even to commit is a 503, never a 500."""
        if not idempotency.wanted(request):
            return super().dispatch(request, *args, **kwargs)
        try:
            with transaction.atomic():
                response = super().dispatch(request, *args, **kwargs)
                idempotency.finish(self.request, response, self.idempotency_secret_fields)
        except DATABASE_UNAVAILABLE:
            return unavailable_response()
        return response

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # authentication and permissions first: keys are per user
        if idempotency.wanted(request):
            idempotency.begin(request)

    def paginate(self, queryset: Any, serializer: type, **extra: Any) -> Response:
        paginator = Pagination()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator.get_paginated_response(serializer(page, many=True, **extra).data)


def model_or_404(name: str) -> RegisteredModel:
    found = RegisteredModel.objects.filter(name=name).first()
    if found is None:
        raise Http404(f"no model {name!r}")
    return found


def version_or_404(name: str, number: int) -> ModelVersion:
    found = selectors.version_get_by_name(name, number)
    if found is None:
        model_or_404(name)  # say which of the two is missing
        raise Http404(f"model {name!r} has no version {number}")
    return found


class ModelListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "POST": Cap.MODEL_REGISTER}

    @extend_schema(
        parameters=[
            OpenApiParameter("search", str, description="text in the name or description"),
            OpenApiParameter("tag", str, description="key or key:value"),
            OpenApiParameter("ordering", str, description="name, -updated_at, ..."),
        ],
        responses=s.ModelOut(many=True),
    )
    def get(self, request: Request) -> Response:
        qs = selectors.model_list(request.query_params.get("search", ""), request.query_params.get("tag", ""),
                                  request.query_params.get("ordering", "name"))
        return self.paginate(qs, s.ModelOut)

    @extend_schema(request=s.ModelCreateIn, responses={201: s.ModelOut})
    def post(self, request: Request) -> Response:
        data = s.ModelCreateIn(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_create(actor_of(request), **data.validated_data)
        return Response(s.ModelOut(model).data, status=status.HTTP_201_CREATED)


class ModelDetailView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "PATCH": Cap.MODEL_EDIT}

    @extend_schema(responses=s.ModelOut)
    def get(self, request: Request, name: str) -> Response:
        model = selectors.model_get(name)
        if model is None:
            raise Http404(f"no model {name!r}")
        return Response(s.ModelOut(model).data)

    @extend_schema(request=s.ModelUpdateIn, responses=s.ModelOut)
    def patch(self, request: Request, name: str) -> Response:
        data = s.ModelUpdateIn(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_update(actor_of(request), model_or_404(name), **data.validated_data)
        return Response(s.ModelOut(model).data)


class VersionListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "POST": Cap.MODEL_REGISTER}
    parser_classes = [MultiPartParser, FormParser, JSONParser]

    @extend_schema(parameters=[s.VersionFilterIn], responses=s.VersionOut(many=True))
    def get(self, request: Request, name: str) -> Response:
        filters = s.VersionFilterIn(data=request.query_params)
        filters.is_valid(raise_exception=True)
        status_, origin = filters.validated_data.get("status"), filters.validated_data.get("origin")
        model = selectors.model_summary(name)
        if model is None:
            raise Http404(f"no model {name!r}")
        model_id, version_count = model["id"], model["version_count"]

        def count() -> int:
            if status_ is None and origin is None:
                return int(version_count)  # a counter column: no COUNT(*)
            return selectors.version_rows_count(model_id, status_, origin)

        rows = PagedRows(lambda offset, limit: selectors.version_rows(model_id, status_, origin, offset=offset,
                                                                      limit=limit), count)
        paginator = Pagination()
        # Django's Paginator takes any sliceable with count(); the stubs say QuerySet.
        page: list[dict[str, Any]] | None = paginator.paginate_queryset(rows, request, view=self)  # type: ignore[arg-type]
        return paginator.get_paginated_response([s.version_row(model["name"], row) for row in page or []])

    @extend_schema(request={"multipart/form-data": s.VersionRegisterIn, "application/json": s.VersionRegisterIn},
                   responses={201: s.VersionDetailOut})
    def post(self, request: Request, name: str) -> Response:
        too_big = _upload_too_big(request)
        if too_big:
            return too_big
        data = s.VersionRegisterIn(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        tags = v.get("tags") or {}
        sample = None
        if v.get("reference_sample"):
            with _spooled(v["reference_sample"]) as path:
                sample = parse_reference_sample(path, v["reference_sample"].name)
        if v.get("archive"):
            with _spooled(v["archive"]) as path:
                version = services.version_register_from_archive(actor_of(request), name, path,
                                                                 v.get("description", ""), tags, sample)
        else:
            version = services.version_register_from_uri(actor_of(request), name, v["source"],
                                                         v.get("description", ""), tags, sample)
        return Response(s.VersionDetailOut(version).data, status=status.HTTP_201_CREATED)


def _upload_too_big(request: Request) -> Response | None:
    limit = settings.PLATFORM["MAX_UPLOAD_BYTES"]
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        return error_response(413, "too_large", f"upload of {length} bytes is over the limit of {limit} bytes "
                                                "(PLATFORM_MAX_UPLOAD_BYTES)")
    return None


class _spooled:
    """The uploaded file as a path on disk (Django keeps large uploads in a temp file already)."""

    def __init__(self, upload: Any) -> None:
        self.upload = upload
        self.tmp: str | None = None

    def __enter__(self) -> Path:
        path = getattr(self.upload, "temporary_file_path", None)
        if path:
            return Path(path())
        fd, self.tmp = tempfile.mkstemp(prefix="upload-")
        with os.fdopen(fd, "wb") as fh:
            for chunk in self.upload.chunks():
                fh.write(chunk)
        return Path(self.tmp)

    def __exit__(self, *exc: object) -> None:
        if self.tmp:
            os.unlink(self.tmp)


class VersionDetailView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "PATCH": Cap.MODEL_EDIT}

    @extend_schema(responses=s.VersionDetailOut)
    def get(self, request: Request, name: str, version: int) -> Response:
        row = selectors.version_detail_row(name, version)
        if row is None:
            model_or_404(name)  # say which of the two is missing
            raise Http404(f"model {name!r} has no version {version}")
        return Response(s.version_detail_row(row))

    @extend_schema(request=s.VersionUpdateIn, responses=s.VersionDetailOut)
    def patch(self, request: Request, name: str, version: int) -> Response:
        data = s.VersionUpdateIn(data=request.data)
        data.is_valid(raise_exception=True)
        updated = services.version_update(actor_of(request), version_or_404(name, version), **data.validated_data)
        return Response(s.VersionDetailOut(updated).data)


class TokenListView(BaseView):
    """Everyone manages their own tokens; admins (user.manage) see and create everyone's."""

    capabilities = {"GET": Cap.MODEL_READ, "POST": Cap.MODEL_READ}
    idempotency_secret_fields = ("token",)

    @extend_schema(responses=s.TokenOut(many=True))
    def get(self, request: Request) -> Response:
        qs = ApiToken.objects.select_related("user")
        if not roles_allow(request_roles(request), Cap.USER_MANAGE):
            qs = qs.filter(user__username=request.user.get_username())
        return self.paginate(qs.order_by("-created_at"), s.TokenOut)

    @extend_schema(request=s.TokenCreateIn, responses={201: s.TokenCreatedOut})
    def post(self, request: Request) -> Response:
        data = s.TokenCreateIn(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        owner: Any = request.user
        if v.get("owner") and v["owner"] != request.user.get_username():
            if not roles_allow(request_roles(request), Cap.USER_MANAGE):
                return error_response(403, "permission_denied", "only admins may create tokens for other accounts")
            owner = get_object_or_404(get_user_model(), username=v["owner"])
        issued = token_create(actor_of(request), owner, v["name"], v.get("roles"), v.get("expires_in_days"))
        out = s.TokenOut(issued.token).data
        out["token"] = issued.raw
        return Response(out, status=status.HTTP_201_CREATED)


class TokenDetailView(BaseView):
    capabilities = {"DELETE": Cap.MODEL_READ}

    @extend_schema(responses=s.TokenOut)
    def delete(self, request: Request, token_id: int) -> Response:
        token = get_object_or_404(ApiToken.objects.select_related("user"), pk=token_id)
        if token.user_id != request.user.pk and not roles_allow(request_roles(request), Cap.USER_MANAGE):
            return error_response(404, "not_found", "no such token")
        return Response(s.TokenOut(token_revoke(actor_of(request), token)).data)


class UserListView(BaseView):
    capabilities = {"GET": Cap.USER_MANAGE, "POST": Cap.USER_MANAGE}

    @extend_schema(responses=s.UserOut(many=True))
    def get(self, request: Request) -> Response:
        return self.paginate(get_user_model().objects.select_related("profile").order_by("username"), s.UserOut)

    @extend_schema(request=s.UserCreateIn, responses={201: s.UserOut})
    def post(self, request: Request) -> Response:
        data = s.UserCreateIn(data=request.data)
        data.is_valid(raise_exception=True)
        user = people.user_create(actor_of(request), **data.validated_data)
        return Response(s.UserOut(user).data, status=status.HTTP_201_CREATED)


class UserDetailView(BaseView):
    capabilities = {"GET": Cap.USER_MANAGE, "PATCH": Cap.USER_MANAGE}

    @extend_schema(responses=s.UserOut)
    def get(self, request: Request, username: str) -> Response:
        return Response(s.UserOut(get_object_or_404(get_user_model(), username=username)).data)

    @extend_schema(request=s.UserUpdateIn, responses=s.UserOut)
    def patch(self, request: Request, username: str) -> Response:
        data = s.UserUpdateIn(data=request.data)
        data.is_valid(raise_exception=True)
        user = people.user_update(actor_of(request), get_object_or_404(get_user_model(), username=username),
                                  **data.validated_data)
        return Response(s.UserOut(user).data)


class AuditListView(BaseView):
    capabilities = {"GET": Cap.AUDIT_READ}

    @extend_schema(
        parameters=[OpenApiParameter("action", str), OpenApiParameter("target", str), OpenApiParameter("actor", str)],
        responses=s.AuditOut(many=True),
    )
    def get(self, request: Request) -> Response:
        q = request.query_params
        return self.paginate(selectors.audit_list(q.get("action", ""), q.get("target", ""), q.get("actor", "")),
                             s.AuditOut)


class MeView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses=s.MeOut)
    def get(self, request: Request) -> Response:
        roles = request_roles(request)
        caps = sorted(c for c in CAPABILITIES if roles_allow(roles, c))
        return Response({"username": request.user.get_username(), "roles": sorted(roles), "capabilities": caps})


# ---- aliases and promotion policy (registry/governance.py) --------------------------------------------------


class AliasIn(serializers.Serializer):
    version = serializers.IntegerField(min_value=1)


class AliasListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(description="The model's aliases (alias: version) and which of them are protected.")
    def get(self, request: Request, name: str) -> Response:
        model = model_or_404(name)
        return Response({"model": model.name, "aliases": mlflow_store.aliases(model.name),
                         "protected": sorted(governance.protected_aliases(model))})


class AliasDetailView(BaseView):
    """Set or delete an alias. A protected model's production aliases (`champion` and those its promotion
    policy lists) are refused (403) for everyone: they move through an approved promotion or a rollback."""

    capabilities = {"PUT": Cap.MODEL_EDIT, "DELETE": Cap.MODEL_EDIT}

    @extend_schema(request=AliasIn)
    def put(self, request: Request, name: str, alias: str) -> Response:
        model = model_or_404(name)
        data = AliasIn(data=request.data)
        data.is_valid(raise_exception=True)
        number = data.validated_data["version"]
        if version_or_404(name, number).status == VersionStatus.ARCHIVED:
            raise RegistryError(f"v{number} of {name!r} is archived (deleted in MLflow): an alias cannot point at it",
                                409)
        governance.alias_change(actor_of(request), model, alias, number)
        return Response({"model": model.name, "alias": alias, "version": number})

    def delete(self, request: Request, name: str, alias: str) -> Response:
        governance.alias_change(actor_of(request), model_or_404(name), alias, None)
        return Response(status=status.HTTP_204_NO_CONTENT)


class PromotionPolicyIO(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)
    protected_now = serializers.SerializerMethodField(help_text="whether the production aliases are protected now")

    class Meta:
        model = PromotionPolicy
        fields = ["model", "protected", "protected_now", "protected_aliases", "approvals_required",
                  "release_manager_required", "author_may_approve", "requester_may_approve", "deployed_at",
                  "updated_at"]
        read_only_fields = ["deployed_at", "updated_at"]
        extra_kwargs = {"approvals_required": {"min_value": 1, "max_value": 10}}

    def get_protected_now(self, policy: PromotionPolicy) -> bool:
        return governance.is_protected(policy)

    def validate_protected_aliases(self, value: list[str]) -> list[str]:
        for alias in value:
            problem = governance.alias_problem(alias)
            if problem:
                raise serializers.ValidationError(problem)
        return sorted(set(value))


class PromotionPolicyView(BaseView):
    """Who approves a model's promotions and which aliases only a promotion moves. `protected` empty: protected
    once the model has been deployed."""

    capabilities = {"GET": Cap.MODEL_READ, "PATCH": Cap.POLICY_EDIT}

    @extend_schema(responses=PromotionPolicyIO)
    def get(self, request: Request, name: str) -> Response:
        return Response(PromotionPolicyIO(governance.promotion_policy(model_or_404(name))).data)

    @extend_schema(request=PromotionPolicyIO, responses=PromotionPolicyIO)
    def patch(self, request: Request, name: str) -> Response:
        model = model_or_404(name)
        current = governance.promotion_policy(model)
        data = PromotionPolicyIO(current if current.pk else None, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        return Response(PromotionPolicyIO(services.model_policy_update(
            actor_of(request), PromotionPolicy, model, dict(data.validated_data), "promotion_policy.update")).data)
