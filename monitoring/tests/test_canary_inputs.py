"""Drift and prediction disagreement as inputs of a canary step (monitoring/services.py canary_inputs), on
captured rows in a real PostgreSQL and reference sets in MLflow: the canary fails only when its answers
differ from stable's on the same traffic, or its inputs drift from the data it was validated on, with
confidence and an effect that matters; too little traffic judges nothing and says so."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone
from sklearn.datasets import load_breast_cancer

from monitoring import services, stats
from monitoring.models import MonitorPolicy
from monitoring.testing import capture_rows, write_reference
from registry.models import ModelVersion, RegisteredModel

pytestmark = pytest.mark.django_db(transaction=True)


def test_answers_differ_only_with_confidence_and_an_effect_that_matters():
    rng = np.random.default_rng(3)
    same = stats.answers_differ(rng.integers(0, 3, 400).tolist(), rng.integers(0, 3, 400).tolist())
    assert same.test == "chi-square" and same.p_value > 0.01 and same.effect < 0.1
    skewed = stats.answers_differ([0] * 300 + [1] * 100, [0] * 100 + [1] * 300)
    assert skewed.p_value < 1e-6 and skewed.effect == pytest.approx(0.5)
    numbers = stats.answers_differ(rng.normal(0, 1, 300).tolist(), rng.normal(1, 1, 300).tolist())
    assert numbers.test == "Kolmogorov-Smirnov" and numbers.p_value < 1e-6 and numbers.effect > 0.3
    one_label = stats.answers_differ([2] * 50, [2] * 70)
    assert one_label.p_value == 1.0 and one_label.effect == 0.0


def test_twenty_no_shift_canaries_raise_no_disagreement():
    """The step's disagreement test under noise: answers drawn alike never fail it here (it needs p < 0.01 and
    a tenth of the distribution moved)."""
    rng = np.random.default_rng(11)
    shares = [0.5, 0.3, 0.2]
    failed = 0
    for _ in range(20):
        canary = rng.choice(3, size=120, p=shares).tolist()
        stable = rng.choice(3, size=900, p=shares).tolist()
        shift = stats.answers_differ(canary, stable)
        failed += shift.p_value < 0.01 and shift.effect >= services.DISAGREEMENT_EFFECT
    assert failed == 0


@pytest.fixture
def two_versions(unique_name):
    """Stable and canary versions; the canary's reference set is 250 rows of the breast cancer data, the other
    319 rows are the traffic the tests split between the two."""
    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    model = RegisteredModel.objects.create(name=unique_name, latest_version=2, version_count=2)
    stable, canary = (ModelVersion.objects.create(model=model, version=n, origin="upload", source="s", status="ready")
                      for n in (1, 2))
    write_reference(canary, X[:250], y[:250].tolist())
    MonitorPolicy.objects.create(model=model, min_rows=50)
    return stable, canary, X[250:], y[250:]


def test_a_canary_answering_like_stable_on_undrifted_inputs_passes_with_its_figures(two_versions):
    stable, canary, X, y = two_versions
    since = timezone.now() - timedelta(seconds=5)
    capture_rows(canary, X[:150], y[:150].tolist())
    capture_rows(stable, X[150:], y[150:].tolist())
    found = services.canary_inputs(canary, stable, since)
    assert not found.failed, found.reason
    assert found.reason.startswith("answers agree with stable's: total variation distance ")
    assert "between the canary's 150 and stable's 169 answers on the same traffic (chi-square p=" in found.reason
    assert "; inputs: no drift: 0 of 31 columns drifted" in found.reason
    assert found.figures["disagreement"]["canary_answers"] == 150
    assert found.figures["drift"]["dataset_drift"] is False


def test_a_canary_answering_unlike_stable_fails_saying_how(two_versions):
    stable, canary, X, y = two_versions
    since = timezone.now() - timedelta(seconds=5)
    capture_rows(canary, X[:150], [0] * 150)  # a canary that answers class 0 to everything
    capture_rows(stable, X[150:], y[150:].tolist())
    found = services.canary_inputs(canary, stable, since)
    assert found.failed
    assert found.reason.startswith("the canary answers unlike stable: total variation distance ")
    assert "with 99% confidence fails" in found.reason
    assert found.figures["disagreement"]["p_value"] < 0.01


def test_a_canary_whose_inputs_drift_from_its_reference_fails(two_versions):
    stable, canary, X, y = two_versions
    since = timezone.now() - timedelta(seconds=5)
    shifted = X.copy()
    shifted[:, :20] *= 1.5  # twenty of the thirty inputs scaled: a unit change upstream
    capture_rows(canary, shifted[:150], y[:150].tolist())
    capture_rows(stable, shifted[150:], y[150:].tolist())
    found = services.canary_inputs(canary, stable, since)
    assert found.failed
    assert found.reason.startswith("the canary's inputs drifted from the data it was validated on: drift: ")
    assert found.figures["drift"]["dataset_drift"] is True and "input_0" in found.figures["drift"]["drifted_columns"]


def test_too_little_traffic_judges_nothing_and_says_so_and_the_policy_can_turn_it_off(two_versions):
    stable, canary, X, y = two_versions
    since = timezone.now() - timedelta(seconds=5)
    capture_rows(canary, X[:30], [0] * 30)
    capture_rows(stable, X[:30], y[:30].tolist())
    found = services.canary_inputs(canary, stable, since)
    assert not found.failed
    assert found.reason == ("answers not compared yet: 30 canary and 30 stable answers captured since the rollout "
                            f"began, 100 of each needed; inputs not judged: 30 rows of {canary.model.name} v2 "
                            f"captured since {since:%H:%M:%S} UTC; a check needs 50 (the model's monitoring policy)")
    MonitorPolicy.objects.filter(model=canary.model).update(canary_drift_gate=False)
    off = services.canary_inputs(canary, stable, since)
    assert not off.failed and off.figures == {"judged": False} and "off in the model's monitoring policy" in off.reason


def test_stables_answers_from_before_the_canary_took_traffic_are_not_compared(two_versions):
    """Traffic changes over time: stable's answers are taken over the canary's seconds only."""
    stable, canary, X, y = two_versions
    since = timezone.now() - timedelta(minutes=10)
    capture_rows(stable, X[:150], [0] * 150, at=since + timedelta(minutes=1))  # earlier traffic: all class 0
    capture_rows(canary, X[:150], y[:150].tolist())
    capture_rows(stable, X[150:], y[150:].tolist())
    found = services.canary_inputs(canary, stable, since)
    assert not found.failed, found.reason
    assert "between the canary's 150 and stable's 169 answers on the same traffic" in found.reason
