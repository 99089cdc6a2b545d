"""Claims on work that end with the worker: PostgreSQL session advisory locks. A task holds one while
it works on a thing; the server drops it the moment that worker's connection ends, so a worker killed
mid-task frees its claim at once (nothing to expire), and a reconciler can tell work in progress
from work abandoned without guessing from timestamps. Transaction-scoped ones (until commit) guard a
write that spans two stores: MLflow's and the platform's (see services._model_row)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection

# One namespace (the first key of the two-key lock) per kind of work.
KINDS = {"version.validate": 7301, "build.run": 7302, "rollouts.reconcile": 7303, "model.register": 7304,
         "monitoring.capture": 7305, "monitoring.drift": 7306, "monitoring.deliver": 7307,
         "deployer.champions": 7308, "hil.run": 7309, "deployer.promotions": 7310}


def name_key(name: str) -> int:
    """A lock key for a name (two names may share one: that only makes one wait for the other)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def hold_shared_until_commit(kind: str, key: int) -> None:
    """Take (kind, key) shared, until the current transaction ends: holders of it shared do not wait
    for each other, only for an exclusive holder."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", [KINDS[kind], key])


def try_exclusive_until_commit(kind: str, key: int) -> bool:
    """Take (kind, key) exclusively until the current transaction ends, if no one holds it at all."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [KINDS[kind], key])
        return bool(cursor.fetchone()[0])


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
