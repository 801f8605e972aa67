"""Transactional tasks whose body fails while a zombie holder (lease lost, still running) commits its effects."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from idemtasks import IdempotentTask, IdemtasksError, OperationFailed, Status
from idemtasks.effects import EffectsLedger, failure_of, ledger_for
from idemtasks.identity import fingerprint
from idemtasks.models import Operation
from idemtasks.stores.base import Store
from tests import services
from tests.conftest import drop, make_store


@dataclass
class Rig:
    store: Store
    ledger: EffectsLedger
    task: Any
    runs: Counter[str] = field(default_factory=Counter)
    #: What the body does before it raises, with the zombie's claim (set by the test).
    meanwhile: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(params=["postgres", "sqlite"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    store = make_store(request.param, tmp_path)
    url = services.POSTGRES_URL if request.param == "postgres" else f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    app = Celery(f"tx{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=app.main)
    runs: Counter[str] = Counter()
    meanwhile: dict[str, Any] = {}

    # A short lease: the takeover from a zombie waits for the grace after its lapsed lease, max(2 s, lease / 3).
    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", transactional=True,
              transaction_url=url, lease_seconds=1.0)
    def pay(self: IdempotentTask, order: int) -> int:
        runs[self.operation.key] += 1
        action = meanwhile.pop(self.operation.key, None)
        if action is not None:
            action()
        raise RuntimeError(f"order {order} declined")

    yield Rig(store, ledger_for(url), pay, runs, meanwhile)
    drop(store)


def _zombie(rig: Rig, key: str, order: int) -> Operation:
    """An operation claimed by a holder whose lease then ran out (it is presumed dead, but keeps running)."""
    fp = fingerprint(rig.task.name, (order,), {})
    rig.store.create("global", key, rig.task.name, fp, ttl=3600)
    zombie = rig.store.claim("global", key, rig.task.name, fp, owner="zombie", lease=0.3, ttl=3600).operation
    time.sleep(0.5)
    return zombie


def _zombie_commits(rig: Rig, zombie: Operation, result_json: str) -> str | None:
    """The zombie's transaction: its effects and its marker, committed unless the marker collides."""
    with rig.ledger.transaction() as conn:
        return rig.ledger.record(conn, zombie.id, zombie.fencing_token, result_json)


def _run(rig: Rig, zombie: Operation, order: int) -> Any:
    # apply() runs the delivery through the claim in this thread: it takes over from the zombie.
    headers = {"idemtasks": {"scope": zombie.scope, "key": zombie.key}}
    return rig.task.apply((order,), task_id=zombie.id, headers=headers)


@pytest.mark.parametrize("rig", ["postgres"], indirect=True)
def test_a_zombie_commit_during_a_failing_takeover_is_adopted(rig: Rig) -> None:
    """(Not on SQLite: there the body's transaction holds the database's write lock from its start, so a zombie's
    commit waits until the body's transaction has ended, and cannot land in the middle of it.)"""
    zombie = _zombie(rig, key := f"order-{uuid.uuid4().hex}", 1)
    # While the new holder's body runs (and finds nothing in the ledger), the zombie commits; then the body fails.
    rig.meanwhile[key] = lambda: _zombie_commits(rig, zombie, '"A"')
    outcome = _run(rig, zombie, 1)
    assert outcome.result == "A"
    op = rig.store.get("global", key)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == "A"
    assert op.fencing_token == zombie.fencing_token + 1
    assert rig.runs[key] == 1


def test_a_sealed_failure_refuses_the_zombies_late_commit(rig: Rig) -> None:
    zombie = _zombie(rig, key := f"order-{uuid.uuid4().hex}", 2)
    outcome = _run(rig, zombie, 2)
    assert isinstance(outcome.result, RuntimeError)
    op = rig.store.get("global", key)
    assert op is not None and op.status is Status.FAILED
    assert op.error is not None and op.error.type == "RuntimeError"
    # The zombie's commit collides with the sealed failure: its transaction rolls back, nothing of it is committed.
    prior = _zombie_commits(rig, zombie, '"A"')
    assert prior is not None and failure_of(prior) == ("RuntimeError", "order 2 declined")
    marker = rig.ledger.lookup(zombie.id)
    assert marker is not None and failure_of(marker) is not None
    assert rig.runs[key] == 1


