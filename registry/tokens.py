"""API tokens and the roles a request acts with."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry.audit import Actor, audit_record
from registry.models import ApiToken, Profile
from registry.roles import Role

TOKEN_PREFIX = "mlp_"


class TokenError(ValueError):
    pass


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def user_roles(user: object) -> set[str]:
    if user is None or not getattr(user, "is_authenticated", False):
        return set()
    try:
        profile: Profile = user.profile  # type: ignore[attr-defined]
    except Profile.DoesNotExist:
        return set()
    return set(profile.roles)


@dataclass
class IssuedToken:
    token: ApiToken
    raw: str  # shown once, never stored


@transaction.atomic
def token_create(actor: Actor, owner: Any, name: str, roles: list[str] | None = None,
                 expires_in_days: int | None = None) -> IssuedToken:
    owner_roles = user_roles(owner)
    wanted = set(roles) if roles else owner_roles
    bad = wanted - set(Role.values)
    if bad:
        raise TokenError(f"unknown role(s): {', '.join(sorted(bad))}; roles are {', '.join(Role.values)}")
    if not wanted <= owner_roles:
        raise TokenError(f"a token cannot have roles its owner lacks: {', '.join(sorted(wanted - owner_roles))}")
    if not name.strip():
        raise TokenError("give the token a name, e.g. 'gitlab-ci' or 'laptop'")
    days = settings.PLATFORM["TOKEN_DEFAULT_DAYS"] if expires_in_days is None else expires_in_days
    if days < 0 or days > 3650:
        raise TokenError("expires_in_days must be between 0 (never expires) and 3650")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=owner, name=name.strip()[:100], prefix=raw[:12], digest=digest(raw), roles=sorted(wanted),
        expires_at=timezone.now() + timedelta(days=days) if days else None,
    )
    audit_record(actor, "token.create", "token", token.pk, after=_token_view(token))
    return IssuedToken(token=token, raw=raw)


@transaction.atomic
def token_revoke(actor: Actor, token: ApiToken) -> ApiToken:
    updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    forget_cached_tokens(token_id=token.pk)
    token.refresh_from_db()
    if updated:
        audit_record(actor, "token.revoke", "token", token.pk, before={"revoked_at": None},
                     after={"revoked_at": token.revoked_at.isoformat() if token.revoked_at else None})
    return token


def _token_view(token: ApiToken) -> dict[str, object]:
    return {"name": token.name, "owner": token.user.get_username(), "prefix": token.prefix, "roles": token.roles,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None}


# A bearer token is checked on every request. A successful lookup is remembered in this process for
# TOKEN_CACHE_S seconds, so a busy client costs no query per request. Revoking a token or changing
# its owner (roles, deactivation) forgets it in this process at once; other web processes notice
# within TOKEN_CACHE_S. Expiry is checked on every request, cached or not.
TOKEN_CACHE_S = 5.0
_TOKEN_CACHE: dict[str, tuple[float, ApiToken]] = {}


def forget_cached_tokens(*, token_id: int | None = None, user_id: int | None = None) -> None:
    for key, (_at, token) in list(_TOKEN_CACHE.items()):
        if token.pk == token_id or token.user_id == user_id:
            _TOKEN_CACHE.pop(key, None)


def token_authenticate(raw: str) -> tuple[object, ApiToken] | None:
    """The user and token for a raw bearer token, or None if it is unknown, expired or revoked."""
    key = digest(raw)
    now = timezone.now()
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and time.monotonic() - hit[0] < TOKEN_CACHE_S:
        token = hit[1]
        return None if token_expired(token, now) else (token.user, token)
    try:
        token = ApiToken.objects.select_related("user", "user__profile").get(digest=key)
    except ApiToken.DoesNotExist:
        return None
    if token.revoked_at is not None or token_expired(token, now) or not token.user.is_active:
        _TOKEN_CACHE.pop(key, None)
        return None
    # Touch last_used_at at most once a minute: no write per request.
    if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    if len(_TOKEN_CACHE) > 1000:
        _TOKEN_CACHE.clear()
    _TOKEN_CACHE[key] = (time.monotonic(), token)
    return token.user, token


def effective_roles(user: object, token: ApiToken | None) -> set[str]:
    roles = user_roles(user)
    if token is not None:
        roles &= set(token.roles)
    return roles


def token_expired(token: ApiToken, at: datetime | None = None) -> bool:
    return token.expires_at is not None and token.expires_at <= (at or timezone.now())
