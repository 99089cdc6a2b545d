"""Drift monitoring, measured (issue 13): the platform's drift judgement against Evidently's own Report on
the same frames, the traffic capture's ingest rate, and detection quality on real data.

- windows of 10,000 rows x 20 columns (numerical; some with a shifted mean, some not) against a
  reference of the same size: the platform's judgement (monitoring/drift.py: the calculation behind
  DataDriftPreset's tests, without drawing the report), Evidently's HTML report built apart (as a check
  that keeps it does), side by side with `Report([DataDriftPreset()]).run(current, reference)` called
  directly; the platform's verdicts (each column's method, threshold, score and verdict, and the
  dataset's) must equal that Report's. alibi-detect's TabularDrift runs too when it is installed; it is
  not a dependency: alibi-detect 0.13 brings opencv-python, numba and llvmlite, scikit-image and
  transformers, and would take pillow back from 13 to 10.4;
- ingest: gateway samples (KServe v2 JSON, one row of 20 inputs each) in a Redis stream, decoded and
  stored by one capture pass (monitoring/capture.py) in this one process: samples per second of wall
  time, and per second of this process's CPU time (a core's worth of work, whatever else the machine
  runs); which Redis reply parser redis-py used (hiredis, when installed, or its own Python one);
- quality on scikit-learn's data sets (wine, breast_cancer, diabetes): a known shift (two thirds of the
  columns scaled by 1.5 in the current half) must be found as dataset drift, the verdict that raises an
  alert (the shifted columns found are shown); 20 random no-shift halvings of each (reference and current
  from the same rows) may raise at most 1 false alarm (dataset drift) in all.

    python -m config.stack --state .state/bench exec --fresh -- python -m bench.drift [--quick]

Prints a table and ends with one JSON line. Timings are reported, never asserted.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
import time
import uuid
import warnings
from typing import Any

import numpy as np
import pandas as pd

from bench._common import fmt, stack_bench_args, table

TARGET_WINDOW_S = 2.0
TARGET_INGEST_PER_S = 10_000.0


def _frames(rng: np.random.Generator, rows: int, columns: int, shifted: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    names = [f"input_{j}" for j in range(columns)]
    reference = pd.DataFrame(rng.normal(size=(rows, columns)), columns=names)
    current = pd.DataFrame(rng.normal(size=(rows, columns)), columns=names)
    current.iloc[:, :shifted] += 0.3
    return reference, current


def _evidently_direct(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, dict[str, tuple], bool]:
    """Evidently's Report as anyone calls it, timed, and its verdicts read from its tests: per column
    (method as the report names it, threshold, score, drifted), and the dataset's."""
    import re

    from evidently import Report
    from evidently.presets import DataDriftPreset

    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()], include_tests=True).run(current, reference)
    seconds = time.perf_counter() - started
    doc = snapshot.dict()
    by_metric = {m["id"]: m for m in doc["metrics"]}
    columns, dataset = {}, False
    for test in doc["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") == "evidently:metric_v2:ValueDrift":
            method = re.search(r"The drift detection method is (.+)\. The drift threshold", test["description"])
            columns[params["column"]] = (method[1] if method else params["method"], float(params["threshold"]),
                                         float(by_metric[test["metric_config"]["metric_id"]]["value"]),
                                         test["status"] == "FAIL")
        elif params.get("type") == "evidently:metric_v2:DriftedColumnsCount":
            dataset = test["status"] == "FAIL"
    return seconds, columns, dataset


ALIBI_LEFT_OUT = ("not installed: alibi-detect 0.13 brings opencv-python, numba/llvmlite, scikit-image and "
                  "transformers, and takes pillow back to 10.4")


def _alibi(reference: pd.DataFrame, current: pd.DataFrame) -> float | None:
    try:
        from alibi_detect.cd import TabularDrift
    except ImportError:
        return None
    started = time.perf_counter()
    TabularDrift(reference.to_numpy(), p_val=0.05).predict(current.to_numpy())
    return time.perf_counter() - started


