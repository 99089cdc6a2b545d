"""Deployments in the REST API: start a rollout, follow it (state, weights, analysis, history), and pause,
resume, promote or abort it; roll a model's champion back to the previous one. What serves each model is
under /endpoints/."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, PolymorphicProxySerializer, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from deployer import champions, history, promotions, selectors, services
from deployer.models import (
    ACTIVE_ROLLOUT_STATES,
    AnalysisPoint,
    Deployment,
    Endpoint,
    PromotionRequest,
    PromotionReview,
    PromotionStatus,
    RolloutMode,
    RolloutStatus,
)
from pipelines.models import Target
from registry import governance
from registry.api.permissions import request_roles
from registry.api.views import BaseView, actor_of, model_or_404
from registry.models import PromotionPolicy
from registry.roles import Cap, roles_allow


class DeploymentIn(serializers.Serializer):
    model = serializers.CharField()
    version = serializers.IntegerField(min_value=1)
    target = serializers.ChoiceField(choices=Target.choices, default=Target.CPU)
    steps = serializers.ListField(child=serializers.IntegerField(), required=False,
                                  help_text="canary traffic percents, increasing, e.g. [10, 25, 50]")
    step_interval_s = serializers.IntegerField(min_value=1, required=False)
    bake_s = serializers.IntegerField(min_value=0, required=False)
    max_p99_ms = serializers.FloatField(min_value=0.001, required=False)
    max_error_rate = serializers.FloatField(min_value=0, max_value=1, required=False)
    min_requests = serializers.IntegerField(min_value=1, required=False)
    require_approval = serializers.BooleanField(default=False)
    mode = serializers.ChoiceField(choices=[(m.value, m.label) for m in (RolloutMode.CANARY, RolloutMode.SHADOW)],
                                   default=RolloutMode.CANARY,
                                   help_text="canary: client traffic in steps; shadow: mirrored requests only")
    shadow_share = serializers.IntegerField(min_value=1, max_value=100, required=False,
                                            help_text="shadow mode: percent of stable's requests mirrored (50)")
    hil_override = serializers.CharField(required=False, default="", max_length=2000, allow_blank=True,
                                         help_text="deploy without a passing HIL run on the fleet's hardware: the "
                                                   "reason (release managers; audited)")


class PointOut(serializers.ModelSerializer):
    class Meta:
        model = AnalysisPoint
        fields = list(selectors.POINT_FIELDS)


class DeploymentOut(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.IntegerField(source="version.version")
    previous_version = serializers.IntegerField(source="previous_version.version", allow_null=True, default=None)
    engine = serializers.CharField(source="engine.variant")
    requested_by = serializers.CharField(source="requested_by.username", allow_null=True, default=None)
    decided_by = serializers.CharField(source="decided_by.username", allow_null=True, default=None)
    active = serializers.BooleanField(source="is_active")

    class Meta:
        model = Deployment
        fields = ["id", "model", "version", "previous_version", "target", "engine", "triton_model", "status",
                  "active", "mode", "shadow_share", "steps", "step_index", "weight", "step_interval_s", "bake_s",
                  "max_p99_ms", "max_error_rate", "min_requests", "require_approval", "analysis", "reason",
                  "requested_by", "decided_by", "hil_run", "hil_override", "step_started_at", "created_at",
                  "updated_at", "finished_at"]


class DeploymentDetailOut(DeploymentOut):
    history = serializers.SerializerMethodField()
    points = serializers.SerializerMethodField()

    class Meta(DeploymentOut.Meta):
        fields = [*DeploymentOut.Meta.fields, "history", "points"]

    def get_history(self, d: Deployment) -> list[dict[str, Any]]:
        return [{"at": e.at, "action": e.action, "actor": e.actor_name, "after": e.after}
                for e in selectors.deployment_history(d)]

    def get_points(self, d: Deployment) -> list[dict[str, Any]]:
        return PointOut(selectors.recent_points(d), many=True).data  # type: ignore[return-value]


def deployment_or_404(deployment_id: int) -> Deployment:
    found = selectors.deployments().filter(pk=deployment_id).first()
    if found is None:
        raise Http404(f"no deployment {deployment_id}")
    return found


class DeploymentListView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ, "POST": Cap.DEPLOY_CREATE}

    @extend_schema(parameters=[
        OpenApiParameter("model", str, description="only this model's deployments"),
        OpenApiParameter("status", str, enum=RolloutStatus.values),
        OpenApiParameter("active", bool, description="only rollouts in progress"),
    ], responses=DeploymentOut(many=True))
    def get(self, request: Request) -> Response:
        found = selectors.deployments()
        if model := request.query_params.get("model"):
            found = found.filter(model__name=model)
        if state := request.query_params.get("status"):
            if state not in RolloutStatus.values:
                raise serializers.ValidationError({"status": f"one of {', '.join(RolloutStatus.values)}"})
            found = found.filter(status=state)
        if request.query_params.get("active") in ("1", "true", "yes"):
            found = found.filter(status__in=ACTIVE_ROLLOUT_STATES)
        return self.paginate(found.order_by("-created_at", "-id"), DeploymentOut)

    @extend_schema(request=DeploymentIn, responses={201: DeploymentDetailOut},
                   description="Start rolling a version out: the canary is loaded, then takes each step's share of "
                               "traffic while analysed, and is promoted (MLflow alias `champion` moves) or rolled "
                               "back. A model's first deployment is promoted as soon as it is loaded.")
    def post(self, request: Request) -> Response:
        data = DeploymentIn(data=request.data)
        data.is_valid(raise_exception=True)
        args = dict(data.validated_data)
        if args["hil_override"].strip() and not roles_allow(request_roles(request), Cap.HIL_OVERRIDE):
            raise PermissionDenied(f"hil_override needs {Cap.HIL_OVERRIDE} (release managers): deploying without "
                                   "hardware evidence is a release decision")
        model = model_or_404(args.pop("model"))
        d = services.deployment_create(actor_of(request), model, args.pop("version"), **args)
        return Response(DeploymentDetailOut(deployment_or_404(d.pk)).data, status=status.HTTP_201_CREATED)


class DeploymentDetailView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ}

    @extend_schema(responses=DeploymentDetailOut)
    def get(self, request: Request, deployment_id: int) -> Response:
        return Response(DeploymentDetailOut(deployment_or_404(deployment_id)).data)


class _ActionView(BaseView):
    operation: Any = None

    @extend_schema(request=None, responses=DeploymentDetailOut)
    def post(self, request: Request, deployment_id: int) -> Response:
        d = deployment_or_404(deployment_id)
        self.operation(actor_of(request), d)
        return Response(DeploymentDetailOut(deployment_or_404(deployment_id)).data)


class DeploymentPauseView(_ActionView):
    """Hold the canary at its current weight (safety analysis still rolls a failing canary back)."""

    capabilities = {"POST": Cap.DEPLOY_CONTROL}
    operation = staticmethod(services.deployment_pause)


class DeploymentResumeView(_ActionView):
    capabilities = {"POST": Cap.DEPLOY_CONTROL}
    operation = staticmethod(services.deployment_resume)


class DeploymentAbortView(_ActionView):
    """Roll back now: all traffic to the stable version, the canary unloaded, the alias unchanged."""

    capabilities = {"POST": Cap.DEPLOY_CONTROL}
    operation = staticmethod(services.deployment_abort)


class DeploymentPromoteView(_ActionView):
    """Make the canary the stable version now (also how a release manager approves the final step)."""

    capabilities = {"POST": Cap.DEPLOY_PROMOTE}
    operation = staticmethod(services.deployment_promote)


class RollbackIn(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="why: kept in the deployment and the audit log")


class ChampionRollbackView(BaseView):
    capabilities = {"POST": Cap.DEPLOY_CONTROL}

    @extend_schema(request=RollbackIn, responses={201: DeploymentDetailOut},
                   description="Roll the model's champion back to the previous champion: the version it replaced is "
                               "loaded and takes all traffic at once, without analysis (a `restore` deployment). "
                               "Refused (409) while a rollout of the model is active or when there is no previous "
                               "champion.")
    def post(self, request: Request, name: str) -> Response:
        data = RollbackIn(data=request.data)
        data.is_valid(raise_exception=True)
        d = champions.champion_rollback(actor_of(request), model_or_404(name), data.validated_data["reason"])
        return Response(DeploymentDetailOut(deployment_or_404(d.pk)).data, status=status.HTTP_201_CREATED)


# ---- promotion requests (deployer/promotions.py) ------------------------------------------------------------


class ReasonIn(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)


class CommentIn(serializers.Serializer):
    comment = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)


class ReviewOut(serializers.ModelSerializer):
    class Meta:
        model = PromotionReview
        fields = ["reviewer_name", "roles", "decision", "comment", "at"]


class PromotionOut(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.IntegerField(source="version.version")
    deployment_status = serializers.CharField(source="deployment.status")
    approvals = serializers.SerializerMethodField()
    approvals_required = serializers.SerializerMethodField()

    class Meta:
        model = PromotionRequest
        fields = ["id", "model", "version", "deployment", "deployment_status", "status", "requested_by_name",
                  "reason", "approvals", "approvals_required", "outcome", "break_glass", "created_at", "decided_at"]

    def get_approvals(self, req: PromotionRequest) -> int:
        return len(promotions.approvals(req))

    def get_approvals_required(self, req: PromotionRequest) -> int:
        return self._policy(req).approvals_required

    def _policy(self, req: PromotionRequest) -> PromotionPolicy:
        seen = self.context.setdefault("policies", {})  # a page's rows share their models' policies
        if req.model_id not in seen:
            seen[req.model_id] = governance.promotion_policy(req.model)
        return seen[req.model_id]


class PromotionDetailOut(PromotionOut):
    reviews = ReviewOut(many=True)
    policy = serializers.SerializerMethodField()
    your_review = serializers.SerializerMethodField(help_text="why you may not approve it, or empty when you may")

    class Meta(PromotionOut.Meta):
        fields = [*PromotionOut.Meta.fields, "evidence", "champion_evidence", "evidence_at", "reviews", "policy",
                  "your_review"]

    def get_policy(self, req: PromotionRequest) -> dict[str, Any]:
        return governance.policy_words(self._policy(req))

    def get_your_review(self, req: PromotionRequest) -> str:
        request = self.context.get("request")
        if request is None:
            return ""
        return promotions.reviewer_problem(request.user, request_roles(request), req, self._policy(req))


def promotion_or_404(req_id: int) -> PromotionRequest:
    found = selectors.promotion_requests().filter(pk=req_id).first()
    if found is None:
        raise Http404(f"no promotion request {req_id}")
    return found


def _promotion_answer(request: Request, req_id: int, code: int = status.HTTP_200_OK) -> Response:
    return Response(PromotionDetailOut(promotion_or_404(req_id), context={"request": request}).data, status=code)


class DeploymentPromotionView(BaseView):
    """Request that the rollout's version become the champion; release managers approve it."""

    capabilities = {"POST": Cap.PROMOTION_REQUEST}

    @extend_schema(request=ReasonIn, responses={201: PromotionDetailOut})
    def post(self, request: Request, deployment_id: int) -> Response:
        data = ReasonIn(data=request.data)
        data.is_valid(raise_exception=True)
        req = promotions.promotion_request(actor_of(request), deployment_or_404(deployment_id),
                                           data.validated_data["reason"])
        return _promotion_answer(request, req.pk, status.HTTP_201_CREATED)


