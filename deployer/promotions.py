"""Promotion requests: a version becomes a protected model's champion only when enough eligible people have
approved it with the evidence in front of them (issue 15).

- A request belongs to a rollout. A rollout of a protected model (registry/governance.py), or one started with
  `require_approval`, stops at `awaiting_approval` once every canary step passed; the reconciler then files a
  request on behalf of whoever started the rollout (`promotions_reconcile`). Anyone who may ship a version (CI
  included) may also file one earlier, with a reason.
- The evidence is gathered from the platform's own records when the request is filed and again at each
  decision, for the candidate and for the champion side by side: lineage and who registered it, the engine's
  parity, HIL against the champion, the canary's analysis, drift and prediction agreement, open alerts.
- Approvals count only from people the model's promotion policy allows: never a CI account or service
  account, by default only release managers, never the version's author nor the requester (four eyes). When
  the policy's number is reached the rollout is promoted in the same transaction. One rejection (with a
  comment) rejects the request and rolls the canary back.
- An administrator may break glass: approve at once with a written reason, audited and announced.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from deployer import services
from deployer.models import (
    ACTIVE_ROLLOUT_STATES,
    PROMOTION_TRANSITIONS,
    SERVING_ROLLOUT_STATES,
    Deployment,
    Endpoint,
    PromotionRequest,
    PromotionReview,
    PromotionStatus,
    ReviewDecision,
    RolloutMode,
    RolloutStatus,
)
from monitoring.models import Alert, AlertStatus, DriftCheck
from pipelines.models import BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import serving_profile
from registry import governance, locks
from registry.audit import SYSTEM, Actor, audit_record
from registry.lifecycle import Lifecycle
from registry.models import ModelVersion, PromotionPolicy
from registry.roles import Cap, Role, roles_allow

log = logging.getLogger("deployer.promotions")

MIN_BREAK_GLASS_CHARS = 20  # a reason someone can act on later, not "x"


class PromotionError(services.DeployError):
    pass


def _view(r: PromotionRequest) -> dict[str, Any]:
    return {"status": r.status, "model": r.model.name, "version": r.version.version, "deployment": r.deployment_id}


PROMOTIONS: Lifecycle[PromotionRequest] = Lifecycle(
    PromotionRequest, PROMOTION_TRANSITIONS, action="promotion", target_type="promotion", target_id=lambda r: r.pk,
    describe=lambda r: f"promotion request {r.pk}", view=_view, related=("model", "version"),
    stamps={"decided_at": {PromotionStatus.APPROVED, PromotionStatus.REJECTED, PromotionStatus.CANCELLED}})


# ---- evidence ------------------------------------------------------------------------------------------------


def _section(name: str, outcome: str, words: str, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """One part of the evidence: outcome is ok, warn, fail or none (nothing to show)."""
    return {"name": name, "outcome": outcome, "words": words, "figures": figures or {}}


def _lineage(version: ModelVersion) -> dict[str, Any]:
    author = version.created_by.get_username() if version.created_by else "unknown (registered by the system)"
    run = f", run {version.run_id}" if version.run_id else ""
    return _section("lineage", "ok" if version.status == "ready" else "warn",
                    f"v{version.version} registered by {author} on {version.created_at:%Y-%m-%d %H:%M} UTC from "
                    f"{version.source} ({version.get_origin_display()}{run}); {version.status}",
                    {"registered_by": author, "source": version.source, "origin": version.origin,
                     "run_id": version.run_id, "status": version.status,
                     "registered_at": version.created_at.isoformat()})


def _engine(version: ModelVersion, deployment: Deployment | None) -> EngineBuild | None:
    if deployment is not None and deployment.version_id == version.pk:
        return deployment.engine
    endpoint = Endpoint.objects.filter(stable_version=version).select_related("stable_engine").first()
    if endpoint is not None and endpoint.stable_engine is not None:
        return endpoint.stable_engine
    return EngineBuild.objects.filter(version=version, status=BuildStatus.SUCCEEDED).order_by("pk").first()


def _parity(engine: EngineBuild | None) -> dict[str, Any]:
    if engine is None:
        return _section("parity", "none", "no kept engine")
    parity = engine.parity or {}
    figures = parity.get("figures", {})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if isinstance(v, int | float))
    passed = parity.get("passed")
    if passed is None:
        return _section("parity", "none", f"engine {engine.variant}: no parity check recorded",
                        {"engine": engine.variant})
    return _section("parity", "ok" if passed else "fail",
                    f"engine {engine.variant}: parity {'passed' if passed else 'not passed'} against the original "
                    f"model ({shown or 'no figures'})" + (f"; {'; '.join(parity['failures'])}"
                                                          if parity.get("failures") else ""),
                    {"engine": engine.variant, **figures, "thresholds": parity.get("thresholds", {})})


def _hil(engine: EngineBuild | None, deployment: Deployment | None) -> dict[str, Any]:
    if engine is None:
        return _section("hil", "none", "no engine, no HIL run")
    run = deployment.hil_run if deployment is not None and deployment.engine_id == engine.pk else None
    if run is None:
        run = (HilRun.objects.filter(build=engine, profile=serving_profile(engine.target))
               .exclude(finished_at=None).order_by("-finished_at", "-pk").first())
    override = deployment.hil_override if deployment is not None and deployment.engine_id == engine.pk else ""
    if run is None:
        words = "no finished HIL run on the fleet's hardware"
        return _section("hil", "warn", words + (f"; deployed with an override: {override}" if override else ""),
                        {"override": override})
    outcome = {HilStatus.PASSED: "ok", HilStatus.FAILED: "fail"}.get(run.status, "warn")  # type: ignore[call-overload]
    return _section("hil", outcome, f"HIL run {run.pk} on {run.profile}: {run.verdict}"
                    + (f" (deployed with an override: {override})" if override else ""),
                    {"run": run.pk, "status": run.status, "profile": run.profile, "override": override})


def _canary(deployment: Deployment | None) -> dict[str, Any]:
    if deployment is None:
        return _section("canary", "none", "no rollout")
    analysis = deployment.analysis or {}
    points = list(deployment.points.values_list("outcome", flat=True))
    counts = {o: points.count(o) for o in ("pass", "fail", "inconclusive")}
    keep = {k: analysis[k] for k in ("canary_requests", "canary_p99_ms", "canary_error_rate", "stable_requests",
                                     "stable_p99_ms", "stable_error_rate") if k in analysis}
    outcome = {"pass": "ok", "fail": "fail"}.get(str(analysis.get("outcome")), "warn")
    steps = f"step {deployment.step_index + 1} of {len(deployment.steps)} at {deployment.weight}%"
    return _section("canary", outcome,
                    f"deployment {deployment.pk} ({deployment.get_mode_display()}), {deployment.status}, {steps}: "
                    f"{analysis.get('reason') or 'no analysis yet'}; windows: {counts['pass']} passed, "
                    f"{counts['inconclusive']} inconclusive, {counts['fail']} failed",
                    {"deployment": deployment.pk, "status": deployment.status, "weight": deployment.weight,
                     "windows": counts, **keep})


def _traffic(version: ModelVersion, deployment: Deployment | None) -> dict[str, Any]:
    """Drift of the version's inputs and its answers' agreement with the champion's."""
    parts, figures, outcome = [], {}, "none"
    analysis = deployment.analysis if deployment is not None else {}
    if analysis.get("traffic_reason"):
        parts.append(str(analysis["traffic_reason"]))
        figures["canary_traffic"] = analysis.get("traffic", {})
        outcome = "ok"
    if deployment is not None and deployment.mode == RolloutMode.SHADOW and analysis.get("reason"):
        parts.append(f"shadow answers against stable's: {analysis['reason']}")
        outcome = "ok"
    check = DriftCheck.objects.filter(version=version).order_by("-created_at").first()
    if check is not None:
        parts.append(f"latest drift check ({check.created_at:%Y-%m-%d %H:%M} UTC, {check.outcome}): {check.summary}")
        figures["drift"] = {"outcome": check.outcome, "dataset_drift": check.dataset_drift,
                            "prediction_drift": check.prediction_drift, "drifted_share": check.drifted_share,
                            "rows": check.current_rows}
        outcome = "fail" if check.dataset_drift or check.prediction_drift else (outcome if outcome != "none"
                                                                                else "ok")
    return _section("traffic", outcome, "; ".join(parts) or "no drift check or traffic comparison yet", figures)


