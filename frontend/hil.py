"""A HIL run's evidence shaped for its page: the points of both engines side by side, the charts' data, the
objectives, memory and hardware in words. Pure functions of the run's stored JSON (a finished run never changes);
figures the worker could not give are None and shown as a dash."""

from __future__ import annotations

from typing import Any

from pipelines.hardware import PROFILES_BY_NAME
from pipelines.models import HilRun

MIB = 2**20

OBJECTIVE_LABELS = {
    "p99_ms": ("p99 latency budget", "ms"), "batch": ("…at batch size", ""), "concurrency": ("…at concurrency", ""),
    "min_throughput": ("Throughput at least", "inferences/s"), "max_memory_mb": ("Server memory at most", "MiB"),
    "max_regression_pct": ("Regression against the champion at most", "% beyond the noise band"),
}
CHECK_LABELS = {
    "stability": "Stability", "errors": "Errors under load", "accuracy": "Accuracy through the server",
    "slo_p99": "SLO: p99 latency", "slo_throughput": "SLO: throughput", "slo_memory": "SLO: memory",
    "slo": "SLO", "champion": "Against the champion",
}
CHART_FIELDS = ("concurrency", "batch_size", "p50_ms", "p99_ms", "inferences_per_s", "status")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _points(engine: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in engine.get("points") or [] if isinstance(p, dict)]


def _key(point: dict[str, Any]) -> tuple[Any, Any]:
    return point.get("batch_size"), point.get("concurrency")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def point_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point the candidate was measured at (by batch size, then concurrency): its figures, the
    champion's at the same point, and the comparison the judge made (difference in percent with its noise band)."""
    champion = {_key(p): p for p in _points(_dict(results.get("champion")))}
    compared = {_key(r): r for r in results.get("comparison") or [] if isinstance(r, dict)}
    rows = []
    for mine in sorted(_points(_dict(results.get("candidate"))), key=lambda p: (p.get("batch_size") or 0,
                                                                                 p.get("concurrency") or 0)):
        theirs = champion.get(_key(mine), {})
        row = compared.get(_key(mine), {})
        rows.append({
            "batch_size": mine.get("batch_size"), "concurrency": mine.get("concurrency"),
            "status": mine.get("status"), "champion_status": theirs.get("status"),
            "unstable": mine.get("status") != "stable" or (bool(theirs) and theirs.get("status") != "stable"),
            "windows": mine.get("windows"), "requests": mine.get("requests"), "errors": mine.get("errors"),
            "p50_ms": mine.get("p50_ms"), "p99_ms": mine.get("p99_ms"),
            "inferences_per_s": mine.get("inferences_per_s"),
            "champion_p50_ms": theirs.get("p50_ms"), "champion_p99_ms": theirs.get("p99_ms"),
            "champion_inferences_per_s": theirs.get("inferences_per_s"),
            "p99_pct": row.get("p99_pct"), "p99_band_pct": row.get("p99_band_pct"),
            "throughput_pct": row.get("throughput_pct"), "throughput_band_pct": row.get("throughput_band_pct"),
            "p99_regressed": bool(row.get("p99_regressed")),
            "throughput_regressed": bool(row.get("throughput_regressed")),
            "spread_pct": mine.get("throughput_spread_pct"),
        })
    return rows


def chart_data(run: HilRun) -> dict[str, Any]:
    """What the two charts draw: each engine's points (the few fields plotted) and the objectives as lines."""
    results = _dict(run.results)
    slo = {k: _dict(v).get("value") for k, v in _dict(run.slo).items()}

    def engine(found: Any) -> dict[str, Any] | None:
        found = _dict(found)
        if not _points(found):
            return None
        return {"label": str(found.get("label") or ""),
                "points": [{f: p.get(f) for f in CHART_FIELDS} for p in _points(found)]}

    return {"candidate": engine(results.get("candidate")), "champion": engine(results.get("champion")),
            "p99_budget_ms": _number(slo.get("p99_ms")), "p99_budget_batch": int(slo.get("batch") or 1),
            "p99_budget_concurrency": int(slo.get("concurrency") or 1),
            "min_throughput": _number(slo.get("min_throughput"))}


