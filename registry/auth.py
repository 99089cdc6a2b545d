"""DRF authentication: bearer tokens (people and CI) and HTTP Basic with a password (what the mlflow
client sends for MLFLOW_TRACKING_USERNAME/PASSWORD)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Any

from django.contrib.auth import authenticate, get_user_model
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from registry.models import ApiToken
from registry.tokens import token_authenticate


def credentials_from_header(header: str) -> tuple[str, str, str] | None:
    """("bearer", token, "") or ("basic", username, password) from an Authorization header."""
    kind, _, value = header.strip().partition(" ")
    kind = kind.lower()
    value = value.strip()
    if kind == "bearer" and value:
        return "bearer", value, ""
    if kind == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        if sep:
            return "basic", username, password
    return None


# Password hashing is deliberately slow (~0.5 s); the mlflow client sends Basic credentials on every
# request, so a successful check is remembered briefly, in memory, under a digest of the pair.
_PASSWORD_CACHE: dict[str, tuple[float, int]] = {}
_PASSWORD_CACHE_S = 60.0


def _password_login(username: str, password: str) -> Any:
    key = hashlib.sha256(f"{username}\0{password}".encode()).hexdigest()
    now = time.monotonic()
    hit = _PASSWORD_CACHE.get(key)
    if hit and now - hit[0] < _PASSWORD_CACHE_S:
        user = get_user_model().objects.select_related("profile").filter(pk=hit[1], is_active=True).first()
        if user is not None:
            return user
    user = authenticate(username=username, password=password)
    if user is None or not user.is_active:
        _PASSWORD_CACHE.pop(key, None)
        return None
    if len(_PASSWORD_CACHE) > 1000:
        _PASSWORD_CACHE.clear()
    _PASSWORD_CACHE[key] = (now, user.pk)
    return user


def authenticate_header(header: str) -> tuple[object, ApiToken | None] | None:
    creds = credentials_from_header(header)
    if creds is None:
        return None
    kind, first, second = creds
    if kind == "bearer":
        found = token_authenticate(first)
        return (found[0], found[1]) if found else None
    user = _password_login(first, second)
    if user is not None:
        return user, None
    # The mlflow client may send a token as the password of Basic auth.
    found = token_authenticate(second)
    if found and found[0].get_username() == first:  # type: ignore[attr-defined]
        return found[0], found[1]
    return None


class TokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[object, ApiToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header.lower().startswith("bearer "):
            return None
        result = authenticate_header(header)
        if result is None:
            raise exceptions.AuthenticationFailed("invalid, expired or revoked token")
        return result  # type: ignore[return-value]

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class BasicPasswordAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[object, ApiToken | None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header.lower().startswith("basic "):
            return None
        result = authenticate_header(header)
        if result is None:
            raise exceptions.AuthenticationFailed("invalid username or password")
        return result
