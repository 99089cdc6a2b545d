"""Every API error is JSON: {"error": {"status", "code", "message", "details"}} with a message a
person can act on."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_handler

from registry.api import idempotency
from registry.archives import ArchiveError, PolicyError
from registry.dbhealth import database_lost
from registry.errors import RegistryError
from registry.services import DATABASE_UNAVAILABLE
from registry.tokens import TokenError

log = logging.getLogger(__name__)


def error_body(status_code: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"status": status_code, "code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    return body


def error_response(status_code: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status_code, code, message, details), status=status_code, headers=headers)


# A database that went away (registry.services.DATABASE_UNAVAILABLE): nothing was committed, or the
# caller cannot know; a retry is the answer, with the same Idempotency-Key for a POST.
RETRY_AFTER_S = 2


def unavailable_body() -> dict[str, Any]:
    database_lost()  # the process's other connections are suspect too (registry/dbhealth.py)
    return error_body(503, "unavailable", "the database is unavailable for a moment; the request was not "
                                          f"completed: retry in {RETRY_AFTER_S} s (a POST with the same "
                                          "Idempotency-Key, so that it cannot be done twice)")


def unavailable_response() -> JsonResponse:
    response = JsonResponse(unavailable_body(), status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _first_message(detail: Any) -> str:
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    if isinstance(detail, dict) and detail:
        key, value = next(iter(detail.items()))
        inner = _first_message(value)
        return inner if key == "non_field_errors" else f"{key}: {inner}"
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, idempotency.Replay):
        return exc.response()
    if isinstance(exc, idempotency.IdempotencyError):
        return error_response(exc.status_code, exc.code, str(exc))
    if isinstance(exc, DATABASE_UNAVAILABLE):
        log.warning("database unavailable: %s", exc)
        return Response(unavailable_body(), status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, PolicyError):
        return error_response(status.HTTP_422_UNPROCESSABLE_ENTITY, "refused_by_policy", str(exc))
    if isinstance(exc, (ArchiveError, TokenError)):
        return error_response(status.HTTP_400_BAD_REQUEST, "invalid_input", str(exc))
    if isinstance(exc, RegistryError):
        code = {403: "permission_denied", 404: "not_found", 409: "conflict", 413: "too_large"}.get(
            exc.status_code, "invalid_input")
        return error_response(exc.status_code, code, str(exc))
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "not found")
    if isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    response = drf_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        return error_response(400, "invalid_input", _first_message(exc.detail), details=exc.detail)
    if isinstance(exc, exceptions.APIException):
        headers = {k: v for k, v in response.headers.items() if k in ("WWW-Authenticate", "Retry-After")}
        return error_response(response.status_code, exc.default_code, _first_message(exc.detail), headers=headers)
    return response
