"""A body whose holders keep dying is failed after ``max_crashes`` deaths, instead of being started for ever.

A crash here is a holder that died with the body running: its lapsed lease was taken over, or it gave the operation
back on ``SystemExit`` (a shutdown; the pool's hard time limit sends one before its SIGKILL). Retries, requeues and
outages waited out are not crashes. The real-worker version (a hard time limit in a prefork pool) is in
``test_worker_processes``.
"""

from __future__ import annotations

import builtins
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from idemtasks import ClaimOutcome, ConfigurationError, IdempotentTask, OperationFailed, Status
from idemtasks.identity import DEFAULT_SCOPE, canonical_call, fingerprint_of_call
from idemtasks.models import Operation
from idemtasks.stores.base import Store
from tests import services
from tests.conftest import drop, make_store
from tests.private_redis import PrivateRedis, free_port
from tests.workers import wait_until

TTL = 3600.0


@dataclass
class Harness:
    app: Celery
    store: Store
    ledger_url: str
    runs: Counter[str] = field(default_factory=Counter)
    tasks: dict[str, Any] = field(default_factory=dict)
    #: key -> how many more times the "exits" body raises SystemExit
    exits: Counter[str] = field(default_factory=Counter)

    def final(self, op_id: str) -> Operation:
        return wait_until(lambda: (op := self.store.get_by_id(op_id)) is not None and op.is_final and op, 20.0,
                          f"operation {op_id} to finish")


