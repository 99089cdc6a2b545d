"""The one mechanism every lifecycle moves by (versions, engine builds, rollouts, alerts, and those to
come): a table of allowed transitions, a conditional UPDATE that claims the change (of two workers racing,
one makes it and the other gets a TransitionError), the audit row in the same transaction, and follow-up
work only after commit. Each app declares its lifecycles in its services module and moves them only
through `Lifecycle.move`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from django.db import models, transaction
from django.utils import timezone

from registry.audit import SYSTEM, Actor, audit_record
from registry.errors import TransitionError

M = TypeVar("M", bound=models.Model)


def _status_only(obj: Any) -> dict[str, Any]:
    return {"status": obj.status}


@dataclass(frozen=True)
class Lifecycle(Generic[M]):
    model: type[M]
    transitions: Mapping[str, set[str]]  # state -> the states it may become
    action: str  # the audit action's prefix: "version" gives "version.ready"
    target_type: str  # the audit row's target type
    target_id: Callable[[M], object]
    describe: Callable[[M], str]  # the thing in words, for the error: "digits v3", "build 12 (onnx-fp32)"
    view: Callable[[M], dict[str, Any]] = _status_only  # the audit row's before and after
    related: tuple[str, ...] = ()  # select_related for describe and view
    stamps: Mapping[str, Iterable[str]] = field(default_factory=dict)  # a time field -> the states that set it
    after_commit: Callable[[M], Iterable[Callable[[], None]]] | None = None  # follow-up work of every move

    def allowed_from(self, to: str) -> set[str]:
        return {state for state, targets in self.transitions.items() if to in targets}

    def move(self, pk: int, to: str, actor: Actor = SYSTEM, *, only_from: set[str] | None = None,
             note: Mapping[str, Any] | None = None, on_commit: Callable[[], None] | None = None,
             **fields: Any) -> M:
        """Move the row `pk` to `to` if the table allows it from its current state (and, with only_from,
        if that state is one of those), writing `fields` with it; `note` goes into the audit row's after."""
        allowed = self.allowed_from(to) if only_from is None else self.allowed_from(to) & only_from
        manager = self.model._default_manager
        names = {f.name for f in self.model._meta.get_fields()}
        with transaction.atomic():
            current = manager.select_related(*self.related).get(pk=pk)
            now = timezone.now()
            for stamp, states in self.stamps.items():
                if to in states:
                    fields.setdefault(stamp, now)
            if "updated_at" in names:
                fields.setdefault("updated_at", now)
            if not manager.filter(pk=pk, status__in=allowed).update(status=to, **fields):
                was = cast(Any, current).status  # every lifecycle's model has a status field
                raise TransitionError(f"{self.describe(current)} is {was}; it cannot become {to}")
            after = manager.select_related(*self.related).get(pk=pk)
            audit_record(actor, f"{self.action}.{to}", self.target_type, self.target_id(current),
                         before=self.view(current), after={**self.view(after), **(note or {})})
            for follow_up in self.after_commit(after) if self.after_commit else ():
                transaction.on_commit(follow_up)
            if on_commit is not None:
                transaction.on_commit(on_commit)
        return after
