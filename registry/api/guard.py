"""The API's one gate for bad input and its one net for errors, for every path under /api/.

Input the database cannot store is refused with a 400 that names where it was, before it reaches a
query: a NUL character (PostgreSQL text and jsonb cannot hold one), a lone UTF-16 surrogate (psycopg
cannot encode it), bytes that are not UTF-8 in the query string (Django would quietly turn them into
U+FFFD; in the path it keeps them percent-encoded, which is storable). The URL is checked by `ApiGuard`
(middleware, before routing); request bodies by the parsers of every API view (`checked_parser`, wired
in BaseView), JSON keys included, at any depth.

Every error answered under /api/ is JSON in the shared shape: `ApiGuard` rewrites what Django answers
by itself (an unknown path's 404, the 500 of an unhandled exception, in DEBUG too) after Django has
logged it with its traceback; the client learns nothing of the internals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from django.core.files.uploadedfile import UploadedFile
from django.core.handlers.wsgi import get_bytes_from_wsgi
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.datastructures import MultiValueDict
from rest_framework import exceptions
from rest_framework.parsers import BaseParser, DataAndFiles
from rest_framework.response import Response

from registry.api.errors import error_body

API_PREFIX = "/api/"
_NUL = "contains a NUL character (U+0000), which cannot be stored"
_NOT_UTF8 = "is not valid UTF-8 once percent-decoded (send text as percent-encoded UTF-8)"
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why the database cannot store `text`, or None."""
    if "\x00" in text:
        return _NUL
    if not text.isascii():
        found = _SURROGATE_RE.search(text)
        if found:
            return f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X}), which is not text"
    return None


def _bytes_problem(raw: bytes) -> str | None:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return _NOT_UTF8
    return text_problem(text)


# ---- the URL -----------------------------------------------------------------------------------

def url_problem(path: str, query: bytes) -> tuple[str, dict[str, Any]] | None:
    """(message, details) for a path (text, percent-decoded) or a raw query string that the platform
    cannot take, or None."""
    for segment in path.split("/"):
        problem = text_problem(segment)
        if problem:
            return f"path segment {segment!r} {problem}", {"path": [f"{segment!r} {problem}"]}
    for field in query.split(b"&"):
        raw_name, _, raw_value = field.partition(b"=")
        name = unquote_to_bytes(raw_name.replace(b"+", b" "))
        shown = name.decode(errors="backslashreplace")
        problem = _bytes_problem(name)
        if problem:
            return f"query parameter {shown!r}: its name {problem}", {shown: [f"its name {problem}"]}
        problem = _bytes_problem(unquote_to_bytes(raw_value.replace(b"+", b" ")))
        if problem:
            return f"query parameter {shown!r} {problem}", {shown: [problem]}
    return None


# ---- request bodies ----------------------------------------------------------------------------

def data_problem(data: Any) -> tuple[str, str] | None:
    """(where, problem) for the first string in parsed request data, keys included and at any depth,
    that the database cannot store; `where` names the field ('tags', 'steps[2]', '' for the whole body)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # a loop, not recursion: a body may nest as deep as the JSON parser allows
        where, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return where, problem
        elif isinstance(value, (dict, MultiValueDict)):
            # A form's field may come more than once: each of its values goes by the field's name.
            fields = value.lists() if isinstance(value, MultiValueDict) else ((k, [v]) for k, v in value.items())
            for key, items in reversed(list(fields)):
                key_problem = text_problem(key) if isinstance(key, str) else None
                if key_problem:
                    return where, f"key {key!r} {key_problem}"
                stack.extend((f"{where}.{key}" if where else str(key), item) for item in reversed(items))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, UploadedFile) and value.name:
            problem = text_problem(value.name)
            if problem:
                return where, f"file name {value.name!r} {problem}"
    return None


def refuse_unstorable(data: Any, field: str = "") -> None:
    """Raise a 400 (ValidationError naming the field) when `data` holds a string the database cannot store."""
    found = data_problem(data)
    if found:
        where, problem = found
        where = ".".join(part for part in (field, where) if part) or "body"
        raise exceptions.ValidationError({where: [problem]})


class _Checked(BaseParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            parsed = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("the request body is nested too deeply") from None
        if isinstance(parsed, DataAndFiles):
            refuse_unstorable(parsed.data)
            refuse_unstorable(parsed.files)
        else:
            refuse_unstorable(parsed)
        return parsed


_checked_parsers: dict[type[BaseParser], type[BaseParser]] = {}


def checked_parser(parser_class: type[BaseParser]) -> type[BaseParser]:
    """`parser_class` refusing what the database cannot store (a subclass: DRF checks isinstance)."""
    checked = _checked_parsers.get(parser_class)
    if checked is None:
        checked = _checked_parsers[parser_class] = type(f"Checked{parser_class.__name__}", (_Checked, parser_class),
                                                        {})
    return checked


# ---- the middleware ----------------------------------------------------------------------------

_CODES = {400: "invalid_input", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed",
          413: "too_large", 500: "server_error"}


def _error_message(status: int, request: HttpRequest) -> str:
    if status == 404:
        return f"no API endpoint at {request.path!r}: see /api/schema/ for the paths"
    if status >= 500:
        return "internal error: the request failed on the server, which logged it; try again or report it"
    return _phrase(status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"error {status}"


def json_error(status: int, code: str, message: str, details: Any = None) -> JsonResponse:
    return JsonResponse(error_body(status, code, message, details), status=status)


class ApiGuard:
    """Django middleware (first in MIDDLEWARE) for paths under /api/: refuses a URL the database cannot
    take, and answers every error that is not already the API's JSON as JSON."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path_info.startswith(API_PREFIX):
            return self.get_response(request)
        # Django's path is text (bytes that are not UTF-8 stay percent-encoded: storable); the query is raw.
        refused = url_problem(request.path_info, get_bytes_from_wsgi(request.META, "QUERY_STRING", ""))
        if refused:
            return json_error(400, "invalid_input", *refused)
        response = self.get_response(request)
        if response.status_code >= 400 and not _is_api_error(response):
            # Django answered by itself (its 404 and 500 pages, HTML): what went wrong is logged already.
            status = response.status_code
            code = _CODES.get(status) or _phrase(status).lower().replace(" ", "_")
            replaced = json_error(status, code, _error_message(status, request))
            for header in ("Allow", "WWW-Authenticate", "Retry-After"):
                if header in response:
                    replaced[header] = response[header]
            return replaced
        return response


def _is_api_error(response: HttpResponse) -> bool:
    # A DRF Response came through the API's exception handler (JSON, or the browsable API's page of it).
    return isinstance(response, Response) or response.get("Content-Type", "").startswith("application/json")
