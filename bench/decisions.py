"""Canary decisions under noise: good canaries must be promoted, bad ones caught fast, and no client
request may fail except those a bad canary itself answers.

On the local fleet (two Triton servers) behind the gateway, under constant client load and background CPU
load (a busy process per core, started for the whole run), with the platform's default analysis settings
(tick, window, settle, confidence, limits):
- good canaries: successive versions that answer exactly like the stable one (a retrained equivalent),
  each rolled out in two short steps (10% and 50%, 10 s each, 5 s bake: the steps' length is not what is
  measured) and promoted, becoming the next one's stable. A rollback (or a pause) is a false decision;
- bad canaries, rolled out with the default steps: once a canary answers traffic, a fault starts in it:
  every request 50 ms slower, 5% of requests failing, or every request twice as slow as stable's median
  (measured first). Measured: caught or not, and the time from the fault's start to the last answer the
  canary sent to any client (0% canary traffic);
- failed client requests other than the bad canaries' own error answers.
The reconciler runs in this process at the default tick (the code the deployer worker runs), so every
window the platform judged can be judged, side by side, by the rule it replaced: absolute p99 and
error-rate limits on the canary alone, three slow or failing requests enough to fail.

    python -m config.stack --state .state/bench exec --fresh -- python -m bench.decisions [--quick]

Prints a table and ends with one line of JSON. Timings are reported, never asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_TO_ZERO_S = 15.0
GOOD_ROLLOUT = {"steps": [10, 50], "step_interval_s": 10, "bake_s": 5}


def previous_rule(win: dict[str, Any], canary_version: str, canary_triton: str, limits: Any) -> str:
    """The verdict of the rule the baseline comparison replaced (the canary alone against absolute limits;
    three failed or slow requests enough to fail), on the same window."""
    from monitoring.canary import Figures, quantile, slower_than

    gw, tr = win.get(f"gateway:{canary_version}", Figures()), win.get(f"triton:{canary_triton}", Figures())
    requests = max(gw.requests, tr.requests)
    errors = max(gw.errors, tr.errors)
    rate = max(gw.errors / gw.requests if gw.requests else 0.0, tr.errors / tr.requests if tr.requests else 0.0)
    p99 = quantile(0.99, gw.buckets)
    enough = requests >= limits.min_requests
    if rate > limits.max_error_rate and (enough or errors >= 3):
        return "fail"
    if p99 is not None and p99 * 1000 > limits.max_p99_ms and \
            (enough or slower_than(limits.max_p99_ms / 1000, gw.buckets) >= 3):
        return "fail"
    return "pass" if enough else "wait"


class Recorder:
    """Wraps the platform's judge: records each window's verdict, and the previous rule's on the same window."""

    def __init__(self) -> None:
        from monitoring import canary

        self.canary, self.real = canary, canary.judge
        self.windows: list[tuple[str, str, str]] = []  # (canary version, platform verdict, previous rule's)
        canary.judge = self._judge  # type: ignore[assignment]

    def _judge(self, win: Any, canary_version: str, canary_triton: str, stable: Any, limits: Any,
               window_s: float) -> Any:
        verdict = self.real(win, canary_version, canary_triton, stable, limits, window_s)
        self.windows.append((canary_version, verdict.outcome, previous_rule(win, canary_version, canary_triton,
                                                                            limits)))
        return verdict

    def of(self, version: int) -> list[tuple[str, str]]:
        return [(new, old) for v, new, old in self.windows if v == str(version)]


def reconciler(stop: threading.Event) -> None:
    from django.conf import settings
    from django.db import close_old_connections

    from deployer import services

    while not stop.is_set():
        try:
            services.rollouts_reconcile()
        except Exception as exc:  # noqa: BLE001 - reported, and the next tick goes on, as in the worker
            print(f"reconciler pass failed: {exc!r}", flush=True)
            close_old_connections()
        stop.wait(settings.PLATFORM["ROLLOUT_TICK_S"])


