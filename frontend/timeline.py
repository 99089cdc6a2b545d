"""A model's timeline page: what served it over time (a swimlane per version, its share of client traffic as
a stepped band, approvals, promotions and rollbacks marked), the answer at a chosen moment in words, and the
audit rows it was rebuilt from. The reading is deployer/history.py; this module shapes it for the page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_GET

from deployer import history
from frontend.views import page_needs
from registry.models import RegisteredModel
from registry.roles import Cap

# The windows offered above the chart; "all" reads from the model's first row (at most history's limit).
RANGES = {"hour": ("last hour", timedelta(hours=1)), "day": ("last day", timedelta(days=1)),
          "week": ("last week", timedelta(days=7)), "all": ("all", None)}
PAGE_LIMIT = 1000
# Markers the chart draws (alias moves are in the events below and in the answer: drawn, they crowd the chart).
CHART_MARKERS = {"started", "restore", "promoted", "rolled_back", "approval", "rejection", "break_glass",
                 "awaiting_approval", "paused", "resumed"}


def _seconds(at: datetime) -> float:
    return at.timestamp()


def chart_data(found: dict[str, Any]) -> dict[str, Any]:
    """The swimlanes: x the change times (seconds), one lane per version (oldest at the bottom) holding its
    share at each time, null where it took no part; the markers as (time, kind, label)."""
    segments = found["segments"]
    until = found["until"]
    # From the window's start, else from the first row read (a rollout starts before its version serves).
    firsts = [s["from"] for s in segments] + [e["at"] for e in found["events"][:1]]
    start = found["since"] or (min(firsts) if firsts else until)
    edges = {start, until}
    for s in segments:
        edges.add(max(s["from"], start))
        if s["to"] is not None:
            edges.add(s["to"])
    times = sorted(t for t in edges if start <= t <= until)
    versions = sorted({s["version"] for s in segments})
    lanes = []
    for version in versions:
        mine = [s for s in segments if s["version"] == version]
        shares: list[int | None] = []
        roles: list[str | None] = []
        for i, t in enumerate(times):
            # The last point repeats the one before, so each step reaches the window's end.
            probe = times[i - 1] if i == len(times) - 1 and i > 0 else t
            held = next((s for s in mine if s["from"] <= probe and (s["to"] is None or probe < s["to"])), None)
            shares.append(None if held is None else held["share"])
            roles.append(None if held is None else held["role"])
        lanes.append({"version": version, "label": f"v{version}", "shares": shares, "roles": roles})
    markers = [{"t": _seconds(m["at"]), "kind": m["kind"], "label": m["label"], "version": m["version"]}
               for m in found["markers"] if m["kind"] in CHART_MARKERS and start <= m["at"] <= until]
    return {"times": [_seconds(t) for t in times], "lanes": lanes, "markers": markers,
            "since": _seconds(start), "until": _seconds(until)}


def _row_words(e: dict[str, Any], after: dict[str, Any]) -> str:
    """Words for the rows that move traffic without a marker of their own: a canary's step, the stable change."""
    before = e["before"] if isinstance(e["before"], dict) else {}
    if e["action"] == "deployment.progressing" and isinstance(after.get("step"), int):
        return f"v{after.get('version')} takes {after.get('weight')}% (step {after['step'] + 1})"
    if e["action"] == "endpoint.stable":
        was = before.get("stable_version")
        return f"stable version {'v' + str(was) if was is not None else 'none'} → v{after.get('stable_version')}"
    return ""


def event_rows(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows read, newest first, each with what it meant in words (the history's marker, where it has one)."""
    said = {m["event"]: m for m in found["markers"]}
    rows = []
    for e in reversed(found["events"]):
        marker = said.get(e["id"])
        after = e["after"] if isinstance(e["after"], dict) else {}
        weight = after.get("weight") if e["target_type"] == "deployment" else None
        rows.append({**e, "kind": marker["kind"] if marker else "",
                     "words": marker["label"] if marker else _row_words(e, after),
                     "reason": (marker or {}).get("reason") or str(after.get("reason") or ""),
                     "weight": weight, "target": f"{e['target_type']} {e['target_id']}"})
    return rows


def _window(request: HttpRequest) -> tuple[str, datetime | None, datetime | None, list[str]]:
    """The range asked for (a named one, or since/until), and what was wrong with it."""
    errors = []
    since = until = None
    for name in ("since", "until"):
        value = request.GET.get(name, "").strip()
        if value:
            try:
                parsed = history.parse_time(value)
            except history.HistoryError as exc:
                errors.append(f"{name}: {exc}")
                continue
            since, until = (parsed, until) if name == "since" else (since, parsed)
    if since is not None or until is not None:
        if since is not None and until is not None and since >= until:
            errors.append("since must be before until")
            since = until = None
        return "custom", since, until, errors
    key = request.GET.get("range", "all")
    key = key if key in RANGES else "all"
    span = RANGES[key][1]
    return key, (timezone.now() - span if span else None), None, errors


@require_GET
@page_needs(Cap.DEPLOY_READ)
def model_timeline(request: HttpRequest, name: str) -> HttpResponse:
    model = get_object_or_404(RegisteredModel, name=name)
    range_key, since, until, errors = _window(request)
    found = history.timeline(model, since, until, PAGE_LIMIT)
    asked = request.GET.get("at", "").strip()
    answer, at_error = None, ""
    if asked:
        try:
            answer = history.state_at(model, history.parse_time(asked))
        except history.HistoryError as exc:
            at_error = str(exc)
    context = {
        "model": model, "timeline": found, "chart": chart_data(found), "events": event_rows(found),
        "answer": answer, "at_asked": asked, "at_error": at_error, "at_format": history.AT_FORMAT,
        "at_default": timezone.now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ranges": [(key, label) for key, (label, _) in RANGES.items()], "range": range_key,
        "window_errors": errors, "since_asked": request.GET.get("since", ""),
        "until_asked": request.GET.get("until", ""),
        "next_since": found["next_since"].isoformat() if found["next_since"] else "",
    }
    return render(request, "frontend/model_timeline.html", context, status=400 if at_error or errors else 200)
