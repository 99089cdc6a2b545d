from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from pipelines.models import EngineBuild, HilRun, Target
from registry.models import ModelVersion, RegisteredModel


class Endpoint(models.Model):
    """What serves a registered model: its stable version. Clients call the gateway with the model's
    name; a canary, when a rollout runs, comes from the model's active Deployment."""

    model = models.OneToOneField(RegisteredModel, on_delete=models.PROTECT, related_name="endpoint")
    stable_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT,
                                       related_name="+")
    stable_engine = models.ForeignKey(EngineBuild, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    stable_triton_model = models.CharField(max_length=200, blank=True, default="")
    target = models.CharField(max_length=8, choices=Target.choices, default=Target.CPU)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model__name"]

    def __str__(self) -> str:
        return f"endpoint {self.model.name}"


class RolloutStatus(models.TextChoices):
    PENDING = "pending", "Loading the canary"
    PROGRESSING = "progressing", "Progressing"
    PAUSED = "paused", "Paused"
    AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
    PROMOTED = "promoted", "Promoted"
    ROLLED_BACK = "rolled_back", "Rolled back"


class RolloutMode(models.TextChoices):
    CANARY = "canary", "Canary (client traffic in steps)"
    SHADOW = "shadow", "Shadow (mirrored requests, no client sees its answers)"
    # A champion rollback: the previous champion loaded and made stable at once, without analysis.
    RESTORE = "restore", "Restore (the previous champion back, at once)"


ACTIVE_ROLLOUT_STATES = {RolloutStatus.PENDING, RolloutStatus.PROGRESSING, RolloutStatus.PAUSED,
                         RolloutStatus.AWAITING_APPROVAL}
# States in which the canary takes traffic (and is analysed).
SERVING_ROLLOUT_STATES = {RolloutStatus.PROGRESSING, RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL}

ROLLOUT_TRANSITIONS: dict[str, set[str]] = {
    # PENDING -> PROMOTED: a model's first deployment has no stable to compare with.
    RolloutStatus.PENDING: {RolloutStatus.PROGRESSING, RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK,
                            RolloutStatus.PAUSED},
    # PROGRESSING -> PROGRESSING: the next traffic step.
    RolloutStatus.PROGRESSING: {RolloutStatus.PROGRESSING, RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL,
                                RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK},
    RolloutStatus.PAUSED: {RolloutStatus.PROGRESSING, RolloutStatus.PENDING, RolloutStatus.PROMOTED,
                           RolloutStatus.ROLLED_BACK},
    RolloutStatus.AWAITING_APPROVAL: {RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK, RolloutStatus.PAUSED},
    RolloutStatus.PROMOTED: set(),
    RolloutStatus.ROLLED_BACK: set(),
}


class Deployment(models.Model):
    """One rollout of a model version onto the fleet: canary steps, analysis, then promotion or rollback."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="deployments")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="deployments")
    engine = models.ForeignKey(EngineBuild, on_delete=models.PROTECT, related_name="deployments")
    triton_model = models.CharField(max_length=200)
    target = models.CharField(max_length=8, choices=Target.choices, default=Target.CPU)
    previous_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT,
                                         related_name="+", help_text="the stable version when the rollout began")
    # Canary traffic weights (percent), each held for step_interval_s while analysed; then the final
    # step is held bake_s longer before promotion (or before waiting for approval).
    steps = ArrayField(models.PositiveSmallIntegerField(), default=list)
    step_interval_s = models.PositiveIntegerField(default=30)
    bake_s = models.PositiveIntegerField(default=30)
    max_p99_ms = models.FloatField(default=500.0)
    max_error_rate = models.FloatField(default=0.01)
    min_requests = models.PositiveIntegerField(default=20, help_text="canary requests a window needs to be judged")
    require_approval = models.BooleanField(default=False)
    # A shadow rollout sends the candidate no client traffic: the gateway mirrors shadow_share percent of
    # stable's requests to it, and it is judged on its answers to them against stable's (monitoring/shadow.py).
    mode = models.CharField(max_length=8, choices=RolloutMode.choices, default=RolloutMode.CANARY)
    shadow_share = models.PositiveSmallIntegerField(default=50, help_text="percent of stable's requests mirrored")
    status = models.CharField(max_length=24, choices=RolloutStatus.choices, default=RolloutStatus.PENDING)
    step_index = models.IntegerField(default=-1, help_text="-1 until the canary takes traffic")
    weight = models.PositiveSmallIntegerField(default=0, help_text="canary traffic percent now")
    step_started_at = models.DateTimeField(null=True, blank=True)
    analysis = models.JSONField(default=dict, blank=True, help_text="the latest window's figures and verdict")
    reason = models.TextField(blank=True, default="", help_text="why it ended, paused or waits")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    # The hardware evidence it was deployed on: the engine's passing HIL run on the fleet's profile, or a
    # release manager's written reason to deploy without one.
    hil_run = models.ForeignKey(HilRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    hil_override = models.TextField(blank=True, default="", help_text="why it was deployed without a passing HIL run")
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+", help_text="who promoted or aborted by hand")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["model"], condition=models.Q(status__in=[
                "pending", "progressing", "paused", "awaiting_approval"]), name="one_active_rollout_per_model"),
        ]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"deployment {self.pk} of {self.model.name} v{self.version.version}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_ROLLOUT_STATES


class AnalysisPoint(models.Model):
    """One analysis window of a rollout, kept as evidence and for the charts: the canary's and the stable
    version's traffic, error rate and p99 latency, and the verdict."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="points")
    at = models.DateTimeField()
    weight = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=16)  # pass, fail, inconclusive
    canary_requests = models.PositiveIntegerField(default=0)
    canary_error_rate = models.FloatField(default=0.0)
    canary_p99_ms = models.FloatField(null=True, blank=True)
    stable_requests = models.PositiveIntegerField(default=0)
    stable_error_rate = models.FloatField(default=0.0)
    stable_p99_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["deployment_id", "at"]
        indexes = [models.Index(fields=["deployment", "at"])]

    def __str__(self) -> str:
        return f"{self.deployment_id} {self.at:%H:%M:%S} {self.outcome}"


