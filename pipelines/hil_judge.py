"""The verdict of a HIL run, from its figures alone (no I/O): stability first, then request errors, accuracy
through the server, the SLO, and the champion measured beside it in the same run.

A verdict a person would sign: a point whose windows never agreed is not judged, and the run cannot pass
(`unstable`); it fails only on what was judged: errors, accuracy and memory (which do not depend on timing),
and the SLO and the champion at the points that settled. A regression against the champion counts only
beyond the allowed percentage PLUS the noise band of that comparison (the larger spread of the two points'
agreeing windows), in every round measured at that point, and is shown in percent with that band either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PASSED, FAILED, UNSTABLE = "passed", "failed", "unstable"
DEFAULT_ALLOWED_PCT = 10.0
OK, FAIL, SKIPPED = "ok", "fail", "skipped"


@dataclass
class Judgement:
    status: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)  # per point: candidate against champion
    verdict: str = ""


def _check(name: str, outcome: str, words: str, **figures: Any) -> dict[str, Any]:
    return {"name": name, "outcome": outcome, "words": words, "figures": figures}


def _key(point: dict[str, Any]) -> tuple[int, int]:
    return int(point["batch_size"]), int(point["concurrency"])


def _at(point: dict[str, Any]) -> str:
    return f"batch {point['batch_size']}, concurrency {point['concurrency']}"


def _pct(new: float, old: float) -> float:
    return (new / old - 1) * 100 if old > 0 else math.inf


def _band(*spreads: float) -> float:
    finite = [s for s in spreads if math.isfinite(s)]
    return max(finite) if finite else math.inf


def compare(candidate: list[dict[str, Any]], champion: list[dict[str, Any]], allowed_pct: float,
            confirmations: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each point both engines were measured at: p99 and throughput of the candidate against the champion in
    percent (positive p99: slower; negative throughput: fewer inferences/s), each with its noise band and
    whether it regressed beyond allowed + band. A point measured in several rounds (`confirmations`: each
    round's flags) regressed only if it did in every round."""
    rounds = {_key(c): c["rounds"] for c in confirmations or []}
    theirs = {_key(p): p for p in champion}
    rows = []
    for mine in candidate:
        other = theirs.get(_key(mine))
        if other is None:
            continue
        p99_pct = _pct(mine["p99_ms"], other["p99_ms"])
        tput_pct = _pct(mine["inferences_per_s"], other["inferences_per_s"])
        p99_band = _band(mine["p99_spread_pct"], other["p99_spread_pct"])
        tput_band = _band(mine["throughput_spread_pct"], other["throughput_spread_pct"])
        rows.append({
            "batch_size": mine["batch_size"], "concurrency": mine["concurrency"],
            "p99_ms": mine["p99_ms"], "champion_p99_ms": other["p99_ms"], "p99_pct": p99_pct, "p99_band_pct": p99_band,
            "inferences_per_s": mine["inferences_per_s"], "champion_inferences_per_s": other["inferences_per_s"],
            "throughput_pct": tput_pct, "throughput_band_pct": tput_band,
            "p99_regressed": p99_pct > allowed_pct + p99_band,
            "throughput_regressed": -tput_pct > allowed_pct + tput_band,
            "stable": mine["status"] == "stable" and other["status"] == "stable",
            "rounds": len(rounds.get(_key(mine), [])) or 1,
        })
        earlier = rounds.get(_key(mine))
        if earlier:
            rows[-1]["p99_regressed"] = all(r["p99_regressed"] for r in earlier)
            rows[-1]["throughput_regressed"] = all(r["throughput_regressed"] for r in earlier)
    return rows


