"""Reads whose SQL Django compiles once per process instead of on every request.

Django rebuilds and recompiles a queryset's SQL each time it is evaluated. For the registry's hot
reads (a version with its model and author, a page of a version list) that compiling cost about 2 ms of
CPU per request, several times what PostgreSQL took to answer the indexed query. A `Prepared` read
is still written as an ordinary values() queryset; its SQL, column names and value converters are
kept after the first call, and later calls only bind their own values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.models import QuerySet


class Prepared:
    """`build(*values)` returns a values() queryset filtered on exactly those values; a value given as
    None means "no such filter" and must add no parameter. The SQL is compiled once for each pattern of
    given values. Checked when a pattern is first compiled: the SQL's parameters are exactly the given
    values, in order, so that later calls may bind theirs in the same places."""

    def __init__(self, build: Callable[..., QuerySet[Any, dict[str, Any]]]) -> None:
        self.build = build
        self._compiled: dict[tuple[bool, ...], _Compiled] = {}

    def rows(self, *values: Any, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The rows for these values as dicts of the queryset's fields; `limit` and `offset` page them."""
        pattern = tuple(value is not None for value in values)
        compiled = self._compiled.get(pattern)
        if compiled is None:
            # Two threads may both compile a new pattern; either result is the same.
            compiled = self._compiled[pattern] = self._compile(values)
        sql = compiled.sql
        params = [value for value in values if value is not None]
        if limit is not None:
            sql += " LIMIT %s OFFSET %s"
            params += [limit, offset]
        with connections[compiled.alias].cursor() as cursor:
            cursor.execute(sql, params)
            fetched = cursor.fetchall()
        if compiled.converters:
            fetched = compiled.compiler.apply_converters(fetched, compiled.converters)
        names = compiled.names
        return [dict(zip(names, row, strict=True)) for row in fetched]

    def first(self, *values: Any) -> dict[str, Any] | None:
        found = self.rows(*values, limit=1)
        return found[0] if found else None

    def _compile(self, values: tuple[Any, ...]) -> _Compiled:
        queryset = self.build(*values)
        query = queryset.query
        if query.low_mark or query.high_mark is not None:
            raise ImproperlyConfigured("a Prepared read is paged with limit/offset, not by slicing its queryset")
        names = list(query.selected) if query.selected else [*query.extra_select, *query.values_select,
                                                              *query.annotation_select]
        if not names:
            raise ImproperlyConfigured("a Prepared read must be a values() queryset naming its fields")
        compiler = query.get_compiler(queryset.db)
        sql, params = compiler.as_sql()
        given = [value for value in values if value is not None]
        if list(params) != given:
            raise ImproperlyConfigured(f"the SQL's parameters {list(params)!r} are not the given values {given!r}: "
                                       "build() must filter on each given value once, in order, and on nothing else")
        # The compiler is kept only to apply its columns' converters (JSON decoding and the like).
        converters = compiler.get_converters([column[0] for column in compiler.select[:compiler.col_count]])
        return _Compiled(sql, names, compiler, converters, queryset.db)


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: list[str]
    compiler: Any
    converters: dict[int, Any]
    alias: str
