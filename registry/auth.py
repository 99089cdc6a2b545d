"""DRF authentication: bearer tokens (people and CI) and HTTP Basic with a password (what the mlflow
client sends for MLFLOW_TRACKING_USERNAME/PASSWORD)."""

from __future__ import annotations

import base64
import binascii

from django.contrib.auth import authenticate
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


def authenticate_header(header: str) -> tuple[object, ApiToken | None] | None:
    creds = credentials_from_header(header)
    if creds is None:
        return None
    kind, first, second = creds
    if kind == "bearer":
        found = token_authenticate(first)
        return (found[0], found[1]) if found else None
    user = authenticate(username=first, password=second)
    if user is not None and user.is_active:
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
