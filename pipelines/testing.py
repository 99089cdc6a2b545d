"""Support for tests that start at a page or the API: a finished HIL run as rows only (no worker, no Triton),
its figures shaped like a real sweep's and judged by the real judge (pipelines/hil_judge.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from pipelines import hil_judge
from pipelines.models import EngineBuild, HilRun

MIB = 2**20
CONCURRENCIES = (1, 2, 4, 8)
BATCHES = (1, 32)


def sweep_points(service_ms: float = 0.42, per_row_ms: float = 0.018, cores: int = 2, spread_pct: float = 2.5,
                 unstable_at: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Points of a sweep on a small CPU machine: latency flat until the cores are busy, then growing with the
    queue; throughput rising until then, flat after. `unstable_at` (batch, concurrency) never settled."""
    points = []
    for batch in BATCHES:
        per_request = service_ms + per_row_ms * batch
        for concurrency in CONCURRENCIES:
            p50 = per_request * max(1.0, concurrency / cores)
            requests_per_s = min(concurrency, cores) / per_request * 1000 * 0.93
            stable = unstable_at != (batch, concurrency)
            spread = spread_pct if stable else 23.0
            windows = 3 if stable else 12
            points.append({
                "concurrency": concurrency, "batch_size": batch, "status": "stable" if stable else "unstable",
                "windows": windows, "requests": int(requests_per_s * windows), "errors": 0, "first_error": None,
                "p50_ms": round(p50, 4), "p90_ms": round(p50 * 1.25, 4), "p95_ms": round(p50 * 1.4, 4),
                "p99_ms": round(p50 * 1.8, 4), "requests_per_s": round(requests_per_s, 2),
                "inferences_per_s": round(requests_per_s * batch, 2), "queue_ms": round(0.02 * concurrency, 4),
                "compute_ms": round(per_request * 0.8, 4), "server_requests": int(requests_per_s * windows),
                "memory_pss_bytes": 212 * MIB, "throughput_spread_pct": spread, "latency_spread_pct": spread * 1.2,
                "p99_spread_pct": spread * 2.0,
                "trials": [[round(requests_per_s * (1 + (i % 2) * spread / 100), 2), round(p50, 4)]
                           for i in range(windows)],
            })
    return points


def finished_hil_run(build: EngineBuild, champion_build: EngineBuild | None = None, *, profile: str = "cpu-x86-avx2",
                     slower_pct: float = 0.0, unstable_at: tuple[int, int] | None = None,
                     slo: dict[str, Any] | None = None, **fields: Any) -> HilRun:
    """A HIL run of `build` on `profile` as a worker would leave it: points of both engines (the candidate
    `slower_pct` slower than the champion at every point), accuracy, memory, and the checks, comparison, verdict
    and status the judge gives them."""
    slowdown = 1 + slower_pct / 100
    candidate = {"label": f"v{build.version.version} ({build.variant})",
                 "triton_model": build.io.get("triton_model_name", "candidate"),
                 "points": sweep_points(service_ms=0.42 * slowdown, per_row_ms=0.018 * slowdown,
                                        unstable_at=unstable_at),
                 "memory_bytes": 231 * MIB, "stability_pct": 10.0}
    champion = None
    if champion_build is not None:
        champion = {"label": f"champion v{champion_build.version.version} ({champion_build.variant})",
                    "version": champion_build.version.version, "build": champion_build.pk,
                    "triton_model": champion_build.io.get("triton_model_name", "champion"),
                    "points": sweep_points(), "memory_bytes": 229 * MIB, "stability_pct": 10.0}
    objectives = slo if slo is not None else {
        "p99_ms": {"value": 25.0, "source": "version tag hil.p99_ms"},
        "max_regression_pct": {"value": 10.0, "source": "default"}}
    accuracy = {"measured": True, "passed": True,
                "words": "label agreement with the original model 1.0000 on 360 reference rows (at least 0.999)",
                "figures": {"label_agreement": 1.0, "rows": 360, "at_least": 0.999}}
    judgement = hil_judge.judge(candidate, champion, objectives, accuracy)
    results = {"candidate": candidate, "champion": champion, "accuracy": accuracy,
               "empty_server_memory_bytes": 188 * MIB, "comparison": judgement.comparison,
               "cpus": {"server": [0], "clients": [1], "words": "Triton on CPU 0, the load clients on CPU 1"},
               "settings": {"concurrencies": list(CONCURRENCIES), "batch_sizes": list(BATCHES), "window_s": 1.0,
                            "stability_pct": 10.0, "stable_windows": 3, "max_trials": 12}}
    now = timezone.now()
    values: dict[str, Any] = {
        "status": judgement.status, "champion_build": champion_build, "slo": objectives, "results": results,
        "checks": judgement.checks, "verdict": judgement.verdict, "worker": "hil-3f9a2c@bench-07",
        "hardware": {"arch": "x86_64", "cpu_model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
                     "cpu_flags": ["avx2", "fma"], "cores": 2, "memory_bytes": 8 * 2**30, "gpus": [], "cuda": "",
                     "tensorrt": ""},
        "sweep": {"concurrencies": list(CONCURRENCIES), "window_s": 1.0, "max_trials": 12, "stability_pct": 10.0,
                  "stable_windows": 3, "wait_timeout_s": 3600},
        "log": "fetching the engines\nloaded both into Triton\ncandidate: concurrency 1, batch 1: stable\n",
        "mlflow_run_id": build.version.run_id or "", "wait_deadline": now, "attempts": 1,
        "started_at": now - timedelta(seconds=95), "finished_at": now,
        **fields}
    return HilRun.objects.create(build=build, profile=profile, **values)
