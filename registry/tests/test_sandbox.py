"""Model artifacts are never unpickled in the web process: pickle-based flavors are opened only in an
isolated subprocess without the platform's secrets, and an operator setting can refuse them outright."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.inspection import inspect_model
from registry.mlflow_store import registry_store
from registry.models import ModelVersion, RegisteredModel, VersionStatus
from registry.tasks import version_validate
from registry.tests.conftest import model_code

# Classes the probe models are pickled as. They live in their own module, shipped inside each model
# (code_paths), so the sandbox imports them the way it would any model's code.
PROBE_SOURCE = '''
import json
import os
import subprocess
import sys
import time

import mlflow.pyfunc


class SpyModel(mlflow.pyfunc.PythonModel):
    """Writes down who unpickled it, and with which environment."""

    def __init__(self, report_path):
        self.report_path = report_path

    def __setstate__(self, state):
        self.__dict__.update(state)
        try:  # succeeds only where the host's files are in reach: anywhere but the sandbox
            with open(self.report_path, "w") as fh:
                json.dump({"pid": os.getpid(), "ppid": os.getppid(), "env": dict(os.environ)}, fh)
        except OSError:
            pass

    def predict(self, context, model_input, params=None):
        return model_input * 2


class FailingPredict(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        raise ValueError("probe: this model cannot predict")


class SlowLoad(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        time.sleep(600)

    def predict(self, context, model_input, params=None):
        return model_input


class LeavesAProcessBehind(mlflow.pyfunc.PythonModel):
    def __init__(self, marker):
        self.marker = marker

    def load_context(self, context):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", self.marker], start_new_session=True)

    def predict(self, context, model_input, params=None):
        return model_input
'''


# ---- models -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with model_code(tmp_path_factory.mktemp("probe-code"), "sandbox_probe_models", PROBE_SOURCE) as module:
        yield module


def save_probe(probe_module: Any, dest: Path, model: Any, with_example: bool = True) -> Path:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    mlflow.pyfunc.save_model(
        str(dest), python_model=model, code_paths=[str(probe_module.FILE)],
        input_example=example if with_example else None, signature=infer_signature(example, example),
        pip_requirements=["mlflow"],  # no requirement inference: it would load the model here
    )
    return dest


def tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            tf.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


# ---- helpers ------------------------------------------------------------------------------------

def post_archive(client: Any, name: str, data: bytes) -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("model.tar.gz", data, content_type="application/gzip")
    return client.post(f"/api/v1/models/{name}/versions/", {"archive": upload}, format="multipart")


def assert_nothing_registered(name: str) -> None:
    assert not ModelVersion.objects.filter(model__name=name).exists()
    model = RegisteredModel.objects.filter(name=name).first()
    assert model is None or model.version_count == 0
    assert list(registry_store().search_model_versions(f"name = '{name}'")) == []


@pytest.fixture
def platform_settings(settings: Any) -> Callable[..., None]:
    def override(**changes: Any) -> None:
        settings.PLATFORM = {**settings.PLATFORM, **changes}

    return override


def running_with(marker: str) -> list[int]:
    """Processes on this machine whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def validated(name: str, number: int = 1) -> ModelVersion:
    version = ModelVersion.objects.get(model__name=name, version=number)
    assert version.status == VersionStatus.VALIDATING
    version_validate(version.pk)
    version.refresh_from_db()
    return version


# ---- refusing pickles by policy -----------------------------------------------------------------

@pytest.mark.django_db
def test_refuse_pickle_flavors_turns_away_a_pickled_sklearn_model_with_a_422(
        scientist, unique_name, platform_settings, pickled_sklearn_dir):
    platform_settings(REFUSE_PICKLE_FLAVORS=True)
    resp = post_archive(scientist, unique_name, tar_gz(pickled_sklearn_dir))
    assert resp.status_code == 422, resp.content
    assert resp.json()["error"]["code"] == "refused_by_policy"
    assert "PLATFORM_REFUSE_PICKLE_FLAVORS" in resp.json()["error"]["message"]
    assert_nothing_registered(unique_name)