def _alerts(version: ModelVersion) -> dict[str, Any]:
    open_ = list(Alert.objects.filter(version=version, status__in=[AlertStatus.FIRING, AlertStatus.ACKNOWLEDGED])
                 .order_by("-last_seen_at")[:20])
    if not open_:
        return _section("alerts", "ok", f"no open alert on v{version.version}", {"open": 0})
    return _section("alerts", "fail" if any(a.status == AlertStatus.FIRING for a in open_) else "warn",
                    "; ".join(f"alert {a.pk} {a.status}: {a.title}" for a in open_),
                    {"open": len(open_), "alerts": [a.pk for a in open_]})


def evidence_for(version: ModelVersion, deployment: Deployment | None) -> dict[str, Any]:
    """Everything the platform knows about the version, read from its records now."""
    engine = _engine(version, deployment)
    return {"version": version.version, "gathered_at": timezone.now().isoformat(),
            "sections": [_lineage(version), _parity(engine), _hil(engine, deployment), _canary(deployment),
                         _traffic(version, deployment), _alerts(version)]}


def _refresh(req: PromotionRequest) -> None:
    """Gather the candidate's and the champion's evidence again (what a decision is made on)."""
    champion = Endpoint.objects.filter(model=req.model).select_related("stable_version").first()
    req.evidence = evidence_for(req.version, req.deployment)
    req.champion_evidence = (evidence_for(champion.stable_version, None)
                             if champion is not None and champion.stable_version is not None else {})
    req.evidence_at = timezone.now()
    PromotionRequest.objects.filter(pk=req.pk).update(evidence=req.evidence, champion_evidence=req.champion_evidence,
                                                      evidence_at=req.evidence_at)