# ---- promotion requests (deployer/promotions.py) ------------------------------------------------------------


class PromotionStatus(models.TextChoices):
    PENDING = "pending", "Waiting for approvals"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    CANCELLED = "cancelled", "Cancelled"


PROMOTION_TRANSITIONS: dict[str, set[str]] = {
    PromotionStatus.PENDING: {PromotionStatus.APPROVED, PromotionStatus.REJECTED, PromotionStatus.CANCELLED},
    PromotionStatus.APPROVED: set(),
    PromotionStatus.REJECTED: set(),
    PromotionStatus.CANCELLED: set(),
}


class PromotionRequest(models.Model):
    """A request that a rollout's version become the model's champion, with the evidence gathered for it
    (and the champion's, side by side); approved by as many eligible people as the model's promotion policy
    asks, rejected by one, or approved at once by an administrator's break-glass with a written reason."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="promotion_requests")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="promotion_requests")
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="promotion_requests")
    status = models.CharField(max_length=16, choices=PromotionStatus.choices, default=PromotionStatus.PENDING)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    requested_by_name = models.CharField(max_length=150, help_text="kept if the account is deleted")
    reason = models.TextField(blank=True, default="", help_text="why the requester asks")
    evidence = models.JSONField(default=dict, help_text="the candidate's evidence, gathered when last refreshed")
    champion_evidence = models.JSONField(default=dict, blank=True, help_text="the champion's, for comparison")
    evidence_at = models.DateTimeField(null=True, blank=True)
    outcome = models.TextField(blank=True, default="", help_text="how it ended, in words")
    break_glass = models.TextField(blank=True, default="", help_text="an administrator's reason to skip approvals")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["deployment"], condition=models.Q(status="pending"),
                                               name="one_pending_promotion_per_deployment")]
        indexes = [models.Index(fields=["status", "-created_at"])]

    def __str__(self) -> str:
        return f"promotion request {self.pk} ({self.model.name} v{self.version.version}, {self.status})"


class ReviewDecision(models.TextChoices):
    APPROVE = "approve", "Approved"
    REJECT = "reject", "Rejected"
    BREAK_GLASS = "break_glass", "Break-glass"


class PromotionReview(models.Model):
    """One person's decision on a request, with their comment and the roles they held."""

    request = models.ForeignKey(PromotionRequest, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    reviewer_name = models.CharField(max_length=150)
    roles = ArrayField(models.CharField(max_length=32), default=list)
    decision = models.CharField(max_length=16, choices=ReviewDecision.choices)
    comment = models.TextField()
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["request_id", "at", "id"]
        constraints = [models.UniqueConstraint(fields=["request", "reviewer"], name="one_review_per_person")]

    def __str__(self) -> str:
        return f"{self.reviewer_name} {self.decision} request {self.request_id}"
