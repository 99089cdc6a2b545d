"""What monitoring keeps: each model's policy, the captured traffic of its serving versions (rows of
named inputs and the prediction answered), each drift check with its evidence, and the notification
receivers with every delivery made to them."""

from __future__ import annotations

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import URLValidator
from django.db import models
from django.utils import timezone

from registry.models import ModelVersion, RegisteredModel


class MonitorPolicy(models.Model):
    """A model's monitoring settings; a model without a row has the defaults (see policy_for)."""

    model = models.OneToOneField(RegisteredModel, on_delete=models.CASCADE, related_name="monitor_policy")
    # Capture at the gateway: every request while fewer than `capture_floor_per_s` were taken this second
    # (a quiet model keeps all its traffic), then `capture_fraction` of the rest.
    capture_floor_per_s = models.PositiveIntegerField(default=20)
    capture_fraction = models.FloatField(default=0.05)
    # Drift: the newest `max_rows` captured rows of the last `window_minutes`, judged when there are at least
    # `min_rows`; Evidently's defaults for the share of drifted columns, the method and threshold unless set.
    window_minutes = models.PositiveIntegerField(default=60)
    min_rows = models.PositiveIntegerField(default=200)
    max_rows = models.PositiveIntegerField(default=10_000)
    drift_share = models.FloatField(default=0.5)
    drift_method = models.CharField(max_length=64, blank=True, default="", help_text=(
        "An Evidently stattest name (ks, psi, wasserstein, ...); blank: Evidently's choice per column"))
    drift_threshold = models.FloatField(null=True, blank=True)
    # Captured rows older than this are deleted.
    retention_hours = models.PositiveIntegerField(default=72)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"monitoring policy of {self.model.name}"


class CapturedRow(models.Model):
    """One row of a sampled inference request: its inputs by column, and what the engine answered."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    at = models.DateTimeField()
    inputs = models.JSONField()
    prediction = models.JSONField(null=True)

    class Meta:
        indexes = [models.Index(fields=["version", "at"], name="captured_version_at")]

    def __str__(self) -> str:
        return f"row of version {self.version_id} at {self.at:%Y-%m-%d %H:%M:%S}"


class CaptureCursor(models.Model):
    """How far the capture has read the gateway's sample stream: moved in the transaction that stores
    the rows read, so a pass that dies stores nothing twice and skips nothing."""

    stream = models.CharField(max_length=200, unique=True)
    last_id = models.CharField(max_length=64, default="0-0")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.stream} read up to {self.last_id}"


class DriftOutcome(models.TextChoices):
    DRIFT = "drift", "Drift"
    NO_DRIFT = "no_drift", "No drift"
    NOT_ENOUGH_DATA = "not_enough_data", "Not enough captured rows"
    NO_REFERENCE = "no_reference", "No reference set"
    FAILED = "failed", "Could not be judged"


class DriftCheck(models.Model):
    """One drift check of a serving version: the window against its reference set, and the verdict."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="drift_checks")
    created_at = models.DateTimeField(auto_now_add=True)
    window_from = models.DateTimeField(null=True)
    window_to = models.DateTimeField(null=True)
    current_rows = models.PositiveIntegerField(default=0)
    reference_rows = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=DriftOutcome.choices)
    dataset_drift = models.BooleanField(default=False)
    prediction_drift = models.BooleanField(default=False)
    drifted_share = models.FloatField(default=0.0)
    drift_share = models.FloatField(default=0.5)
    columns = models.JSONField(default=list, help_text="Per column: method, threshold, score, drifted")
    summary = models.TextField()
    seconds = models.FloatField(default=0.0, help_text="How long Evidently took")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["version", "-created_at"], name="drift_version_created")]

    def __str__(self) -> str:
        return f"drift check {self.pk} of version {self.version_id}: {self.outcome}"


class DriftReport(models.Model):
    """Evidently's HTML report of a check, gzip-compressed (a few hundred kB); old ones are deleted."""

    drift_check = models.OneToOneField(DriftCheck, on_delete=models.CASCADE, related_name="report")
    html_gz = models.BinaryField()

    def __str__(self) -> str:
        return f"report of drift check {self.drift_check_id}"


# ---- notifications (monitoring/notify.py) ------------------------------------------------------------------


class ReceiverKind(models.TextChoices):
    SLACK = "slack", "Slack-compatible (incoming webhook)"
    JSON = "json", "Generic JSON"


class Receiver(models.Model):
    """Where notifications go: a URL that gets every event as a signed POST (Standard Webhooks). The secret
    signs; it is shown once, in the answer that created the receiver."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=8, choices=ReceiverKind.choices)
    url = models.URLField(max_length=2000, validators=[URLValidator(schemes=["http", "https"])])
    secret = models.CharField(max_length=120, help_text="whsec_<base64 of the key bytes>; never shown again")
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"receiver {self.name} ({self.kind})"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"


# pending -> delivered | failed; a redelivery sends a delivered or failed one again.
DELIVERY_TRANSITIONS: dict[str, set[str]] = {
    DeliveryStatus.PENDING: {DeliveryStatus.DELIVERED, DeliveryStatus.FAILED},
    DeliveryStatus.DELIVERED: {DeliveryStatus.PENDING},
    DeliveryStatus.FAILED: {DeliveryStatus.PENDING},
}


class Delivery(models.Model):
    """One event for one receiver, and every attempt to send it (`log`: when, status code or error,
    seconds). `event_id` is the `webhook-id` header: the same on every attempt and redelivery, so a
    receiver can drop what it has already seen."""

    receiver = models.ForeignKey(Receiver, on_delete=models.CASCADE, related_name="deliveries")
    event_type = models.CharField(max_length=64)
    event_id = models.CharField(max_length=64, unique=True)
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Attempts of the current round (a redelivery "
                                                                "starts a new one); the log keeps them all")
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    log = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="delivery_due"),
            models.Index(fields=["receiver", "-created_at"], name="delivery_receiver_created"),
            models.Index(fields=["-created_at"], name="delivery_created"),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} ({self.event_type}): {self.status}"
