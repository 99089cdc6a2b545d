"""The approvals inbox: promotion requests (deployer/promotions.py) for release managers to decide, with the
candidate's evidence beside the champion's. Reads go through deployer.selectors, every decision through the
deployer.promotions services, which say why a person may not decide (shown on the page, never a 500). The nav's
count of requests the viewer may review now is the in-app notice to approvers (context.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from deployer import promotions
from deployer import selectors as deployer_selectors
from deployer.models import (
    SERVING_ROLLOUT_STATES,
    PromotionRequest,
    PromotionStatus,
    RolloutStatus,
)
from frontend.views import _deployment, page_needs, paginate
from registry import governance
from registry.audit import Actor
from registry.errors import RegistryError
from registry.models import PromotionPolicy
from registry.roles import Cap, roles_allow
from registry.tokens import user_roles

DECIDED_PER_PAGE = 20
PENDING_SHOWN = 200  # the pending list is not paginated: it is the work to do, and short
MAX_COMMENT = 2000

SECTION_LABELS = {
    "lineage": "Lineage", "parity": "Engine parity", "hil": "Hardware-in-the-loop", "canary": "Canary analysis",
    "traffic": "Traffic and drift", "alerts": "Open alerts",
}
OUTCOME_WORDS = {"ok": "good", "warn": "look closer", "fail": "failing", "none": "no evidence"}
FIGURES_SHOWN = 12
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")


# ---- who may do what ----------------------------------------------------------------------------------------

def _policy(req: PromotionRequest, found: dict[int, PromotionPolicy]) -> PromotionPolicy:
    return found.get(req.model_id) or PromotionPolicy(model=req.model)


def approve_problem(user: Any, roles: set[str], req: PromotionRequest, policy: PromotionPolicy) -> str:
    """Why this person cannot approve the request now, or "": who they are first (that does not change), then
    the request's state."""
    return promotions.reviewer_problem(user, roles, req, policy) or promotions.state_problem(req)


def reject_problem(user: Any, roles: set[str], req: PromotionRequest) -> str:
    if req.status != PromotionStatus.PENDING:
        return f"it is {req.get_status_display().lower()}"
    return promotions.rejecter_problem(user, roles, req)


def may_withdraw(user: Any, roles: set[str], req: PromotionRequest) -> bool:
    """Its requester, or a release manager (as the API allows), while it is pending."""
    return req.status == PromotionStatus.PENDING and not promotions.withdraw_problem(user, roles, req)


def may_break_glass(roles: set[str], req: PromotionRequest) -> bool:
    return (req.status == PromotionStatus.PENDING and roles_allow(roles, Cap.BREAK_GLASS)
            and req.deployment.status in SERVING_ROLLOUT_STATES)


def reviewable_count(user: Any) -> int:
    """Pending requests this person may approve now: the count beside the nav's Approvals link."""
    roles = user_roles(user)
    if not roles_allow(roles, Cap.DEPLOY_PROMOTE):
        return 0
    pending = list(deployer_selectors.promotion_requests().filter(
        status=PromotionStatus.PENDING, deployment__status=RolloutStatus.AWAITING_APPROVAL)[:PENDING_SHOWN])
    policies = governance.policies_for([r.model_id for r in pending])
    return sum(1 for r in pending if not promotions.reviewer_problem(user, roles, r, _policy(r, policies)))


# ---- evidence side by side ----------------------------------------------------------------------------------

def _sections(evidence: Any) -> dict[str, dict[str, Any]]:
    found = evidence.get("sections") if isinstance(evidence, dict) else None
    return {str(s.get("name")): s for s in found or [] if isinstance(s, dict)}


def _shown(value: Any) -> str:
    if isinstance(value, str) and ISO_TIME.match(value):
        try:
            return f"{datetime.fromisoformat(value).astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        except ValueError:
            return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_shown(v)}" for k, v in value.items() if v not in (None, "", {}, []))
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value)
    return str(value)


def figure_rows(figures: Any) -> list[tuple[str, str]]:
    """A section's figures as (label, text), nested ones in a line each; empty ones left out."""
    if not isinstance(figures, dict):
        return []
    rows = [(str(k).replace("_", " "), _shown(v)) for k, v in figures.items() if v not in (None, "", {}, [])]
    return [(k, v) for k, v in rows if v][:FIGURES_SHOWN]


