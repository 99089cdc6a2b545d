"""People and service accounts, and their roles."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction

from registry.audit import Actor, audit_record
from registry.errors import RegistryError
from registry.models import Profile
from registry.tokens import forget_cached_tokens


def _view(user: Any) -> dict[str, Any]:
    profile = Profile.objects.filter(user=user).first()
    return {"username": user.username, "is_active": user.is_active, "roles": sorted(profile.roles) if profile else [],
            "is_service_account": bool(profile and profile.is_service_account)}


@transaction.atomic
def user_create(actor: Actor, username: str, roles: list[str], email: str = "", password: str = "",
                is_service_account: bool = False) -> Any:
    User = get_user_model()
    if User.objects.filter(username=username).exists():
        raise RegistryError(f"user {username!r} already exists", 409)
    user = User(username=username, email=email)
    if password:
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise RegistryError("; ".join(exc.messages)) from exc
        user.set_password(password)
    else:
        user.set_unusable_password()  # service accounts authenticate with tokens only
    user.save()
    Profile.objects.create(user=user, roles=sorted(set(roles)), is_service_account=is_service_account)
    audit_record(actor, "user.create", "user", username, after=_view(user))
    return user


@transaction.atomic
def user_update(actor: Actor, user: Any, roles: list[str] | None = None, is_active: bool | None = None) -> Any:
    before = _view(user)
    profile, _ = Profile.objects.select_for_update().get_or_create(user=user)
    if roles is not None:
        profile.roles = sorted(set(roles))
        profile.save(update_fields=["roles"])
    if is_active is not None and is_active != user.is_active:
        user.is_active = is_active
        user.save(update_fields=["is_active"])
    forget_cached_tokens(user_id=user.pk)
    after = _view(user)
    if after != before:
        audit_record(actor, "user.update", "user", user.username, before=before, after=after)
    return user
