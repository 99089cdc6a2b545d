"""Rollouts: create a deployment, move it through its state machine, and converge the world to it.

The decision (promote, roll back, next step) is one transaction in PostgreSQL: the deployment's status,
the endpoint's stable version and the audit rows change together. Everything outside the database
(Triton placements, the gateways' routing table, the MLflow alias `champion`, unloading) follows from
that state in `fleet_converge`, which is idempotent and runs on every reconciler tick: a worker killed
anywhere leaves a state the next tick finishes.

Order keeps clients whole: a model is loaded and ready before the table routes to it, and it is unloaded
only after every live gateway has applied a table without it and a short drain has passed.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from deployer import shadow
from deployer.fleet import Fleet, FleetError, FleetNotReady, Placement
from deployer.gateway.routing import INSTANCES_KEY as GATEWAYS_KEY
from deployer.gateway.routing import load_routes, publish_routes, table_to_dict
from deployer.models import (
    ACTIVE_ROLLOUT_STATES,
    ROLLOUT_TRANSITIONS,
    SERVING_ROLLOUT_STATES,
    AnalysisPoint,
    Deployment,
    Endpoint,
    RolloutMode,
    RolloutStatus,
)
from monitoring import canary
from monitoring import services as monitoring_services
from monitoring import shadow as shadow_analysis
from monitoring.selectors import policies_for
from pipelines.models import BuildStatus, EngineBuild, HilRun, Precision, Runtime, Target
from pipelines.services import hil_gate
from registry import governance, locks, mlflow_store
from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import RegistryError, TransitionError
from registry.kv import redis_client
from registry.lifecycle import Lifecycle
from registry.models import ModelVersion, RegisteredModel, VersionStatus
from registry.outbox import nudge

log = logging.getLogger("deployer")

CHAMPION = mlflow_store.CHAMPION
RETIRING_KEY = "deployer:retiring"  # triton model -> {"since": t, "routes_version": n}
# Engines preferred for serving, best first: fp32 is the fastest at batch 1 on CPUs without VNNI
# (see bench/engines); int8 and the GPU variants follow.
ENGINE_PREFERENCE = [(Precision.FP32, Runtime.ONNXRUNTIME), (Precision.INT8, Runtime.ONNXRUNTIME),
                     (Precision.FP16, Runtime.TENSORRT), (Precision.FP16, Runtime.ONNXRUNTIME)]


class DeployError(RegistryError):
    pass


class HilGateError(DeployError):
    """The engine has no passing HIL run on the fleet's hardware, and no override was given (409)."""


def _setting(name: str) -> Any:
    return settings.PLATFORM[name]


@functools.cache
def fleet() -> Fleet:
    kind = _setting("FLEET")
    if kind == "local":
        from deployer.fleet_local import LocalFleet

        return LocalFleet(redis_client(), Path(settings.STATE_DIR) / "fleet-cache")
    if kind == "kubernetes":
        from deployer.kube import KubernetesFleet

        return KubernetesFleet.from_env()  # type: ignore[no-any-return]
    raise DeployError(f"PLATFORM_FLEET is {kind!r}; it must be 'local' or 'kubernetes'")


def enqueue_reconcile() -> None:
    """Run the reconciler now rather than at its next tick; it owns every rollout state, so a nudge
    lost to a broker outage costs only the wait for that tick."""
    nudge("deployer.tasks.rollouts_reconcile", queue="deployer", expires=30)


# ---- creating a deployment ----------------------------------------------------------------------------------


def engine_for(version: ModelVersion, target: str) -> EngineBuild:
    kept = {(b.precision, b.runtime): b for b in
            EngineBuild.objects.filter(version=version, target=target, status=BuildStatus.SUCCEEDED)}
    for choice in ENGINE_PREFERENCE:
        if choice in kept:
            return kept[choice]
    builds = EngineBuild.objects.filter(version=version, target=target)
    seen = ", ".join(f"{b.variant} {b.status}" for b in builds) or "none requested"
    raise DeployError(f"version {version.version} of {version.model.name} has no engine that passed its build "
                      f"for target {target} (builds: {seen})", 409)


