"""Hardware-in-the-loop measurement, checked (issue 14): the platform's figures against an independent
measurement of the same engine on the same server, and a whole HIL run of the demo model, timed.

- the demo model (`make run`'s digits classifier: seed_demo's MLP on scikit-learn's digits, with its
  reference set) registered, granted, its fp32 engine built in this process (pipelines.builder);
- a HIL run of that engine requested (pipelines.services.hil_runs_request) and executed in this process
  (pipelines.hil_runner.hil_run_execute, the code the HIL worker runs) with the platform's default sweep
  (PLATFORM_HIL_*): timed end to end (fetch, server start, load, warm-up, sweep, accuracy, judgement,
  MLflow logging), with its status;
- side by side: the same engine's Triton entry in a Triton server started here, on the CPUs a HIL run gives its
  server, every client on the CPUs a HIL run gives its load clients (pipelines/hil.py cpu_split); at each point
  (batch 1 and the engine's max_batch_size, concurrency 1, 2 and 4) the platform's harness (pipelines/hil.py
  measure_point, the default window settings) and two independent clients, in turn (each side first in its turn,
  round after round) so the machine's noise touches all alike. perf_analyzer would be the natural independent
  measurement, but the `perf-analyzer` wheel needs glibc 2.38; so the independent clients are written here,
  sharing no code with the harness: N threads in a closed loop at the same concurrency and batch size, each timing
  its own requests with time.perf_counter, for as long as the harness's figures' windows last (3 windows of 1 s),
  after a warm-up of their own; p50 as the median of those latencies, throughput as the inferences answered within
  that span divided by it. "client" is tritonclient.http (InferenceServerClient.infer, a connection per thread:
  how a user measures); "lean" sends the body tritonclient builds, once, on a plain socket and reads the answer by
  its length: a client about as light as perf_analyzer's, so that what the client itself costs shows. The figures
  of each side are the medians over the rounds (5), and beside them the lean client's own p50 spread between its
  rounds (max/min - 1): the point's own noise, which no client can measure below. The JSON's p50_diff_pct and
  throughput_diff_pct are against "lean" (the stand-in for perf_analyzer: as light a client, measuring what the
  server does), tritonclient_* against "client" (what a user's own script would see, its client's cost included).
  Beside them, what tells noise from a difference of method: Triton's own compute time per request during each
  side's measurement, and each client's CPU time per request (this process's CPU time over the requests it sent;
  the harness's includes its per-window statistics reads and memory reading), and the requests Triton counted over
  each side's span per request the side counted (about 1: each counts what was served; the independent clients'
  span is read a little wider, by the statistics calls around it).
- p50_diff_pct and throughput_diff_pct (the issue's target) are the largest over all the points, absolute.
  Beside them, settled_* are the largest over the points the harness settled in every round (the figures a
  HIL verdict judges; a point it did not settle is reported `unstable` and not judged), and each unsettled
  point is printed with the lean client's own p50 spread between rounds there, which shows whether the point
  itself moves (on a 2-core machine with the server and the clients sharing the CPUs, batch 64 with 2 and 4
  clients did, for every client: PLATFORM_HIL_PIN_CPUS=false shows it).

    python -m config.stack --state .state/bench-hil exec --fresh -- python -m bench.hil [--quick]

Prints tables and ends with one JSON line. Timings are reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import fmt, stack_bench_args, table

TARGET_DIFF_PCT = 10.0
TARGET_HIL_RUN_S = 60.0
CONCURRENCIES = (1, 2, 4)
CLIENT_WARMUP_S = 0.5
# Rounds per point: a point drifts by 10% and more over tens of seconds (batch 64 at 1 client, on 2 cores, for
# every client alike), and each side's median over 5 rounds is what is compared.
ROUNDS = 5
SIDES = ["harness", "client", "lean"]  # the platform's harness; tritonclient.http; its body on a plain socket

_NUMPY = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


# ---- the independent client ---------------------------------------------------------------------

def _inputs(client: Any, model: str, batch: int) -> tuple[list[Any], list[Any]]:
    """Inputs (random values, from the model's metadata: the batch axis set to `batch`, any other variable
    axis to 1) and every output asked for as binary, as a tritonclient user would build them."""
    import tritonclient.http as triton

    meta = client.get_model_metadata(model)
    batched = int(client.get_model_config(model).get("max_batch_size", 0)) > 0
    rng = np.random.default_rng(14)
    inputs = []
    for spec in meta["inputs"]:
        dims = [int(d) for d in spec["shape"]]
        if batched:
            dims = [batch, *dims[1:]]
        shape = [d if d > 0 else 1 for d in dims]
        tensor = triton.InferInput(spec["name"], shape, spec["datatype"])
        tensor.set_data_from_numpy(rng.random(shape).astype(_NUMPY[spec["datatype"]]), binary_data=True)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(o["name"], binary_data=True) for o in meta["outputs"]]
    return inputs, outputs


def _server_counts(client: Any, model: str) -> tuple[int, int]:
    """Triton's successful requests and compute_infer ns for the model, summed over its versions."""
    stats = client.get_inference_statistics(model)
    success = compute = 0
    for version in stats.get("model_stats", []):
        inference = version.get("inference_stats", {})
        success += int(inference.get("success", {}).get("count", 0))
        compute += int(inference.get("compute_infer", {}).get("ns", 0))
    return success, compute


