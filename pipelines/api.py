"""Engine builds in the REST API: list a version's builds with their state, figures and log; ask for them.
Hardware targets: each profile, its queue and the live workers serving it."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from pipelines import hardware
from pipelines.models import EngineBuild
from pipelines.services import engine_builds_request
from registry.api.views import BaseView, actor_of, version_or_404
from registry.roles import Cap


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