def test_a_takeover_after_a_sealed_failure_stores_that_failure_without_running(rig: Rig) -> None:
    """A holder sealed its failure and died before storing it: the next one stores it, and runs nothing."""
    zombie = _zombie(rig, key := f"order-{uuid.uuid4().hex}", 3)
    rig.ledger.seal_failure(zombie.id, zombie.fencing_token, "Declined", "card declined")
    outcome = _run(rig, zombie, 3)
    assert isinstance(outcome.result, OperationFailed)
    op = rig.store.get("global", key)
    assert op is not None and op.status is Status.FAILED
    assert op.error is not None and (op.error.type, op.error.message) == ("Declined", "card declined")
    assert rig.runs[key] == 0


def test_on_sqlite_a_savepoint_before_the_bodys_first_write_is_part_of_its_transaction(tmp_path: Path) -> None:
    """Python's sqlite3 driver begins a transaction only at the first write, so a savepoint taken before it (a body
    catching a duplicate key around its first insert) would start one of its own, and its release would commit it:
    the body's failure, or a takeover's rollback, would leave that write behind, and a second attempt would make it
    twice. Every statement of the body is in the one transaction that commits with its marker, or rolls back."""
    ledger = EffectsLedger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    accounts.create(ledger.engine)
    try:
        with pytest.raises(RuntimeError), ledger.transaction() as conn:
            with conn.begin_nested():
                conn.execute(accounts.insert().values(id=1))
            raise RuntimeError("declined after the first write")
        with ledger.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one() == 0
    finally:
        ledger.engine.dispose()


def test_on_sqlite_a_body_that_reads_then_writes_waits_for_another_writer(tmp_path: Path) -> None:
    """Its reads are in its transaction now; a deferred transaction that has read cannot wait for the write lock when
    it comes to write, and would fail at once whenever a worker's claim or completion held it for a moment. The
    body takes the lock as it begins, waiting its turn as any writer does."""
    path = tmp_path / "ledger.sqlite3"
    ledger = EffectsLedger(f"sqlite:///{path}")
    accounts = sa.Table("accounts", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    accounts.create(ledger.engine)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # a worker's write, under way
    commit = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    commit.start()
    try:
        with ledger.transaction() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one() == 0
            conn.execute(accounts.insert().values(id=1))
        with ledger.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one() == 1
    finally:
        commit.join()
        other.close()
        ledger.engine.dispose()


def test_on_sqlite_the_ledger_table_is_created_while_another_writer_holds_the_database(tmp_path: Path) -> None:
    """Creating a missing table is a read, then CREATE: it waits for the write lock like any write, rather than
    fail at once and run out of its few quick retries."""
    path = tmp_path / "ledger.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode=WAL")  # as the store leaves a database it opened
    other.execute("CREATE TABLE app (i INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    commit = threading.Timer(1.5, lambda: other.execute("COMMIT"))
    commit.start()
    try:
        ledger = EffectsLedger(f"sqlite:///{path}")
        assert sa.inspect(ledger.engine).has_table(ledger.table.name)
        ledger.engine.dispose()
    finally:
        commit.join()
        other.close()


@pytest.fixture(params=["postgres", "sqlite"])
def paying(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Any, sa.Table, Any]]:
    """An eager app whose transactional task's body is given as ``body(self, order)``, on a store and ledger of
    ``request.param``; yields the store, the task, the business table and a setter for the body."""
    store = make_store(request.param, tmp_path)
    url = services.POSTGRES_URL if request.param == "postgres" else f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = ledger_for(url)
    orders = sa.Table(f"orders_{uuid.uuid4().hex[:8]}", sa.MetaData(), sa.Column("id", sa.String(40), unique=True))
    orders.create(ledger.engine)
    app = Celery(f"tx{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.task_always_eager = True
    body: dict[str, Any] = {}

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", transactional=True,
              transaction_url=url)
    def pay(self: IdempotentTask, order: str) -> str:
        return str(body["run"](self, order))

    try:
        yield store, pay, orders, lambda run: body.__setitem__("run", run)
    finally:
        orders.drop(ledger.engine)
        drop(store)