@pytest.mark.django_db
def test_refuse_pickle_flavors_turns_away_a_pyfunc_python_model(
        scientist, unique_name, platform_settings, probe_module, tmp_path):
    platform_settings(REFUSE_PICKLE_FLAVORS=True)
    folder = save_probe(probe_module, tmp_path / "m", probe_module.FailingPredict(), with_example=False)
    resp = post_archive(scientist, unique_name, tar_gz(folder))
    assert resp.status_code == 422, resp.content
    assert "PLATFORM_REFUSE_PICKLE_FLAVORS" in resp.json()["error"]["message"]
    assert_nothing_registered(unique_name)


@pytest.mark.django_db
def test_refuse_pickle_flavors_is_not_fooled_by_a_pyfunc_entry_that_hides_its_sklearn_flavor(
        scientist, unique_name, platform_settings, pickled_sklearn_dir, tmp_path):
    # mlflow.sklearn's pyfunc loader unpickles model.pkl when there is no sklearn entry to say otherwise.
    folder = tmp_path / "m"
    shutil.copytree(pickled_sklearn_dir, folder)
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
                                    "    model_path: model.pkl\n")
    platform_settings(REFUSE_PICKLE_FLAVORS=True)
    resp = post_archive(scientist, unique_name, tar_gz(folder))
    assert resp.status_code == 422, resp.content
    assert_nothing_registered(unique_name)


@pytest.mark.django_db
def test_refuse_pickle_flavors_also_applies_to_registering_from_a_uri(
        scientist, unique_name, platform_settings, pickled_sklearn_dir):
    assert post_archive(scientist, unique_name, tar_gz(pickled_sklearn_dir)).status_code == 201
    platform_settings(REFUSE_PICKLE_FLAVORS=True)
    other = unique_name + "-copy"
    resp = scientist.post(f"/api/v1/models/{other}/versions/", {"source": f"models:/{unique_name}/1"}, format="json")
    assert resp.status_code == 422, resp.content
    assert "PLATFORM_REFUSE_PICKLE_FLAVORS" in resp.json()["error"]["message"]
    assert_nothing_registered(other)


@pytest.mark.django_db
def test_refuse_pickle_flavors_still_accepts_onnx_and_skops_models(
        scientist, unique_name, platform_settings, onnx_dir, sklearn_model_dir):
    platform_settings(REFUSE_PICKLE_FLAVORS=True)
    resp = post_archive(scientist, unique_name, tar_gz(onnx_dir))
    assert resp.status_code == 201, resp.content
    assert "onnx" in resp.json()["lineage"]["flavors"]
    assert "skops" in (sklearn_model_dir / "MLmodel").read_text()  # the shared fixture: MLflow 3's default
    resp = post_archive(scientist, unique_name, tar_gz(sklearn_model_dir))
    assert resp.status_code == 201, resp.content
    assert sorted(int(mv.version) for mv in registry_store().search_model_versions(f"name = '{unique_name}'")) == [1, 2]


# ---- opening models only in the sandbox ---------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_pickled_model_is_opened_only_in_the_sandbox_never_in_the_web_process(
        scientist, unique_name, probe_module, tmp_path):
    report = tmp_path / "unpickled-by.json"
    folder = save_probe(probe_module, tmp_path / "spy", probe_module.SpyModel(str(report)))
    report.unlink(missing_ok=True)  # saving may have loaded it to check the input example

    # Registering it every way the web process can: it is never unpickled there.
    resp = post_archive(scientist, unique_name, tar_gz(folder))
    assert resp.status_code == 201, resp.content
    run_id = resp.json()["lineage"]["run_id"]
    for source in (f"runs:/{run_id}/model", f"models:/{unique_name}/1"):
        again = scientist.post(f"/api/v1/models/{unique_name}/versions/", {"source": source}, format="json")
        assert again.status_code == 201, again.content
    assert not report.exists()

    version = validated(unique_name)

    assert not report.exists()  # opened where the test's folder is out of reach (what it can reach: test_confinement)
    assert version.status == VersionStatus.READY, version.status_detail
    assert version.status_detail == "loaded and predicted on its input example in isolation"
    assert version.inspection["confined"] is True
    assert version.inspection["pid"] == 2  # the model's own PID namespace: the sandbox's init is 1
    assert version.inspection["output_shape"] == [3, 1]


