"""A registration enqueues its follow-up only after commit, and a real Celery worker carries it out."""

from __future__ import annotations

import time

import pytest
import requests

from registry.models import ModelVersion, VersionStatus
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)


def _wait_for_status(name: str, number: int, timeout: float = 120) -> ModelVersion:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = ModelVersion.objects.get(model__name=name, version=number)
        if version.status != VersionStatus.VALIDATING:
            return version
        time.sleep(0.5)
    raise AssertionError(f"{name} v{number} still validating after {timeout}s")


def test_an_uploaded_version_is_validated_by_the_worker_and_becomes_ready(
    platform_server, celery_worker_process, make_user, token_for, model_archive, unique_name
):
    token = token_for(make_user(Role.CI))
    with open(model_archive, "rb") as fh:
        resp = requests.post(f"{platform_server}/api/v1/models/{unique_name}/versions/",
                             headers={"Authorization": f"Bearer {token}"}, files={"archive": fh}, timeout=60)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == VersionStatus.VALIDATING

    version = _wait_for_status(unique_name, 1)
    assert version.status == VersionStatus.READY, version.status_detail
    assert version.inspection["ok"] is True
    assert version.inspection["output_shape"] == [5]  # predicted on the saved input example
    detail = requests.get(f"{platform_server}/api/v1/models/{unique_name}/versions/1/",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert detail["status"] == "ready"
