"""A network that drops packets, between a holder and its store: what was sent is lost, and the connection stays
open, so its sender waits for an answer until its socket timeout (seconds) or the kernel gives up (minutes).

A holder's lease that lapsed while its packets were lost is only suspected by the next claim, and taken over once a
grace of MIN_CONFIRM_AFTER (2 s) passed with no renewal. The keeper must renew within that grace once the network is
back, even though the renewal it sent during the loss is still waiting for its answer."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import Celery

from idemtasks import IdempotentTask
from idemtasks.errors import StoreUnavailable
from idemtasks.execution import _SETTLE_DELAYS
from idemtasks.lease import RENEW_RETRY_MAX, LeaseKeeper
from idemtasks.models import ClaimOutcome, Status
from idemtasks.stores.base import MIN_CONFIRM_AFTER, RENEW_TIMEOUT, Store
from idemtasks.stores.lanes import pooled_only
from idemtasks.stores.redis import RedisStore
from idemtasks.stores.sql import SQLStore
from idemtasks.task import TASK_ID_SCOPE

from . import services
from .blackhole import Blackhole
from .private_redis import PrivateRedis
from .test_pipelined_completion import Settled

pytestmark = pytest.mark.timeout(60)

LEASE = 0.9  # its grace is MIN_CONFIRM_AFTER; the keeper renews every 0.3 s


def _redis_pair(relay_to: Callable[[str], tuple[Blackhole, str]], server: str = services.REDIS_URL,
                query: str = "") -> tuple[Blackhole, RedisStore, RedisStore]:
    services.require("redis")
    relay, url = relay_to(server)
    namespace = f"idemtasks-test:{uuid.uuid4().hex[:12]}"
    # The holder keeps the default socket timeout (5 s, longer than the grace); the other worker reaches the store.
    return relay, RedisStore(url + query, namespace=namespace), RedisStore(server, namespace=namespace)


def _store_pair(relay_to: Callable[[str], tuple[Blackhole, str]], backend: str) -> tuple[Blackhole, Store, Store]:
    if backend == "redis":
        return _redis_pair(relay_to)
    service, server = {"postgres": ("postgres", services.POSTGRES_URL), "mysql": ("mysql", services.MYSQL_URL)}[backend]
    services.require(service)
    relay, url = relay_to(server)
    table = f"lost_{uuid.uuid4().hex[:12]}"
    other = SQLStore(server, table=table)
    return relay, SQLStore(url, table=table, create_schema=False), other


def _drop(store: Store) -> None:
    if isinstance(store, SQLStore):
        store.table.drop(store.engine)
    store.close()


BACKENDS = ["redis", "postgres", "mysql"]


@pytest.mark.parametrize("query", ["", "?socket_timeout=5&socket_connect_timeout=5"], ids=["url", "url_timeouts"])
def test_a_holder_whose_renewal_was_lost_renews_within_the_grace_once_packets_flow_again(
        blackhole: Callable[[str], tuple[Blackhole, str]], query: str) -> None:
    """Also when the store's URL sets socket timeouts of its own, which redis-py lets override its arguments."""
    _renews_within_the_grace(*_redis_pair(blackhole, query=query))


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_sql_holder_whose_renewal_was_lost_renews_within_the_grace_once_packets_flow_again(
        blackhole: Callable[[str], tuple[Blackhole, str]], backend: str) -> None:
    """Neither libpq nor PyMySQL bounds the wait for an answer: the renewal lost in flight would wait until the
    kernel gave its connection up, long after the grace."""
    _renews_within_the_grace(*_store_pair(blackhole, backend))