def _check_steps(steps: list[int]) -> list[int]:
    if not steps:
        raise DeployError("steps: give at least one canary traffic weight, e.g. [10, 50]")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100 for s in steps):
        raise DeployError(f"steps: each weight is a whole percent 1..100, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise DeployError(f"steps: weights must increase, got {steps}")
    return steps


def _view(d: Deployment) -> dict[str, Any]:
    return {"status": d.status, "step": d.step_index, "weight": d.weight, "version": d.version.version,
            "model": d.model.name}


def deployment_create(actor: Actor, model: RegisteredModel, version_number: int, *, target: str = Target.CPU,
                      steps: list[int] | None = None, step_interval_s: int | None = None,
                      bake_s: int | None = None, max_p99_ms: float | None = None,
                      max_error_rate: float | None = None, min_requests: int | None = None,
                      require_approval: bool = False, mode: str = RolloutMode.CANARY,
                      shadow_share: int | None = None, why: str = "", hil_override: str = "") -> Deployment:
    """Start rolling a version out. Refused (409) while the model has another active rollout, when the
    version is not ready, has no kept engine for the target, or already is the stable version. In shadow
    mode the candidate takes no client traffic (one step at weight 0) while the gateway mirrors
    `shadow_share` percent of stable's requests to it. A restore (deployer/champions.py, `why` says why) takes
    all traffic as soon as it is loaded, without analysis: a champion rollback to a version that served before.
    The engine needs a passing HIL run on the fleet's hardware profile (PLATFORM_HIL_GATE), unless
    `hil_override` gives the reason to deploy without one (the caller checks who may); a restore needs none."""
    if target not in Target.values:
        raise DeployError(f"target must be one of {', '.join(Target.values)}, not {target!r}")
    if mode not in RolloutMode.values:
        raise DeployError(f"mode must be one of {', '.join(RolloutMode.values)}, not {mode!r}")
    if mode == RolloutMode.SHADOW and steps is not None:
        raise DeployError("steps: a shadow rollout takes no client traffic; give shadow_share instead")
    if mode == RolloutMode.RESTORE and steps is not None:
        raise DeployError("steps: a restore takes all traffic at once; it has no canary steps")
    if mode != RolloutMode.SHADOW and shadow_share is not None:
        raise DeployError("shadow_share: only a shadow rollout mirrors requests")
    share = _positive("shadow_share", shadow_share, 50)
    if isinstance(share, float) or share > 100:
        raise DeployError(f"shadow_share is a whole percent 1..100, got {share!r}")
    limits = {
        "steps": [0] if mode == RolloutMode.SHADOW else [100] if mode == RolloutMode.RESTORE else
        _check_steps(list(steps) if steps is not None else list(_setting("ROLLOUT_STEPS"))),
        "mode": mode, "shadow_share": share,
        "step_interval_s": _positive("step_interval_s", step_interval_s, _setting("ROLLOUT_STEP_INTERVAL_S")),
        "bake_s": _positive("bake_s", bake_s, _setting("ROLLOUT_BAKE_S"), allow_zero=True),
        "max_p99_ms": _positive("max_p99_ms", max_p99_ms, _setting("ROLLOUT_MAX_P99_MS")),
        "max_error_rate": _positive("max_error_rate", max_error_rate, _setting("ROLLOUT_MAX_ERROR_RATE"),
                                    allow_zero=True),
        "min_requests": _positive("min_requests", min_requests, _setting("ROLLOUT_MIN_REQUESTS")),
    }
    if limits["max_error_rate"] > 1:
        raise DeployError("max_error_rate is a fraction 0..1 (0.01 = 1%)")
    try:
        with transaction.atomic():
            version = ModelVersion.objects.select_related("model").filter(model=model, version=version_number).first()
            if version is None:
                raise DeployError(f"{model.name} has no version {version_number}", 404)
            if version.status != VersionStatus.READY:
                raise DeployError(f"version {version_number} of {model.name} is {version.status}; only ready "
                                  "versions are deployed", 409)
            engine = engine_for(version, target)
            triton_model = engine.io.get("triton_model_name", "")
            if not triton_model:
                raise DeployError(f"the engine {engine.variant} of version {version_number} has no Triton entry", 409)
            hil_run, hil_why = _hil_evidence(engine, mode, hil_override)
            endpoint, _ = Endpoint.objects.get_or_create(model=model, defaults={"target": target})
            endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
            if endpoint.stable_version_id == version.pk:
                raise DeployError(f"version {version_number} already serves {model.name}", 409)
            active = Deployment.objects.filter(model=model, status__in=ACTIVE_ROLLOUT_STATES).first()
            if active is not None:
                raise DeployError(_busy(active), 409)
            d = Deployment.objects.create(
                model=model, version=version, engine=engine, triton_model=triton_model,
                target=target, previous_version=endpoint.stable_version, require_approval=require_approval,
                requested_by=actor.user_or_none, reason=f"loading v{version_number} onto the fleet",
                hil_run=hil_run, hil_override=hil_override.strip() if hil_why else "",
                analysis={"restore": why} if mode == RolloutMode.RESTORE else {}, **limits)
            audit_record(actor, "deployment.create", "deployment", d.pk, after={
                **_view(d), "mode": mode, "target": target, "engine": engine.variant, "steps": limits["steps"],
                **({"why": why[:500]} if why else {}),
                "hil": {"run": hil_run.pk, "status": hil_run.status} if hil_run and not hil_why else
                {"override": hil_override.strip()[:2000], "without": hil_why[:1000]} if hil_why else None,
                "previous_version": endpoint.stable_version.version if endpoint.stable_version else None})
            transaction.on_commit(enqueue_reconcile)
            return d
    except IntegrityError as exc:  # a concurrent request won the one-active-rollout constraint
        active = Deployment.objects.filter(model=model, status__in=ACTIVE_ROLLOUT_STATES).first()
        raise DeployError(_busy(active) if active else "another rollout of this model just started", 409) from exc


def _hil_evidence(engine: EngineBuild, mode: str, override: str) -> tuple[HilRun | None, str]:
    """(the engine's passing HIL run, "") when it has one; (its newest run, why it may not go) when a written
    override lets it go anyway; a DeployError (409) otherwise. Nothing is asked of a restore, nor with the gate off."""
    if mode == RolloutMode.RESTORE or not _setting("HIL_GATE"):
        return None, ""
    run, why = hil_gate(engine)
    if not why:
        return run, ""
    if not override.strip():
        version = engine.version
        raise HilGateError(
            f"{why}. A deployment needs a passing HIL run of its engine on the fleet's hardware: ask for one with "
            f"POST /api/v1/models/{version.model.name}/versions/{version.version}/hil/, or, as a release manager, "
            "deploy anyway with hil_override giving the reason", 409)
    if len(override.strip()) < 10:
        raise DeployError("hil_override: give the reason in words (at least 10 characters); it is audited")
    return run, why


def _busy(active: Deployment) -> str:
    return (f"deployment {active.pk} of version {active.version.version} is {active.status}; "
            "promote, abort or wait for it first")


def _positive(name: str, value: Any, default: Any, allow_zero: bool = False) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not allow_zero):
        raise DeployError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return value