def _link(name: str, figures: Any) -> tuple[str, str] | None:
    """Where the section's evidence lives in the UI: the HIL run, the deployment."""
    figures = figures if isinstance(figures, dict) else {}
    if name == "hil" and isinstance(figures.get("run"), int):
        return reverse("frontend:hil-detail", args=[figures["run"]]), f"HIL run #{figures['run']}"
    if name == "canary" and isinstance(figures.get("deployment"), int):
        number = figures["deployment"]
        return reverse("frontend:deployment-detail", args=[number]), f"deployment #{number}"
    return None


def _side(section: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if section is None:
        return None
    outcome = str(section.get("outcome") or "none")
    return {"outcome": outcome, "outcome_word": OUTCOME_WORDS.get(outcome, outcome),
            "words": str(section.get("words") or ""), "figures": figure_rows(section.get("figures")),
            "link": _link(name, section.get("figures"))}


def evidence_rows(req: PromotionRequest) -> list[dict[str, Any]]:
    """One row per evidence section, the candidate's and the champion's side by side (None where a side has none)."""
    mine, theirs = _sections(req.evidence), _sections(req.champion_evidence)
    names = list(mine) + [n for n in theirs if n not in mine]
    return [{"name": n, "label": SECTION_LABELS.get(n, n.replace("_", " ").capitalize()),
             "sides": [_side(mine.get(n), n), _side(theirs.get(n), n)]} for n in names]


def policy_lines(policy: PromotionPolicy) -> list[str]:
    """The policy in words: how many approvals, from whom."""
    words = governance.policy_words(policy)
    n = words["approvals_required"]
    lines = [f"{n} approval{'s' if n != 1 else ''} before {policy.model.name} gets a new champion"
             if words["protected"] else f"{policy.model.name} is not protected: its rollouts need no approval "
                                          "unless started with one required"]
    lines.append("approvals count from release managers only" if words["release_manager_required"]
                 else "approvals count from release managers and administrators")
    lines.append("the version's author may approve it" if words["author_may_approve"]
                 else "never from the version's author (four eyes)")
    lines.append("the requester may approve it" if words["requester_may_approve"]
                 else "never from the person who requested the promotion")
    lines.append("never from CI or service accounts; one rejection (with a comment) rolls the canary back; "
                 "an administrator may break glass with a written reason")
    return lines


# ---- pages --------------------------------------------------------------------------------------------------

def _annotate(request: HttpRequest, found: list[PromotionRequest]) -> list[PromotionRequest]:
    """Each request with its approvals, the number needed, and why the viewer may not approve it ("" = may)."""
    roles = user_roles(request.user)
    policies = governance.policies_for([r.model_id for r in found])
    for r in found:
        policy = _policy(r, policies)
        r.approvals_given = len(promotions.approvals(r))  # type: ignore[attr-defined]
        r.approvals_required = policy.approvals_required  # type: ignore[attr-defined]
        r.your_problem = approve_problem(request.user, roles, r, policy)  # type: ignore[attr-defined]
    return found


@require_GET
@page_needs(Cap.DEPLOY_READ)
def approval_list(request: HttpRequest) -> HttpResponse:
    found = deployer_selectors.promotion_requests().order_by("-created_at", "-id")
    pending = _annotate(request, list(found.filter(status=PromotionStatus.PENDING)[:PENDING_SHOWN]))
    page = paginate(request, found.exclude(status=PromotionStatus.PENDING), DECIDED_PER_PAGE)
    _annotate(request, list(page.object_list))
    yours = sum(1 for r in pending if not getattr(r, "your_problem", ""))
    context = {"pending": pending, "page": page, "yours": yours}
    return render(request, "frontend/approval_list.html", context)


def _request(req_id: int) -> PromotionRequest:
    found = (deployer_selectors.promotion_requests().select_related("deployment__previous_version", "version")
             .filter(pk=req_id).first())
    if found is None:
        raise Http404(f"no promotion request {req_id}")
    return found


def _detail(request: HttpRequest, req: PromotionRequest, *, status: int = 200, error: str = "",
            posted: dict[str, str] | None = None) -> HttpResponse:
    roles = user_roles(request.user)
    policy = governance.promotion_policy(req.model)
    person = promotions.reviewer_problem(request.user, roles, req, policy)
    context = {
        "req": req, "d": req.deployment, "policy": policy, "policy_lines": policy_lines(policy),
        "approvals_given": len(promotions.approvals(req)), "approvals_required": policy.approvals_required,
        "reviews": list(req.reviews.all()),  # prefetched, in the order they were given
        "rows": evidence_rows(req), "champion_version": (req.champion_evidence or {}).get("version"),
        "approve_problem": person or promotions.state_problem(req),
        "reject_problem": reject_problem(request.user, roles, req),
        # Offered to its requester; a release manager may withdraw one too (as through the API), but rejects instead.
        "may_withdraw": may_withdraw(request.user, roles, req) and req.requested_by_id == request.user.pk,
        "may_break_glass": may_break_glass(roles, req),
        "min_break_glass": promotions.MIN_BREAK_GLASS_CHARS, "error": error, "posted": posted or {},
    }
    return render(request, "frontend/approval_detail.html", context, status=status)


@require_GET
@page_needs(Cap.DEPLOY_READ)
def approval_detail(request: HttpRequest, req_id: int) -> HttpResponse:
    return _detail(request, _request(req_id))


def _text(request: HttpRequest, field: str) -> str:
    return str(request.POST.get(field, "")).strip()


def _too_long(text: str, what: str) -> None:
    if len(text) > MAX_COMMENT:
        raise promotions.PromotionError(f"the {what} is {len(text)} characters long; {MAX_COMMENT} at most")


def _approve(request: HttpRequest, req: PromotionRequest) -> str:
    comment = _text(request, "comment")
    _too_long(comment, "comment")
    done = promotions.promotion_approve(Actor(request.user, "web"), user_roles(request.user), req.pk, comment)
    if done.status == PromotionStatus.APPROVED:
        return (f"Approved: v{req.version.version} of {req.model.name} is the champion now "
                f"(deployment #{req.deployment_id} promoted).")
    given, needed = len(promotions.approvals(done)), governance.promotion_policy(req.model).approvals_required
    return f"Your approval is recorded: {given} of {needed}; the promotion waits for {needed - given} more."


def _reject(request: HttpRequest, req: PromotionRequest) -> str:
    comment = _text(request, "comment")
    _too_long(comment, "comment")
    promotions.promotion_reject(Actor(request.user, "web"), user_roles(request.user), req.pk, comment)
    return f"Rejected: the canary of {req.model.name} v{req.version.version} is being rolled back."


def _withdraw(request: HttpRequest, req: PromotionRequest) -> str:
    why = _text(request, "comment")
    _too_long(why, "reason")
    promotions.promotion_cancel(Actor(request.user, "web"), user_roles(request.user), req.pk, why or "withdrawn")
    return (f"Withdrew promotion request #{req.pk}. The rollout goes on; a new request is filed once it waits for "
            "approval again.")


def _break_glass(request: HttpRequest, req: PromotionRequest) -> str:
    reason = _text(request, "reason")
    _too_long(reason, "reason")
    promotions.promotion_break_glass(Actor(request.user, "web"), user_roles(request.user), req.deployment, reason)
    return (f"Broke glass: v{req.version.version} of {req.model.name} is the champion now. The reason is kept on "
            "the request and in the audit log, and announced.")


APPROVAL_ACTIONS = {"approve": _approve, "reject": _reject, "withdraw": _withdraw, "break-glass": _break_glass}
ACTION_WORDS = {"approve": "approve", "reject": "reject", "withdraw": "withdraw", "break-glass": "break glass for"}


@require_POST
@page_needs(Cap.DEPLOY_READ)
def approval_action(request: HttpRequest, req_id: int, action: str) -> HttpResponse:
    """Approve, reject, withdraw or break glass through deployer.promotions; a refusal is shown on the request's
    page with what was typed kept, and the status code the service gave."""
    if action not in APPROVAL_ACTIONS:
        raise Http404(f"no action {action!r}")
    req = _request(req_id)
    try:
        done = APPROVAL_ACTIONS[action](request, req)
    except RegistryError as exc:
        return _detail(request, _request(req_id), status=exc.status_code,
                       error=f"Could not {ACTION_WORDS[action]} promotion request #{req.pk}: {exc}",
                       posted={"action": action, "comment": _text(request, "comment"),
                               "reason": _text(request, "reason")})
    messages.success(request, done)
    return redirect("frontend:approval-detail", req_id=req.pk)


@require_POST
@page_needs(Cap.PROMOTION_REQUEST)
def approval_request(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """Ask, from a deployment's page, that its version become the champion (before the rollout waits for approval,
    or again after a request was withdrawn)."""
    d = _deployment(deployment_id)
    try:
        req = promotions.promotion_request(Actor(request.user, "web"), d, _text(request, "reason")[:MAX_COMMENT])
    except RegistryError as exc:
        messages.error(request, f"Could not request the promotion of {d.model.name} v{d.version.version}: {exc}")
        return redirect("frontend:deployment-detail", deployment_id=d.pk)
    messages.success(request, f"Requested the promotion of {d.model.name} v{d.version.version}: release managers "
                              "see it in their approvals inbox.")
    return redirect("frontend:approval-detail", req_id=req.pk)