@pytest.mark.django_db(transaction=True)
def test_a_truncated_pickle_registers_but_validation_marks_it_invalid_with_the_loading_error(
        scientist, unique_name, pickled_sklearn_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pickled_sklearn_dir, folder)
    pickle = (folder / "model.pkl").read_bytes()
    (folder / "model.pkl").write_bytes(pickle[: len(pickle) // 2])
    resp = post_archive(scientist, unique_name, tar_gz(folder))
    assert resp.status_code == 201, resp.content  # the archive itself is fine

    version = validated(unique_name)
    assert version.status == VersionStatus.INVALID
    assert version.status_detail.startswith("loading the model failed:"), version.status_detail
    assert "UnpicklingError" in version.status_detail and "truncated" in version.status_detail
    assert version.inspection["ok"] is False


@pytest.mark.django_db(transaction=True)
def test_a_model_that_fails_on_its_own_input_example_is_invalid(scientist, unique_name, probe_module, tmp_path):
    folder = save_probe(probe_module, tmp_path / "m", probe_module.FailingPredict())
    assert post_archive(scientist, unique_name, tar_gz(folder)).status_code == 201
    version = validated(unique_name)
    assert version.status == VersionStatus.INVALID
    assert version.status_detail == ("predicting on the model's input example failed: "
                                     "ValueError: probe: this model cannot predict")


@pytest.mark.django_db(transaction=True)
def test_a_model_that_loads_too_slowly_is_stopped_and_marked_invalid(
        scientist, unique_name, probe_module, platform_settings, tmp_path):
    folder = save_probe(probe_module, tmp_path / "m", probe_module.SlowLoad(), with_example=False)
    assert post_archive(scientist, unique_name, tar_gz(folder)).status_code == 201
    platform_settings(INSPECT_TIMEOUT_S=3)
    started = time.monotonic()
    version = validated(unique_name)
    assert time.monotonic() - started < 30  # the model sleeps for 600 s
    assert version.status == VersionStatus.INVALID
    assert version.status_detail == ("loading the model took longer than 3s (PLATFORM_INSPECT_TIMEOUT_S) "
                                     "and was stopped")


def test_processes_a_model_starts_are_killed_when_its_inspection_ends(probe_module, tmp_path, settings):
    marker = f"left-behind-{os.getpid()}-{time.monotonic_ns()}"
    folder = save_probe(probe_module, tmp_path / "m", probe_module.LeavesAProcessBehind(marker), with_example=False)
    started = time.monotonic()
    report = inspect_model(folder)
    assert report["ok"] is True, report
    assert time.monotonic() - started < 60  # a child still running does not stall us
    deadline = time.monotonic() + 5
    while running_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_with(marker) == []


# ---- the validation task itself -----------------------------------------------------------------

@pytest.mark.django_db
def test_a_version_whose_artifacts_are_outside_the_store_becomes_invalid_not_stuck(
        scientist, unique_name, model_archive):
    assert post_archive(scientist, unique_name, model_archive.read_bytes()).status_code == 201
    ModelVersion.objects.filter(model__name=unique_name, version=1).update(storage_location="s3://elsewhere/model")
    version = validated(unique_name)
    assert version.status == VersionStatus.INVALID
    assert "could not be downloaded" in version.status_detail and "s3://elsewhere/model" in version.status_detail


@pytest.mark.django_db
def test_a_validation_that_loses_the_race_to_another_run_leaves_the_winners_result(
        scientist, unique_name, model_archive, monkeypatch):
    from registry import inspection, services

    assert post_archive(scientist, unique_name, model_archive.read_bytes()).status_code == 201
    version = ModelVersion.objects.get(model__name=unique_name, version=1)

    def another_worker_finishes_first(model_dir: Path, **_: Any) -> dict[str, Any]:
        services.version_transition(version.pk, VersionStatus.READY, detail="the other run")
        return {"ok": False, "error": "this run's late verdict"}

    monkeypatch.setattr(inspection, "inspect_model", another_worker_finishes_first)
    assert version_validate(version.pk) == "nothing to do"
    version.refresh_from_db()
    assert (version.status, version.status_detail) == (VersionStatus.READY, "the other run")
    assert version_validate(version.pk) == "nothing to do"  # and running it again changes nothing