def judge(candidate: dict[str, Any], champion: dict[str, Any] | None, slo: dict[str, Any],
          accuracy: dict[str, Any], confirmations: list[dict[str, Any]] | None = None) -> Judgement:
    """`candidate` and `champion`: {"points": [...], "memory_bytes": int, "label": str}; `slo`: the objectives,
    each {"value": ..., "source": "..."} (p99_ms, batch, concurrency, min_throughput, max_memory_mb,
    max_regression_pct); `accuracy`: {"measured": bool, "passed": bool, "words": str, ...}."""
    j = Judgement(status=PASSED)
    points = candidate["points"]
    value = {k: v["value"] for k, v in slo.items()}
    source = {k: v["source"] for k, v in slo.items()}

    unsettled = [(engine["label"], p) for engine in (candidate, champion) if engine
                 for p in engine["points"] if p["status"] != "stable"]
    if unsettled:
        j.checks.append(_check("stability", FAIL, "; ".join(
            f"{label} at {_at(p)} did not settle in {p['windows']} windows (last three "
            f"{p['throughput_spread_pct']:.1f}% apart in throughput, {p['latency_spread_pct']:.1f}% in mean latency)"
            for label, p in unsettled), unstable=len(unsettled)))
    else:
        j.checks.append(_check("stability", OK, f"every point settled: three windows in a row within "
                                                f"{candidate.get('stability_pct', 10):g}%", points=len(points)))

    errors = sum(p["errors"] for p in points)
    first = next((p["first_error"] for p in points if p.get("first_error")), None)
    j.checks.append(_check("errors", FAIL if errors else OK,
                           f"{errors} request(s) failed under load, the first: {first}" if errors
                           else "no request failed", errors=errors))

    if accuracy.get("measured"):
        j.checks.append(_check("accuracy", OK if accuracy["passed"] else FAIL, accuracy["words"],
                               **accuracy.get("figures", {})))
    else:
        j.checks.append(_check("accuracy", SKIPPED, accuracy.get("words", "not measured")))

    if champion is not None:  # the evidence, whether or not timing can be judged
        j.comparison = compare(points, champion["points"], value.get("max_regression_pct", DEFAULT_ALLOWED_PCT),
                               confirmations)
    # Timing is judged only on points that settled; a point that did not is left unjudged, and the run cannot pass.
    _slo_checks(j, points, candidate["memory_bytes"], value, source)
    if champion is not None:
        _champion_check(j, champion, value.get("max_regression_pct", DEFAULT_ALLOWED_PCT),
                        source.get("max_regression_pct", "default"))
    else:
        j.checks.append(_check("champion", SKIPPED, "no champion engine on this target to compare with: "
                                                    "judged on its own figures"))

    failed = [c for c in j.checks if c["outcome"] == FAIL and c["name"] != "stability"]
    if failed:
        j.status = FAILED
    elif unsettled:
        j.status = UNSTABLE
    j.verdict = _words(j)
    return j


def _slo_checks(j: Judgement, points: list[dict[str, Any]], memory: int, value: dict[str, Any],
                source: dict[str, str]) -> None:
    if value.get("p99_ms") is not None:
        at = (int(value.get("batch", 1)), int(value.get("concurrency", 1)))
        point = next((p for p in points if _key(p) == at), None)
        budget = float(value["p99_ms"])
        if point is None:
            j.checks.append(_check("slo_p99", FAIL, f"the p99 budget is at batch {at[0]}, concurrency {at[1]}, "
                                                    "which the sweep did not measure", budget_ms=budget))
        elif point["status"] != "stable":
            j.checks.append(_check("slo_p99", SKIPPED, f"the p99 budget of {budget:g} ms ({source['p99_ms']}) not "
                                                       f"judged: its point, {_at(point)}, did not settle",
                                   budget_ms=budget))
        else:
            ok = point["p99_ms"] <= budget
            j.checks.append(_check("slo_p99", OK if ok else FAIL,
                                   f"p99 {point['p99_ms']:.2f} ms at {_at(point)} "
                                   f"{'within' if ok else 'over'} the {budget:g} ms budget ({source['p99_ms']})",
                                   p99_ms=point["p99_ms"], budget_ms=budget))
    settled = [p for p in points if p["status"] == "stable"]
    if value.get("min_throughput") is not None and not settled:
        j.checks.append(_check("slo_throughput", SKIPPED, "the throughput asked for not judged: no point settled"))
    elif value.get("min_throughput") is not None:
        best = max(settled, key=lambda p: p["inferences_per_s"])
        floor = float(value["min_throughput"])
        ok = best["inferences_per_s"] >= floor
        # Under the floor at every settled point, while some did not settle: one of those might meet it.
        outcome = OK if ok else FAIL if len(settled) == len(points) else SKIPPED
        j.checks.append(_check("slo_throughput", outcome,
                               f"best {best['inferences_per_s']:.1f} inferences/s (at {_at(best)}) "
                               f"{'meets' if ok else 'is under'} the {floor:g} asked for ({source['min_throughput']})"
                               + ("" if outcome != SKIPPED else "; not judged: some points did not settle"),
                               inferences_per_s=best["inferences_per_s"], minimum=floor))
    if value.get("max_memory_mb") is not None:
        cap = float(value["max_memory_mb"])
        mib = memory / 2**20
        ok = mib <= cap
        j.checks.append(_check("slo_memory", OK if ok else FAIL,
                               f"server memory with the engine {mib:.1f} MiB {'within' if ok else 'over'} "
                               f"the {cap:g} MiB limit ({source['max_memory_mb']})", memory_mib=mib, limit_mib=cap))
    if not any(c["name"].startswith("slo_") for c in j.checks):
        j.checks.append(_check("slo", SKIPPED, "no SLO declared (version or model tags hil.p99_ms, "
                                               "hil.min_throughput, hil.max_memory_mb, or the model's HIL policy)"))


