"""Who did something, and the append-only record of it. Callers write the audit row inside the
same transaction as the change it describes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from registry.models import AuditEvent


@dataclass(frozen=True)
class Actor:
    user: AbstractBaseUser | AnonymousUser | None
    via: str  # web, api, mlflow, system

    @property
    def name(self) -> str:
        if self.user is None or not self.user.is_authenticated:
            return "system"
        return str(self.user.get_username())

    @property
    def user_or_none(self) -> Any:
        return self.user if self.user is not None and self.user.is_authenticated else None


SYSTEM = Actor(None, "system")


def audit_record(actor: Actor, action: str, target_type: str, target_id: object,
                 before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        actor=actor.user_or_none, actor_name=actor.name, via=actor.via, action=action,
        target_type=target_type, target_id=str(target_id), before=before, after=after,
    )