def _rows(pay: Any, orders: sa.Table) -> list[str]:
    with ledger_for(pay.transaction_url).engine.connect() as conn:
        return list(conn.execute(sa.select(orders.c.id)).scalars())


@pytest.mark.parametrize(("end", "caught"), [("commit", False), ("rollback", False), ("commit", True)])
def test_a_body_that_ends_its_own_transaction_is_refused_and_commits_nothing(
        paying: tuple[Store, Any, sa.Table, Any], end: str, caught: bool) -> None:
    """The transaction commits with the marker: a body's own commit would keep its writes without it, so that the
    operation could fail, or its holder die, and run again, writing them twice. Refused, even when the body
    catches the refusal and goes on; and the connection does not go back to the pool in its open transaction."""
    store, pay, orders, set_body = paying
    runs: list[str] = []

    def body(task: IdempotentTask, order: str) -> str:
        runs.append(order)
        task.connection.execute(orders.insert().values(id=order))
        if caught:
            with contextlib.suppress(IdemtasksError):
                getattr(task.connection, end)()
        else:
            getattr(task.connection, end)()
        return order

    set_body(body)
    op = store.get_by_id(pay.submit(("o-1",), key="order-1").operation.id)
    assert op is not None and op.status is Status.FAILED and op.error is not None
    assert op.error.type == "IdemtasksError"
    assert ("must not commit self.connection" if end == "commit" else "rolled back self.connection") in op.error.message
    assert runs == ["o-1"] and _rows(pay, orders) == []
    set_body(lambda task, order: task.connection.execute(orders.insert().values(id=order)) and order)
    # The pooled connection came back clean: the next body's writes commit, and only them.
    again = store.get_by_id(pay.submit(("o-2",), key="order-2").operation.id)
    assert again is not None and again.status is Status.SUCCEEDED and _rows(pay, orders) == ["o-2"]


def test_an_orm_session_on_the_bodys_connection_keeps_the_bodys_own_failure(
        paying: tuple[Store, Any, sa.Table, Any]) -> None:
    """A Session bound to self.connection rolls the connection's transaction back as the body's exception unwinds:
    the body's error stands (and is retried under retry_on), and the next attempt commits once."""
    store, pay, orders, set_body = paying
    pay.retry_on = (LookupError,)
    runs: list[str] = []

    def body(task: IdempotentTask, order: str) -> str:
        runs.append(order)
        with Session(bind=task.connection) as session, session.begin():
            session.execute(orders.insert().values(id=order))
            if len(runs) == 1:
                raise LookupError("card issuer busy")
        return order

    set_body(body)
    op = store.get_by_id(pay.submit(("o-3",), key="order-3").operation.id)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == "o-3"
    assert runs == ["o-3", "o-3"] and _rows(pay, orders) == ["o-3"]


def test_a_body_that_catches_its_own_failed_statement_on_postgresql_fails_with_the_reason(
        paying: tuple[Store, Any, sa.Table, Any]) -> None:
    """PostgreSQL aborts the whole transaction at a failed statement; a body that catches the error and goes on
    cannot commit. Its failure says why and what to do, rather than show the marker's own SAVEPOINT failing."""
    store, pay, orders, set_body = paying

    def body(task: IdempotentTask, order: str) -> str:
        task.connection.execute(orders.insert().values(id=order))
        # (A savepoint around it, conn.begin_nested(), would have kept the transaction usable.)
        with contextlib.suppress(sa.exc.IntegrityError):
            task.connection.execute(orders.insert().values(id=order))
        return order

    set_body(body)
    op = store.get_by_id(pay.submit(("o-2",), key="order-2").operation.id)
    assert op is not None
    if "sqlite" in pay.transaction_url:  # SQLite goes on after a failed statement: the first insert commits
        assert op.status is Status.SUCCEEDED and _rows(pay, orders) == ["o-2"]
        return
    assert op.status is Status.FAILED and op.error is not None and op.error.type == "StoreError"
    assert "begin_nested" in op.error.message and "SAVEPOINT" not in op.error.message
    assert _rows(pay, orders) == []
