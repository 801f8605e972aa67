"""The asyncio client path: native drivers where they exist, the same records as the synchronous store."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from idemtasks import IdempotencyKeyMismatch
from idemtasks.aio import async_store_for
from idemtasks.stores.base import Store

NATIVE = {"RedisStore": "AsyncRedisStore", "SQLStore": "AsyncSQLStore"}


def test_async_create_and_get_match_the_sync_store(server_store: Store) -> None:
    async def scenario() -> None:
        astore = async_store_for(server_store)
        if server_store.url.startswith("mysql"):
            assert type(astore).__name__ == "ThreadedAsyncStore"  # no asyncio MariaDB driver installed
        else:
            assert type(astore).__name__ == NATIVE[type(server_store).__name__]
        key = f"k-{uuid.uuid4().hex}"
        first = await astore.create("s", key, "t", "fp", ttl=60, payload='["t",[],{}]')
        again = await astore.create("s", key, "t", "fp", ttl=60)
        assert first.created and not again.created and again.operation.id == first.operation.id
        with pytest.raises(IdempotencyKeyMismatch):
            await astore.create("s", key, "t", "other", ttl=60)
        assert await astore.get_by_id(first.operation.id) == server_store.get_by_id(first.operation.id)
        assert server_store.get("s", key).payload == '["t",[],{}]'  # type: ignore[union-attr]
        assert abs(await astore.now() - server_store.now()) < 5

    asyncio.run(scenario())


def test_an_async_create_records_when_its_message_is_due(server_store: Store) -> None:
    """As with the synchronous store: recovery counts pending_after from the due time, mark or no mark."""
    async def scenario() -> None:
        sub = await async_store_for(server_store).create("s", f"k-{uuid.uuid4().hex}", "t", "fp", ttl=60, delay=30.0)
        op = sub.operation
        assert op.updated_at - op.created_at == pytest.approx(30.0, abs=0.01)
        assert server_store.get_by_id(op.id) == op

    asyncio.run(scenario())