# ---- the state machine -----------------------------------------------------------------------------------


DEPLOYMENTS: Lifecycle[Deployment] = Lifecycle(
    Deployment, ROLLOUT_TRANSITIONS, action="deployment", target_type="deployment", target_id=lambda d: d.pk,
    describe=lambda d: f"deployment {d.pk}", view=_view, related=("version", "model"),
    stamps={"finished_at": {RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK}},
    # a reconciler pass after commit, so the fleet and the routes follow at once
    after_commit=lambda d: [enqueue_reconcile])


def deployment_transition(deployment_id: int, to: str, actor: Actor = SYSTEM, only_from: set[str] | None = None,
                          **fields: Any) -> Deployment:
    """The one way a deployment changes status (or step): registry/lifecycle.py."""
    note = {"reason": str(fields["reason"])[:500]} if fields.get("reason") else None
    return DEPLOYMENTS.move(deployment_id, to, actor, only_from=only_from, note=note, **fields)


def promote(d: Deployment, actor: Actor, reason: str, only_from: set[str] | None = None) -> Deployment:
    with transaction.atomic():
        endpoint, _ = Endpoint.objects.get_or_create(model=d.model, defaults={"target": d.target})
        endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        before = endpoint.stable_version.version if endpoint.stable_version else None
        done = deployment_transition(d.pk, RolloutStatus.PROMOTED, actor, only_from=only_from, weight=100,
                                     reason=reason, decided_by=actor.user_or_none)
        Endpoint.objects.filter(pk=endpoint.pk).update(
            stable_version=d.version, stable_engine=d.engine, stable_triton_model=d.triton_model, target=d.target,
            updated_at=timezone.now())
        audit_record(actor, "endpoint.stable", "endpoint", d.model.name, before={"stable_version": before},
                     after={"stable_version": d.version.version, "deployment": d.pk})
        governance.model_mark_deployed(d.model)  # from its first champion on, the model's aliases are protected
    canary.SnapshotStore(redis_client(), d.pk).clear()
    return done


