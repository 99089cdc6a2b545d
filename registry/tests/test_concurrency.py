"""Fifty concurrent registrations of one model get gap-free unique version numbers, none lost."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection

from registry.mlflow_store import registry_store
from registry.models import AuditEvent, ModelVersion, RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)

CONCURRENT = 50
UPLOADS = 6  # of the fifty, these upload an archive; the rest register from models:/<name>/1


def mlflow_versions(name: str) -> list[int]:
    return sorted(int(mv.version) for mv in registry_store().search_model_versions(f"name = '{name}'"))


def test_fifty_concurrent_registrations_of_one_model_get_versions_2_to_51_with_no_gaps_and_none_lost(
        platform_server: str, make_user: Any, token_for: Any, unique_name: str, model_archive: Path):
    headers = {"Authorization": f"Bearer {token_for(make_user(Role.DATA_SCIENTIST))}"}
    url = f"{platform_server}/api/v1/models/{unique_name}/versions/"
    archive = model_archive.read_bytes()
    first = requests.post(url, files={"archive": ("model.tar.gz", archive)}, headers=headers, timeout=60)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1

    start = threading.Barrier(CONCURRENT)

    def register(i: int) -> requests.Response:
        with requests.Session() as session:
            session.headers.update(headers)
            start.wait(timeout=60)
            if i < UPLOADS:
                return session.post(url, files={"archive": ("model.tar.gz", archive)},
                                    data={"description": f"upload {i}"}, timeout=240)
            return session.post(url, json={"source": f"models:/{unique_name}/1", "description": f"copy {i}"},
                                timeout=240)

    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        responses = list(pool.map(register, range(CONCURRENT)))

    failures = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 201]
    assert not failures
    numbers = sorted(r.json()["version"] for r in responses)
    assert numbers == list(range(2, CONCURRENT + 2))  # unique and gap-free
    # Each request got the version it describes, and both stores agree on the whole set.
    by_description = {r.json()["description"]: r.json()["version"] for r in responses}
    assert len(by_description) == CONCURRENT
    rows = dict(ModelVersion.objects.filter(model__name=unique_name).values_list("version", "description"))
    assert sorted(rows) == list(range(1, CONCURRENT + 2))
    assert all(rows[number] == description for description, number in by_description.items())
    assert mlflow_versions(unique_name) == list(range(1, CONCURRENT + 2))
    for number, description in rows.items():
        if number > 1:
            assert registry_store().get_model_version(unique_name, str(number)).description == description
    model = RegisteredModel.objects.get(name=unique_name)
    assert (model.version_count, model.latest_version) == (CONCURRENT + 1, CONCURRENT + 1)
    assert AuditEvent.objects.filter(action="version.register", target_id__startswith=f"{unique_name}/").count() == (
        CONCURRENT + 1
    )


def test_fifty_threads_registering_a_new_model_through_the_services_all_succeed(
        make_user: Any, unique_name: str, model_archive: Path):
    """The same race one layer down, on a model neither store has yet: the first registrations also
    race to create the model itself."""
    from registry import services
    from registry.audit import Actor

    seed = unique_name + "-seed"
    actor = Actor(make_user(Role.DATA_SCIENTIST), "api")
    services.version_register_from_archive(actor, seed, model_archive)
    start = threading.Barrier(CONCURRENT)
    errors: list[BaseException] = []

    def register(_: int) -> int:
        try:
            start.wait(timeout=60)
            return services.version_register_from_uri(actor, unique_name, f"models:/{seed}/1").version
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        futures = [pool.submit(register, i) for i in range(CONCURRENT)]
        numbers = sorted(f.result() for f in futures if f.exception() is None)
    assert not errors, errors[:3]
    assert numbers == list(range(1, CONCURRENT + 1))
    assert sorted(ModelVersion.objects.filter(model__name=unique_name).values_list("version", flat=True)) == numbers
    assert mlflow_versions(unique_name) == numbers
    assert RegisteredModel.objects.filter(name=unique_name).count() == 1
