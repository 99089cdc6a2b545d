"""The API's shapes. The read shapes of models and versions (served on every page of a list) build
their output by hand: DRF's field-by-field machinery cost more than the query behind them. Their
declared fields still describe the schema, and registry/tests/test_api_shapes.py checks that each
hand-written output equals what DRF would produce from those fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth import get_user_model
from rest_framework import serializers

from registry.api.guard import refuse_unstorable
from registry.models import ApiToken, AuditEvent, ModelVersion, RegisteredModel, VersionOrigin, VersionStatus
from registry.roles import Role
from registry.selectors import LINEAGE_FIELDS


def when(value: datetime | None) -> str | None:
    """A timestamp as DRF's DateTimeField writes it: ISO 8601 in UTC, 'Z' for +00:00."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _username(user: Any) -> str | None:
    return None if user is None else str(user.username)


class ModelOut(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", default=None)

    class Meta:
        model = RegisteredModel
        fields = ["name", "description", "tags", "latest_version", "version_count", "created_by",
                  "created_at", "updated_at"]

    def to_representation(self, m: RegisteredModel) -> dict[str, Any]:
        return {"name": m.name, "description": m.description, "tags": m.tags, "latest_version": m.latest_version,
                "version_count": m.version_count, "created_by": _username(m.created_by),
                "created_at": when(m.created_at), "updated_at": when(m.updated_at)}


class ModelCreateIn(serializers.Serializer):
    name = serializers.CharField(max_length=128)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    tags = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False, default=dict)


class ModelUpdateIn(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True)
    tags = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)


class VersionOut(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    created_by = serializers.CharField(source="created_by.username", default=None)

    class Meta:
        model = ModelVersion
        fields = ["model", "version", "status", "status_detail", "origin", "description", "tags", "created_by",
                  "created_at", "updated_at"]

    def to_representation(self, v: ModelVersion) -> dict[str, Any]:
        return {"model": v.model.name, "version": v.version, "status": v.status, "status_detail": v.status_detail,
                "origin": v.origin, "description": v.description, "tags": v.tags,
                "created_by": _username(v.created_by), "created_at": when(v.created_at),
                "updated_at": when(v.updated_at)}


def version_row(model_name: str, row: dict[str, Any]) -> dict[str, Any]:
    """VersionOut's shape from a row of selectors.version_rows (or version_detail_row)."""
    return {"model": model_name, "version": row["version"], "status": row["status"],
            "status_detail": row["status_detail"], "origin": row["origin"], "description": row["description"],
            "tags": row["tags"], "created_by": row["created_by__username"], "created_at": when(row["created_at"]),
            "updated_at": when(row["updated_at"])}


class LineageOut(serializers.Serializer):
    source = serializers.CharField()  # type: ignore[assignment]
    storage_location = serializers.CharField()
    run_id = serializers.CharField()
    experiment_id = serializers.CharField()
    params = serializers.DictField()
    metrics = serializers.DictField()
    run_tags = serializers.DictField()
    flavors = serializers.DictField()
    reference_sample_uri = serializers.CharField()
    reference_sample_rows = serializers.IntegerField()
    reference_sample_note = serializers.CharField(help_text="Where the reference sample came from (the "
                                                            "registration, or a dataset the run logged), or why a "
                                                            "dataset the run logged was not used")
    reference_uri = serializers.CharField(help_text="The reference set drift is judged against (written by the "
                                                    "first engine build): sample rows and the original model's "
                                                    "predictions")
    signature = serializers.JSONField(allow_null=True)
    input_example = serializers.JSONField(allow_null=True)


class VersionDetailOut(VersionOut):
    lineage = serializers.SerializerMethodField()
    inspection = serializers.JSONField()

    class Meta(VersionOut.Meta):
        fields = [*VersionOut.Meta.fields, "lineage", "inspection"]

    def get_lineage(self, obj: ModelVersion) -> dict[str, object]:
        return LineageOut(obj).data

    def to_representation(self, v: ModelVersion) -> dict[str, Any]:
        lineage = {field: getattr(v, field) for field in LINEAGE_FIELDS}
        return {**super().to_representation(v), "lineage": lineage, "inspection": v.inspection}


def version_detail_row(row: dict[str, Any]) -> dict[str, Any]:
    """VersionDetailOut's shape from a row of selectors.version_detail_row."""
    return {**version_row(row["model__name"], row), "lineage": {field: row[field] for field in LINEAGE_FIELDS},
            "inspection": row["inspection"]}


class VersionRegisterIn(serializers.Serializer):
    """Either `archive` (multipart upload of a .zip/.tar.gz MLflow model folder) or `source`."""

    archive = serializers.FileField(required=False, help_text="MLflow model folder as .zip, .tar or .tar.gz")
    source = serializers.CharField(required=False, help_text="runs:/<run_id>/<path> or models:/<name>/<version>")  # type: ignore[assignment]
    reference_sample = serializers.FileField(
        required=False, help_text="Rows of real input (JSON list of rows, CSV of numbers or .npy) that engine "
                                  "builds check parity on; without it the input example is used")
    description = serializers.CharField(required=False, allow_blank=True, default="")
    tags = serializers.JSONField(required=False, default=dict)

    def validate_tags(self, value: Any) -> Any:
        if isinstance(value, str):  # JSON text inside the JSON body: decoded here, as a form field's is
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError:
                raise serializers.ValidationError('must be a JSON object, e.g. {"team": "vision"}') from None
        return value

    def validate(self, attrs: dict[str, object]) -> dict[str, object]:
        # Tags in a form field are JSON decoded after the body's check: a \u0000 in them is a NUL only now.
        refuse_unstorable(attrs.get("tags"), "tags")
        if bool(attrs.get("archive")) == bool(attrs.get("source")):
            raise serializers.ValidationError("give exactly one of 'archive' (file upload) or 'source' (URI)")
        return attrs


class VersionUpdateIn(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True)
    tags = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)


