"""Server-rendered pages. Each page names the capability it needs (registry.roles is the one table of
who has it); reads go through registry.selectors, writes through registry services with a web Actor.
Live parts are htmx partials that poll only while something is still changing."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.files.uploadedfile import UploadedFile
from django.core.paginator import Page, Paginator
from django.db.models import Case, Exists, OuterRef, Subquery, Value, When
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render, resolve_url
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from deployer import champions, promotions
from deployer import selectors as deployer_selectors
from deployer import services as deploy_services
from deployer.models import (
    ACTIVE_ROLLOUT_STATES,
    SERVING_ROLLOUT_STATES,
    Deployment,
    Endpoint,
    PromotionRequest,
    PromotionStatus,
    RolloutMode,
    RolloutStatus,
)
from frontend import hil as hil_evidence
from frontend.forms import (
    AlertResolveForm,
    AlertSilenceForm,
    AuditFilterForm,
    DeploymentForm,
    ReceiverForm,
    RegisterForm,
    TokenForm,
)
from monitoring import alerts as alert_services
from monitoring import notify
from monitoring import selectors as monitoring_selectors
from monitoring.models import Alert, AlertStatus, DriftCheck, DriftReport, Receiver
from monitoring.selectors import policy_for
from pipelines import hardware
from pipelines import selectors as pipeline_selectors
from pipelines.models import ACTIVE_HIL_STATES, TERMINAL_BUILD_STATES, BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import engine_builds_request, hil_runs_request, hil_waiting_words, planned_variants
from registry import archives, governance, selectors, services
from registry.audit import Actor
from registry.models import ApiToken, AuditEvent, ModelVersion, RegisteredModel, VersionStatus
from registry.roles import CAPABILITIES, Cap, Role, roles_allow
from registry.tokens import TokenError, token_create, token_revoke, user_roles

MODELS_PER_PAGE = 25
VERSIONS_PER_PAGE = 20
AUDIT_PER_PAGE = 50
TOKENS_PER_PAGE = 50
POLL_SECONDS = 2

View = Callable[..., HttpResponseBase]


def is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def page_needs(capability: str) -> Callable[[View], View]:
    """Signed-in people holding `capability` only. Anonymous people go to the login page (an htmx poll
    is told to send the whole page there); others get a 403 page that says what is missing."""

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if not request.user.is_authenticated:
                if is_htmx(request):
                    page = request.headers.get("HX-Current-URL") or request.get_full_path()
                    response = HttpResponse(status=204)
                    response["HX-Redirect"] = f"{resolve_url(settings.LOGIN_URL)}?next={quote(page)}"
                    return response
                return redirect_to_login(request.get_full_path())
            if not roles_allow(user_roles(request.user), capability):
                return forbidden(request, capability)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def forbidden(request: HttpRequest, capability: str) -> HttpResponse:
    labels = dict(Role.choices)
    context = {
        "capability": capability,
        "capability_label": Cap(capability).label,
        "granted_by": sorted(labels.get(role, role) for role in CAPABILITIES[capability]),
    }
    return render(request, "frontend/403.html", context, status=403)


def paginate(request: HttpRequest, items: Any, per_page: int) -> Page:
    return Paginator(items, per_page).get_page(request.GET.get("page"))


# ---- models -------------------------------------------------------------------------------------

MODEL_SORTS = {"name": "Name", "-updated_at": "Recently updated", "-created_at": "Newest"}


@require_GET
@page_needs(Cap.MODEL_READ)
def model_list(request: HttpRequest) -> HttpResponse:
    search = request.GET.get("q", "").strip()
    tag = request.GET.get("tag", "").strip()
    sort = request.GET.get("sort", "name")
    if sort not in MODEL_SORTS:
        sort = "name"
    latest_status = ModelVersion.objects.filter(model=OuterRef("pk"), version=OuterRef("latest_version"))
    models = selectors.model_list(search=search, tag=tag, ordering=sort).annotate(
        latest_status=Subquery(latest_status.values("status")[:1])
    )
    context = {
        "page": paginate(request, models, MODELS_PER_PAGE),
        "search": search, "tag": tag, "sort": sort, "sorts": MODEL_SORTS,
        "filtered": bool(search or tag),
    }
    return render(request, "frontend/model_list.html", context)


def _versions_context(request: HttpRequest, model: RegisteredModel) -> dict[str, Any]:
    status = request.GET.get("status", "")
    if status not in VersionStatus.values:
        status = ""
    page = paginate(request, selectors.version_list(model, status=status), VERSIONS_PER_PAGE)
    return {
        "model": model, "page": page, "status_filter": status,
        "status_counts": selectors.version_status_counts(model), "statuses": VersionStatus.choices,
        "polling": any(v.status == VersionStatus.VALIDATING for v in page.object_list),
        "poll_seconds": POLL_SECONDS,
    }


@require_GET
@page_needs(Cap.MODEL_READ)
def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    model = get_object_or_404(RegisteredModel, name=name)
    context = _versions_context(request, model)
    context["endpoint"] = Endpoint.objects.filter(model=model).select_related("stable_version").first()
    context["rollout"] = deployer_selectors.active_rollout(model)
    context.update(_monitoring_context(model))
    return render(request, "frontend/model_detail.html", context)


@require_GET
@page_needs(Cap.MODEL_READ)
def model_version_rows(request: HttpRequest, name: str) -> HttpResponse:
    """The versions table body alone, for the model page's htmx poll; the status counts above the
    table come along as an htmx partial so they agree with the rows."""
    model = get_object_or_404(RegisteredModel, name=name)
    context = _versions_context(request, model)
    context["oob_filters"] = True
    return render(request, "frontend/_version_rows.html", context)


# ---- versions -----------------------------------------------------------------------------------

def _version(name: str, number: int) -> ModelVersion:
    model = get_object_or_404(RegisteredModel, name=name)
    version = selectors.version_get(model, number)
    if version is None:
        raise Http404(f"model {name!r} has no version {number}")
    return version


def _status_context(version: ModelVersion) -> dict[str, Any]:
    return {"version": version, "model": version.model, "poll_seconds": POLL_SECONDS,
            "polling": version.status == VersionStatus.VALIDATING}


def _version_page(request: HttpRequest, found: ModelVersion, status: int = 200,
                  engines_error: str = "") -> HttpResponse:
    context = _status_context(found)
    signature = found.signature if isinstance(found.signature, dict) else {}
    context.update({
        "signature_inputs": signature.get("inputs"),
        "signature_outputs": signature.get("outputs"),
        "signature_params": signature.get("params"),
        **_engines_context(found, engines_error),
    })
    return render(request, "frontend/version_detail.html", context, status=status)


@require_GET
@page_needs(Cap.MODEL_READ)
def version_detail(request: HttpRequest, name: str, version: int) -> HttpResponse:
    return _version_page(request, _version(name, version))


@require_GET
@page_needs(Cap.MODEL_READ)
def version_status(request: HttpRequest, name: str, version: int) -> HttpResponse:
    """The version page's status panel alone, for its htmx poll."""
    return render(request, "frontend/_version_status.html", _status_context(_version(name, version)))


