"""A task delivered twice does its work once (registry/locks.py): while one worker holds a thing's
claim, another delivery of the same task leaves it alone; once that worker is gone, the work is done."""

from __future__ import annotations

import pytest

from registry import locks
from registry.models import ModelVersion, VersionStatus
from registry.tasks import version_validate
from registry.tests.conftest import held_by_another_worker
from registry.tests.test_sandbox import post_archive

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_second_delivery_of_a_validation_leaves_it_to_the_worker_that_holds_it(
        scientist, unique_name, model_archive):
    assert post_archive(scientist, unique_name, model_archive.read_bytes()).status_code == 201
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    with held_by_another_worker("version.validate", version.pk):
        assert version_validate(version.pk) == "being validated by another worker"
        assert locks.claimed_elsewhere("version.validate", version.pk)
    version.refresh_from_db()
    assert version.status == VersionStatus.VALIDATING  # untouched by the duplicate
    assert version_validate(version.pk) == "ready"  # that worker is gone: the next delivery does the work
    assert version_validate(version.pk) == "nothing to do"
    assert not locks.claimed_elsewhere("version.validate", version.pk)  # released after the work


def test_a_second_delivery_of_a_build_leaves_it_to_the_worker_that_holds_it(unique_name, model_archive):
    from pipelines.builder import engine_build_execute
    from pipelines.models import BuildStatus
    from pipelines.tests.test_builds import _builds, _ready_version

    build = _builds(_ready_version(unique_name, model_archive))[0]
    with held_by_another_worker("build.run", build.pk):
        assert engine_build_execute(build.pk, "duplicate") == "claimed by another worker"
    build.refresh_from_db()
    assert build.status == BuildStatus.QUEUED and build.attempts == 0
