"""The registry's errors, shared by every app's services: each carries the HTTP status the API answers
with (registry/api/errors.py)."""

from __future__ import annotations


class RegistryError(Exception):
    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class TransitionError(RegistryError):
    """The thing is not in a state the transition is allowed from (another actor moved it first)."""

    status_code = 409
