"""Claims on work that end with the worker: PostgreSQL session advisory locks. A task holds one while
it works on a thing; the server drops it the moment that worker's connection ends, so a worker killed
mid-task frees its claim at once (nothing to expire), and a reconciler can tell work in progress
from work abandoned without guessing from timestamps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection

# One namespace (the first key of the two-key lock) per kind of work.
KINDS = {"version.validate": 7301, "build.run": 7302, "rollouts.reconcile": 7303}


def _try(kind: str, key: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [KINDS[kind], key])
        return bool(cursor.fetchone()[0])


def _release(kind: str, key: int) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [KINDS[kind], key])
    except DatabaseError:  # the connection is gone, and the server released the lock with it
        pass


@contextmanager
def claim(kind: str, key: int = 0) -> Iterator[bool]:
    """Hold the claim on (kind, key) while the block runs; yields False (and holds nothing) when
    another live worker has it."""
    held = _try(kind, key)
    try:
        yield held
    finally:
        if held:
            _release(kind, key)


def claimed_elsewhere(kind: str, key: int = 0) -> bool:
    """Whether a live worker (another connection) holds the claim right now."""
    if _try(kind, key):
        _release(kind, key)
        return False
    return True