class DeploymentBreakGlassView(BaseView):
    """Promote the canary now without the approvals its policy asks for (administrators, with a written reason;
    audited and announced)."""

    capabilities = {"POST": Cap.BREAK_GLASS}

    @extend_schema(request=ReasonIn, responses=PromotionDetailOut)
    def post(self, request: Request, deployment_id: int) -> Response:
        data = ReasonIn(data=request.data)
        data.is_valid(raise_exception=True)
        req = promotions.promotion_break_glass(actor_of(request), request_roles(request),
                                               deployment_or_404(deployment_id), data.validated_data["reason"])
        return _promotion_answer(request, req.pk)


class PromotionListView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ}

    @extend_schema(parameters=[OpenApiParameter("status", str, enum=PromotionStatus.values),
                               OpenApiParameter("model", str, description="only this model's requests")],
                   responses=PromotionOut(many=True))
    def get(self, request: Request) -> Response:
        found = selectors.promotion_requests()
        if state := request.query_params.get("status"):
            if state not in PromotionStatus.values:
                raise serializers.ValidationError({"status": f"one of {', '.join(PromotionStatus.values)}"})
            found = found.filter(status=state)
        if model := request.query_params.get("model"):
            found = found.filter(model__name=model)
        return self.paginate(found.order_by("-created_at", "-id"), PromotionOut)


