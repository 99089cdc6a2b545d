"""Engine builds: requesting them, and every change of their state (one function, conditional UPDATE,
audit row in the same transaction, follow-up enqueued on commit)."""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from pipelines.models import (
    ACTIVE_HIL_STATES,
    BUILD_TRANSITIONS,
    HIL_TRANSITIONS,
    TERMINAL_HIL_STATES,
    BuildStatus,
    EngineBuild,
    HilPolicy,
    HilRun,
    HilStatus,
    Precision,
    Runtime,
    Target,
)
from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import RegistryError
from registry.lifecycle import Lifecycle
from registry.models import ModelVersion, RegisteredModel, VersionStatus
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


log = logging.getLogger(__name__)


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
    related=("version__model",), after_commit=lambda b: [functools.partial(on_build_kept, b.pk)]
    if b.status == BuildStatus.SUCCEEDED else [], stamps={
        "started_at": {BuildStatus.RUNNING},
        "finished_at": {BuildStatus.SUCCEEDED, BuildStatus.REJECTED, BuildStatus.FAILED}})


def build_transition(build_id: int, to: str, actor: Actor = SYSTEM, only_from: set[str] | None = None,
                     **fields: Any) -> EngineBuild:
    note = {"error": fields["error"][:500]} if fields.get("error") else None
    return BUILDS.move(build_id, to, actor, only_from=only_from, note=note, **fields)


def _append_log(model: Any, pk: int, lines: list[str], **update: Any) -> None:
    """Progress lines and the heartbeat straight to the row (no audit: they are not state changes)."""
    from django.db.models import F, Value
    from django.db.models.functions import Concat

    update["heartbeat_at"] = timezone.now()
    if lines:
        update["log"] = Concat(F("log"), Value("".join(line.rstrip("\n") + "\n" for line in lines)))
    model.objects.filter(pk=pk).update(**update)


def build_append_log(build_id: int, lines: list[str], step: str | None = None) -> None:
    _append_log(EngineBuild, build_id, lines, **({"step": step} if step is not None else {}))


def on_version_ready(sender: Any, version_id: int, **kwargs: Any) -> None:
    version = ModelVersion.objects.select_related("model").get(pk=version_id)
    engine_builds_request(SYSTEM, version)


# ---- hardware-in-the-loop runs -------------------------------------------------------------------------

HIL_RUNS: Lifecycle[HilRun] = Lifecycle(
    HilRun, HIL_TRANSITIONS, action="hil", target_type="hil_run", target_id=lambda r: r.pk,
    describe=lambda r: f"HIL run {r.pk} ({r.build.variant} on {r.profile})",
    view=lambda r: {"status": r.status, "profile": r.profile, "build": r.build_id, "variant": r.build.variant},
    related=("build",), stamps={"started_at": {HilStatus.RUNNING}, "finished_at": TERMINAL_HIL_STATES})


def hil_transition(run_id: int, to: str, actor: Actor = SYSTEM, only_from: set[str] | None = None,
                   **fields: Any) -> HilRun:
    note = {"verdict": fields["verdict"][:500]} if fields.get("verdict") else None
    return HIL_RUNS.move(run_id, to, actor, only_from=only_from, note=note, **fields)


def serving_profile(target: str) -> str:
    """The hardware profile the serving fleet runs a deployment target on: PLATFORM_FLEET_PROFILE (cpu) or
    PLATFORM_FLEET_GPU_PROFILE (gpu), else the best profile of this machine (where the local fleet runs)."""
    from pipelines import hardware

    configured = settings.PLATFORM["FLEET_GPU_PROFILE" if target == Target.GPU else "FLEET_PROFILE"]
    if configured:
        if configured not in hardware.PROFILES_BY_NAME:
            raise BuildError(f"the fleet's profile {configured!r} is not one of "
                             f"{', '.join(hardware.PROFILES_BY_NAME)}", 500)
        return str(configured)
    local = hardware.local_profile(gpu=target == Target.GPU)
    if local is None:
        setting = "PLATFORM_FLEET_GPU_PROFILE" if target == Target.GPU else "PLATFORM_FLEET_PROFILE"
        raise BuildError(f"this machine matches no {target} hardware profile; set {setting}", 409)
    return local.name


def hil_profiles_for(build: EngineBuild) -> list[str]:
    """The profiles a kept engine is measured on: PLATFORM_HIL_PROFILES of its target's kind, else the fleet's."""
    from pipelines import hardware

    wanted = [p for p in settings.PLATFORM["HIL_PROFILES"]
              if p in hardware.PROFILES_BY_NAME and hardware.PROFILES_BY_NAME[p].target == build.target]
    return wanted or [serving_profile(build.target)]


def hil_sweep() -> dict[str, Any]:
    p = settings.PLATFORM
    return {"concurrencies": list(p["HIL_CONCURRENCIES"]), "window_s": p["HIL_WINDOW_S"],
            "max_trials": p["HIL_MAX_TRIALS"], "stability_pct": 10.0, "stable_windows": 3}


def hil_policy(model: RegisteredModel) -> HilPolicy:
    return HilPolicy.objects.filter(model=model).first() or HilPolicy(model=model)


HIL_OBJECTIVES = ("p99_ms", "batch", "concurrency", "min_throughput", "max_memory_mb", "max_regression_pct")