class _Socket:
    """The lean transport: one TCP connection, the whole request (tritonclient's own body, built once) sent
    with one sendall, the answer read by its Content-Length: about the weight of perf_analyzer's client."""

    def __init__(self, url: str, model: str, body: bytes, json_size: int | None) -> None:
        import socket

        host, _, port = url.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {url}\r\nContent-Length: {len(body)}\r\n"
                + (f"Inference-Header-Content-Length: {json_size}\r\nContent-Type: application/octet-stream\r\n"
                   if json_size is not None else "Content-Type: application/json\r\n") + "\r\n")
        self.request = head.encode() + body
        self.pending = b""

    def infer(self) -> None:
        self.sock.sendall(self.request)
        data = self.pending
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                      if k.strip().lower() == b"content-length")
        while len(rest) < length:
            rest += self._recv()
        self.pending = rest[length:]
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {rest[:300]!r}")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def independent(url: str, model: str, concurrency: int, batch: int, seconds: float, lean: bool,
                cpus: tuple[int, ...] | None) -> dict[str, Any]:
    """`concurrency` threads, each with its own connection (tritonclient's InferenceServerClient.infer, or
    with `lean` tritonclient's request body sent on a plain socket), on `cpus` as the harness's clients are,
    send requests back to back; after a warm-up, the requests that end within a span of `seconds` are the
    figures."""
    import tritonclient.http as triton

    done: list[tuple[float, float]] = []  # (end, latency s) of every answered request
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    ready = threading.Barrier(concurrency + 1)

    def loop() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)  # this thread only
        client = triton.InferenceServerClient(url, connection_timeout=30.0, network_timeout=30.0)
        sock = None
        try:
            inputs, outputs = _inputs(client, model, batch)
            if lean:
                sock = _Socket(url, model, *triton.InferenceServerClient.generate_request_body(inputs, outputs))
                send = sock.infer
            else:
                def send() -> None:
                    client.infer(model, inputs, outputs=outputs)
            ready.wait()
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    send()
                except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    if sock is not None:
                        break  # a broken socket stays broken
                    continue
                ended = time.perf_counter()
                with lock:
                    done.append((ended, ended - began))
        finally:
            client.close()
            if sock is not None:
                sock.close()

    control = triton.InferenceServerClient(url)
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(CLIENT_WARMUP_S)
    before = _server_counts(control, model)
    start, cpu = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    after = _server_counts(control, model)
    stop.set()
    for t in threads:
        t.join(60)
    control.close()
    with lock:
        latencies = [lat for ended, lat in done if start < ended <= end]
        errs = list(errors)
    span = end - start
    served = after[0] - before[0]
    return {"p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "inferences_per_s": len(latencies) * batch / span, "requests": len(latencies), "seconds": span,
            "errors": len(errs), "first_error": errs[0] if errs else None,
            "cpu_us": cpu / len(latencies) * 1e6 if latencies else None,
            "compute_ms": (after[1] - before[1]) / served / 1e6 if served else None,
            "counted": served / len(latencies) if latencies else None}


