"""The HTTP side: ``Idempotency-Key`` semantics shared by the FastAPI, Flask and Django adapters."""

from __future__ import annotations

from .core import HttpPolicy, InvalidCredentials, Reply, RequestHeaders
from .endpoint import Endpoint, IncomingRequest, bearer_caller

__all__ = ["Endpoint", "HttpPolicy", "IncomingRequest", "InvalidCredentials", "Reply", "RequestHeaders",
           "bearer_caller"]