def _renews_within_the_grace(relay: Blackhole, holder: Store, other: Store) -> None:
    keeper, hold = LeaseKeeper(), None
    try:
        op = holder.claim("s", "k", "tasks.charge", "fp", owner="holder", lease=LEASE, ttl=60.0).operation
        hold = keeper.hold(holder, op, op.fencing_token, lease=LEASE, ttl=60.0)
        time.sleep(LEASE / 3 + 0.1)  # a first renewal: the next one goes out on a connection already open
        relay.cut = True
        time.sleep(LEASE + 0.3)  # the renewals sent meanwhile are lost, and the lease lapses
        relay.cut = False

        suspected = other.claim("s", "k", "tasks.charge", "fp", owner="other", lease=LEASE, ttl=60.0)
        assert suspected.outcome is ClaimOutcome.BUSY  # the lapsed lease is marked, not taken yet
        time.sleep(MIN_CONFIRM_AFTER + 0.3)
        after_grace = other.claim("s", "k", "tasks.charge", "fp", owner="other", lease=LEASE, ttl=60.0)

        assert after_grace.outcome is ClaimOutcome.BUSY, "a live holder was taken over"
        assert after_grace.operation.lease_owner == "holder" and not hold.lost
    finally:
        if hold is not None:
            keeper.release(hold)
        holder.close()
        _drop(other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_completion_the_keeper_holds_lands_within_the_grace_once_packets_flow_again(
        blackhole: Callable[[str], tuple[Blackhole, str]], backend: str) -> None:
    """The body ended while packets were lost, so its outcome went to the keeper, which sends it again until it
    lands. It must land before the lapsed lease is taken over, or the body would run a second time."""
    relay, holder, other = _store_pair(blackhole, backend)
    keeper = LeaseKeeper()
    try:
        op = holder.claim("s", "k", "tasks.charge", "fp", owner="holder", lease=LEASE, ttl=60.0).operation
        holder.get("s", "k")  # a pooled connection open (a PostgreSQL claim goes through the thread's own)
        relay.cut = True
        keeper.keep_finishing(holder, op, op.fencing_token, lambda: holder.finish(
            "s", "k", op.id, op.fencing_token, Status.SUCCEEDED, result_json='"paid"', ttl=60.0, again=True),
            lease=LEASE, ttl=60.0)
        time.sleep(LEASE + 0.3)  # the sends meanwhile are lost, and the lease lapses
        relay.cut = False

        first = other.claim("s", "k", "tasks.charge", "fp", owner="other", lease=LEASE, ttl=60.0)
        assert first.outcome in (ClaimOutcome.BUSY, ClaimOutcome.DONE)  # marked, unless the outcome landed first
        time.sleep(MIN_CONFIRM_AFTER + 0.3)
        after_grace = other.claim("s", "k", "tasks.charge", "fp", owner="other", lease=LEASE, ttl=60.0)

        assert after_grace.outcome is ClaimOutcome.DONE, "the body's outcome was lost to a takeover"
        assert after_grace.operation.result == "paid" and after_grace.operation.fencing_token == op.fencing_token
    finally:
        holder.close()
        _drop(other)


def test_whatever_sends_an_unrenewed_outcome_again_does_so_within_the_grace() -> None:
    """The pauses between resends of an outcome whose lease nobody renews any more (a pipelined completion that did
    not land, the keeper's held completions) and the longest wait for one answer fit in the grace, with a round trip
    to spare: the outcome lands before a lapsed lease that was suspected when the store came back is taken over."""
    assert max(_SETTLE_DELAYS) <= RENEW_RETRY_MAX
    assert RENEW_TIMEOUT + RENEW_RETRY_MAX < MIN_CONFIRM_AFTER - 0.25


def test_a_pipelined_completion_sent_again_gives_way_to_the_settler_within_the_grace(
        blackhole: Callable[[str], tuple[Blackhole, str]], private_redis: PrivateRedis) -> None:
    """A pipelined completion's answer says it did not run (a restarted server's empty script cache), and its resend
    is lost in flight. Nothing renews that lease any more: the resend must give up soon enough for the settler to
    try again (and the keeper after it) before a suspected lease's grace is over, not wait out the socket timeout."""
    relay, holder, _other = _redis_pair(blackhole, private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    settled = Settled()
    try:
        op = holder.claim("s", "k", "tasks.charge", "fp", owner="holder", lease=LEASE, ttl=60.0).operation
        admin.script_flush()
        holder.finish_pipelined("s", "k", op.id, op.fencing_token, Status.SUCCEEDED, result_json='"paid"', ttl=60.0,
                                settle=settled)
        time.sleep(0.05)  # the answer (NOSCRIPT) is back; the collector reads it a moment later
        relay.cut = True
        cut = time.monotonic()
        assert settled.called.wait(MIN_CONFIRM_AFTER), "the resend waited out the socket timeout"
        assert time.monotonic() - cut < RENEW_TIMEOUT + 0.5
        assert isinstance(settled.errors[0], StoreUnavailable)
    finally:
        relay.cut = False
        admin.close()
        holder.close()
        _other.close()


def test_a_completion_whose_reply_was_lost_and_that_the_client_sent_again_is_not_reported_lost(
        blackhole: Callable[[str], tuple[Blackhole, str]]) -> None:
    """The server ran the completion and its reply was lost; redis-py sent it again on a new connection, which found
    the operation finished already. Finished by this very completion (only the holder of the token can): the task
    succeeded, it was not taken over."""
    services.require("redis")
    relay, url = blackhole(services.REDIS_URL)
    store = RedisStore(url, namespace=f"idemtasks-test:{uuid.uuid4().hex[:12]}", socket_timeout=0.3)
    app = Celery(f"r{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    runs: list[str] = []

    @app.task(shared=False, base=IdempotentTask, store_url=store, name=f"{app.main}.pay", pipeline_completions=False)
    def pay(key: str) -> str:
        runs.append(key)
        relay.drop_replies = 1  # the next reply is the completion's
        return "paid"

    try:
        result = pay.apply(("k",))
        assert result.successful(), result.result
        assert result.result == "paid" and runs == ["k"]
        assert relay.dropped == [b":1\r\n"], "the reply dropped was not the completion's (one record changed)"
        op = store.get(TASK_ID_SCOPE, result.id)  # sent without submit: keyed by its task id
        assert op is not None and op.status is Status.SUCCEEDED and op.result == "paid"
    finally:
        store.close()


def test_the_same_completion_from_a_thread_without_a_lane_is_not_reported_lost(
        blackhole: Callable[[str], tuple[Blackhole, str]]) -> None:
    """A thread that opens no lane (an event loop's executor) completes in place, through the retrying client."""
    services.require("redis")
    relay, url = blackhole(services.REDIS_URL)
    store = RedisStore(url, namespace=f"idemtasks-test:{uuid.uuid4().hex[:12]}", socket_timeout=0.3)
    settled = Settled()
    try:
        with pooled_only():
            op = store.claim("s", "k", "tasks.charge", "fp", owner="holder", lease=30.0, ttl=60.0).operation
            relay.drop_replies = 1
            store.finish_pipelined("s", "k", op.id, op.fencing_token, Status.SUCCEEDED, result_json='"paid"',
                                   ttl=60.0, settle=settled)
        assert relay.dropped == [b":1\r\n"]
        done = store.get("s", "k")
        assert done is not None and done.status is Status.SUCCEEDED and not settled.errors
    finally:
        store.close()


# Replies a claim lets through before the one whose loss leaves it landed: PostgreSQL runs it as one statement in
# autocommit; MariaDB locks and reads the row, writes it, then commits.
_CLAIM_REPLIES_BEFORE_COMMITTED = {"postgres": 0, "mysql": 2}


@contextlib.contextmanager
def _severable(blackhole: Callable[[str], tuple[Blackhole, str]],
               backend: str) -> Iterator[tuple[Blackhole, Store, Store]]:
    """A store through a relay (its connection open and set up, ready to be cut at a reply), another beside it."""
    relay, holder, other = _store_pair(blackhole, backend)
    try:
        with pooled_only():  # a lane sends a claim again on its own
            holder.create("s", "warm", "tasks.charge", "fp", ttl=60.0)
        yield relay, holder, other
    finally:
        relay.sever_after = None
        _drop(other)
        holder.close()


def _commits_ok(reply: bytes) -> bool:
    """Whether a MariaDB reply is the COMMIT's OK: an OK packet that changed no row (the INSERT's changed one)."""
    return reply[4:6] == b"\x00\x00"


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_claim_whose_answer_was_lost_with_its_connection_is_still_this_claims(
        blackhole: Callable[[str], tuple[Blackhole, str]], backend: str) -> None:
    """The claim landed and its connection broke before the answer came back. Sent again, it finds the operation
    under its own live lease: claimed, the same token, no crash counted. Before, the claim failed as an outage and
    left the operation held by an owner no worker was; its message came back, waited out lease and grace, and took
    the operation over with a crash counted (three such losses failed a payment that never ran)."""
    with _severable(blackhole, backend) as (relay, holder, other):
        with pooled_only():
            relay.sever_after = _CLAIM_REPLIES_BEFORE_COMMITTED[backend]
            res = holder.claim("s", "k", "tasks.charge", "fp", owner="w1", lease=30.0, ttl=60.0)
        assert relay.sever_after is None and len(relay.dropped) == 1, "no reply was lost"
        if backend == "postgres":
            assert b"w1" in relay.dropped[0], "the reply lost was not the claim's row"
        else:
            assert _commits_ok(relay.dropped[0]), "the reply lost was not the commit's OK"

        assert res.outcome is ClaimOutcome.CLAIMED
        stored = other.get("s", "k")
        assert stored is not None and stored == res.operation
        assert (stored.lease_owner, stored.fencing_token, stored.attempts, stored.crashes) == ("w1", 1, 1, 0)


def test_a_mariadb_claim_cut_off_before_its_commit_is_not_sent_again(
        blackhole: Callable[[str], tuple[Blackhole, str]]) -> None:
    """Its transaction never committed, so there is nothing to find; and a connection dead on this side only may
    still hold the row's lock on the server, which a claim sent again would wait out for nothing."""
    with _severable(blackhole, "mysql") as (relay, holder, other):
        relay.sever_after = 0  # the locking read's answer
        with pytest.raises(StoreUnavailable):
            holder.claim("s", "k", "tasks.charge", "fp", owner="w1", lease=30.0, ttl=60.0)
        assert relay.sever_after is None and len(relay.dropped) == 1
        assert other.get("s", "k") is None


def test_a_mariadb_creation_cut_off_at_its_commit_fails_as_an_outage(
        blackhole: Callable[[str], tuple[Blackhole, str]]) -> None:
    """Only a claim is sent again (a creation is the caller's to retry, and a retry meets the record as a replay):
    the creation fails as StoreUnavailable itself, the error a caller and a stored failure name."""
    with _severable(blackhole, "mysql") as (relay, holder, other):
        relay.sever_after = _CLAIM_REPLIES_BEFORE_COMMITTED["mysql"]
        with pytest.raises(StoreUnavailable) as caught:
            holder.create("s", "k", "tasks.charge", "fp", ttl=60.0)
        assert type(caught.value) is StoreUnavailable
        assert _commits_ok(relay.dropped[0]), "the reply lost was not the commit's OK"
        landed = other.get("s", "k")
        assert landed is not None
        again = holder.create("s", "k", "tasks.charge", "fp", ttl=60.0)
        assert not again.created and again.operation.id == landed.id