# ---- the platform ----------------------------------------------------------------------------------

def kept_engine(name: str, work: Path) -> tuple[Any, float]:
    """The demo model registered (with its reference set), granted, its fp32 engine built here."""
    from pipelines.builder import engine_build_execute
    from pipelines.models import BuildStatus, EngineBuild
    from registry.audit import SYSTEM
    from registry.management.commands.seed_demo import demo_reference_sample, train_demo_model
    from registry.models import VersionStatus
    from registry.services import version_register_from_archive, version_transition

    archive = train_demo_model(work)
    version = version_register_from_archive(SYSTEM, name, archive, tags={"demo": "true"},
                                            sample=demo_reference_sample())
    version = version_transition(version.pk, VersionStatus.READY, detail="granted by bench.hil")
    build = EngineBuild.objects.get(version=version, precision="fp32")
    started = time.perf_counter()
    status = engine_build_execute(build.pk, "bench")
    seconds = time.perf_counter() - started
    if status != BuildStatus.SUCCEEDED:
        raise SystemExit(f"the demo model's fp32 engine was not built: {status}: "
                         f"{EngineBuild.objects.get(pk=build.pk).log[-2000:]}")
    return EngineBuild.objects.select_related("version__model").get(pk=build.pk), seconds


def hil_run(build: Any) -> dict[str, Any]:
    """A HIL run of the engine, requested and executed as the worker does, timed end to end."""
    from pipelines.hil_runner import hil_run_execute
    from pipelines.models import HilRun
    from pipelines.services import hil_runs_request
    from registry.audit import SYSTEM

    started = time.perf_counter()
    [run] = hil_runs_request(SYSTEM, build)
    status = hil_run_execute(run.pk, "bench")
    seconds = time.perf_counter() - started
    run = HilRun.objects.get(pk=run.pk)
    return {"seconds": seconds, "status": status, "verdict": run.verdict, "profile": run.profile,
            "points": (run.results or {}).get("candidate", {}).get("points", []), "log": run.log}


