"""The Kubernetes fleet: one Triton Deployment + Service + HorizontalPodAutoscaler per placed model.

The only module that imports the `kubernetes` SDK. Manifests come from platform/kubernetes/triton.yaml,
are validated offline with kubernetes-validate before anything is sent, and are applied with
server-side apply (one PATCH per object creates it or brings it to the rendered state, and is a
no-op when nothing changed, so the reconciler can call place() on every pass). The platform runs in
the cluster in this mode, so the addresses handed back are the Services' in-cluster DNS names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from deployer.fleet import FleetError, FleetNotReady, Placement

TEMPLATE = Path(__file__).resolve().parent.parent / "platform" / "kubernetes" / "triton.yaml"
FIELD_MANAGER = "mlops-platform"
MANAGED = "app.kubernetes.io/managed-by=mlops-platform"
MODEL_ANNOTATION = "mlops-platform/triton-model"
HTTP_PORT, METRICS_PORT = 8000, 8002

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENGINE_URI = re.compile(r"mlflow-artifacts:/engines/([A-Za-z0-9][A-Za-z0-9_.-]*)/?")
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
# API answers that asking again will not change (bad request, unauthenticated, forbidden, missing
# namespace, invalid object); everything else (409 races, 429, 5xx) is worth another pass.
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 415, 422}
# Pod waiting reasons that mean the pod will not come up by itself. ErrImagePull is the first failed
# pull and may be a registry hiccup; ImagePullBackOff is Kubernetes giving up between retries.
_PERMANENT_WAITING = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CrashLoopBackOff"}


def object_name(triton_model: str) -> str:
    """A DNS-1035 label (Service names need one) for a Triton model name, unique per name, <= 63 chars.

    "digits_v3_cpu-fp32-onnxruntime" -> "triton-digits-v3-cpu-fp32-onnxruntime-<8 hex>"."""
    slug = re.sub(r"[^a-z0-9]+", "-", triton_model.lower()).strip("-")
    digest = hashlib.sha256(triton_model.encode()).hexdigest()[:8]
    slug = slug[: 63 - len("triton--") - len(digest)].rstrip("-")
    return f"triton-{slug}-{digest}" if slug else f"triton-{digest}"


def render(template: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The template's YAML documents with every `${key}` replaced (see platform/kubernetes/triton.yaml)."""

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, str):
            whole = _PLACEHOLDER.fullmatch(node)
            if whole:
                return values[whole.group(1)]
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
        return node

    try:
        return [fill(doc) for doc in yaml.safe_load_all(template) if doc is not None]
    except KeyError as exc:
        raise FleetError(f"the Kubernetes template uses an unknown placeholder {exc}") from exc


def validate(manifest: dict[str, Any], kube_version: str) -> None:
    """Raise FleetError naming the field unless the manifest passes the API's schema (strict: no
    unknown fields) for that Kubernetes version."""
    what = f"{manifest.get('kind', '?')} {manifest.get('metadata', {}).get('name', '?')}"
    try:
        kubernetes_validate.validate(manifest, kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(top level)"
        raise FleetError(f"{what} is not a valid Kubernetes {kube_version} manifest: "
                         f"at {where}: {exc.message}") from exc
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.utils.VersionNotSupportedError) as exc:
        raise FleetError(f"{what} cannot be validated: {exc}") from exc


def _api_message(exc: k8s.ApiException) -> str:
    """The message of the API's Status reply, else the HTTP reason."""
    try:
        status = json.loads(exc.body) if exc.body else None
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return f"HTTP {exc.status} {exc.reason}".strip()


def _is_ready(deployment: k8s.V1Deployment) -> bool:
    status, meta = deployment.status, deployment.metadata
    if status is None or meta is None:
        return False
    return (status.ready_replicas or 0) >= 1 and (status.observed_generation or 0) >= (meta.generation or 0)


