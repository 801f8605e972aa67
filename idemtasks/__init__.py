"""idemtasks: exactly-once processing for Celery.

Clients retry, brokers redeliver, workers die mid-task: idemtasks records each logical write as an *operation*
under its idempotency key, claims it atomically whenever a task runs, and turns every repeat into a replay of the
stored outcome.
"""

from __future__ import annotations

from .config import DEFAULT_LEASE, DEFAULT_STORE_URL, DEFAULT_TTL
from .errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdemtasksError,
    InvalidKey,
    LeaseLost,
    NotSerializable,
    OperationFailed,
    PublishFailed,
    StoreError,
    StoreUnavailable,
    TooLarge,
)
from .execution import Attempt
from .models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status, Submission
from .stores import Store, open_store
from .task import IdempotentTask

__version__ = "0.1.0"

__all__ = [
    # Tasks
    "Attempt",
    "IdempotentTask",
    # Status model
    "ClaimOutcome",
    "ClaimResult",
    "ErrorInfo",
    "Operation",
    "Status",
    "Submission",
    # Stores
    "Store",
    "open_store",
    # Defaults
    "DEFAULT_LEASE",
    "DEFAULT_STORE_URL",
    "DEFAULT_TTL",
    # Errors
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "IdemtasksError",
    "InvalidKey",
    "LeaseLost",
    "NotSerializable",
    "OperationFailed",
    "PublishFailed",
    "StoreError",
    "StoreUnavailable",
    "TooLarge",
]
