"""Engine builds: requesting them, and every change of their state (one function, conditional UPDATE,
audit row in the same transaction, follow-up enqueued on commit)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from pipelines.models import BUILD_TRANSITIONS, BuildStatus, EngineBuild, Precision, Runtime, Target
from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import RegistryError
from registry.lifecycle import Lifecycle
from registry.models import ModelVersion, VersionStatus
from registry.outbox import outbox_enqueue

# Parity thresholds per precision. Classification: share of identical labels (at least) and largest
# probability difference (at most). Regression: errors relative to the mean |reference output|.
DEFAULT_THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    Precision.FP32: {"classification": {"label_agreement": 0.999, "max_probability_diff": 1e-4},
                     "regression": {"max_abs_error": 1e-4, "mean_abs_error": 1e-5}},
    Precision.FP16: {"classification": {"label_agreement": 0.99, "max_probability_diff": 1e-2},
                     "regression": {"max_abs_error": 1e-2, "mean_abs_error": 2e-3}},
    Precision.INT8: {"classification": {"label_agreement": 0.97, "max_probability_diff": 5e-2},
                     "regression": {"max_abs_error": 5e-2, "mean_abs_error": 1e-2}},
}

VARIANTS_BY_TARGET: dict[str, list[tuple[str, str, str]]] = {
    Target.CPU: [(Target.CPU, Precision.FP32, Runtime.ONNXRUNTIME), (Target.CPU, Precision.INT8, Runtime.ONNXRUNTIME)],
    Target.GPU: [(Target.GPU, Precision.FP16, Runtime.ONNXRUNTIME), (Target.GPU, Precision.FP16, Runtime.TENSORRT)],
}


class BuildError(RegistryError):
    pass


def planned_variants() -> list[tuple[str, str, str]]:
    """Variants for the hardware targets this installation has workers for (PLATFORM_BUILD_TARGETS)."""
    variants: list[tuple[str, str, str]] = []
    for target in settings.PLATFORM["BUILD_TARGETS"]:
        variants.extend(VARIANTS_BY_TARGET.get(target, []))
    return variants


def thresholds_for(version: ModelVersion, precision: str) -> dict[str, dict[str, float]]:
    """Defaults, overridden by model or version tags `parity.<precision>.<metric>` (version wins)."""
    merged = {kind: dict(values) for kind, values in DEFAULT_THRESHOLDS[precision].items()}
    for tags in (version.model.tags, version.tags):
        for key, value in (tags or {}).items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "parity" and parts[1] == precision:
                for kind in merged:
                    if parts[2] in merged[kind]:
                        try:
                            merged[kind][parts[2]] = float(value)
                        except ValueError as exc:
                            raise BuildError(f"tag {key}={value!r} is not a number") from exc
    return merged


def build_enqueue(build_id: int, target: str) -> None:
    """Queue the build on a worker of its target: through the outbox, so in the transaction that
    created or re-queued it."""
    outbox_enqueue("pipelines.tasks.engine_build_run", [build_id],
                   queue="pipelines" if target == Target.CPU else f"pipelines-{target}")


def _view(build: EngineBuild) -> dict[str, Any]:
    return {"variant": build.variant, "status": build.status, "step": build.step}


@transaction.atomic
def engine_builds_request(actor: Actor, version: ModelVersion,
                          variants: list[tuple[str, str, str]] | None = None) -> list[EngineBuild]:
    """Ask for the engines of a version. A variant that already has a build is left as it is
    (a failed one is queued again): asking twice is a no-op."""
    if version.status != VersionStatus.READY:
        raise BuildError(f"{version} is {version.status}; engines are built for ready versions", 409)
    builds = []
    for target, precision, runtime in variants or planned_variants():
        build, created = EngineBuild.objects.get_or_create(
            version=version, target=target, precision=precision, runtime=runtime)
        if created:
            audit_record(actor, "build.request", "engine_build", build.pk, after=_view(build))
            build_enqueue(build.pk, build.target)
        elif build.status == BuildStatus.FAILED:
            build_transition(build.pk, BuildStatus.QUEUED, actor, step="", error="")
            build_enqueue(build.pk, build.target)
        builds.append(build)
    return builds


BUILDS: Lifecycle[EngineBuild] = Lifecycle(
    EngineBuild, BUILD_TRANSITIONS, action="build", target_type="engine_build", target_id=lambda b: b.pk,
    describe=lambda b: f"build {b.pk} ({b.variant})", view=lambda b: {"status": b.status, "variant": b.variant},
    related=("version__model",), stamps={
        "started_at": {BuildStatus.RUNNING},
        "finished_at": {BuildStatus.SUCCEEDED, BuildStatus.REJECTED, BuildStatus.FAILED}})


def build_transition(build_id: int, to: str, actor: Actor = SYSTEM, only_from: set[str] | None = None,
                     **fields: Any) -> EngineBuild:
    note = {"error": fields["error"][:500]} if fields.get("error") else None
    return BUILDS.move(build_id, to, actor, only_from=only_from, note=note, **fields)


def build_append_log(build_id: int, lines: list[str], step: str | None = None) -> None:
    """Progress lines go straight to the row (no audit: they are not state changes)."""
    from django.db.models import F, Value
    from django.db.models.functions import Concat

    update: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if lines:
        update["log"] = Concat(F("log"), Value("".join(line.rstrip("\n") + "\n" for line in lines)))
    if step is not None:
        update["step"] = step
    EngineBuild.objects.filter(pk=build_id).update(**update)


def on_version_ready(sender: Any, version_id: int, **kwargs: Any) -> None:
    version = ModelVersion.objects.select_related("model").get(pk=version_id)
    engine_builds_request(SYSTEM, version)
