"""Protected aliases and promotion policy: the registry's half of governance (the deployer's half, promotion
requests and their approvals, is deployer/promotions.py).

A protected model's production aliases (`champion` and any its policy lists) move only through an approved
promotion or a rollback: the deployer's reconciler sets `champion` from the endpoint's stable version, which only
those change. Everyone else, whatever their role, is refused here, through MLflow's REST API served by the
platform (registry/mlflow_server.py) and through /api/v1 alike, and told how to ask for a promotion instead.
A model is protected once it has been deployed, unless its policy says otherwise.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry import mlflow_store
from registry.audit import Actor, audit_record
from registry.errors import RegistryError
from registry.models import PromotionPolicy, RegisteredModel

CHAMPION = mlflow_store.CHAMPION
HOW_TO_PROMOTE = ("a version becomes champion through an approved promotion: roll it out (POST /api/v1/deployments/) "
                  "and request its promotion (POST /api/v1/deployments/<id>/promotion/), which release managers "
                  "approve in the approvals inbox (/approvals/)")


_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class ProtectedAliasError(RegistryError):
    status_code = 403


def alias_problem(alias: str) -> str:
    """What is wrong with an alias name (MLflow's rules), or ""."""
    if not _ALIAS.match(alias):
        return f"alias {alias!r}: use 1-255 letters, digits, '_' or '-'"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        return f"alias {alias!r} is reserved by MLflow (latest, v<number>)"
    return ""


def promotion_policy(model: RegisteredModel) -> PromotionPolicy:
    """The model's policy, or the defaults (unsaved) when it has none."""
    found = PromotionPolicy.objects.filter(model=model).first()
    return found if found is not None else PromotionPolicy(model=model)


def policies_for(model_ids: list[int]) -> dict[int, PromotionPolicy]:
    """The policies of these models in one query (a model without one is missing: it has the defaults)."""
    return {p.model_id: p for p in PromotionPolicy.objects.filter(model_id__in=model_ids)}


def listed_aliases(model_ids: list[int]) -> dict[int, list[str]]:
    """The aliases each model's policy lists beside `champion`: they follow the champion (the reconciler moves
    them with it), so a promotion or a rollback moves them all."""
    return {pk: sorted(p.protected_aliases) for pk, p in policies_for(model_ids).items() if p.protected_aliases}


def is_protected(policy: PromotionPolicy) -> bool:
    if policy.protected is not None:
        return policy.protected
    return policy.deployed_at is not None and bool(settings.PLATFORM["PROTECT_DEPLOYED"])


def protected_aliases(model: RegisteredModel) -> set[str]:
    """The aliases only a promotion or a rollback moves: none when the model is not protected."""
    policy = promotion_policy(model)
    return {CHAMPION, *policy.protected_aliases} if is_protected(policy) else set()


def alias_guard(model_name: str, alias: str, doing: str) -> None:
    """Refuse (ProtectedAliasError, 403) to `doing` ("set", "delete") a protected alias of the model."""
    model = RegisteredModel.objects.filter(name=model_name).first()
    if model is None or alias not in protected_aliases(model):
        return
    raise ProtectedAliasError(f"alias {alias!r} of model {model_name!r} is protected: nobody can {doing} it directly; "
                              f"{HOW_TO_PROMOTE}. A rollback to the previous champion is POST "
                              f"/api/v1/models/{model_name}/rollback/.")


def version_guard(model_name: str, version: int) -> None:
    """Refuse to delete a version a protected alias points at (MLflow would drop the alias with it)."""
    model = RegisteredModel.objects.filter(name=model_name).first()
    if model is None:
        return
    held = sorted(a for a, v in mlflow_store.aliases(model_name).items()
                  if v == version and a in protected_aliases(model))
    if held:
        raise ProtectedAliasError(f"v{version} of {model_name!r} is what the protected alias(es) {', '.join(held)} "
                                  f"point at; deleting it would move them. {HOW_TO_PROMOTE}.")


def alias_change(actor: Actor, model: RegisteredModel, alias: str, version: int | None) -> None:
    """Set (`version`) or delete (None) an alias that is not protected; audited."""
    problem = alias_problem(alias)
    if problem:
        raise RegistryError(problem)
    alias_guard(model.name, alias, "set" if version is not None else "delete")
    before = mlflow_store.aliases(model.name).get(alias)
    if version is None:
        if before is None:
            raise RegistryError(f"model {model.name!r} has no alias {alias!r}", 404)
        mlflow_store.alias_delete(model.name, alias)
    else:
        mlflow_store.alias_set(model.name, alias, version)
    alias_recorded(actor, model.name, alias, before, version)


def alias_recorded(actor: Actor, model_name: str, alias: str, before: int | None, version: int | None) -> None:
    """The audit row of an alias that moved (by the API, through MLflow, or by the reconciler)."""
    audit_record(actor, "alias.set" if version is not None else "alias.delete", "registered_model", model_name,
                 before={"alias": alias, "version": before}, after={"alias": alias, "version": version})


def model_mark_deployed(model: RegisteredModel) -> None:
    """The model got its first champion: from now on its production aliases are protected (unless its
    policy says otherwise)."""
    with transaction.atomic():
        policy, _ = PromotionPolicy.objects.select_for_update().get_or_create(model=model)
        if policy.deployed_at is None:
            policy.deployed_at = timezone.now()
            policy.save(update_fields=["deployed_at", "updated_at"])


def policy_words(policy: PromotionPolicy) -> dict[str, Any]:
    """The policy as the API and the pages show it, with what it means now."""
    return {"protected": is_protected(policy), "protected_setting": policy.protected,
            "protected_aliases": sorted({CHAMPION, *policy.protected_aliases}) if is_protected(policy) else [],
            "approvals_required": policy.approvals_required,
            "release_manager_required": policy.release_manager_required,
            "author_may_approve": policy.author_may_approve, "requester_may_approve": policy.requester_may_approve,
            "deployed_at": policy.deployed_at}
