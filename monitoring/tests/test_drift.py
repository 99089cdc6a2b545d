"""monitoring/drift.py: Evidently's own verdicts, read back column by column, in words."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.datasets import load_wine

from monitoring import drift


def _wine() -> pd.DataFrame:
    data = load_wine(as_frame=True)
    return data.frame.rename(columns={"target": "label"})


def test_a_shifted_input_is_found_with_evidentlys_method_and_threshold_and_the_verdict_in_words():
    frame = _wine().sample(frac=1.0, random_state=0)
    reference, current = frame.iloc[:89].copy(), frame.iloc[89:].copy()
    current["alcohol"] = current["alcohol"] * 1.1  # 10% brighter, say: a calibration change upstream
    result, snapshot = drift.judge(reference, current, outputs=("label",))
    alcohol = next(c for c in result.columns if c.column == "alcohol")
    assert alcohol.drifted and alcohol.method == "K-S p_value" and alcohol.threshold == 0.05
    assert alcohol.score < 0.05
    assert result.columns[0].drifted  # drifted columns first
    assert "alcohol (K-S p_value" in result.summary()
    assert not result.prediction_drift
    page = drift.html(snapshot)
    assert page.lstrip().lower().startswith("<html") or "<html" in page[:2000].lower()
    assert 'src="http' not in page  # no script from a CDN: the report works air-gapped


def test_the_verdicts_are_evidentlys_own():
    from evidently import Report
    from evidently.presets import DataDriftPreset

    rng = np.random.default_rng(7)
    reference = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd"))
    current = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("abcd"))
    current[["a", "b", "c"]] += 1.0
    result, _ = drift.judge(reference, current)
    direct = Report([DataDriftPreset()], include_tests=True).run(current, reference).dict()
    failed = {t["metric_config"]["params"].get("column") for t in direct["tests"] if t["status"] == "FAIL"}
    assert {c.column for c in result.drifted} == failed - {None} == {"a", "b", "c"}
    assert result.dataset_drift and result.drifted_share == 0.75
    assert result.summary().startswith("drift: 3 of 4 columns drifted (75%")


def test_no_shift_no_drift_and_outputs_drift_is_prediction_drift():
    frame = _wine().sample(frac=1.0, random_state=1)
    reference, current = frame.iloc[:89], frame.iloc[89:]
    result, _ = drift.judge(reference, current, outputs=("label",))
    assert not result.dataset_drift
    flipped = current.assign(label=0)  # the model now answers one class only
    result, _ = drift.judge(reference, flipped, outputs=("label",))
    assert result.prediction_drift and "the model's outputs drifted too" in result.summary()
