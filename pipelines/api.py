"""Engine builds in the REST API: list a version's builds with their state, figures and log; ask for them.
Hardware targets: each profile, its queue and the live workers serving it. HIL runs: ask for them, follow
them, read their evidence; a model's HIL policy."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from pipelines import hardware, selectors
from pipelines.models import BuildStatus, EngineBuild, HilPolicy, HilRun, HilStatus
from pipelines.services import (
    BuildError,
    engine_builds_request,
    hil_policy,
    hil_runs_request,
    hil_waiting_words,
)
from registry.api.views import BaseView, actor_of, model_or_404, version_or_404
from registry.roles import Cap
from registry.services import model_policy_update


class BuildOut(serializers.ModelSerializer):
    variant = serializers.CharField(read_only=True)
    reused_from: serializers.PrimaryKeyRelatedField = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = EngineBuild
        fields = ["id", "variant", "target", "precision", "runtime", "status", "step", "error", "parity", "io",
                  "toolchain", "size_bytes", "sha256", "build_seconds", "engine_uri", "content_key", "reused_from",
                  "attempts", "started_at", "finished_at", "created_at", "log"]


class BuildListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "POST": Cap.MODEL_REGISTER}

    @extend_schema(responses=BuildOut(many=True))
    def get(self, request: Request, name: str, version: int) -> Response:
        builds = EngineBuild.objects.filter(version=version_or_404(name, version))
        return self.paginate(builds.order_by("target", "precision", "runtime"), BuildOut)

    @extend_schema(request=None, responses={202: BuildOut(many=True)},
                   description="Ask for the version's engines. Variants already built are left as they are; "
                               "failed ones are queued again.")
    def post(self, request: Request, name: str, version: int) -> Response:
        builds = engine_builds_request(actor_of(request), version_or_404(name, version))
        return Response(BuildOut(builds, many=True).data, status=status.HTTP_202_ACCEPTED)


class BuildDetailView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses=BuildOut)
    def get(self, request: Request, name: str, version: int, build_id: int) -> Response:
        build = EngineBuild.objects.filter(version=version_or_404(name, version), pk=build_id).first()
        if build is None:
            raise Http404(f"no build {build_id} for {name} v{version}")
        return Response(BuildOut(build).data)


class TargetWorkerOut(serializers.Serializer):
    hostname = serializers.CharField()
    facts = serializers.DictField(help_text="arch, cpu_model, cpu_flags, cores, memory_bytes, gpus, cuda, tensorrt")
    profiles = serializers.ListField(child=serializers.CharField())
    queues = serializers.ListField(child=serializers.CharField())
    started_at = serializers.DateTimeField()
    last_seen = serializers.DateTimeField()


class TargetOut(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    queue = serializers.CharField()
    requires = serializers.DictField(help_text="arch, cpu_flags (all of them), gpu (a word of the GPU's name)")
    live = serializers.BooleanField(help_text="a worker serving it announced itself within three heartbeats")
    workers = TargetWorkerOut(many=True)
    last_seen = serializers.DateTimeField(allow_null=True, help_text="last heartbeat of any worker serving it")
    none_since = serializers.DateTimeField(allow_null=True, help_text="when not live: when it last had a worker")


class TargetListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses=TargetOut(many=True),
                   description="Hardware targets (profiles): requirements, Celery queue, and the live workers "
                               "serving each with their detected hardware.")
    def get(self, request: Request) -> Response:
        return self.paginate(hardware.targets_overview(), TargetOut)


# ---- hardware-in-the-loop runs ---------------------------------------------------------------------------

class HilRunOut(serializers.ModelSerializer):
    model = serializers.CharField(source="build.version.model.name")
    version = serializers.IntegerField(source="build.version.version")
    variant = serializers.CharField(source="build.variant")
    champion_version = serializers.IntegerField(source="champion_build.version.version", allow_null=True,
                                                default=None)
    champion_variant = serializers.CharField(source="champion_build.variant", allow_null=True, default=None)
    requested_by = serializers.CharField(source="requested_by.username", allow_null=True, default=None)
    waiting = serializers.SerializerMethodField(help_text="while waiting: the profile's live workers, in words")

    class Meta:
        model = HilRun
        fields = ["id", "model", "version", "build", "variant", "profile", "status", "verdict", "champion_build",
                  "champion_version", "champion_variant", "waiting", "worker", "requested_by", "wait_deadline",
                  "mlflow_run_id", "attempts", "started_at", "finished_at", "created_at"]

    def get_waiting(self, run: HilRun) -> str | None:
        if run.status != HilStatus.WAITING:
            return None
        if "presence" not in self.context:  # read once for a page of runs
            self.context["presence"] = hardware.presences_by_name()
        return hil_waiting_words(run, self.context["presence"][run.profile])


class HilRunDetailOut(HilRunOut):
    class Meta(HilRunOut.Meta):
        fields = [*HilRunOut.Meta.fields, "sweep", "slo", "checks", "results", "hardware", "log"]


class HilRequestIn(serializers.Serializer):
    build = serializers.IntegerField(required=False, help_text="one kept engine of the version (default: all)")
    profiles = serializers.ListField(child=serializers.ChoiceField(choices=list(hardware.PROFILES_BY_NAME)),
                                     required=False, max_length=len(hardware.PROFILES),
                                     help_text="hardware profiles (default: PLATFORM_HIL_PROFILES, else the fleet's)")


class HilRunListView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ, "POST": Cap.MODEL_REGISTER}

    @extend_schema(responses=HilRunOut(many=True), description="The HIL runs of the version's engines, newest first.")
    def get(self, request: Request, name: str, version: int) -> Response:
        runs = selectors.hil_runs().filter(build__version=version_or_404(name, version))
        return self.paginate(runs.order_by("-created_at", "-id"), HilRunOut)

    @extend_schema(request=HilRequestIn, responses={202: HilRunOut(many=True)},
                   description="Measure the version's kept engines (or one) on hardware profiles. A profile with a "
                               "run of the engine already waiting or running keeps it.")
    def post(self, request: Request, name: str, version: int) -> Response:
        data = HilRequestIn(data=request.data)
        data.is_valid(raise_exception=True)
        found = version_or_404(name, version)
        builds = EngineBuild.objects.filter(version=found, status=BuildStatus.SUCCEEDED).select_related(
            "version__model")
        if "build" in data.validated_data:
            builds = builds.filter(pk=data.validated_data["build"])
        if not builds:
            raise BuildError(f"{name} v{version} has no kept engine" + (
                f" with id {data.validated_data['build']}" if "build" in data.validated_data else ""), 409)
        runs = [run for build in builds
                for run in hil_runs_request(actor_of(request), build, data.validated_data.get("profiles"))]
        return Response(HilRunOut(runs, many=True).data, status=status.HTTP_202_ACCEPTED)


class HilRunDetailView(BaseView):
    capabilities = {"GET": Cap.MODEL_READ}

    @extend_schema(responses=HilRunDetailOut,
                   description="A HIL run with its evidence: every point of both engines, the comparison with the "
                               "champion (percent, noise band), the checks and the verdict, and its log.")
    def get(self, request: Request, run_id: int) -> Response:
        run = selectors.hil_runs().filter(pk=run_id).first()
        if run is None:
            raise Http404(f"no HIL run {run_id}")
        return Response(HilRunDetailOut(run).data)


class HilPolicyIO(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)

    class Meta:
        model = HilPolicy
        fields = ["model", "p99_ms", "batch", "concurrency", "min_throughput", "max_memory_mb", "max_regression_pct",
                  "wait_timeout_s", "updated_at"]
        read_only_fields = ["updated_at"]
        extra_kwargs = {"p99_ms": {"min_value": 0.001}, "batch": {"min_value": 1, "max_value": 1 << 16},
                        "concurrency": {"min_value": 1, "max_value": 1024},
                        "min_throughput": {"min_value": 0}, "max_memory_mb": {"min_value": 1},
                        "max_regression_pct": {"min_value": 0, "max_value": 1000},
                        "wait_timeout_s": {"min_value": 1, "max_value": 7 * 86400}}


class HilPolicyView(BaseView):
    """A model's HIL objectives (version and model tags `hil.<key>` override them) and how long its runs wait
    for a worker."""

    capabilities = {"GET": Cap.MODEL_READ, "PATCH": Cap.MONITOR_EDIT}

    @extend_schema(responses=HilPolicyIO)
    def get(self, request: Request, name: str) -> Response:
        return Response(HilPolicyIO(hil_policy(model_or_404(name))).data)

    @extend_schema(request=HilPolicyIO, responses=HilPolicyIO)
    def patch(self, request: Request, name: str) -> Response:
        body = request.data
        model = model_or_404(name)
        current = hil_policy(model)
        data = HilPolicyIO(current if current.pk else None, data=body, partial=True)
        data.is_valid(raise_exception=True)
        return Response(HilPolicyIO(model_policy_update(actor_of(request), HilPolicy, model,
                                                        dict(data.validated_data), "hil_policy.update")).data)
