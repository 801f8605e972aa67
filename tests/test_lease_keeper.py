"""The lease keeper: a held operation's lease is renewed before it runs out, by one thread per process."""

from __future__ import annotations

import time

import pytest

from idemtasks.lease import LeaseKeeper
from idemtasks.models import Operation
from idemtasks.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(30)

LEASE = 0.3


class FaultyRenewals(MemoryStore):
    """A store whose first renewal fails with an error that is not a store error (a bug, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals = 0

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        self.renewals += 1
        if self.renewals == 1:
            raise RuntimeError("a bug in renewal")
        return super()._renew(digest, operation_id, token, lease, ttl)


def _claimed(store: MemoryStore, key: str) -> Operation:
    return store.claim("s", key, "t", "fp", owner=f"owner-{key}", lease=LEASE, ttl=60.0).operation


def _lease_left(store: MemoryStore, key: str) -> float:
    op = store.get("s", key)
    assert op is not None and op.lease_expires_at is not None
    return op.lease_expires_at - time.time()


def test_a_held_lease_is_renewed_past_its_first_expiry() -> None:
    store, keeper = MemoryStore(), LeaseKeeper()
    op = _claimed(store, "k")
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)

    time.sleep(3 * LEASE)

    assert not hold.lost
    assert _lease_left(store, "k") > 0
    keeper.release(hold)


def test_an_unforeseen_renewal_error_is_logged_and_the_lease_renewed_on_the_next_try(
        caplog: pytest.LogCaptureFixture) -> None:
    store, keeper = FaultyRenewals(), LeaseKeeper()
    op = _claimed(store, "k")
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)

    time.sleep(3 * LEASE)

    assert store.renewals >= 2
    assert not hold.lost
    assert _lease_left(store, "k") > 0
    assert keeper._thread is not None and keeper._thread.is_alive()
    assert "a bug in renewal" in caplog.text
    keeper.release(hold)
