"""The Kubernetes fleet backend: manifests validated offline, API calls replayed from recorded exchanges.

No Kubernetes API server runs here. The official client runs unmodified down to its REST layer; only
its urllib3 pool manager is replaced by `Replay`, which answers each request from
deployer/tests/recorded/<name>.json (written from the Kubernetes API reference, not captured from a
cluster), fails on any request the recording does not expect, and checks every exchange was used.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import urllib3
import yaml
from kubernetes.client import ApiClient, Configuration

from deployer.fleet import FleetError, FleetNotReady, Placement
from deployer.kube import TEMPLATE, KubernetesFleet, object_name, validate

RECORDED = Path(__file__).resolve().parent / "recorded"
NS = "mlops-serving"
MODEL = "digits_v3_cpu-fp32-onnxruntime"
NAME = object_name(MODEL)
PLATFORM = "http://mlops-platform.mlops.svc.cluster.local:8000"
CPU = Placement(MODEL, "mlflow-artifacts:/engines/9f2c4e1ab7d3", "cpu")
GPU = Placement("digits_v3_gpu-fp16-tensorrt", "mlflow-artifacts:/engines/9f2c4e1ab7d3", "gpu", replicas=2)
ADDRESS = f"{NAME}.{NS}.svc.cluster.local:8000"


def _contains(sent: Any, recorded: Any) -> bool:
    """Whether the sent JSON holds everything the recording names (mappings may hold more keys)."""
    if isinstance(recorded, dict):
        return isinstance(sent, dict) and all(k in sent and _contains(sent[k], v) for k, v in recorded.items())
    if isinstance(recorded, list):
        return isinstance(sent, list) and len(sent) == len(recorded) and all(map(_contains, sent, recorded))
    return bool(sent == recorded)


class _Reply:
    """What the client reads from a urllib3 response: status, headers, the body at once or as a stream."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.reason, self.data = status, "replayed", body
        self.headers = urllib3.HTTPHeaderDict({"Content-Type": "application/json"})

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield self.data

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        return self.data

    def getheaders(self) -> urllib3.HTTPHeaderDict:
        return self.headers

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class Replay:
    """Stands in for the client's urllib3 PoolManager and answers from recorded exchanges, in order."""

    def __init__(self, *names: str) -> None:
        self.pending: list[dict[str, Any]] = []
        for name in names:
            self.pending += json.loads((RECORDED / f"{name}.json").read_text())["exchanges"]
        self.sent: list[dict[str, Any]] = []

    def request(self, method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None,
                **_: Any) -> _Reply:
        parts = urlsplit(url)
        got = {"method": method, "path": parts.path, "query": dict(parse_qsl(parts.query)),
               "content_type": (headers or {}).get("Content-Type"), "body": json.loads(body) if body else None}
        self.sent.append(got)
        assert self.pending, f"unexpected request {method} {url}: the recording has no more exchanges"
        exchange = self.pending.pop(0)
        want = exchange["request"]
        where = f"{method} {url} (recorded: {want['method']} {want['path']})"
        assert (got["method"], got["path"]) == (want["method"], want["path"]), f"unexpected request {where}"
        assert got["query"] == want.get("query", {}), f"query {got['query']} for {where}"
        if "content_type" in want:
            assert got["content_type"] == want["content_type"], f"content type {got['content_type']} for {where}"
        if "body" in want:
            assert _contains(got["body"], want["body"]), f"body of {where} lacks {want['body']}"
        else:
            assert got["body"] is None, f"{where} sent a body the recording has none for"
        answer = exchange["response"]
        if "connection_error" in answer:
            raise urllib3.exceptions.MaxRetryError(None, url, reason=OSError(answer["connection_error"]))  # type: ignore[arg-type]
        if "events" in answer:  # a watch: one JSON event per line
            return _Reply(answer["status"], "".join(json.dumps(e) + "\n" for e in answer["events"]).encode())
        return _Reply(answer["status"], json.dumps(answer["body"]).encode())

    def clear(self) -> None:
        pass


