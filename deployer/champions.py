"""Champion rollback: the version that served before the current champion made stable again, at once.

By hand (the button on an alert page, or POST /api/v1/models/<name>/rollback/), or automatically: monitoring
records alerts (a lower app never calls up), and each deployer pass looks at the firing drift and SLO
alerts of champions whose model's monitoring policy asks for it (`rollback_on_drift`, `rollback_on_slo`,
both off by default). An automatic rollback is one a person would sign:
- only a champion's own alert, while it still fires, and once per alert (its decision is in the alert's
  history, done or not, with the reason);
- never past a version that was itself restored by a rollback: walking further back is a person's call;
- on drift, only if the previous champion would not drift on the same window (its reference set judged
  against the champion's captured traffic): when the traffic itself moved, the older model is no better
  and a rollback would only hide the alert.
"""

from __future__ import annotations

import logging

from django.db import transaction

from deployer.models import ACTIVE_ROLLOUT_STATES, Deployment, Endpoint, RolloutMode, RolloutStatus
from deployer.services import DeployError, deployment_create
from monitoring import services as monitoring_services
from monitoring.models import Alert, AlertKind, AlertStatus
from monitoring.selectors import policies_for
from registry import locks
from registry.audit import SYSTEM, Actor, audit_record
from registry.models import AuditEvent, ModelVersion, RegisteredModel

log = logging.getLogger("deployer.champions")

DECIDED = ("alert.rollback", "alert.rollback_declined")  # the audit actions that record the decision on an alert


def previous_champion(model: RegisteredModel) -> tuple[Endpoint, ModelVersion]:
    """The endpoint and the version its champion replaced; a DeployError (409) saying why there is none."""
    endpoint = Endpoint.objects.select_related("stable_version").filter(model=model).first()
    if endpoint is None or endpoint.stable_version is None:
        raise DeployError(f"{model.name} has no champion serving; there is nothing to roll back", 409)
    promoted = (Deployment.objects.filter(model=model, version=endpoint.stable_version, status=RolloutStatus.PROMOTED)
                .select_related("previous_version").order_by("-finished_at", "-pk").first())
    if promoted is None or promoted.previous_version is None:
        raise DeployError(f"v{endpoint.stable_version.version} of {model.name} is its first champion; there is no "
                          "previous champion to go back to", 409)
    return endpoint, promoted.previous_version


def champion_rollback(actor: Actor, model: RegisteredModel, why: str) -> Deployment:
    """Start restoring the previous champion (a RESTORE deployment: loaded, then stable at once). Refused
    (409) while a rollout of the model is active, or when there is no previous champion or engine."""
    if not why.strip():
        raise DeployError("say why the champion is rolled back (reason)")
    endpoint, previous = previous_champion(model)
    active = Deployment.objects.filter(model=model, status__in=ACTIVE_ROLLOUT_STATES).first()
    if active is not None:
        raise DeployError(f"deployment {active.pk} of v{active.version.version} is {active.status}; abort it "
                          "first (a rollout in progress already decides what serves)", 409)
    return deployment_create(actor, model, previous.version, target=endpoint.target, mode=RolloutMode.RESTORE,
                             why=f"{why.strip()} (by {actor.name})")


def rollback_for_alert(actor: Actor, alert: Alert, why: str) -> Deployment:
    """Roll back the champion an alert is about (refused when it no longer is the champion); the decision is
    recorded in the alert's history."""
    with transaction.atomic():
        endpoint = Endpoint.objects.filter(model=alert.model).first()
        if endpoint is None or endpoint.stable_version_id != alert.version_id:
            raise DeployError(f"v{alert.version.version} of {alert.model.name} is not the champion any more; "
                              "there is nothing to roll back", 409)
        previous = previous_champion(alert.model)[1]
        d = champion_rollback(actor, alert.model, f"alert {alert.pk} ({alert.title}): {why}")
        audit_record(actor, "alert.rollback", "alert", alert.pk, after={
            "deployment": d.pk, "from_version": alert.version.version, "to_version": previous.version,
            "why": why[:500]})
    return d


def rollback_offer(alert: Alert) -> tuple[ModelVersion | None, str]:
    """For the alert's page: the version a rollback would restore, or why there is none."""
    endpoint = Endpoint.objects.filter(model=alert.model).first()
    if endpoint is None or endpoint.stable_version_id != alert.version_id:
        return None, f"v{alert.version.version} is not the champion any more"
    try:
        return previous_champion(alert.model)[1], ""
    except DeployError as exc:
        return None, str(exc)


def _decided(alert: Alert) -> bool:
    return AuditEvent.objects.filter(target_type="alert", target_id=str(alert.pk), action__in=DECIDED).exists()


def _decline(alert: Alert, reason: str) -> None:
    audit_record(SYSTEM, "alert.rollback_declined", "alert", alert.pk, after={"reason": reason[:1000]})
    log.info("alert %s: no automatic rollback: %s", alert.pk, reason)


def _restored(version: ModelVersion) -> bool:
    """Whether the version became champion by a rollback."""
    return Deployment.objects.filter(version=version, status=RolloutStatus.PROMOTED, mode=RolloutMode.RESTORE).exists()


def _decide(alert: Alert) -> bool:
    """Roll the alert's champion back, or record why not; True when a rollback started."""
    model, version = alert.model, alert.version
    if Deployment.objects.filter(model=model, status__in=ACTIVE_ROLLOUT_STATES).exists():
        return False  # a rollout in progress decides what serves; looked at again once it has ended
    try:
        endpoint, previous = previous_champion(model)
    except DeployError as exc:
        _decline(alert, str(exc))
        return False
    if endpoint.stable_version_id != version.pk:
        return False  # no longer the champion: nothing to decide
    if _restored(version):
        _decline(alert, f"v{version.version} is itself a restored champion; rolling back further than one "
                        "champion is a person's call")
        return False
    if alert.kind == AlertKind.DRIFT:
        judged = monitoring_services.window_drift(previous, version)
        if isinstance(judged, monitoring_services.Unjudged):
            _decline(alert, f"the previous champion v{previous.version} could not be judged on the same traffic "
                            f"({judged.reason}), so it is not known to be better")
            return False
        if judged.result.dataset_drift:
            _decline(alert, f"the traffic drifts from the previous champion v{previous.version}'s reference set "
                            f"too ({judged.result.summary()}): the inputs moved, and the older model would be no "
                            "better")
            return False
    try:
        d = rollback_for_alert(SYSTEM, alert, f"automatic rollback (the model's monitoring policy): {alert.summary}")
    except DeployError as exc:
        _decline(alert, str(exc))
        return False
    log.warning("alert %s: champion %s v%s rolled back to v%s (deployment %s)", alert.pk, model.name,
                version.version, previous.version, d.pk)
    return True


def champions_guard() -> int:
    """One pass over the champions' firing drift and SLO alerts; returns the rollbacks started."""
    started = 0
    with locks.claim("deployer.champions") as mine:
        if not mine:
            return 0
        firing = list(Alert.objects.filter(status=AlertStatus.FIRING).select_related("model", "version"))
        policies = policies_for(sorted({a.model_id for a in firing}))
        for alert in firing:
            policy = policies[alert.model_id]
            wanted = policy.rollback_on_drift if alert.kind == AlertKind.DRIFT else policy.rollback_on_slo
            if wanted and not _decided(alert):
                started += _decide(alert)
    return started
