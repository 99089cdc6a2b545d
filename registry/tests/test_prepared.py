"""registry/prepared.py: a read compiled once gives what its queryset gives, for every pattern of filters."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet

from registry.models import RegisteredModel
from registry.prepared import Prepared

pytestmark = pytest.mark.django_db


def _models(name: str | None, min_versions: int | None) -> QuerySet[RegisteredModel, dict[str, Any]]:
    qs = RegisteredModel.objects.all()
    if name is not None:
        qs = qs.filter(name__gte=name)
    if min_versions is not None:
        qs = qs.filter(version_count__gte=min_versions)
    return qs.order_by("name").values("name", "version_count", "tags")


def test_each_pattern_of_filters_gives_what_the_queryset_gives() -> None:
    for i in range(5):
        RegisteredModel.objects.create(name=f"{'ab'[i % 2]}{i}", version_count=i, tags={"i": i})
    read = Prepared(_models)
    for name in (None, "a", "b0", "b", "zz"):
        for min_versions in (None, 0, 2, 4):
            expected = list(_models(name, min_versions))
            # Twice: the first call compiles this pattern, the second reuses its SQL.
            assert read.rows(name, min_versions) == read.rows(name, min_versions) == expected
            assert read.rows(name, min_versions, limit=2, offset=1) == expected[1:3]
            assert read.first(name, min_versions) == (expected[0] if expected else None)
    assert read.rows(None, None)[0]["tags"] == {"i": 0}  # JSON decoded as the ORM decodes it


def test_a_build_whose_parameters_are_not_the_values_is_refused() -> None:
    constant = Prepared(lambda name: RegisteredModel.objects.filter(name=name, description="x").values("name"))
    changed = Prepared(lambda name: RegisteredModel.objects.filter(name__startswith=name).values("name"))  # 'a%'
    for read in (constant, changed):
        with pytest.raises(ImproperlyConfigured, match="parameters"):
            read.rows("a")
    sliced = Prepared(lambda name: RegisteredModel.objects.filter(name=name).values("name")[:5])
    with pytest.raises(ImproperlyConfigured, match="slicing"):
        sliced.rows("a")
    instances = Prepared(lambda name: RegisteredModel.objects.filter(name=name))  # type: ignore[arg-type, return-value]
    with pytest.raises(ImproperlyConfigured, match="values"):
        instances.rows("a")


def _prepared_statements() -> list[tuple[str, int, int]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select statement, generic_plans, custom_plans from pg_prepared_statements")
        return list(cursor.fetchall())


def test_reads_are_planned_once_per_connection() -> None:
    RegisteredModel.objects.create(name="planned", latest_version=3)
    # Columns no other read selects, so that its statement is told apart on this test connection.
    read = Prepared(lambda name: RegisteredModel.objects.filter(name=name).values("latest_version", "name"))
    for _ in range(8):
        assert read.first("planned") == {"latest_version": 3, "name": "planned"}
    # Prepared on the server; after PostgreSQL's five trial plans it keeps one generic plan, because
    # first()'s LIMIT 1 is written out rather than bound.
    [(statement, generic, custom)] = [row for row in _prepared_statements()
                                      if row[0].startswith('SELECT "registry_registeredmodel"."latest_version"')]
    assert '"registry_registeredmodel"."name" = $1' in statement and statement.endswith(" LIMIT 1")
    assert (generic, custom) == (3, 5)


def test_without_prepared_statements_reads_give_the_same_rows() -> None:
    from django.db import connection

    RegisteredModel.objects.create(name="unprepared", latest_version=1)
    read = Prepared(lambda name: RegisteredModel.objects.filter(name=name).values("name", "latest_version"))
    connection.ensure_connection()
    kept = connection.connection.prepare_threshold
    connection.connection.prepare_threshold = None  # what DATABASE_PREPARED_STATEMENTS=false sets
    try:
        assert read.rows("unprepared") == read.rows("unprepared") == [{"name": "unprepared", "latest_version": 1}]
        assert not [row for row in _prepared_statements()
                    if row[0].startswith('SELECT "registry_registeredmodel"."name"') and "latest_version" in row[0]]
    finally:
        connection.connection.prepare_threshold = kept
