"""registry/lifecycle.py, the one mechanism every lifecycle moves by: allowed transitions only, one
winner of a race, the audit row in the same transaction, follow-up work only after commit."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from registry.audit import SYSTEM
from registry.errors import TransitionError
from registry.lifecycle import Lifecycle
from registry.models import VERSION_TRANSITIONS, AuditEvent, ModelVersion, RegisteredModel, VersionStatus

pytestmark = pytest.mark.django_db(transaction=True)


def _version(name: str) -> ModelVersion:
    model = RegisteredModel.objects.create(name=name)
    return ModelVersion.objects.create(model=model, version=1, origin="upload", source="s")


def _lifecycle(followed: list[str]) -> Lifecycle[ModelVersion]:
    return Lifecycle(ModelVersion, VERSION_TRANSITIONS, action="version", target_type="model_version",
                     target_id=lambda v: f"{v.model.name}/{v.version}", describe=lambda v: f"{v.model.name} v1",
                     related=("model",), stamps={"created_at": {VersionStatus.ARCHIVED}},
                     after_commit=lambda v: [lambda: followed.append(v.status)])


def test_an_allowed_move_writes_the_fields_the_stamp_and_the_audit_row_then_runs_its_follow_ups(unique_name):
    followed: list[str] = []
    v = _version(unique_name)
    moved = _lifecycle(followed).move(v.pk, VersionStatus.READY, SYSTEM, note={"why": "loaded"},
                                      status_detail="loaded")
    assert moved.status == VersionStatus.READY and moved.status_detail == "loaded"
    assert moved.updated_at > v.updated_at
    event = AuditEvent.objects.get(action="version.ready", target_id=f"{unique_name}/1")
    assert event.before == {"status": "validating"} and event.after == {"status": "ready", "why": "loaded"}
    assert followed == ["ready"]
    archived = _lifecycle(followed).move(v.pk, VersionStatus.ARCHIVED)
    assert archived.created_at > v.created_at  # the stamp of that state


def test_a_move_the_table_forbids_changes_nothing_and_says_why(unique_name):
    followed: list[str] = []
    v = _version(unique_name)
    _lifecycle(followed).move(v.pk, VersionStatus.ARCHIVED)
    with pytest.raises(TransitionError, match=f"{unique_name} v1 is archived; it cannot become ready"):
        _lifecycle(followed).move(v.pk, VersionStatus.READY)
    with pytest.raises(TransitionError):  # allowed by the table, but not from the states the caller names
        _lifecycle(followed).move(_version(unique_name + "b").pk, VersionStatus.READY,
                                  only_from={VersionStatus.INVALID})
    assert followed == ["archived"]
    assert not AuditEvent.objects.filter(action="version.ready").exists()


def test_nothing_follows_a_move_whose_transaction_rolls_back(unique_name):
    followed: list[str] = []
    v = _version(unique_name)
    with pytest.raises(RuntimeError), transaction.atomic():
        _lifecycle(followed).move(v.pk, VersionStatus.READY)
        raise RuntimeError("the caller's later write failed")
    assert followed == []
    assert ModelVersion.objects.get(pk=v.pk).status == VersionStatus.VALIDATING
    assert not AuditEvent.objects.filter(action="version.ready").exists()


def test_of_two_racing_moves_from_one_state_exactly_one_wins(unique_name):
    v = _version(unique_name)
    results: list[str] = []
    start = threading.Barrier(2)

    def race(to: str) -> None:
        start.wait()
        try:
            _lifecycle([]).move(v.pk, to)
            results.append(f"won {to}")
        except TransitionError:
            results.append("lost")
        finally:
            connection.close()

    threads = [threading.Thread(target=race, args=(to,)) for to in (VersionStatus.READY, VersionStatus.INVALID)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[0] == "lost" and sorted(results)[1].startswith("won")
    assert AuditEvent.objects.filter(target_id=f"{unique_name}/1").count() == 1
