"""An in-process store for users' unit tests and eager mode. Not shared between processes, not durable."""

from __future__ import annotations

import dataclasses
import threading
import time

from ..identity import load_json
from ..models import ClaimResult, Operation, Status, Takeover
from .base import (
    PURGE_GRACE,
    ClaimRequest,
    CreateRequest,
    FinishRequest,
    Store,
    decide_claim,
    decide_create,
    is_stale,
    takeover_phase,
)

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps operations in a dict guarded by one lock; every primitive counts as one round trip."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        self.url = url
        self._lock = threading.Lock()
        self._records: dict[str, Operation] = {}

    @property
    def where(self) -> str:
        # Each instance keeps its own records, whatever its URL says (shared_store gives one per URL).
        return f"{self.url} (instance {id(self):#x})"

    def _live(self, digest: str, now: float) -> Operation | None:
        op = self._records.get(digest)
        return op if op is not None and op.expires_at > now else None

    def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        with self._lock:
            self.round_trips += 1
            op, created = decide_create(self._live(req.digest, time.time()), req, time.time())
            self._records[req.digest] = op
            return op, created

    def _claim(self, req: ClaimRequest) -> ClaimResult:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            outcome, op = decide_claim(self._records.get(req.digest), req, now)  # expired ones too: their token
            self._records[req.digest] = op
            return ClaimResult(outcome, op)

    def _holds(self, digest: str, operation_id: str, token: int, now: float, *,
               given_back: bool = False) -> Operation | None:
        """The live record, if ``token`` holds it: running, or (``given_back``, for a completion) pending with
        that token still (see ``_finish`` in stores.base)."""
        op = self._live(digest, now)
        if op is None or op.id != operation_id or op.fencing_token != token:
            return None
        if op.status is Status.RUNNING or (given_back and op.status is Status.PENDING):
            return op
        return None

    def _finish(self, req: FinishRequest) -> bool:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            op = self._holds(req.digest, req.operation_id, req.token, now, given_back=True)
            if op is None:
                return False
            self._records[req.digest] = dataclasses.replace(
                op, status=req.status, result=None if req.result is None else load_json(req.result), error=req.error,
                lease_owner=None, lease_expires_at=None, expires_at=now + req.ttl,
                updated_at=now + req.delay if req.status is Status.PENDING else now,
                crashes=op.crashes + (req.crashed and op.status is Status.RUNNING),
                payload=op.payload if req.payload is None or req.status is not Status.PENDING else req.payload,
                needs_publish=op.needs_publish and req.status is Status.PENDING,
            )
            return True

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            op = self._holds(digest, operation_id, token, now)
            if op is None:
                return False
            self._records[digest] = dataclasses.replace(
                op, lease_expires_at=now + lease, expires_at=max(op.expires_at, now + ttl)
            )
            return True

    def _mark_published(self, digest: str, operation_id: str, token: int, delay: float, backoff: float) -> None:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            op = self._live(digest, now)
            if (op is not None and op.id == operation_id and op.status is Status.PENDING
                    and op.fencing_token == token):
                again = now + delay + backoff if backoff > 0 else op.lease_expires_at
                self._records[digest] = dataclasses.replace(op, needs_publish=False, updated_at=now + delay,
                                                            lease_expires_at=again)

    def _attach_payload(self, digest: str, operation_id: str, token: int, payload: str) -> bool:
        with self._lock:
            self.round_trips += 1
            op = self._live(digest, time.time())
            if op is None or op.id != operation_id or op.fencing_token != token or op.payload is not None:
                return False
            self._records[digest] = dataclasses.replace(op, payload=payload)
            return True

    def _abandon(self, digest: str, operation_id: str, within: float) -> None:
        with self._lock:
            self.round_trips += 1
            op = self._records.get(digest)
            if (op is not None and op.id == operation_id and op.status is Status.PENDING and op.attempts == 0
                    and op.needs_publish and op.created_at > time.time() - within):
                del self._records[digest]

    def _stale(self, pending_after: float, limit: int) -> list[Operation]:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            found = [op for op in self._records.values() if is_stale(op, now, pending_after)]
            return sorted(found, key=lambda op: op.updated_at)[:limit]

    def _requeue(self, digest: str, operation_id: str, token: int, confirm_after: float) -> Takeover:
        with self._lock:
            self.round_trips += 1
            now = time.time()
            op = self._holds(digest, operation_id, token, now)
            phase = "live" if op is None else takeover_phase(op, now, confirm_after)
            if op is None or phase == "live":
                return Takeover.ALIVE
            if phase == "mark":
                self._records[digest] = dataclasses.replace(op, updated_at=now)
            if phase != "take":
                return Takeover.SUSPECTED
            self._records[digest] = dataclasses.replace(
                op, status=Status.PENDING, lease_owner=None, lease_expires_at=None, updated_at=now,
                crashes=op.crashes + 1)
            return Takeover.REQUEUED

    def _get(self, digest: str) -> Operation | None:
        with self._lock:
            self.round_trips += 1
            return self._live(digest, time.time())

    def purge_expired(self, *, grace: float = PURGE_GRACE) -> int:
        with self._lock:
            now = time.time()
            dead = [d for d, op in self._records.items() if op.expires_at <= now - grace]
            for digest in dead:
                del self._records[digest]
            return len(dead)

