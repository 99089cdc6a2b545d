"""The negotiation shortcut picks what DRF's own negotiation picks."""

from __future__ import annotations

import pytest
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer, StaticHTMLRenderer
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from registry.api.negotiation import CommonCaseFirst

ACCEPTS = [None, "*/*", "application/json", "text/html", "text/html,application/xhtml+xml,*/*;q=0.8",
           "application/json; indent=4", "application/*", "image/png"]


@pytest.mark.parametrize("renderers", [[JSONRenderer(), BrowsableAPIRenderer()], [StaticHTMLRenderer(), JSONRenderer()],
                                       [BrowsableAPIRenderer(), JSONRenderer()]])
@pytest.mark.parametrize("query", ["", "?format=api", "?format=json"])
def test_same_choice_as_drf(renderers: list[BaseRenderer], query: str) -> None:
    for accept in ACCEPTS:
        headers = {} if accept is None else {"HTTP_ACCEPT": accept}
        request = Request(APIRequestFactory().get(f"/api/v1/me/{query}", **headers))

        def choice(negotiation: DefaultContentNegotiation, request: Request = request) -> object:
            try:
                renderer, media_type = negotiation.select_renderer(request, renderers)
            except Exception as exc:  # noqa: BLE001 - the same refusal is the same answer
                return type(exc)
            return type(renderer), media_type

        assert choice(CommonCaseFirst()) == choice(DefaultContentNegotiation()), (accept, query)