def windows(rounds: int) -> dict[str, Any]:
    from monitoring import drift

    rng = np.random.default_rng(13)
    drift.judge(*_frames(rng, 500, 20, shifted=1))  # warm-up: the first Report pays for imports and set-up
    _evidently_direct(*_frames(rng, 500, 20, shifted=1))
    judge_s, report_s, check_s, direct_s, alibi_s, equal = [], [], [], [], [], []
    for n in range(rounds):
        reference, current = _frames(rng, 10_000, 20, shifted=[0, 3, 12][n % 3])
        started = time.perf_counter()
        result, judged = drift.judge(reference, current)
        judge_s.append(time.perf_counter() - started)
        gzip.compress(drift.html(judged).encode(), 6)
        check_s.append(time.perf_counter() - started)
        report_s.append(check_s[-1] - judge_s[-1])
        seconds, columns, dataset = _evidently_direct(reference, current)
        direct_s.append(seconds)
        ours = {c.column: (c.method, c.threshold, c.score, c.drifted) for c in result.columns}
        equal.append(ours == columns and result.dataset_drift == dataset)
        a = _alibi(reference, current)
        if a is not None:
            alibi_s.append(a)
    return {"window_s": statistics.median(judge_s), "report_s": statistics.median(report_s),
            "check_s": statistics.median(check_s), "evidently_direct_s": statistics.median(direct_s),
            "alibi_s": statistics.median(alibi_s) if alibi_s else None, "verdicts_equal_evidently": all(equal),
            "rounds": rounds}


