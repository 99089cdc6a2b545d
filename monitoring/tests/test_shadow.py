"""Shadow analysis: comparing two KServe v2 answers to one request, and the verdict over a window of pairs."""

from __future__ import annotations

import json
import math
import random

from monitoring.shadow import Pair, ShadowThresholds, compare, judge_pairs


def answer(*outputs: tuple[str, list[object]]) -> bytes:
    return json.dumps({"model_name": "m", "outputs": [
        {"name": n, "shape": [len(d)], "datatype": "FP32" if not isinstance(d[0], str) else "BYTES", "data": d}
        for n, d in outputs]}).encode()


def test_answers_compare_by_label_and_largest_value_difference():
    same = compare(answer(("probabilities", [0.1, 0.7, 0.2])), answer(("probabilities", [0.1, 0.7, 0.2])))
    assert same.labels_agree and same.max_diff == 0.0
    close = compare(answer(("probabilities", [0.1, 0.7, 0.2])), answer(("probabilities", [0.12, 0.6, 0.28])))
    assert close.labels_agree and math.isclose(close.max_diff, 0.1)
    flipped = compare(answer(("probabilities", [0.1, 0.5, 0.4])), answer(("probabilities", [0.1, 0.4, 0.5])))
    assert not flipped.labels_agree
    # a label output (strings) is compared as it is, the first output by name holds the label
    labelled = compare(answer(("label", ["cat"]), ("probabilities", [0.9, 0.1])),
                       answer(("label", ["dog"]), ("probabilities", [0.85, 0.15])))
    assert not labelled.labels_agree and math.isclose(labelled.max_diff, 0.05)


def test_answers_that_cannot_be_compared_disagree():
    stable = answer(("y", [1.0, 2.0]))
    for other in (answer(("y", [1.0, 2.0, 3.0])), answer(("z", [1.0, 2.0])), b"not json", b'{"error": "x"}'):
        d = compare(stable, other)
        assert not d.labels_agree and d.max_diff == math.inf


def pairs(n: int, rng: random.Random, *, candidate_ms: float = 0.0, flip_every: int = 0, fail_every: int = 0,
          drift: float = 0.0) -> list[Pair]:
    out = []
    for i in range(n):
        probs = [rng.random() for _ in range(3)]
        other = [p + drift for p in probs]
        if flip_every and i % flip_every == 0:
            other = probs[1:] + probs[:1]  # rotated: the argmax moves
        base = rng.uniform(2.0, 4.0)
        status = 500 if fail_every and i % fail_every == 0 else 200
        out.append(Pair(200, base, answer(("p", probs)), status, base + candidate_ms + rng.uniform(-0.3, 0.3),
                        answer(("p", other))))
    return out


def test_a_candidate_answering_as_stable_passes_and_says_how_many_requests_it_saw():
    verdict = judge_pairs(pairs(40, random.Random(1)), ShadowThresholds(min_requests=20), "replayed")
    assert verdict.outcome == "pass", verdict.reason
    assert verdict.reason.startswith("answers as stable's")
    assert "40 replayed requests sent to both" in verdict.reason
    assert verdict.figures["agreement"] == 1.0 and verdict.figures["max_prob_diff"] == 0.0


def test_too_few_pairs_are_inconclusive_not_a_pass():
    verdict = judge_pairs(pairs(5, random.Random(2)), ShadowThresholds(min_requests=20))
    assert verdict.outcome == "inconclusive"
    assert verdict.reason.startswith("5 of 20 shadow requests compared")


def test_a_candidate_whose_labels_differ_fails():
    verdict = judge_pairs(pairs(40, random.Random(3), flip_every=4), ShadowThresholds(min_requests=20))
    assert verdict.outcome == "fail", verdict.reason
    assert "labels differ in 10" in verdict.reason


def test_probabilities_drifting_past_the_limit_fail_and_within_it_pass():
    limits = ShadowThresholds(min_requests=20, max_prob_diff=0.05)
    assert judge_pairs(pairs(40, random.Random(4), drift=0.04), limits).outcome == "pass"
    verdict = judge_pairs(pairs(40, random.Random(4), drift=0.08), limits)
    assert verdict.outcome == "fail" and "values beyond 0.05 in 40" in verdict.reason
    assert verdict.figures["max_prob_diff"] == 0.08


def test_a_single_disagreement_in_many_requests_does_not_fail_at_99_percent():
    # 1 of 200 differs: 0.5% is below the 1% a 99% agreement allows
    verdict = judge_pairs(pairs(200, random.Random(5), flip_every=200), ShadowThresholds(min_requests=20))
    assert verdict.outcome == "pass", verdict.reason
    assert verdict.figures["agreement"] == 0.995


def test_a_candidate_failing_requests_stable_answered_fails():
    verdict = judge_pairs(pairs(40, random.Random(6), fail_every=5), ShadowThresholds(min_requests=20))
    assert verdict.outcome == "fail", verdict.reason
    assert "candidate failed 8 requests stable answered" in verdict.reason


def test_a_slower_candidate_fails_on_the_same_requests_and_a_similar_one_never_does():
    slow = judge_pairs(pairs(30, random.Random(7), candidate_ms=5.0), ShadowThresholds(min_requests=20))
    assert slow.outcome == "fail" and "slower than stable on the same requests" in slow.reason
    # mirrored copies timed on another path need a larger difference: 5 ms more fails, 1.8 ms more does not
    mirrored = ShadowThresholds(min_requests=20, latency_floor_ms=2.0)
    assert judge_pairs(pairs(30, random.Random(7), candidate_ms=5.0), mirrored).outcome == "fail"
    assert judge_pairs(pairs(30, random.Random(7), candidate_ms=1.8), mirrored).outcome == "pass"
    assert judge_pairs(pairs(30, random.Random(7), candidate_ms=1.8), ShadowThresholds(20)).outcome == "fail"
    for seed in range(100):  # equal latency with noise: never a failure
        verdict = judge_pairs(pairs(30, random.Random(seed)), ShadowThresholds(min_requests=20))
        assert verdict.outcome == "pass", (seed, verdict.reason)
