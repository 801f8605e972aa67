"""The status model: what an operation is, and what a claim or a completion found.

These types belong to idemtasks, not to Celery: ``AsyncResult.state`` says ``PENDING`` for ids it has never seen,
so it cannot tell a client whether its write was accepted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["ClaimOutcome", "ClaimResult", "ErrorInfo", "Operation", "Status", "Submission", "Takeover"]


class Status(str, enum.Enum):
    """Where an operation stands. ``SUCCEEDED`` and ``FAILED`` are final: they never change again."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED)


class Takeover(str, enum.Enum):
    """What :meth:`Store.requeue <idemtasks.stores.base.Store.requeue>` did with a running operation whose lease
    had run out (recovery's two-phase takeover, see :mod:`idemtasks.recovery`)."""

    #: Put back to pending, fenced on its token: the holder did not renew for ``confirm_after`` seconds after a
    #: first call suspected it. Recovery publishes it again.
    REQUEUED = "requeued"
    #: Marked as suspected (first call), or still waiting for the mark to be ``confirm_after`` seconds old. The
    #: holder keeps it if it renews (or finishes) meanwhile.
    SUSPECTED = "suspected"
    #: Nothing to take over: claimed again, renewed under a live lease, finished, or no longer this record.
    ALIVE = "alive"


#: Longest stored error type (an exception's class name), in characters: the SQL stores' column.
MAX_ERROR_TYPE = 255


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The stored failure of an operation: the exception's class name and message."""

    type: str
    message: str

    def __post_init__(self) -> None:
        # Cut here, where every store's completion and its check of a resent one both see it: a SQL column holds
        # MAX_ERROR_TYPE characters, and a longer name stored cut would not match the name a resend compares.
        if len(self.type) > MAX_ERROR_TYPE:
            object.__setattr__(self, "type", self.type[:MAX_ERROR_TYPE])


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Operation:
    """The durable record of one logical write, identified by ``(scope, key)``.

    ``id`` is opaque and unguessable; it doubles as the Celery task id, so ``AsyncResult(op.id)`` works.
    Timestamps are seconds since the epoch (UTC) as measured by the store's clock where it has one.
    """

    id: str
    scope: str
    key: str
    task_name: str
    fingerprint: str
    status: Status
    result: Any
    error: ErrorInfo | None
    attempts: int
    fencing_token: int
    lease_owner: str | None
    #: Running: when the holder's lease ends. Pending: ``None``, or how long recovery waits before its next copy
    #: (see :meth:`Store.mark_published <idemtasks.stores.base.Store.mark_published>`).
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    expires_at: float
    needs_publish: bool = False
    #: The call as canonical JSON ``[task_name, args, kwargs]``, kept so recovery can publish the message again.
    payload: str | None = None
    #: How many holders died with the body running: taken over once their lease lapsed (by a claim or by recovery),
    #: or gone with a shutdown's ``SystemExit`` (the pool's hard time limit sends one). A worker fails the operation
    #: instead of starting the body again once it reaches the task's ``max_crashes``.
    crashes: int = 0

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape of the operation (used by the HTTP layer); no lease owner, no fingerprint."""
        return {
            "id": self.id,
            "status": self.status.value,
            "result": self.result,
            "error": None if self.error is None else {"type": self.error.type, "message": self.error.message},
            "attempts": self.attempts,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "expires_at": _iso(self.expires_at),
        }


class ClaimOutcome(str, enum.Enum):
    """What a worker's claim found. Only ``CLAIMED`` lets the body run."""

    CLAIMED = "claimed"  # pending, absent, expired, or running under a dead lease: the caller now holds it
    BUSY = "busy"  # running under a live lease: a concurrent duplicate
    DONE = "done"  # succeeded or failed: replay the stored outcome
    MISMATCH = "mismatch"  # same key, different payload fingerprint


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """A claim's outcome and the operation as it stands after the claim."""

    outcome: ClaimOutcome
    operation: Operation


@dataclass(frozen=True, slots=True)
class Submission:
    """What ``submit`` returns: the operation, and whether this call created it (``False`` on a replay).

    ``checked_at``: the store's time that ``submit`` read to decide whether a replay of an operation not yet
    published should publish it (``None`` when it did not need to), so that an HTTP answer is decided on that same
    reading."""

    operation: Operation
    created: bool
    checked_at: float | None = None
