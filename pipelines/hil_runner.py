"""A HIL run on the worker that took it from its profile's queue: the engine's Triton entry (and the
champion's engine on the same target) loaded into a Triton server of the run's own on this machine, never
the serving fleet; both warmed up, then measured point by point, interleaved (candidate then champion,
champion then candidate at the next point) so that the machine's noise touches both alike; accuracy through
the server on the version's reference set; judged (pipelines/hil_judge.py); logged to the version's MLflow run.

One run measures at a time on a machine (a file lock): two at once would each measure the other's load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from pipelines import hardware, hil, hil_judge
from pipelines.models import TERMINAL_HIL_STATES, BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import hil_append_log, hil_objectives, hil_transition, thresholds_for
from pipelines.triton_local import TritonServer
from registry import locks, mlflow_store
from registry.errors import TransitionError
from registry.models import ModelVersion
from registry.samples import load_reference_set
from registry.services import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 180.0
CONFIRM_ROUNDS = 3  # a regression against the champion counts only when every round at its point shows it
ACCURACY_ROWS = 1024  # at most, from the reference set


@contextlib.contextmanager
def machine_lock(wait_s: float) -> Iterator[bool]:
    """Hold this machine's HIL lock (one measurement at a time); yields False if not had within wait_s."""
    path = Path(tempfile.gettempdir()) / "mlops-platform-hil.lock"
    with open(path, "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def hil_run_execute(run_id: int, worker: str) -> str:
    """Measure once, whoever asks: the run's claim (held while it runs, dropped by the database when the
    worker dies) lets one worker at a time work on it."""
    run = HilRun.objects.get(pk=run_id)
    if run.status in TERMINAL_HIL_STATES:
        return run.status
    with machine_lock(wait_s=1.0) as ours:  # busy: the task tries again later, freeing the worker's slot
        if not ours:
            # Still held by this worker's retry: the reconciler must not send it again meanwhile.
            HilRun.objects.filter(pk=run_id, status=HilStatus.WAITING).update(updated_at=timezone.now())
            raise MachineBusy(f"another HIL run is measuring on this machine; run {run_id} waits")
        with locks.claim("hil.run", run_id) as mine:
            if not mine:
                return "claimed by another worker"
            return _execute(run_id, worker)


class MachineBusy(RuntimeError):
    pass


def _claim(run_id: int, worker: str, facts: hardware.Facts) -> bool:
    fields: dict[str, Any] = {"worker": worker, "hardware": facts.as_dict(), "attempts": F("attempts") + 1,
              "heartbeat_at": timezone.now()}
    try:
        hil_transition(run_id, HilStatus.RUNNING, only_from={HilStatus.WAITING}, **fields)
        return True
    except TransitionError:
        pass
    # Running, yet no live worker holds it (we hold its claim): its worker died. Take it over, from the start.
    taken = HilRun.objects.filter(pk=run_id, status=HilStatus.RUNNING).update(**fields)
    if taken:
        hil_append_log(run_id, ["resuming: the previous attempt was interrupted; measuring again from the start"])
    return bool(taken)


def _execute(run_id: int, worker: str) -> str:
    run = HilRun.objects.select_related("build__version__model").get(pk=run_id)
    if run.status in TERMINAL_HIL_STATES:
        return run.status
    facts = hardware.detect()
    profile = hardware.PROFILES_BY_NAME[run.profile]
    if not _claim(run_id, worker, facts):
        return "claimed by another worker"
    try:
        if not profile.matches(facts):
            raise hil.HilError(f"worker {worker} ({facts.arch}, {facts.cpu_model}) does not match {run.profile}: "
                               f"it needs {profile.requirements()}")
        return _run(HilRun.objects.select_related("build__version__model").get(pk=run_id))
    except DATABASE_UNAVAILABLE:
        raise  # not the run's fault: its task tries again once the database is back
    except Exception as exc:  # noqa: BLE001 - recorded on the run, which ends in error
        log.exception("HIL run %s", run_id)
        hil_transition(run_id, HilStatus.ERROR, verdict=f"Could not be measured: {type(exc).__name__}: {exc}"[:4000])
        return HilStatus.ERROR


def champion_engine(build: EngineBuild) -> EngineBuild | None:
    """The engine of the model's champion (its `champion` alias) on the same target: the same variant if it
    has one kept, else its first kept engine there; None without a champion, or when the build is its own."""
    version = build.version
    number = mlflow_store.alias_version(version.model.name, mlflow_store.CHAMPION)
    if number is None or number == version.version:
        return None
    kept = list(EngineBuild.objects.filter(version__model=version.model, version__version=number, target=build.target,
                                           status=BuildStatus.SUCCEEDED).select_related("version"))
    same = [b for b in kept if (b.precision, b.runtime) == (build.precision, build.runtime)]
    ranked = same or sorted(kept, key=lambda b: (b.precision != "fp32", b.pk))
    return ranked[0] if ranked else None


def _fetch(build: EngineBuild, repo: Path) -> str:
    """The engine's python-backend Triton entry into the server's repository; returns its Triton name."""
    name = str(build.io.get("triton_model_name", ""))
    if not name or not build.engine_uri:
        raise hil.HilError(f"build {build.pk} ({build.variant}) has no Triton entry to measure")
    with tempfile.TemporaryDirectory(prefix="hil-fetch-") as tmp:
        mlflow_store.download_model(f"{build.engine_uri.rstrip('/')}/triton/python", Path(tmp) / "repo")
        entry = Path(tmp) / "repo" / name
        if not entry.is_dir():
            raise hil.HilError(f"the engine {build.engine_uri} has no Triton entry named {name}")
        entry.rename(repo / name)
    return name


def _load(server: TritonServer, name: str) -> None:
    with hil.HttpClient(server.url, LOAD_TIMEOUT_S) as control:
        status, body = control.request("POST", f"/v2/repository/models/{name}/load", b"{}",
                                       {"Content-Type": "application/json"})
    if status != 200:
        raise hil.HilError(f"Triton could not load {name}: HTTP {status}: {body[:500]!r}")


def cpu_split() -> hil.CpuSplit | None:
    """This machine's CPUs split between the run's server and its load clients, unless PLATFORM_HIL_PIN_CPUS
    is off."""
    return hil.cpu_split() if settings.PLATFORM["HIL_PIN_CPUS"] else None


def _settings(run: HilRun, slo: dict[str, Any], max_batch: int, client_cpus: tuple[int, ...] | None) -> hil.Settings:
    """The sweep of the run, with the SLO's point added (a budget is judged where it is declared), its load
    clients on `client_cpus`."""
    sweep = run.sweep
    concurrencies = set(sweep["concurrencies"])
    batches = {1, max_batch} if max_batch > 0 else {1}
    if "concurrency" in slo:
        concurrencies.add(int(slo["concurrency"]["value"]))
    if "batch" in slo and max_batch > 0 and int(slo["batch"]["value"]) <= max_batch:
        batches.add(int(slo["batch"]["value"]))
    return hil.Settings(concurrencies=tuple(sorted(concurrencies)), batch_sizes=tuple(sorted(batches)),
                        window_s=float(sweep["window_s"]), stability_pct=float(sweep["stability_pct"]),
                        stable_windows=int(sweep["stable_windows"]), max_trials=int(sweep["max_trials"]),
                        client_cpus=client_cpus)


def _run(run: HilRun) -> str:
    build = run.build
    version = build.version
    slo = hil_objectives(version)
    champion = champion_engine(build)
    HilRun.objects.filter(pk=run.pk).update(champion_build=champion, slo=slo)
    say = lambda *lines: hil_append_log(run.pk, list(lines))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="hil-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "repo").mkdir()
        say(f"fetching {build.variant} of {version.model.name} v{version.version}"
            + (f" and the champion's {champion.variant} (v{champion.version.version})" if champion else
               " (no champion engine on this target to compare with)"))
        names = {"candidate": _fetch(build, tmp / "repo")}
        if champion is not None:
            names["champion"] = _fetch(champion, tmp / "repo")
        split = cpu_split()
        server = TritonServer(model_repository=tmp / "repo", workdir=tmp / "triton",
                              cpus=split.server if split else None)
        server.start()
        try:
            assert server.proc is not None
            pid = server.proc.pid
            base = hil.server_pss_bytes(pid)
            say(f"Triton started on {server.url} (pid {pid}), {base / 2**20:.1f} MiB with no model; "
                + (split.words() if split else "server and load clients on any CPU"))
            targets: dict[str, hil.Target] = {}
            memory: dict[str, int] = {}
            sweep: hil.Settings | None = None
            for role, name in names.items():
                before = hil.server_pss_bytes(pid)
                _load(server, name)
                if sweep is None:  # the candidate's config decides the sweep
                    with hil.HttpClient(server.url, 30) as control:
                        config = control.json(f"/v2/models/{name}/config")
                    sweep = _settings(run, slo, int(config.get("max_batch_size", 0)),
                                      split.clients if split else None)
                targets[role] = hil.prepare(server.url, name, server_pid=pid, settings=sweep)
                # The engine's memory: an empty server plus what loading and warming it up added.
                memory[role] = base + max(0, hil.server_pss_bytes(pid) - before)
                say(f"{role} {name} loaded and warmed up: server memory with it {memory[role] / 2**20:.1f} MiB")
            assert sweep is not None
            allowed = float(slo.get("max_regression_pct", {}).get("value", hil_judge.DEFAULT_ALLOWED_PCT))
            points, confirmations = _measure(run.pk, targets, sweep, allowed)
            accuracy = _accuracy(server.url, names["candidate"], version, build.precision)
            say(f"accuracy through the server: {accuracy['words']}")
        finally:
            server.stop()
    label = f"champion v{champion.version.version} ({champion.variant})" if champion else ""
    results: dict[str, Any] = {
        "candidate": {"label": f"v{version.version} ({build.variant})", "triton_model": names["candidate"],
                      "points": points["candidate"], "memory_bytes": memory["candidate"],
                      "stability_pct": sweep.stability_pct},
        "champion": {"label": label, "version": champion.version.version, "build": champion.pk,
                     "triton_model": names["champion"], "points": points["champion"],
                     "memory_bytes": memory["champion"], "stability_pct": sweep.stability_pct} if champion else None,
        "accuracy": accuracy, "empty_server_memory_bytes": base, "confirmations": confirmations,
        "cpus": {"server": list(split.server), "clients": list(split.clients), "words": split.words()} if split
        else None,
        "settings": {**asdict(sweep), "concurrencies": list(sweep.concurrencies),
                     "batch_sizes": list(sweep.batch_sizes or ())},
    }
    judgement = hil_judge.judge(results["candidate"], results["champion"], slo, accuracy, confirmations)
    results["comparison"] = judgement.comparison
    run_id = _log_to_mlflow(run, version, results, judgement)
    hil_transition(run.pk, judgement.status, results=_finite(results), checks=_finite(judgement.checks),
                   verdict=judgement.verdict, mlflow_run_id=run_id)
    return judgement.status


def _measure(run_id: int, targets: dict[str, hil.Target], sweep: hil.Settings,
             allowed_pct: float) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every point of the sweep for each engine, interleaved: at each point both are measured one after the
    other, the order swapped each time. Where the candidate looks worse than the champion beyond what is
    allowed, both are measured again at that point (up to CONFIRM_ROUNDS in all): a moment of load on the
    machine lands on one engine, a regression shows in every round. Returns the points (each engine's last
    round) and, for points measured more than once, every round's comparison."""
    points: dict[str, list[dict[str, Any]]] = {role: [] for role in targets}
    confirmations: list[dict[str, Any]] = []
    roles = list(targets)
    order = 0
    for batch in targets["candidate"].batch_sizes:
        for concurrency in sweep.concurrencies:
            seen: list[dict[str, Any]] = []
            while True:
                pair: dict[str, dict[str, Any]] = {}
                for role in roles if order % 2 == 0 else roles[::-1]:
                    if batch not in targets[role].requests:
                        continue  # the champion's config does not allow this batch size
                    point = hil.measure_point(targets[role], concurrency, batch, sweep)
                    pair[role] = asdict(point)
                    hil_append_log(run_id, [f"{role}: {point.words()}"])
                order += 1
                if "champion" not in pair:
                    break
                [row] = hil_judge.compare([pair["candidate"]], [pair["champion"]], allowed_pct)
                seen.append({k: row[k] for k in ("p99_pct", "p99_band_pct", "throughput_pct", "throughput_band_pct",
                                                 "p99_regressed", "throughput_regressed")})
                if not (row["p99_regressed"] or row["throughput_regressed"]) or len(seen) >= CONFIRM_ROUNDS:
                    break
                hil_append_log(run_id, [
                    f"batch {batch}, concurrency {concurrency}: the candidate looks worse (p99 {row['p99_pct']:+.1f}%, "
                    f"throughput {row['throughput_pct']:+.1f}%); measuring both again to confirm "
                    f"(round {len(seen) + 1} of at most {CONFIRM_ROUNDS})"])
            for role, figures in pair.items():
                points[role].append(figures)
            if len(seen) > 1:
                confirmations.append({"batch_size": batch, "concurrency": concurrency, "rounds": seen})
    return points, confirmations


def _reference(version: ModelVersion) -> tuple[str, np.ndarray, list[Any]] | None:
    """The version's reference set as the build wrote it: input name, rows and the original model's
    predictions; None without one (or with one pinned from traffic, which has no original predictions)."""
    ref = load_reference_set(version.reference_uri)
    if ref is None or "input" not in ref or ref.get("prediction") is None:
        return None
    return ref["input"], np.asarray(ref["rows"])[:ACCURACY_ROWS], list(ref["prediction"])[:ACCURACY_ROWS]


def _accuracy(url: str, model: str, version: ModelVersion, precision: str) -> dict[str, Any]:
    """The reference rows through the server, against the original model's predictions on them, judged by
    the parity thresholds of the engine's precision."""
    reference = _reference(version)
    if reference is None:
        return {"measured": False, "words": "not measured: the version has no reference set with the original "
                                            "model's predictions"}
    input_name, rows, expected = reference
    with hil.HttpClient(url, 60) as control:
        config = control.json(f"/v2/models/{model}/config")
        specs = {i.name: i for i in hil.inputs_from_config(config)}
        if input_name not in specs:
            raise hil.HilError(f"the reference set's input {input_name!r} is not an input of {model} "
                               f"({', '.join(specs)})")
        spec = specs[input_name]
        batched = int(config.get("max_batch_size", 0)) > 0
        step = int(config.get("max_batch_size", 0)) or 1
        outputs: list[Any] = []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step].astype(hil.NUMPY_TYPES[spec.datatype])
            if not batched:  # one sample per request, without a batch axis
                chunk = chunk.reshape(spec.shape)
            body = json.dumps({"inputs": [{"name": input_name, "shape": list(chunk.shape),
                                           "datatype": spec.datatype, "data": chunk.ravel().tolist()}]}).encode()
            status, answer = control.request("POST", f"/v2/models/{model}/infer", body,
                                             {"Content-Type": "application/json"})
            if status != 200:
                raise hil.HilError(f"accuracy request to {model}: HTTP {status}: {answer[:300]!r}")
            outputs.extend(_predictions(json.loads(answer)["outputs"], batched))
    limits = thresholds_for(version, precision)
    if all(isinstance(v, int | str) for v in expected):
        agreement = float(np.mean([str(a) == str(b) for a, b in zip(expected, outputs, strict=True)]))
        floor = limits["classification"]["label_agreement"]
        ok = agreement >= floor
        return {"measured": True, "passed": ok, "kind": "classification",
                "figures": {"label_agreement": agreement, "rows": len(expected), "at_least": floor},
                "words": f"label agreement with the original model {agreement:.4f} on {len(expected)} reference "
                         f"rows ({'at least' if ok else 'under'} {floor})"}
    ref = np.asarray(expected, dtype=np.float64)
    got = np.asarray(outputs, dtype=np.float64).reshape(ref.shape)
    err = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).mean() + 1e-12)
    limit = limits["regression"]["max_abs_error"] * scale
    ok = err <= limit
    return {"measured": True, "passed": ok, "kind": "regression",
            "figures": {"max_abs_error": err, "rows": len(expected), "at_most": limit},
            "words": f"largest difference from the original model {err:.3g} on {len(expected)} reference rows "
                     f"({'within' if ok else 'over'} {limit:.3g}, {limits['regression']['max_abs_error']} x "
                     "mean |reference|)"}