class PromotionDetailView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ}

    @extend_schema(responses=PromotionDetailOut,
                   description="A request with its evidence and the champion's side by side, its reviews, the policy, "
                               "and whether you may review it (`your_review` says why not).")
    def get(self, request: Request, req_id: int) -> Response:
        return _promotion_answer(request, req_id)


class _ReviewView(BaseView):
    capabilities = {"POST": Cap.DEPLOY_PROMOTE}
    decide: Any = None

    @extend_schema(request=CommentIn, responses=PromotionDetailOut)
    def post(self, request: Request, req_id: int) -> Response:
        data = CommentIn(data=request.data)
        data.is_valid(raise_exception=True)
        promotion_or_404(req_id)
        self.decide(actor_of(request), request_roles(request), req_id, data.validated_data["comment"])
        return _promotion_answer(request, req_id)


class PromotionApproveView(_ReviewView):
    """Approve (a comment is optional); with the policy's number of approvals the rollout is promoted."""

    decide = staticmethod(promotions.promotion_approve)


class PromotionRejectView(_ReviewView):
    """Reject (a comment is required): the canary is rolled back."""

    decide = staticmethod(promotions.promotion_reject)


class PromotionCancelView(BaseView):
    """Withdraw a pending request: its requester, or a release manager."""

    capabilities = {"POST": Cap.PROMOTION_REQUEST}

    @extend_schema(request=CommentIn, responses=PromotionDetailOut)
    def post(self, request: Request, req_id: int) -> Response:
        data = CommentIn(data=request.data)
        data.is_valid(raise_exception=True)
        promotion_or_404(req_id)
        promotions.promotion_cancel(actor_of(request), request_roles(request), req_id,
                                    data.validated_data["comment"] or "withdrawn")
        return _promotion_answer(request, req_id)


