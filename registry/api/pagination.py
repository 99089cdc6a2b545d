from __future__ import annotations

from typing import Any

from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


class KnownCount:
    """A queryset whose total is already known (a counter column), so a page costs no COUNT(*)."""

    def __init__(self, queryset: Any, count: int) -> None:
        self.queryset = queryset
        self.total = count
        self.ordered = True

    def count(self) -> int:
        return self.total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, item: Any) -> Any:
        return self.queryset[item]