def stable_median_s(port: int, model: str, n: int = 200) -> float:
    body = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"})
        conn.getresponse().read()
        took.append(time.perf_counter() - t0)
    conn.close()
    return statistics.median(took)


def _ended(pk: int, timeout: float) -> Any:
    """The deployment once it is decided: promoted, rolled back, or paused for a person."""
    from deployer.models import Deployment, RolloutStatus
    from deployer.testing import wait_until

    undecided = {RolloutStatus.PENDING, RolloutStatus.PROGRESSING, RolloutStatus.AWAITING_APPROVAL}
    wait_until(lambda: Deployment.objects.get(pk=pk).status not in undecided, timeout, "a decision")
    return Deployment.objects.select_related("version").get(pk=pk)


def good_series(name: str, count: int, archive: Path, work: Path, port: int, rec: Recorder) -> dict[str, Any]:
    from deployer import services
    from deployer.models import RolloutStatus
    from deployer.testing import Load, echo_version, wait_until
    from registry.audit import SYSTEM

    v1 = echo_version(name, archive, 1.0, work)
    _ended(services.deployment_create(SYSTEM, v1.model, v1.version).pk, 120)
    results = []
    with Load(port, name, threads=3, pause_s=0.01) as load:
        wait_until(lambda: load.total() >= 50, 60, "the stable version answering")
        for _ in range(count):
            v = echo_version(name, archive, 1.0, work)
            d = _ended(services.deployment_create(SYSTEM, v.model, v.version, **GOOD_ROLLOUT).pk, 300)
            if d.status == RolloutStatus.PAUSED:
                services.deployment_abort(SYSTEM, d)
            windows = rec.of(v.version)
            results.append({"version": v.version, "status": str(d.status), "reason": d.reason,
                            "windows": len(windows), "previous_rule_fails": sum(old == "fail" for _, old in windows)})
            print(f"good canary v{v.version}: {d.status} ({d.reason[:160]})", flush=True)
    return {"rounds": results, "requests": load.total(), "failed": len(load.failures),
            "failures": load.failures[:5]}


def bad_round(name: str, fault: str, archive: Path, work: Path, port: int) -> dict[str, Any]:
    from deployer import services
    from deployer.models import Deployment, RolloutStatus
    from deployer.testing import Load, echo_version, wait_until
    from registry.audit import SYSTEM

    v1 = echo_version(name, archive, 1.0, work)
    _ended(services.deployment_create(SYSTEM, v1.model, v1.version).pk, 120)
    fault_file = work / f"{name}.fault"
    v2 = echo_version(name, archive, 1.0, work, fault_file=fault_file)
    with Load(port, name, threads=3, pause_s=0.01) as load:
        wait_until(lambda: load.by_version().get("1", 0) >= 20, 60, "the stable version answering")
        if fault == "twice":
            fault = f"sleep:{stable_median_s(port, name):.4f}"
        d = services.deployment_create(SYSTEM, v2.model, v2.version)
        wait_until(lambda: load.by_version().get("2", 0) >= 30, 120, "the canary answering")
        start = time.monotonic()
        fault_file.write_text(fault)
        wait_until(lambda: Deployment.objects.get(pk=d.pk).status != RolloutStatus.PROGRESSING, 180,
                   "a decision", interval=0.1)
        detected = time.monotonic() - start
        time.sleep(3.0)  # answers already on their way finish; then nothing more comes from the canary
        zero = load.last_answer.get("2", start) - start
    d.refresh_from_db()
    canary_failures = [f for f in load.failures if f[1] == "2"]
    return {"fault": fault, "status": str(d.status), "reason": d.reason, "detect_s": round(detected, 2),
            "to_zero_s": round(max(zero, 0.0), 2), "requests": load.total(),
            "failed_other": len(load.failed_outside("2")), "canary_errors": len(canary_failures)}


