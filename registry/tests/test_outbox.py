"""Follow-up work is recorded with the change that needs it (registry/outbox.py): a broker outage
never turns a committed change into an error, and nothing committed is left without its follow-up."""

from __future__ import annotations

from typing import Any

import pytest
from kombu.exceptions import OperationalError

from config.celery import app
from registry.models import ModelVersion, OutboxMessage, VersionStatus
from registry.outbox import outbox_send

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any], str | None]]:
    """What reaches the broker, recorded instead of sent (the worker is not what these tests are about)."""
    record: list[tuple[str, list[Any], str | None]] = []

    def send_task(name: str, args: Any = (), queue: str | None = None, **options: Any) -> None:
        record.append((name, list(args), queue))

    monkeypatch.setattr(app, "send_task", send_task)
    return record


@pytest.fixture
def broker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(app, "send_task", refuse)


def test_a_registration_sends_its_validation_after_commit_and_leaves_nothing_pending(
        scientist, unique_name, model_archive, sent):
    from registry.tests.test_sandbox import post_archive

    resp = post_archive(scientist, unique_name, model_archive.read_bytes())
    assert resp.status_code == 201, resp.content
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert sent == [("registry.tasks.version_validate", [version.pk], None)]
    assert not OutboxMessage.objects.exists()


def test_with_the_broker_down_a_registration_still_answers_201_and_its_validation_waits_in_the_outbox(
        scientist, unique_name, model_archive, broker_down, monkeypatch):
    from registry.tests.test_sandbox import post_archive

    resp = post_archive(scientist, unique_name, model_archive.read_bytes())
    assert resp.status_code == 201, resp.content  # committed: the answer says so
    version = ModelVersion.objects.get(model__name=unique_name, version=1)
    assert version.status == VersionStatus.VALIDATING
    pending = OutboxMessage.objects.get()
    assert (pending.task, pending.args, pending.attempts) == ("registry.tasks.version_validate", [version.pk], 1)
    assert "Connection refused" in pending.last_error

    assert outbox_send() == 0  # still down: kept
    record: list[Any] = []
    monkeypatch.setattr(app, "send_task", lambda name, args=(), queue=None, **kw: record.append((name, args)))
    assert outbox_send() == 1  # the broker is back: the dispatcher sends it, once
    assert record == [("registry.tasks.version_validate", [version.pk])]
    assert not OutboxMessage.objects.exists()
    assert outbox_send() == 0


def test_a_change_that_rolls_back_leaves_no_follow_up_behind(sent):
    from django.db import transaction

    from registry.outbox import outbox_enqueue

    with pytest.raises(RuntimeError), transaction.atomic():
        outbox_enqueue("registry.tasks.version_validate", [123])
        raise RuntimeError("the change failed")
    assert not OutboxMessage.objects.exists()
    assert sent == []


def test_engine_builds_of_a_ready_version_go_through_the_outbox_to_their_targets_queue(
        unique_name, model_archive, sent):
    from pipelines.tests.test_builds import _ready_version

    version = _ready_version(unique_name, model_archive)
    builds = sorted(version.engine_builds.values_list("pk", flat=True))
    assert sorted(args[0] for name, args, queue in sent if name == "pipelines.tasks.engine_build_run") == builds
    assert {queue for name, args, queue in sent if name == "pipelines.tasks.engine_build_run"} == {"pipelines"}
    assert not OutboxMessage.objects.exists()