def roll_back(d: Deployment, actor: Actor, reason: str, only_from: set[str] | None = None) -> Deployment:
    done = deployment_transition(d.pk, RolloutStatus.ROLLED_BACK, actor, only_from=only_from, weight=0,
                                 reason=reason, decided_by=actor.user_or_none)
    canary.SnapshotStore(redis_client(), d.pk).clear()
    return done


# ---- what people do (API and UI) --------------------------------------------------------------------------


def deployment_pause(actor: Actor, d: Deployment) -> Deployment:
    return deployment_transition(d.pk, RolloutStatus.PAUSED, actor, reason=f"paused by {actor.name}")


def deployment_resume(actor: Actor, d: Deployment) -> Deployment:
    to = RolloutStatus.PROGRESSING if d.step_index >= 0 else RolloutStatus.PENDING
    return deployment_transition(d.pk, to, actor, only_from={RolloutStatus.PAUSED}, step_started_at=timezone.now(),
                                 reason=f"resumed by {actor.name}")


def deployment_promote(actor: Actor, d: Deployment) -> Deployment:
    """Promote by hand: only for a model that is not protected; a protected model's champion changes through an
    approved promotion request (deployer/promotions.py)."""
    if governance.is_protected(governance.promotion_policy(d.model)):
        raise DeployError(f"{d.model.name} is protected: its champion changes only through an approved promotion "
                          f"request. Request one (POST /api/v1/deployments/{d.pk}/promotion/) and have it approved "
                          "in the approvals inbox (/approvals/); the rollout waits for it once every step passed", 403)
    if d.step_index < 0:
        raise DeployError("the canary has not taken traffic yet; it can be promoted once it is loaded", 409)
    return promote(d, actor, f"promoted by {actor.name}",
                    only_from={RolloutStatus.PROGRESSING, RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL})


def deployment_abort(actor: Actor, d: Deployment) -> Deployment:
    return roll_back(d, actor, f"aborted by {actor.name}", only_from=set(ACTIVE_ROLLOUT_STATES))


# ---- the reconciler ---------------------------------------------------------------------------------------


def rollouts_reconcile() -> dict[str, Any]:
    """One pass: advance every active rollout, then converge fleet, routes and aliases. Passes never
    overlap: each holds the reconciler's claim, which the database drops the moment a killed worker's
    connection ends, so the next tick after a crash runs at once."""
    with locks.claim("rollouts.reconcile") as mine:
        if not mine:
            return {"skipped": "another pass is running"}
        advanced = 0
        for d in Deployment.objects.filter(status__in=ACTIVE_ROLLOUT_STATES).select_related("model", "version"):
            try:
                rollout_advance(d)
                advanced += 1
            except TransitionError as exc:  # a person acted between our read and our write: theirs stands
                log.info("%s: %s", d, exc)
        return {"advanced": advanced, **fleet_converge()}


def _placement(triton_model: str, engine: EngineBuild, target: str) -> Placement:
    return Placement(triton_model=triton_model, engine_uri=engine.engine_uri, target=target)


