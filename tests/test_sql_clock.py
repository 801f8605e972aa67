"""The SQL store's clock on MariaDB/MySQL: the server's, in epoch seconds, whatever the session's time zone."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

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
