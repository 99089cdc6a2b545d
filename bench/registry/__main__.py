"""The platform's registry read endpoints and version creation against MLflow's own server.

Both serve the same data: the platform on its database and MLflow's, `mlflow server` on a copy of
MLflow's database (CREATE DATABASE ... TEMPLATE) and the same artifact folder. The platform runs exactly
as production starts it (the `web` line of platform/processes.conf: uWSGI, 2 processes) and MLflow's
server with the same number of workers.
For each model size (100 and 10,000 versions of one model; --quick: 100 and 1,000) every endpoint is
driven by 4 keep-alive client threads for a fixed time after a warm-up.

    python -m config.stack --state .state/bench exec --fresh -- python -m bench.registry [--quick]

Prints a table per model size and ends with one line of JSON. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from bench._common import (
    LoadResult,
    Request,
    fetch_json,
    fmt,
    free_port,
    run_load,
    start_server,
    stop_server,
    table,
    wait_http,
    wait_idle,
)

REPO = Path(__file__).resolve().parents[2]
COPY_DB = "mlflow_copy"


@dataclass(frozen=True)
class Endpoint:
    key: str
    label: str
    platform: Callable[[str, int, int], Request]  # (model name, versions, i) -> request
    mlflow: Callable[[str, int, int], Request] | None  # None: compare with the MLflow figures of `same_as`
    same_as: str = ""


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _pick_version(versions: int, i: int) -> int:
    return 1 + (i * 7919) % versions  # spread over all versions, same sequence on both sides


def endpoints(seed: dict[str, Any]) -> list[Endpoint]:
    q = quote

    def mlflow_create(name: str, versions: int, i: int) -> Request:
        info = seed["models"][name]
        body = {"name": name, "source": info["source"], "run_id": info["run_id"]}
        return Request("POST", "/api/2.0/mlflow/model-versions/create", _json(body),
                       {"Content-Type": "application/json"})

    return [
        Endpoint("model_detail", "model detail",
                 lambda n, v, i: Request("GET", f"/api/v1/models/{q(n)}/"),
                 lambda n, v, i: Request("GET", f"/api/2.0/mlflow/registered-models/get?name={q(n)}")),
        Endpoint("version_list", "version list (first 50)",
                 lambda n, v, i: Request("GET", f"/api/v1/models/{q(n)}/versions/?page_size=50"),
                 lambda n, v, i: Request("GET", "/api/2.0/mlflow/model-versions/search?filter="
                                         + q(f"name='{n}'") + "&max_results=50")),
        Endpoint("version_detail", "version detail",
                 lambda n, v, i: Request("GET", f"/api/v1/models/{q(n)}/versions/{_pick_version(v, i)}/"),
                 lambda n, v, i: Request("GET", f"/api/2.0/mlflow/model-versions/get?name={q(n)}"
                                                f"&version={_pick_version(v, i)}")),
        Endpoint("mlflow_mount_model_get", "  (platform's MLflow mount: get model)",
                 lambda n, v, i: Request("GET", f"/api/2.0/mlflow/registered-models/get?name={q(n)}"),
                 None, same_as="model_detail"),
        Endpoint("version_create", "version create",
                 lambda n, v, i: Request("POST", f"/api/v1/models/{q(n)}/versions/",
                                         _json({"source": f"models:/{n}/1"}), {"Content-Type": "application/json"}),
                 mlflow_create),
    ]


INFORMATIONAL = {"mlflow_mount_model_get"}  # same MLflow code path behind the platform's gate: no target


# ---- set-up -------------------------------------------------------------------------------------

def _env_or_exit() -> dict[str, str]:
    missing = [v for v in ("DATABASE_URL", "PLATFORM_STATE_DIR") if not os.environ.get(v)]
    if missing:
        sys.exit(f"{', '.join(missing)} not set: run inside the stack, e.g.\n"
                 "  .venv/bin/python -m config.stack --state .state/bench exec --fresh -- "
                 ".venv/bin/python -m bench.registry --quick")
    return dict(os.environ)


def _with_db(url: str, db: str, scheme: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}", scheme=scheme or parts.scheme))


def seed_registry(models: dict[str, int], state: Path) -> dict[str, Any]:
    out = state / "bench-seed.json"
    cmd = [sys.executable, "-m", "bench.registry.seed", "--out", str(out)]
    for name, count in models.items():
        cmd += ["--model", f"{name}={count}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return dict(json.loads(out.read_text()))


def copy_mlflow_database(mlflow_url: str) -> str:
    """CREATE DATABASE mlflow_copy TEMPLATE <mlflow db>: nothing may be connected to it meanwhile."""
    import psycopg

    source_db = urlsplit(mlflow_url).path.lstrip("/")
    admin_url = _with_db(mlflow_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{COPY_DB}"')
        for attempt in range(50):
            try:
                conn.execute(f'create database "{COPY_DB}" template "{source_db}"')
                break
            except psycopg.errors.ObjectInUse:  # backends of the seeding process still closing
                if attempt == 49:
                    raise
                time.sleep(0.2)
    return _with_db(mlflow_url, COPY_DB, scheme="postgresql+psycopg")


def platform_web_command(port: int, state: Path) -> tuple[list[str], int]:
    """The production `web` line of platform/processes.conf, and its number of workers."""
    from config.stack import read_processes

    # Only the web line is used; the other lines' placeholders get values that are never run.
    command = read_processes({"python": sys.executable, "web_port": str(port), "state": str(state),
                              "gateway_port": "0", "fleet_nodes": "0"})["web"]
    workers = int(command[command.index("--processes") + 1])
    return command, workers


def start_platform(command: list[str], env: dict[str, str], state: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = state / "logs" / "bench-platform.log"
    return start_server(command, log, env=env, cwd=REPO), log


def start_mlflow(env: dict[str, str], store_uri: str, artifacts: str, workers: int, state: Path) -> tuple[
        subprocess.Popen[bytes], int, Path]:
    port = free_port()
    # Only the flags decide where MLflow's server stores things, not the platform's MLFLOW_* variables.
    clean = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--serve-artifacts",
               "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]
    log = state / "logs" / "bench-mlflow.log"
    return start_server(command, log, env=clean, cwd=state), port, log


def mlflow_http_stack() -> str:
    """What MLflow's uvicorn will run on. Without httptools and uvloop (requirements-dev.txt) it parses HTTP
    in pure Python and answers about three times slower here: a baseline that would flatter the platform."""
    from importlib.util import find_spec

    missing = [name for name in ("httptools", "uvloop") if find_spec(name) is None]
    if missing:
        return f"uvicorn WITHOUT {' and '.join(missing)}: MLflow is slower than at its best, ratios are inflated"
    return "uvicorn with httptools and uvloop"


def check_answers(platform: Target, mlflow: Target, eps: list[Endpoint], name: str, versions: int) -> None:
    """Before timing anything: both servers answer each read with the same data, so that the
    comparison is like for like."""
    got: dict[str, tuple[Any, Any]] = {}
    for ep in eps:
        if ep.key == "version_create" or ep.mlflow is None:
            continue
        answers = []
        for target, make in ((platform, ep.platform), (mlflow, ep.mlflow)):
            req = make(name, versions, 0)
            status, body = fetch_json(target.port, Request(req.method, req.path, req.body,
                                                           {**target.headers, **req.headers}))
            if status != 200 or not isinstance(body, dict):
                raise RuntimeError(f"{ep.key} on port {target.port}: HTTP {status}: {str(body)[:300]}")
            answers.append(body)
        got[ep.key] = (answers[0], answers[1])
    page = min(50, versions)
    (p_model, m_model), (p_list, m_list) = got["model_detail"], got["version_list"]
    (p_version, m_version) = got["version_detail"]
    checks = {
        "model detail: platform's version_count": (p_model["version_count"], versions),
        "model detail: MLflow's latest version": (int(m_model["registered_model"]["latest_versions"][0]["version"]),
                                                  versions),
        "version list: platform's page": (len(p_list["results"]), page),
        "version list: MLflow's page": (len(m_list["model_versions"]), page),
        "version list: same versions": (sorted(v["version"] for v in p_list["results"]),
                                        sorted(int(v["version"]) for v in m_list["model_versions"])),
        "version detail: same version": (p_version["version"], int(m_version["model_version"]["version"])),
    }
    wrong = [f"{what}: {a!r} != {b!r}" for what, (a, b) in checks.items() if a != b]
    if wrong:
        raise RuntimeError("the servers do not answer alike:\n  " + "\n  ".join(wrong))


# ---- measuring ----------------------------------------------------------------------------------

@dataclass
class Settings:
    duration_s: float
    warmup_s: float
    min_requests: int
    concurrency: int
    rounds: int


@dataclass(frozen=True)
class Target:
    port: int
    headers: dict[str, str]


def measure_pair(platform: Target, mlflow: Target | None, ep: Endpoint, name: str, versions: int,
                 cfg: Settings) -> tuple[LoadResult, LoadResult | None]:
    """Platform and MLflow in alternating rounds, so that a disturbance from outside (the machine is
    shared) falls on both sides alike; each side's rounds are merged."""
    sides: list[tuple[Target, Callable[[str, int, int], Request]]] = [(platform, ep.platform)]
    if mlflow is not None and ep.mlflow is not None:
        sides.append((mlflow, ep.mlflow))
    merged: list[LoadResult | None] = [None, None]
    for r in range(cfg.rounds):
        for s, (target, make) in enumerate(sides):
            def build(i: int, make: Callable[[str, int, int], Request] = make, target: Target = target) -> Request:
                req = make(name, versions, i)
                return Request(req.method, req.path, req.body, {**target.headers, **req.headers})

            res = run_load(target.port, build, concurrency=cfg.concurrency, duration_s=cfg.duration_s / cfg.rounds,
                           warmup_s=cfg.warmup_s if r == 0 else 0.0,
                           min_requests=-(-cfg.min_requests // cfg.rounds), first_index=r * 1_000_000)
            previous = merged[s]
            merged[s] = res if previous is None else previous.merged(res)
    assert merged[0] is not None
    return merged[0], merged[1]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def print_table(versions: int, rows: list[dict[str, Any]]) -> None:
    headers = ["endpoint", "platform req/s", "p50 ms", "p99 ms", "n", "MLflow req/s", "p50 ms", "p99 ms", "n",
               "ratio"]
    body = []
    for row in rows:
        p, m = row["platform"], row["mlflow"]
        n_p = f"{p['requests']}" + (f" ({p['errors']} err)" if p["errors"] else "")
        n_m = f"{m['requests']}" + (f" ({m['errors']} err)" if m["errors"] else "")
        body.append([row["label"], fmt(p["rps"]), fmt(p["p50_ms"]), fmt(p["p99_ms"]), n_p,
                     fmt(m["rps"]), fmt(m["p50_ms"]), fmt(m["p99_ms"]), n_m,
                     "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"])
    print(f"\n{versions:,} versions of one model", flush=True)
    print(table(headers, body), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run for CI: 100 and 1,000 versions, 2 s each")
    parser.add_argument("--versions", help="comma-separated model sizes (default 100,10000; quick 100,1000)")
    parser.add_argument("--duration", type=float, help="measured seconds per endpoint and server")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)

    sizes = sorted({int(v) for v in (args.versions or ("100,1000" if args.quick else "100,10000")).split(",")})
    if sizes[0] < 1:
        parser.error("--versions: each model needs at least 1 version")
    cfg = Settings(duration_s=args.duration or (2.0 if args.quick else 8.0), warmup_s=0.5 if args.quick else 1.5,
                   min_requests=8 if args.quick else 16, concurrency=args.concurrency, rounds=2 if args.quick else 4)
    env = _env_or_exit()
    state = Path(env["PLATFORM_STATE_DIR"]).resolve()
    mlflow_url = env.get("MLFLOW_BACKEND_STORE_URI") or env["DATABASE_URL"]
    artifacts = env.get("MLFLOW_ARTIFACTS_URI") or str(state / "mlartifacts")
    started = time.perf_counter()

    print("bench/registry: migrating and seeding", flush=True)
    models = {f"bench-{n}": n for n in sizes}
    t0 = time.perf_counter()
    seed = seed_registry(models, state)
    seed_s = time.perf_counter() - t0
    per_model = ", ".join(f"{m['versions']:,} versions in {m['seed_s']:.1f}s" for m in seed["models"].values())
    print(f"  migrations {seed['migrate_s']:.1f}s; seeded {per_model} (version 1 registered through the platform, "
          f"the rest copied with SQL); {seed_s:.1f}s in all", flush=True)
    copy_uri = copy_mlflow_database(mlflow_url)

    servers: list[subprocess.Popen[bytes]] = []
    try:
        platform_port = free_port()
        web_command, workers = platform_web_command(platform_port, state)
        platform, platform_log = start_platform(web_command, env, state)
        servers.append(platform)
        mlflow, mlflow_port, mlflow_log = start_mlflow(env, copy_uri, artifacts, workers, state)
        servers.append(mlflow)
        auth = {"Authorization": f"Bearer {seed['token']}"}
        wait_http(platform_port, "/api/v1/me/", platform, platform_log, headers=auth)
        wait_http(mlflow_port, "/health", mlflow, mlflow_log)
        # MLflow's server starts helpers (a job runner and Huey consumers) that import for seconds.
        settled = wait_idle(servers)
        print(f"  platform: uWSGI as in platform/processes.conf, {workers} processes, 127.0.0.1:{platform_port}   "
              f"MLflow: mlflow server --workers {workers} ({mlflow_http_stack()}), 127.0.0.1:{mlflow_port} "
              f"(database {COPY_DB}); "
              f"idle after {settled:.0f}s", flush=True)
        print(f"  {cfg.concurrency} client threads, keep-alive; per endpoint and server {cfg.warmup_s:g}s warm-up, "
              f"then {cfg.duration_s:g}s measured in {cfg.rounds} rounds alternating with the other server",
              flush=True)

        results: dict[str, list[dict[str, Any]]] = {}
        for versions in sizes:
            name = f"bench-{versions}"
            rows: list[dict[str, Any]] = []
            measured: dict[str, LoadResult] = {}
            check_answers(Target(platform_port, auth), Target(mlflow_port, {}), endpoints(seed), name, versions)
            for ep in endpoints(seed):
                p, maybe_m = measure_pair(Target(platform_port, auth), Target(mlflow_port, {}), ep, name, versions,
                                          cfg)
                m = maybe_m if maybe_m is not None else measured[ep.same_as]
                measured[ep.key] = m
                for side, res in (("platform", p), ("MLflow", m)):
                    if res.errors:
                        print(f"  {ep.key} on {side}: {res.errors} errors, first: {res.first_error}", flush=True)
                rows.append({"key": ep.key, "label": ep.label, "platform": p.figures(), "mlflow": m.figures(),
                             "ratio": _ratio(p.rps, m.rps)})
            results[str(versions)] = rows
            print_table(versions, rows)
    finally:
        for proc in reversed(servers):
            stop_server(proc)

    summary = summarize(sizes, results, seed_s, time.perf_counter() - started, args.quick, cfg, workers)
    print()
    _print_verdict(summary)
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def summarize(sizes: list[int], results: dict[str, list[dict[str, Any]]], seed_s: float, total_s: float,
              quick: bool, cfg: Settings, workers: int) -> dict[str, Any]:
    small, large = str(min(sizes)), str(max(sizes))
    by_key = {size: {row["key"]: row for row in rows} for size, rows in results.items()}
    ratios = {size: {key: row["ratio"] for key, row in rows.items()} for size, rows in by_key.items()}
    # Growth: p50 at the largest model over p50 at the smallest (1.0 = no cost from the number of versions).
    growth = {key: _ratio(by_key[large][key]["platform"]["p50_ms"], by_key[small][key]["platform"]["p50_ms"])
              for key in by_key[large]}
    mlflow_growth = {key: _ratio(by_key[large][key]["mlflow"]["p50_ms"], by_key[small][key]["mlflow"]["p50_ms"])
                     for key in by_key[large]}
    compared = [k for k in by_key[large] if k not in INFORMATIONAL]
    reads = [k for k in compared if k != "version_create"]
    figures = {size: {key: {"platform": row["platform"], "mlflow": row["mlflow"]} for key, row in rows.items()}
               for size, rows in by_key.items()}
    return {
        "bench": "registry",
        "quick": quick,
        "versions": sizes,
        "workers": workers,
        "concurrency": cfg.concurrency,
        "duration_s": cfg.duration_s,
        "ratios": ratios,
        "min_ratio": min((r for size in ratios for k, r in ratios[size].items()
                          if k not in INFORMATIONAL and r is not None), default=None),
        "min_read_ratio_at_max_versions": min((ratios[large][k] for k in reads if ratios[large][k] is not None),
                                              default=None),
        "model_detail_ratio_at_max_versions": ratios[large]["model_detail"],
        "platform_p50_growth": growth,
        "mlflow_p50_growth": mlflow_growth,
        "figures": figures,
        "seed_s": round(seed_s, 1),
        "total_s": round(total_s, 1),
    }


def _print_verdict(s: dict[str, Any]) -> None:
    large = str(max(s["versions"]))
    print(f"ratio = platform req/s / MLflow req/s. Targets: >= 1x on every endpoint (lowest: {s['min_ratio']}x), "
          f">= 5x on reads at {int(large):,} versions (lowest: {s['min_read_ratio_at_max_versions']}x), "
          "no cost growing with versions.")
    growth = ", ".join(f"{k} {v}x" for k, v in s["platform_p50_growth"].items())
    print(f"platform p50 at {int(large):,} / at {min(s['versions']):,} versions: {growth}")
    growth = ", ".join(f"{k} {v}x" for k, v in s["mlflow_p50_growth"].items())
    print(f"MLflow   p50 at {int(large):,} / at {min(s['versions']):,} versions: {growth}")
    print(f"seeding {s['seed_s']}s, whole run {s['total_s']}s")


if __name__ == "__main__":
    raise SystemExit(main())