@dataclass
class KubernetesFleet:
    platform_url: str  # how pods reach the platform (its MLflow artifact proxy), e.g. http://mlops-platform.mlops:8000
    namespace: str = "mlops-serving"
    image: str = "nvcr.io/nvidia/tritonserver:24.10-py3"
    fetch_image: str = "curlimages/curl:8.10.1"
    token_secret: str = "mlops-platform-token"  # a Secret in the namespace with the API token under key "token"
    cpu: str = "1"
    memory: str = "2Gi"
    max_replicas: int = 4
    cpu_utilization: int = 70
    kube_version: str = "1.30"
    template: Path = TEMPLATE
    api_client: k8s.ApiClient | None = None  # None: KUBECONFIG / in-cluster service account, on first use
    request_timeout: tuple[float, float] = (5.0, 30.0)  # connect, read

    kind = "kubernetes"

    @classmethod
    def from_env(cls) -> KubernetesFleet:
        """Settings from KUBE_* variables; KUBECONFIG is read by the kubernetes client's own loader."""
        url = os.environ.get("KUBE_PLATFORM_URL", "").strip()
        if not url:
            raise FleetError("KUBE_PLATFORM_URL is not set: the URL at which pods reach the platform")
        settings: dict[str, Any] = {"platform_url": url.rstrip("/")}
        for field, key in (("namespace", "KUBE_NAMESPACE"), ("image", "KUBE_TRITON_IMAGE"),
                           ("fetch_image", "KUBE_FETCH_IMAGE"), ("token_secret", "KUBE_TOKEN_SECRET"),
                           ("cpu", "KUBE_TRITON_CPU"), ("memory", "KUBE_TRITON_MEMORY"),
                           ("kube_version", "KUBE_VERSION")):
            if os.environ.get(key, "").strip():
                settings[field] = os.environ[key].strip()
        raw = os.environ.get("KUBE_MAX_REPLICAS", "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise FleetError(f"KUBE_MAX_REPLICAS={raw!r} is not a positive whole number")
            settings["max_replicas"] = int(raw)
        return cls(**settings)

    # -- manifests -------------------------------------------------------------------------------

    def manifests(self, placement: Placement) -> dict[str, dict[str, Any]]:
        """The rendered, validated Service, HorizontalPodAutoscaler and Deployment, by kind."""
        if not _MODEL_NAME.fullmatch(placement.triton_model):
            raise FleetError(f"{placement.triton_model!r} is not a Triton model name")
        engine = _ENGINE_URI.fullmatch(placement.engine_uri)
        if not engine:
            raise FleetError(f"{placement.engine_uri!r} is not an mlflow-artifacts:/engines/<key> URI")
        if placement.target not in ("cpu", "gpu"):
            raise FleetError(f"unknown target {placement.target!r} (cpu or gpu)")
        gpu = placement.target == "gpu"
        limits = {"memory": self.memory, **({"nvidia.com/gpu": "1"} if gpu else {})}
        values = {
            "name": object_name(placement.triton_model),
            "namespace": self.namespace,
            "model": placement.triton_model,
            "engine_uri": placement.engine_uri,
            "engine_key": engine.group(1),
            "image": self.image,
            "fetch_image": self.fetch_image,
            "platform_url": self.platform_url,
            "token_secret": self.token_secret,
            "resources": {"requests": {"cpu": self.cpu, "memory": self.memory}, "limits": limits},
            # GPU nodes are commonly tainted so that only pods asking for a GPU land there.
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpu else [],
            "min_replicas": placement.replicas,
            "max_replicas": max(placement.replicas, self.max_replicas),
            "cpu_utilization": self.cpu_utilization,
        }
        rendered = {doc["kind"]: doc for doc in render(self.template.read_text(), values)}
        for manifest in rendered.values():
            validate(manifest, self.kube_version)
        return rendered

    # -- the Fleet interface -----------------------------------------------------------------------

    def place(self, placement: Placement) -> list[str]:
        rendered = self.manifests(placement)
        name, model = object_name(placement.triton_model), placement.triton_model
        apply: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True,
                                 "_content_type": "application/apply-patch+yaml",
                                 "_request_timeout": self.request_timeout}
        # Deployment last: its reply carries the status place() reports on.
        with self._calling(f"applying Service {name}"):
            self._core.patch_namespaced_service(name, self.namespace, rendered["Service"], **apply)
        with self._calling(f"applying HorizontalPodAutoscaler {name}"):
            self._autoscaling.patch_namespaced_horizontal_pod_autoscaler(
                name, self.namespace, rendered["HorizontalPodAutoscaler"], **apply)
        with self._calling(f"applying Deployment {name}"):
            deployment = self._apps.patch_namespaced_deployment(name, self.namespace, rendered["Deployment"],
                                                                **apply)
        if _is_ready(deployment):
            return [self._address(name, HTTP_PORT)]
        raise self._why_not_ready(model, deployment)

    def remove(self, triton_model: str) -> None:
        name = object_name(triton_model)
        # Deployment first: a crash half-way leaves a Service or HPA that the next place() adopts.
        deletes = [("Deployment", self._apps.delete_namespaced_deployment),
                   ("HorizontalPodAutoscaler", self._autoscaling.delete_namespaced_horizontal_pod_autoscaler),
                   ("Service", self._core.delete_namespaced_service)]
        for kind, delete in deletes:
            with self._calling(f"deleting {kind} {name}"):
                try:
                    delete(name, self.namespace, _request_timeout=self.request_timeout)
                except k8s.ApiException as exc:
                    if exc.status != 404:  # already gone is what remove() wants
                        raise

    def placed(self) -> dict[str, list[str]]:
        with self._calling("listing Deployments"):
            deployments = self._apps.list_namespaced_deployment(self.namespace, label_selector=MANAGED,
                                                               _request_timeout=self.request_timeout)
        held: dict[str, list[str]] = {}
        for deployment in deployments.items:
            meta = deployment.metadata
            model = (meta.annotations or {}).get(MODEL_ANNOTATION) if meta else None
            if meta and meta.name and model:
                held[model] = [self._address(meta.name, HTTP_PORT)] if _is_ready(deployment) else []
        return held

    def metrics_urls(self) -> list[str]:
        """Each placed model's Service metrics port. A Service balances across its pods, so one scrape
        sees one replica; per-pod figures need Prometheus' own pod discovery."""
        with self._calling("listing Services"):
            services = self._core.list_namespaced_service(self.namespace, label_selector=MANAGED,
                                                          _request_timeout=self.request_timeout)
        return [f"http://{self._address(svc.metadata.name, METRICS_PORT)}/metrics"
                for svc in services.items if svc.metadata and svc.metadata.name]

    def watch_ready(self, triton_model: str, timeout: float) -> list[str]:
        """Wait (watching the Deployment, not polling) until the model answers; return its address.
        Raises FleetNotReady if it is not ready within `timeout` seconds."""
        name = object_name(triton_model)
        watcher = k8s_watch.Watch()
        with self._calling(f"watching Deployment {name}"):
            for event in watcher.stream(self._apps.list_namespaced_deployment, self.namespace,
                                        field_selector=f"metadata.name={name}",
                                        timeout_seconds=max(1, int(timeout)),
                                        _request_timeout=(self.request_timeout[0], timeout + self.request_timeout[1])):
                if event["type"] == "DELETED":
                    watcher.stop()
                    raise FleetError(f"{triton_model}: Deployment {name} was deleted while waiting for it")
                if _is_ready(event["object"]):
                    watcher.stop()
                    return [self._address(name, HTTP_PORT)]
        raise FleetNotReady(f"{triton_model}: Deployment {name} not ready after {timeout:g} s")

    # -- helpers -----------------------------------------------------------------------------------

    def _address(self, name: str, port: int) -> str:
        return f"{name}.{self.namespace}.svc.cluster.local:{port}"

    def _why_not_ready(self, model: str, deployment: k8s.V1Deployment) -> Exception:
        """FleetNotReady saying what the model waits for, or FleetError when it will not come up."""
        status = deployment.status or k8s.V1DeploymentStatus()
        generation = deployment.metadata.generation if deployment.metadata else None
        if (status.observed_generation or 0) < (generation or 0):
            return FleetNotReady(f"{model}: waiting for the Deployment controller to act on generation "
                                 f"{generation}")
        for condition in status.conditions or []:
            if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
                return FleetError(f"{model}: {condition.message}")
        name = object_name(model)
        with self._calling(f"listing the pods of {name}"):
            pods = self._core.list_namespaced_pod(self.namespace, label_selector=f"app.kubernetes.io/instance={name}",
                                                  _request_timeout=self.request_timeout)
        waits = []
        for pod in pods.items:
            pod_name = pod.metadata.name if pod.metadata else "?"
            pod_status = pod.status or k8s.V1PodStatus()
            for pod_condition in pod_status.conditions or []:
                if pod_condition.type == "PodScheduled" and pod_condition.status == "False":
                    # Transient: a cluster autoscaler may be adding the node (a GPU one, say).
                    waits.append(f"pod {pod_name} {pod_condition.reason}: {pod_condition.message}")
            for container in (pod_status.init_container_statuses or []) + (pod_status.container_statuses or []):
                waiting = container.state.waiting if container.state else None
                if waiting is None or not waiting.reason:
                    continue
                detail = f"pod {pod_name} container {container.name} {waiting.reason}"
                detail += f": {waiting.message}" if waiting.message else ""
                if waiting.reason in _PERMANENT_WAITING:
                    return FleetError(f"{model}: {detail}")
                waits.append(detail)
        wanted = max(status.replicas or 0, 1)
        summary = f"{model}: {status.ready_replicas or 0}/{wanted} replicas ready"
        if not pods.items:
            return FleetNotReady(f"{summary}; no pods yet")
        return FleetNotReady("; ".join([summary, *waits]))

    @contextmanager
    def _calling(self, doing: str) -> Iterator[None]:
        """Turn the client's failures into the Fleet's permanent / transient errors."""
        try:
            yield
        except k8s.ApiException as exc:
            error = FleetError if exc.status in _PERMANENT_STATUS else FleetNotReady
            raise error(f"{doing} in namespace {self.namespace}: {_api_message(exc)}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise FleetNotReady(f"{doing}: the Kubernetes API did not answer ({exc})") from exc

    def _client(self) -> k8s.ApiClient:
        if self.api_client is None:
            configuration = k8s.Configuration()
            try:
                if os.environ.get("KUBERNETES_SERVICE_HOST"):
                    k8s_config.load_incluster_config(client_configuration=configuration)
                else:
                    k8s_config.load_kube_config(client_configuration=configuration)
            except k8s_config.ConfigException as exc:
                raise FleetError(f"no Kubernetes configuration (KUBECONFIG or in-cluster): {exc}") from exc
            self.api_client = k8s.ApiClient(configuration)
        return self.api_client

    @property
    def _apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self._client())

    @property
    def _core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self._client())

    @property
    def _autoscaling(self) -> k8s.AutoscalingV2Api:
        return k8s.AutoscalingV2Api(self._client())