def ingest(samples: int) -> dict[str, Any]:
    import redis as redis_lib
    from django.conf import settings

    from monitoring import capture
    from monitoring.models import CapturedRow
    from registry.models import ModelVersion, RegisteredModel

    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    name = f"bench-drift-{uuid.uuid4().hex[:6]}"
    model = RegisteredModel.objects.create(name=name)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    stream = f"bench:samples:{name}"
    rng = np.random.default_rng(1)
    head = f"POST /v2/models/{name}/infer HTTP/1.1\r\ncontent-type: application/json".encode()
    pipe = client.pipeline(transaction=False)
    for i in range(samples):
        row = [round(float(v), 6) for v in rng.normal(size=20)]
        request = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 20], "data": row}]})
        response = json.dumps({"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [i % 3]}]})
        pipe.xadd(stream, {"model": name, "version": "1", "status": "200", "ts": f"{time.time():.6f}",
                           "request": request, "response": response, "request_head": head,
                           "response_head": b"HTTP/1.1 200 OK\r\ncontent-type: application/json"})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    started = time.perf_counter()
    cpu = time.process_time()
    stored = capture.capture_pass(client, stream, budget_s=600.0)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    in_database = CapturedRow.objects.filter(version=version).count()  # read back, not the pass's own count
    client.delete(stream)
    parser = "hiredis" if redis_lib.utils.HIREDIS_AVAILABLE else "python"
    return {"ingest_samples": in_database, "ingest_sent": samples, "ingest_s": seconds, "ingest_cpu_s": cpu_s,
            "ingest_samples_per_s": stored / seconds if seconds else 0.0,
            "ingest_samples_per_cpu_s": stored / cpu_s if cpu_s else 0.0, "redis_parser": parser}


def quality(splits: int) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

    from monitoring import drift

    rows, detected, alarms, tried = [], 0, 0, 0
    for loader in (load_wine, load_breast_cancer, load_diabetes):
        frame = loader(as_frame=True).frame.drop(columns=["target"])
        rng = np.random.default_rng(7)
        order = rng.permutation(len(frame))
        half = len(frame) // 2
        reference, current = frame.iloc[order[:half]], frame.iloc[order[half:]].copy()
        shifted = list(frame.columns[: max(1, 2 * len(frame.columns) // 3)])
        current[shifted] = current[shifted] * 1.5
        shift, _ = drift.judge(reference, current)
        found = {c.column for c in shift.drifted} & set(shifted)
        detected += int(shift.dataset_drift)  # what raises the alert, as a false alarm is counted
        false_here = 0
        for _ in range(splits):
            order = rng.permutation(len(frame))
            quiet, _ = drift.judge(frame.iloc[order[:half]], frame.iloc[order[half:]])
            false_here += int(quiet.dataset_drift)
        alarms += false_here
        tried += splits
        rows.append([loader.__name__.removeprefix("load_"), str(len(frame)), str(len(frame.columns)),
                     f"{len(found)} of the {len(shifted)} shifted columns found ({len(shift.drifted)} drifted in "
                     f"all), dataset drift {shift.dataset_drift}",
                     f"{false_here} of {splits}"])
    return {"rows": rows, "shift_detected": detected == 3, "shifts_detected": detected, "false_alarms": alarms,
            "no_shift_splits": tried}


def main(argv: list[str] | None = None) -> None:
    warnings.simplefilter("ignore", RuntimeWarning)  # scipy on constant bins inside Evidently's tests
    args = stack_bench_args("bench.drift", __doc__, "1 window round, 2,000 samples, 5 splits per data set", argv)
    w = windows(1 if args.quick else 3)
    i = ingest(2_000 if args.quick else 20_000)
    q = quality(5 if args.quick else 20)
    print(table(["10,000 x 20 window", "platform judgement s", "+ Evidently's HTML report s",
                 "Evidently Report directly s", "alibi-detect TabularDrift s", "verdicts equal Evidently's"],
                [["median of {}".format(w["rounds"]), fmt(w["window_s"], 2), fmt(w["check_s"], 2),
                  fmt(w["evidently_direct_s"], 2),
                  "not installed" if w["alibi_s"] is None else fmt(w["alibi_s"], 2),
                  str(w["verdicts_equal_evidently"])]]))
    print(f"window: {w['window_s']:.2f}s = {w['window_s'] / TARGET_WINDOW_S:.2f}x the {TARGET_WINDOW_S:g}s target; "
          f"ratio to Evidently directly {w['window_s'] / w['evidently_direct_s']:.2f}; the report, when it is "
          f"built, {w['report_s']:.2f}s more")
    if w["alibi_s"] is None:
        print(f"alibi-detect: {ALIBI_LEFT_OUT}")
    print(f"ingest: {i['ingest_samples']} of {i['ingest_sent']} samples stored in {i['ingest_s']:.2f}s "
          f"({i['ingest_cpu_s']:.2f}s CPU) by one process = {i['ingest_samples_per_s']:.0f}/s, "
          f"{i['ingest_samples_per_s'] / TARGET_INGEST_PER_S:.2f}x the {TARGET_INGEST_PER_S:.0f}/s target; "
          f"{i['ingest_samples_per_cpu_s']:.0f} per CPU second "
          f"({i['ingest_samples_per_cpu_s'] / TARGET_INGEST_PER_S:.2f}x); Redis replies parsed by {i['redis_parser']}")
    print(table(["data set", "rows", "columns", "known shift (two thirds of the columns x1.5)", "false alarms"],
                q["rows"]))
    print(json.dumps({
        "bench": "drift", "window_s": round(w["window_s"], 3), "report_s": round(w["report_s"], 3),
        "check_s": round(w["check_s"], 3), "evidently_direct_s": round(w["evidently_direct_s"], 3),
        "alibi_tabular_drift_s": None if w["alibi_s"] is None else round(w["alibi_s"], 3),
        "alibi_skipped": ALIBI_LEFT_OUT if w["alibi_s"] is None else None,
        "verdicts_equal_evidently": w["verdicts_equal_evidently"], "target_window_s": TARGET_WINDOW_S,
        "ingest_samples_per_s": round(i["ingest_samples_per_s"], 1),
        "ingest_samples_per_cpu_s": round(i["ingest_samples_per_cpu_s"], 1), "redis_parser": i["redis_parser"],
        "target_ingest_per_s": TARGET_INGEST_PER_S,
        "shift_detected": q["shift_detected"], "false_alarms": q["false_alarms"],
        "no_shift_splits": q["no_shift_splits"]}))

if __name__ == "__main__":
    main(sys.argv[1:])