def objectives(run: HilRun) -> list[dict[str, Any]]:
    shown = []
    for key, found in _dict(run.slo).items():
        label, unit = OBJECTIVE_LABELS.get(key, (key.replace("_", " "), ""))
        found = _dict(found)
        shown.append({"key": key, "label": label, "value": found.get("value"), "unit": unit,
                      "source": found.get("source", "")})
    return shown


def memory(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Server memory (PSS) empty and with each engine loaded, in MiB, and what the engine itself added."""
    empty = _number(results.get("empty_server_memory_bytes"))
    rows = []
    if empty is not None:
        rows.append({"what": "Triton with no model loaded", "mib": empty / MIB, "added_mib": None})
    for role in ("candidate", "champion"):
        engine = _dict(results.get(role))
        used = _number(engine.get("memory_bytes"))
        if used is not None:
            rows.append({"what": f"with {engine.get('label') or role}", "role": role, "mib": used / MIB,
                         "added_mib": (used - empty) / MIB if empty is not None else None})
    return rows


def hardware_facts(hardware: Any, profile: str, cpus: Any = None) -> list[tuple[str, str]]:
    """What the worker found on its machine, the profile's requirements it met, and how the run split the
    CPUs between the server and the load clients (`cpus`: the run's results["cpus"])."""
    facts = _dict(hardware)
    wanted = PROFILES_BY_NAME.get(profile)
    shown = [("Profile", wanted.description)] if wanted else []
    if facts.get("cpu_model") or facts.get("arch"):
        shown.append(("CPU", " · ".join(str(x) for x in (facts.get("cpu_model"), facts.get("arch")) if x)))
    if isinstance(facts.get("cores"), int):
        shown.append(("Cores", str(facts["cores"])))
    if isinstance(facts.get("memory_bytes"), int):
        shown.append(("Memory", f"{facts['memory_bytes'] / 2**30:.1f} GiB"))
    gpus = [g for g in facts.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        shown.append(("GPUs", ", ".join(f"{g.get('name', '?')} ({g.get('memory_mib', '?')} MiB, driver "
                                        f"{g.get('driver', '?')})" for g in gpus)))
    if facts.get("cuda"):
        shown.append(("CUDA", str(facts["cuda"])))
    if facts.get("tensorrt"):
        shown.append(("TensorRT", str(facts["tensorrt"])))
    flags = facts.get("cpu_flags")
    if wanted and wanted.cpu_flags and isinstance(flags, list):
        shown.append(("CPU flags the profile needs", " ".join(
            f"{f} {'✓' if f in flags else '✗'}" for f in wanted.cpu_flags)))
    if _dict(cpus).get("words"):
        shown.append(("CPUs during the measurement", str(_dict(cpus)["words"])))
    return shown


def checks(run: HilRun) -> list[dict[str, Any]]:
    return [{**c, "label": CHECK_LABELS.get(str(c.get("name")), str(c.get("name", "")).replace("_", " "))}
            for c in run.checks or [] if isinstance(c, dict)]


def evidence(run: HilRun) -> dict[str, Any]:
    results = _dict(run.results)
    accuracy = _dict(results.get("accuracy"))
    return {
        "rows": point_rows(results), "has_champion": bool(_points(_dict(results.get("champion")))),
        "candidate_label": _dict(results.get("candidate")).get("label") or "",
        "champion_label": _dict(results.get("champion")).get("label") or "",
        "chart": chart_data(run), "objectives": objectives(run), "memory": memory(results),
        "hardware_facts": hardware_facts(run.hardware, run.profile, results.get("cpus")), "checks": checks(run),
        "accuracy": accuracy,
        "accuracy_figures": sorted(_dict(accuracy.get("figures")).items()),
        "settings": _dict(results.get("settings")),
    }