class EndpointOut(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    stable_version = serializers.IntegerField(source="stable_version.version", allow_null=True, default=None)
    canary = serializers.SerializerMethodField()

    class Meta:
        model = Endpoint
        fields = ["model", "stable_version", "stable_triton_model", "target", "canary", "updated_at"]

    def get_canary(self, ep: Endpoint) -> dict[str, Any] | None:
        d = selectors.active_rollout(ep.model)
        return None if d is None else {"deployment": d.pk, "version": d.version.version, "status": d.status,
                                       "weight": d.weight}


class EndpointListView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ}

    @extend_schema(responses=EndpointOut(many=True))
    def get(self, request: Request) -> Response:
        return self.paginate(Endpoint.objects.select_related("model", "stable_version").order_by("model__name"),
                             EndpointOut)


# ---- a model's serving history (deployer/history.py) -----------------------------------------------------------


class HistoryIn(serializers.Serializer):
    at = serializers.CharField(required=False, help_text=f"the instant answer at this time: {history.AT_FORMAT}")
    since = serializers.CharField(required=False, help_text="the timeline after this time (default: its beginning)")
    until = serializers.CharField(required=False, help_text="the timeline up to this time (default: now)")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=history.MAX_LIMIT,
                                     default=history.DEFAULT_LIMIT, help_text="audit rows read at most")

    def _time(self, value: str) -> Any:
        try:
            return history.parse_time(value)
        except history.HistoryError as exc:
            raise serializers.ValidationError(str(exc)) from None

    validate_at = validate_since = validate_until = _time

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("since") and attrs.get("until") and attrs["since"] >= attrs["until"]:
            raise serializers.ValidationError({"since": "must be before until"})
        return attrs


class _FromTo(serializers.Serializer):
    """`from` is a Python keyword: declared here rather than as an attribute."""

    def get_fields(self) -> dict[str, Any]:
        return {"from": serializers.DateTimeField(), **super().get_fields()}


class SegmentOut(_FromTo):
    """A stretch of time in which a version held one share of the model's client traffic, in one role."""

    to = serializers.DateTimeField(allow_null=True, help_text="null while it still held at the end")
    version = serializers.IntegerField()
    share = serializers.IntegerField(help_text="percent of the model's client traffic")
    role = serializers.ChoiceField(choices=["stable", "canary", "shadow"])
    deployment = serializers.IntegerField(allow_null=True)
    mirrored = serializers.IntegerField(allow_null=True, help_text="shadow: percent of stable's requests copied")


