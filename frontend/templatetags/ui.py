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
    "ready": "Passed the isolated inspection; see the status detail",
    "invalid": "Could not be loaded; see the status detail",
    "archived": "Kept for the record, no longer used",
    # engine builds
    "queued": "Waiting for a build worker",
    "running": "Being built in an isolated process; this updates by itself",
    "succeeded": "Built, passed the parity gate and stored",
    "rejected": "Built, but missed the parity gate; kept as evidence, not for serving",
    "failed": "Could not be built; see the error and the log",
    # rollouts
    "pending": "The canary is being loaded onto the fleet; it takes no traffic yet",
    "progressing": "The canary takes a step of traffic at a time while it is analysed",
    "paused": "Held at its current traffic share until someone resumes it; a failing canary is still rolled back",
    "awaiting_approval": "Every step passed; a release manager must promote it",
    "promoted": "The canary became the stable version",
    "rolled_back": "All traffic went back to the stable version; the canary was unloaded",
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


# ---- engine builds ------------------------------------------------------------------------------

BUILD_STEPS = ["claimed", "fetch", "build", "package", "store", "done"]
REUSE_STEPS = ["claimed", "fetch", "reuse", "done"]  # an identical engine exists: nothing is built

FIGURE_LABELS = {
    "label_agreement": "label agreement",
    "max_probability_diff": "max probability diff",
    "max_score_diff": "max score diff",
    "max_abs_error": "max abs error",
    "mean_abs_error": "mean abs error",
    "reference_scale": "mean |reference|",
}
RELATIVE_THRESHOLDS = {"max_abs_error", "mean_abs_error"}  # limits are × the mean |reference output|


@register.filter
def build_steps(build: Any) -> list[dict[str, str]]:
    """The build's steps, each `done`, `current`, `failed` or `pending`, for a progress strip."""
    steps = REUSE_STEPS if build.step == "reuse" or build.reused_from_id else BUILD_STEPS
    if build.status in ("succeeded", "rejected"):
        return [{"name": name, "state": "done"} for name in steps]
    at = steps.index(build.step) if build.step in steps and build.status != "queued" else -1
    now = "failed" if build.status == "failed" else "current"
    return [{"name": name, "state": "done" if i < at else now if i == at else "pending"}
            for i, name in enumerate(steps)]


@register.filter
def num(value: Any) -> str:
    """A figure, short: 4 significant digits, or 2 in scientific notation when very small or large
    (2.2e-7, 1e-4)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—" if value is None else str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.4g}"


@register.filter
def parity_rows(parity: Any) -> list[dict[str, Any]]:
    """Each parity figure with the threshold it is held to, the comparison, and whether it passes
    (`ok` is None for a figure without a threshold)."""
    if not isinstance(parity, dict):
        return []
    figures: dict[str, Any] = parity["figures"] if isinstance(parity.get("figures"), dict) else {}
    thresholds: dict[str, Any] = parity["thresholds"] if isinstance(parity.get("thresholds"), dict) else {}
    failures = [str(f) for f in parity.get("failures") or []]
    scale = figures.get("reference_scale")
    order = [m for m in thresholds if m in figures] + [m for m in figures if m not in thresholds]
    rows = []
    for metric in order:
        value = figures[metric]
        row: dict[str, Any] = {"metric": metric, "label": FIGURE_LABELS.get(metric, metric.replace("_", " ")),
                               "value": f"{value:.3f}" if metric == "label_agreement" and isinstance(value, float)
                               else num(value), "op": "", "limit": "", "note": "", "ok": None}
        limit = thresholds.get(metric)
        if isinstance(limit, (int, float)) and isinstance(value, (int, float)):
            if metric == "label_agreement":
                row.update(op="≥", limit=num(limit), ok=value >= limit)
            elif metric in RELATIVE_THRESHOLDS and isinstance(scale, (int, float)):
                row.update(op="≤", limit=num(limit * scale), ok=value <= limit * scale,
                           note=f"{num(limit)} × mean |reference|")
            else:
                row.update(op="≤", limit=num(limit), ok=value <= limit)
            if any(f.startswith(metric + " ") for f in failures):
                row["ok"] = False
        rows.append(row)
    return rows


@register.filter
def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


@register.filter
def io_tensors(io: Any, which: str) -> list[str]:
    """`input  float (?, 64)`: the engine's input or output tensors, one string each."""
    tensors = io.get(which) if isinstance(io, dict) else None
    if not isinstance(tensors, list):
        return []
    shown = []
    for tensor in tensors:
        if not isinstance(tensor, dict):
            continue
        shape = tensor.get("shape")
        dims = "(" + ", ".join("?" if d in (-1, 0, None) else str(d) for d in shape) + ")" \
            if isinstance(shape, list) else ""
        shown.append(f"{tensor.get('name', '?')} {str(tensor.get('elem_type', '')).lower()} {dims}".strip())
    return shown


