from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from registry.models import ApiToken
from registry.roles import roles_allow
from registry.tokens import effective_roles


def request_roles(request: Request) -> set[str]:
    token = request.auth if isinstance(request.auth, ApiToken) else None
    return effective_roles(request.user, token)


class HasCapability(BasePermission):
    """Views set `capabilities = {"GET": Cap.X, "POST": Cap.Y, ...}`; a method not listed is refused."""

    message = "your roles do not allow this"

    def has_permission(self, request: Request, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        method = "GET" if request.method in ("HEAD", "OPTIONS") else request.method
        needed = view.capabilities.get(method) or view.capabilities.get("*")
        if needed is None:
            return False
        if roles_allow(request_roles(request), needed):
            return True
        self.message = f"your roles ({', '.join(sorted(request_roles(request))) or 'none'}) do not allow: {needed}"
        return False
