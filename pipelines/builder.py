"""Carry out one engine build: claim it, fetch the model, build in the sandbox process, package the
Triton entries, store everything in MLflow's artifact store, record the outcome.

A build is content-addressed (model artifact hash, variant, toolchain versions); its files go to
`mlflow-artifacts:/engines/<content_key>/`, and the row points at them only after the last file (a
COMPLETE marker) is written, so a worker killed at any moment leaves no engine that looks usable;
the next attempt rewrites the same paths.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from pipelines import packaging
from pipelines.models import BuildStatus, EngineBuild
from pipelines.services import build_append_log, build_transition, thresholds_for
from registry import confinement, locks, mlflow_store
from registry.archives import uses_pickle
from registry.errors import TransitionError
from registry.models import ModelVersion
from registry.samples import load_sample
from registry.services import DATABASE_UNAVAILABLE, model_download

SANDBOX = Path(__file__).resolve().parent / "build_sandbox.py"
OPSET = 17
TOOLCHAIN_PACKAGES = ("onnx", "onnxruntime", "skl2onnx", "onnxconverter-common", "torch", "scikit-learn")
REFERENCES = "mlflow-artifacts:/references"  # reference sets (sample rows and the original model's predictions)


def toolchain_versions() -> dict[str, str]:
    versions = {}
    for name in TOOLCHAIN_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["opset"] = str(OPSET)
    return versions


def tree_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def content_key(artifact_sha: str, build: EngineBuild, toolchain: dict[str, str]) -> str:
    blob = json.dumps([artifact_sha, build.target, build.precision, build.runtime, toolchain], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_rows(version: ModelVersion) -> list[Any]:
    """Rows to check parity on: the reference sample given at registration, else the version's input
    example (in any of MLflow's saved forms)."""
    if version.reference_sample_uri:
        return load_sample(version.reference_sample_uri)
    example: Any = version.input_example
    if isinstance(example, dict):
        for key in ("inputs", "instances", "data"):
            if key in example:
                example = example[key]
                break
        else:
            if "dataframe_split" in example:
                example = example["dataframe_split"].get("data")
    if isinstance(example, list) and example and isinstance(example[0], dict):
        columns = [c["name"] for c in (version.signature or {}).get("inputs", []) if "name" in c] or list(example[0])
        example = [[row[c] for c in columns] for row in example]
    if isinstance(example, list) and example and not isinstance(example[0], list):
        example = [example]
    if not isinstance(example, list) or not example:
        raise ValueError("the version has no input example to check parity on; log the model with "
                         "input_example=... (a few rows of real input)")
    return example


def warmup_row(version: ModelVersion) -> Any:
    """One row of real input for Triton to warm the engine up with, or None (zeros are used)."""
    try:
        return sample_rows(version)[0]
    except (ValueError, OSError, IndexError, TypeError):
        return None


def _claim(build_id: int, worker: str) -> bool:
    try:
        build_transition(build_id, BuildStatus.RUNNING, only_from={BuildStatus.QUEUED}, claimed_by=worker,
                         attempts=F("attempts") + 1, heartbeat_at=timezone.now(), step="claimed", error="")
        return True
    except TransitionError:
        pass
    # Running, yet no live worker holds it (we hold the build's claim): its worker died. Take it over.
    taken = EngineBuild.objects.filter(pk=build_id, status=BuildStatus.RUNNING).update(
        claimed_by=worker, heartbeat_at=timezone.now(), attempts=F("attempts") + 1)
    if taken:
        build_append_log(build_id, ["resuming: the previous attempt was interrupted; starting the build again"])
    return bool(taken)


def engine_build_execute(build_id: int, worker: str) -> str:
    """Build once, whoever asks: the build's claim (held while it runs, dropped by the database when
    the worker dies) lets one worker at a time work on it."""
    with locks.claim("build.run", build_id) as mine:
        if not mine:
            return "claimed by another worker"
        return _execute(build_id, worker)


def _execute(build_id: int, worker: str) -> str:
    build = EngineBuild.objects.select_related("version__model").get(pk=build_id)
    if build.status in (BuildStatus.SUCCEEDED, BuildStatus.REJECTED, BuildStatus.FAILED):
        return build.status
    if not _claim(build_id, worker):
        return "claimed by another worker"
    try:
        return _run(EngineBuild.objects.select_related("version__model").get(pk=build_id))
    except DATABASE_UNAVAILABLE:
        raise  # not the build's fault: its task tries again once the database is back
    except Exception as exc:  # noqa: BLE001 - recorded on the build; the task does not retry blindly
        build_transition(build_id, BuildStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:4000])
        return BuildStatus.FAILED


