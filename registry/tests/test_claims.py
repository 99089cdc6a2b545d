"""A task delivered twice does its work once (registry/locks.py): while one worker holds a thing's
claim, another delivery of the same task leaves it alone; once that worker is gone, the work is done.
And a database that goes away mid-task is waited out, never recorded as the model's or build's fault."""

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


def test_a_database_outage_during_validation_is_retried_not_recorded_as_the_models_failure(
        scientist, unique_name, model_archive, monkeypatch):
    from django.db import OperationalError

    from registry import tasks

    assert post_archive(scientist, unique_name, model_archive.read_bytes()).status_code == 201
    version = ModelVersion.objects.get(model__name=unique_name, version=1)

    real, outages = tasks._validate, []

    def database_gone_once(task: object, version_id: int) -> str:
        if not outages:
            outages.append(version_id)
            raise OperationalError("server closed the connection unexpectedly")
        version = ModelVersion.objects.get(pk=version_id)
        assert version.status == VersionStatus.VALIDATING  # nothing recorded but the worker that has it:
        assert version.status_detail.startswith("being validated on ")
        return str(real(task, version_id))

    monkeypatch.setattr(tasks, "_validate", database_gone_once)
    # Run as a worker runs it (eagerly here: Celery's retry runs again at once instead of in 2 s).
    assert version_validate.apply(args=(version.pk,)).get() == "ready"
    assert outages == [version.pk]


def test_a_database_outage_during_a_build_is_retried_not_recorded_as_the_builds_failure(
        unique_name, model_archive, monkeypatch):
    from django.db import OperationalError

    from pipelines import builder
    from pipelines.models import BuildStatus
    from pipelines.tasks import engine_build_run
    from pipelines.tests.test_builds import _builds, _ready_version

    build = _builds(_ready_version(unique_name, model_archive))[0]

    def database_gone(build: object) -> str:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(builder, "_run", database_gone)
    with pytest.raises(OperationalError):  # called directly; in a worker, Celery's retry in 2 s
        engine_build_run(build.pk)
    build.refresh_from_db()
    assert build.status == BuildStatus.RUNNING and build.error == ""  # taken up again by the retry or reconciler
