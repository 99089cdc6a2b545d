"""The HIL verdict from figures: stability first, errors and accuracy whatever the timing, the SLO, and the
champion beyond the allowed regression plus the noise band."""

from __future__ import annotations

from typing import Any

from pipelines.hil_judge import FAILED, PASSED, UNSTABLE, compare, judge

ACCURATE = {"measured": True, "passed": True, "words": "label agreement 1.0000 on 256 reference rows",
            "figures": {"label_agreement": 1.0}}


def _point(batch: int = 1, concurrency: int = 1, p99: float = 2.0, rate: float = 1000.0, spread: float = 4.0,
           status: str = "stable", errors: int = 0) -> dict[str, Any]:
    return {"batch_size": batch, "concurrency": concurrency, "status": status,
            "windows": 3 if status == "stable" else 10, "errors": errors,
            "first_error": "HTTP 500: boom" if errors else None, "p50_ms": p99 / 2,
            "p99_ms": p99, "inferences_per_s": rate, "throughput_spread_pct": spread, "latency_spread_pct": spread,
            "p99_spread_pct": spread}


def _engine(*points: dict[str, Any], memory_mib: float = 300, label: str = "champion v1 (cpu-fp32-onnxruntime)"):
    return {"points": list(points), "memory_bytes": int(memory_mib * 2**20), "label": label, "stability_pct": 10}


def _slo(**values: Any) -> dict[str, dict[str, Any]]:
    return {k: {"value": v, "source": f"version tag hil.{k}"} for k, v in values.items()}


def _outcomes(j) -> dict[str, str]:
    return {c["name"]: c["outcome"] for c in j.checks}


def test_a_candidate_no_worse_than_the_champion_within_its_slo_passes_with_the_figures_in_words():
    j = judge(_engine(_point(p99=2.1), _point(concurrency=2, p99=3.0, rate=1900)),
              _engine(_point(p99=2.0), _point(concurrency=2, p99=3.1, rate=2000)),
              _slo(p99_ms=5, batch=1, concurrency=1, min_throughput=1500, max_memory_mb=512), ACCURATE)
    assert j.status == PASSED
    assert _outcomes(j) == {"stability": "ok", "errors": "ok", "accuracy": "ok", "slo_p99": "ok",
                            "slo_throughput": "ok", "slo_memory": "ok", "champion": "ok"}
    assert j.verdict.startswith("Passed: every point settled")
    assert "p99 2.10 ms at batch 1, concurrency 1 within the 5 ms budget (version tag hil.p99_ms)" in j.verdict
    assert "worst p99 +5.0% (noise band ±4.0%) at batch 1, concurrency 1" in j.verdict
    assert [round(r["p99_pct"], 1) for r in j.comparison] == [5.0, -3.2]
    assert [round(r["throughput_pct"], 1) for r in j.comparison] == [0.0, -5.0]


def test_a_regression_counts_only_beyond_the_allowed_percentage_plus_the_noise_band():
    champion = _engine(_point(p99=2.0, spread=8.0))
    # +17%: over the 10% allowed, but within 10% + the 8% band: not a regression anyone could sign.
    within = judge(_engine(_point(p99=2.34, spread=3.0)), champion, _slo(), ACCURATE)
    assert within.status == PASSED and within.comparison[0]["p99_band_pct"] == 8.0
    beyond = judge(_engine(_point(p99=2.5, spread=3.0)), champion, _slo(), ACCURATE)
    assert beyond.status == FAILED
    assert ("regressed against champion v1 (cpu-fp32-onnxruntime) beyond the 10% allowed (default) plus the noise "
            "band: p99 +25.0% (±8.0%) at batch 1, concurrency 1") in beyond.verdict
    slower = judge(_engine(_point(rate=700)), _engine(_point(rate=1000)), _slo(max_regression_pct=5), ACCURATE)
    assert slower.status == FAILED and "throughput -30.0% (±4.0%) at batch 1, concurrency 1" in slower.verdict
    assert "beyond the 5% allowed (version tag hil.max_regression_pct)" in slower.verdict


