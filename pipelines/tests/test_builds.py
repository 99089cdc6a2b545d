"""Engine builds end to end: a ready version gets its engines, verified, packaged, stored, loadable in Triton."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone

from pipelines.builder import engine_build_execute
from pipelines.models import BuildStatus, EngineBuild
from pipelines.tasks import engine_builds_reconcile
from registry import locks, mlflow_store
from registry.audit import SYSTEM
from registry.models import VersionStatus
from registry.services import version_register_from_archive, version_transition

pytestmark = pytest.mark.django_db(transaction=True)


def _ready_version(name: str, archive: Path, **tags: str):
    version = version_register_from_archive(SYSTEM, name, archive, tags=tags or None)
    # Validation is tested elsewhere (registry/tests, tests/test_pipeline_e2e); here it is granted.
    return version_transition(version.pk, VersionStatus.READY, detail="granted by the test")


def _builds(version) -> list[EngineBuild]:
    return list(EngineBuild.objects.filter(version=version).order_by("precision"))


def test_a_ready_version_gets_fp32_and_int8_cpu_engines_verified_and_stored(model_archive, unique_name):
    version = _ready_version(unique_name, model_archive)
    builds = _builds(version)
    assert [(b.target, b.precision, b.status) for b in builds] == [("cpu", "fp32", "queued"), ("cpu", "int8", "queued")]
    fp32, int8 = (next(b for b in builds if b.precision == p) for p in ("fp32", "int8"))
    # A logistic regression has no MatMul to quantize: its int8 engine would be the fp32 one renamed.
    assert engine_build_execute(int8.pk, "test-worker") == BuildStatus.REJECTED
    int8.refresh_from_db()
    assert "nothing to quantize" in int8.error
    for build in [fp32]:
        assert engine_build_execute(build.pk, "test-worker") == BuildStatus.SUCCEEDED
        build.refresh_from_db()
        assert build.parity["passed"] and build.parity["figures"]["label_agreement"] == 1.0
        assert build.size_bytes and len(build.sha256) == 64 and build.build_seconds
        assert build.toolchain["onnxruntime"] and build.toolchain["opset"] == "17"
        assert build.engine_uri == f"mlflow-artifacts:/engines/{build.content_key}"
        assert mlflow_store.read_artifact_text(build.engine_uri, "COMPLETE")
        assert "parity on 256 rows" in build.log
        name = build.io["triton_model_name"]
        config = mlflow_store.read_artifact_text(build.engine_uri, f"triton/onnxruntime/{name}/config.pbtxt")
        assert 'platform: "onnxruntime_onnx"' in config and "dynamic_batching" in config


def test_asking_again_for_existing_builds_is_a_no_op(model_archive, unique_name, scientist):
    version = _ready_version(unique_name, model_archive)
    first = {b.pk for b in _builds(version)}
    resp = scientist.post(f"/api/v1/models/{unique_name}/versions/1/builds/")
    assert resp.status_code == 202
    assert {b["id"] for b in resp.json()} == first
    assert EngineBuild.objects.filter(version=version).count() == 2


def test_identical_model_bytes_reuse_the_engine_already_built(model_archive, unique_name):
    first = _ready_version(unique_name, model_archive)
    fp32 = next(b for b in _builds(first) if b.precision == "fp32")
    engine_build_execute(fp32.pk, "w")
    second = _ready_version(unique_name + "-again", model_archive)
    again = next(b for b in _builds(second) if b.precision == "fp32")
    assert engine_build_execute(again.pk, "w") == BuildStatus.SUCCEEDED
    again.refresh_from_db()
    fp32.refresh_from_db()
    assert again.reused_from_id == fp32.pk and again.content_key == fp32.content_key
    assert "reusing its engine" in again.log and again.sha256 == fp32.sha256
    # Same engine, but its own Triton model: serving one version never shares (or unloads) another's.
    name = again.io["triton_model_name"]
    assert name != fp32.io["triton_model_name"] and name.startswith(unique_name + "-again_v1")
    assert again.engine_uri == f"{fp32.engine_uri}/{name}"
    assert f'name: "{name}"' in mlflow_store.read_artifact_text(again.engine_uri, f"triton/python/{name}/config.pbtxt")


def test_a_variant_that_misses_the_parity_gate_is_kept_as_rejected_with_its_figures(model_archive, unique_name):
    version = _ready_version(unique_name, model_archive, **{"parity.fp32.label_agreement": "1.5"})
    fp32 = next(b for b in _builds(version) if b.precision == "fp32")
    assert engine_build_execute(fp32.pk, "w") == BuildStatus.REJECTED
    fp32.refresh_from_db()
    assert fp32.parity["passed"] is False and "label_agreement 1.0000 < 1.5" in fp32.error
    assert fp32.engine_uri  # kept as evidence


def test_the_builds_api_shows_state_figures_and_log(model_archive, unique_name, scientist):
    version = _ready_version(unique_name, model_archive)
    build = _builds(version)[0]
    engine_build_execute(build.pk, "w")
    listed = scientist.get(f"/api/v1/models/{unique_name}/versions/1/builds/").json()["results"]
    shown = next(item for item in listed if item["id"] == build.pk)
    assert shown["status"] == "succeeded" and shown["parity"]["passed"] and "exported to ONNX" in shown["log"]
    detail = scientist.get(f"/api/v1/models/{unique_name}/versions/1/builds/{build.pk}/")
    assert detail.json()["variant"] == "cpu-fp32-onnxruntime"


def test_a_version_that_is_not_ready_gets_no_builds(model_archive, unique_name, scientist):
    version_register_from_archive(SYSTEM, unique_name, model_archive)
    resp = scientist.post(f"/api/v1/models/{unique_name}/versions/1/builds/")
    assert resp.status_code == 409
    assert "engines are built for ready versions" in resp.json()["error"]["message"]


def test_a_worker_killed_mid_build_leaves_no_engine_and_the_build_restarts_cleanly(model_archive, unique_name,
                                                                                   settings):
    from conftest import _test_database_url

    version = _ready_version(unique_name, model_archive)
    build = _builds(version)[0]
    worker = subprocess.Popen(
        [sys.executable, "-c", "import django; django.setup(); from pipelines.builder import engine_build_execute; "
                               f"engine_build_execute({build.pk}, 'doomed')"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": _test_database_url()},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        build.refresh_from_db()
        if build.step == "build":
            break
        time.sleep(0.2)
    assert build.step == "build", build.log
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its build process, mid-build
    worker.wait()
    build.refresh_from_db()
    assert build.status == BuildStatus.RUNNING and build.engine_uri == ""  # nothing usable recorded

    # Its heartbeat is fresh, but its claim died with its worker: requeued at the next pass, not after a timeout.
    # (The server drops a killed connection's claim a moment after the kill; on a loaded machine the pass came
    # first: wait, boundedly, until the database sees the worker gone.)
    assert build.heartbeat_at > timezone.now() - timedelta(seconds=settings.PLATFORM["BUILD_STALE_S"])
    gone = time.monotonic() + 10
    while locks.claimed_elsewhere("build.run", build.pk) and time.monotonic() < gone:
        time.sleep(0.05)
    assert engine_builds_reconcile() >= 1
    build.refresh_from_db()
    assert build.status == BuildStatus.QUEUED
    assert engine_build_execute(build.pk, "second-worker") == BuildStatus.SUCCEEDED
    build.refresh_from_db()
    assert build.attempts == 2 and mlflow_store.read_artifact_text(build.engine_uri, "COMPLETE")


def test_the_packaged_entry_loads_in_triton_and_answers_like_the_original_model(model_archive, unique_name,
                                                                                sklearn_model_dir):
    import mlflow.sklearn
    import tritonclient.http as triton_http
    from sklearn.datasets import load_digits

    from pipelines.triton_local import TritonServer

    version = _ready_version(unique_name, model_archive)
    build = next(b for b in _builds(version) if b.precision == "fp32")
    engine_build_execute(build.pk, "w")
    build.refresh_from_db()
    name = build.io["triton_model_name"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = mlflow_store.download_model(f"{build.engine_uri}/triton/python", Path(tmp) / "repo")
        server = TritonServer(repo, Path(tmp) / "triton")
        server.start()
        try:
            client = triton_http.InferenceServerClient(server.url)
            client.load_model(name)
            X = load_digits(return_X_y=True)[0][1000:1064].astype(np.float32)
            inp = triton_http.InferInput("input", list(X.shape), "FP32")
            inp.set_data_from_numpy(X)
            result = client.infer(name, [inp])
            client.close()
        finally:
            server.stop()
    original = mlflow.sklearn.load_model(str(sklearn_model_dir))
    assert np.array_equal(result.as_numpy("label").ravel(), original.predict(X))
    assert np.abs(result.as_numpy("probabilities") - original.predict_proba(X)).max() < 1e-4


def test_a_reference_sample_given_at_registration_is_what_parity_is_checked_on(model_archive, unique_name,
                                                                              scientist, tmp_path):
    from sklearn.datasets import load_digits

    X = load_digits(return_X_y=True)[0][:300]
    csv_path = tmp_path / "sample.csv"
    csv_path.write_text(",".join(f"px{i}" for i in range(64)) + "\n" +
                        "\n".join(",".join(str(v) for v in row) for row in X))
    with open(model_archive, "rb") as archive, open(csv_path, "rb") as sample:
        resp = scientist.post(f"/api/v1/models/{unique_name}/versions/",
                              {"archive": archive, "reference_sample": sample}, format="multipart")
    assert resp.status_code == 201, resp.content
    assert resp.json()["lineage"]["reference_sample_rows"] == 300
    version = version_transition(_version_id(unique_name), VersionStatus.READY)
    fp32 = next(b for b in _builds(version) if b.precision == "fp32")
    engine_build_execute(fp32.pk, "w")
    fp32.refresh_from_db()
    assert "sample 300 rows x 64 features" in fp32.log and "parity on 256 rows" in fp32.log
    # The reference set drift is judged against: those rows, and the original model's prediction for each.
    import json

    import mlflow.sklearn

    version.refresh_from_db()
    folder, _, name = version.reference_uri.rpartition("/")
    reference = json.loads(mlflow_store.read_artifact_text(folder, name))
    assert reference["input"] == fp32.io["inputs"][0]["name"] and len(reference["rows"]) == 300
    with tempfile.TemporaryDirectory() as tmp:
        original = mlflow.sklearn.load_model(str(mlflow_store.download_model(version.storage_location, Path(tmp))))
    assert reference["prediction"] == original.predict(X).tolist()
    assert scientist.get(f"/api/v1/models/{unique_name}/versions/1/").json()["lineage"]["reference_uri"] == \
        version.reference_uri
    # A version of the same model bytes on the same rows reuses the engine, and the reference set with it.
    with open(model_archive, "rb") as archive, open(csv_path, "rb") as sample:
        scientist.post(f"/api/v1/models/{unique_name}-again/versions/",
                       {"archive": archive, "reference_sample": sample}, format="multipart")
    again = version_transition(_version_id(f"{unique_name}-again"), VersionStatus.READY)
    engine_build_execute(next(b for b in _builds(again) if b.precision == "fp32").pk, "w")
    again.refresh_from_db()
    assert again.reference_uri == version.reference_uri


def _version_id(name: str) -> int:
    from registry.models import ModelVersion

    return ModelVersion.objects.get(model__name=name, version=1).pk


@pytest.mark.parametrize(("content", "words"), [
    (b'[[1, 2], [3]]', "not a numeric table"),
    (b'{"rows": 1}', "numbers"),
    (b'[[1, NaN]]', "NaN"),
    (b'', "empty"),
])
def test_a_bad_reference_sample_is_refused_and_nothing_is_registered(model_archive, unique_name, scientist, tmp_path,
                                                                     content, words):
    from registry.models import ModelVersion

    bad = tmp_path / "sample.json"
    bad.write_bytes(content)
    with open(model_archive, "rb") as archive, open(bad, "rb") as sample:
        resp = scientist.post(f"/api/v1/models/{unique_name}/versions/",
                              {"archive": archive, "reference_sample": sample}, format="multipart")
    assert resp.status_code == 400, resp.content
    assert words in resp.json()["error"]["message"]
    assert not ModelVersion.objects.filter(model__name=unique_name).exists()
