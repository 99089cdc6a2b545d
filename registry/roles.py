"""Roles and what each may do. Every API view and page names the capability it needs; this table is
the one place that says who has it."""

from __future__ import annotations

from django.db import models


class Role(models.TextChoices):
    DATA_SCIENTIST = "data_scientist", "Data scientist"
    RELEASE_MANAGER = "release_manager", "Release manager"
    ONCALL = "oncall", "On-call engineer"
    CI = "ci", "CI service account"
    ADMIN = "admin", "Administrator"


class Cap(models.TextChoices):
    MODEL_READ = "model.read", "See models, versions and lineage"
    MODEL_REGISTER = "model.register", "Register models and versions"
    MODEL_EDIT = "model.edit", "Edit descriptions and tags"
    AUDIT_READ = "audit.read", "Read the audit log"
    USER_MANAGE = "user.manage", "Manage people, roles and their tokens"
    DEPLOY_READ = "deploy.read", "See deployments, their traffic and analysis"
    DEPLOY_CREATE = "deploy.create", "Start a rollout of a version"
    DEPLOY_CONTROL = "deploy.control", "Pause, resume or abort a rollout"
    DEPLOY_PROMOTE = "deploy.promote", "Approve or reject a promotion (promote a canary)"
    PROMOTION_REQUEST = "promotion.request", "Request a version's promotion to champion"
    BREAK_GLASS = "promotion.break_glass", "Promote without the approvals policy asks for, giving the reason"
    POLICY_EDIT = "promotion.policy", "Change a model's promotion policy (protection, approvals)"
    HIL_OVERRIDE = "deploy.hil_override", "Deploy an engine without a passing HIL run, giving the reason"
    ALERT_READ = "alert.read", "See alerts, drift checks and notification deliveries"
    ALERT_ACT = "alert.act", "Acknowledge, resolve or silence alerts"
    RECEIVER_MANAGE = "receiver.manage", "Manage notification receivers (webhooks) and redeliver"
    MONITOR_EDIT = "monitor.edit", "Change a model's monitoring policy (capture, drift, SLOs, automatic rollback)"


_EVERYONE = {Role.DATA_SCIENTIST, Role.RELEASE_MANAGER, Role.ONCALL, Role.CI, Role.ADMIN}

CAPABILITIES: dict[str, set[Role]] = {
    Cap.MODEL_READ: _EVERYONE,
    Cap.MODEL_REGISTER: {Role.DATA_SCIENTIST, Role.CI, Role.ADMIN},
    Cap.MODEL_EDIT: {Role.DATA_SCIENTIST, Role.CI, Role.ADMIN},
    Cap.AUDIT_READ: {Role.RELEASE_MANAGER, Role.ONCALL, Role.ADMIN},
    Cap.USER_MANAGE: {Role.ADMIN},
    Cap.DEPLOY_READ: _EVERYONE,
    Cap.DEPLOY_CREATE: {Role.RELEASE_MANAGER, Role.CI, Role.ADMIN},
    # On-call stops a bad rollout; only release managers decide that a version becomes the champion.
    Cap.DEPLOY_CONTROL: {Role.RELEASE_MANAGER, Role.ONCALL, Role.ADMIN},
    Cap.DEPLOY_PROMOTE: {Role.RELEASE_MANAGER, Role.ADMIN},
    # Anyone who ships a version may ask for its promotion (CI included); approving is never CI's.
    Cap.PROMOTION_REQUEST: {Role.DATA_SCIENTIST, Role.RELEASE_MANAGER, Role.CI, Role.ADMIN},
    # An emergency path, written down and announced (deployer/promotions.py promotion_break_glass).
    Cap.BREAK_GLASS: {Role.ADMIN},
    # Those the policy gates do not set the gate.
    Cap.POLICY_EDIT: {Role.ADMIN},
    # Shipping without hardware evidence is a release decision, written down and audited.
    Cap.HIL_OVERRIDE: {Role.RELEASE_MANAGER, Role.ADMIN},
    Cap.ALERT_READ: _EVERYONE,
    # On-call acts on alerts; a release manager may too (an alert can stop a promotion).
    Cap.ALERT_ACT: {Role.ONCALL, Role.RELEASE_MANAGER, Role.ADMIN},
    Cap.RECEIVER_MANAGE: {Role.ONCALL, Role.ADMIN},
    # Thresholds and automatic rollback decide what pages people and what serves: those who answer for both.
    Cap.MONITOR_EDIT: {Role.RELEASE_MANAGER, Role.ONCALL, Role.ADMIN},
}


def roles_allow(roles: set[str] | list[str], capability: str) -> bool:
    return bool(set(roles) & {str(role) for role in CAPABILITIES[capability]})
