from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from registry.roles import Role


class Profile(models.Model):
    """Platform roles of a person or service account (one row per Django user)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    roles = ArrayField(models.CharField(max_length=32, choices=Role.choices), default=list, blank=True)
    is_service_account = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.user} {self.roles}"


class ApiToken(models.Model):
    """A bearer token: shown once at creation, stored as a SHA-256 digest (tokens are 256-bit random,
    so a slow hash adds nothing). Its roles are a subset of its owner's, checked on every use."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters, to recognise a token in lists")
    digest = models.CharField(max_length=64, unique=True)
    roles = ArrayField(models.CharField(max_length=32, choices=Role.choices), default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class RegisteredModel(models.Model):
    name = models.CharField(max_length=128, unique=True)
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=dict, blank=True)
    latest_version = models.PositiveIntegerField(default=0)
    version_count = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class VersionStatus(models.TextChoices):
    VALIDATING = "validating", "Validating"
    READY = "ready", "Ready"
    INVALID = "invalid", "Invalid"
    ARCHIVED = "archived", "Archived"


# Allowed transitions of a version: validation in an isolated worker decides ready or invalid.
VERSION_TRANSITIONS: dict[str, set[str]] = {
    VersionStatus.VALIDATING: {VersionStatus.READY, VersionStatus.INVALID, VersionStatus.ARCHIVED},
    VersionStatus.READY: {VersionStatus.ARCHIVED},
    VersionStatus.INVALID: {VersionStatus.ARCHIVED, VersionStatus.VALIDATING},
    VersionStatus.ARCHIVED: set(),
}


class VersionOrigin(models.TextChoices):
    UPLOAD = "upload", "Uploaded archive"
    RUN_URI = "run_uri", "runs:/ URI"
    MODEL_URI = "model_uri", "models:/ URI"
    MLFLOW_CLIENT = "mlflow_client", "MLflow client"
    DISCOVERED = "discovered", "Found in MLflow by the reconciler"


class ModelVersion(models.Model):
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=VersionStatus.choices, default=VersionStatus.VALIDATING)
    status_detail = models.TextField(blank=True, default="")
    origin = models.CharField(max_length=16, choices=VersionOrigin.choices)
    source = models.TextField(help_text="Source URI as registered in MLflow")
    storage_location = models.TextField(blank=True, default="")
    run_id = models.CharField(max_length=64, blank=True, default="")
    experiment_id = models.CharField(max_length=64, blank=True, default="")
    flavors = models.JSONField(default=dict, blank=True)
    signature = models.JSONField(null=True, blank=True)
    input_example = models.JSONField(null=True, blank=True)
    params = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    run_tags = models.JSONField(default=dict, blank=True)
    inspection = models.JSONField(default=dict, blank=True, help_text="What the isolated inspection found")
    reference_sample_uri = models.TextField(blank=True, default="", help_text="Rows given at registration")
    reference_sample_rows = models.PositiveIntegerField(default=0)
    reference_sample_note = models.TextField(blank=True, default="", help_text=(
        "Where the reference sample came from (the registration, or a dataset the version's run logged), or why "
        "a dataset the run logged was not used"))
    reference_uri = models.TextField(blank=True, default="", help_text=(
        "The reference set drift is judged against: the sample's rows (its reference sample, else its input "
        "example) with the original model's predictions, written by its first engine build"))
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id", "-version"]
        constraints = [models.UniqueConstraint(fields=["model", "version"], name="uniq_model_version")]
        indexes = [models.Index(fields=["model", "-version"]), models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.version}"


class AuditEvent(models.Model):
    """Append-only: a database trigger (see migration) refuses UPDATE and DELETE on this table."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    actor_name = models.CharField(max_length=150, help_text="Kept even if the account is deleted")
    via = models.CharField(max_length=16, help_text="web, api, mlflow, system")
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=200, db_index=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action} {self.target_type}:{self.target_id}"


class OutboxMessage(models.Model):
    """Follow-up work (a Celery task by name), written in the transaction of the change that needs it,
    so a commit and its follow-up are never separated by a broker outage or a crash. Sent after commit,
    or by the dispatcher (registry.outbox) once the broker is back; deleted once the broker has it."""

    task = models.CharField(max_length=200)
    args = models.JSONField(default=list)
    queue = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.task}{tuple(self.args)}"


class IdempotencyRecord(models.Model):
    """The first answer to a POST sent with an Idempotency-Key, written in the same transaction as the
    change it answers, so a retry with the key gets that answer and changes nothing (registry.api.idempotency)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of the method, path and request body")
    status_code = models.PositiveSmallIntegerField(default=0)
    body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="uniq_idempotency_key")]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.key} -> {self.status_code}"


class PromotionPolicy(models.Model):
    """Who may make a version a model's champion, and which aliases only a promotion moves (registry/governance.py).

    A protected model's production aliases (`champion` and `protected_aliases`) move only through an approved
    promotion request or a rollback; setting or deleting them through MLflow's API or /api/v1 is refused."""

    model = models.OneToOneField(RegisteredModel, on_delete=models.CASCADE, related_name="promotion_policy")
    protected = models.BooleanField(null=True, blank=True, help_text=(
        "empty: protected once the model has been deployed (deployed_at); true or false: as set"))
    protected_aliases = ArrayField(models.CharField(max_length=255), default=list, blank=True,
                                   help_text="aliases protected beside `champion`")
    approvals_required = models.PositiveSmallIntegerField(default=1)
    release_manager_required = models.BooleanField(default=True, help_text=(
        "approvals count only from people holding the release manager role"))
    author_may_approve = models.BooleanField(default=False, help_text="the version's author may approve it")
    requester_may_approve = models.BooleanField(default=False, help_text="the request's author may approve it")
    deployed_at = models.DateTimeField(null=True, blank=True, help_text="when the model first got a champion")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"promotion policy of {self.model.name}"
