"""A window of production traffic pinned as a version's reference set: drift is judged against it from the
next check; too few rows or a bad window are refused saying why, and nothing changes then."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone
from sklearn.datasets import load_breast_cancer

from monitoring import services
from monitoring.models import DriftOutcome, MonitorPolicy
from monitoring.testing import capture_rows, write_reference
from registry.models import AuditEvent, ModelVersion, RegisteredModel

pytestmark = pytest.mark.django_db(transaction=True)


def test_pinning_a_shifted_window_makes_it_the_reference_and_the_next_check_clear(client_as, unique_name):
    X, y = load_breast_cancer(return_X_y=True)
    model = RegisteredModel.objects.create(name=unique_name)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    MonitorPolicy.objects.create(model=model, min_rows=50)
    write_reference(version, X[:250], y[:250].tolist())
    shifted = X[250:].copy()
    shifted[:, :20] *= 1.5  # the new normal upstream: a unit change everyone agreed to
    capture_rows(version, shifted, y[250:].tolist(), at=timezone.now() - timedelta(minutes=5))
    first = services.drift_check(version)
    assert first.outcome == DriftOutcome.DRIFT
    before = version.reference_uri

    oncall = client_as("oncall")
    url = f"/api/v1/models/{unique_name}/versions/1/reference/"
    assert client_as("data_scientist").post(url, {"drift_check": first.pk}, format="json").status_code == 403
    assert oncall.post(url, {}, format="json").status_code == 400
    resp = oncall.post(url, {"drift_check": first.pk}, format="json")
    assert resp.status_code == 201, resp.content
    assert (resp.json()["rows"], resp.json()["columns"]) == (319, 30)
    version.refresh_from_db()
    assert version.reference_uri == resp.json()["reference_uri"] != before
    event = AuditEvent.objects.get(action="version.reference_pinned", target_id=f"{unique_name}/1")
    assert event.before == {"reference_uri": before} and event.after["rows"] == 319

    frame = services.reference_frame(version)
    assert list(frame.columns[:2]) == ["input_0", "input_1"] and len(frame) == 319
    assert np.allclose(sorted(frame["input_0"]), sorted(shifted[:, 0]))
    again = shifted[::-1].copy()  # the same new normal, seen again
    capture_rows(version, again, y[250:][::-1].tolist())
    assert services.drift_check(version).outcome == DriftOutcome.NO_DRIFT


def test_a_window_with_too_few_rows_is_refused_and_the_reference_stays(client_as, unique_name):
    X, y = load_breast_cancer(return_X_y=True)
    model = RegisteredModel.objects.create(name=unique_name)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    write_reference(version, X[:250], y[:250].tolist())
    capture_rows(version, X[250:260], y[250:260].tolist())
    url = f"/api/v1/models/{unique_name}/versions/1/reference/"
    now = timezone.now()
    resp = client_as("release_manager").post(url, {"window_from": (now - timedelta(hours=1)).isoformat(),
                                                   "window_to": (now + timedelta(minutes=1)).isoformat()},
                                             format="json")
    assert resp.status_code == 400
    assert "10 rows of" in resp.json()["error"]["message"] and "a reference needs at least 50" in \
        resp.json()["error"]["message"]
    backwards = client_as("release_manager").post(url, {"window_from": now.isoformat(),
                                                        "window_to": (now - timedelta(hours=1)).isoformat()},
                                                  format="json")
    assert backwards.status_code == 400 and "window_to must not be before window_from" in backwards.content.decode()
    before = version.reference_uri
    version.refresh_from_db()
    assert version.reference_uri == before
    assert not AuditEvent.objects.filter(action="version.reference_pinned").filter(target_id=f"{unique_name}/1")