# ---- who may decide -----------------------------------------------------------------------------------------


def approvals(req: PromotionRequest) -> list[PromotionReview]:
    return [r for r in req.reviews.all() if r.decision == ReviewDecision.APPROVE]


def reviewer_problem(user: Any, roles: set[str], req: PromotionRequest, policy: PromotionPolicy) -> str:
    """Why this person may not approve or reject the request, or "" when they may."""
    if user is None or not user.is_authenticated:
        return "only a person can approve a promotion"
    profile = getattr(user, "profile", None)
    # The account's own roles, not only the token's: a CI account's token scoped to release manager is CI's.
    if Role.CI in roles or (profile is not None and (profile.is_service_account or Role.CI in profile.roles)):
        return "CI and service accounts may request promotions but never approve or reject them"
    if not roles_allow(roles, Cap.DEPLOY_PROMOTE):
        return f"approving needs {Cap.DEPLOY_PROMOTE} (release managers)"
    if policy.release_manager_required and Role.RELEASE_MANAGER not in roles:
        return (f"{req.model.name}'s promotion policy counts approvals from release managers only (an administrator "
                "may break glass, with a written reason)")
    if not policy.author_may_approve and req.version.created_by_id == user.pk:
        return f"you registered v{req.version.version}: its promotion needs another person's approval (four eyes)"
    if not policy.requester_may_approve and req.requested_by_id == user.pk:
        return "you requested this promotion: it needs another person's approval (four eyes)"
    if not policy.requester_may_approve and req.deployment.requested_by_id == user.pk:
        return "you started this rollout: its promotion needs another person's approval (four eyes)"
    if any(r.reviewer_id == user.pk for r in req.reviews.all()):
        return "you have already reviewed this request"
    return ""


