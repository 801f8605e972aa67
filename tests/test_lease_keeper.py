"""The lease keeper: a held operation's lease is renewed before it runs out, by one thread per process."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from idemtasks.errors import LeaseLost, StoreUnavailable
from idemtasks.lease import RENEW_RETRY_MAX, Hold, LeaseKeeper
from idemtasks.models import Operation
from idemtasks.recovery import MIN_CONFIRM_AFTER
from idemtasks.stores.memory import MemoryStore
from idemtasks.stores.redis import RedisStore
from tests import services
from tests.private_redis import PrivateRedis

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


class Outage(MemoryStore):
    """A store that refuses renewals as unreachable while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.renewed = 0

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        if self.down:
            raise StoreUnavailable("the store is down")
        self.renewed += 1
        return super()._renew(digest, operation_id, token, lease, ttl)


def test_a_failed_renewal_of_a_long_lease_is_retried_within_recoverys_grace() -> None:
    """After an outage longer than the lease, recovery waits MIN_CONFIRM_AFTER for a renewal before it takes the
    operation over: the keeper must not wait lease / 10 (6 s here) between retries, but at most RENEW_RETRY_MAX."""
    store, keeper = Outage(), LeaseKeeper()
    op = store.claim("s", "k", "t", "fp", owner="o", lease=60.0, ttl=600.0).operation
    hold = keeper.hold(store, op, op.fencing_token, lease=60.0, ttl=600.0)
    with keeper._cond:  # the outage began at the first renewal, not 20 s from now
        hold.due = time.monotonic()
        keeper._cond.notify()
    time.sleep(0.2)
    store.down = False
    back = time.monotonic()
    while not store.renewed:
        assert time.monotonic() - back < RENEW_RETRY_MAX + 0.5, "the keeper did not renew promptly after the outage"
        time.sleep(0.02)
    assert time.monotonic() - back < MIN_CONFIRM_AFTER
    assert not hold.lost
    keeper.release(hold)


def test_a_renewal_that_meets_its_own_holders_completion_is_not_reported_as_a_takeover(
        caplog: pytest.LogCaptureFixture) -> None:
    """The worker's completion lands, and the keeper renews before the worker thread releases the hold: the refusal
    is this holder's own doing, not another worker's takeover, and no error says otherwise."""
    store, keeper = MemoryStore(), LeaseKeeper()
    op = _claimed(store, "k")
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)
    store.succeed(op, op.fencing_token, "1", ttl=60.0)

    time.sleep(LEASE)  # the renewal was due a third of the way through

    assert not hold.lost and hold not in keeper._holds
    assert "taken over" not in caplog.text


def test_a_renewal_refused_after_a_takeover_marks_the_hold_lost(caplog: pytest.LogCaptureFixture) -> None:
    store, keeper = MemoryStore(), LeaseKeeper()
    op = _claimed(store, "k")
    time.sleep(LEASE + 0.05)  # the lease ran out before the keeper held it, and another worker took the operation
    store.claim("s", "k", "t", "fp", owner="taker", lease=30.0, ttl=60.0, grace=0.0)  # suspects the lapsed lease
    taker = store.claim("s", "k", "t", "fp", owner="taker", lease=30.0, ttl=60.0, grace=0.0).operation
    store.succeed(taker, taker.fencing_token, "2", ttl=60.0)
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)

    time.sleep(LEASE)

    assert hold.lost and "taken over" in caplog.text


