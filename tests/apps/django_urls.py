"""URLconf of the Django adapter tests; the views are installed by the test module."""

from __future__ import annotations

from typing import Any

urlpatterns: list[Any] = []