def withdraw_problem(user: Any, roles: set[str], req: PromotionRequest) -> str:
    """Why this person may not withdraw the request, or "" when they may (its requester, or a release manager)."""
    mine = req.requested_by_id is not None and req.requested_by_id == getattr(user, "pk", None)
    if not (mine and roles_allow(roles, Cap.PROMOTION_REQUEST)) and not roles_allow(roles, Cap.DEPLOY_PROMOTE):
        return "only its requester or a release manager can withdraw a promotion request"
    return ""


def _locked(req_id: int) -> PromotionRequest:
    return (PromotionRequest.objects.select_for_update(of=("self",))
            .select_related("model", "version", "deployment__model", "deployment__version", "deployment__engine")
            .get(pk=req_id))


def state_problem(req: PromotionRequest) -> str:
    """Why nobody can approve the request now, or "": it is decided while pending and while its rollout waits for
    approval (its canary analysis, part of the evidence, done)."""
    if req.status != PromotionStatus.PENDING:
        return f"it is {req.get_status_display().lower()}"
    d = req.deployment
    if d.status not in ACTIVE_ROLLOUT_STATES:
        return f"its deployment has ended ({d.get_status_display().lower()})"
    if d.status != RolloutStatus.AWAITING_APPROVAL:
        return (f"its canary is still {d.get_status_display().lower()}: it can be approved once every step has "
                "passed and the rollout waits for approval")
    return ""


def rejecter_problem(user: Any, roles: set[str], req: PromotionRequest) -> str:
    """Why this person may not reject the request, or "": rejecting needs no four eyes (stopping one's own
    version is always allowed), so the person is checked against a policy that lets anyone eligible decide."""
    return reviewer_problem(user, roles, req, PromotionPolicy(model=req.model, author_may_approve=True,
                                                              requester_may_approve=True,
                                                              release_manager_required=False))


def _decidable(req: PromotionRequest) -> None:
    problem = state_problem(req)
    if problem:
        raise PromotionError(f"promotion request {req.pk} cannot be decided now: {problem}", 409)


# ---- what people do -----------------------------------------------------------------------------------------


def promotion_request(actor: Actor, d: Deployment, reason: str = "", *, on_behalf_of: Any = None) -> PromotionRequest:
    """File a request that the rollout's version become the champion (409 when one is pending already);
    `on_behalf_of`: the person it is filed for (the reconciler files for whoever started the rollout)."""
    if d.mode == RolloutMode.RESTORE:
        raise PromotionError("a champion rollback needs no promotion request", 409)
    with transaction.atomic():
        status = Deployment.objects.select_for_update().values_list("status", flat=True).get(pk=d.pk)  # one at a time
        if status not in ACTIVE_ROLLOUT_STATES:
            raise PromotionError(f"deployment {d.pk} has ended ({status}); start a new rollout to promote "
                                 f"v{d.version.version}", 409)
        pending = PromotionRequest.objects.filter(deployment=d, status=PromotionStatus.PENDING).first()
        if pending is not None:
            raise PromotionError(f"promotion request {pending.pk} for deployment {d.pk} is pending already", 409)
        requester = Actor(on_behalf_of, actor.via) if on_behalf_of is not None else actor
        req = PromotionRequest.objects.create(model=d.model, version=d.version, deployment=d,
                                              requested_by=requester.user_or_none, requested_by_name=requester.name,
                                              reason=reason.strip()[:2000])
        _refresh(req)
        audit_record(actor, "promotion.requested", "promotion", req.pk, after={
            **_view(req), "requested_by": requester.name, "reason": req.reason[:500],
            "approvals_required": governance.promotion_policy(d.model).approvals_required})
    return req