class AliasSpanOut(_FromTo):
    """A stretch of time in which an alias pointed at one version."""

    alias = serializers.CharField()
    version = serializers.IntegerField()
    to = serializers.DateTimeField(allow_null=True)


class MarkerOut(serializers.Serializer):
    at = serializers.DateTimeField()
    kind = serializers.CharField(help_text="started, restore, promoted, rolled_back, awaiting_approval, paused, "
                                           "resumed, alias, request, approval, rejection, break_glass")
    version = serializers.IntegerField(allow_null=True)
    deployment = serializers.IntegerField(allow_null=True)
    actor = serializers.CharField()
    automatic = serializers.BooleanField()
    reason = serializers.CharField(allow_blank=True)
    event = serializers.IntegerField()

    def get_fields(self) -> dict[str, Any]:
        # `label` is a Field's own attribute (a serializer is a field; typed as its text): declared here so that
        # the type checker does not take a field for it.
        return {**super().get_fields(), "label": serializers.CharField(help_text="what happened, in words")}


class EventOut(serializers.Serializer):
    id = serializers.IntegerField()
    at = serializers.DateTimeField()
    action = serializers.CharField()
    actor = serializers.CharField()
    via = serializers.CharField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    before = serializers.JSONField(allow_null=True)
    after = serializers.JSONField(allow_null=True)


class TimelineOut(serializers.Serializer):
    model = serializers.CharField()
    since = serializers.DateTimeField(allow_null=True)
    until = serializers.DateTimeField()
    truncated = serializers.BooleanField(help_text="more rows were left: ask again with since=next_since")
    next_since = serializers.DateTimeField(allow_null=True)
    limit = serializers.IntegerField()
    events_read = serializers.IntegerField()
    segments = SegmentOut(many=True)
    aliases = AliasSpanOut(many=True)
    markers = MarkerOut(many=True)
    events = EventOut(many=True)


class ServingOut(serializers.Serializer):
    version = serializers.IntegerField()
    share = serializers.IntegerField()
    role = serializers.CharField()
    deployment = serializers.IntegerField(allow_null=True)
    mirrored = serializers.IntegerField(allow_null=True)
    since = serializers.DateTimeField()


class InstantOut(serializers.Serializer):
    model = serializers.CharField()
    at = serializers.DateTimeField()
    summary = serializers.CharField(help_text="the answer in words")
    serving = ServingOut(many=True)
    stable_version = serializers.IntegerField(allow_null=True)
    champion_alias = serializers.IntegerField(allow_null=True)
    aliases = serializers.DictField(child=serializers.IntegerField())
    alias_since = serializers.DictField(child=serializers.DateTimeField())
    rollout = serializers.DictField(allow_null=True, help_text="the rollout in progress then")
    champion = serializers.DictField(allow_null=True, help_text="how the stable version became champion: "
                                                                "approvers, promoted_by, break_glass, reason")
    last_event = serializers.DictField(allow_null=True)


class ModelHistoryView(BaseView):
    capabilities = {"GET": Cap.DEPLOY_READ}

    @extend_schema(parameters=[HistoryIn], responses=PolymorphicProxySerializer(
        component_name="ModelHistory", serializers=[TimelineOut, InstantOut], resource_type_field_name=None),
        description="What served the model over time, rebuilt from the audit log: traffic segments per version, "
                    "alias values, markers (rollouts started, promotions with who approved, rollbacks automatic "
                    "or by whom with the reason, break-glass) and the rows read, between `since` and `until`, "
                    "at most `limit` rows (`truncated` and `next_since` say where to continue). With `at`, the "
                    "answer for that instant instead: the versions serving and their shares, the aliases, the "
                    "rollout in progress and who approved the champion.")
    def get(self, request: Request, name: str) -> Response:
        query = HistoryIn(data=request.query_params)
        query.is_valid(raise_exception=True)
        args = query.validated_data
        model = model_or_404(name)
        if "at" in args:
            return Response(InstantOut(history.state_at(model, args["at"])).data)
        return Response(TimelineOut(history.timeline(model, args.get("since"), args.get("until"),
                                                     args["limit"])).data)