def test_points_that_never_settled_give_unstable_not_a_pass_nor_a_verdict_on_their_timing():
    j = judge(_engine(_point(p99=50.0, status="unstable", spread=35.0), label="v2 (cpu-fp32-onnxruntime)"),
              _engine(_point(p99=2.0)), _slo(p99_ms=5), ACCURATE)
    assert j.status == UNSTABLE and _outcomes(j)["slo_p99"] == "skipped" and _outcomes(j)["champion"] == "skipped"
    assert j.verdict.startswith("Unstable, not passed: v2 (cpu-fp32-onnxruntime) at batch 1, concurrency 1 did not "
                                "settle in 10 windows (last three 35.0% apart in throughput, 35.0% in mean latency)")
    assert j.comparison  # the figures are still shown
    # Errors and accuracy do not depend on timing: they fail the run even when it did not settle.
    wrong = {"measured": True, "passed": False, "words": "label agreement 0.9100 on 256 reference rows (under 0.97)"}
    failed = judge(_engine(_point(status="unstable", errors=3)), None, _slo(), wrong)
    assert failed.status == FAILED
    assert "3 request(s) failed under load, the first: HTTP 500: boom" in failed.verdict
    assert "label agreement 0.9100" in failed.verdict and "Points that did not settle were not judged" \
        in failed.verdict
    # What settled is judged: an SLO missed at a settled point fails the run, whatever else did not settle.
    slow = judge(_engine(_point(p99=300.0), _point(batch=8, status="unstable")), None, _slo(p99_ms=50), ACCURATE)
    assert slow.status == FAILED and "p99 300.00 ms at batch 1, concurrency 1 over the 50 ms budget" in slow.verdict
    met = judge(_engine(_point(p99=3.0), _point(batch=8, status="unstable")), None, _slo(p99_ms=50), ACCURATE)
    assert met.status == UNSTABLE and "Judged and met: no request failed" in met.verdict


def test_the_slo_is_judged_where_it_is_declared_and_says_what_was_missed():
    candidate = _engine(_point(p99=2.0), _point(batch=8, p99=9.0, rate=4000), memory_mib=900)
    j = judge(candidate, None, _slo(p99_ms=5, batch=8, concurrency=1, min_throughput=5000, max_memory_mb=512), ACCURATE)
    assert j.status == FAILED
    assert "p99 9.00 ms at batch 8, concurrency 1 over the 5 ms budget" in j.verdict
    assert "best 4000.0 inferences/s (at batch 8, concurrency 1) is under the 5000 asked for" in j.verdict
    assert "server memory with the engine 900.0 MiB over the 512 MiB limit" in j.verdict
    missing = judge(candidate, None, _slo(p99_ms=5, batch=4, concurrency=1), ACCURATE)
    assert missing.status == FAILED and "at batch 4, concurrency 1, which the sweep did not measure" in missing.verdict


def test_with_nothing_to_compare_with_it_passes_on_its_own_figures_and_says_so():
    j = judge(_engine(_point()), None, {}, {"measured": False, "words": "not measured: no reference set"})
    assert j.status == PASSED and _outcomes(j)["champion"] == "skipped" and _outcomes(j)["slo"] == "skipped"
    assert "(no champion engine on this target to compare with: judged on its own figures.)" in j.verdict
    assert "(not measured: no reference set.)" in j.verdict


def test_compare_keeps_only_points_both_engines_were_measured_at():
    rows = compare([_point(batch=1), _point(batch=64)], [_point(batch=1)], 10)
    assert [(r["batch_size"], r["concurrency"]) for r in rows] == [(1, 1)]


def test_predictions_are_read_from_the_label_output_else_the_arg_max_of_scores_else_the_value():
    from pipelines.hil_runner import _predictions

    labels = [{"name": "probabilities", "shape": [2, 3], "data": [0.1, 0.8, 0.1, 0.7, 0.2, 0.1]},
              {"name": "label", "shape": [2, 1], "data": [1, 0]}]
    assert _predictions(labels) == [1, 0]
    assert _predictions([{"name": "logits", "shape": [2, 3], "data": [0, 1, 5, 9, 1, 0]}]) == [2, 0]
    assert _predictions([{"name": "variable", "shape": [3, 1], "data": [1.5, 2.5, 3.5]}]) == [1.5, 2.5, 3.5]
    assert _predictions([{"name": "logits", "shape": [3], "data": [0, 7, 1]}], batched=False) == [1]


def test_a_regression_counts_only_when_every_round_measured_at_its_point_shows_it():
    candidate, champion = _engine(_point(p99=2.6)), _engine(_point(p99=2.0))
    flags = {"p99_pct": 30.0, "p99_band_pct": 4.0, "throughput_pct": 0.0, "throughput_band_pct": 4.0,
             "throughput_regressed": False}
    once = [{"batch_size": 1, "concurrency": 1, "rounds": [{**flags, "p99_regressed": True},
                                                           {**flags, "p99_pct": 2.0, "p99_regressed": False}]}]
    # The last round's figures are the point's; a spike seen in one round of two is not a regression.
    passed = judge(_engine(_point(p99=2.04)), champion, _slo(), ACCURATE, once)
    assert passed.status == PASSED and passed.comparison[0]["rounds"] == 2
    assert "1 point(s) looked worse once and, measured again, not in every round: batch 1, concurrency 1" \
        in passed.verdict
    every = [{"batch_size": 1, "concurrency": 1, "rounds": [{**flags, "p99_regressed": True}] * 3}]
    failed = judge(candidate, champion, _slo(), ACCURATE, every)
    assert failed.status == FAILED and "p99 +30.0% (±4.0%) at batch 1, concurrency 1 (in all 3 rounds)" \
        in failed.verdict
