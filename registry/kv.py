"""The shared Redis connection (the broker's server): gateway samples, routing table, analysis snapshots.
On the ground floor so every app reaches it without importing the one above it."""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings


@functools.cache
def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
