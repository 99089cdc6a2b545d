from typing import Any

from django.http import HttpRequest

from registry.roles import CAPABILITIES, roles_allow
from registry.tokens import user_roles


def roles(request: HttpRequest) -> dict[str, Any]:
    """`can` in every template: {"model.register": True, ...} for the signed-in person."""
    mine = user_roles(getattr(request, "user", None))
    return {"my_roles": sorted(mine), "can": {cap.replace(".", "_"): roles_allow(mine, cap) for cap in CAPABILITIES}}