def _champion_check(j: Judgement, champion: dict[str, Any], allowed: float, allowed_source: str) -> None:
    judged = [r for r in j.comparison if r["stable"]]  # both engines' figures settled there
    if not judged:
        why = "was measured at no point in common" if not j.comparison else "settled at no point where both did"
        j.checks.append(_check("champion", SKIPPED, f"{champion['label']} {why}: not compared"))
        return
    worse = [r for r in judged if r["p99_regressed"] or r["throughput_regressed"]]
    worst_p99 = max(judged, key=lambda r: r["p99_pct"])
    worst_tput = min(judged, key=lambda r: r["throughput_pct"])
    summary = (f"worst p99 {worst_p99['p99_pct']:+.1f}% (noise band ±{worst_p99['p99_band_pct']:.1f}%) at "
               f"{_at(worst_p99)}; worst throughput {worst_tput['throughput_pct']:+.1f}% "
               f"(±{worst_tput['throughput_band_pct']:.1f}%) at {_at(worst_tput)}")
    if worse:
        detail = "; ".join(
            (f"p99 {r['p99_pct']:+.1f}% (±{r['p99_band_pct']:.1f}%)" if r["p99_regressed"] else "")
            + (" and " if r["p99_regressed"] and r["throughput_regressed"] else "")
            + (f"throughput {r['throughput_pct']:+.1f}% (±{r['throughput_band_pct']:.1f}%)"
               if r["throughput_regressed"] else "") + f" at {_at(r)}"
            + (f" (in all {r['rounds']} rounds)" if r["rounds"] > 1 else "") for r in worse)
        j.checks.append(_check("champion", FAIL, f"regressed against {champion['label']} beyond the {allowed:g}% "
                                                 f"allowed ({allowed_source}) plus the noise band: {detail}",
                               regressed_points=len(worse), allowed_pct=allowed))
    else:
        unconfirmed = [r for r in judged if r["rounds"] > 1]
        again = (f"; {len(unconfirmed)} point(s) looked worse once and, measured again, not in every round: "
                 + ", ".join(_at(r) for r in unconfirmed)) if unconfirmed else ""
        j.checks.append(_check("champion", OK, f"no point regressed against {champion['label']} beyond the "
                                               f"{allowed:g}% allowed plus the noise band: {summary}{again}",
                               allowed_pct=allowed, remeasured=len(unconfirmed)))


def _words(j: Judgement) -> str:
    failed = [c["words"] for c in j.checks if c["outcome"] == FAIL and c["name"] != "stability"]
    if j.status == FAILED:
        head = "Failed: " + "; ".join(failed) + "."
        if any(c["name"] == "stability" and c["outcome"] == FAIL for c in j.checks):
            head += " Points that did not settle were not judged."
        return head
    if j.status == UNSTABLE:
        stability = next(c for c in j.checks if c["name"] == "stability")
        met = [c["words"] for c in j.checks if c["outcome"] == OK and c["name"] != "stability"]
        return ("Unstable, not passed: " + stability["words"] + ". Figures that did not settle are not judged; run "
                "it again on a quieter machine or with longer windows." + (" Judged and met: " + "; ".join(met) + "."
                                                                            if met else ""))
    return "Passed: " + "; ".join(c["words"] for c in j.checks if c["outcome"] != SKIPPED) + "." + "".join(
        f" ({c['words']}.)" for c in j.checks if c["outcome"] == SKIPPED)
