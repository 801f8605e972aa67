"""Purging expired records from a SQL table, which must outlast the expiry by as long as Redis keeps a key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from idemtasks.models import ClaimOutcome
from idemtasks.stores import redis_scripts
from idemtasks.stores.sql import PURGE_GRACE, SQLStore
from tests.conftest import drop, make_store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["postgres", "sqlite", "mysql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    store = make_store(request.param, tmp_path)
    assert isinstance(store, SQLStore)
    yield store
    drop(store)


def _claim(store: SQLStore, key: str, *, ttl: float) -> ClaimOutcome:
    return store.claim("s", key, "tasks.charge", "fp", owner=uuid.uuid4().hex, lease=0.2, ttl=ttl).outcome


def _keys(store: SQLStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(store.table.c.idem_key)).scalars())


def test_the_grace_is_as_long_as_redis_keeps_an_expired_key() -> None:
    assert f"local KEEP_MS = {int(PURGE_GRACE * 1000)}\n" in redis_scripts.CLAIM


def test_purge_deletes_only_records_expired_for_longer_than_the_grace(sql_store: SQLStore) -> None:
    assert _claim(sql_store, "old", ttl=0.3) is ClaimOutcome.CLAIMED
    time.sleep(1.0)
    assert _claim(sql_store, "recent", ttl=0.3) is ClaimOutcome.CLAIMED
    sql_store.create("s", "live", "tasks.charge", "fp", ttl=3600.0)
    time.sleep(0.5)  # "old" expired 1.2 s ago, "recent" 0.2 s ago
    assert sql_store.purge_expired() == 0
    assert _keys(sql_store) == {"old", "recent", "live"}
    assert sql_store.purge_expired(grace=0.7) == 1
    assert _keys(sql_store) == {"recent", "live"}
    assert sql_store.purge_expired(grace=0.0) == 1
    assert _keys(sql_store) == {"live"}