def rollout_advance(d: Deployment) -> None:
    now = timezone.now()
    if d.status == RolloutStatus.PENDING:
        try:
            fleet().place(_placement(d.triton_model, d.engine, d.target))
        except FleetNotReady as exc:
            waiting_since = d.step_started_at or d.created_at  # resuming a paused load restarts the clock
            if now - waiting_since > timedelta(seconds=_setting("ROLLOUT_LOAD_TIMEOUT_S")):
                roll_back(d, SYSTEM, f"the canary did not become ready within "
                                      f"{_setting('ROLLOUT_LOAD_TIMEOUT_S')}s: {exc}")
            else:
                Deployment.objects.filter(pk=d.pk).update(reason=f"loading: {exc}")
            return
        except FleetError as exc:
            roll_back(d, SYSTEM, f"the fleet cannot serve the canary: {exc}")
            return
        endpoint = Endpoint.objects.get(model=d.model)
        if d.mode == RolloutMode.RESTORE:
            promote(d, SYSTEM, f"champion rollback: v{d.version.version} restored in place of "
                                f"v{d.previous_version.version if d.previous_version else '?'}: "
                                f"{d.analysis.get('restore', '')}", only_from={RolloutStatus.PENDING})
        elif endpoint.stable_version_id is None:
            promote(d, SYSTEM, "first deployment of the model: no stable version to compare with",
                     only_from={RolloutStatus.PENDING})
        else:
            deployment_transition(d.pk, RolloutStatus.PROGRESSING, only_from={RolloutStatus.PENDING}, step_index=0,
                                  weight=d.steps[0], step_started_at=now, reason="")
        return
    if d.status not in SERVING_ROLLOUT_STATES:
        return
    last = d.step_index >= len(d.steps) - 1
    hold = d.step_interval_s + (d.bake_s if last else 0)
    verdict = analyse(d, now.timestamp())
    if verdict.outcome == "inconclusive" and d.status == RolloutStatus.PROGRESSING and d.step_started_at is not None \
            and (now - d.step_started_at).total_seconds() >= hold:
        # The step's time is up without the evidence live traffic should have brought: recorded stable requests
        # are replayed against the canary, so the decision comes now, without sending it more users.
        verdict = _with_replay(d, verdict)
    f = verdict.figures
    Deployment.objects.filter(pk=d.pk).update(analysis={"outcome": verdict.outcome, "reason": verdict.reason,
                                                        **f, "at": now.isoformat()})
    if verdict.outcome != "wait":  # settling, or the step's first look: no window to chart yet
        AnalysisPoint.objects.create(
            deployment=d, at=now, weight=d.weight, outcome=verdict.outcome, canary_requests=f["canary_requests"],
            canary_error_rate=f["canary_error_rate"], canary_p99_ms=f["canary_p99_ms"],
            stable_requests=f.get("stable_requests", 0), stable_error_rate=f.get("stable_error_rate", 0.0),
            stable_p99_ms=f.get("stable_p99_ms"))
    if verdict.outcome == "fail":
        roll_back(d, SYSTEM, f"automatic rollback: {verdict.reason}", only_from=set(SERVING_ROLLOUT_STATES))
        return
    if d.status != RolloutStatus.PROGRESSING or d.step_started_at is None:
        return
    held = (now - d.step_started_at).total_seconds()
    if verdict.outcome == "inconclusive" and held >= hold:
        # Too little evidence to pass the step, none to fail it: the step is extended, up to a limit.
        extend = float(_setting("ROLLOUT_EXTEND_MAX_S"))
        if held >= hold + extend:
            deployment_transition(d.pk, RolloutStatus.PAUSED, only_from={RolloutStatus.PROGRESSING},
                                  reason=f"paused: step {d.step_index + 1} had too little evidence to be judged after "
                                         f"{held:.0f}s, extended {extend:g}s (PLATFORM_ROLLOUT_EXTEND_MAX_S): "
                                         f"{verdict.reason}. Resume to keep collecting, or promote or abort.")
        else:
            Deployment.objects.filter(pk=d.pk).update(
                reason=f"step {d.step_index + 1} extended (up to {extend:g}s more): {verdict.reason}")
        return
    if verdict.outcome != "pass" or held < hold:
        return
    verdict = _with_traffic_inputs(d, verdict)
    if verdict.outcome == "fail":
        roll_back(d, SYSTEM, f"automatic rollback at step {d.step_index + 1}: {verdict.reason}",
                   only_from={RolloutStatus.PROGRESSING})
        return
    if not last:
        deployment_transition(d.pk, RolloutStatus.PROGRESSING, only_from={RolloutStatus.PROGRESSING},
                              step_index=d.step_index + 1, weight=d.steps[d.step_index + 1], step_started_at=now,
                              reason=f"step {d.step_index + 1} passed: {verdict.reason}")
    elif d.require_approval or governance.is_protected(governance.promotion_policy(d.model)):
        policy = governance.promotion_policy(d.model)
        deployment_transition(d.pk, RolloutStatus.AWAITING_APPROVAL, only_from={RolloutStatus.PROGRESSING},
                              reason=f"all steps passed ({verdict.reason}); waiting for its promotion request's "
                                     f"approval ({policy.approvals_required} needed)")
    else:
        promote(d, SYSTEM, f"all steps passed: {verdict.reason}", only_from={RolloutStatus.PROGRESSING})


