"""Traffic capture and drift checks on real PostgreSQL and Redis: the gateway's samples become rows of a
version exactly once, what cannot be decoded is counted with its reason, and a serving version's window
is judged against its reference set, with the verdict in words and Evidently's report behind it."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
from sklearn.datasets import load_wine

from monitoring import capture, services
from monitoring.models import CaptureCursor, CapturedRow, DriftCheck, DriftOutcome, MonitorPolicy
from monitoring.testing import capture_rows, write_reference
from registry.models import ModelVersion, RegisteredModel

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def redis():
    import redis as redis_lib

    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("REDIS_URL is not set: run under `python -m config.stack exec`")
    client = redis_lib.Redis.from_url(url)
    yield client
    client.close()


@pytest.fixture
def stream(redis):
    name = f"test:samples:{uuid.uuid4().hex[:8]}"
    yield name
    redis.delete(name)


def _version(name: str, number: int = 1) -> ModelVersion:
    model, _ = RegisteredModel.objects.get_or_create(name=name)
    return ModelVersion.objects.create(model=model, version=number, origin="upload", source="s", status="ready")


def _sample(model: str, version: int, rows: list[list[float]], labels: list[int], status: int = 200,
            ts: float = 0.0) -> dict[str, bytes]:
    request = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
                                      "data": rows}]}).encode()
    response = json.dumps({"outputs": [
        {"name": "label", "datatype": "INT64", "shape": [len(labels)], "data": labels},
        {"name": "probabilities", "datatype": "FP32", "shape": [len(labels), 2], "data": [[0.5, 0.5]] * len(labels)},
    ]}).encode()
    import time

    return {"model": model.encode(), "version": str(version).encode(), "status": str(status).encode(),
            "ts": f"{ts or time.time():.6f}".encode(), "request": request, "response": response,
            "request_head": f"POST /v2/models/{model}/infer HTTP/1.1\r\ncontent-type: application/json".encode(),
            "response_head": b"HTTP/1.1 200 OK\r\ncontent-type: application/json"}


def test_samples_become_rows_once_and_what_cannot_be_read_is_counted_with_its_reason(redis, stream, unique_name):
    version = _version(unique_name)
    redis.xadd(stream, _sample(unique_name, 1, [[1.0, 2.0], [3.0, 4.0]], [0, 1]))
    redis.xadd(stream, _sample(unique_name, 1, [[5.0, 6.0]], [1], status=500))  # an error: not captured
    redis.xadd(stream, _sample(unique_name, 7, [[5.0, 6.0]], [1]))  # a version the registry does not have
    broken = _sample(unique_name, 1, [[1.0, 2.0]], [0])
    broken["request"] = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}'
    redis.xadd(stream, broken)

    assert capture.capture_pass(redis, stream) == 2
    rows = list(CapturedRow.objects.filter(version=version).order_by("pk").values_list("inputs", "prediction"))
    assert rows == [({"input_0": 1.0, "input_1": 2.0}, 0), ({"input_0": 3.0, "input_1": 4.0}, 1)]
    assert capture.refused_reasons(redis, unique_name) == {"input: 2 values for a shape of [1, 3]": 1}
    redis.delete(capture.REFUSED_KEY + unique_name)
    # Read once: a second pass finds nothing new, the next sample alone is stored.
    assert capture.capture_pass(redis, stream) == 0
    redis.xadd(stream, _sample(unique_name, 1, [[9.0, 9.0]], [1]))
    assert capture.capture_pass(redis, stream) == 1
    assert CapturedRow.objects.filter(version=version).count() == 3


def test_a_pass_that_fails_stores_nothing_and_moves_no_cursor(redis, stream, unique_name, monkeypatch):
    version = _version(unique_name)
    redis.xadd(stream, _sample(unique_name, 1, [[1.0, 2.0]], [0]))

    store = capture._store

    def broken(rows):
        store(rows)  # the rows are written, then the pass dies before its commit
        assert CapturedRow.objects.filter(version=version).count() == 1
        raise RuntimeError("the database went away mid-pass")

    monkeypatch.setattr(capture, "_store", broken)
    with pytest.raises(RuntimeError):
        capture.capture_pass(redis, stream)
    monkeypatch.undo()
    assert CaptureCursor.objects.get(stream=stream).last_id == "0-0"
    assert CapturedRow.objects.filter(version=version).count() == 0
    assert capture.capture_pass(redis, stream) == 1
    assert CapturedRow.objects.filter(version=version).count() == 1


def test_a_pass_reads_batch_after_batch_and_stores_each_sample_once(redis, stream, unique_name, monkeypatch):
    version = _version(unique_name)
    monkeypatch.setattr(capture, "BATCH", 3)
    for i in range(10):
        redis.xadd(stream, _sample(unique_name, 1, [[float(i), float(-i)]], [i % 2]))
    assert capture.capture_pass(redis, stream) == 10
    rows = CapturedRow.objects.filter(version=version).order_by("pk").values_list("inputs", "prediction")
    assert list(rows) == [({"input_0": float(i), "input_1": float(-i)}, i % 2) for i in range(10)]
    assert capture.capture_pass(redis, stream) == 0


def test_values_postgresql_json_cannot_hold_are_stored_as_null_and_the_batch_goes_through(redis, stream, unique_name):
    """NaN and infinities (binary FP32), NUL characters and lone surrogates (BYTES) are refused by
    PostgreSQL's jsonb: one such sample used to fail its whole batch, at every pass."""
    import struct

    version = _version(unique_name)
    x = np.array([[np.nan, 1.5, np.inf]], dtype="<f4")
    text = b"a\x00b"
    raw_text = struct.pack("<I", len(text)) + text
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "note", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw_text)}},
    ]}).encode()
    sample = _sample(unique_name, 1, [[0.0]], [1])
    sample["request"] = head + x.tobytes() + raw_text
    sample["request_head"] += f"\r\nInference-Header-Content-Length: {len(head)}".encode()
    redis.xadd(stream, sample)
    lone = _sample(unique_name, 1, [[0.0]], [0])  # a JSON body may escape half a surrogate pair
    lone["request"] = b'{"inputs": [{"name": "note", "datatype": "BYTES", "shape": [1], "data": ["x\\ud800/"]}]}'
    redis.xadd(stream, lone)
    redis.xadd(stream, _sample(unique_name, 1, [[2.0, 3.0, 4.0]], [0]))
    assert capture.capture_pass(redis, stream) == 3
    rows = CapturedRow.objects.filter(version=version).order_by("pk").values_list("inputs", "prediction")
    assert list(rows) == [({"x_0": None, "x_1": 1.5, "x_2": None, "note": "a\ufffdb"}, 1),
                          ({"note": "x\ufffd/"}, 0),
                          ({"input_0": 2.0, "input_1": 3.0, "input_2": 4.0}, 0)]