def hil_objectives(version: ModelVersion) -> dict[str, dict[str, Any]]:
    """The objectives a version's HIL runs are judged by, each with where it comes from: the version's tags
    `hil.<key>` (given at registration or later), then the model's tags, then the model's HIL policy."""
    policy = hil_policy(version.model)
    found: dict[str, dict[str, Any]] = {}
    for key in HIL_OBJECTIVES:
        for where, tags in (("version tag", version.tags), ("model tag", version.model.tags)):
            raw = (tags or {}).get(f"hil.{key}")
            if raw is None:
                continue
            try:
                number = float(raw)
            except ValueError as exc:
                raise BuildError(f"{where} hil.{key}={raw!r} is not a number") from exc
            if number < 0 or (key in ("batch", "concurrency") and (number < 1 or number != int(number))):
                raise BuildError(f"{where} hil.{key}={raw!r} is out of range")
            found[key] = {"value": int(number) if key in ("batch", "concurrency") else number,
                          "source": f"{where} hil.{key}"}
            break
        else:
            value = getattr(policy, key)
            if value is not None:
                found[key] = {"value": value, "source": "the model's HIL policy" if policy.pk else "default"}
    return found


@transaction.atomic
def hil_runs_request(actor: Actor, build: EngineBuild, profiles: list[str] | None = None) -> list[HilRun]:
    """Ask for HIL runs of a kept engine on `profiles` (default: hil_profiles_for). A profile that already has
    a waiting or running run of it keeps that one: asking twice is a no-op."""
    from pipelines import hardware

    if build.status != BuildStatus.SUCCEEDED:
        raise BuildError(f"build {build.pk} ({build.variant}) is {build.status}; only kept engines are measured", 409)
    runs = []
    timeout = hil_policy(build.version.model).wait_timeout_s or settings.PLATFORM["HIL_WAIT_TIMEOUT_S"]
    for name in profiles or hil_profiles_for(build):
        profile = hardware.PROFILES_BY_NAME.get(name)
        if profile is None:
            raise BuildError(f"no hardware profile {name!r}; profiles: {', '.join(hardware.PROFILES_BY_NAME)}")
        if profile.target != build.target:
            raise BuildError(f"{name} is a {profile.target} profile; build {build.pk} is a {build.target} engine")
        active = HilRun.objects.filter(build=build, profile=name, status__in=ACTIVE_HIL_STATES).first()
        if active is not None:
            runs.append(active)
            continue
        try:
            with transaction.atomic():  # a concurrent request may have made the run just now
                run = HilRun.objects.create(build=build, profile=name, requested_by=actor.user_or_none,
                                            sweep={**hil_sweep(), "wait_timeout_s": timeout},
                                            wait_deadline=timezone.now() + timedelta(seconds=timeout))
        except IntegrityError:
            runs.append(HilRun.objects.get(build=build, profile=name, status__in=ACTIVE_HIL_STATES))
            continue
        audit_record(actor, "hil.request", "hil_run", run.pk, after={
            "status": run.status, "profile": name, "build": build.pk, "variant": build.variant,
            "version": build.version.version, "wait_timeout_s": timeout})
        hil_enqueue(run)
        runs.append(run)
    return runs


def hil_enqueue(run: HilRun) -> None:
    from pipelines import hardware

    outbox_enqueue("pipelines.tasks.hil_run_execute", [run.pk], queue=hardware.PROFILES_BY_NAME[run.profile].queue)


def hil_waiting_words(run: HilRun, presence: Any = None) -> str:
    """Why a waiting run waits, from its profile's live workers now (`presence`: read already, for many runs)."""
    from pipelines import hardware

    presence = presence or hardware.profile_presence(run.profile)
    deadline = f"it times out at {run.wait_deadline:%Y-%m-%d %H:%M:%S} UTC"
    return f"{'queued for ' + run.profile + ': ' if presence.live else ''}{presence.words()}; {deadline}"


def hil_latest(build: EngineBuild, profile: str) -> HilRun | None:
    """The newest finished HIL run of an engine on a profile: the one that counts."""
    return (HilRun.objects.filter(build=build, profile=profile, status__in=TERMINAL_HIL_STATES)
            .order_by("-finished_at", "-pk").first())


def hil_gate(build: EngineBuild) -> tuple[HilRun | None, str]:
    """Whether the engine may be deployed to its target's fleet: (its newest finished run there, "") when that
    run passed, else (that run or None, why not in words)."""
    profile = serving_profile(build.target)
    latest = hil_latest(build, profile)
    if latest is not None and latest.status == HilStatus.PASSED:
        return latest, ""
    active = HilRun.objects.filter(build=build, profile=profile, status__in=ACTIVE_HIL_STATES).first()
    what = f"engine {build.variant} of {build.version.model.name} v{build.version.version}"
    if latest is None:
        why = f"the {what} has no finished HIL run on {profile}, the fleet's hardware"
    else:
        why = f"the newest HIL run of the {what} on {profile} (run {latest.pk}) {latest.status}: {latest.verdict}"
    if active is not None:
        why += f"; run {active.pk} is {active.status}"
    return latest, why


def on_build_kept(build_id: int) -> None:
    """A kept engine is measured on its profiles (PLATFORM_HIL_AUTO). After the build's commit: a failure
    here only logs, and the reconciler plans the runs later (hil_runs_reconcile)."""
    if not settings.PLATFORM["HIL_AUTO"]:
        return
    try:
        hil_runs_request(SYSTEM, EngineBuild.objects.select_related("version__model").get(pk=build_id))
    except Exception as exc:  # noqa: BLE001 - planned again by the reconciler
        log.warning("HIL runs of build %s not requested yet: %s", build_id, exc)


def hil_append_log(run_id: int, lines: list[str]) -> None:
    _append_log(HilRun, run_id, lines)
