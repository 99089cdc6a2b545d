"""Small filters the pages share: pretty JSON, status badges, signature rows, page links."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django import template
from django.http import HttpRequest
from django.utils import timezone
from django.utils.timesince import timesince, timeuntil

from registry.tokens import token_expired

register = template.Library()

STATUS_HINTS = {
    "validating": "Being loaded in an isolated worker; this updates by itself",
    "ready": "Loaded and predicted in isolation",
    "invalid": "Could not be loaded; see the status detail",
    "archived": "Kept for the record, no longer used",
}


def _pretty(value: Any, depth: int = 0) -> str:
    """Indented JSON where a list of plain values stays on one line (a row of features reads as a row)."""
    pad = "  " * depth
    if isinstance(value, dict) and value:
        items = [f"{pad}  {json.dumps(str(k))}: {_pretty(v, depth + 1)}" for k, v in sorted(value.items(), key=str)]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = [f"{pad}  {_pretty(v, depth + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, default=str)


@register.filter
def pretty_json(value: Any, limit: int = 4000) -> str:
    """Readable JSON, cut at `limit` characters so a huge input example cannot swamp the page."""
    text = _pretty(value)
    limit = int(limit)
    if limit and len(text) > limit:
        return text[:limit] + f"\n… ({len(text) - limit:,} more characters)"
    return text


@register.filter
def json_inline(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@register.filter
def status_hint(status: str) -> str:
    return STATUS_HINTS.get(status, "")


@register.filter
def signature_rows(specs: Any) -> list[dict[str, str]]:
    """One row per column or tensor of an MLflow signature's inputs or outputs."""
    if isinstance(specs, dict):  # a signature saved as {"name": spec}
        specs = [{"name": key, **(val if isinstance(val, dict) else {"type": val})} for key, val in specs.items()]
    if not isinstance(specs, list):
        return []
    rows = []
    for spec in specs:
        if not isinstance(spec, dict):
            rows.append({"name": "", "type": str(spec), "shape": "", "required": ""})
            continue
        tensor = spec.get("tensor-spec") or {}
        dtype = tensor.get("dtype") if isinstance(tensor, dict) else None
        shape = tensor.get("shape") if isinstance(tensor, dict) else spec.get("shape")
        kind = str(spec.get("type", ""))
        rows.append({
            "name": str(spec.get("name", "")),
            "type": f"{kind} ({dtype})" if dtype else kind,
            "shape": "(" + ", ".join("?" if d == -1 else str(d) for d in shape) + ")"
            if isinstance(shape, list) else "",
            "required": "" if spec.get("required") is None else ("yes" if spec.get("required") else "no"),
        })
    return rows


@register.simple_tag
def page_url(request: HttpRequest, page: int) -> str:
    """The current URL's query string with another page number (filters kept)."""
    params = request.GET.copy()
    params["page"] = str(page)
    return "?" + urlencode(list(params.lists()), doseq=True)


@register.filter
def dict_items(value: Any) -> list[tuple[str, Any]]:
    return sorted(value.items()) if isinstance(value, dict) else []


@register.filter
def ago(value: datetime | None) -> str:
    """“just now”, “5 minutes ago”, “3 days ago”: short relative times for tables."""
    if value is None:
        return "—"
    seconds = (timezone.now() - value).total_seconds()
    if seconds < 0:
        return "in " + timeuntil(value)
    if seconds < 60:
        return "just now"
    return timesince(value).split(",")[0] + " ago"


@register.filter
def audit_changes(event: Any) -> list[dict[str, Any]]:
    """Rows of an audit event's before and after, by key; `changed` marks keys whose value differs."""
    before = event.before if isinstance(event.before, dict) else {}
    after = event.after if isinstance(event.after, dict) else {}
    rows = []
    for key in sorted(set(before) | set(after)):
        rows.append({
            "key": key,
            "before": json.dumps(before[key], sort_keys=True, default=str) if key in before else "",
            "after": json.dumps(after[key], sort_keys=True, default=str) if key in after else "",
            "changed": before.get(key, _MISSING) != after.get(key, _MISSING),
        })
    return rows


_MISSING = object()


@register.filter
def flavor_facts(conf: Any) -> list[tuple[str, str]]:
    """The scalar settings of one MLflow flavor (versions, loader, format), for a compact list."""
    if not isinstance(conf, dict):
        return []
    return [(key, str(value)) for key, value in sorted(conf.items()) if isinstance(value, (str, int, float, bool))]


@register.filter
def get_item(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.filter
def token_state(token: Any) -> str:
    if token.revoked_at is not None:
        return "revoked"
    return "expired" if token_expired(token) else "active"
