"""Reads whose SQL is compiled once per process, and planned once per database connection.

Django rebuilds and recompiles a queryset's SQL each time it is evaluated. For the registry's hot
reads (a version with its model and author, a page of a version list) that compiling cost about 2 ms of
CPU per request, several times what PostgreSQL took to answer the indexed query. A `Prepared` read
is still written as an ordinary values() queryset; its SQL, column names and value converters are
kept after the first call, and later calls only bind their own values.

PostgreSQL, in turn, parses and plans every statement it is sent: for the version-detail join that
took about 0.2 ms, four times its execution. So a `Prepared` read is sent as a server-side prepared
statement (psycopg's `prepare=True`): each connection plans it once and then only executes it. Behind
PgBouncer in transaction mode this needs PgBouncer 1.21 or newer with `max_prepared_statements` set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.postgresql.base import ServerBindingCursor  # type: ignore[attr-defined]  # not in the stubs
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
        if limit is None:
            return self._run(values, "", [])
        return self._run(values, " LIMIT %s OFFSET %s", [limit, offset])

    def first(self, *values: Any) -> dict[str, Any] | None:
        # LIMIT 1 written out, not bound: with a bound limit PostgreSQL's generic plan looks dearer than a
        # fresh one, so it would plan the statement again on every call.
        found = self._run(values, " LIMIT 1", [])
        return found[0] if found else None

    def _run(self, values: tuple[Any, ...], tail: str, tail_params: list[Any]) -> list[dict[str, Any]]:
        pattern = tuple(value is not None for value in values)
        compiled = self._compiled.get(pattern)
        if compiled is None:
            # Two threads may both compile a new pattern; either result is the same.
            compiled = self._compiled[pattern] = self._compile(values)
        params = [value for value in values if value is not None] + tail_params
        with _preparing_cursor(compiled.alias) as cursor:
            cursor.execute(compiled.sql + tail, params)
            fetched = cursor.fetchall()
        if compiled.converters:
            fetched = compiled.compiler.apply_converters(fetched, compiled.converters)
        names = compiled.names
        return [dict(zip(names, row, strict=True)) for row in fetched]

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


class _PreparingCursor(ServerBindingCursor):
    """Binds values on the server and has every statement prepared (once per connection and SQL)."""

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,  # noqa: ARG002 - always
                binary: bool | None = None) -> Any:
        return super().execute(query, params, prepare=True, binary=binary)


def _preparing_cursor(alias: str) -> Any:
    """A `_PreparingCursor` on the database's own connection, wrapped as Django wraps its cursors: the
    statement runs inside Django's error translation and is logged where Django logs queries."""
    connection = connections[alias]
    connection.ensure_connection()
    connection.validate_thread_sharing()
    cursor = _PreparingCursor(connection.connection)
    return connection.make_debug_cursor(cursor) if connection.queries_logged else connection.make_cursor(cursor)


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: list[str]
    compiler: Any
    converters: dict[int, Any]
    alias: str