# ---- engine builds ------------------------------------------------------------------------------

def _engines_context(version: ModelVersion, error: str = "") -> dict[str, Any]:
    """The version page's Engines section: one entry per build, and what the build button would do.
    It polls while a build is queued or running, and while the version validates (its builds are
    asked for the moment it becomes ready)."""
    builds = list(EngineBuild.objects.filter(version=version).select_related("reused_from__version__model"))
    latest_runs = pipeline_selectors.hil_runs_latest(b for b in builds if b.status == BuildStatus.SUCCEEDED)
    for build in builds:
        build.hil_latest = latest_runs.get(build.pk, [])  # type: ignore[attr-defined]
    existing = {(b.target, b.precision, b.runtime) for b in builds}
    missing = [variant for variant in planned_variants() if variant not in existing]
    failed = sum(1 for b in builds if b.status == BuildStatus.FAILED)
    action = ""  # nothing to ask for: every planned variant is built or on its way
    if version.status == VersionStatus.READY:
        if failed:
            action = "Rebuild failed"
        elif missing:
            action = "Build missing engines" if builds else "Build engines"
    return {
        "builds": builds, "build_action": action, "engines_error": error,
        "engines_polling": version.status == VersionStatus.VALIDATING
        or any(b.status not in TERMINAL_BUILD_STATES for b in builds)
        or any(r.status in ACTIVE_HIL_STATES for runs in latest_runs.values() for r in runs),
        "poll_seconds": POLL_SECONDS, "version": version, "model": version.model,
    }


@require_GET
@page_needs(Cap.MODEL_READ)
def version_engines(request: HttpRequest, name: str, version: int) -> HttpResponse:
    """The version page's Engines section alone, for its htmx poll."""
    return render(request, "frontend/_engines.html", _engines_context(_version(name, version)))