@pytest.fixture
def replayed() -> Iterator[Callable[..., tuple[KubernetesFleet, Replay]]]:
    """replayed(*recordings, **settings) -> a KubernetesFleet whose API calls are answered by Replay."""
    replays: list[Replay] = []

    def make(*names: str, **settings: Any) -> tuple[KubernetesFleet, Replay]:
        api = ApiClient(Configuration(host="https://kube.test:6443"))
        replay = Replay(*names)
        api.rest_client.pool_manager = replay  # type: ignore[assignment]
        replays.append(replay)
        return KubernetesFleet(platform_url=PLATFORM, namespace=NS, api_client=api, **settings), replay

    yield make
    for replay in replays:
        assert not replay.pending, f"recorded exchanges never requested: {[e['request'] for e in replay.pending]}"


def _triton(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "triton")


# -- manifests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", [CPU, GPU], ids=["cpu", "gpu"])
def test_rendered_manifests_pass_strict_kubernetes_validation_for_cpu_and_gpu(placement: Placement) -> None:
    manifests = KubernetesFleet(platform_url=PLATFORM).manifests(placement)
    assert sorted(manifests) == ["Deployment", "HorizontalPodAutoscaler", "Service"]
    for manifest in manifests.values():
        validate(manifest, "1.30")  # raises FleetError on any schema problem
        assert manifest["metadata"]["name"] == object_name(placement.triton_model)
        assert "${" not in json.dumps(manifest), "a placeholder was left unfilled"


