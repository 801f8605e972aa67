"""The SQL store's clock: on MariaDB/MySQL the server's, in epoch seconds, whatever the session's time zone; on SQLite
the moment a write got the database's lock."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from idemtasks.models import ClaimOutcome, Status
from idemtasks.stores.sql import SQLStore

from .services import MYSQL_URL, require

pytestmark = pytest.mark.timeout(60)

def _store(init_command: str, *, own_engine: bool = False) -> SQLStore:
    require("mysql")
    table = f"t{uuid.uuid4().hex[:12]}"
    if own_engine:  # the caller's engine, which the store does not configure
        engine = sa.create_engine(MYSQL_URL, connect_args={"init_command": init_command})
        return SQLStore(MYSQL_URL, table=table, engine=engine)
    return SQLStore(MYSQL_URL, table=table, engine_options={"connect_args": {"init_command": init_command}})


@pytest.fixture
def stores() -> Iterator[list[SQLStore]]:
    made: list[SQLStore] = []
    yield made
    for store in made:
        store.table.drop(store.engine, checkfirst=True)
        store.close()
        store.engine.dispose()


def _session_zone(store: SQLStore) -> str:
    with store.engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT @@session.time_zone").scalar_one())


@pytest.mark.parametrize("own_engine", [False, True], ids=["engine_options", "own_engine"])
@pytest.mark.parametrize("zone", ["+05:00", "-03:30"])
def test_the_clock_is_epoch_seconds_in_any_session_time_zone(stores: list[SQLStore], zone: str,
                                                             own_engine: bool) -> None:
    store = _store(f"SET time_zone = '{zone}'", own_engine=own_engine)
    stores.append(store)
    assert _session_zone(store) == zone
    assert abs(store.now() - time.time()) < 2.0
    held = store.claim("s", "k1", "tasks.charge", "fp", owner="w1", lease=30.0, ttl=60.0)
    assert held.outcome is ClaimOutcome.CLAIMED
    op = held.operation
    assert op.lease_expires_at is not None and abs(op.lease_expires_at - (time.time() + 30.0)) < 2.0
    store.succeed(op, op.fencing_token, '"done"', ttl=60.0)
    got = store.get("s", "k1")
    assert got is not None and got.status is Status.SUCCEEDED and got.result == "done"


def test_the_clock_keeps_microseconds(stores: list[SQLStore]) -> None:
    store = _store("SET time_zone = '+05:00', timestamp = 1698539400.123456")  # NOW() and UTC_TIMESTAMP() fixed
    stores.append(store)
    assert store.now() == 1698539400.123456


def test_a_sqlite_claim_that_waited_for_the_write_lock_starts_its_lease_when_it_got_it(tmp_path: Path) -> None:
    """SQLite has one writer at a time, and a claim may wait up to the busy timeout (30 s) for the lock. Its lease
    runs from the moment it wrote, not from the moment it asked: read before the wait, a 10 s lease that waited 10 s
    would be over as soon as it was granted, and another worker could take the operation at once."""
    path = tmp_path / "store.sqlite3"
    store = SQLStore(f"sqlite:///{path}", table="ops")
    try:
        store.get("s", "k")  # the table exists before another connection takes the write lock
        writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        released: list[float] = []

        def release() -> None:
            time.sleep(1.5)
            released.append(time.time())
            writer.execute("COMMIT")

        thread = threading.Thread(target=release)
        thread.start()
        held = store.claim("s", "k", "tasks.charge", "fp", owner="w1", lease=10.0, ttl=60.0)
        thread.join()
        writer.close()

        op = held.operation
        assert held.outcome is ClaimOutcome.CLAIMED and released
        assert op.created_at >= released[0] - 0.01
        assert op.lease_expires_at is not None and op.lease_expires_at >= released[0] + 10.0 - 0.01
        assert op.lease_expires_at <= time.time() + 10.0
    finally:
        store.close()
        store.engine.dispose()


def test_a_mariadb_claim_that_waited_for_the_records_lock_starts_its_lease_when_it_got_it(
        stores: list[SQLStore]) -> None:
    """MariaDB's clock is fixed when a statement starts, before the locking read waits for the record's lock (held,
    here, by another transaction: up to innodb_lock_wait_timeout, 50 s by default). A claim that waited must not
    start its lease that far in the past, nor judge the record's lease by that old time."""
    store = _store("SET time_zone = '+00:00'")
    stores.append(store)
    first = store.claim("s", "k", "tasks.charge", "fp", owner="w1", lease=0.5, ttl=60.0).operation
    store.release(first, first.fencing_token, ttl=60.0)  # pending again: the next claim wins it
    released: list[float] = []
    locker = sa.create_engine(MYSQL_URL)
    try:
        with locker.connect() as conn:
            conn.execute(sa.text(f"SELECT id FROM {store.table.name} WHERE scope = 's' FOR UPDATE"))

            def release() -> None:
                time.sleep(1.5)
                released.append(time.time())
                conn.rollback()

            thread = threading.Thread(target=release)
            thread.start()
            held = store.claim("s", "k", "tasks.charge", "fp", owner="w2", lease=10.0, ttl=60.0)
            thread.join()
    finally:
        locker.dispose()

    op = held.operation
    assert held.outcome is ClaimOutcome.CLAIMED and op.lease_owner == "w2" and released
    assert op.lease_expires_at is not None and op.lease_expires_at >= released[0] + 10.0 - 0.05
    assert op.lease_expires_at <= time.time() + 10.0
