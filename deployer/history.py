"""What served a model, and why, at any past moment: rebuilt from the audit log alone (selectors, read-only).

Every change that decides what serves writes its audit row in the transaction that makes it (DESIGN.md), so
the log is the record to read, not the tables, whose rows show only the present:
- `deployment.create` and `deployment.<status>` (target a deployment; before/after status, step, weight,
  version): a rollout's mode and its canary weight over time;
- `endpoint.stable` (target the model's name): the stable (champion) version changing, and the deployment
  that made it so;
- `alias.set` / `alias.delete` (target the registered model): MLflow aliases, moved by the reconciler
  (`champion`) or by people;
- `promotion.requested|approved|rejected|break_glass` (target a promotion request, `after.model` the
  model): who asked and who approved.

The only table read is Deployment, for facts fixed when a rollout is created and never changed (which model
it belongs to, its shadow share), which the deployment's audit rows do not repeat.

Shares are what the platform decided: `share` is the percent of the model's client traffic routed to a
version (a canary at weight w takes w, the stable version the rest); a shadow candidate takes none and is
sent `mirrored` percent of stable's requests as copies. The gateways apply a decision within a reconciler
tick (2 s) of its row.

Reading is bounded: the state at a moment T needs only the latest `endpoint.stable` row at or before T, the
rows of the model's latest rollout created by T (one rollout at a time, so no other rollout's row can be
newer) and the latest row of each alias; a timeline is that state at `since` followed by at most `limit`
rows after it, with where to continue when more were left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db.models import Q
from django.db.models.fields.json import KeyTextTransform
from django.utils import timezone

from deployer.models import ACTIVE_ROLLOUT_STATES, SERVING_ROLLOUT_STATES, Deployment, RolloutMode, RolloutStatus
from registry.models import AuditEvent, RegisteredModel

ALIAS_ACTIONS = ("alias.set", "alias.delete")
PROMOTION_ACTIONS = ("promotion.requested", "promotion.approved", "promotion.rejected", "promotion.break_glass")
CHAMPION = "champion"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000
AT_FORMAT = "ISO 8601 with a time zone, e.g. 2026-11-30T06:13:24Z or 2026-11-30T07:13:24+01:00"


class HistoryError(ValueError):
    """A time that is not one (the API's 400)."""


def parse_time(value: str) -> datetime:
    """An ISO 8601 time; one without a zone is taken as UTC (as the pages show times)."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        raise HistoryError(f"{value[:60]!r} is not a time; expected {AT_FORMAT}") from None
    if timezone.is_naive(found):
        found = found.replace(tzinfo=UTC)
    try:
        found.astimezone(UTC)  # 0001-01-01T00:00+01:00 is no moment UTC can name
    except OverflowError:
        raise HistoryError(f"{value[:60]!r} is out of range; expected {AT_FORMAT}") from None
    return found


# ---- the state the rows build --------------------------------------------------------------------------------


@dataclass
class Rollout:
    deployment: int
    version: int | None
    mode: str = RolloutMode.CANARY
    status: str = RolloutStatus.PENDING
    step: int = -1
    weight: int = 0
    steps: list[int] = field(default_factory=list)
    mirrored: int = 0
    started_at: datetime | None = None
    started_by: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_ROLLOUT_STATES

    def as_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "version": self.version, "mode": self.mode, "status": self.status,
                "step": self.step, "steps": self.steps, "weight": self.weight,
                "mirrored": self.mirrored if self.mode == RolloutMode.SHADOW else None,
                "started_at": self.started_at, "started_by": self.started_by, "reason": self.reason}


@dataclass(frozen=True)
class Lane:
    """What one version is doing: its client share, its role, the deployment that put it there."""

    share: int
    role: str  # stable, canary, shadow
    deployment: int | None
    mirrored: int | None = None


@dataclass
class Replay:
    """Applies audit rows, oldest first, to the model's serving state, and records how it changed: traffic
    segments per version, alias segments, and markers for what people and the platform decided."""

    shadow_share: dict[int, int]  # deployment -> percent of stable's requests mirrored to it
    stable: int | None = None
    stable_deployment: int | None = None
    rollouts: dict[int, Rollout] = field(default_factory=dict)
    current: int | None = None  # the latest rollout's deployment id
    aliases: dict[str, int] = field(default_factory=dict)
    lanes: dict[int, tuple[Lane, datetime]] = field(default_factory=dict)  # version -> (lane, since)
    alias_since: dict[str, datetime] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)
    alias_segments: list[dict[str, Any]] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    last: AuditEvent | None = None
    record_markers: bool = True

    @property
    def rollout(self) -> Rollout | None:
        return self.rollouts.get(self.current) if self.current is not None else None

    def serving(self) -> dict[int, Lane]:
        """Each version taking part now, from the stable version and the rollout in progress."""
        d = self.rollout
        shown: dict[int, Lane] = {}
        canary_weight = 0
        if d is not None and d.status in SERVING_ROLLOUT_STATES and d.version is not None:
            if d.mode == RolloutMode.SHADOW:
                shown[d.version] = Lane(0, "shadow", d.deployment, d.mirrored)
            elif d.weight > 0 and d.version != self.stable:
                canary_weight = d.weight
                shown[d.version] = Lane(d.weight, "canary", d.deployment)
        if self.stable is not None:
            shown[self.stable] = Lane(100 - canary_weight, "stable", self.stable_deployment)
        return shown

    def apply(self, e: AuditEvent) -> None:
        after = e.after if isinstance(e.after, dict) else {}
        if e.target_type == "deployment":
            self._deployment(e, after)
        elif e.action == "endpoint.stable":
            self.stable = _int(after.get("stable_version"))
            self.stable_deployment = _int(after.get("deployment"))
        elif e.action in ALIAS_ACTIONS:
            self._alias(e, after)
        elif e.action in PROMOTION_ACTIONS:
            self._promotion(e, after)
        self.last = e
        self._settle(e.at)

    def _deployment(self, e: AuditEvent, after: dict[str, Any]) -> None:
        pk = _int(e.target_id)
        if pk is None:
            return
        d = self.rollouts.get(pk)
        if d is None:
            d = self.rollouts[pk] = Rollout(pk, _int(after.get("version")), mirrored=self.shadow_share.get(pk, 0))
        if self.current is None or pk >= self.current:
            self.current = pk
        if e.action == "deployment.create":
            d.mode = str(after.get("mode") or RolloutMode.CANARY)
            d.steps = [s for s in after.get("steps") or [] if isinstance(s, int)]
            d.started_at, d.started_by = e.at, e.actor_name
            d.status = str(after.get("status") or RolloutStatus.PENDING)
            self._mark(e, "restore" if d.mode == RolloutMode.RESTORE else "started", d.version, pk,
                       _started_words(d, after), reason=str(after.get("why") or ""))
            return
        d.status = str(after.get("status") or e.action.partition(".")[2])
        d.step = _int(after.get("step"), d.step)  # type: ignore[assignment]
        d.weight = _int(after.get("weight"), d.weight)  # type: ignore[assignment]
        d.reason = str(after.get("reason") or "")
        by = _who(e)
        if d.status == RolloutStatus.PROMOTED:
            if d.version is not None:
                # The endpoint.stable row of the same transaction follows; the rollout's own row already says it.
                self.stable, self.stable_deployment = d.version, pk
            how = ("champion rollback" if d.mode == RolloutMode.RESTORE else "first deployment"
                   if "first deployment" in d.reason else "automatic" if by is None else f"by {by}")
            self._mark(e, "promoted", d.version, pk, f"v{d.version} promoted ({how})", reason=d.reason)
        elif d.status == RolloutStatus.ROLLED_BACK:
            how = "automatic" if by is None else f"by {by}"
            self._mark(e, "rolled_back", d.version, pk, f"v{d.version} rolled back ({how})", reason=d.reason)
        elif d.status == RolloutStatus.AWAITING_APPROVAL:
            self._mark(e, "awaiting_approval", d.version, pk, f"v{d.version} awaits approval", reason=d.reason)
        elif d.status == RolloutStatus.PAUSED:
            self._mark(e, "paused", d.version, pk, f"v{d.version} paused" + (f" by {by}" if by else ""),
                       reason=d.reason)
        elif d.status == RolloutStatus.PROGRESSING:
            before = e.before if isinstance(e.before, dict) else {}
            if before.get("status") == RolloutStatus.PAUSED:
                self._mark(e, "resumed", d.version, pk, f"v{d.version} resumed" + (f" by {by}" if by else ""))

    def _alias(self, e: AuditEvent, after: dict[str, Any]) -> None:
        before = e.before if isinstance(e.before, dict) else {}
        alias = str(after.get("alias") or before.get("alias") or "")
        if not alias:
            return
        version = _int(after.get("version")) if e.action == "alias.set" else None
        old = self.aliases.get(alias)
        if old == version:
            return
        if old is not None:
            self.alias_segments.append({"alias": alias, "version": old, "from": self.alias_since.get(alias),
                                        "to": e.at})
        if version is None:
            self.aliases.pop(alias, None)
        else:
            self.aliases[alias] = version
            self.alias_since[alias] = e.at
        who = _who(e)
        self._mark(e, "alias", version, None, f"{alias} → v{version}" if version is not None else
                   f"{alias} removed", actor_words="by the reconciler" if who is None else f"by {who}")

    def _promotion(self, e: AuditEvent, after: dict[str, Any]) -> None:
        kind = e.action.partition(".")[2]
        version = _int(after.get("version"))
        approvers = [str(a) for a in after.get("approvers") or []]
        requester = str(after.get("requested_by") or e.actor_name)  # the reconciler files for a person
        words = {"requested": f"promotion of v{version} requested by {requester}",
                 "approved": f"promotion of v{version} approved by {', '.join(approvers) or e.actor_name}",
                 "rejected": f"promotion of v{version} rejected by {e.actor_name}",
                 "break_glass": f"v{version} promoted by break-glass by {e.actor_name}"}[kind]
        self._mark(e, {"approved": "approval", "rejected": "rejection", "requested": "request"}.get(kind, kind),
                   version, _int(after.get("deployment")), words, reason=str(after.get("reason") or ""),
                   approvers=approvers, request=_int(e.target_id))

    def _mark(self, e: AuditEvent, kind: str, version: int | None, deployment: int | None, label: str, *,
              reason: str = "", actor_words: str = "", **extra: Any) -> None:
        if self.record_markers:
            self.markers.append({"at": e.at, "kind": kind, "version": version, "deployment": deployment,
                                 "label": label, "actor": e.actor_name, "automatic": _who(e) is None,
                                 "reason": reason, "event": e.pk, **extra})

    def _settle(self, at: datetime) -> None:
        """Close the segments of versions whose part changed at `at` and open the new ones."""
        now = self.serving()
        for version, (lane, since) in list(self.lanes.items()):
            if now.get(version) != lane:
                self.segments.append(_segment(version, lane, since, at))
                del self.lanes[version]
        for version, lane in now.items():
            if version not in self.lanes:
                self.lanes[version] = (lane, at)

    def open_segments(self) -> list[dict[str, Any]]:
        return [_segment(version, lane, since, None) for version, (lane, since) in sorted(self.lanes.items())]

    def open_aliases(self) -> list[dict[str, Any]]:
        return [{"alias": a, "version": v, "from": self.alias_since.get(a), "to": None}
                for a, v in sorted(self.aliases.items())]


def _segment(version: int, lane: Lane, since: datetime, until: datetime | None) -> dict[str, Any]:
    return {"from": since, "to": until, "version": version, "share": lane.share, "role": lane.role,
            "deployment": lane.deployment, "mirrored": lane.mirrored}


def _int(value: Any, default: int | None = None) -> int | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _who(e: AuditEvent) -> str | None:
    """The person behind a row, None for the platform itself."""
    return None if e.via == "system" or e.actor_name == "system" else e.actor_name


def _started_words(d: Rollout, after: dict[str, Any]) -> str:
    by = d.started_by if d.started_by != "system" else "the platform"
    if d.mode == RolloutMode.RESTORE:
        return f"champion rollback to v{d.version} started by {by}"
    prev = after.get("previous_version")
    over = f" over v{prev}" if prev is not None else ""
    steps = f" (steps {', '.join(f'{s}%' for s in d.steps)})" if d.steps and d.mode == RolloutMode.CANARY else ""
    return f"{d.mode} rollout of v{d.version}{over} started by {by}{steps}"


# ---- reading the rows ----------------------------------------------------------------------------------------


def _deployments_of(model: RegisteredModel) -> dict[int, int]:
    """The model's deployments and their shadow shares: fixed at creation, never changed."""
    return dict(Deployment.objects.filter(model=model).values_list("pk", "shadow_share"))


def _ordered(rows: Iterable[AuditEvent]) -> list[AuditEvent]:
    return sorted({r.pk: r for r in rows}.values(), key=lambda r: (r.at, r.pk))


def seed_rows(model: RegisteredModel, at: datetime, deployments: dict[int, int]) -> list[AuditEvent]:
    """The few rows that decide the model's state at `at`: the latest stable change, every row of the latest
    rollout created by then, and the latest row of each alias."""
    events = AuditEvent.objects.filter(at__lte=at)
    rows: list[AuditEvent] = []
    stable = (events.filter(target_type="endpoint", target_id=model.name, action="endpoint.stable")
              .order_by("-at", "-id").first())
    if stable is not None:
        rows.append(stable)
    ids = [str(pk) for pk in deployments]
    latest = (events.filter(target_type="deployment", target_id__in=ids, action="deployment.create")
              .order_by("-at", "-id").first()) if ids else None
    if latest is not None:
        rows += events.filter(target_type="deployment", target_id=latest.target_id)
    rows += (events.filter(target_type="registered_model", target_id=model.name, action__in=ALIAS_ACTIONS)
             .annotate(alias_name=KeyTextTransform("alias", "after"))
             .order_by("alias_name", "-at", "-id").distinct("alias_name"))
    return _ordered(rows)


def window_rows(model: RegisteredModel, since: datetime | None, until: datetime, deployments: dict[int, int],
                limit: int) -> tuple[list[AuditEvent], bool]:
    """The model's rows after `since` (all, without) up to `until`, oldest first, at most `limit`; and
    whether more were left. A cut never splits rows of the same instant, so `since` = the last row's time
    continues exactly."""
    which = (Q(target_type="endpoint", target_id=model.name, action="endpoint.stable")
             | Q(target_type="registered_model", target_id=model.name, action__in=ALIAS_ACTIONS)
             | Q(target_type="promotion", action__in=PROMOTION_ACTIONS, after__model=model.name))
    if deployments:
        which |= Q(target_type="deployment", target_id__in=[str(pk) for pk in deployments])
    found = AuditEvent.objects.filter(which, at__lte=until)
    if since is not None:
        found = found.filter(at__gt=since)
    rows = list(found.order_by("at", "id")[:limit + 1])
    if len(rows) <= limit:
        return rows, False
    cut_at = rows[limit].at
    kept = rows[:limit]
    while kept and kept[-1].at == cut_at:
        kept.pop()
    return (kept or rows[:limit]), True


# ---- the answers -----------------------------------------------------------------------------------------------


def _approval(model: RegisteredModel, state: Replay, at: datetime) -> dict[str, Any] | None:
    """How the stable version at `at` became champion: its promotion's approvers, else who promoted it."""
    if state.stable is None:
        return None
    events = AuditEvent.objects.filter(at__lte=at)
    dep = state.stable_deployment
    promoted = (events.filter(target_type="deployment", target_id=str(dep), action="deployment.promoted")
                .order_by("-at", "-id").first()) if dep is not None else None
    promotions = events.filter(target_type="promotion", after__model=model.name)
    mine = promotions.filter(after__deployment=dep) if dep is not None else promotions.none()
    if dep is None or not mine.exists():
        # A request that names no deployment (made before one existed) counts by its version, if it came before
        # the promotion; one naming another deployment (an earlier reign of the same version) never does.
        mine = promotions.filter(Q(after__deployment=None) | Q(after__deployment__isnull=True),
                                 after__version=state.stable)
        if promoted is not None:
            mine = mine.filter(at__lte=promoted.at)
    approved = mine.filter(action="promotion.approved").order_by("-at", "-id").first()
    glass = mine.filter(action="promotion.break_glass").order_by("-at", "-id").first()
    rollout = state.rollouts.get(dep) if dep is not None else None
    shown: dict[str, Any] = {"version": state.stable, "deployment": dep,
                             "promoted_at": promoted.at if promoted else None,
                             "promoted_by": promoted.actor_name if promoted else None,
                             "reason": (promoted.after or {}).get("reason", "") if promoted else "",
                             "mode": rollout.mode if rollout else None, "approvers": [], "approved_at": None,
                             "break_glass": None, "source": None}
    if approved is not None:
        after = approved.after or {}
        shown.update(approvers=[str(a) for a in after.get("approvers") or []] or [approved.actor_name],
                     approved_at=approved.at, request=_int(approved.target_id), source="promotion.approved")
    elif promoted is not None:
        who = _who(promoted)
        shown.update(approvers=[who] if who else [], source="deployment.promoted")
    if glass is not None:
        shown["break_glass"] = {"by": glass.actor_name, "at": glass.at,
                                "reason": str((glass.after or {}).get("reason") or "")}
    return shown


def _replay_seed(model: RegisteredModel, at: datetime, deployments: dict[int, int]) -> Replay:
    state = Replay(shadow_share=deployments, record_markers=False)
    for row in seed_rows(model, at, deployments):
        state.apply(row)
    return state


def state_at(model: RegisteredModel, at: datetime) -> dict[str, Any]:
    """The instant answer: which versions served which share of the model's traffic at `at`, the aliases,
    the rollout in progress, and who approved the champion of the moment."""
    deployments = _deployments_of(model)
    state = _replay_seed(model, at, deployments)
    lanes = state.serving()
    serving: list[dict[str, Any]] = [
        {"version": v, "share": lane.share, "role": lane.role, "deployment": lane.deployment,
         "mirrored": lane.mirrored, "since": state.lanes[v][1]} for v, lane in lanes.items()]
    serving.sort(key=lambda s: (-s["share"], s["version"]))
    rollout = state.rollout
    answer = {
        "model": model.name, "at": at, "serving": serving, "stable_version": state.stable,
        "aliases": dict(sorted(state.aliases.items())), "champion_alias": state.aliases.get(CHAMPION),
        "alias_since": {a: state.alias_since.get(a) for a in sorted(state.aliases)},
        "rollout": rollout.as_dict() if rollout is not None and rollout.active else None,
        "champion": _approval(model, state, at),
        "last_event": None if state.last is None else {"at": state.last.at, "action": state.last.action,
                                                        "id": state.last.pk},
    }
    answer["summary"] = words(answer)
    return answer


def timeline(model: RegisteredModel, since: datetime | None = None, until: datetime | None = None,
             limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The model's history between `since` (its beginning, without) and `until` (now, without): traffic
    segments per version, alias segments, markers and the rows read (at most `limit`). A segment's `to`
    is None while it still held at the end; `truncated` says more rows were left, and `next_since` where
    to ask from for them."""
    until = until or timezone.now()
    deployments = _deployments_of(model)
    if since is not None:
        state = _replay_seed(model, since, deployments)
        state.segments, state.alias_segments = [], []  # what ended before the window is not in it
        state.record_markers = True
    else:
        state = Replay(shadow_share=deployments)
    rows, truncated = window_rows(model, since, until, deployments, limit)
    for row in rows:
        state.apply(row)
    end = rows[-1].at if truncated and rows else until
    return {
        "model": model.name, "since": since, "until": end, "truncated": truncated,
        "next_since": end if truncated else None, "limit": limit, "events_read": len(rows),
        "segments": sorted(state.segments + state.open_segments(), key=lambda s: (s["from"], s["version"])),
        "aliases": sorted(state.alias_segments + state.open_aliases(),
                          key=lambda s: (s["from"] or until, s["alias"])),
        "markers": state.markers,
        "events": [event_row(r) for r in rows],
    }


def event_row(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.pk, "at": e.at, "action": e.action, "actor": e.actor_name, "via": e.via,
            "target_type": e.target_type, "target_id": e.target_id, "before": e.before, "after": e.after}


# ---- in words ----------------------------------------------------------------------------------------------


def _when(at: datetime | None) -> str:
    return "?" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def words(answer: dict[str, Any]) -> str:
    """The instant answer as a sentence or three, for the page and the API's `summary`."""
    parts = []
    serving = answer["serving"]
    if not serving:
        parts.append(f"At {_when(answer['at'])} nothing served {answer['model']}.")
    else:
        each = []
        for s in serving:
            if s["role"] == "shadow":
                each.append(f"v{s['version']} no client traffic (shadow of deployment {s['deployment']}, sent "
                            f"{s['mirrored']}% of stable's requests as copies)")
            else:
                role = "stable" if s["role"] == "stable" else f"canary of deployment {s['deployment']}"
                each.append(f"v{s['version']} {s['share']}% ({role}, since {_when(s['since'])})")
        parts.append(f"At {_when(answer['at'])} {answer['model']} served " + "; ".join(each) + ".")
    d = answer["rollout"]
    if d is not None:
        step = f", step {d['step'] + 1} of {len(d['steps'])}" if d["step"] >= 0 and d["steps"] else ""
        parts.append(f"Deployment {d['deployment']} ({d['mode']} of v{d['version']}) was "
                     f"{d['status'].replace('_', ' ')}{step}, started by {d['started_by']} at "
                     f"{_when(d['started_at'])}.")
    aliases = answer["aliases"]
    if aliases:
        parts.append("Aliases: " + ", ".join(f"{a} → v{v}" for a, v in aliases.items()) + ".")
    else:
        parts.append("No alias was set.")
    c = answer["champion"]
    if c is not None:
        how = f"v{c['version']} became champion at {_when(c['promoted_at'])}" if c["promoted_at"] else \
            f"v{c['version']} was champion"
        if c["source"] == "promotion.approved":
            how += f", approved by {', '.join(c['approvers'])}"
        elif c["approvers"]:
            how += f", promoted by {', '.join(c['approvers'])}"
        elif c["mode"] == RolloutMode.RESTORE:
            how += ", restored by a champion rollback"
        elif c["promoted_at"]:
            how += ", promoted automatically"
        if c["break_glass"]:
            how += f" (break-glass by {c['break_glass']['by']})"
        if c["reason"] and c["reason"] != f"promoted by {c['promoted_by']}":  # no need to say it twice
            how += f": {c['reason']}"
        parts.append(how.rstrip(".") + ".")
    return " ".join(parts)