def test_a_store_that_does_not_answer_does_not_hold_the_renewals_of_another(private_redis: PrivateRedis) -> None:
    """One keeper thread renews every hold of a process, in turn, and each renewal to a store that does not answer
    waits RENEW_TIMEOUT. Asked for each of its 12 holds, a stalled store made a pass 6 s long, and a hold on a store
    that answered at once lapsed (its lease of 3 s) while its body ran."""
    stalled, healthy = RedisStore(private_redis.url), RedisStore(services.REDIS_URL, namespace=f"k{uuid.uuid4().hex}")
    keeper = LeaseKeeper()

    def held(store: RedisStore) -> Hold:
        op = store.claim("s", uuid.uuid4().hex, "t", "fp", owner=uuid.uuid4().hex, lease=3.0, ttl=60.0).operation
        return keeper.hold(store, op, op.fencing_token, lease=3.0, ttl=60.0)

    stuck = [held(stalled) for _ in range(12)]
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        kept = held(healthy)
        started = time.monotonic()
        while time.monotonic() - started < 4.5:
            op = healthy.get(kept.operation.scope, kept.operation.key)
            assert op is not None and op.lease_expires_at is not None
            assert op.lease_expires_at > healthy.now(), "the healthy store's lease lapsed"
            time.sleep(0.1)
        assert not kept.lost
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        for hold in [*stuck, kept]:
            keeper.release(hold)
        stalled.close()
        healthy.close()