@require_POST
@page_needs(Cap.MODEL_REGISTER)
def version_engines_request(request: HttpRequest, name: str, version: int) -> HttpResponse:
    """Ask for the version's engines: missing variants are queued, failed ones queued again, the rest
    left as they are (asking twice changes nothing)."""
    found = _version(name, version)
    before = {b.pk: b.status for b in EngineBuild.objects.filter(version=found)}
    try:
        builds = engine_builds_request(Actor(request.user, "web"), found)
    except services.RegistryError as exc:
        return _version_page(request, found, status=exc.status_code, engines_error=str(exc))
    queued = [b.variant for b in builds if b.pk not in before or before[b.pk] == BuildStatus.FAILED]
    label = f"{found.model.name} version {found.version}"
    if queued:
        messages.success(request, f"Queued {len(queued)} engine build{'s' if len(queued) != 1 else ''} for {label}: "
                                  f"{', '.join(queued)}. This page follows them as they run.")
    else:
        messages.info(request, f"Nothing to build: every engine of {label} is already built or being built.")
    url = resolve_url("frontend:version-detail", name=found.model.name, version=found.version)
    return redirect(f"{url}#engines")


@require_POST
@page_needs(Cap.MODEL_REGISTER)
def build_hil_request(request: HttpRequest, name: str, version: int, build_id: int) -> HttpResponse:
    """Ask for HIL runs of a kept engine on its profiles; a profile where one is already waiting or running keeps
    that one (asking twice changes nothing). The service writes the audit rows."""
    found = _version(name, version)
    build = get_object_or_404(EngineBuild.objects.select_related("version__model"), pk=build_id, version=found)
    before = set(HilRun.objects.filter(build=build, status__in=ACTIVE_HIL_STATES).values_list("pk", flat=True))
    try:
        runs = hil_runs_request(Actor(request.user, "web"), build)
    except services.RegistryError as exc:
        messages.error(request, f"No HIL run was asked for {build.variant}: {exc}")
    else:
        new = [r for r in runs if r.pk not in before]
        kept = [r for r in runs if r.pk in before]
        said = [f"run {r.pk} on {r.profile} waits for a worker of its profile" for r in new]
        said += [f"run {r.pk} on {r.profile} is already {r.status}" for r in kept]
        (messages.success if new else messages.info)(
            request, f"HIL of {build.variant} ({found.model.name} v{found.version}): {'; '.join(said)}.")
    url = resolve_url("frontend:version-detail", name=found.model.name, version=found.version)
    return redirect(f"{url}#build-{build.pk}")


# ---- HIL runs -----------------------------------------------------------------------------------

def _hil_run(run_id: int) -> HilRun:
    run = pipeline_selectors.hil_run_get(run_id)
    if run is None:
        raise Http404(f"no HIL run {run_id}")
    return run


def _hil_context(run: HilRun) -> dict[str, Any]:
    """A run's page: while it waits or runs, why it waits and its log (polled); once finished, its evidence."""
    active = run.status in ACTIVE_HIL_STATES
    return {
        "run": run, "build": run.build, "version": run.build.version, "model": run.build.version.model,
        "waiting_words": hil_waiting_words(run) if run.status == HilStatus.WAITING else "",
        "polling": active, "poll_seconds": POLL_SECONDS,
        **({} if active else hil_evidence.evidence(run)),
    }


@require_GET
@page_needs(Cap.MODEL_READ)
def hil_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    return render(request, "frontend/hil_detail.html", _hil_context(_hil_run(run_id)))


@require_GET
@page_needs(Cap.MODEL_READ)
def hil_live(request: HttpRequest, run_id: int) -> HttpResponse:
    """The run page's live part alone, for its poll while the run waits or runs. Once it has finished the page
    is loaded again whole: the evidence (charts, table) replaces the progress."""
    run = _hil_run(run_id)
    if run.status not in ACTIVE_HIL_STATES:
        response = HttpResponse(status=204)
        response["HX-Refresh"] = "true"
        return response
    return render(request, "frontend/_hil_live.html", _hil_context(run))


# ---- register -----------------------------------------------------------------------------------

