"""The web-facing half of the SQL store on SQLAlchemy's asyncio engine (psycopg's async mode, aiosqlite).

It sends the very statements of :class:`~idemtasks.stores.sql.SQLStore`, so the two cannot drift apart. MariaDB
has no asyncio driver here; :func:`idemtasks.aio.async_store_for` gives it the threaded wrapper instead.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..aio import AsyncStore
from ..models import Operation
from .base import CreateRequest
from .sql import SQLStore
from .sql_schema import pg_connect_args, ping_when_idle

__all__ = ["AsyncSQLStore", "supports"]

_ASYNC_DRIVERS = {"postgresql": "postgresql+psycopg", "sqlite": "sqlite+aiosqlite"}


def supports(store: SQLStore) -> bool:
    # An application's own engine carries settings no URL repeats (a search path, TLS files, a creator function):
    # a twin built from its URL could connect elsewhere, so that store gets the threaded wrapper instead.
    return store.dialect in _ASYNC_DRIVERS and store.owns_engine


class AsyncSQLStore(AsyncStore):
    """Shares the table, the statements and the round-trip counter of a :class:`SQLStore`."""

    def __init__(self, store: SQLStore) -> None:
        self.sync = store
        url = store.engine.url.set(drivername=_ASYNC_DRIVERS[store.dialect])
        options: dict[str, Any] = {}
        if store.dialect == "postgresql":
            # Single statements: autocommit saves BEGIN and COMMIT, as in the synchronous store.
            options.update(isolation_level="AUTOCOMMIT", connect_args={**pg_connect_args(url), **store.connect_args})
        else:
            options.update(connect_args={"timeout": 30})
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if store.dialect == "postgresql":
            ping_when_idle(self.engine.sync_engine)  # as the synchronous store: not a ping per request

    async def _one(self, stmt: Any, params: dict[str, Any]) -> Any:
        self.sync.round_trips += 1
        try:
            async with self.engine.begin() as conn:
                return (await conn.execute(stmt, params)).first()
        except SQLAlchemyError as exc:
            raise self.sync._wrap(exc) from exc

    async def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        row = await self._one(*self.sync.create_statement(req))
        return self.sync._op(row), row.id == req.new_id

    async def _get(self, digest: str) -> Operation | None:
        row = await self._one(*self.sync.get_statement(digest))
        return None if row is None else self.sync._op(row)

    async def now(self) -> float:
        if self.sync.dialect == "sqlite":
            return time.time()
        return float((await self._one(*self.sync.clock_statement()))[0])

    async def aclose(self) -> None:
        await self.engine.dispose()