def side_by_side(build: Any, work: Path, sweep: Any, rounds: int) -> list[dict[str, Any]]:
    """The engine in a Triton server of our own; at each point, the harness and the independent client in
    turn, `rounds` times, the order swapped each round."""
    from pipelines import hil, hil_runner
    from pipelines.triton_local import TritonServer
    from registry import mlflow_store

    name = str(build.io["triton_model_name"])
    mlflow_store.download_model(f"{build.engine_uri.rstrip('/')}/triton/python", work / "repo")
    split = hil_runner.cpu_split()  # as a HIL run splits them
    if split is not None:
        sweep = dataclasses.replace(sweep, client_cpus=split.clients)
        print(f"  {split.words()}", flush=True)
    server = TritonServer(model_repository=work / "repo", workdir=work / "triton",
                          cpus=split.server if split else None)
    server.start()
    rows = []
    try:
        assert server.proc is not None
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(
                f"http://{server.url}/v2/repository/models/{name}/load", data=b"{}", method="POST",
                headers={"Content-Type": "application/json"}), timeout=180) as answer:
            assert answer.status == 200
        target = hil.prepare(server.url, name, server_pid=server.proc.pid, settings=sweep)
        turn = 0
        seconds = sweep.stable_windows * sweep.window_s  # as long as the harness's figures' windows
        for batch in target.batch_sizes:
            for concurrency in CONCURRENCIES:
                seen: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
                statuses = []
                for _ in range(rounds):
                    order = SIDES[turn % 3:] + SIDES[:turn % 3]  # each side first in turn
                    turn += 1
                    for side in order:
                        if side == "harness":
                            cpu = time.process_time()
                            point = hil.measure_point(target, concurrency, batch, sweep)
                            sent = sum(rps for rps, _ in point.trials) * sweep.window_s
                            statuses.append(point.status)
                            seen[side].append({"p50_ms": point.p50_ms, "inferences_per_s": point.inferences_per_s,
                                               "compute_ms": point.compute_ms, "errors": point.errors,
                                               "first_error": point.first_error,
                                               "counted": point.server_requests / point.requests
                                               if point.requests else None,
                                               "cpu_us": (time.process_time() - cpu) / sent * 1e6 if sent else None})
                        else:
                            seen[side].append(independent(server.url, name, concurrency, batch, seconds,
                                                          lean=side == "lean", cpus=sweep.client_cpus))
                    print(f"  batch {batch}, concurrency {concurrency}: " + "; ".join(
                        f"{side} p50 {seen[side][-1]['p50_ms']:.3f} ms {seen[side][-1]['inferences_per_s']:.0f}/s"
                        for side in SIDES) + f" (harness {statuses[-1]})", flush=True)
                rows.append(_compare(batch, concurrency, seen, statuses))
    finally:
        server.stop()
    return rows


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _compare(batch: int, concurrency: int, seen: dict[str, list[dict[str, Any]]],
             statuses: list[str]) -> dict[str, Any]:
    """Each side's medians over the rounds; the harness's differences from each independent client."""
    row: dict[str, Any] = {"batch": batch, "concurrency": concurrency, "harness_status": statuses}
    for side, runs in seen.items():
        for key in ("p50_ms", "inferences_per_s", "compute_ms", "cpu_us", "counted"):
            row[f"{side}_{key}"] = _median([r[key] for r in runs])
    for side, prefix in (("lean", ""), ("client", "tritonclient_")):
        row[f"{prefix}p50_diff_pct"] = (row["harness_p50_ms"] / row[f"{side}_p50_ms"] - 1) * 100
        row[f"{prefix}throughput_diff_pct"] = (row["harness_inferences_per_s"] / row[f"{side}_inferences_per_s"]
                                               - 1) * 100
    # The lean client's own spread over the rounds: how much the point itself moves, for any client.
    lean = [r["p50_ms"] for r in seen["lean"]]
    row["lean_p50_spread_pct"] = (max(lean) / min(lean) - 1) * 100 if len(lean) > 1 and min(lean) > 0 else None
    row["settled"] = all(s == "stable" for s in statuses)
    everything = [r for runs in seen.values() for r in runs]
    row["errors"] = sum(r["errors"] for r in everything)
    row["first_error"] = next((r["first_error"] for r in everything if r["first_error"]), None)
    return row


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the table
    args = stack_bench_args("bench.hil", __doc__, "1 round per point (default: 5)", argv)
    from django.conf import settings

    from pipelines import hil

    settings.PLATFORM = {**settings.PLATFORM, "HIL_AUTO": False}  # the bench asks for the run itself
    p = settings.PLATFORM
    sweep = hil.Settings(concurrencies=CONCURRENCIES, window_s=float(p["HIL_WINDOW_S"]),
                         max_trials=int(p["HIL_MAX_TRIALS"]))
    rounds = 1 if args.quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="bench-hil-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "model").mkdir()
        build, build_s = kept_engine(f"bench-hil-{int(time.time())}", tmp / "model")
        print(f"demo model {build.version.model.name} v{build.version.version}: engine {build.variant} built in "
              f"{build_s:.1f} s", flush=True)
        run = hil_run(build)
        print(f"HIL run on {run['profile']}: {run['status']} in {run['seconds']:.1f} s: {run['verdict']}", flush=True)
        print(f"side by side, {rounds} round(s) per point:", flush=True)
        rows = side_by_side(build, tmp / "side", sweep, rounds)

    print()
    print(f"HIL run of the demo model (default sweep: concurrencies {list(p['HIL_CONCURRENCIES'])}, windows of "
          f"{p['HIL_WINDOW_S']:g} s, at most {p['HIL_MAX_TRIALS']}): {run['status']} in {run['seconds']:.1f} s "
          f"= {run['seconds'] / TARGET_HIL_RUN_S:.2f}x the {TARGET_HIL_RUN_S:.0f} s target")
    if run["points"]:
        print(table(["HIL run point", "status", "windows", "p50 ms", "p99 ms", "inferences/s"],
                    [[f"batch {q['batch_size']}, concurrency {q['concurrency']}", q["status"], str(q["windows"]),
                      fmt(q["p50_ms"], 2), fmt(q["p99_ms"], 2), fmt(q["inferences_per_s"], 0)]
                     for q in run["points"]]))
    print()
    print(table(["point (same server)", "p50 ms harness/client/lean", "p50 diff % client/lean",
                 "inferences/s harness/client/lean", "inf/s diff % client/lean", "Triton compute ms h/c/l",
                 "client CPU us/req h/c/l", "Triton/client count h/c/l", "lean's own p50 spread %",
                 "harness status"],
                [[f"batch {r['batch']}, concurrency {r['concurrency']}",
                  "/".join(fmt(r[f"{side}_p50_ms"], 3) for side in SIDES),
                  f"{fmt(r['tritonclient_p50_diff_pct'], 1)}/{fmt(r['p50_diff_pct'], 1)}",
                  "/".join(fmt(r[f"{side}_inferences_per_s"], 0) for side in SIDES),
                  f"{fmt(r['tritonclient_throughput_diff_pct'], 1)}/{fmt(r['throughput_diff_pct'], 1)}",
                  "/".join(fmt(r[f"{side}_compute_ms"], 3) for side in SIDES),
                  "/".join(fmt(r[f"{side}_cpu_us"], 0) for side in SIDES),
                  "/".join(fmt(r[f"{side}_counted"], 2) for side in SIDES), fmt(r["lean_p50_spread_pct"], 1),
                  ",".join(r["harness_status"])] for r in rows]))
    keys = ("p50_diff_pct", "throughput_diff_pct", "tritonclient_p50_diff_pct", "tritonclient_throughput_diff_pct")
    # Over all the points (the target), and over those the harness settled in every round: a point it
    # did not settle is reported `unstable` and left unjudged (pipelines/hil_judge.py).
    settled = [r for r in rows if r["settled"]]
    unsettled = [r for r in rows if not r["settled"]]
    worst = {key: max(abs(r[key]) for r in rows) for key in keys}
    firm = {f"settled_{key}": max((abs(r[key]) for r in settled), default=float("nan")) for key in keys[:2]}
    errors = sum(r["errors"] for r in rows)
    print(f"largest difference of the harness from the lean independent client (perf_analyzer's stand-in) over "
          f"all {len(rows)} points: p50 {worst['p50_diff_pct']:.1f}%, throughput {worst['throughput_diff_pct']:.1f}% "
          f"(target: within {TARGET_DIFF_PCT:g}%); at the {len(settled)} point(s) the harness settled in every round "
          f"(the figures a HIL verdict judges): p50 {firm['settled_p50_diff_pct']:.1f}%, throughput "
          f"{firm['settled_throughput_diff_pct']:.1f}%; from tritonclient.http (its own cost included): p50 "
          f"{worst['tritonclient_p50_diff_pct']:.1f}%, throughput {worst['tritonclient_throughput_diff_pct']:.1f}%; "
          f"errors {errors}"
          + (f" (first: {next(r['first_error'] for r in rows if r['first_error'])})" if errors else ""))
    if unsettled:
        print(f"{len(unsettled)} point(s) the harness did not settle (reported unstable, not judged): "
              + "; ".join(f"batch {r['batch']}, concurrency {r['concurrency']}: p50 {r['p50_diff_pct']:+.1f}%, "
                          f"throughput {r['throughput_diff_pct']:+.1f}% from lean"
                          + (f", whose own p50 moved {r['lean_p50_spread_pct']:.1f}% between rounds"
                             if r["lean_p50_spread_pct"] is not None else "") for r in unsettled))
    print(json.dumps({
        "bench": "hil", **{key: round(value, 2) for key, value in worst.items()},
        **{key: round(value, 2) for key, value in firm.items()},
        "settled_points": len(settled), "unsettled_points": len(unsettled),
        "hil_run_s": round(run["seconds"], 2), "hil_status": run["status"], "build_s": round(build_s, 2),
        "target_diff_pct": TARGET_DIFF_PCT, "target_hil_run_s": TARGET_HIL_RUN_S, "rounds": rounds,
        "errors": errors, "independent_client": "tritonclient.http's request body on a plain socket, written in the "
                                                "bench (perf_analyzer's wheel needs glibc 2.38)",
        "tritonclient": "tritonclient.http InferenceServerClient.infer",
        "points": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "first_error"}
                   for r in rows]}))


if __name__ == "__main__":
    main(sys.argv[1:])
