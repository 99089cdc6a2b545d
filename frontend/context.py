from typing import Any

from django.http import HttpRequest

from frontend.approvals import reviewable_count
from monitoring.models import Alert, AlertStatus
from registry.roles import CAPABILITIES, roles_allow
from registry.tokens import user_roles


def roles(request: HttpRequest) -> dict[str, Any]:
    """`can` in every template: {"model.register": True, ...} for the signed-in person; the nav's counts."""
    user = getattr(request, "user", None)
    mine = user_roles(user)
    return {"my_roles": sorted(mine), "can": {cap.replace(".", "_"): roles_allow(mine, cap) for cap in CAPABILITIES},
            "firing_alerts": _firing_count, "approvals_waiting": lambda: reviewable_count(user)}


def _firing_count() -> int:
    """The count beside the nav's Alerts link; a callable, so only pages that draw the nav query it."""
    return Alert.objects.filter(status=AlertStatus.FIRING).count()
