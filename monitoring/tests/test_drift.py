"""monitoring/drift.py: Evidently's own verdicts, read back column by column, in words."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_wine

from monitoring import drift


def _wine() -> pd.DataFrame:
    data = load_wine(as_frame=True)
    return data.frame.rename(columns={"target": "label"})


def _evidently_report(reference: pd.DataFrame, current: pd.DataFrame,
                      **preset: Any) -> tuple[dict[str, tuple], bool, float]:
    """A full `Report([DataDriftPreset()])`, read from its tests: per column (method, threshold, score,
    drifted), and the dataset's verdict and share of drifted columns."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    doc = Report([DataDriftPreset(**preset)], include_tests=True).run(current, reference).dict()
    by_metric = {m["id"]: m for m in doc["metrics"]}
    columns, dataset, share = {}, None, None
    for test in doc["tests"]:
        params = test["metric_config"]["params"]
        value = by_metric[test["metric_config"]["metric_id"]]["value"]
        if params["type"] == "evidently:metric_v2:ValueDrift":
            # The method by the name the report shows ("PSI"; the parameter keeps a method set as given: "psi").
            method = re.search(r"The drift detection method is (.+)\. The drift threshold", test["description"])
            assert method is not None, test["description"]
            columns[params["column"]] = (method[1], float(params["threshold"]), float(value), test["status"] == "FAIL")
        elif params["type"] == "evidently:metric_v2:DriftedColumnsCount":
            dataset, share = test["status"] == "FAIL", float(value["share"])
    assert dataset is not None and share is not None
    return columns, dataset, share


def _mixed(rows: int, seed: int, shift: float) -> pd.DataFrame:
    """Floats, a float column with gaps and infinities, a class label, a small integer count and a category."""
    rng = np.random.default_rng(seed)
    gappy = rng.normal(size=rows) + shift
    gappy[::17], gappy[5::53] = np.nan, np.inf
    return pd.DataFrame({
        "input_0": rng.normal(size=rows) + shift,
        "input_1": rng.normal(size=rows),
        "input_2": rng.exponential(size=rows) * (1 + shift),
        "gappy": gappy,
        "prediction": rng.integers(0, 3 if shift == 0 else 2, size=rows),
        "count": rng.poisson(2 + 3 * shift, size=rows),
        "site": rng.choice(["a", "b", "c"] if shift == 0 else ["a", "b", "b", "c"], size=rows),
    })


@pytest.mark.parametrize(("rows", "preset"), [
    (300, {}),  # K-S, chi-square / Z tests on few rows
    (2500, {}),  # Wasserstein, Jensen-Shannon on more
    (300, {"drift_share": 0.25}),
    (300, {"method": "psi"}),
    (2500, {"threshold": 0.3}),
    (300, {"method": "jensenshannon", "threshold": 0.05, "drift_share": 0.8}),
])
@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_each_columns_method_threshold_score_and_verdict_and_the_datasets_are_a_full_reports(rows, preset, shift):
    reference, current = _mixed(rows, 1, 0.0), _mixed(rows, 2, shift)
    result, _ = drift.judge(reference, current, outputs=("prediction",), **preset)
    columns, dataset, share = _evidently_report(reference, current, columns=list(reference.columns), **preset)
    ours = {c.column: (c.method, c.threshold, c.score, c.drifted) for c in result.columns}
    assert ours.keys() == columns.keys()
    for column, (method, threshold, score, drifted) in columns.items():
        assert ours[column][:2] == (method, threshold), column
        assert ours[column][2] == pytest.approx(score, rel=1e-12, abs=1e-300), column
        assert ours[column][3] == drifted, column
    assert (result.dataset_drift, result.drifted_share) == (dataset, share)
    assert result.drift_share == preset.get("drift_share", drift.DEFAULT_DRIFT_SHARE)


def test_a_shifted_input_is_found_with_evidentlys_method_and_threshold_and_the_verdict_in_words():
    frame = _wine().sample(frac=1.0, random_state=0)
    reference, current = frame.iloc[:89].copy(), frame.iloc[89:].copy()
    current["alcohol"] = current["alcohol"] * 1.1  # 10% brighter, say: a calibration change upstream
    result, judged = drift.judge(reference, current, outputs=("label",))
    alcohol = next(c for c in result.columns if c.column == "alcohol")
    assert alcohol.drifted and alcohol.method == "K-S p_value" and alcohol.threshold == 0.05
    assert alcohol.score < 0.05
    assert result.columns[0].drifted  # drifted columns first
    assert "alcohol (K-S p_value" in result.summary()
    assert not result.prediction_drift
    page = drift.html(judged)
    assert page.lstrip().lower().startswith("<html") or "<html" in page[:2000].lower()
    assert 'src="http' not in page  # no script from a CDN: the report works air-gapped
    assert "alcohol" in page


def test_the_verdicts_are_evidentlys_own():
    rng = np.random.default_rng(7)
    reference = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd"))
    current = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd"))
    current[["a", "b", "c"]] += 1.0
    result, _ = drift.judge(reference, current)
    columns, dataset, _share = _evidently_report(reference, current)  # the preset as anyone calls it
    assert {c.column for c in result.drifted} == {c for c, v in columns.items() if v[3]} == {"a", "b", "c"}
    assert result.dataset_drift and dataset and result.drifted_share == 0.75
    assert result.summary().startswith("drift: 3 of 4 columns drifted (75%")


def test_no_shift_no_drift_and_outputs_drift_is_prediction_drift():
    frame = _wine().sample(frac=1.0, random_state=1)
    reference, current = frame.iloc[:89], frame.iloc[89:]
    result, _ = drift.judge(reference, current, outputs=("label",))
    assert not result.dataset_drift
    flipped = current.assign(label=0)  # the model now answers one class only
    result, _ = drift.judge(reference, flipped, outputs=("label",))
    assert result.prediction_drift and "the model's outputs drifted too" in result.summary()


def test_only_the_columns_both_frames_have_are_judged_and_nothing_empty_is():
    frame = _wine()
    result, _ = drift.judge(frame, frame[["alcohol", "label"]].iloc[:50])
    assert sorted(c.column for c in result.columns) == ["alcohol", "label"]
    with pytest.raises(ValueError, match="no column in common"):
        drift.judge(frame[["alcohol"]], frame[["label"]])
    with pytest.raises(ValueError, match="empty"):
        drift.judge(frame, frame.iloc[:0])
