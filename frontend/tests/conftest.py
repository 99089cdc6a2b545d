from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture
def browser_as(make_user):
    """A test client signed in (by session) as a new user holding `roles`."""

    def make(*roles: str) -> Client:
        client = Client()
        user = make_user(*roles)
        client.force_login(user)
        client.user = user  # type: ignore[attr-defined]
        return client

    return make