def _run(build: EngineBuild) -> str:
    version = build.version
    with tempfile.TemporaryDirectory(prefix="build-") as tmp_name:
        tmp = Path(tmp_name)
        build_append_log(build.pk, [f"fetching {version.storage_location}"], step="fetch")
        model_dir = model_download(version, tmp / "model")
        toolchain = toolchain_versions()
        key = content_key(tree_sha256(model_dir), build, toolchain)
        EngineBuild.objects.filter(pk=build.pk).update(content_key=key, toolchain=toolchain)
        reused = _reuse(build, key)
        if reused:
            return reused
        rows = sample_rows(version)
        spec = {"model_dir": str(model_dir), "out_dir": str(tmp / "out"), "target": build.target,
                "precision": build.precision, "runtime": build.runtime, "flavors": version.flavors,
                "signature": version.signature, "sample": rows, "opset": OPSET,
                "thresholds": thresholds_for(version, build.precision)}
        (tmp / "spec.json").write_text(json.dumps(spec))
        build_append_log(build.pk, [f"building {build.variant} in an isolated process (key {key[:12]})"],
                         step="build")
        result = _sandbox(build, tmp)
        build_append_log(build.pk, result.get("log", []))
        if not result.get("ok"):
            build_transition(build.pk, BuildStatus.FAILED, step="build", error=result.get("error", "unknown error"))
            return BuildStatus.FAILED
        return _package_and_store(build, key, tmp / "out", result)


def _sandbox(build: EngineBuild, tmp: Path) -> dict[str, Any]:
    """Build in the model sandbox: the model's folder and the spec read-only, out/ and a scratch home
    writable; a heartbeat every couple of seconds so a live build is never taken for a stale one."""
    timeout = settings.PLATFORM["BUILD_TIMEOUT_S"]
    outcome = confinement.run(confinement.Job(
        script=SANDBOX, args=[str(tmp / "spec.json")], read_only=[tmp / "model", tmp / "spec.json"],
        writable=[tmp / "home", tmp / "out"], timeout_s=timeout, timeout_setting="PLATFORM_BUILD_TIMEOUT_S",
        what="the build", devices=confinement.gpu_devices() if build.target == "gpu" else [],
        unpickles=uses_pickle(build.version.flavors), on_wait=lambda: build_append_log(build.pk, [])))
    result = outcome.report("BUILD-RESULT ")
    if result is None:
        return {"ok": False, "error": outcome.failure()}
    if not result.get("ok"):
        result["error"] = outcome.explain(str(result.get("error", "")))
    return result


def _package_and_store(build: EngineBuild, key: str, out: Path, result: dict[str, Any]) -> str:
    version = build.version
    engine = out / "engine.onnx"
    build_append_log(build.pk, ["packaging Triton model-repository entries"], step="package")
    name = packaging.triton_model_name(version.model.name, version.version, build.variant)
    settings_ = packaging.settings_from_metadata({**version.model.tags, **version.tags}, build.target)
    packaging.write_entries(engine, out / "triton", name, result["io"], settings_, build.precision, build.runtime,
                            warmup_row(version))
    sha = hashlib.sha256(engine.read_bytes()).hexdigest()
    passed = bool(result["parity"]["passed"])
    report = {"model": version.model.name, "version": version.version, "variant": build.variant,
              "content_key": key, "triton_model_name": name, "engine_sha256": sha, **result}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _store_reference(version, out / "reference.json")
    uri = f"mlflow-artifacts:/engines/{key}"
    build_append_log(build.pk, [f"storing in {uri}"], step="store")
    mlflow_store.upload_artifacts(out, uri, "")
    marker = out.parent / "marker"
    marker.mkdir()
    (marker / "COMPLETE").write_text(json.dumps({"engine_sha256": sha}))
    mlflow_store.upload_artifacts(marker, uri, "")  # last: only now is the engine complete
    status = BuildStatus.SUCCEEDED if passed else BuildStatus.REJECTED
    build_transition(
        build.pk, status, step="done", io={**result["io"], "triton_model_name": name, "triton_settings": settings_},
        parity=result["parity"],
        size_bytes=engine.stat().st_size, sha256=sha, build_seconds=result.get("build_seconds"), engine_uri=uri,
        toolchain={**result.get("toolchain", {}), **toolchain_versions()},
        error="" if passed else "missed the parity gate: " + "; ".join(result["parity"]["failures"]),
    )
    return status