def _predictions(outputs: list[dict[str, Any]], batched: bool = True) -> list[Any]:
    """One prediction per row from a KServe v2 answer in JSON: the label output when there is one, else the
    arg max of a score matrix, else the single value. Unbatched answers are one row without a batch axis."""
    by_name = {o["name"]: o for o in outputs}
    chosen = by_name.get("label") or by_name.get("variable") or outputs[0]
    values = np.asarray(chosen["data"]).reshape(chosen["shape"] if batched else [1, -1])
    values = values.reshape(len(values), -1)
    if chosen is not by_name.get("label") and values.shape[1] > 1:
        return np.argmax(values, axis=1).tolist()
    return values[:, 0].tolist()


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _log_to_mlflow(run: HilRun, version: ModelVersion, results: dict[str, Any],
                   judgement: hil_judge.Judgement) -> str:
    """Metrics (prefixed `hil.<profile>.`) and the whole evidence as an artifact, on the version's run."""
    if not version.run_id:
        hil_append_log(run.pk, ["not logged to MLflow: the version has no run"])
        return ""
    prefix = f"hil.{run.profile}.{run.build.variant}"
    metrics: dict[str, float] = {f"{prefix}.passed": float(judgement.status == hil_judge.PASSED),
                                 f"{prefix}.memory_mib": results["candidate"]["memory_bytes"] / 2**20}
    for p in results["candidate"]["points"]:
        at = f"{prefix}.b{p['batch_size']}.c{p['concurrency']}"
        metrics.update({f"{at}.p50_ms": p["p50_ms"], f"{at}.p99_ms": p["p99_ms"],
                        f"{at}.inferences_per_s": p["inferences_per_s"]})
    evidence = {"run": run.pk, "profile": run.profile, "status": judgement.status, "verdict": judgement.verdict,
                "checks": judgement.checks, "slo": run.slo, **results}
    try:
        mlflow_store.log_run_evidence(version.run_id, {k: v for k, v in metrics.items() if math.isfinite(v)},
                                      f"hil/{run.profile}/run-{run.pk}.json",
                                      json.dumps(_finite(evidence), indent=2, default=str))
    except Exception as exc:  # noqa: BLE001 - the verdict stands without the copy in MLflow; the log says so
        hil_append_log(run.pk, [f"not logged to MLflow run {version.run_id}: {type(exc).__name__}: {exc}"])
        return ""
    hil_append_log(run.pk, [f"logged to MLflow run {version.run_id}: {len(metrics)} metrics and "
                            f"hil/{run.profile}/run-{run.pk}.json"])
    return version.run_id
