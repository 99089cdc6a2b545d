from __future__ import annotations

from django.db import models

from registry.models import ModelVersion


class Target(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"


class Precision(models.TextChoices):
    FP32 = "fp32", "fp32"
    INT8 = "int8", "int8 (dynamic quantization)"
    FP16 = "fp16", "fp16"


class Runtime(models.TextChoices):
    ONNXRUNTIME = "onnxruntime", "ONNX Runtime"
    TENSORRT = "tensorrt", "TensorRT (ONNX Runtime TensorRT execution provider)"


class BuildStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"  # kept: passed the parity gate
    REJECTED = "rejected", "Rejected"  # built, missed the parity gate; kept as evidence
    FAILED = "failed", "Failed"  # could not be built; the log says why


TERMINAL_BUILD_STATES = {BuildStatus.SUCCEEDED, BuildStatus.REJECTED, BuildStatus.FAILED}

BUILD_TRANSITIONS: dict[str, set[str]] = {
    BuildStatus.QUEUED: {BuildStatus.RUNNING, BuildStatus.FAILED},
    # RUNNING -> QUEUED: the reconciler requeues a build whose worker stopped heart-beating.
    BuildStatus.RUNNING: {BuildStatus.SUCCEEDED, BuildStatus.REJECTED, BuildStatus.FAILED, BuildStatus.QUEUED},
    BuildStatus.FAILED: {BuildStatus.QUEUED},  # retry on request
    BuildStatus.SUCCEEDED: set(),
    BuildStatus.REJECTED: set(),
}


class EngineBuild(models.Model):
    """One inference engine variant of a model version. Content-addressed: `content_key` hashes the
    model artifact, target, precision, runtime and toolchain versions."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="engine_builds")
    target = models.CharField(max_length=8, choices=Target.choices)
    precision = models.CharField(max_length=8, choices=Precision.choices)
    runtime = models.CharField(max_length=16, choices=Runtime.choices)
    content_key = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=16, choices=BuildStatus.choices, default=BuildStatus.QUEUED)
    step = models.CharField(max_length=32, blank=True, default="", help_text="current or last step")
    log = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    toolchain = models.JSONField(default=dict, blank=True)
    io = models.JSONField(default=dict, blank=True, help_text="input/output names, types and shapes")
    parity = models.JSONField(default=dict, blank=True, help_text="figures, thresholds and verdict")
    size_bytes = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, default="")
    build_seconds = models.FloatField(null=True, blank=True)
    engine_uri = models.TextField(blank=True, default="", help_text="where the engine and Triton entries are")
    reused_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    attempts = models.PositiveIntegerField(default=0)
    claimed_by = models.CharField(max_length=64, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["version_id", "target", "precision", "runtime"]
        constraints = [
            models.UniqueConstraint(fields=["version", "target", "precision", "runtime"], name="uniq_build_variant"),
        ]

    def __str__(self) -> str:
        return f"{self.version} {self.target}/{self.precision}/{self.runtime}"

    @property
    def variant(self) -> str:
        return f"{self.target}-{self.precision}-{self.runtime}"
