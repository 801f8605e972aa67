"""The web-facing half of the Redis store on redis.asyncio: the same Lua scripts, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry

from ..aio import AsyncStore
from ..models import Operation
from . import redis_scripts as lua
from .base import CreateRequest
from .redis import DRIVER_ERRORS, RedisStore, create_answer, create_args, parse_record
from .redis_lane import client_retry

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(AsyncStore):
    """Shares the key layout and namespace of a :class:`RedisStore`, with its own asyncio connection pool."""

    def __init__(self, store: RedisStore) -> None:
        self.sync = store
        # A cluster client routes each script to its record's slot, as the synchronous store's does; a plain client
        # on a cluster would be answered MOVED for most keys.
        factory = aioredis.RedisCluster.from_url if store.cluster else aioredis.Redis.from_url
        self.client: Any = factory(
            store._raw_url, decode_responses=True, socket_timeout=store.socket_timeout,
            socket_connect_timeout=store.socket_timeout, **client_retry(Retry),
            **store.startup_nodes(aioredis.cluster.ClusterNode))
        self._create_script = self.client.register_script(lua.CREATE)
        self._get_script = self.client.register_script(lua.GET)

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        self.sync.round_trips += 1
        try:
            yield
        except DRIVER_ERRORS as exc:
            raise self.sync._store_error(exc) from exc  # one rule for what is an outage, in both halves

    async def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        async with self._call():
            reply = await self._create_script(keys=[self.sync.record_key(req.digest), *self.sync._indexes[:1]],
                                              args=create_args(req))
        return create_answer(reply, req)

    async def _get(self, digest: str) -> Operation | None:
        async with self._call():
            flat = await self._get_script(keys=[self.sync.record_key(digest)])
        return parse_record(flat, digest) if flat else None

    async def now(self) -> float:
        async with self._call():
            seconds, micros = await self.client.time()
        return float(seconds) + float(micros) / 1_000_000

    async def aclose(self) -> None:
        await self.client.aclose()
