"""Content negotiation that answers the usual API request without parsing its Accept header."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request


class CommonCaseFirst(DefaultContentNegotiation):
    """What DRF's negotiation picks, reached quicker for what API clients send: no Accept header, `*/*`, or
    exactly the first renderer's media type (curl, requests, the mlflow client, CI scripts) get the first
    renderer. Anything else (a browser's list, a ?format=, a format suffix) goes through DRF's own parsing."""

    def select_renderer(self, request: Request, renderers: Iterable[BaseRenderer],
                        format_suffix: str | None = None) -> tuple[BaseRenderer, Any]:
        renderers = list(renderers)
        first = renderers[0] if renderers else None
        accept = request.META.get("HTTP_ACCEPT", "*/*")
        if (first is not None and "*" not in first.media_type and accept in ("*/*", first.media_type)
                and not format_suffix and self.settings.URL_FORMAT_OVERRIDE not in request.query_params):
            return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)  # type: ignore[no-any-return]