def test_the_cluster_access_manifests_pass_strict_kubernetes_validation() -> None:
    documents = list(yaml.safe_load_all((TEMPLATE.parent / "access.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Namespace", "Role", "RoleBinding"]
    for document in documents:
        validate(document, "1.30")


def test_a_gpu_placement_asks_for_one_nvidia_gpu_and_a_cpu_placement_does_not() -> None:
    fleet = KubernetesFleet(platform_url=PLATFORM)
    gpu, cpu = fleet.manifests(GPU), fleet.manifests(CPU)
    assert _triton(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert gpu["Deployment"]["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2


def test_the_deployment_runs_triton_on_the_fetched_model_repository_with_probes_on_the_model() -> None:
    manifests = KubernetesFleet(platform_url=PLATFORM, image="registry.example/triton:24.10").manifests(CPU)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    triton = _triton(manifests)
    assert triton["image"] == "registry.example/triton:24.10"
    assert triton["args"] == ["--model-repository=/models", "--model-control-mode=explicit", f"--load-model={MODEL}"]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{MODEL}/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    fetch = pod["initContainers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in fetch["env"]}
    assert env["PLATFORM_URL"] == PLATFORM and env["ENGINE_KEY"] == "9f2c4e1ab7d3" and env["MODEL"] == MODEL
    assert env["PLATFORM_TOKEN"] == {"secretKeyRef": {"name": "mlops-platform-token", "key": "token"}}
    assert "/triton/onnxruntime/$MODEL" in fetch["args"][0]
    assert pod["volumes"] == [{"name": "models", "emptyDir": {}}]
    assert "replicas" not in manifests["Deployment"]["spec"], "the HPA owns the replica count"


@pytest.mark.skipif(not (shutil.which("sh") and shutil.which("curl")), reason="needs sh and curl on PATH")
def test_the_init_container_script_fetches_the_triton_entry_with_the_platform_token(tmp_path: Path) -> None:
    """Runs the init container's own script (from the rendered manifest) here, against a stand-in for the
    platform's MLflow artifact proxy that answers only the bearer token."""
    entry = f"/api/2.0/mlflow-artifacts/artifacts/engines/9f2c4e1ab7d3/triton/onnxruntime/{MODEL}"
    files = {f"{entry}/config.pbtxt": b'name: "digits"\n', f"{entry}/1/model.onnx": b"\x08\x07onnx-bytes"}

    class Artifacts(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            known = self.headers.get("Authorization") == "Bearer mlp_test" and self.path in files
            self.send_response(200 if known else 403)
            self.end_headers()
            self.wfile.write(files.get(self.path, b"") if known else b"no")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Artifacts)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        fetch = KubernetesFleet(platform_url=url).manifests(CPU)["Deployment"]["spec"]["template"]["spec"][
            "initContainers"][0]
        env = {e["name"]: e["value"] for e in fetch["env"] if "value" in e}

        def run(token: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*fetch["command"], *fetch["args"]], capture_output=True, text=True, timeout=60,
                                  env={"PATH": os.environ["PATH"], **env, "MODEL_REPOSITORY": str(tmp_path),
                                       "PLATFORM_TOKEN": token})

        assert run("mlp_wrong").returncode != 0
        done = run("mlp_test")
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    assert (tmp_path / MODEL / "config.pbtxt").read_bytes() == files[f"{entry}/config.pbtxt"]
    assert (tmp_path / MODEL / "1" / "model.onnx").read_bytes() == files[f"{entry}/1/model.onnx"]


def test_object_names_are_dns_labels_unique_per_model_and_at_most_63_characters() -> None:
    long_a, long_b = "m_" + "a" * 80 + "_v1", "m_" + "a" * 80 + "_v2"
    names = [object_name(m) for m in (MODEL, "Digits.V3", long_a, long_b)]
    assert names[0].startswith("triton-digits-v3-cpu-fp32-onnxruntime-")
    assert len(set(names)) == 4 and all(len(n) <= 63 for n in names)
    assert all(n[0].isalpha() and n.replace("-", "").isalnum() and n == n.lower() for n in names)


def test_a_manifest_with_a_broken_field_is_refused_with_a_fleet_error_before_anything_is_sent(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]], tmp_path: Path) -> None:
    broken = tmp_path / "triton.yaml"
    broken.write_text(TEMPLATE.read_text().replace("containerPort: 8001", "containerPort: grpc-port"))
    fleet, replay = replayed(template=broken)  # an empty recording: any request fails the test
    with pytest.raises(FleetError, match=r"Deployment .* at spec\.template\.spec\.containers\.0\.ports\.1\."
                                         r"containerPort: 'grpc-port' is not of type 'integer'"):
        fleet.place(CPU)
    assert replay.sent == []


def test_an_unknown_field_is_refused_by_the_strict_schema() -> None:
    manifest = copy.deepcopy(KubernetesFleet(platform_url=PLATFORM).manifests(CPU)["Service"])
    manifest["spec"]["portz"] = manifest["spec"].pop("ports")
    with pytest.raises(FleetError, match=r"Service .* at spec: Additional properties are not allowed \('portz'"):
        validate(manifest, "1.30")


# -- place(), against recorded API exchanges ---------------------------------------------------------


def test_place_creates_the_three_objects_then_reports_not_ready_then_the_service_address(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, replay = replayed("place_created", "place_loading", "place_ready")
    with pytest.raises(FleetNotReady, match="waiting for the Deployment controller to act on generation 1"):
        fleet.place(CPU)
    sent = [(r["method"], r["body"]["kind"]) for r in replay.sent]
    assert sent == [("PATCH", "Service"), ("PATCH", "HorizontalPodAutoscaler"), ("PATCH", "Deployment")]
    assert replay.sent[2]["body"] == fleet.manifests(CPU)["Deployment"], "the validated manifest is what is sent"
    with pytest.raises(FleetNotReady, match=r"0/1 replicas ready; pod \S+ container triton PodInitializing"):
        fleet.place(CPU)
    assert fleet.place(CPU) == [ADDRESS]


def test_place_over_an_existing_deployment_applies_the_change_and_waits_for_its_rollout(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, replay = replayed("place_update", image="nvcr.io/nvidia/tritonserver:24.12-py3")
    with pytest.raises(FleetNotReady, match="act on generation 2"):
        fleet.place(CPU)
    assert {r["query"]["force"] for r in replay.sent} == {"true"}  # server-side apply takes over any field


def test_an_image_that_cannot_be_pulled_is_a_fleet_error_with_the_kubelets_message(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_image_pull")
    with pytest.raises(FleetError, match=r'ImagePullBackOff: Back-off pulling image "nvcr.io/nvidia/tritonserver'):
        fleet.place(CPU)


def test_an_unschedulable_pod_is_not_ready_with_the_schedulers_reason(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_unschedulable")
    with pytest.raises(FleetNotReady, match=r"Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu"):
        fleet.place(CPU)


def test_a_deployment_past_its_progress_deadline_is_a_fleet_error(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_stalled")
    with pytest.raises(FleetError, match=r"has timed out progressing"):
        fleet.place(CPU)


def test_a_forbidden_request_is_a_fleet_error_with_the_api_servers_message(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_forbidden")
    with pytest.raises(FleetError, match=r'cannot patch resource "services" in API group "" in the namespace'):
        fleet.place(CPU)


def test_a_503_from_the_api_server_is_not_ready_so_the_reconciler_asks_again(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_unavailable")
    with pytest.raises(FleetNotReady, match="the server is currently unable to handle the request"):
        fleet.place(CPU)


def test_an_unreachable_api_server_is_not_ready(replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("place_unreachable")
    with pytest.raises(FleetNotReady, match="the Kubernetes API did not answer"):
        fleet.place(CPU)


# -- remove(), placed(), metrics_urls(), watch_ready() -----------------------------------------------


def test_remove_deletes_the_deployment_and_tolerates_objects_already_gone(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, replay = replayed("remove")
    fleet.remove(MODEL)
    assert [r["method"] for r in replay.sent] == ["DELETE", "DELETE", "DELETE"]


def test_placed_maps_managed_deployments_to_models_with_addresses_only_where_ready(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("placed")
    assert fleet.placed() == {MODEL: [ADDRESS], "digits_v2_cpu-int8-onnxruntime": []}


def test_metrics_urls_are_the_services_metrics_ports(replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("metrics")
    other = object_name("digits_v2_cpu-int8-onnxruntime")
    assert fleet.metrics_urls() == [f"http://{NAME}.{NS}.svc.cluster.local:8002/metrics",
                                    f"http://{other}.{NS}.svc.cluster.local:8002/metrics"]


def test_watch_ready_follows_the_recorded_watch_stream_to_a_ready_replica(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("watch_ready")
    assert fleet.watch_ready(MODEL, timeout=60) == [ADDRESS]


def test_watch_ready_is_not_ready_when_the_watch_ends_without_a_ready_replica(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("watch_timeout")
    with pytest.raises(FleetNotReady, match="not ready after 60 s"):
        fleet.watch_ready(MODEL, timeout=60)


def test_the_replay_fails_the_test_on_a_request_the_recording_does_not_hold(
        replayed: Callable[..., tuple[KubernetesFleet, Replay]]) -> None:
    fleet, _ = replayed("metrics")  # a recorded GET of Services, asked for Deployments
    with pytest.raises(AssertionError, match=r"unexpected request GET .*/deployments\?labelSelector"):
        fleet.placed()


# -- settings ---------------------------------------------------------------------------------------


def test_from_env_reads_the_kube_settings_and_refuses_a_missing_platform_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBE_PLATFORM_URL", raising=False)
    with pytest.raises(FleetError, match="KUBE_PLATFORM_URL is not set"):
        KubernetesFleet.from_env()
    monkeypatch.setenv("KUBE_PLATFORM_URL", PLATFORM + "/")
    monkeypatch.setenv("KUBE_NAMESPACE", "serving")
    monkeypatch.setenv("KUBE_TRITON_IMAGE", "registry.example/triton:1")
    monkeypatch.setenv("KUBE_TOKEN_SECRET", "deployer-token")
    fleet = KubernetesFleet.from_env()
    assert (fleet.platform_url, fleet.namespace, fleet.image, fleet.token_secret) == (
        PLATFORM, "serving", "registry.example/triton:1", "deployer-token")
    monkeypatch.setenv("KUBE_MAX_REPLICAS", "many")
    with pytest.raises(FleetError, match="KUBE_MAX_REPLICAS='many'"):
        KubernetesFleet.from_env()