def build(store: Store, ledger_url: str) -> Harness:
    app = Celery(f"c{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(idemtasks_lease=5.0, task_acks_late=True, broker_connection_retry_on_startup=False,
                    task_default_queue=app.main)
    h = Harness(app, store, ledger_url)

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.charge")
    def charge(self: IdempotentTask, amount: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        return {"amount": amount}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.stubborn", max_crashes=0)
    def stubborn(self: IdempotentTask, amount: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        return {"amount": amount}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.booked",
              transactional=True, transaction_url=ledger_url)
    def booked(self: IdempotentTask, amount: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        return {"amount": amount}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.exits")
    def exits(self: IdempotentTask, amount: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        if h.exits[self.operation.key] > 0:
            h.exits[self.operation.key] -= 1
            raise SystemExit(1)  # what the pool's SIGTERM handler raises in the body
        return {"amount": amount}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.booked_nowhere",
              transactional=True,
              transaction_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    def booked_nowhere(self: IdempotentTask, amount: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        return {"amount": amount}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.retrying", max_retries=5)
    def retrying(self: IdempotentTask, amount: int, times: int) -> dict[str, int]:
        h.runs[self.operation.key] += 1
        if h.runs[self.operation.key] <= times:
            self.retry(countdown=0.1)
        return {"amount": amount}

    h.tasks.update(charge=charge, stubborn=stubborn, booked=booked, exits=exits, booked_nowhere=booked_nowhere,
                   retrying=retrying)
    return h


# The counting itself is checked on every backend by the store contract; here, one store of each kind.
@pytest.fixture(scope="module", params=["redis", "postgres"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("crash")
    store = make_store(request.param, tmp)
    harness = build(store, f"sqlite:///{tmp / 'ledger.sqlite3'}")
    with start_worker(harness.app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30.0):
        yield harness
    drop(store)


def died(store: Store, task: Any, args: tuple[Any, ...], key: str, times: int) -> Operation:
    """The record of ``task(*args)`` under ``key`` after ``times`` holders died with its body running, each taken
    over by the next once its lease lapsed; the last holder gave it back, as a retry does (not a crash)."""
    call = canonical_call(task.name, args, {})
    fp = fingerprint_of_call(call)

    def take(owner: str) -> Operation:
        return store.claim(DEFAULT_SCOPE, key, task.name, fp, owner=owner, lease=0.2, ttl=TTL, payload=call,
                           grace=0.0).operation

    op = take("holder-0")
    for n in range(1, times + 1):
        time.sleep(0.25)
        take(f"suspect-{n}")  # the first look at a lapsed lease only marks it
        op = take(f"holder-{n}")
        assert op.lease_owner == f"holder-{n}" and op.crashes == n
    store.release(op, op.fencing_token, ttl=TTL)
    return op


def deliver(task: Any, args: tuple[Any, ...], op: Operation) -> Any:
    """The operation's message, as the broker or recovery would deliver it again."""
    return task.apply_async(args, task_id=op.id, headers={"idemtasks": {"scope": op.scope, "key": op.key}})


def key() -> str:
    return f"crash-{uuid.uuid4().hex}"


def test_an_operation_whose_holders_died_max_crashes_times_is_failed_without_running_the_body(h: Harness) -> None:
    charge = h.tasks["charge"]
    op = died(h.store, charge, (40,), k := key(), times=3)  # the default max_crashes
    result = deliver(charge, (40,), op)
    with pytest.raises(OperationFailed, match=r"^TooManyCrashes: ") as raised:
        result.get(timeout=20)
    # Through the JSON result backend, with the fields a caller branches on.
    assert (raised.value.operation_id, raised.value.error_type) == (op.id, "TooManyCrashes")
    final = h.final(op.id)
    assert final.status is Status.FAILED and final.error is not None and final.error.type == "TooManyCrashes"
    assert "3 holders" in final.error.message and "max_crashes=3" in final.error.message
    assert final.crashes == 3 and final.fencing_token == op.fencing_token + 1  # fenced like any completion
    assert h.runs[k] == 0
    # A failure like any other: duplicates and client retries replay it.
    with pytest.raises(OperationFailed):
        deliver(charge, (40,), op).get(timeout=20)
    again = charge.submit((40,), key=k)
    assert not again.created and again.operation.status is Status.FAILED
    assert h.runs[k] == 0


def test_fewer_deaths_than_max_crashes_start_the_body_again(h: Harness) -> None:
    charge = h.tasks["charge"]
    op = died(h.store, charge, (41,), k := key(), times=2)
    assert deliver(charge, (41,), op).get(timeout=20) == {"amount": 41}
    final = h.final(op.id)
    assert final.status is Status.SUCCEEDED and final.crashes == 2 and h.runs[k] == 1


def test_max_crashes_zero_never_gives_up(h: Harness) -> None:
    stubborn = h.tasks["stubborn"]
    op = died(h.store, stubborn, (42,), k := key(), times=4)
    assert deliver(stubborn, (42,), op).get(timeout=20) == {"amount": 42}
    assert h.final(op.id).status is Status.SUCCEEDED and h.runs[k] == 1


def test_a_transactional_payment_committed_before_its_holder_died_keeps_its_result(h: Harness) -> None:
    """The last holder committed its effects and died before it completed the operation: giving up must not store
    as failed a payment that went through. The committed result is the outcome."""
    from idemtasks.effects import ledger_for

    booked = h.tasks["booked"]
    op = died(h.store, booked, (43,), k := key(), times=3)
    ledger = ledger_for(h.ledger_url)
    with ledger.transaction() as conn:
        assert ledger.record(conn, op.id, op.fencing_token, '{"amount": 43, "committed": true}') is None
    assert deliver(booked, (43,), op).get(timeout=20) == {"amount": 43, "committed": True}
    final = h.final(op.id)
    assert final.status is Status.SUCCEEDED and final.result == {"amount": 43, "committed": True}
    assert h.runs[k] == 0


def test_a_transactional_operation_given_up_is_sealed_so_a_late_holder_cannot_commit(h: Harness) -> None:
    from idemtasks.effects import failure_of, ledger_for

    booked = h.tasks["booked"]
    op = died(h.store, booked, (44,), k := key(), times=3)
    with pytest.raises(OperationFailed):
        deliver(booked, (44,), op).get(timeout=20)
    ledger = ledger_for(h.ledger_url)
    marker = ledger.lookup(op.id)
    assert marker is not None and failure_of(marker) is not None
    assert failure_of(marker)[0] == "TooManyCrashes"  # type: ignore[index]
    with ledger.transaction() as conn:  # a holder thought dead, committing late, collides and must roll back
        assert ledger.record(conn, op.id, op.fencing_token, '{"amount": 44}') == marker
    assert h.runs[k] == 0


def test_a_body_interrupted_by_system_exit_gives_its_operation_back_as_a_crash(h: Harness) -> None:
    """``SystemExit`` in the body (a shutdown, or the pool's hard time limit) gives the operation back at once
    rather than leaving it to its lease, and counts a crash, so a body cut short every time still ends."""
    exits = h.tasks["exits"]
    h.exits[k := key()] = 10
    op_id = died(h.store, exits, (45,), k, times=0).id  # a record and no message: each run is driven by hand
    for n in (1, 2, 3):
        with pytest.raises(SystemExit):
            exits.apply((45,), task_id=op_id, headers={"idemtasks": {"scope": DEFAULT_SCOPE, "key": k}},
                        throw=True)
        op = h.store.get_by_id(op_id)
        assert op is not None and op.status is Status.PENDING and op.crashes == n
    assert h.runs[k] == 3
    with pytest.raises(OperationFailed) as info:
        exits.apply((45,), task_id=op_id, headers={"idemtasks": {"scope": DEFAULT_SCOPE, "key": k}}, throw=True)
    assert info.value.error_type == "TooManyCrashes" and h.runs[k] == 3


def test_a_retry_is_not_a_crash(h: Harness) -> None:
    retrying = h.tasks["retrying"]
    op = died(h.store, retrying, (46, 1), k := key(), times=1)
    assert deliver(retrying, (46, 1), op).get(timeout=20) == {"amount": 46}
    final = h.final(op.id)
    assert final.status is Status.SUCCEEDED and h.runs[k] == 2  # ran, gave itself back for retry(), ran again
    assert final.crashes == 1 and final.attempts == op.attempts + 2


def test_a_crash_count_an_older_release_left_on_a_reused_key_is_not_counted(h: Harness) -> None:
    """Workers of a release without the count, beside newer ones on a SQL store, re-create an expired record (its
    key reused after the TTL) keeping the count of the operation that expired. The new operation has had no attempt
    yet, so none of those deaths are its own."""
    retrying = h.tasks["retrying"]
    op = died(h.store, retrying, (47, 3), k := key(), times=3)
    recreated_by_an_older_release(h.store, op)
    # Three retries, no death: none of them may count, whatever count the record started with.
    assert deliver(retrying, (47, 3), op).get(timeout=30) == {"amount": 47}
    final = h.final(op.id)
    assert final.status is Status.SUCCEEDED and final.crashes == 0 and h.runs[k] == 4


def recreated_by_an_older_release(store: Store, op: Operation) -> None:
    """What an older release's create leaves of an expired record: a new pending operation, with the column it
    does not know (``crashes``) as it was."""
    from idemtasks.identity import key_digest
    from idemtasks.stores.redis import RedisStore
    from idemtasks.stores.sql import SQLStore

    if isinstance(store, SQLStore):
        t = store.table
        with store.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == op.id).values(
                status="pending", attempts=0, lease_owner=None, lease_expires_at=None))
    else:
        assert isinstance(store, RedisStore)
        record = store.record_key(key_digest(op.scope, op.key))
        store.client.hset(record, mapping={"st": "p", "a": "0"})
        store.client.hdel(record, "lo", "le")
    assert store.get_by_id(op.id).crashes == 3  # type: ignore[union-attr]


def test_giving_up_waits_while_the_transaction_database_is_down(h: Harness) -> None:
    """Whether a dead holder committed cannot be told, and the failure cannot be sealed against a late commit:
    nothing is stored blind. The operation is given back (not one more crash) and its message comes back later."""
    from idemtasks import StoreUnavailable

    booked = h.tasks["booked_nowhere"]
    op = died(h.store, booked, (48,), k := key(), times=3)
    with pytest.raises(StoreUnavailable):  # eager mode raises what a worker would wait out
        booked.apply((48,), task_id=op.id, headers={"idemtasks": {"scope": op.scope, "key": k}}, throw=True)
    now = h.store.get_by_id(op.id)
    assert now is not None and now.status is Status.PENDING and now.crashes == 3
    assert h.runs[k] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_max_crashes_must_be_a_whole_number(bad: Any) -> None:
    app = Celery(f"bad{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(idemtasks_store_url="memory://", idemtasks_max_crashes=bad)

    @app.task(shared=False, base=IdempotentTask, bind=True, name=f"{app.main}.task")
    def task(self: IdempotentTask) -> None:
        raise AssertionError("never runs")

    with pytest.raises(ConfigurationError, match="max_crashes"):
        task.max_crashes  # noqa: B018 - binding reads and checks the settings


@pytest.mark.timeout(60)
def test_a_give_back_the_store_cannot_take_yet_is_sent_again_and_is_no_crash(tmp_path: Path) -> None:
    """A retry, a requeue or an outage gives the operation back while the store is down. Left to its lease, the
    operation would be taken over once that lapsed, and the takeover counted as a crash: the lease keeper sends the
    give-back again until it lands instead."""
    from idemtasks.execution import Attempt
    from idemtasks.stores.redis import RedisStore

    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    server = PrivateRedis(tmp_path, durable=True)  # stopped and started again with every write kept
    server.start()
    store = RedisStore(server.url, socket_timeout=0.5)
    try:
        held = store.claim("global", "k", "tasks.pay", "fp", owner="w1", lease=1.0, ttl=TTL).operation
        server.stop()
        Attempt(store, held, TTL, lease=1.0).release_quietly(delay=0.0)  # refused: the store is down
        time.sleep(1.5)  # the lease lapses meanwhile
        server.start()
        op = wait_until(lambda: (o := store.get("global", "k")) is not None and o.status is Status.PENDING and o,
                        10.0, "the give-back to land")
        assert op.crashes == 0 and op.fencing_token == held.fencing_token
        again = store.claim("global", "k", "tasks.pay", "fp", owner="w2", lease=1.0, ttl=TTL, grace=0.0)
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.crashes == 0
    finally:
        store.close()
        server.stop()


@pytest.mark.parametrize("how", ["as raised", "wrapped with from", "raised while handling it", "in a group"])
def test_what_a_cold_shutdowns_handler_raises_in_a_body_is_the_worker_going_away(how: str) -> None:
    """Celery's cold-shutdown handler runs on the main thread, which in a solo worker is the body's: what it raises
    there (the pool's refusal to cancel the job) is the worker going away, even if the body wrapped it."""
    from celery.apps.worker import _shutdown_handler
    from celery.worker import state

    from idemtasks.execution import _raised_by_cold_shutdown

    def cancel(worker: object) -> None:
        raise NotImplementedError("solo.TaskPool does not implement kill_job")

    group_of = getattr(builtins, "ExceptionGroup", None)
    if how == "in a group" and group_of is None:
        pytest.skip("exception groups came with Python 3.11")
    before, flag = signal.getsignal(signal.SIGQUIT), state.should_terminate
    # Celery's own handler, as it installs it for SIGQUIT (EX_FAILURE)
    _shutdown_handler(object(), sig="SIGQUIT", how="Cold", callback=cancel, exitcode=1, verbose=False)
    handler = signal.getsignal(signal.SIGQUIT)
    assert callable(handler)
    try:
        try:
            try:
                handler(signal.SIGQUIT, None)  # as the signal would, in the body's frame
            except NotImplementedError as exc:
                if how == "as raised":
                    raise
                if how == "wrapped with from":
                    raise RuntimeError("charge interrupted") from exc
                if how == "in a group":
                    caught = exc
                else:
                    raise RuntimeError("charge interrupted")  # noqa: B904 - the implicit context, on purpose
            # As asyncio.TaskGroup gathers its tasks' errors, once out of their handlers: no cause, no context.
            raise group_of("charge interrupted", [caught])
        except Exception as exc:
            assert _raised_by_cold_shutdown(exc)
        # A body's own failure meanwhile (a threads pool's bodies run on) is its own.
        assert not _raised_by_cold_shutdown(ValueError("declined"))
    finally:
        signal.signal(signal.SIGQUIT, before)
        state.should_terminate = flag
