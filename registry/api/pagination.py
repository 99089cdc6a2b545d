from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


class PagedRows:
    """What the paginator slices, for rows read a page at a time: `fetch(offset, limit)` reads one page and
    `count()` gives the total (from a counter column where there is one, so that a page costs no COUNT(*))."""

    ordered = True

    def __init__(self, fetch: Callable[[int, int], list[dict[str, Any]]], count: Callable[[], int]) -> None:
        self.fetch = fetch
        self._count = count

    def count(self) -> int:
        return self._count()

    def __len__(self) -> int:
        return self._count()

    def __getitem__(self, item: slice) -> list[dict[str, Any]]:
        if not isinstance(item, slice) or item.step is not None or item.stop is None:
            raise TypeError("PagedRows is read by slices [start:stop]")
        start = item.start or 0
        return self.fetch(start, max(0, item.stop - start))
