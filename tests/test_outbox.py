"""Transactional enqueue: the operation commits or rolls back with the handler's own rows."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish

from idemtasks import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdempotentTask,
    Status,
    StoreError,
    StoreUnavailable,
)
from idemtasks.config import ACCEPT_WINDOW
from idemtasks.identity import fingerprint_of_call, stored_call
from idemtasks.outbox import Outbox
from idemtasks.recovery import Sweeper
from idemtasks.stores.base import Store
from idemtasks.stores.memory import MemoryStore
from idemtasks.stores.sql import SQLStore
from idemtasks.task import stored_deadline, with_deadline
from tests.conftest import drop, make_store


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    store = make_store(request.param, tmp_path)
    assert isinstance(store, SQLStore)
    yield store
    drop(store)


def setup(store: SQLStore) -> tuple[Celery, Any, sa.Table, Counter[str]]:
    app = Celery(f"ob{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_ignore_result=True, idemtasks_pending_after=0.3, task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, store_url=store, name=f"{app.main}.ship")
    def ship(order: str) -> str:
        runs[order] += 1
        return f"shipped {order}"

    orders = sa.Table(f"orders_{uuid.uuid4().hex[:8]}", sa.MetaData(), sa.Column("id", sa.String(64)))
    orders.create(store.engine)
    return app, ship, orders, runs


def count(store: SQLStore, orders: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one())


def final(store: SQLStore, op_id: str) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        op = store.get_by_id(op_id)
        if op is not None and op.is_final:
            return op
        time.sleep(0.05)
    raise AssertionError(f"{op_id} did not finish")


def test_commit_then_publish_runs_the_task_once(sql_store: SQLStore) -> None:
    app, ship, orders, runs = setup(sql_store)
    outbox = Outbox(sql_store)
    with sql_store.engine.begin() as conn:
        conn.execute(orders.insert().values(id="o1"))
        staged = outbox.stage(conn, ship, ("o1",), key="order-o1")
    with start_worker(app, pool="solo", perform_ping_check=False):
        staged.publish()
        op = final(sql_store, staged.operation.id)
    assert op.status is Status.SUCCEEDED and op.result == "shipped o1" and runs["o1"] == 1
    assert count(sql_store, orders) == 1


def test_rollback_leaves_neither_rows_nor_operation(sql_store: SQLStore) -> None:
    _, ship, orders, _ = setup(sql_store)
    outbox = Outbox(sql_store)
    with pytest.raises(RuntimeError), sql_store.engine.begin() as conn:
        conn.execute(orders.insert().values(id="o2"))
        staged = outbox.stage(conn, ship, ("o2",), key="order-o2")
        raise RuntimeError("the handler failed after staging")
    assert count(sql_store, orders) == 0
    assert sql_store.get_by_id(staged.operation.id) is None


def test_committed_but_never_published_is_published_by_recovery(sql_store: SQLStore) -> None:
    app, ship, _, runs = setup(sql_store)
    with sql_store.engine.begin() as conn:
        staged = Outbox(sql_store).stage(conn, ship, ("o3",), key="order-o3")
    time.sleep(0.4)  # the process died before staged.publish()
    with start_worker(app, pool="solo", perform_ping_check=False):
        assert staged.operation.id in Sweeper(app).sweep().republished
        op = final(sql_store, staged.operation.id)
    assert op.status is Status.SUCCEEDED and runs["o3"] == 1


def test_repeat_in_a_later_transaction_replays_and_mismatch_is_refused(sql_store: SQLStore) -> None:
    _, ship, _, _ = setup(sql_store)
    outbox = Outbox(sql_store)
    with sql_store.engine.begin() as conn:
        first = outbox.stage(conn, ship, ("o4",), key="order-o4")
    first.publish()
    with sql_store.engine.begin() as conn:
        again = outbox.stage(conn, ship, ("o4",), key="order-o4")
        assert not again.created and again.operation.id == first.operation.id
        with pytest.raises(IdempotencyKeyMismatch):
            outbox.stage(conn, ship, ("o5",), key="order-o4")


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_double_click_whose_second_transaction_began_first_is_told_to_try_again(isolation: str,
                                                                                   tmp_path: Path) -> None:
    """PostgreSQL above READ COMMITTED: the second handler's snapshot predates the first one's commit, so the key
    collides with a record it cannot read. Neither a replay nor a mismatch can be told from there: StoreUnavailable
    (a 503, retried), not a raw driver error; its next transaction sees the record and replays it."""
    store = make_store("postgres", tmp_path)
    assert isinstance(store, SQLStore)
    engine = sa.create_engine(store.engine.url.render_as_string(hide_password=False), isolation_level=isolation)
    try:
        _, ship, _, _ = setup(store)
        outbox = Outbox(store)
        with pytest.raises(StoreUnavailable, match="try again"), engine.begin() as second:
            second.execute(sa.text("SELECT 1"))  # its snapshot
            with engine.begin() as first:
                staged = outbox.stage(first, ship, ("o7",), key="order-o7")
            outbox.stage(second, ship, ("o7",), key="order-o7")
        staged.publish()  # the first handler's, after its commit
        _published(store, staged.operation.id)
        with engine.begin() as retried:
            again = outbox.stage(retried, ship, ("o7",), key="order-o7")
        assert not again.created and again.operation.id == staged.operation.id
    finally:
        engine.dispose()
        drop(store)


def test_a_constraint_other_than_the_key_is_the_statements_fault_not_a_reason_to_retry(tmp_path: Path) -> None:
    """A table a migration left with a column the store does not fill: StoreError (a 500, with the cause in the
    log), not the StoreUnavailable of a key committed by a later transaction, which clients would retry for ever."""
    store = make_store("postgres", tmp_path)
    assert isinstance(store, SQLStore)
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text(f'ALTER TABLE "{store.table.name}" ADD COLUMN tenant TEXT NOT NULL'))
        _, ship, _, _ = setup(store)
        with pytest.raises(StoreError) as raised, store.engine.begin() as conn:
            Outbox(store).stage(conn, ship, ("o8",), key="order-o8")
        assert not isinstance(raised.value, StoreUnavailable) and "tenant" in str(raised.value)
    finally:
        drop(store)


@pytest.mark.parametrize("own_engine", [False, True], ids=["stores_engine", "applications_engine"])
def test_staged_before_the_handlers_first_write_a_rollback_leaves_neither(sql_store: SQLStore,
                                                                           own_engine: bool) -> None:
    """Python's sqlite3 driver begins a transaction only at the first write: a savepoint taken before it would start
    one of its own, and its release would commit the operation whatever the handler's transaction does next. Also
    on an engine the application built itself, which idemtasks does not configure."""
    _, ship, orders, _ = setup(sql_store)
    engine = sa.create_engine(sql_store.engine.url) if own_engine else sql_store.engine
    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            staged = Outbox(sql_store).stage(conn, ship, ("o6",), key="order-o6")
            conn.execute(orders.insert().values(id="o6"))
            raise RuntimeError("the handler failed after staging")
    finally:
        if own_engine:
            engine.dispose()
    assert count(sql_store, orders) == 0
    assert sql_store.get_by_id(staged.operation.id) is None


class _TracedMemory(MemoryStore):
    """A subclass an application might make: still not SQL."""


class TestTheTasksStore:
    """Workers claim, and recovery looks, in the task's own store: an operation staged in another one and not published
    before a crash would never be seen. Decided on the configuration, without opening the task's store."""

    def _task(self, store_url: Any) -> Any:
        app = Celery(f"ob{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

        @app.task(shared=False, base=IdempotentTask, store_url=store_url, name=f"{app.main}.ship")
        def ship(order: str) -> str:
            return order

        return ship

    @pytest.mark.parametrize("store_url", ["redis://127.0.0.1:1/0", "memory://", MemoryStore(), _TracedMemory(),
                                           "idemtasks.sqlite3"],
                             ids=["redis_url", "memory_url", "memory_store", "memory_subclass", "no_scheme"])
    def test_a_task_on_a_store_that_is_not_sql_is_refused(self, tmp_path: Path, store_url: Any) -> None:
        outbox = Outbox(SQLStore(f"sqlite:///{tmp_path}/app.db"))
        task = self._task(store_url)
        with outbox.store.engine.begin() as conn, pytest.raises(ConfigurationError, match="not SQL"):
            outbox.stage(conn, task, ("o1",), key="order-o1")
        assert outbox.store.get(task.idempotency_scope, "order-o1") is None

    def test_a_task_given_a_url_uses_the_default_table_so_another_outbox_table_is_refused(
            self, tmp_path: Path) -> None:
        outbox = Outbox(SQLStore(f"sqlite:///{tmp_path}/app.db", table="orders_outbox"))
        with outbox.store.engine.begin() as conn, \
                pytest.raises(ConfigurationError, match="give the task this outbox's store"):
            outbox.stage(conn, self._task(f"sqlite:///{tmp_path}/app.db"), ("o1",), key="order-o1")

    def test_a_store_it_does_not_know_may_be_the_outboxs_and_passes(self, tmp_path: Path) -> None:
        """A wrapper (for metrics, say) that delegates to the outbox's store."""
        outbox = Outbox(SQLStore(f"sqlite:///{tmp_path}/app.db"))
        wrapper_class = type("Wrapper", (Store,), {"url": outbox.store.url})
        wrapper_class.__abstractmethods__ = frozenset()  # its calls would go to the outbox's store: none made here
        wrapper = wrapper_class()
        with outbox.store.engine.begin() as conn:
            assert outbox.stage(conn, self._task(wrapper), ("o1",), key="order-o1").created

    def test_a_task_on_another_table_is_refused(self, tmp_path: Path) -> None:
        outbox = Outbox(SQLStore(f"sqlite:///{tmp_path}/app.db"))
        other = SQLStore(f"sqlite:///{tmp_path}/app.db", table="other_operations")
        with outbox.store.engine.begin() as conn, pytest.raises(ConfigurationError, match="other_operations"):
            outbox.stage(conn, self._task(other), ("o1",), key="order-o1")

    def test_the_same_table_named_by_a_url_spelled_otherwise_is_accepted(self, tmp_path: Path) -> None:
        outbox = Outbox(SQLStore(f"sqlite:///{tmp_path}/app.db"))
        task = self._task(f"sqlite+pysqlite:///{tmp_path}/app.db")
        with outbox.store.engine.begin() as conn:
            staged = outbox.stage(conn, task, ("o1",), key="order-o1")
        assert staged.created and outbox.store.get_by_id(staged.operation.id) is not None


@pytest.mark.parametrize("service", ["postgres", "mysql"])
def test_a_repeat_staged_in_an_open_transaction_leaves_the_running_holder_free(service: str, tmp_path: Path) -> None:
    """The handler's transaction stays open after staging a repeat of an operation a worker runs. The repeat only
    reads the record: a row lock would hold the holder's renewals and completion until that transaction ended (and
    each renewal given up and sent again left one more connection waiting on the server, until none were left)."""
    store = make_store(service, tmp_path)
    assert isinstance(store, SQLStore)
    try:
        _, ship, _, _ = setup(store)
        outbox = Outbox(store)
        with store.engine.begin() as conn:
            staged = outbox.stage(conn, ship, ("o8",), key="order-o8").operation
        held = store.claim(staged.scope, staged.key, ship.name, staged.fingerprint, owner="w", lease=30,
                           ttl=3600).operation
        with store.engine.begin() as conn:
            again = outbox.stage(conn, ship, ("o8",), key="order-o8")
            assert not again.created and again.operation.id == staged.id
            started = time.monotonic()
            assert store.renew(held, held.fencing_token, lease=30, ttl=3600)
            store.succeed(held, held.fencing_token, '"shipped o8"', ttl=3600)
            assert time.monotonic() - started < 2
        op = store.get_by_id(staged.id)
        assert op is not None and op.status is Status.SUCCEEDED
    finally:
        drop(store)


@pytest.fixture
def mariadb_repeatable_read(tmp_path: Path) -> Iterator[tuple[SQLStore, sa.Engine, Any, Outbox]]:
    """A MariaDB store, and an application's engine at REPEATABLE READ (MariaDB's default, which such an engine
    keeps; the store's own runs at READ COMMITTED), the task and the outbox."""
    store = make_store("mysql", tmp_path)
    assert isinstance(store, SQLStore)
    engine = sa.create_engine(store.engine.url.render_as_string(hide_password=False), isolation_level="REPEATABLE READ")
    try:
        _, ship, _, _ = setup(store)
        yield store, engine, ship, Outbox(store)
    finally:
        engine.dispose()
        drop(store)


def test_a_mariadb_double_click_whose_second_transaction_began_first_replays(
        mariadb_repeatable_read: tuple[SQLStore, sa.Engine, Any, Outbox]) -> None:
    """The second handler's snapshot predates the first one's commit, and a plain read cannot see the record it
    collided with. The read under a lock sees the latest version: a replay."""
    store, engine, ship, outbox = mariadb_repeatable_read
    with engine.begin() as second:
        second.execute(sa.select(sa.func.count()).select_from(store.table)).scalar_one()  # its snapshot
        with engine.begin() as first:
            staged = outbox.stage(first, ship, ("o9",), key="order-o9")
        staged.publish()
        assert second.execute(sa.select(store.table.c.id)).all() == []  # the snapshot, older than the commit
        again = outbox.stage(second, ship, ("o9",), key="order-o9")
    assert not again.created and again.operation.id == staged.operation.id


def test_a_repeat_at_repeatable_read_decides_on_the_latest_record_not_its_snapshot(
        mariadb_repeatable_read: tuple[SQLStore, sa.Engine, Any, Outbox]) -> None:
    """The handler's snapshot holds a record that was abandoned (its publish failed) and made again by the client's
    retry for another payload since. Decided on the snapshot, the retry's payload would be refused as a mismatch
    against a record that no longer exists (and the first payload replayed, its call never run)."""
    store, engine, ship, outbox = mariadb_repeatable_read
    with engine.begin() as conn:
        first = outbox.stage(conn, ship, ("o10",), key="order-o10").operation
    with engine.begin() as handler:
        handler.execute(sa.select(store.table.c.id)).all()  # its snapshot holds the first record
        store.abandon(first)
        with engine.begin() as conn:
            staged = outbox.stage(conn, ship, ("o11",), key="order-o10")
        staged.publish()
        retried = staged.operation
        again = outbox.stage(handler, ship, ("o11",), key="order-o10")
        assert not again.created and again.operation.id == retried.id
        with pytest.raises(IdempotencyKeyMismatch):
            outbox.stage(handler, ship, ("o10",), key="order-o10")


def _published(store: SQLStore, op_id: str) -> None:
    """Wait for the "published" mark, which the store may send without waiting for its answer: a transaction that
    takes its snapshot before the mark commits is told to try again by its next locking read (PostgreSQL)."""
    deadline = time.monotonic() + 10
    while (op := store.get_by_id(op_id)) is not None and op.needs_publish and time.monotonic() < deadline:
        time.sleep(0.01)
    assert op is not None and not op.needs_publish


def _created_by_a_submit(store: SQLStore, ship: Any, order: str, key: str) -> Any:
    """The record as a ``submit`` of the same call has left it by the time its publish is under way: created, and
    flagged unpublished."""
    call = ship.call_of((order,), None, store)
    return store.create(SCOPE, key, ship.name, fingerprint_of_call(call), ttl=3600,
                        payload=stored_call(call, with_deadline(ship, {}))).operation


SCOPE = "orders"


@pytest.mark.parametrize("then", ["published", "removed"])
def test_a_repeat_of_a_record_not_published_yet_is_told_to_try_again(sql_store: SQLStore, then: str) -> None:
    """A submit elsewhere created the key's record and is still publishing it. Should its publish fail, it removes
    the record, so that its client's retry starts afresh: rows committed beside a replay of it would name an operation
    that is gone. The handler is told to roll back and try again (HTTP answers such a repeat 409); by then the record
    is published, and the repeat replays it, or removed, and the repeat records its own."""
    _, ship, orders, _ = setup(sql_store)
    outbox = Outbox(sql_store)
    submitted = _created_by_a_submit(sql_store, ship, "o12", "order-o12")
    with pytest.raises(StoreUnavailable, match="try again"), sql_store.engine.begin() as conn:
        conn.execute(orders.insert().values(id="o12"))
        outbox.stage(conn, ship, ("o12",), key="order-o12", scope=SCOPE)
    assert count(sql_store, orders) == 0
    if then == "published":
        sql_store.mark_published(submitted)
    else:
        sql_store.abandon(submitted)  # its publish failed
    with sql_store.engine.begin() as conn:
        conn.execute(orders.insert().values(id="o12"))
        staged = outbox.stage(conn, ship, ("o12",), key="order-o12", scope=SCOPE)
    assert staged.created is (then == "removed")
    assert (staged.operation.id == submitted.id) is (then == "published")
    assert sql_store.get_by_id(staged.operation.id) is not None


def test_a_repeat_of_a_record_left_unpublished_past_the_accept_window_replays(sql_store: SQLStore) -> None:
    """Its creator died before publishing it, and no submit removes a record that old: recovery publishes it."""
    _, ship, _, _ = setup(sql_store)
    submitted = _created_by_a_submit(sql_store, ship, "o13", "order-o13")
    with sql_store.engine.begin() as conn:  # created ACCEPT_WINDOW ago
        t = sql_store.table
        conn.execute(t.update().where(t.c.id == submitted.id).values(created_at=t.c.created_at - ACCEPT_WINDOW))
        staged = Outbox(sql_store).stage(conn, ship, ("o13",), key="order-o13", scope=SCOPE)
    assert not staged.created and staged.operation.id == submitted.id


def test_a_staged_operation_keeps_the_tasks_own_deadline_as_a_submitted_one_does(sql_store: SQLStore) -> None:
    """The task's ``expires`` is stored with the operation as a time, and the message published after the commit
    carries that time, not one counted from the publish: recovery fails an operation past it instead of running it
    late, and its copies carry the same deadline."""
    _, ship, _, _ = setup(sql_store)
    ship.expires = 60
    with sql_store.engine.begin() as conn:
        staged = Outbox(sql_store).stage(conn, ship, ("o14",), key="order-o14")
    stored = sql_store.get_by_id(staged.operation.id)
    assert stored is not None and stored_deadline(stored) is not None
    deadline = datetime.fromisoformat(stored_deadline(stored))
    assert abs(deadline.timestamp() - (time.time() + 60)) < 5
    sent: list[Any] = []

    def watch(headers: dict[str, Any] | None = None, **_: Any) -> None:
        sent.append((headers or {}).get("expires"))

    time.sleep(1.1)  # a deadline counted from the publish would differ by this much
    before_task_publish.connect(watch, weak=False)
    try:
        staged.publish()
    finally:
        before_task_publish.disconnect(watch)
    assert len(sent) == 1 and datetime.fromisoformat(sent[0]) == deadline
