"""A table made by an earlier release (before the ``crashes`` column) keeps working after an upgrade.

Workers of the new release open the store on a table full of operations, some of them running: the column is added
in place, the rows already there count no crash yet, and processes starting together do not trip over each other.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from idemtasks import StoreError, StoreUnavailable
from idemtasks.identity import key_digest
from idemtasks.models import ClaimOutcome, Status
from idemtasks.stores.sql import SQLStore
from idemtasks.stores.sql_schema import ALTER_LOCK_WAIT, add_missing_columns, operations_table
from tests import services

pytestmark = pytest.mark.timeout(90)

TTL = 3600.0


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def old_table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, table name) of an operations table as the first release created it, holding one running operation
    whose holder's lease lapsed long ago."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    else:
        services.require(request.param)
        url = services.POSTGRES_URL if request.param == "postgres" else services.MYSQL_URL
    yield from _old(url)


def _old(url: str) -> Iterator[tuple[str, str]]:
    name = f"old{uuid.uuid4().hex[:12]}"
    current = operations_table(sa.MetaData(), name)
    old = sa.Table(name, sa.MetaData(), *(c._copy() for c in current.c if c.name != "crashes"),
                   mysql_engine="InnoDB", mysql_charset="utf8mb4")
    engine = sa.create_engine(url)
    old.create(engine)
    now = time.time()
    digest = key_digest("global", "before-upgrade")
    with engine.begin() as conn:
        conn.execute(old.insert().values(
            id=digest + "ab" * 12, key_hash=digest, scope="global", idem_key="before-upgrade", task_name="tasks.pay",
            fingerprint="fp", status="running", attempts=1, fencing_token=1, lease_owner="old-worker",
            lease_expires_at=now - 600, created_at=now - 700, updated_at=now - 700, expires_at=now + TTL,
            needs_publish=False, payload='["tasks.pay",[],{}]'))
    try:
        yield url, name
    finally:
        old.drop(engine, checkfirst=True)
        engine.dispose()


def _columns(url: str, name: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(name)]
    finally:
        engine.dispose()


def test_opening_the_store_adds_the_column_and_old_rows_count_no_crash(old_table: tuple[str, str]) -> None:
    url, name = old_table
    store = SQLStore(url, table=name)
    try:
        assert _columns(url, name).count("crashes") == 1
        op = store.get("global", "before-upgrade")
        assert op is not None and op.status is Status.RUNNING and op.crashes == 0
        assert store.claim("global", "before-upgrade", "tasks.pay", "fp", owner="new-1", lease=30, ttl=TTL,
                           grace=0.0).outcome is ClaimOutcome.BUSY  # the first look only marks the lapsed lease
        taken = store.claim("global", "before-upgrade", "tasks.pay", "fp", owner="new-2", lease=30, ttl=TTL, grace=0.0)
        assert taken.outcome is ClaimOutcome.CLAIMED and taken.operation.crashes == 1
        fresh = store.create("global", "after-upgrade", "tasks.pay", "fp", ttl=TTL).operation
        assert fresh.crashes == 0
    finally:
        store.close()
    SQLStore(url, table=name).close()  # opening again finds nothing to add
    assert _columns(url, name).count("crashes") == 1


class Opening:
    """Four worker processes' stores opening one table together, each on its own thread."""

    def __init__(self, url: str, name: str, *, barrier: bool = True) -> None:
        self.stores: list[SQLStore] = []
        self.errors: list[BaseException] = []
        together = threading.Barrier(4) if barrier else None

        def start() -> None:
            if together is not None:
                together.wait()
            try:
                self.stores.append(SQLStore(url, table=name))
            except BaseException as exc:  # collected and asserted on by the test
                self.errors.append(exc)

        self.threads = [threading.Thread(target=start) for _ in range(4)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        for t in self.threads:
            t.join()
        for store in self.stores:
            store.close()
        assert self.errors == [] and len(self.stores) == 4


def test_workers_upgrading_one_table_together_all_start(old_table: tuple[str, str]) -> None:
    url, name = old_table
    Opening(url, name).finish()
    assert _columns(url, name).count("crashes") == 1


def test_without_schema_creation_an_old_table_is_a_clear_store_error(old_table: tuple[str, str]) -> None:
    """``create_schema=False`` leaves the schema to the application's migrations: until the column is added, each
    claim fails with an error that names it, and changes nothing."""
    url, name = old_table
    store = SQLStore(url, table=name, create_schema=False)
    try:
        with pytest.raises(StoreError, match="crashes") as info:
            store.claim("global", "k", "tasks.pay", "fp", owner="w", lease=30, ttl=TTL)
        assert not isinstance(info.value, StoreUnavailable)  # a fault to fix, not an outage to wait out
    finally:
        store.close()
    assert "crashes" not in _columns(url, name)


@pytest.fixture
def old_postgres_table() -> Iterator[tuple[str, str]]:
    services.require("postgres")
    yield from _old(services.POSTGRES_URL)


def test_workers_that_lose_the_race_to_add_the_column_all_start(tmp_path: Path) -> None:
    """Forced on SQLite: a writer holds the database while four stores open. Reading the schema is not blocked (WAL),
    so each of them finds the column missing and waits in its ALTER; one adds it, the other three fail (the column
    exists by then) and must find it there rather than fail to open."""
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    url = f"sqlite:///{path}"
    old = _old(url)
    _, name = next(old)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the write lock, as a long write transaction holds it
    opening = Opening(url, name, barrier=False)
    time.sleep(1.5)  # all four have read the schema and wait for the write lock (a 30 s busy timeout)
    writer.execute("COMMIT")
    writer.close()
    opening.finish()
    assert _columns(url, name).count("crashes") == 1
    old.close()


def test_a_long_reader_makes_the_upgrade_wait_in_short_turns_not_stall_the_store(
        old_postgres_table: tuple[str, str]) -> None:
    """The ALTER needs the table to itself; queued behind a long reader, it would hold up every statement of every
    worker behind it. Its wait is bounded (ALTER_LOCK_WAIT), so statements get through between its tries, and if the
    table stays busy the upgrade gives up (the store opens again on next use) instead of hanging."""
    url, name = old_postgres_table
    reader = sa.create_engine(url)
    other = sa.create_engine(url)
    table = operations_table(sa.MetaData(), name)
    with reader.begin() as long_read:
        long_read.execute(sa.text(f'SELECT count(*) FROM "{name}"'))  # holds its share of the table
        upgrade_errors: list[BaseException] = []

        def upgrade() -> None:
            upgrader = sa.create_engine(url)
            try:
                add_missing_columns(upgrader, table, attempts=2)
            except BaseException as exc:  # collected and asserted on below
                upgrade_errors.append(exc)
            finally:
                upgrader.dispose()

        started = time.monotonic()
        thread = threading.Thread(target=upgrade)
        thread.start()
        waits = []
        while thread.is_alive():
            t0 = time.monotonic()
            with other.connect() as conn:  # a worker's statement, while the ALTER waits for its turn
                conn.execute(sa.text(f'SELECT count(*) FROM "{name}"'))
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        thread.join()
    assert len(upgrade_errors) == 1 and "lock timeout" in str(upgrade_errors[0])
    assert time.monotonic() - started < 4 * ALTER_LOCK_WAIT + 3
    assert max(waits) < ALTER_LOCK_WAIT + 1.5
    assert "crashes" not in _columns(url, name)
    reader.dispose()
    other.dispose()


def test_the_upgrade_leaves_no_lock_setting_on_the_pooled_connection(old_postgres_table: tuple[str, str]) -> None:
    url, name = old_postgres_table
    store = SQLStore(url, table=name)
    try:
        assert store.engine.pool.checkedin() == 1  # the connection the upgrade used, back in the pool
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW lock_timeout")).scalar_one() == "0"
    finally:
        store.close()
