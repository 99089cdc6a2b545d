"""HIL runs end to end: a kept engine is measured by a real worker of its hardware profile in a Triton server of
its own, interleaved with the champion's engine, judged, logged to MLflow; runs without a worker wait and
time out; deployments need a passing run on the fleet's profile unless a release manager overrides."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from pipelines import hardware, hil
from pipelines.builder import engine_build_execute
from pipelines.models import BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import hil_objectives, hil_runs_request, serving_profile
from pipelines.tasks import hil_runs_reconcile
from registry import mlflow_store
from registry.audit import SYSTEM
from registry.models import AuditEvent, VersionStatus
from registry.roles import Role
from registry.services import version_register_from_archive, version_transition

pytestmark = pytest.mark.django_db(transaction=True)


def _kept_engine(name: str, archive: Path, **tags: str) -> EngineBuild:
    version = version_register_from_archive(SYSTEM, name, archive, tags=tags or None)
    version = version_transition(version.pk, VersionStatus.READY, detail="granted by the test")
    build = EngineBuild.objects.get(version=version, precision="fp32")
    assert engine_build_execute(build.pk, "test-worker") == BuildStatus.SUCCEEDED
    return EngineBuild.objects.select_related("version__model").get(pk=build.pk)


@pytest.fixture
def quick_sweep(settings: Any) -> None:
    """Short windows and two concurrencies: a run of two engines in well under a minute."""
    settings.PLATFORM = {**settings.PLATFORM, "HIL_WINDOW_S": 0.3, "HIL_CONCURRENCIES": [1, 2], "HIL_MAX_TRIALS": 12}


def _wait_finished(run_id: int, timeout: float, proc: Any) -> HilRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        run = HilRun.objects.get(pk=run_id)
        if run.status not in (HilStatus.WAITING, HilStatus.RUNNING):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout:.0f} s: {HilRun.objects.get(pk=run_id).log}")


def test_a_kept_engine_is_measured_by_a_worker_of_its_profile_against_the_champion(
        model_archive, unique_name, platform_process, hil_on, quick_sweep, settings):
    settings.PLATFORM = {**settings.PLATFORM, "HIL_AUTO": False}
    champion = _kept_engine(unique_name, model_archive)
    mlflow_store.alias_set(unique_name, mlflow_store.CHAMPION, 1)
    settings.PLATFORM = {**settings.PLATFORM, "HIL_AUTO": True}
    candidate = _kept_engine(unique_name, model_archive, **{"hil.p99_ms": "5000"})
    # Kept, so measured: a run waits in the queue of the fleet's profile (this machine's best).
    [run] = HilRun.objects.filter(build=candidate)
    profile = hardware.local_profile()
    assert profile is not None and run.profile == profile.name == serving_profile("cpu")
    assert run.status == HilStatus.WAITING and run.sweep["window_s"] == 0.3
    assert not HilRun.objects.filter(build=champion).exists()

    args = ["celery", "-A", "config", "worker", "--loglevel", "INFO", "--concurrency", "1", "--queues", "hil",
            "--hostname", f"hil-{uuid.uuid4().hex[:8]}@%h"]
    with platform_process(args, "hil-worker") as proc:
        run = _wait_finished(run.pk, 240, proc)

    # Two engines of the same model bytes: the candidate must not be judged worse than the champion. It
    # passes, or, on a machine too busy for three windows in a row to agree, is unstable: never failed.
    assert run.status in (HilStatus.PASSED, HilStatus.UNSTABLE), run.verdict
    assert run.champion_build_id == champion.pk and run.worker.startswith("hil-")
    assert run.hardware["arch"] == profile.arch and run.started_at and run.finished_at
    results = run.results
    cand, champ = results["candidate"]["points"], results["champion"]["points"]
    # The sweep: batch 1 and the engine's max_batch_size, at concurrencies 1 and 2, both engines at each point.
    max_batch = candidate.io["triton_settings"]["max_batch_size"]
    assert [(p["batch_size"], p["concurrency"]) for p in cand] == [(1, 1), (1, 2), (max_batch, 1), (max_batch, 2)]
    assert [(p["batch_size"], p["concurrency"]) for p in champ] == [(p["batch_size"], p["concurrency"]) for p in cand]
    for p in cand + champ:
        assert p["requests"] > 0 and p["errors"] == 0 and 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]
        assert p["inferences_per_s"] == pytest.approx(p["requests_per_s"] * p["batch_size"])
        assert p["queue_ms"] is not None and p["compute_ms"] > 0 and p["server_requests"] > 0
        assert len(p["trials"]) == p["windows"] >= 3
    assert [r["p99_pct"] is not None for r in results["comparison"]] == [True] * 4
    assert results["candidate"]["memory_bytes"] > results["empty_server_memory_bytes"] > 0
    # The server and the load clients on CPUs of their own, where the machine has two or more.
    split = hil.cpu_split()
    if split is None:
        assert results["cpus"] is None and "server and load clients on any CPU" in run.log
    else:
        assert results["cpus"] == {"server": list(split.server), "clients": list(split.clients),
                                   "words": split.words()}
        assert results["settings"]["client_cpus"] == list(split.clients) and split.words() in run.log
    # Accuracy through the server on the version's reference set, against the original model's labels.
    assert results["accuracy"]["measured"] and results["accuracy"]["passed"]
    assert results["accuracy"]["figures"]["label_agreement"] == 1.0
    checks = {c["name"]: c for c in run.checks}
    assert checks["errors"]["outcome"] == "ok" and checks["accuracy"]["outcome"] == "ok"
    assert run.slo["p99_ms"] == {"value": 5000.0, "source": "version tag hil.p99_ms"}
    if run.status == HilStatus.PASSED:
        assert checks["champion"]["outcome"] == "ok" and "champion v1" in checks["champion"]["words"]
        assert checks["slo_p99"]["outcome"] == "ok" and "5000 ms budget" in run.verdict
    else:
        assert run.verdict.startswith("Unstable, not passed") and checks["stability"]["outcome"] == "fail"
    assert "candidate: concurrency 1, batch 1" in run.log and "champion: concurrency 1, batch 1" in run.log
    # Logged to the version's MLflow run: metrics and the whole evidence as an artifact.
    assert run.mlflow_run_id == candidate.version.run_id
    mlflow_run = mlflow_store.tracking_store().get_run(run.mlflow_run_id)
    prefix = f"hil.{run.profile}.cpu-fp32-onnxruntime"
    assert mlflow_run.data.metrics[f"{prefix}.passed"] == float(run.status == HilStatus.PASSED)
    assert mlflow_run.data.metrics[f"{prefix}.b1.c1.p99_ms"] == pytest.approx(cand[0]["p99_ms"])
    evidence = json.loads(mlflow_store.read_artifact_text(mlflow_run.info.artifact_uri,
                                                          f"hil/{run.profile}/run-{run.pk}.json"))
    assert evidence["verdict"] == run.verdict and len(evidence["candidate"]["points"]) == 4
    actions = list(AuditEvent.objects.filter(target_type="hil_run", target_id=str(run.pk)).order_by("id")
                   .values_list("action", flat=True))
    assert actions == ["hil.request", "hil.running", f"hil.{run.status}"]


def test_a_run_with_no_worker_of_its_profile_waits_saying_so_then_times_out(model_archive, unique_name, hil_on,
                                                                              settings, scientist):
    settings.PLATFORM = {**settings.PLATFORM, "HIL_AUTO": False}
    build = _kept_engine(unique_name, model_archive)
    # Nobody here serves Arm: the run waits in hil.cpu-arm64.
    answer = scientist.post(f"/api/v1/models/{unique_name}/versions/1/hil/", {"profiles": ["cpu-arm64"]},
                            format="json")
    assert answer.status_code == 202, answer.content
    [shown] = answer.json()
    assert shown["status"] == "waiting" and shown["profile"] == "cpu-arm64"
    assert "no worker of cpu-arm64 has ever announced itself; it times out at" in shown["waiting"]
    again = scientist.post(f"/api/v1/models/{unique_name}/versions/1/hil/", {"profiles": ["cpu-arm64"]},
                           format="json")
    assert [r["id"] for r in again.json()] == [shown["id"]]  # asking twice keeps the waiting run
    HilRun.objects.filter(pk=shown["id"]).update(wait_deadline=timezone.now() - timedelta(seconds=1))
    hil_runs_reconcile()
    run = HilRun.objects.get(pk=shown["id"])
    assert run.status == HilStatus.TIMED_OUT and run.finished_at and run.build_id == build.pk
    assert run.verdict.startswith("Timed out: no worker of cpu-arm64 took it within its wait of 3600 s")
    assert "none has ever announced itself" in run.verdict
    detail = scientist.get(f"/api/v1/hil/{run.pk}/").json()
    assert detail["status"] == "timed_out" and detail["waiting"] is None and detail["verdict"] == run.verdict
    wrong = scientist.post(f"/api/v1/models/{unique_name}/versions/1/hil/", {"profiles": ["gpu-h100"]},
                           format="json")
    assert wrong.status_code == 400 and "gpu-h100 is a gpu profile; build" in wrong.json()["error"]["message"]


def test_objectives_come_from_version_tags_then_model_tags_then_the_policy(model_archive, unique_name, client_as,
                                                                            settings):
    settings.PLATFORM = {**settings.PLATFORM, "HIL_AUTO": False}
    version = version_register_from_archive(SYSTEM, unique_name, model_archive, tags={"hil.p99_ms": "20"})
    version.model.tags = {"hil.p99_ms": "30", "hil.min_throughput": "100"}
    version.model.save()
    manager = client_as(Role.RELEASE_MANAGER)
    answer = manager.patch(f"/api/v1/models/{unique_name}/hil-policy/",
                           {"p99_ms": 40, "max_memory_mb": 512, "max_regression_pct": 5}, format="json")
    assert answer.status_code == 200, answer.content
    assert answer.json()["max_memory_mb"] == 512
    found = hil_objectives(version)
    assert found["p99_ms"] == {"value": 20.0, "source": "version tag hil.p99_ms"}
    assert found["min_throughput"] == {"value": 100.0, "source": "model tag hil.min_throughput"}
    assert found["max_memory_mb"] == {"value": 512, "source": "the model's HIL policy"}
    assert found["max_regression_pct"]["value"] == 5 and found["batch"]["value"] == 1
    assert client_as(Role.DATA_SCIENTIST).patch(f"/api/v1/models/{unique_name}/hil-policy/", {"p99_ms": 1},
                                                format="json").status_code == 403
    bad = manager.patch(f"/api/v1/models/{unique_name}/hil-policy/", {"batch": 0}, format="json")
    assert bad.status_code == 400 and "batch" in bad.json()["error"]["message"]
    assert AuditEvent.objects.filter(action="hil_policy.update", target_id=unique_name).count() == 1


def test_deployments_need_a_passing_run_on_the_fleets_profile_or_a_written_override(
        client_as, unique_name, hil_on):
    from deployer.testing import servable_model

    servable_model(unique_name, versions=1, int8=False)
    engine = EngineBuild.objects.get(version__model__name=unique_name)
    body = {"model": unique_name, "version": 1}
    ci, manager = client_as(Role.CI), client_as(Role.RELEASE_MANAGER)
    refused = ci.post("/api/v1/deployments/", body, format="json")
    assert refused.status_code == 409
    profile = serving_profile("cpu")
    assert (f"the engine cpu-fp32-onnxruntime of {unique_name} v1 has no finished HIL run on {profile}, the "
            "fleet's hardware") in refused.json()["error"]["message"]
    assert f"POST /api/v1/models/{unique_name}/versions/1/hil/" in refused.json()["error"]["message"]
    # A failed run is no better; CI may not override; a release manager may, with a reason.
    [run] = hil_runs_request(SYSTEM, engine)
    HilRun.objects.filter(pk=run.pk).update(status=HilStatus.FAILED, verdict="Failed: p99 9 ms over the 5 ms budget",
                                            finished_at=timezone.now())
    again = ci.post("/api/v1/deployments/", body, format="json")
    assert again.status_code == 409 and f"(run {run.pk}) failed: Failed: p99 9 ms" in again.json()["error"]["message"]
    reason = "hotfix for incident 42; HIL rerun booked for tonight"
    assert ci.post("/api/v1/deployments/", {**body, "hil_override": reason}, format="json").status_code == 403
    short = manager.post("/api/v1/deployments/", {**body, "hil_override": "because"}, format="json")
    assert short.status_code == 400 and "at least 10 characters" in short.json()["error"]["message"]
    made = manager.post("/api/v1/deployments/", {**body, "hil_override": reason}, format="json")
    assert made.status_code == 201, made.content
    assert made.json()["hil_override"] == reason and made.json()["hil_run"] == run.pk
    audit = AuditEvent.objects.get(action="deployment.create", target_id=str(made.json()["id"]))
    assert audit.after["hil"]["override"] == reason and "failed" in audit.after["hil"]["without"]
    assert audit.actor == manager.user


def test_a_passing_run_lets_the_deployment_through_and_is_recorded_on_it(client_as, unique_name, hil_on):
    from deployer.testing import servable_model

    servable_model(unique_name, versions=1, int8=False)
    engine = EngineBuild.objects.get(version__model__name=unique_name)
    [run] = hil_runs_request(SYSTEM, engine)
    HilRun.objects.filter(pk=run.pk).update(status=HilStatus.PASSED, verdict="Passed: ...", finished_at=timezone.now())
    made = client_as(Role.CI).post("/api/v1/deployments/", {"model": unique_name, "version": 1}, format="json")
    assert made.status_code == 201, made.content
    assert made.json()["hil_run"] == run.pk and made.json()["hil_override"] == ""
    audit = AuditEvent.objects.get(action="deployment.create", target_id=str(made.json()["id"]))
    assert audit.after["hil"] == {"run": run.pk, "status": "passed"}


def test_the_reconciler_hands_back_a_run_whose_worker_died_and_plans_runs_of_kept_engines_without_one(
        unique_name, hil_on):
    from deployer.testing import servable_model
    from registry.kv import redis_client

    servable_model(unique_name, versions=2, int8=False)
    first, second = EngineBuild.objects.filter(version__model__name=unique_name).order_by("version__version")
    [run] = hil_runs_request(SYSTEM, first)
    HilRun.objects.filter(pk=run.pk).update(status=HilStatus.RUNNING, worker="gone@host",
                                            heartbeat_at=timezone.now() - timedelta(minutes=10))
    EngineBuild.objects.filter(pk=second.pk).update(updated_at=timezone.now() - timedelta(minutes=1))
    queue = hardware.PROFILES_BY_NAME[serving_profile("cpu")].queue  # nobody consumes it in this test
    waiting_before = redis_client().llen(queue)
    assert hil_runs_reconcile() >= 2
    run.refresh_from_db()
    assert run.status == HilStatus.WAITING and run.worker == ""
    [planned] = HilRun.objects.filter(build=second)
    assert planned.status == HilStatus.WAITING and planned.profile == serving_profile("cpu")
    assert AuditEvent.objects.filter(action="hil.waiting", target_id=str(run.pk)).exists()
    assert AuditEvent.objects.filter(action="hil.request", target_id=str(planned.pk)).exists()
    # Each was sent to the profile's queue (in the broker's Redis, a list named after the queue).
    assert redis_client().llen(queue) == waiting_before + 2


def test_one_run_measures_at_a_time_on_a_machine_the_other_waits_without_holding_a_worker(unique_name, hil_on):
    from deployer.testing import servable_model
    from pipelines import hil_runner

    servable_model(unique_name, versions=1, int8=False)
    [run] = hil_runs_request(SYSTEM, EngineBuild.objects.get(version__model__name=unique_name))
    HilRun.objects.filter(pk=run.pk).update(updated_at=timezone.now() - timedelta(minutes=5))
    with hil_runner.machine_lock(wait_s=1) as ours:  # another run measuring here
        assert ours
        with pytest.raises(hil_runner.MachineBusy, match=f"run {run.pk} waits"):
            hil_runner.hil_run_execute(run.pk, "test-worker")
    run.refresh_from_db()
    assert run.status == HilStatus.WAITING and run.updated_at > timezone.now() - timedelta(seconds=30)


def test_a_run_that_times_out_after_its_profiles_worker_went_away_says_since_when(unique_name, hil_on):
    from deployer.testing import servable_model

    servable_model(unique_name, versions=1, int8=False)
    arm = hardware.PROFILES_BY_NAME["cpu-arm64"]
    hardware.worker_announce(f"gone-{unique_name}@arm", hardware.detect(), [arm])
    hardware.worker_withdraw(f"gone-{unique_name}@arm")
    [run] = hil_runs_request(SYSTEM, EngineBuild.objects.get(version__model__name=unique_name), ["cpu-arm64"])
    HilRun.objects.filter(pk=run.pk).update(wait_deadline=timezone.now() - timedelta(seconds=1))
    hil_runs_reconcile()
    run.refresh_from_db()
    assert run.status == HilStatus.TIMED_OUT
    assert "; no live worker of cpu-arm64 since 20" in run.verdict and run.verdict.endswith(" UTC")