def promotion_approve(actor: Actor, roles: set[str], req_id: int, comment: str) -> PromotionRequest:
    """One approval; with the policy's number reached, the request is approved and the rollout promoted."""
    with transaction.atomic():
        req = _locked(req_id)
        _decidable(req)
        policy = governance.promotion_policy(req.model)
        problem = reviewer_problem(actor.user, roles, req, policy)
        if problem:
            raise PromotionError(problem, 403)
        _refresh(req)
        PromotionReview.objects.create(request=req, reviewer=actor.user_or_none, reviewer_name=actor.name,
                                       roles=sorted(roles), decision=ReviewDecision.APPROVE, comment=comment.strip())
        given = approvals(req)
        audit_record(actor, "promotion.approval", "promotion", req.pk, after={
            **_view(req), "comment": comment.strip()[:500], "approvals": len(given),
            "approvals_required": policy.approvals_required})
        if len(given) < policy.approvals_required:
            return req
        names = ", ".join(r.reviewer_name for r in given)
        done = PROMOTIONS.move(req.pk, PromotionStatus.APPROVED, actor, only_from={PromotionStatus.PENDING},
                               note={"approvers": [r.reviewer_name for r in given]},
                               outcome=f"approved by {names} ({len(given)} of {policy.approvals_required})")
        services.promote(req.deployment, actor, f"promotion request {req.pk} approved by {names}",
                         only_from={RolloutStatus.AWAITING_APPROVAL})
    return done


def promotion_reject(actor: Actor, roles: set[str], req_id: int, comment: str) -> PromotionRequest:
    """Reject the request (a comment is required) and roll the canary back."""
    if not comment.strip():
        raise PromotionError("say why the promotion is rejected (comment)")
    with transaction.atomic():
        req = _locked(req_id)
        if req.status != PromotionStatus.PENDING:
            raise PromotionError(f"promotion request {req.pk} is {req.status}", 409)
        problem = rejecter_problem(actor.user, roles, req)
        if problem:
            raise PromotionError(problem, 403)
        PromotionReview.objects.create(request=req, reviewer=actor.user_or_none, reviewer_name=actor.name,
                                       roles=sorted(roles), decision=ReviewDecision.REJECT, comment=comment.strip())
        done = PROMOTIONS.move(req.pk, PromotionStatus.REJECTED, actor, only_from={PromotionStatus.PENDING},
                               note={"comment": comment.strip()[:500]},
                               outcome=f"rejected by {actor.name}: {comment.strip()}")
        if req.deployment.status in ACTIVE_ROLLOUT_STATES:
            services.roll_back(req.deployment, actor, f"promotion request {req.pk} rejected by {actor.name}: "
                                                      f"{comment.strip()}", only_from=set(ACTIVE_ROLLOUT_STATES))
    return done


def promotion_cancel(actor: Actor, roles: set[str], req_id: int, why: str) -> PromotionRequest:
    """Withdraw a pending request: its requester, or a release manager (its rollout goes on, and the reconciler
    files a new request when it waits for approval)."""
    with transaction.atomic():
        req = _locked(req_id)
        problem = withdraw_problem(actor.user, roles, req)
        if problem:
            raise PromotionError(problem, 403)
        return PROMOTIONS.move(req.pk, PromotionStatus.CANCELLED, actor, only_from={PromotionStatus.PENDING},
                               note={"why": why[:500]}, outcome=f"cancelled by {actor.name}: {why}")


