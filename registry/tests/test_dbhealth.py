"""registry/dbhealth.py: once a request has found the database gone, every thread's connection is
renewed at its next request instead of failing it."""

from __future__ import annotations

import threading

import pytest
from django.core.signals import request_started
from django.db import connection

from registry import dbhealth

pytestmark = pytest.mark.django_db(transaction=True)


def _open_connection() -> object:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return connection.connection


def test_connections_are_kept_until_the_database_is_found_gone_then_renewed_in_every_thread():
    first = _open_connection()
    request_started.send(sender=None)
    assert connection.connection is first  # nothing lost: the connection is reused

    others: dict[str, object] = {}
    ready, lost, done = threading.Event(), threading.Event(), threading.Event()

    def another_thread() -> None:
        others["before"] = _open_connection()
        ready.set()
        lost.wait(10)
        request_started.send(sender=None)
        others["after_request_start"] = connection.connection
        others["renewed"] = _open_connection()
        connection.close()
        done.set()

    thread = threading.Thread(target=another_thread)
    thread.start()
    assert ready.wait(10)
    dbhealth.database_lost()  # a request of this process answered 503
    lost.set()
    assert done.wait(10)
    thread.join()
    assert others["after_request_start"] is None and others["renewed"] is not others["before"]
    request_started.send(sender=None)
    assert connection.connection is None and _open_connection() is not first
    request_started.send(sender=None)
    assert connection.connection is not None  # renewed once, then kept again
