"""Asyncio side of the client: submit and look up without blocking the event loop.

The record is written through an :class:`AsyncStore` (redis.asyncio for Redis, SQLAlchemy's async engine for
PostgreSQL and SQLite, a worker thread for MariaDB and the memory store). Publishing goes through kombu, which is
synchronous, so it runs in a thread: the loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import os
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from .config import being_accepted
from .errors import IdempotencyKeyMismatch
from .forks import fresh_in_child
from .identity import (
    fingerprint_of_call,
    key_digest,
    new_operation_id,
    stored_call,
    validate_key,
    validate_scope,
)
from .models import Operation, Status, Submission
from .stores import Store, open_in_background, opened_store, shared_store
from .stores.base import CreateRequest
from .stores.lanes import pooled_only
from .task import abandon_deadline, first_deadline, message_due, record_ttl, with_deadline

_T = TypeVar("_T")

__all__ = ["AsyncStore", "ThreadedAsyncStore", "async_store_for", "open_off_the_loop", "submit_async"]


class AsyncStore(abc.ABC):
    """The part of the store a web process needs: create, read, and the clock."""

    @abc.abstractmethod
    async def _create(self, req: CreateRequest) -> tuple[Operation, bool]: ...

    @abc.abstractmethod
    async def _get(self, digest: str) -> Operation | None: ...

    @abc.abstractmethod
    async def now(self) -> float: ...

    async def aclose(self) -> None:  # noqa: B027 - a store with no connections of its own has nothing to close
        """Close the connections this async store holds of its own (the synchronous store's stay open)."""

    async def create(self, scope: str, key: str, task_name: str, fingerprint: str, *, ttl: float,
                     payload: str | None = None, delay: float = 0.0) -> Submission:
        digest = key_digest(scope, key)
        op, created = await self._create(CreateRequest(digest, scope, key, task_name, fingerprint,
                                                       new_operation_id(digest), ttl, payload, max(0.0, delay)))
        if not created and op.fingerprint != fingerprint:
            raise IdempotencyKeyMismatch(scope=scope, key=key, operation_id=op.id, stored_fingerprint=op.fingerprint,
                                         fingerprint=fingerprint)
        return Submission(op, created)

    async def get_by_id(self, operation_id: str) -> Operation | None:
        from .identity import digest_from_id

        digest = digest_from_id(operation_id)
        if digest is None:
            return None
        op = await self._get(digest)
        return op if op is not None and op.id == operation_id else None


class ThreadedAsyncStore(AsyncStore):
    """Any synchronous store, its calls moved off the event loop onto worker threads. Those threads open no lanes
    (see :func:`~idemtasks.stores.lanes.pooled_only`): every executor thread would otherwise keep a connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        return await asyncio.to_thread(_pooled, self.store._create, req)

    async def _get(self, digest: str) -> Operation | None:
        return await asyncio.to_thread(_pooled, self.store._get, digest)

    async def now(self) -> float:
        return await asyncio.to_thread(_pooled, self.store.now)


def _pooled(call: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    with pooled_only():
        return call(*args, **kwargs)


#: Per (process, loop id): the loop (weakly), the async generator that closes its stores as it shuts down, and its
#: stores by store. Read and changed under the lock: threads running loops of their own come and go at once.
_loops: dict[tuple[int, int], _LoopStores] = {}
_loops_lock = threading.Lock()
fresh_in_child(sys.modules[__name__], "_loops_lock", threading.Lock)


@dataclasses.dataclass
class _LoopStores:
    loop: weakref.ref[asyncio.AbstractEventLoop]
    closer: AsyncGenerator[None, None]
    stores: dict[str, AsyncStore] = dataclasses.field(default_factory=dict)


async def open_off_the_loop(*stores: Any) -> None:
    """Open off the loop the stores given by URL among ``stores`` (URLs, stores or ``None``) that this process has not
    opened yet, as :func:`~idemtasks.stores.shared_store` does (see :func:`~idemtasks.stores.open_in_background`).

    A store opens on its first use: it connects, and a SQL store makes its table. Against a database that does not
    answer that takes the connect timeout (5 s by default); on the loop, it held every other request of the process
    meanwhile, and again at each request while the database stayed away (a store that failed to open is not kept).
    """
    for url in dict.fromkeys(str(s) for s in stores if s is not None and not isinstance(s, Store)):
        if opened_store(url) is None:
            await asyncio.wrap_future(open_in_background(url))


def async_store_for(store: Store | str) -> AsyncStore:
    """The async counterpart of a store, one per store, process and event loop; closed as the loop shuts down (see
    :func:`_close_with`)."""
    sync = store if isinstance(store, Store) else shared_store(store)
    loop = asyncio.get_running_loop()
    name = sync.url + f"#{id(sync)}"
    with _loops_lock:
        stores = _close_with(loop).stores
        existing = stores.get(name)
        if existing is None:
            existing = stores[name] = _native(sync) or ThreadedAsyncStore(sync)
    return existing


def _close_with(loop: asyncio.AbstractEventLoop) -> _LoopStores:
    """The stores of ``loop``, which closes them as it shuts down (called under the lock).

    A native async store keeps connections of its own, bound to its loop. A process that runs many short loops
    (``asyncio.run`` per call, an async view under a WSGI server, which gets a loop per request) would otherwise keep
    one set per loop it ever ran, until the database refused new clients. A loop that shuts down as ``asyncio.run``
    does (and asgiref's, and uvicorn's through it) closes the async generators it saw start: this one, started here
    without awaiting (it runs to its first ``yield`` at once), closes the loop's stores as it is closed.
    """
    key = (os.getpid(), id(loop))
    known = _loops.get(key)
    if known is not None and known.loop() is loop:
        return known
    # Loops closed without closing their generators (by hand, not through asyncio.run): their stores cannot be
    # closed without them, and are dropped for the garbage collector; the closer holds its loop (through the
    # loop's finalizer hook), so it goes too, or every such loop would live on. (A new loop may have the id of one.)
    for old_key, old in list(_loops.items()):
        old_loop = old.loop()
        if old_loop is None or old_loop.is_closed():
            del _loops[old_key]
    closer = _closer(key)
    known = _loops[key] = _LoopStores(weakref.ref(loop), closer)  # the loop keeps its generators weakly
    with contextlib.suppress(StopIteration):
        closer.asend(None).send(None)
    return known


async def _closer(key: tuple[int, int]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _loops_lock:
            mine = _loops.pop(key, None)
        for astore in [] if mine is None else mine.stores.values():
            with contextlib.suppress(Exception):  # a store that is down: its connections go with it anyway
                await astore.aclose()


def _native(store: Store) -> AsyncStore | None:
    kind = type(store).__name__  # by name: neither backend module is imported unless it is in use
    if kind == "RedisStore":
        from .stores.redis_async import AsyncRedisStore

        # An application's own client (Sentinel, TLS, a proxy) cannot be copied onto redis.asyncio: its URL may not
        # even name the server it talks to, and a twin built from it would write where the workers never read.
        return AsyncRedisStore(store) if store._own_client else None  # type: ignore[attr-defined,arg-type]
    if kind == "SQLStore":
        from .stores.sql_async import AsyncSQLStore, supports

        return AsyncSQLStore(store) if supports(store) else None  # type: ignore[arg-type]
    return None


async def submit_async(task: Any, args: Any = None, kwargs: Any = None, *, key: str, scope: str | None = None,
                       fingerprint: str | None = None, store: AsyncStore | None = None, **options: Any) -> Submission:
    """:meth:`IdempotentTask.submit <idemtasks.task.IdempotentTask.submit>` for asyncio code."""
    task._settled()
    key = validate_key(key)
    scope = validate_scope(scope if scope is not None else task.idempotency_scope)
    if store is None:
        await open_off_the_loop(task.store_url)
    sync: Any = task.store if store is None else getattr(store, "store", None)  # a wrapped store's limit holds
    call = task.call_of(args, kwargs, sync)
    fingerprint = fingerprint or fingerprint_of_call(call)
    astore = store or async_store_for(sync)
    due = message_due(task, options)
    options = with_deadline(task, options)
    abandon_by = abandon_deadline()  # see IdempotentTask.submit
    sub = await astore.create(scope, key, task.name, fingerprint, ttl=record_ttl(task, due),
                              payload=stored_call(call, options), delay=due)
    op = sub.operation
    # Published from the loop's executor threads, which open no lane (see ThreadedAsyncStore): the "published" mark
    # takes a pooled connection and waits for its answer there, off the loop, rather than pipelined on a connection
    # each of those threads would keep for its whole life.
    if sub.created:
        await asyncio.to_thread(_pooled, task.publish, op, args, kwargs, abandon_by=abandon_by, due=due, **options)
    elif op.status is Status.PENDING and op.needs_publish:  # see IdempotentTask.submit
        checked_at = await astore.now()
        sub = dataclasses.replace(sub, checked_at=checked_at)
        if not being_accepted(op, checked_at):
            await asyncio.to_thread(_pooled, task.publish, op, args, kwargs, due=due, **first_deadline(op, options))
    return sub
