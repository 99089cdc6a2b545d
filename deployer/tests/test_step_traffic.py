"""A canary step that passes on latency and errors is judged on its captured traffic before it ends: a
canary answering unlike stable is rolled back with the reason in words; one answering alike moves on, its
traffic figures kept in the analysis."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone
from sklearn.datasets import load_breast_cancer

from deployer import services
from deployer.models import Deployment, Endpoint, RolloutStatus
from deployer.testing import servable_model
from monitoring import canary
from monitoring.testing import capture_rows
from pipelines.models import EngineBuild

pytestmark = pytest.mark.django_db(transaction=True)


def _last_step_held(model) -> Deployment:
    v1, v2 = model.versions.get(version=1), model.versions.get(version=2)
    Endpoint.objects.create(model=model, stable_version=v1, stable_triton_model=f"{model.name}_v1")
    long_ago = timezone.now() - timedelta(minutes=5)
    d = Deployment.objects.create(model=model, version=v2, previous_version=v1, triton_model=f"{model.name}_v2",
                                  engine=EngineBuild.objects.get(content_key=f"{model.name}-2"), steps=[50],
                                  status=RolloutStatus.PROGRESSING, step_index=0, weight=50, step_interval_s=1,
                                  bake_s=0, step_started_at=long_ago)
    Deployment.objects.filter(pk=d.pk).update(created_at=long_ago)
    return Deployment.objects.get(pk=d.pk)


@pytest.fixture
def passing_live(monkeypatch):
    live = canary.Verdict("pass", "no regression against stable", {"canary_requests": 400, "canary_error_rate": 0.0,
                                                                   "canary_p99_ms": 2.0})
    monkeypatch.setattr(services, "analyse", lambda d, now: live)


def test_a_canary_answering_unlike_stable_is_rolled_back_at_its_step(unique_name, passing_live):
    X, y = load_breast_cancer(return_X_y=True)
    d = _last_step_held(servable_model(unique_name))
    capture_rows(d.version, X[:200], [1] * 200)  # the canary says "benign" to everyone
    capture_rows(d.previous_version, X[200:400], y[200:400].tolist())
    services.rollout_advance(d)
    d.refresh_from_db()
    assert d.status == RolloutStatus.ROLLED_BACK
    assert d.reason.startswith("automatic rollback at step 1: the canary answers unlike stable: total variation "
                               "distance ")
    assert "between the canary's 200 and stable's 200 answers on the same traffic" in d.reason
    assert d.analysis["traffic"]["disagreement"]["canary_answers"] == 200
    assert Endpoint.objects.get(model=d.model).stable_version.version == 1


def test_a_canary_answering_alike_is_promoted_with_its_traffic_figures(unique_name, passing_live):
    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(1).permutation(len(X))
    X, y = X[order], y[order]
    d = _last_step_held(servable_model(unique_name))
    capture_rows(d.version, X[:200], y[:200].tolist())
    capture_rows(d.previous_version, X[200:400], y[200:400].tolist())
    services.rollout_advance(d)
    d.refresh_from_db()
    assert d.status == RolloutStatus.PROMOTED, d.reason
    assert d.reason.startswith("all steps passed: no regression against stable; answers agree with stable's: ")
    assert "inputs not judged: v2 has no reference set" in d.reason
    assert Endpoint.objects.get(model=d.model).stable_version.version == 2