def _wine_version(name: str) -> tuple[ModelVersion, np.ndarray, np.ndarray]:
    """A version whose reference set is half the wine data (shuffled), with a policy judging 50 rows; returns
    it with the shuffled rows and labels."""
    X, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    version = _version(name)
    write_reference(version, X[:89], y[:89].tolist())
    MonitorPolicy.objects.create(model=version.model, min_rows=50)
    return version, X, y


def test_a_shifted_window_is_drift_with_its_columns_and_report_and_a_quiet_one_is_not(unique_name, scientist):
    version, X, y = _wine_version(unique_name)

    capture_rows(version, X[89:], y[89:].tolist())
    quiet = services.drift_check(version)
    assert quiet.outcome == DriftOutcome.NO_DRIFT, quiet.summary
    assert quiet.summary.startswith("no drift: ") and quiet.current_rows == 89 and quiet.reference_rows == 89

    CapturedRow.objects.filter(version=version).delete()
    shifted = X[89:].copy()
    shifted[:, :8] *= 1.5  # eight of the thirteen inputs scaled: a unit change upstream
    capture_rows(version, shifted, y[89:].tolist())
    check = services.drift_check(version)
    assert check.outcome == DriftOutcome.DRIFT and check.dataset_drift
    drifted = [c["column"] for c in check.columns if c["drifted"]]
    assert set(drifted) >= {f"input_{j}" for j in range(8)} - {"input_2"}, check.summary
    assert check.summary.startswith("drift: ") and "input_0" in check.summary

    listed = scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/").json()
    assert [c["outcome"] for c in listed["results"]] == ["drift", "no_drift"]
    assert listed["results"][0]["has_report"]
    page = scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/{check.pk}/report/")
    assert page.status_code == 200 and page["Content-Type"].startswith("text/html")
    assert "sandbox allow-scripts" in page["Content-Security-Policy"]
    assert b"input_0" in page.content


def test_too_few_rows_or_no_reference_give_no_verdict_but_say_why(unique_name):
    version = _version(unique_name)
    check = services.drift_check(version)
    assert check.outcome == DriftOutcome.NO_REFERENCE and "no reference set yet" in check.summary
    X, y = load_wine(return_X_y=True)
    write_reference(version, X[:80], y[:80].tolist())
    capture_rows(version, X[80:90], y[80:90].tolist())
    check = services.drift_check(version)
    assert check.outcome == DriftOutcome.NOT_ENOUGH_DATA
    assert check.summary == (f"10 rows of {unique_name} v1 captured in the last 60 min; a check needs 200 (the "
                             "model's monitoring policy)")
    assert DriftCheck.objects.filter(version=version).count() == 2


def test_predictions_that_moved_by_little_are_not_prediction_drift_however_many_rows(unique_name):
    """Evidently's test on the prediction column finds any difference in thousands of rows; a check calls it
    prediction drift (and alerts) only when a tenth of the answers' distribution moved."""
    version, X, y = _wine_version(unique_name)
    # The reference's own rows, 20 times over, with one answer in 25 moved to class 0.
    nudged = [0 if i % 25 == 0 else label for i, label in enumerate(y[:89].tolist() * 20)]
    capture_rows(version, np.vstack([X[:89]] * 20), nudged)
    check = services.drift_check(version)
    assert check.outcome == DriftOutcome.NO_DRIFT and not check.prediction_drift, check.summary
    assert "from the reference's, under the 0.1 that counts as prediction drift" in check.summary


def test_a_quiet_windows_report_is_drawn_when_first_opened_and_not_once_its_rows_are_gone(unique_name, scientist):
    version, X, y = _wine_version(unique_name)
    capture_rows(version, X[89:], y[89:].tolist())
    first = services.drift_check(version)
    assert first.outcome == DriftOutcome.NO_DRIFT
    CapturedRow.objects.filter(version=version).delete()  # past the retention
    gone = scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/{first.pk}/report/")
    assert gone.status_code == 404
    assert "are no longer kept (captured rows are kept 72 h)" in gone.json()["error"]["message"]

    capture_rows(version, X[89:], y[89:].tolist())
    quiet = services.drift_check(version)
    assert quiet.outcome == DriftOutcome.NO_DRIFT
    listed = scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/").json()["results"]
    assert listed[0]["has_report"] is False  # not drawn for a quiet window
    page = scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/{quiet.pk}/report/")
    assert page.status_code == 200 and b"input_0" in page.content
    assert scientist.get(f"/api/v1/models/{unique_name}/versions/1/drift/").json()["results"][0]["has_report"]
