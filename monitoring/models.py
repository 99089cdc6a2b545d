"""What monitoring keeps: each model's policy, the captured traffic of its serving versions (rows of
named inputs and the prediction answered), each drift check with its evidence, and the notification
receivers with every delivery made to them."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import URLValidator
from django.db import models
from django.utils import timezone

from registry.models import ModelVersion, RegisteredModel


class MonitorPolicy(models.Model):
    """A model's monitoring settings; a model without a row has the defaults (see monitoring/selectors.py)."""

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
    # SLOs of each serving version: `slo_latency_target` of requests answered within `slo_latency_ms` (0.99:
    # a p99 at that budget), and `slo_availability` of requests answered without an error.
    slo_latency_ms = models.FloatField(default=250.0)
    slo_latency_target = models.FloatField(default=0.99)
    slo_availability = models.FloatField(default=0.999)
    # Decisions: drift and prediction disagreement judged at each canary step (monitoring/services.py
    # canary_inputs); a champion whose drift or SLO alert fires rolled back to the previous champion by the
    # deployer (off by default: on-call gets the button on the alert page instead).
    canary_drift_gate = models.BooleanField(default=True)
    rollback_on_drift = models.BooleanField(default=False)
    rollback_on_slo = models.BooleanField(default=False)
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


class SloSample(models.Model):
    """A serving version's cumulative counts at one gateway, as its /metrics showed them at `at`: requests,
    errors and requests slower than the latency objective (burn rates are increases between samples)."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    source = models.CharField(max_length=300, help_text="The gateway's metrics URL")
    at = models.DateTimeField()
    requests = models.FloatField()
    errors = models.FloatField()
    slow = models.FloatField()
    latency_ms = models.FloatField(help_text="The objective `slow` was counted against")

    class Meta:
        indexes = [models.Index(fields=["version", "at"], name="slo_version_at")]

    def __str__(self) -> str:
        return f"SLO sample of version {self.version_id} from {self.source} at {self.at:%H:%M:%S}"


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


class AlertKind(models.TextChoices):
    DRIFT = "drift", "Input or prediction drift"
    LATENCY = "latency", "Latency SLO burning"
    ERRORS = "errors", "Error budget burning"


class AlertStatus(models.TextChoices):
    FIRING = "firing", "Firing"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


# Firing until someone acknowledges it or its condition has been clear for a while; resolved is final (the
# condition coming back raises a new alert).
ALERT_TRANSITIONS: dict[str, set[str]] = {
    AlertStatus.FIRING: {AlertStatus.ACKNOWLEDGED, AlertStatus.RESOLVED},
    AlertStatus.ACKNOWLEDGED: {AlertStatus.RESOLVED},
    AlertStatus.RESOLVED: set(),
}


class Alert(models.Model):
    """A condition on a model version that needs a person: one open alert per fingerprint (model, version,
    kind), however often the condition is seen again."""

    fingerprint = models.CharField(max_length=300)
    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="alerts")
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    severity = models.CharField(max_length=8, default="page", help_text="page (someone now) or ticket")
    status = models.CharField(max_length=16, choices=AlertStatus.choices, default=AlertStatus.FIRING)
    title = models.CharField(max_length=300)
    summary = models.TextField(help_text="The evidence in words, as last seen")
    evidence = models.JSONField(default=dict, help_text="Figures, and the check or window behind them")
    runbook = models.TextField()
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    silenced_until = models.DateTimeField(null=True, blank=True)
    silence_reason = models.TextField(blank=True, default="")
    first_seen_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField()
    clear_since = models.DateTimeField(null=True, blank=True, help_text="When its condition was last seen clear")
    last_notified_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-last_seen_at"]
        constraints = [models.UniqueConstraint(fields=["fingerprint"], condition=~models.Q(status="resolved"),
                                               name="one_open_alert_per_fingerprint")]

    def __str__(self) -> str:
        return f"{self.kind} alert on {self.fingerprint} ({self.status})"
# ---- notifications (monitoring/notify.py) ------------------------------------------------------------------


class ReceiverKind(models.TextChoices):
    SLACK = "slack", "Slack-compatible (incoming webhook)"
    JSON = "json", "Generic JSON"


class Receiver(models.Model):
    """Where notifications go: a URL that gets the events it subscribes to as signed POSTs (Standard
    Webhooks). The secret signs; it is shown once, in the answer that created the receiver."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=8, choices=ReceiverKind.choices)
    url = models.URLField(max_length=2000, validators=[URLValidator(schemes=["http", "https"])])
    secret = models.CharField(max_length=120, help_text="whsec_<base64 of the key bytes>; never shown again")
    enabled = models.BooleanField(default=True)
    # The subscription: an event reaches the receiver when its type is listed and its model is listed; an
    # empty list means all. An event about no model (a platform-wide one) reaches only receivers of all models.
    event_types = ArrayField(models.CharField(max_length=64), default=list, blank=True,
                             help_text="Event types it gets (monitoring/notify.py EVENT_TYPES); empty: all")
    model_names = ArrayField(models.CharField(max_length=128), default=list, blank=True,
                             help_text="Names of the models whose events it gets; empty: all")
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


class EventCursor(models.Model):
    """Where the events dispatcher (monitoring/events.py) stands in the audit log: every audit row with an
    id at or below `last_id` has been dispatched, or was not an event. One row (name "events")."""

    name = models.CharField(max_length=32, unique=True)
    last_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"event cursor {self.name} at {self.last_id}"


class DispatchedEvent(models.Model):
    """An audit row the dispatcher has turned into deliveries, written in the same transaction as they are:
    its unique audit id is what makes each row dispatched once, however many dispatchers race. Kept while
    the row is above the cursor (its window is scanned again for rows committed late), then dropped."""

    audit_id = models.BigIntegerField(unique=True)
    event_type = models.CharField(max_length=64)
    deliveries = models.PositiveIntegerField(default=0)
    at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"audit {self.audit_id} dispatched as {self.event_type} ({self.deliveries} deliveries)"
