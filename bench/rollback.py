"""Time from the start of a canary fault to 0% canary traffic, with the platform's default rollout settings,
and the client requests that failed meanwhile.

Everything runs as `make run` starts it: the local fleet (two Triton servers), the gateway, the deployer's
Celery worker and beat (the reconciler's default tick), in the stack's PostgreSQL and Redis. Each round
deploys a stable version, starts constant client load through the gateway, rolls a canary out with the
default settings, and once the canary answers traffic writes the fault into it: every request fails
("error"), or every request takes 1 s ("latency", above the default 500 ms p99 limit). Measured:
- detect: fault start -> the deployment is rolled back (PostgreSQL);
- to 0%: fault start -> the last response the canary sent to any client;
- failed: client requests that failed other than the canary's own error answers (target 0).
Side by side, as the baseline: the same load against the stable version with no rollout, for the failed
count; and the issue's target (30 s) and Flagger's default analysis interval (60 s) for the time.

    python -m config.stack --state .state/bench exec --fresh -- python -m bench.rollback [--quick]

Prints a table and ends with one line of JSON. Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 30.0
FLAGGER_INTERVAL_S = 60.0
FAULTS = {"error": "error", "latency": "sleep:1.0"}


def _round(name: str, fault: str, archive: Path, work: Path, gateway_port: int) -> dict[str, Any]:
    from deployer import services
    from deployer.models import Deployment, RolloutStatus
    from deployer.testing import Load, echo_version, wait_until
    from registry.audit import SYSTEM

    def status(pk: int) -> str:
        return str(Deployment.objects.get(pk=pk).status)

    v1 = echo_version(name, archive, 1.0, work)
    first = services.deployment_create(SYSTEM, v1.model, v1.version)
    wait_until(lambda: status(first.pk) == RolloutStatus.PROMOTED, 120, "the first deployment")
    fault_file = work / f"{name}.fault"
    v2 = echo_version(name, archive, 2.0, work, fault_file=fault_file)
    with Load(gateway_port, name, threads=3, pause_s=0.01) as load:
        wait_until(lambda: load.by_version().get("1", 0) >= 20, 60, "the stable version answering")
        canary = services.deployment_create(SYSTEM, v2.model, v2.version)
        wait_until(lambda: load.by_version().get("2", 0) >= 30, 120, "the canary answering")
        start = time.monotonic()
        fault_file.write_text(fault)
        wait_until(lambda: status(canary.pk) != RolloutStatus.PROGRESSING, 120, "the rollback", interval=0.1)
        detected = time.monotonic() - start
        # Responses already on their way finish; then nothing more comes from the canary.
        time.sleep(3.0)
        zero = load.last_answer.get("2", start) - start
    d = Deployment.objects.get(pk=canary.pk)
    return {"fault": fault, "status": d.status, "reason": d.reason, "detect_s": round(detected, 2),
            "to_zero_s": round(max(zero, 0.0), 2), "requests": load.total(),
            "failed_other": len(load.failed_outside("2")), "canary_errors": len(load.failures) -
            len(load.failed_outside("2"))}


def _baseline(name: str, archive: Path, work: Path, gateway_port: int, seconds: float) -> dict[str, Any]:
    from deployer import services
    from deployer.models import Deployment, RolloutStatus
    from deployer.testing import Load, echo_version, wait_until
    from registry.audit import SYSTEM

    v1 = echo_version(name, archive, 1.0, work)
    d = services.deployment_create(SYSTEM, v1.model, v1.version)
    wait_until(lambda: Deployment.objects.get(pk=d.pk).status == RolloutStatus.PROMOTED, 120,
               "the baseline deployment")
    with Load(gateway_port, name, threads=3, pause_s=0.01) as load:
        wait_until(lambda: load.total() >= 20, 60, "the baseline answering")
        time.sleep(seconds)
    return {"requests": load.total(), "failed": len(load.failures)}


def main(argv: list[str] | None = None) -> None:
    from bench._common import fmt, stack_bench_args, start_server, start_serving, stop_server, table

    args = stack_bench_args("bench.rollback", __doc__, "one round per fault (default: three)", argv)
    from django.conf import settings

    from registry.management.commands.seed_demo import train_demo_model

    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp_name:
        tmp = Path(tmp_name)
        procs, gateway_port = start_serving(tmp, REPO)
        py = sys.executable
        procs.append(start_server([py, "-m", "celery", "-A", "config", "worker", "--concurrency", "1", "--queues",
                                   "deployer", "--hostname", "bench-deployer@%h", "--loglevel", "WARNING"],
                                  tmp / "worker.log", cwd=REPO))
        procs.append(start_server([py, "-m", "celery", "-A", "config", "beat", "--schedule", str(tmp / "beat"),
                                   "--loglevel", "WARNING"], tmp / "beat.log", cwd=REPO))
        try:
            archive = train_demo_model(tmp / "model")
            stamp = int(time.time())
            results = [_round(f"rb-{kind}-{i}-{stamp}", fault, archive, tmp, gateway_port)
                       for i in range(rounds) for kind, fault in FAULTS.items()]
            base = _baseline(f"rb-baseline-{stamp}", archive, tmp, gateway_port, 10.0)
        finally:
            for proc in procs:
                stop_server(proc, timeout=40)
    p = settings.PLATFORM
    print(f"Rollback on a canary fault, default settings: tick {p['ROLLOUT_TICK_S']}s, window "
          f"{p['ROLLOUT_WINDOW_S']}s, max p99 {p['ROLLOUT_MAX_P99_MS']} ms, max error rate "
          f"{p['ROLLOUT_MAX_ERROR_RATE']:.0%}, min requests {p['ROLLOUT_MIN_REQUESTS']}, steps {p['ROLLOUT_STEPS']}")
    print(table(["fault", "outcome", "detect s", "to 0% canary s", "requests", "failed (not canary)",
                 "canary errors"],
                [[r["fault"], r["status"], fmt(r["detect_s"], 2), fmt(r["to_zero_s"], 2), str(r["requests"]),
                  str(r["failed_other"]), str(r["canary_errors"])] for r in results]))
    print(f"baseline (same load, stable only, no rollout): {base['requests']} requests, {base['failed']} failed")
    worst = max(r["to_zero_s"] for r in results)
    summary = {
        "bench": "rollback", "rounds": rounds,
        "to_zero_s_median": round(statistics.median(r["to_zero_s"] for r in results), 2),
        "to_zero_s_max": worst,
        "detect_s_median": round(statistics.median(r["detect_s"] for r in results), 2),
        "failed_other_total": sum(r["failed_other"] for r in results),
        "all_rolled_back": all(r["status"] == "rolled_back" for r in results),
        "baseline_failed": base["failed"],
        "ratio_to_target": round(worst / TARGET_S, 3),
        "ratio_to_flagger_interval": round(worst / FLAGGER_INTERVAL_S, 3),
        "target_s": TARGET_S,
    }
    print(f"worst time to 0% canary: {worst:.2f}s = {summary['ratio_to_target']:.2f}x the {TARGET_S:.0f}s target, "
          f"{summary['ratio_to_flagger_interval']:.2f}x Flagger's default analysis interval alone")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
