"""The engines the platform builds against the model's own framework, side by side in one run.

Three models trained on scikit-learn's bundled data: an MLP (digits), gradient-boosted trees
(breast_cancer) and a small PyTorch CNN (digits, 8x8 images). Each is saved with MLflow, then built by
pipelines/build_sandbox.py in this process (export to ONNX, fp32 and int8 variants, ONNX Runtime's
offline optimization, parity gate with the platform's default thresholds). Variants that miss parity are
reported as rejected with their figures and not timed; fp16 is not built on CPU (see FP16_ON_CPU).

For the framework (scikit-learn predict_proba, PyTorch eager under no_grad) and each kept engine
(onnxruntime InferenceSession, CPU provider) on the same held-out rows and the same thread count, 1 by
default (ORT intra_op_num_threads, torch.set_num_threads, BLAS/OpenMP pools through threadpoolctl):
  batch 1:  single-row calls back to back after a warm-up, each timed with perf_counter_ns: p50, p99;
  batch 64: 64-row calls back to back after a warm-up: rows/s.
Measurements alternate between the variants in rounds, so drift of the machine falls on all of them.
Ratios are framework time / engine time (> 1: the engine is faster). Timings are reported, never asserted.

    python -m bench.engines [--quick] [--threads N]

Prints a table per model and ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import fmt, percentile, table
from bench.engines.models import Subject, build, default_thresholds, sklearn_gbt, sklearn_mlp, torch_cnn

NOISE = 0.05  # int8/fp32 ratios closer to 1 than this are called the same
B1_TARGET = 3.0  # the target: engines at least 3x the framework at batch 1 (p50) on CPU
BATCH = 64
CPU_PRECISIONS = ("fp32", "int8")
FP16_ON_CPU = ("fp16 not built on CPU: ONNX Runtime's CPU provider has little native fp16 arithmetic on x86 (fp16 "
               "pays off on GPUs), so an fp16 engine mostly adds Cast nodes and runs slower than fp32 (the CNN's fp16 "
               "engine measured about 1.3x slower than its fp32 one on an AVX2 CPU); fp16 is a GPU variant")


def cpu_fp16_note() -> str:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return ""
    native = sorted(flags & {"avx512_fp16", "amx_fp16"})
    return (f"this CPU has {', '.join(native)}: an fp16 CPU engine may be worth measuring here" if native
            else "this CPU has no native fp16 arithmetic (no avx512_fp16 / amx_fp16 flag)")


@dataclass(frozen=True)
class Settings:
    threads: int
    rounds: int
    b1_seconds: float  # measured seconds per variant at batch 1, over all rounds
    b64_seconds: float
    warmup_seconds: float  # per variant and round
    min_calls: int  # per variant and round
    cnn_epochs: int


@dataclass
class Runner:
    """One variant under test: a callable taking its own input type, and the prepared inputs."""

    name: str
    call: Callable[[Any], Any]
    singles: list[Any]
    batches: list[Any]
    b1_ns: list[int] = field(default_factory=list)
    b64_ns: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        b1_us = [v / 1e3 for v in self.b1_ns]
        rows_per_s = BATCH * len(self.b64_ns) / (sum(self.b64_ns) / 1e9) if self.b64_ns else float("nan")
        return {"b1_p50_us": round(percentile(b1_us, 50), 1), "b1_p99_us": round(percentile(b1_us, 99), 1),
                "b1_calls": len(self.b1_ns), "b64_rows_per_s": round(rows_per_s, 0),
                "b64_p50_ms": round(percentile([v / 1e6 for v in self.b64_ns], 50), 3), "b64_calls": len(self.b64_ns)}


def timed_calls(call: Callable[[Any], Any], inputs: list[Any], start: int, seconds: float, min_calls: int,
                warmup_seconds: float) -> list[int]:
    """Warm-up (not kept), then calls back to back for `seconds` and at least `min_calls`; nanoseconds each."""
    n = len(inputs)
    clock = time.perf_counter_ns
    deadline = clock() + int(warmup_seconds * 1e9)
    i = start
    while clock() < deadline or i - start < 20:
        call(inputs[i % n])
        i += 1
    out: list[int] = []
    deadline = clock() + int(seconds * 1e9)
    while True:
        x = inputs[i % n]
        t0 = clock()
        call(x)
        t1 = clock()
        out.append(t1 - t0)
        i += 1
        if t1 >= deadline and len(out) >= min_calls:
            return out


def measure(runners: list[Runner], cfg: Settings) -> None:
    """Rounds: in each, every runner at batch 1 then every runner at batch 64; GC paused while timing."""
    gc.collect()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            warmup = cfg.warmup_seconds if r == 0 else 0.01  # later rounds: 20 calls to bring the caches back
            for runner in runners:
                runner.b1_ns += timed_calls(runner.call, runner.singles, r * 7919, cfg.b1_seconds / cfg.rounds,
                                            cfg.min_calls, warmup)
            for runner in runners:
                runner.b64_ns += timed_calls(runner.call, runner.batches, r * 13, cfg.b64_seconds / cfg.rounds,
                                             max(4, cfg.min_calls // 8), warmup)
    finally:
        gc.enable()


def ort_session(path: Path, threads: int, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ORT's default, stated
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def ort_call(session: Any) -> Callable[[np.ndarray], Any]:
    name = session.get_inputs()[0].name
    run = session.run
    return lambda x: run(None, {name: x})


def rows_and_batches(X: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same float32 rows for every variant: single rows, and 64-row batches (the held-out rows
    repeated as needed so that there are at least 4 distinct batches)."""
    singles = [np.ascontiguousarray(X[i:i + 1]) for i in range(len(X))]
    reps = -(-4 * BATCH // len(X))
    pool = np.concatenate([X] * reps) if reps > 1 else X
    batches = [np.ascontiguousarray(pool[i:i + BATCH]) for i in range(0, len(pool) - BATCH + 1, BATCH)]
    return singles, batches


def engine_labels(session: Any, X: np.ndarray) -> np.ndarray:
    from pipelines.build_sandbox import engine_outputs

    return np.asarray(engine_outputs(session, X)["label"]).reshape(-1)


def parity_text(result: dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"BUILD FAILED: {result.get('error', '')}"
    verdict = result["parity"]
    if not verdict["passed"]:
        return "REJECTED: " + "; ".join(verdict["failures"])
    figures = verdict["figures"]
    diff = figures.get("max_probability_diff", figures.get("max_score_diff"))
    name = "max|dprob|" if "max_probability_diff" in figures else "max|dscore|"
    return f"pass: labels {figures.get('label_agreement', float('nan')):.4f}, {name} {diff:.2g}"


def run_subject(subject: Subject, cfg: Settings) -> dict[str, Any]:
    singles, batches = rows_and_batches(subject.X)
    base = Runner(subject.framework, subject.predict, [subject.to_native(x) for x in singles],
                  [subject.to_native(x) for x in batches])
    runners = [base]
    base_accuracy = float(np.mean(subject.labels(subject.predict(subject.to_native(subject.X))) == subject.y))
    out: dict[str, Any] = {"description": subject.description, "framework": subject.framework,
                           "held_out_rows": len(subject.X), "features": list(subject.X.shape[1:]),
                           "accuracy": round(base_accuracy, 4), "variants": {}}
    kept: dict[str, Runner] = {}
    for precision in CPU_PRECISIONS:
        result = subject.builds[precision]
        entry: dict[str, Any] = {"kept": bool(result.get("ok") and result["parity"]["passed"]),
                                 "build_s": round(result["seconds"], 2), "parity_text": parity_text(result)}
        if result.get("ok"):
            entry["parity"] = result["parity"]["figures"]
            entry["integer_ops"] = result["integer_ops"]
        else:
            entry["error"] = result.get("error")
        if entry["kept"]:
            session = ort_session(result["engine"], cfg.threads)
            entry["accuracy"] = round(float(np.mean(engine_labels(session, subject.X) == subject.y)), 4)
            runner = Runner(f"onnxruntime {precision}", ort_call(session), singles, batches)
            kept[precision] = runner
            runners.append(runner)
        out["variants"][precision] = entry
    measure(runners, cfg)
    out["baseline"] = base.figures()
    for precision, runner in kept.items():
        figures = runner.figures()
        entry = out["variants"][precision]
        entry.update(figures)
        entry["b1_ratio"] = _ratio(out["baseline"]["b1_p50_us"], figures["b1_p50_us"])
        entry["b1_p99_ratio"] = _ratio(out["baseline"]["b1_p99_us"], figures["b1_p99_us"])
        entry["b64_ratio"] = _ratio(figures["b64_rows_per_s"], out["baseline"]["b64_rows_per_s"])
    if "fp32" in kept and "int8" in kept:
        fp32, int8 = out["variants"]["fp32"], out["variants"]["int8"]
        out["int8_vs_fp32"] = {"b1": _ratio(fp32["b1_p50_us"], int8["b1_p50_us"]),
                               "b64": _ratio(int8["b64_rows_per_s"], fp32["b64_rows_per_s"]),
                               "same_graph": not int8["integer_ops"]}
    out["variants"]["fp16"] = {"kept": False, "skipped": "not built on CPU (see fp16_cpu)"}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return round(a / b, 2)


def int8_words(r: dict[str, Any]) -> str:
    if r.get("same_graph"):
        return (f"nothing was quantized (no MatMul/Conv/Gather): the int8 engine is the fp32 graph, so its ratios "
                f"(batch 1 {_x(r['b1'])}, batch {BATCH} {_x(r['b64'])}) show this run's measurement noise")

    def word(ratio: float | None) -> str:
        if ratio is None:
            return "-"
        if abs(ratio - 1) <= NOISE:
            return f"{ratio:.2f}x (same, within {NOISE:.0%})"
        return f"{ratio:.2f}x ({'int8 faster' if ratio > 1 else 'int8 SLOWER'})"

    return f"batch 1 {word(r['b1'])}, batch {BATCH} {word(r['b64'])}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_subject(key: str, res: dict[str, Any], threads: int) -> None:
    print(f"\n{key}: {res['description']}; {res['held_out_rows']} held-out rows of "
          f"{' x '.join(map(str, res['features']))}; {threads} thread(s)", flush=True)
    headers = ["variant", "parity (vs framework)", "acc", "b1 p50 us", "b1 p99 us", "b1 ratio", "b64 rows/s",
               "b64 ratio"]
    base = res["baseline"]
    rows = [[res["framework"], "(reference)", f"{res['accuracy']:.3f}", fmt(base["b1_p50_us"]),
             fmt(base["b1_p99_us"]), "1.00x", fmt(base["b64_rows_per_s"], 0), "1.00x"]]
    for precision, v in res["variants"].items():
        name = f"onnxruntime {precision}"
        if "skipped" in v:
            rows.append([name, "skipped on CPU (see below)", "-", "-", "-", "-", "-", "-"])
        elif not v["kept"]:
            rows.append([name, v["parity_text"], "-", "not timed", "-", "-", "-", "-"])
        else:
            text = v["parity_text"] + (" [nothing quantized: = fp32]"
                                       if precision == "int8" and not v["integer_ops"] else "")
            rows.append([name, text, f"{v['accuracy']:.3f}", fmt(v["b1_p50_us"]), fmt(v["b1_p99_us"]),
                         _x(v["b1_ratio"]), fmt(v["b64_rows_per_s"], 0), _x(v["b64_ratio"])])
    print(table(headers, rows), flush=True)
    if "int8_vs_fp32" in res:
        print(f"int8 vs fp32: {int8_words(res['int8_vs_fp32'])}", flush=True)


# ---- GPU (only where torch and ONNX Runtime both see CUDA) ---------------------------------------

def gpu_available() -> tuple[bool, str]:
    import onnxruntime as ort

    try:
        import torch

        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    has_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    if has_torch and has_ort:
        return True, ""
    if not has_torch and not has_ort:
        return False, "GPU variants not measured: no GPU on this machine (torch.cuda and ORT's CUDA provider absent)"
    return False, ("GPU variants not measured: " + ("torch sees CUDA but this onnxruntime has no CUDA provider"
                                                    if has_torch else "ORT has CUDA but torch does not"))


def run_gpu(subject: Subject, thresholds: dict[str, Any], log: Path, cfg: Settings) -> dict[str, Any]:
    """The CNN's GPU engines (fp32, fp16; CUDA provider) against PyTorch eager on the GPU. Both sides
    take host rows and give host results (copies in and out included on both). Written on a machine
    without a GPU: not yet run on one."""
    import torch

    net = subject.torch_module.to("cuda").eval()

    def eager(x: torch.Tensor) -> Any:
        with torch.no_grad():
            y = net(x.to("cuda", non_blocking=False))
            return y.cpu()

    singles, batches = rows_and_batches(subject.X)
    runners = [Runner("PyTorch eager (cuda)", eager, [torch.from_numpy(x) for x in singles],
                      [torch.from_numpy(x) for x in batches])]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "variants": {}}
    for precision in ("fp32", "fp16"):
        result = build(subject, precision, thresholds, log, target="gpu")
        entry: dict[str, Any] = {"kept": bool(result.get("ok") and result["parity"]["passed"]),
                                 "parity_text": parity_text(result)}
        if entry["kept"]:
            session = ort_session(result["engine"], cfg.threads, ["CUDAExecutionProvider", "CPUExecutionProvider"])
            runners.append(Runner(f"onnxruntime {precision} (cuda)", ort_call(session), singles, batches))
        out["variants"][precision] = entry
    measure(runners, cfg)
    out["baseline"] = runners[0].figures()
    for runner in runners[1:]:
        precision = runner.name.split()[1]
        figures = runner.figures()
        out["variants"][precision].update(figures, b1_ratio=_ratio(out["baseline"]["b1_p50_us"], figures["b1_p50_us"]),
                                          b64_ratio=_ratio(figures["b64_rows_per_s"],
                                                           out["baseline"]["b64_rows_per_s"]))
    headers = ["variant", "parity", "b1 p50 us", "b1 p99 us", "b1 ratio", "b64 rows/s", "b64 ratio"]
    base = out["baseline"]
    rows = [[runners[0].name, "(reference)", fmt(base["b1_p50_us"]), fmt(base["b1_p99_us"]), "1.00x",
             fmt(base["b64_rows_per_s"], 0), "1.00x"]]
    for precision, v in out["variants"].items():
        rows.append([f"onnxruntime {precision} (cuda)", v["parity_text"], fmt(v.get("b1_p50_us")),
                     fmt(v.get("b1_p99_us")), _x(v.get("b1_ratio")), fmt(v.get("b64_rows_per_s"), 0),
                     _x(v.get("b64_ratio"))])
    print(f"\nGPU, {subject.key} on {out['device']}", flush=True)
    print(table(headers, rows), flush=True)
    return out


# ---- main ---------------------------------------------------------------------------------------

def set_threads(threads: int) -> dict[str, Any]:
    """The same thread count for every side: torch intra-op, BLAS and OpenMP pools (numpy, scikit-learn)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed by an earlier parallel call; inter-op is unused by these models anyway
    threadpool_limits(limits=threads)
    return {"ort_intra_op": threads, "ort_inter_op": 1, "torch": torch.get_num_threads(), "blas_openmp": threads}


def versions() -> dict[str, str]:
    import mlflow
    import onnxruntime
    import sklearn
    import torch

    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__, "mlflow": mlflow.__version__}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run for CI (under a minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every side (default 1: on a small or shared machine, spinning thread pools "
                             "of torch/OpenMP/ORT make the figures depend on scheduling more than on the engine)")
    parser.add_argument("--seconds", type=float, help="measured seconds per variant at each batch size")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = max(1, args.threads)
    seconds = args.seconds or (0.6 if args.quick else 6.0)
    cfg = Settings(threads=threads, rounds=3 if args.quick else 12, b1_seconds=seconds, b64_seconds=seconds,
                   warmup_seconds=0.1 if args.quick else 0.5, min_calls=30 if args.quick else 100,
                   cnn_epochs=8 if args.quick else 15)
    thread_info = set_threads(threads)
    thresholds = default_thresholds()
    info = versions()
    print(f"bench/engines on {cpu_name()} ({os.cpu_count()} cores); "
          + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    print(f"  threads: ORT intra_op_num_threads={threads} (inter_op 1, sequential, ORT_ENABLE_ALL at load), "
          f"torch.set_num_threads({threads}), BLAS/OpenMP limited to {threads} (threadpoolctl)", flush=True)
    print(f"  per variant: {cfg.b1_seconds:g}s at batch 1 and {cfg.b64_seconds:g}s at batch {BATCH}, in "
          f"{cfg.rounds} rounds alternating the variants; warm-up {cfg.warmup_seconds:g}s in the first round, "
          "at least 20 calls in the others", flush=True)

    results: dict[str, Any] = {}
    gpu: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        t0 = time.perf_counter()
        subjects = [sklearn_mlp(work, log), sklearn_gbt(work, log), torch_cnn(work, log, cfg.cnn_epochs)]
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for subject in subjects:
            for precision in CPU_PRECISIONS:
                subject.builds[precision] = build(subject, precision, thresholds, log)
        build_s = time.perf_counter() - t0
        print(f"  trained and saved 3 models in {train_s:.1f}s; built {len(subjects) * len(CPU_PRECISIONS)} engines "
              f"with pipelines/build_sandbox.py in {build_s:.1f}s (parity gate: the platform's default "
              "thresholds, on the first 256 held-out rows)", flush=True)
        for subject in subjects:
            results[subject.key] = run_subject(subject, cfg)
            print_subject(subject.key, results[subject.key], threads)
        print(f"\n{FP16_ON_CPU}; {cpu_fp16_note()}.", flush=True)
        has_gpu, why_not = gpu_available()
        if has_gpu:
            gpu = run_gpu(subjects[2], thresholds, log, cfg)
        else:
            print(why_not + ".", flush=True)

    summary = summarize(results, gpu, why_not, thread_info, info, cfg, args.quick, time.perf_counter() - started)
    print_verdict(summary)
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def summarize(results: dict[str, Any], gpu: dict[str, Any], why_not: str, thread_info: dict[str, Any],
              info: dict[str, str], cfg: Settings, quick: bool, total_s: float) -> dict[str, Any]:
    b1 = {key: {p: v["b1_ratio"] for p, v in res["variants"].items() if v.get("kept")}
          for key, res in results.items()}
    b64 = {key: {p: v["b64_ratio"] for p, v in res["variants"].items() if v.get("kept")}
           for key, res in results.items()}
    best_b1 = {key: max((r for r in ratios.values() if r is not None), default=None) for key, ratios in b1.items()}
    int8 = {key: res["int8_vs_fp32"] for key, res in results.items() if "int8_vs_fp32" in res}
    rejected = {f"{key}/{p}": v["parity_text"] for key, res in results.items() for p, v in res["variants"].items()
                if not v.get("kept") and "skipped" not in v}
    figures = {key: {"framework": res["framework"], "baseline": res["baseline"], "accuracy": res["accuracy"],
                     "variants": {p: {k: v for k, v in var.items() if k != "parity_text"}
                                  for p, var in res["variants"].items()}}
               for key, res in results.items()}
    return {
        "bench": "engines",
        "quick": quick,
        "threads": thread_info,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "versions": info,
        "b1_ratio": b1,
        "b64_ratio": b64,
        "best_b1_ratio": best_b1,
        "min_fp32_b1_ratio": min((r["fp32"] for r in b1.values() if r.get("fp32") is not None), default=None),
        "b1_target": B1_TARGET,
        "b1_target_met": {key: r is not None and r >= B1_TARGET for key, r in best_b1.items()},
        "int8_vs_fp32": int8,
        "rejected": rejected,
        "fp16_cpu": "skipped: " + FP16_ON_CPU,
        "gpu": gpu or why_not,
        "models": figures,
        "settings": {"rounds": cfg.rounds, "b1_seconds": cfg.b1_seconds, "b64_seconds": cfg.b64_seconds,
                     "warmup_seconds": cfg.warmup_seconds, "batch": BATCH},
        "total_s": round(total_s, 1),
    }


def print_verdict(s: dict[str, Any]) -> None:
    met = ", ".join(f"{k} {_x(s['best_b1_ratio'][k])} ({'met' if ok else 'MISSED'})"
                    for k, ok in s["b1_target_met"].items())
    print(f"\nratio = framework time / engine time (> 1: engine faster). Target >= {B1_TARGET:g}x at batch 1 "
          f"(p50, best kept engine): {met}.")
    for key, r in s["int8_vs_fp32"].items():
        print(f"  {key}: int8 vs fp32 {int8_words(r)}")
    for name, text in s["rejected"].items():
        print(f"  {name}: {text}")
    print(f"total {s['total_s']:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