@contextmanager
def _on_disk(upload: UploadedFile) -> Iterator[Path]:
    """The uploaded file as a path (Django already keeps large uploads in a temporary file)."""
    temporary = getattr(upload, "temporary_file_path", None)
    if temporary is not None:
        yield Path(temporary())
        return
    fd, name = tempfile.mkstemp(prefix="web-upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in upload.chunks():
                fh.write(chunk)
        yield Path(name)
    finally:
        os.unlink(name)


def _register(request: HttpRequest, form: RegisterForm) -> ModelVersion:
    data = form.cleaned_data
    actor = Actor(request.user, "web")
    if data.get("archive"):
        with _on_disk(data["archive"]) as path:
            return services.version_register_from_archive(actor, data["name"], path, data["description"],
                                                           data["tags"])
    return services.version_register_from_uri(actor, data["name"], data["source"], data["description"], data["tags"])


@require_http_methods(["GET", "POST"])
@page_needs(Cap.MODEL_REGISTER)
def register(request: HttpRequest) -> HttpResponse:
    status = 200
    if request.method == "POST":
        form = RegisterForm(request.POST, request.FILES)
        status = 400
        if form.is_valid():
            try:
                version = _register(request, form)
            except (archives.ArchiveError, archives.PolicyError, services.RegistryError) as exc:
                form.add_error(None, str(exc))
                status = 422
            else:
                messages.success(request, f"Registered {version.model.name} version {version.version}. "
                                          "It is being validated in an isolated worker.")
                return redirect("frontend:version-detail", name=version.model.name, version=version.version)
    else:
        form = RegisterForm(initial={"name": request.GET.get("model", "")})
    context = {
        "form": form,
        "tracking_uri": request.build_absolute_uri("/").rstrip("/"),
        "max_upload_mb": cast(int, settings.PLATFORM["MAX_UPLOAD_BYTES"]) // (1024 * 1024),
    }
    return render(request, "frontend/register.html", context, status=status)


# ---- tokens -------------------------------------------------------------------------------------

@require_http_methods(["GET", "POST"])
@page_needs(Cap.MODEL_READ)
def tokens(request: HttpRequest) -> HttpResponse:
    mine = sorted(user_roles(request.user))
    form = TokenForm(request.POST if request.method == "POST" else None, roles=mine)
    issued = None
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                issued = token_create(Actor(request.user, "web"), request.user, data["name"], list(data["roles"]),
                                      expires_in_days=data["expires_in_days"])
            except TokenError as exc:
                form.add_error(None, str(exc))
            else:
                status = 201
                form = TokenForm(roles=mine)
    context = {
        "form": form, "issued": issued,
        "page": paginate(request, ApiToken.objects.filter(user=cast(Any, request.user)).order_by("-created_at"),
                         TOKENS_PER_PAGE),
        "tracking_uri": request.build_absolute_uri("/").rstrip("/"),
    }
    response = render(request, "frontend/tokens.html", context, status=status)
    if issued is not None:
        response["Cache-Control"] = "no-store"  # the raw token is on this page, once
    return response


@require_POST
@page_needs(Cap.MODEL_READ)
def token_revoke_view(request: HttpRequest, token_id: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=token_id, user=cast(Any, request.user))
    if token.revoked_at is None:
        token_revoke(Actor(request.user, "web"), token)
        messages.success(request, f"Revoked token “{token.name}” ({token.prefix}…). Anything using it is now refused.")
    return redirect("frontend:tokens")


# ---- audit --------------------------------------------------------------------------------------

@require_GET
@page_needs(Cap.AUDIT_READ)
def audit(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    filters = {"action": "", "target": "", "actor": ""}
    if form.is_valid():
        filters.update({key: str(value).strip() for key, value in form.cleaned_data.items() if value})
    context = {
        "form": form, "filters": filters, "filtered": any(filters.values()),
        "page": paginate(request, selectors.audit_list(**filters), AUDIT_PER_PAGE),
    }
    return render(request, "frontend/audit.html", context)


# ---- hardware targets ---------------------------------------------------------------------------

@require_GET
@page_needs(Cap.MODEL_READ)
def targets(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/targets.html", {"targets": hardware.targets_overview(),
                                                     "heartbeat_s": hardware.heartbeat_s()})


# ---- deployments --------------------------------------------------------------------------------

DEPLOYMENTS_PER_PAGE = 20
CHART_POINTS = 300  # the last 10 minutes at the default 2 s analysis tick


def _deployment(deployment_id: int) -> Deployment:
    return get_object_or_404(deployer_selectors.deployments(), pk=deployment_id)


def _deployment_list_context(request: HttpRequest) -> dict[str, Any]:
    show = "active" if request.GET.get("show") == "active" else "all"
    active = list(deployer_selectors.deployments().filter(status__in=ACTIVE_ROLLOUT_STATES))
    canary_of = {d.model_id: d for d in active}
    endpoints = [(ep, canary_of.get(ep.model_id))
                 for ep in Endpoint.objects.select_related("model", "stable_version").order_by("model__name")]
    found = deployer_selectors.deployments().order_by("-created_at", "-id")
    if show == "active":
        found = found.filter(status__in=ACTIVE_ROLLOUT_STATES)
    return {
        "endpoints": endpoints, "page": paginate(request, found, DEPLOYMENTS_PER_PAGE), "show": show,
        "active_count": len(active), "total_count": Deployment.objects.count(),
        "polling": bool(active), "poll_seconds": POLL_SECONDS,
    }


@require_GET
@page_needs(Cap.DEPLOY_READ)
def deployment_list(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/deployment_list.html", _deployment_list_context(request))


@require_GET
@page_needs(Cap.DEPLOY_READ)
def deployment_list_live(request: HttpRequest) -> HttpResponse:
    """The deployments page's live part alone (what serves each model, the deployments), for its poll."""
    return render(request, "frontend/_deployments_live.html", _deployment_list_context(request))


def _history(d: Deployment) -> list[AuditEvent]:
    return list(deployer_selectors.deployment_history(d))[::-1]  # newest first


def _promotion(request: HttpRequest, d: Deployment) -> dict[str, Any]:
    """What the deployment page says about promotion: whether the model is protected (no bare promote button
    then), its pending request (or the newest one), and whether this person may file one."""
    policy = governance.promotion_policy(d.model)
    protected = governance.is_protected(policy)
    latest = PromotionRequest.objects.filter(deployment=d).first()  # newest first
    # A deployment has one pending request at most, and no request is filed while one is pending: the newest.
    pending = latest if latest is not None and latest.status == PromotionStatus.PENDING else None
    return {
        "protected": protected, "pending": pending, "latest": latest,
        "may_request": (protected and pending is None and d.status in SERVING_ROLLOUT_STATES
                        and d.mode != RolloutMode.RESTORE
                        and roles_allow(user_roles(request.user), Cap.PROMOTION_REQUEST)),
        "approvals_given": len(promotions.approvals(pending)) if pending is not None else 0,
        "approvals_required": policy.approvals_required,
    }


def _actions(request: HttpRequest, d: Deployment, protected: bool) -> list[dict[str, str]]:
    """The buttons this person may press on this deployment now, each with its confirm question (no promote for a
    protected model: its promotion is approved in the approvals inbox)."""
    mine = user_roles(request.user)
    label = f"{d.model.name} v{d.version.version}"
    shown = []
    for name, (capability, _, _) in DEPLOYMENT_ACTIONS.items():
        if not roles_allow(mine, capability) or d.status not in ACTION_STATES[name]:
            continue
        if name == "promote" and (d.step_index < 0 or protected):
            continue  # not taking traffic yet, or protected: the service would refuse
        text = {
            "pause": ("Pause", f"Pause the rollout of {label}? The canary keeps its current weight and is still "
                               "rolled back if it fails."),
            "resume": ("Resume", f"Resume the rollout of {label}?"),
            "promote": ("Approve and promote" if d.status == RolloutStatus.AWAITING_APPROVAL else "Promote now",
                        f"Make {label} the stable version now? All traffic moves to it."),
            "abort": ("Abort and roll back", f"Abort the rollout of {label}? All traffic goes back to the stable "
                                             "version and the canary is unloaded."),
        }[name]
        shown.append({"name": name, "label": text[0], "confirm": text[1]})
    return shown


def _deployment_context(request: HttpRequest, d: Deployment) -> dict[str, Any]:
    steps = []
    for i, weight in enumerate(d.steps):
        if d.status == RolloutStatus.PROMOTED or i < d.step_index:
            state = "done"
        elif i == d.step_index:
            state = "failed" if d.status == RolloutStatus.ROLLED_BACK else "current" if d.is_active else "done"
        else:
            state = "pending"
        steps.append({"weight": weight, "state": state})
    promotion = _promotion(request, d)
    return {
        "d": d, "steps": steps, "actions": _actions(request, d, promotion["protected"]), "history": _history(d),
        "promotion": promotion,
        "analysis": d.analysis if isinstance(d.analysis, dict) else {},
        "polling": d.is_active, "poll_seconds": POLL_SECONDS,
    }


@require_GET
@page_needs(Cap.DEPLOY_READ)
def deployment_detail(request: HttpRequest, deployment_id: int) -> HttpResponse:
    return render(request, "frontend/deployment_detail.html", _deployment_context(request, _deployment(deployment_id)))


@require_GET
@page_needs(Cap.DEPLOY_READ)
def deployment_live(request: HttpRequest, deployment_id: int) -> HttpResponse:
    """The deployment page's live part alone (state, steps, analysis, buttons), for its poll; the history
    below the charts comes along as an htmx partial."""
    context = _deployment_context(request, _deployment(deployment_id))
    context["oob_history"] = True
    return render(request, "frontend/_deployment_live.html", context)


@require_GET
@page_needs(Cap.DEPLOY_READ)
def deployment_points(request: HttpRequest, deployment_id: int) -> JsonResponse:
    """The charts' data: one row per analysis window, oldest first, and the thresholds to draw."""
    d = _deployment(deployment_id)
    points = [{f: getattr(p, f) for f in deployer_selectors.POINT_FIELDS}
              for p in deployer_selectors.recent_points(d, CHART_POINTS)]
    for point in points:
        point["at"] = point["at"].timestamp()
    return JsonResponse({
        "active": d.is_active, "poll_seconds": POLL_SECONDS, "max_p99_ms": d.max_p99_ms,
        "max_error_rate": d.max_error_rate, "canary": f"v{d.version.version}",
        "stable": f"v{d.previous_version.version}" if d.previous_version else None, "points": points,
    })


DEPLOYMENT_ACTIONS: dict[str, tuple[str, Callable[[Actor, Deployment], Deployment], str]] = {
    "pause": (Cap.DEPLOY_CONTROL, deploy_services.deployment_pause, "Paused"),
    "resume": (Cap.DEPLOY_CONTROL, deploy_services.deployment_resume, "Resumed"),
    "promote": (Cap.DEPLOY_PROMOTE, deploy_services.deployment_promote, "Promoted"),
    "abort": (Cap.DEPLOY_CONTROL, deploy_services.deployment_abort, "Aborted"),
}
# When each button is offered (the state machine in deployer.models allows these moves).
ACTION_STATES: dict[str, set[str]] = {
    "pause": {RolloutStatus.PENDING, RolloutStatus.PROGRESSING, RolloutStatus.AWAITING_APPROVAL},
    "resume": {RolloutStatus.PAUSED},
    "promote": {RolloutStatus.PROGRESSING, RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL},
    "abort": set(ACTIVE_ROLLOUT_STATES),
}


@require_POST
@page_needs(Cap.DEPLOY_READ)
def deployment_action(request: HttpRequest, deployment_id: int, action: str) -> HttpResponse:
    if action not in DEPLOYMENT_ACTIONS:
        raise Http404(f"no action {action!r}")
    capability, act, done = DEPLOYMENT_ACTIONS[action]
    if not roles_allow(user_roles(request.user), capability):
        return forbidden(request, capability)
    d = _deployment(deployment_id)
    label = f"the rollout of {d.model.name} v{d.version.version}"
    try:
        act(Actor(request.user, "web"), d)
    except services.RegistryError as exc:
        messages.error(request, f"Could not {action} {label}: {exc}")
    else:
        messages.success(request, f"{done} {label}.")
    return redirect("frontend:deployment-detail", deployment_id=d.pk)


@require_http_methods(["GET", "POST"])
@page_needs(Cap.DEPLOY_CREATE)
def deployment_new(request: HttpRequest) -> HttpResponse:
    status = 200
    may_override = roles_allow(user_roles(request.user), Cap.HIL_OVERRIDE)
    hil_refused = None
    if request.method == "POST":
        form = DeploymentForm(request.POST, hil_override=may_override)
        status = 400
        if form.is_valid():
            model = RegisteredModel.objects.filter(name=form.cleaned_data["model"]).first()
            if model is None:
                form.add_error("model", f"There is no model named “{form.cleaned_data['model']}”.")
            else:
                try:
                    d = deploy_services.deployment_create(Actor(request.user, "web"), model,
                                                          form.cleaned_data["version"], **form.limits())
                except services.RegistryError as exc:
                    form.add_error(None, str(exc))
                    status = exc.status_code
                    if isinstance(exc, deploy_services.HilGateError):  # the gate's refusal: say where to get a run
                        hil_refused = model.versions.filter(version=form.cleaned_data["version"]).first()
                else:
                    messages.success(request, f"Started deploying {model.name} v{d.version.version}: the canary "
                                              "is being loaded. This page follows it.")
                    return redirect("frontend:deployment-detail", deployment_id=d.pk)
    else:
        form = DeploymentForm(initial={"model": request.GET.get("model", ""), "version": request.GET.get("version")},
                              hil_override=may_override)
    context = {"form": form, "hil_refused": hil_refused, "model_names": list(RegisteredModel.objects.order_by("name")
                                                 .values_list("name", flat=True)[:500])}
    return render(request, "frontend/deployment_new.html", context, status=status)


# ---- alerts -------------------------------------------------------------------------------------

ALERTS_PER_PAGE = 25
ALERT_FILTERS = {"open": "Open", "all": "All", "resolved": "Resolved"}
# Open alerts first: firing, then acknowledged; then resolved ones.
ALERT_ORDER = Case(When(status=AlertStatus.FIRING, then=Value(0)),
                   When(status=AlertStatus.ACKNOWLEDGED, then=Value(1)), default=Value(2))


def alerts_inbox(status: str = "open", model: str = "") -> Any:
    found = Alert.objects.select_related("model", "version", "owner")
    if status == "open":
        found = found.exclude(status=AlertStatus.RESOLVED)
    elif status == "resolved":
        found = found.filter(status=AlertStatus.RESOLVED)
    if model:
        found = found.filter(model__name=model)
    return found.order_by(ALERT_ORDER, "-last_seen_at", "-pk")


def _monitoring_context(model: RegisteredModel) -> dict[str, Any]:
    """The model page's Monitoring section: its open alerts, each version's latest drift check, its policy."""
    latest = (DriftCheck.objects.filter(version__model=model).select_related("version")
              .annotate(has_report=Exists(DriftReport.objects.filter(drift_check=OuterRef("pk"))))
              .order_by("version_id", "-created_at", "-pk").distinct("version_id"))
    return {
        "open_alerts": list(alerts_inbox("open").filter(model=model)),
        "drift_checks": sorted(latest, key=lambda c: -c.version.version),
        "policy": policy_for(model.pk),
    }


@require_GET
@page_needs(Cap.ALERT_READ)
def alert_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "open")
    if status not in ALERT_FILTERS:
        status = "open"
    model = request.GET.get("model", "").strip()
    context = {
        "page": paginate(request, alerts_inbox(status, model), ALERTS_PER_PAGE),
        "status_filter": status, "status_filters": ALERT_FILTERS, "model_filter": model,
        "model_names": list(RegisteredModel.objects.filter(alerts__isnull=False).distinct().order_by("name")
                            .values_list("name", flat=True)[:500]),
        "filtered": status != "open" or bool(model),
    }
    return render(request, "frontend/alert_list.html", context)


def _alert(alert_id: int) -> Alert:
    return get_object_or_404(Alert.objects.select_related("model", "version", "owner"), pk=alert_id)


@require_GET
@page_needs(Cap.ALERT_READ)
def alert_detail(request: HttpRequest, alert_id: int) -> HttpResponse:
    alert = _alert(alert_id)
    evidence = alert.evidence if isinstance(alert.evidence, dict) else {}
    burn_rates = evidence.get("burn_rates")
    report = evidence.get("report")
    context = {
        "alert": alert,
        "drifted_columns": [c for c in evidence.get("drifted_columns") or [] if isinstance(c, dict)],
        "burn_rates": sorted(burn_rates.items()) if isinstance(burn_rates, dict) else [],
        # Only the platform's own report URL is framed (the evidence is data; it never names another site).
        "report_url": report if isinstance(report, str) and report.startswith("/api/v1/models/") else "",
        "silenced": bool(alert.silenced_until and alert.silenced_until > timezone.now()),
        "history": AuditEvent.objects.filter(target_type="alert", target_id=str(alert.pk)).order_by("-at", "-id"),
        "resolve_form": AlertResolveForm(), "silence_form": AlertSilenceForm(),
    }
    if alert.status != AlertStatus.RESOLVED:
        context["rollback_to"], context["rollback_unavailable"] = champions.rollback_offer(alert)
    return render(request, "frontend/alert_detail.html", context)


ALERT_CHART_HOURS = 6  # the longest SLO window: the charts show what the burn rates were computed on


@require_GET
@page_needs(Cap.ALERT_READ)
def alert_series(request: HttpRequest, alert_id: int) -> JsonResponse:
    """The alert page's charts: its version's latency and error figures (per SLO sampling interval) and its
    drift checks over the last hours, with the objectives to draw."""
    alert = _alert(alert_id)
    policy = policy_for(alert.model_id)
    since = timezone.now() - timedelta(hours=ALERT_CHART_HOURS)
    step = float(settings.PLATFORM["SLO_SAMPLE_S"])
    return JsonResponse({
        "version": f"v{alert.version.version}", "step_s": step, "latency_ms": policy.slo_latency_ms,
        "slow_budget": 1 - policy.slo_latency_target, "error_budget": 1 - policy.slo_availability,
        "drift_share": policy.drift_share, "slo": monitoring_selectors.slo_series(alert.version, since, step),
        "drift": monitoring_selectors.drift_series(alert.version, since),
    })


@require_POST
@page_needs(Cap.DEPLOY_CONTROL)
def alert_rollback(request: HttpRequest, alert_id: int) -> HttpResponse:
    """Roll the alert's champion back to the previous champion; then follow it on the deployment's page."""
    alert = _alert(alert_id)
    reason = str(request.POST.get("reason", "")).strip()[:500]
    try:
        d = champions.rollback_for_alert(Actor(request.user, "web"), alert, reason or "rolled back from the alert page")
    except services.RegistryError as exc:
        messages.error(request, f"Could not roll back {alert.model.name}: {exc}")
        return redirect("frontend:alert-detail", alert_id=alert.pk)
    messages.success(request, f"Restoring v{d.version.version} of {alert.model.name} as champion (deployment {d.pk}).")
    return redirect("frontend:deployment-detail", deployment_id=d.pk)


def _alert_acknowledge(actor: Actor, alert: Alert, request: HttpRequest) -> str:
    alert_services.alert_acknowledge(actor, alert.pk)
    return f"Acknowledged alert {alert.pk}: you own it now."


def _alert_resolve(actor: Actor, alert: Alert, request: HttpRequest) -> str:
    form = AlertResolveForm(request.POST)
    if not form.is_valid():
        raise services.RegistryError(" ".join(str(e) for errs in form.errors.values() for e in errs))
    alert_services.alert_resolve(actor, alert.pk, form.cleaned_data["resolution"])
    return f"Resolved alert {alert.pk}."


def _alert_silence(actor: Actor, alert: Alert, request: HttpRequest) -> str:
    form = AlertSilenceForm(request.POST)
    if not form.is_valid():
        raise services.RegistryError(" ".join(str(e) for errs in form.errors.values() for e in errs))
    done = alert_services.alert_silence(actor, alert.pk, form.cleaned_data["until"], form.cleaned_data["reason"])
    return f"Silenced alert {alert.pk} until {done.silenced_until:%Y-%m-%d %H:%M} UTC."


ALERT_ACTIONS: dict[str, Callable[[Actor, Alert, HttpRequest], str]] = {
    "acknowledge": _alert_acknowledge, "resolve": _alert_resolve, "silence": _alert_silence,
}


@require_POST
@page_needs(Cap.ALERT_ACT)
def alert_action(request: HttpRequest, alert_id: int, action: str) -> HttpResponse:
    """Acknowledge, resolve or silence through monitoring.alerts; a refusal is shown on the alert's page."""
    if action not in ALERT_ACTIONS:
        raise Http404(f"no action {action!r}")
    alert = _alert(alert_id)
    try:
        done = ALERT_ACTIONS[action](Actor(request.user, "web"), alert, request)
    except services.RegistryError as exc:
        messages.error(request, f"Could not {action} alert {alert.pk}: {exc}")
    else:
        messages.success(request, done)
    return redirect("frontend:alert-detail", alert_id=alert.pk)


# ---- notification receivers ----------------------------------------------------------------------------

@require_http_methods(["GET", "POST"])
@page_needs(Cap.ALERT_READ)
def receiver_list(request: HttpRequest) -> HttpResponse:
    """The receivers and what each subscribes to; receiver managers also create one here (its signing
    secret is on the answer, once) and see URLs in full (a Slack webhook URL is itself a credential)."""
    manager = roles_allow(user_roles(request.user), Cap.RECEIVER_MANAGE)
    if request.method == "POST" and not manager:
        return forbidden(request, Cap.RECEIVER_MANAGE)
    form = ReceiverForm(request.POST if request.method == "POST" else None)
    created, status = None, 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            try:
                created = notify.receiver_create(Actor(request.user, "web"), **form.cleaned_data)
            except notify.NotifyError as exc:
                form.add_error(None, str(exc))
                status = exc.status_code
            else:
                status, form = 201, ReceiverForm()
    rows = [(r, r.url if manager else notify.url_hint(r.url)) for r in notify.receiver_list()]
    response = render(request, "frontend/receivers.html", {"form": form, "created": created, "rows": rows,
                                                           "manager": manager}, status=status)
    if created is not None:
        response["Cache-Control"] = "no-store"  # the secret is on this page, once
    return response


@require_http_methods(["GET", "POST"])
@page_needs(Cap.RECEIVER_MANAGE)
def receiver_edit(request: HttpRequest, receiver_id: int) -> HttpResponse:
    receiver = get_object_or_404(Receiver, pk=receiver_id)
    initial = {"name": receiver.name, "url": receiver.url, "enabled": receiver.enabled,
               "event_types": list(receiver.event_types), "models": "\n".join(receiver.model_names)}
    form = ReceiverForm(request.POST if request.method == "POST" else None, initial=initial, editing=True)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            try:
                notify.receiver_update(Actor(request.user, "web"), receiver, **form.cleaned_data)
            except notify.NotifyError as exc:
                form.add_error(None, str(exc))
                status = exc.status_code
            else:
                messages.success(request, f"Saved receiver “{form.cleaned_data['name']}”.")
                return redirect("frontend:receiver-list")
    return render(request, "frontend/receiver_edit.html", {"form": form, "receiver": receiver}, status=status)