class NodeDown(MemoryStore):
    """A store whose records on one node (``down``) do not answer: a Redis Cluster with one master gone. Each
    renewal of one of them waits the keeper's timeout, then fails as unavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        op = self._records.get(digest)
        if op is not None and op.key in self.down:
            time.sleep(0.5)
            raise StoreUnavailable("the node of this record is down")
        return super()._renew(digest, operation_id, token, lease, ttl)


def test_records_of_one_store_that_answer_are_renewed_beside_those_that_do_not() -> None:
    """A store that failed one renewal is not asked again in that pass; its other holds must still be renewed in the
    next, or a cluster with one node down would let the leases of the healthy nodes' records lapse, pass after
    pass, while their bodies run."""
    store, keeper = NodeDown(), LeaseKeeper()
    holds = [keeper.hold(store, op, op.fencing_token, lease=3.0, ttl=60.0)
             for op in (store.claim("s", f"k{i}", "t", "fp", owner=f"k{i}", lease=3.0, ttl=60.0).operation
                        for i in range(6))]
    # The keeper meets the failing ones first: the order it keeps its holds in, which used to be every pass's.
    store.down = {h.operation.key for h in list(keeper._holds)[:3]}
    healthy = {h.operation.key for h in holds} - store.down
    try:
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            for key in healthy:
                assert _lease_left(store, key) > 0, f"{key} lapsed"
            time.sleep(0.1)
    finally:
        for hold in holds:
            keeper.release(hold)


class Refusing(FaultyRenewals):
    """A store that refuses every renewal at once, as a server whose port is closed (counted in ``renewals``)."""

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        self.renewals += 1
        raise StoreUnavailable("connection refused")


def test_a_store_that_refuses_at_once_is_asked_once_per_retry_interval_not_for_every_hold() -> None:
    store, keeper = Refusing(), LeaseKeeper()
    holds = [keeper.hold(store, op, op.fencing_token, lease=3.0, ttl=60.0)
             for op in (store.claim("s", f"k{i}", "t", "fp", owner=f"k{i}", lease=3.0, ttl=60.0).operation
                        for i in range(20))]
    try:
        time.sleep(1.0 + 3.0)  # the first renewals are due after a third of the lease; then 3 s of refusals
        # One call per retry interval (0.3 s here), give or take the first pass: not 20 holds' worth each time.
        assert 5 <= store.renewals <= 16, store.renewals
    finally:
        for hold in holds:
            keeper.release(hold)


def test_a_short_lease_is_renewed_in_time_beside_failing_long_ones_on_the_same_store() -> None:
    """A store rests after a failed renewal for the shortest retry interval among its holds, and the lease that runs
    out first is renewed first: resting for a 30 s lease's interval (a second), or queued behind four overdue 30 s
    leases whose renewals each waited half a second, a 0.9 s lease on the same store lapsed."""
    store, keeper = NodeDown(), LeaseKeeper()
    failing = [store.claim("s", f"down{i}", "t", "fp", owner=f"down{i}", lease=30.0, ttl=60.0).operation
               for i in range(4)]
    short = store.claim("s", "up", "t", "fp", owner="up", lease=0.9, ttl=60.0).operation
    store.down = {op.key for op in failing}
    holds = [*(keeper.hold(store, op, op.fencing_token, lease=30.0, ttl=60.0) for op in failing),
             keeper.hold(store, short, short.fencing_token, lease=0.9, ttl=60.0)]
    with keeper._cond:  # the failing ones due now, not in 10 s
        for hold in holds[:-1]:
            hold.due = time.monotonic()
        keeper._cond.notify()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            assert _lease_left(store, "up") > 0, "the short lease lapsed"
            time.sleep(0.02)
    finally:
        for hold in holds:
            keeper.release(hold)


def test_a_renewal_refused_once_the_holder_gives_the_operation_back_is_no_takeover(
        caplog: pytest.LogCaptureFixture) -> None:
    """The holder gives the operation back (a retry) and the keeper renews before it hears of it, or the give-back
    lands long after, through an outage: the refusal is the holder's own doing, not another worker's takeover."""
    store, keeper = MemoryStore(), LeaseKeeper()
    op = _claimed(store, "k")
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)
    hold.giving_back = True  # as Attempt.release marks it, before the store takes the give-back
    store.release(op, op.fencing_token, ttl=60.0, delay=5.0)
    time.sleep(3 * LEASE)  # renewals come due, and are refused: the record is pending
    assert not hold.lost and "taken over" not in caplog.text
    keeper.release(hold)


def test_a_give_back_refused_as_taken_over_leaves_the_takeover_reported(caplog: pytest.LogCaptureFixture) -> None:
    """The holder's give-back is refused (another worker took the operation over): the renewals refused from then on
    are that takeover, not the holder's own give-back, and say so."""
    from idemtasks.execution import Attempt

    store, keeper = MemoryStore(), LeaseKeeper()
    op = _claimed(store, "k")
    time.sleep(LEASE + 0.1)  # the lease lapses (no keeper yet), and another worker takes the operation over
    store.claim("s", "k", "t", "fp", owner="other", lease=30.0, ttl=60.0, grace=0.0)
    taken = store.claim("s", "k", "t", "fp", owner="other", lease=30.0, ttl=60.0, grace=0.0).operation
    assert taken.fencing_token == op.fencing_token + 1
    hold = keeper.hold(store, op, op.fencing_token, lease=LEASE, ttl=60.0)
    attempt = Attempt(store, op, ttl=60.0, hold=hold, lease=LEASE)
    with pytest.raises(LeaseLost):
        attempt.release(delay=5.0)
    time.sleep(3 * LEASE)  # its renewals come due, and are refused
    assert hold.lost and "taken over by another worker" in caplog.text
    keeper.release(hold)


def test_a_short_lease_is_renewed_in_time_beside_give_backs_waiting_for_stores_that_are_down() -> None:
    """A completion or give-back that waits for its store goes after the holds that renew, as a failing renewal
    does: its lease was granted long ago, and by that time alone it came first, every round."""
    healthy, keeper = MemoryStore(), LeaseKeeper()

    def down() -> None:
        time.sleep(0.5)
        raise StoreUnavailable("the store is down")

    waiting = []
    for i in range(2):
        store = MemoryStore()
        op = _claimed(store, f"w{i}")
        waiting.append(keeper.keep_finishing(store, op, op.fencing_token, down, lease=1.0, ttl=60.0))
    short = healthy.claim("s", "up", "t", "fp", owner="up", lease=0.9, ttl=60.0).operation
    hold = keeper.hold(healthy, short, short.fencing_token, lease=0.9, ttl=60.0)
    try:
        time.sleep(1.5)  # the first round, in which the give-backs have not failed yet
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            assert _lease_left(healthy, "up") > 0, "the short lease lapsed"
            time.sleep(0.02)
    finally:
        for h in [*waiting, hold]:
            keeper.release(h)