def _with_traffic_inputs(d: Deployment, live: canary.Verdict) -> canary.Verdict:
    """A step that passed on latency and errors is judged on its captured traffic too before it ends: the
    canary's answers against stable's, and its inputs against its reference set (monitoring/services.py
    canary_inputs). A shadow rollout's answers are compared request by request already."""
    if d.mode != RolloutMode.CANARY or d.previous_version is None:
        return live
    inputs = monitoring_services.canary_inputs(d.version, d.previous_version, d.created_at)
    Deployment.objects.filter(pk=d.pk).update(analysis={
        "outcome": live.outcome, "reason": live.reason, **live.figures, "at": timezone.now().isoformat(),
        "traffic": inputs.figures, "traffic_reason": inputs.reason})
    return canary.Verdict("fail" if inputs.failed else live.outcome, inputs.reason if inputs.failed else
                          f"{live.reason}; {inputs.reason}", {**live.figures, "traffic": inputs.figures})


GATEWAY_STALE_S = 10.0


def live_gateways(redis: Any, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The gateways that announced themselves in the last GATEWAY_STALE_S, by instance."""
    now = time.time() if now is None else now
    found = {}
    for key, raw in redis.hgetall(GATEWAYS_KEY).items():
        info = json.loads(raw)
        if now - float(info.get("seen", 0)) <= GATEWAY_STALE_S:
            found[key.decode() if isinstance(key, bytes) else key] = info
    return found


def analyse(d: Deployment, now: float) -> canary.Verdict:
    """The step's verdict from the window since its settle point (ROLLOUT_SETTLE_S after the weight
    changed), canary against stable over the same seconds."""
    redis = redis_client()
    window_s = float(_setting("ROLLOUT_WINDOW_S"))
    settle_s = float(_setting("ROLLOUT_SETTLE_S"))
    settled_at = (d.step_started_at.timestamp() if d.step_started_at else now) + settle_s
    if now < settled_at:
        return canary.waiting(f"settling for {settle_s:g}s after the weight change to {d.weight}% "
                              "(PLATFORM_ROLLOUT_SETTLE_S)")
    if d.mode == RolloutMode.SHADOW:
        return _shadow_verdict(d, redis, max(settled_at, now - window_s), now)
    gateways = [g["metrics"] for g in live_gateways(redis).values() if g.get("metrics")]
    snap = canary.scrape(d.model.name, {d.triton_model}, gateways, fleet().metrics_urls())
    # Triton counts replayed requests too: the deployer's own count of them is kept beside Triton's, and
    # taken off it, so replayed requests are never judged as served ones.
    replayed, replayed_errors = shadow.replayed_so_far(redis, d.triton_model)
    snap.sources["replay"] = {f"replay:{d.triton_model}": asdict(canary.Figures(replayed, replayed_errors))}
    base = canary.SnapshotStore(redis, d.pk).push_and_base(snap, window_s, not_before=settled_at)
    if base is None:
        return canary.waiting("collecting: the step's window starts now")
    stable = d.previous_version.version if d.previous_version else None
    win = canary.window(snap, base)
    replay_win = win.pop(f"replay:{d.triton_model}", None)
    served = win.get(f"triton:{d.triton_model}")
    if replay_win is not None and served is not None:
        served.requests = max(0.0, served.requests - replay_win.requests)
        served.errors = max(0.0, served.errors - replay_win.errors)
    return canary.judge(win, str(d.version.version), d.triton_model,
                        None if stable is None else str(stable),
                        canary.Thresholds(d.max_p99_ms, d.max_error_rate, d.min_requests), snap.t - base.t)


def _shadow_verdict(d: Deployment, redis: Any, since: float, now: float) -> canary.Verdict:
    """A shadow rollout's window: the requests the gateways mirrored to the candidate since `since`, each
    with stable's answer and the candidate's, judged pair by pair."""
    pairs = shadow.mirrored_pairs(redis, d.model.name, str(d.version.version), limit=5000, max_age_s=now - since)
    limits = shadow_analysis.ShadowThresholds(d.min_requests,
                                              latency_floor_ms=shadow_analysis.MIRRORED_LATENCY_FLOOR_MS)
    return shadow_analysis.judge_pairs(pairs, limits, "mirrored")


REPLAY_CLAIM_KEY = "deployer:replay:{deployment}"


def _with_replay(d: Deployment, live: canary.Verdict) -> canary.Verdict:
    """The verdict on recorded stable requests replayed against the canary (at most once a window per
    deployment); `live` when there is nothing to replay or replay is off."""
    rate = float(_setting("ROLLOUT_REPLAY_RATE"))
    redis = redis_client()
    window_s = float(_setting("ROLLOUT_WINDOW_S"))
    if rate <= 0 or not redis.set(REPLAY_CLAIM_KEY.format(deployment=d.pk), 1, nx=True, ex=max(1, int(window_s))):
        return live
    _, table = load_routes(redis)
    route = table.get(d.model.name) if table else None
    if route is None or route.canary is None or route.canary.triton_model != d.triton_model:
        return live
    budget_s = float(_setting("ROLLOUT_REPLAY_BUDGET_S"))
    # Enough to pass with margin (a failed or unparsable answer is not compared), within the budget.
    want = max(1, min(int(rate * budget_s), d.min_requests + max(5, d.min_requests // 2)))
    found = shadow.recorded_requests(redis, d.model.name, route.stable.version, want,
                                     float(_setting("ROLLOUT_REPLAY_MAX_AGE_S")))
    if not found:
        return canary.Verdict(live.outcome, f"{live.reason}; no recorded stable request to replay (the gateway "
                                            "samples --sample-rate of its requests)", {**live.figures, "replayed": 0})
    stable_arm = shadow.ReplayArm(route.stable.triton_model, list(route.stable.nodes))
    canary_arm = shadow.ReplayArm(route.canary.triton_model, list(route.canary.nodes))
    pairs = shadow.replay(found, stable_arm, canary_arm, rate_per_s=rate, budget_s=budget_s)
    shadow.count_replayed(redis, pairs, stable_arm, canary_arm)
    judged = shadow_analysis.judge_pairs(pairs, shadow_analysis.ShadowThresholds(d.min_requests), "replayed")
    live_requests = live.figures.get("canary_requests", 0)
    return canary.Verdict(judged.outcome, f"{len(pairs)} recorded stable requests replayed against the canary, "
                                          f"{live_requests} served by it in the window: {judged.reason}",
                          {**live.figures, "replayed": len(pairs), "replay": judged.figures})


def fleet_converge() -> dict[str, Any]:
    """Place what should serve, publish the routes, move `champion`, and unload what nothing routes to."""
    redis = redis_client()
    backend = fleet()
    desired: dict[str, Placement] = {}
    nodes: dict[str, list[str]] = {}

    def place(p: Placement) -> list[str]:
        desired[p.triton_model] = p
        if p.triton_model not in nodes:
            try:
                nodes[p.triton_model] = backend.place(p)
            except (FleetNotReady, FleetError) as exc:
                log.warning("placing %s: %s", p.triton_model, exc)
                nodes[p.triton_model] = []
        return nodes[p.triton_model]

    active = {d.model_id: d for d in Deployment.objects.filter(status__in=ACTIVE_ROLLOUT_STATES)
              .select_related("engine", "version")}
    routes_version, current = load_routes(redis)
    table: dict[str, Any] = {}
    endpoints = list(Endpoint.objects.filter(stable_version__isnull=False).select_related(
        "model", "stable_version", "stable_engine"))
    policies = policies_for([ep.model_id for ep in endpoints])
    for ep in endpoints:
        name = ep.model.name
        stable_nodes = place(_placement(ep.stable_triton_model, ep.stable_engine, ep.target))  # type: ignore[arg-type]
        entry: dict[str, Any]
        if stable_nodes:
            entry = {"stable": {"version": str(ep.stable_version.version),  # type: ignore[union-attr]
                                "triton_model": ep.stable_triton_model, "nodes": stable_nodes}, "canary": None}
        elif current is not None and name in current and current[name].stable.triton_model == ep.stable_triton_model:
            # No node answers ready right now (restarting): keep the last known nodes; the gateway retries.
            old = current[name].stable
            entry = {"stable": {"version": old.version, "triton_model": old.triton_model, "nodes": list(old.nodes)},
                     "canary": None}
        else:
            continue
        d = active.get(ep.model_id)
        if d is not None:
            canary_nodes = place(_placement(d.triton_model, d.engine, d.target))
            if d.mode == RolloutMode.SHADOW and d.status in SERVING_ROLLOUT_STATES and canary_nodes:
                entry["shadow"] = {"version": str(d.version.version), "triton_model": d.triton_model,
                                   "nodes": canary_nodes, "share": d.shadow_share}
            elif d.status in SERVING_ROLLOUT_STATES and d.weight > 0 and canary_nodes:
                entry["canary"] = {"version": str(d.version.version), "triton_model": d.triton_model,
                                   "nodes": canary_nodes, "weight": d.weight}
        policy = policies[ep.model_id]  # the traffic monitoring captures (monitoring/)
        entry["capture"] = {"fraction": policy.capture_fraction, "floor_per_s": policy.capture_floor_per_s}
        table[name] = entry
    for d in active.values():  # a first deployment: loaded before its endpoint has a stable version
        if d.status == RolloutStatus.PENDING:
            place(_placement(d.triton_model, d.engine, d.target))
    published = None
    if table and (current is None or table != table_to_dict(current)):
        published = routes_version = publish_routes(redis, table)
    _move_champions(endpoints)
    removed = _retire(backend, desired, routes_version)
    return {"placed": sorted(desired), "published": published, "removed": removed}


def _move_champions(endpoints: list[Endpoint]) -> None:
    """Each model's production aliases (`champion` and those its promotion policy lists) to its stable version."""
    listed = governance.listed_aliases([ep.model_id for ep in endpoints])
    for ep in endpoints:
        number = ep.stable_version.version  # type: ignore[union-attr]
        try:
            held = mlflow_store.aliases(ep.model.name)  # one call for all of them
            for alias in [CHAMPION, *listed.get(ep.model_id, [])]:
                was = held.get(alias)
                if was != number:
                    mlflow_store.alias_set(ep.model.name, alias, number)
                    governance.alias_recorded(SYSTEM, ep.model.name, alias, was, number)
        except Exception as exc:  # noqa: BLE001 - MLflow's store errors vary; the next pass tries again
            log.warning("moving the production aliases of %s to v%s: %s", ep.model.name, number, exc)


def _retire(backend: Fleet, desired: dict[str, Placement], routes_version: int) -> list[str]:
    """Unload models nothing routes to, once every live gateway has applied a table without them (the
    table in use is `routes_version`) and ROLLOUT_DRAIN_S has passed (requests already sent finish first)."""
    redis = redis_client()
    now = time.time()
    gateways = live_gateways(redis)
    applied = min((int(g.get("routes_version", 0)) for g in gateways.values()), default=routes_version)
    retiring = {k.decode(): json.loads(v) for k, v in redis.hgetall(RETIRING_KEY).items()}
    removed = []
    for name in set(retiring) & set(desired):
        redis.hdel(RETIRING_KEY, name)  # deployed again
    for name in sorted(set(backend.placed()) - set(desired)):
        mark = retiring.get(name)
        if mark is None:
            redis.hset(RETIRING_KEY, name, json.dumps({"since": now, "routes_version": routes_version}))
            continue
        if now - mark["since"] >= _setting("ROLLOUT_DRAIN_S") and applied >= mark["routes_version"]:
            backend.remove(name)
            redis.hdel(RETIRING_KEY, name)
            removed.append(name)
    return removed