@register.filter
def toolchain_line(toolchain: Any) -> str:
    if not isinstance(toolchain, dict):
        return ""
    return " · ".join(f"{name} {version}" for name, version in sorted(toolchain.items()))


@register.filter
def line_count(text: str) -> int:
    return len(text.splitlines()) if text else 0


# ---- deployments --------------------------------------------------------------------------------

@register.filter
def percent(value: Any) -> str:
    """A fraction as a percent: 0.01 -> 1%, 0.0025 -> 0.25%."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value * 100:.3g}%"


@register.filter
def ms(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value:.4g} ms"


@register.filter
def traffic_rest(weight: Any) -> int:
    return 100 - int(weight or 0)


@register.filter
def iso_ago(value: Any) -> str:
    try:
        return ago(datetime.fromisoformat(str(value)))
    except ValueError:
        return ""


VERDICT_WORDS = {"pass": "Healthy", "fail": "Failing", "inconclusive": "Not enough evidence yet", "wait": "Settling"}


@register.filter
def verdict_word(outcome: str) -> str:
    return VERDICT_WORDS.get(outcome, outcome)


@register.filter
def history_word(action: str) -> str:
    """`deployment.paused` -> `Paused`: an audit action of a deployment, in words."""
    from deployer.models import RolloutStatus

    if action == "deployment.create":
        return "Started"
    return dict(RolloutStatus.choices).get(action.removeprefix("deployment."), action)


@register.filter
def rollout_sentence(d: Any) -> str:
    """Where a rollout stands, in one sentence."""
    canary = f"v{d.version.version}"
    stable = f"v{d.previous_version.version}" if d.previous_version else None
    if d.status == "pending":
        return f"Loading {canary} onto the fleet; it takes no traffic yet."
    if d.status == "progressing":
        return (f"Canary {canary} takes {d.weight}% of traffic (step {d.step_index + 1} of {len(d.steps)}) "
                "while it is analysed.")
    if d.status == "paused":
        if d.step_index < 0:
            return "Paused before the canary took any traffic; resume to go on."
        return f"Paused with {canary} at {d.weight}% of traffic; no further step until it is resumed."
    if d.status == "awaiting_approval":
        return f"Every step passed; {canary} waits for a release manager to approve and promote it."
    if d.status == "promoted":
        return f"{canary} is now the stable version of {d.model.name}."
    if d.status == "rolled_back":
        return f"Rolled back: all traffic is on {stable} again." if stable else "Rolled back: the canary was removed."
    return str(d.status)


# ---- HIL runs -----------------------------------------------------------------------------------

HIL_HINTS = {
    "waiting": "Queued for a worker of its hardware profile; this updates by itself",
    "running": "Being measured in a Triton server of its own on a worker of its profile; this updates by itself",
    "passed": "Measured, and met its objectives, its accuracy and the champion: deployable on this profile",
    "failed": "Measured, and missed its objectives, its accuracy or the champion",
    "unstable": "Some points never settled: no verdict on timing can be given; run it again",
    "error": "Could not be measured; the log says why",
    "timed_out": "No worker of its profile took it in time",
}
HIL_VERDICT_CLASSES = {"passed": "pass", "unstable": "wait", "failed": "fail", "error": "fail", "timed_out": "fail"}
HIL_OUTCOMES = {"ok": "met", "fail": "failed", "skipped": "not judged"}


@register.filter
def hil_hint(status: str) -> str:
    return HIL_HINTS.get(status, "")


@register.filter
def hil_verdict_class(status: str) -> str:
    return HIL_VERDICT_CLASSES.get(status, "wait")


@register.filter
def hil_outcome(outcome: str) -> str:
    return HIL_OUTCOMES.get(outcome, outcome)


@register.filter
def signed_pct(value: Any) -> str:
    """A difference in percent with its sign: +3.2%, -11.0%; a dash when it could not be computed."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value:+.1f}%"


@register.filter
def figure(value: Any) -> str:
    """A count or rate as people read one: 59,760 rather than 5.976e+04; small figures as `num` gives them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return num(value)


@register.filter
def seconds_since(end: datetime | None, start: datetime | None) -> float | None:
    return (end - start).total_seconds() if end and start else None


@register.filter
def underscores_as_spaces(text: Any) -> str:
    return str(text).replace("_", " ")
