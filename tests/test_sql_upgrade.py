"""A table made by an earlier release (before the ``crashes`` column) keeps working after an upgrade.

Workers of the new release open the store on a table full of operations, some of them running: the column is added
in place, the rows already there count no crash yet, and processes starting together do not trip over each other.
"""

from __future__ import annotations

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
from idemtasks.stores.sql_schema import operations_table
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


def test_workers_upgrading_one_table_together_all_start(old_table: tuple[str, str]) -> None:
    url, name = old_table
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    stores: list[SQLStore] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(SQLStore(url, table=name))
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    assert errors == [] and len(stores) == 4
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
