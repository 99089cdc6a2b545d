from __future__ import annotations

from django.conf import settings
from django.db import models

from registry.models import ModelVersion, RegisteredModel


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


class HilStatus(models.TextChoices):
    WAITING = "waiting", "Waiting for a worker of its target"
    RUNNING = "running", "Running"
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"  # measured, and missed its SLO, its accuracy or the champion
    UNSTABLE = "unstable", "Unstable"  # a point's windows never agreed: no verdict can be given
    ERROR = "error", "Error"  # could not be measured; the log says why
    TIMED_OUT = "timed_out", "Timed out waiting for a worker"


TERMINAL_HIL_STATES = {HilStatus.PASSED, HilStatus.FAILED, HilStatus.UNSTABLE, HilStatus.ERROR, HilStatus.TIMED_OUT}
ACTIVE_HIL_STATES = {HilStatus.WAITING, HilStatus.RUNNING}

HIL_TRANSITIONS: dict[str, set[str]] = {
    HilStatus.WAITING: {HilStatus.RUNNING, HilStatus.TIMED_OUT, HilStatus.ERROR},
    # RUNNING -> WAITING: the reconciler hands back a run whose worker stopped heart-beating.
    HilStatus.RUNNING: {HilStatus.PASSED, HilStatus.FAILED, HilStatus.UNSTABLE, HilStatus.ERROR, HilStatus.WAITING},
    HilStatus.PASSED: set(),
    HilStatus.FAILED: set(),
    HilStatus.UNSTABLE: set(),
    HilStatus.ERROR: set(),
    HilStatus.TIMED_OUT: set(),
}


class HilRun(models.Model):
    """A hardware-in-the-loop run: one kept engine measured on a hardware profile in a Triton server of its
    own, interleaved with the champion's engine on the same server, judged against the SLO and the champion.
    A new request makes a new run; a finished run is never changed (it is the evidence)."""

    build = models.ForeignKey(EngineBuild, on_delete=models.CASCADE, related_name="hil_runs")
    profile = models.CharField(max_length=32, help_text="hardware profile (pipelines/hardware.py)")
    status = models.CharField(max_length=16, choices=HilStatus.choices, default=HilStatus.WAITING)
    champion_build = models.ForeignKey(EngineBuild, null=True, blank=True, on_delete=models.SET_NULL,
                                       related_name="+", help_text="the champion's engine measured beside it")
    sweep = models.JSONField(default=dict, blank=True, help_text="the sweep and stability settings")
    slo = models.JSONField(default=dict, blank=True, help_text="the objectives judged, each with where it came from")
    results = models.JSONField(default=dict, blank=True, help_text="points, memory and accuracy of both engines")
    checks = models.JSONField(default=list, blank=True, help_text="each judgement: name, outcome, words, figures")
    verdict = models.TextField(blank=True, default="", help_text="the verdict in words")
    log = models.TextField(blank=True, default="")
    hardware = models.JSONField(default=dict, blank=True, help_text="the worker's detected facts")
    worker = models.CharField(max_length=200, blank=True, default="")
    mlflow_run_id = models.CharField(max_length=64, blank=True, default="", help_text="where the results were logged")
    wait_deadline = models.DateTimeField(help_text="a run still waiting then times out")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    attempts = models.PositiveIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["build", "profile"], condition=models.Q(status__in=["waiting", "running"]),
                                    name="one_active_hil_run_per_engine_and_profile"),
        ]
        indexes = [models.Index(fields=["build", "profile", "-created_at"], name="hil_build_profile_created")]

    def __str__(self) -> str:
        return f"HIL run {self.pk} of build {self.build_id} on {self.profile}"


class HilPolicy(models.Model):
    """A model's HIL objectives and waiting time; version and model tags `hil.<key>` override them (the version's
    first). Empty objectives are not judged."""

    model = models.OneToOneField(RegisteredModel, on_delete=models.CASCADE, related_name="hil_policy")
    p99_ms = models.FloatField(null=True, blank=True, help_text="p99 latency budget, ms, at `batch` and `concurrency`")
    batch = models.PositiveIntegerField(default=1)
    concurrency = models.PositiveIntegerField(default=1)
    min_throughput = models.FloatField(null=True, blank=True, help_text="inferences/s at the best point, at least")
    max_memory_mb = models.FloatField(null=True, blank=True, help_text="server memory (PSS) with the engine, MiB")
    max_regression_pct = models.FloatField(default=10.0, help_text="allowed regression against the champion, "
                                                                   "beyond the measurement's noise band")
    wait_timeout_s = models.PositiveIntegerField(null=True, blank=True,
                                                 help_text="a run waits this long for a worker; empty: the default")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"HIL policy of {self.model.name}"