def _store_reference(version: ModelVersion, path: Path) -> None:
    """The version's reference set (the sample and the original model's predictions on it, written by the
    build), content-addressed in the artifact store; the version keeps the first one."""
    if not path.exists():
        return
    data = path.read_bytes()
    path.unlink()  # not a file of the engine
    ModelVersion.objects.filter(pk=version.pk, reference_uri="").update(reference_uri=reference_upload(data))


def reference_upload(data: bytes) -> str:
    """Store a reference set (JSON) in the artifact store under its content's hash; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        name = f"{hashlib.sha256(data).hexdigest()}.json"
        (Path(tmp) / name).write_bytes(data)
        mlflow_store.upload_artifacts(Path(tmp), REFERENCES, "")
    return f"{REFERENCES}/{name}"


def _same_sample(a: ModelVersion, b: ModelVersion) -> bool:
    return a.reference_sample_uri == b.reference_sample_uri and (
        a.reference_sample_uri != "" or a.input_example == b.input_example)


def _reuse(build: EngineBuild, key: str) -> str | None:
    """Another build with the same content key is complete: take its engine instead of building. Its
    Triton entries are written again when this version's name or serving settings differ (every version
    is its own Triton model, or unloading one would unload the other). A different parity threshold
    means a fresh build: the verdict belongs to the thresholds."""
    version = build.version
    thresholds = thresholds_for(version, build.precision)
    done = next((b for b in EngineBuild.objects.filter(
        content_key=key, status__in=[BuildStatus.SUCCEEDED, BuildStatus.REJECTED]).exclude(pk=build.pk)
        if b.parity.get("thresholds") == thresholds.get(b.parity.get("kind", ""), {})), None)
    if done is None:
        return None
    build_append_log(build.pk, [f"identical build #{done.pk} exists (same model bytes, variant and toolchain); "
                                "reusing its engine"], step="reuse")
    name = packaging.triton_model_name(version.model.name, version.version, build.variant)
    settings_ = packaging.settings_from_metadata({**version.model.tags, **version.tags}, build.target)
    io, uri = done.io, done.engine_uri
    if done.io.get("triton_model_name") != name or done.io.get("triton_settings") != settings_:
        uri = f"{done.engine_uri}/{name}"
        with tempfile.TemporaryDirectory(prefix="repack-") as tmp_name:
            out = Path(tmp_name) / "out"
            mlflow_store.download_file(done.engine_uri, "engine.onnx", out)
            io = {**done.io, "triton_model_name": name, "triton_settings": settings_}
            packaging.write_entries(out / "engine.onnx", out / "triton", name, io, settings_, build.precision,
                                    build.runtime, warmup_row(version))
            (out / "COMPLETE").write_text(json.dumps({"engine_sha256": done.sha256}))
            mlflow_store.upload_artifacts(out, uri, "")
        build_append_log(build.pk, [f"Triton entries written for {name} in {uri}"])
    if done.version.reference_uri and _same_sample(version, done.version):  # the same model on the same rows
        ModelVersion.objects.filter(pk=version.pk, reference_uri="").update(reference_uri=done.version.reference_uri)
    build_transition(build.pk, done.status, step="done", io=io, parity=done.parity, size_bytes=done.size_bytes,
                     sha256=done.sha256, build_seconds=0.0, engine_uri=uri, reused_from=done, error=done.error)
    return done.status