class VersionFilterIn(serializers.Serializer):
    status = serializers.ChoiceField(choices=VersionStatus.choices, required=False)
    origin = serializers.ChoiceField(choices=VersionOrigin.choices, required=False)


class TokenOut(serializers.ModelSerializer):
    owner = serializers.CharField(source="user.username")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "owner", "prefix", "roles", "created_at", "expires_at", "revoked_at", "last_used_at"]


class TokenCreateIn(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    roles = serializers.ListField(child=serializers.ChoiceField(choices=Role.choices), required=False)
    expires_in_days = serializers.IntegerField(required=False, min_value=0, max_value=3650)
    owner = serializers.CharField(required=False, help_text="username; admins may create tokens for others")


class TokenCreatedOut(TokenOut):
    token = serializers.CharField(help_text="Shown once. Store it now.")

    class Meta(TokenOut.Meta):
        fields = [*TokenOut.Meta.fields, "token"]


class UserOut(serializers.ModelSerializer):
    roles = serializers.ListField(source="profile.roles", child=serializers.CharField(), default=list)
    is_service_account = serializers.BooleanField(source="profile.is_service_account", default=False)

    class Meta:
        model = get_user_model()
        fields = ["id", "username", "email", "is_active", "roles", "is_service_account"]


class UserCreateIn(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    email = serializers.EmailField(required=False, allow_blank=True, default="")
    password = serializers.CharField(required=False, allow_blank=True, write_only=True, default="")
    roles = serializers.ListField(child=serializers.ChoiceField(choices=Role.choices))
    is_service_account = serializers.BooleanField(default=False)


class UserUpdateIn(serializers.Serializer):
    roles = serializers.ListField(child=serializers.ChoiceField(choices=Role.choices), required=False)
    is_active = serializers.BooleanField(required=False)


class AuditOut(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = ["id", "at", "actor_name", "via", "action", "target_type", "target_id", "before", "after"]


class MeOut(serializers.Serializer):
    username = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())
    capabilities = serializers.ListField(child=serializers.CharField())