def busy_cores(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    from bench._common import fmt, stack_bench_args, start_serving, stop_server, table

    args = stack_bench_args("bench.decisions", __doc__, "5 good canaries and one of each bad (default: 20, 3)", argv)
    from django.conf import settings

    from registry.management.commands.seed_demo import train_demo_model

    good_count, bad_rounds = (5, 1) if args.quick else (20, 3)
    faults = {"+50 ms": "sleep:0.05", "5% errors": "error:0.05", "2x slower": "twice"}
    rec = Recorder()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="bench-decisions-") as tmp_name:
        tmp = Path(tmp_name)
        procs, port = start_serving(tmp, REPO)
        load = busy_cores(os.cpu_count() or 1)
        tick = threading.Thread(target=reconciler, args=(stop,), daemon=True)
        tick.start()
        try:
            archive = train_demo_model(tmp / "model")
            stamp = int(time.time())
            good = good_series(f"dec-good-{stamp}", good_count, archive, tmp, port, rec)
            bad = [{"kind": kind, **bad_round(f"dec-{i}-{j}-{stamp}", fault, archive, tmp, port)}
                   for i in range(bad_rounds) for j, (kind, fault) in enumerate(faults.items())]
        finally:
            stop.set()
            tick.join(30)
            for proc in load:
                proc.kill()
            for proc in procs:
                stop_server(proc, timeout=40)
    p = settings.PLATFORM
    print(f"Canary decisions, default analysis settings: tick {p['ROLLOUT_TICK_S']}s, window {p['ROLLOUT_WINDOW_S']}s, "
          f"settle {p['ROLLOUT_SETTLE_S']}s, max p99 {p['ROLLOUT_MAX_P99_MS']} ms, max error rate "
          f"{p['ROLLOUT_MAX_ERROR_RATE']:.0%}, min requests {p['ROLLOUT_MIN_REQUESTS']}; background load: "
          f"{os.cpu_count()} busy processes")
    false = [r for r in good["rounds"] if r["status"] != "promoted"]
    previous_false = sum(1 for r in good["rounds"] if r["previous_rule_fails"])
    print(table(["good canaries", "promoted", "rolled back or paused", "windows judged",
                 "good canaries the previous rule would have failed"],
                [[str(len(good["rounds"])), str(len(good["rounds"]) - len(false)), str(len(false)),
                  str(sum(r["windows"] for r in good["rounds"])), str(previous_false)]]))
    for r in false:
        print(f"  false decision on v{r['version']}: {r['status']}: {r['reason']}")
    print(f"client requests during the good canaries: {good['requests']}, failed {good['failed']}"
          + (f" (first: {good['failures']})" if good["failures"] else ""))
    print(table(["bad canary", "outcome", "detect s", "to 0% canary s", "requests", "failed (not canary)",
                 "canary errors"],
                [[b["kind"], b["status"], fmt(b["detect_s"], 2), fmt(b["to_zero_s"], 2), str(b["requests"]),
                  str(b["failed_other"]), str(b["canary_errors"])] for b in bad]))
    caught = [b for b in bad if b["status"] == "rolled_back"]
    worst = max((b["to_zero_s"] for b in bad), default=0.0)
    summary = {
        "bench": "decisions", "good_canaries": len(good["rounds"]), "false_rollbacks": len(false),
        "previous_rule_false_rollbacks": previous_false, "bad_canaries": len(bad), "bad_caught": len(caught),
        "to_zero_s_max": worst, "to_zero_s_median": round(statistics.median(b["to_zero_s"] for b in bad), 2),
        "failed_other_total": good["failed"] + sum(b["failed_other"] for b in bad),
        "target_to_zero_s": TARGET_TO_ZERO_S, "ratio_to_target": round(worst / TARGET_TO_ZERO_S, 3),
    }
    print(f"worst time to 0% canary: {worst:.2f}s = {summary['ratio_to_target']:.2f}x the {TARGET_TO_ZERO_S:.0f}s "
          f"target; false rollbacks {len(false)} of {len(good['rounds'])} (the previous rule: {previous_false})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
