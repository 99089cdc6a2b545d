"""Fixtures of monitoring's tests: a webhook receiver server and a recording broker (webhooks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from monitoring.tests.webhooks import ReceiverServer, Sent, fast_webhooks, recording_broker, serving


@pytest.fixture
def receiver_server() -> Iterator[ReceiverServer]:
    with serving() as server:
        yield server


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    return recording_broker(monkeypatch)


@pytest.fixture
def fast(settings: Any) -> dict[str, Any]:
    return fast_webhooks(settings)
