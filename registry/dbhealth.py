"""After the database restarts, every persistent connection a web process keeps (CONN_MAX_AGE) is dead,
but Django finds that out one thread at a time, each with a failed request (health checks, which would
ping before every request, are off for speed). So the first request of a process that finds the database
gone marks all the process's connections as suspect, and each thread drops its own at its next request
instead of failing that request too: one 503 per process after a restart, not one per thread."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

_lock = threading.Lock()
_generation = 0  # bumped each time a request finds the database gone
# The generation each connection (one per thread and alias) was last renewed at.
_renewed: weakref.WeakKeyDictionary[BaseDatabaseWrapper, int] = weakref.WeakKeyDictionary()


def database_lost() -> None:
    global _generation
    with _lock:
        _generation += 1


def renew_suspect_connections(**_: Any) -> None:
    """At a request's start (signal request_started): close this thread's connections opened before the
    database was last found gone; the request opens fresh ones."""
    for conn in connections.all(initialized_only=True):
        if _renewed.get(conn, 0) != _generation and not conn.in_atomic_block:
            conn.close()
            _renewed[conn] = _generation
