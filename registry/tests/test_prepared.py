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