def promotion_break_glass(actor: Actor, roles: set[str], d: Deployment, reason: str) -> PromotionRequest:
    """An administrator promotes the rollout now, without the approvals the policy asks for: the reason is
    required, kept on the request and in the audit log, and announced (event `promotion.break_glass`)."""
    if not roles_allow(roles, Cap.BREAK_GLASS):
        raise PromotionError(f"breaking glass needs {Cap.BREAK_GLASS} (administrators)", 403)
    if len(reason.strip()) < MIN_BREAK_GLASS_CHARS:
        raise PromotionError(f"breaking glass needs a written reason of at least {MIN_BREAK_GLASS_CHARS} characters: "
                             "what is broken, and why it cannot wait for the approvals")
    if d.status not in SERVING_ROLLOUT_STATES:
        raise PromotionError(f"deployment {d.pk} is {d.status}: only a canary that takes traffic can be promoted", 409)
    with transaction.atomic():
        pending = PromotionRequest.objects.filter(deployment=d, status=PromotionStatus.PENDING).first()
        req = pending or promotion_request(actor, d, f"break-glass: {reason.strip()}")
        req = _locked(req.pk)
        if req.reviews.filter(reviewer=actor.user_or_none).exists():
            raise PromotionError(f"you have already reviewed promotion request {req.pk}; another administrator can "
                                 "break glass, or approvals can complete it", 409)
        _refresh(req)
        PromotionReview.objects.create(request=req, reviewer=actor.user_or_none, reviewer_name=actor.name,
                                       roles=sorted(roles), decision=ReviewDecision.BREAK_GLASS,
                                       comment=reason.strip())
        audit_record(actor, "promotion.break_glass", "promotion", req.pk, after={
            **_view(req), "reason": reason.strip()[:2000], "skipped_policy": governance.policy_words(
                governance.promotion_policy(req.model))["approvals_required"]})
        done = PROMOTIONS.move(req.pk, PromotionStatus.APPROVED, actor, only_from={PromotionStatus.PENDING},
                               note={"approvers": [actor.name], "break_glass": True}, break_glass=reason.strip(),
                               outcome=f"break-glass by {actor.name}: {reason.strip()}")
        services.promote(d, actor, f"break-glass by {actor.name} (promotion request {req.pk}): {reason.strip()}",
                         only_from=set(SERVING_ROLLOUT_STATES))
    log.warning("break-glass promotion of %s v%s by %s: %s", d.model.name, d.version.version, actor.name, reason)
    return done


# ---- the reconciler ------------------------------------------------------------------------------------------


def promotions_reconcile() -> dict[str, int]:
    """File a request for every rollout waiting for approval without one; cancel the pending requests of
    rollouts that ended; promote a rollout whose request was approved but which still waits (a crash between)."""
    filed = cancelled = promoted = 0
    with locks.claim("deployer.promotions") as mine:
        if not mine:
            return {}
        waiting = Deployment.objects.filter(status=RolloutStatus.AWAITING_APPROVAL).select_related(
            "model", "version", "engine", "requested_by")
        for d in waiting:
            approved = d.promotion_requests.filter(status=PromotionStatus.APPROVED).first()
            if approved is not None:
                services.promote(d, SYSTEM, f"promotion request {approved.pk} was approved",
                                 only_from={RolloutStatus.AWAITING_APPROVAL})
                promoted += 1
            elif not d.promotion_requests.filter(status=PromotionStatus.PENDING).exists():
                try:
                    promotion_request(SYSTEM, d, "every canary step passed; the rollout waits for approval",
                                      on_behalf_of=d.requested_by)
                    filed += 1
                except PromotionError as exc:  # someone filed one, or the rollout ended, meanwhile: theirs stands
                    log.info("%s: no request filed: %s", d, exc)
        ended = PromotionRequest.objects.filter(status=PromotionStatus.PENDING).exclude(
            deployment__status__in=ACTIVE_ROLLOUT_STATES).select_related("deployment")
        for req in ended:
            PROMOTIONS.move(req.pk, PromotionStatus.CANCELLED, only_from={PromotionStatus.PENDING},
                            outcome=f"deployment {req.deployment_id} ended ({req.deployment.status}): "
                                    f"{req.deployment.reason}"[:2000])
            cancelled += 1
    return {"filed": filed, "cancelled": cancelled, "promoted": promoted}
