"""The asyncio client path: native drivers where they exist, the same records as the synchronous store."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import socket
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery

from idemtasks import IdempotencyKeyMismatch, IdempotentTask, StoreUnavailable
from idemtasks.aio import async_store_for, open_off_the_loop, submit_async
from idemtasks.identity import parse_stored_call
from idemtasks.stores import opened_store
from idemtasks.stores.base import Store
from idemtasks.stores.memory import MemoryStore
from idemtasks.stores.redis import RedisStore
from idemtasks.stores.sql import SQLStore

from .services import POSTGRES_URL, REDIS_URL, pg_sessions, require

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


def test_submit_async_keeps_the_queue_it_was_given_for_recovery(server_store: Store) -> None:
    app = Celery(f"aio{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

    @app.task(shared=False, base=IdempotentTask, store_url=server_store, name=f"{app.main}.charge")
    def charge(amount: int) -> int:
        return amount

    special, key = f"{app.main}.special", f"k-{uuid.uuid4().hex}"
    sub = asyncio.run(submit_async(charge, (5,), key=key, queue=special, priority=3))
    assert sub.created
    stored = server_store.get_by_id(sub.operation.id)
    assert stored is not None and stored.payload is not None
    assert parse_stored_call(stored.payload) == (charge.name, [5], {}, {"priority": 3, "queue": special})
    with app.connection_for_write() as conn:
        received = conn.SimpleQueue(special).get(timeout=5)
        assert received.headers["id"] == sub.operation.id
        received.ack()


async def _creates_through_the_store_itself(store: Any) -> None:
    """The async half of ``store`` is its threaded wrapper, and what it creates the store itself reads back."""
    astore = async_store_for(store)
    assert type(astore).__name__ == "ThreadedAsyncStore"
    sub = await astore.create("s", "k", "t", "fp", ttl=60)
    assert sub.created and store.get_by_id(sub.operation.id) == sub.operation
    # Nor does an executor thread keep a connection of its own (a lane) outside the pool, for as long as it lives.
    assert not getattr(store, "_all_lanes", ())


def test_submit_async_opens_no_connection_of_its_own_in_the_loops_executor_threads(server_store: Store) -> None:
    """The loop's executor threads publish, and mark the operation published. Like the store's calls from there
    (see ThreadedAsyncStore), they take pooled connections: a connection of a thread's own (a lane) would stay open
    for the thread's whole life, one per executor thread and process, outside the pool's limits."""
    app = Celery(f"aio{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

    @app.task(shared=False, base=IdempotentTask, store_url=server_store, name=f"{app.main}.charge")
    def charge(amount: int) -> int:
        return amount

    async def scenario() -> Any:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))  # one thread: the one to look at
        subs = [await submit_async(charge, (n,), key=f"k-{uuid.uuid4().hex}") for n in range(3)]
        assert all(sub.created for sub in subs)
        return await asyncio.to_thread(lambda: getattr(server_store._local, "lane", None))  # type: ignore[attr-defined]

    assert asyncio.run(scenario()) is None


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_the_async_stores_of_a_loop_are_closed_as_the_loop_shuts_down(service: str) -> None:
    """A process that runs many short loops (asyncio.run per call; an async view under a WSGI server gets a loop
    per request) keeps no connections for the loops that ended: the database would run out of clients."""
    require(service)
    name = f"aio-{uuid.uuid4().hex[:8]}"
    if service == "redis":
        store: Store = RedisStore(f"{REDIS_URL}?client_name={name}", namespace=f"idemtasks-test:{name}")
        admin = redis.Redis.from_url(REDIS_URL)

        def connections() -> int:
            return sum(1 for c in admin.client_list() if c.get("name") == name)
    else:
        store = SQLStore(POSTGRES_URL, table=f"t{uuid.uuid4().hex[:12]}",
                         engine_options={"connect_args": {"application_name": name}})

        def connections() -> int:
            return pg_sessions(name)

    async def one_request() -> int:
        await async_store_for(store).create("s", f"k-{uuid.uuid4().hex}", "t", "fp", ttl=60)
        return connections()

    try:
        before = connections()  # the synchronous store's own, if any
        during = [asyncio.run(one_request()) for _ in range(4)]
        assert all(n > before for n in during)  # each loop's store had a connection open
        assert connections() == before  # and each was closed with its loop
    finally:
        if isinstance(store, SQLStore):
            store.table.drop(store.engine)
        else:
            admin.close()
        store.close()


def test_loops_closed_by_hand_are_not_kept_alive_by_their_stores() -> None:
    """A loop closed without closing its async generators (not through asyncio.run) cannot close its stores: they
    are dropped as the next loop comes, and the loop with them, not kept for the life of the process."""
    store = MemoryStore()

    async def one_request() -> None:
        async_store_for(store)

    loops = []
    for _ in range(20):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one_request())
        loop.close()
        loops.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert sum(ref() is not None for ref in loops) <= 1  # the last one, until another loop comes


def test_threads_running_loops_of_their_own_at_once_do_not_trip_over_each_other() -> None:
    """A threaded WSGI server with async views: every request runs a loop of its own, in its own thread."""
    store, errors = MemoryStore(), []

    async def one_request() -> None:
        async_store_for(store)

    def requests() -> None:
        for _ in range(400):
            try:
                asyncio.run(one_request())
            except Exception as exc:  # a dict changed under another thread's iteration, say
                errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: a race has every chance
    try:
        threads = [threading.Thread(target=requests) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_redis_store_on_the_applications_own_client_is_used_as_it_is() -> None:
    """An application's own client (Sentinel, TLS, a proxy) cannot be copied onto redis.asyncio, and the URL beside
    it need not name the server it talks to: the async half goes through that very client, off the event loop."""
    import redis

    from idemtasks.stores.redis import RedisStore
    from tests.services import REDIS_URL, require
    from tests.test_bad_input import free_port

    require("redis")
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", client=client, namespace=f"own{uuid.uuid4().hex[:6]}")

    try:
        asyncio.run(_creates_through_the_store_itself(store))
    finally:
        for key in client.scan_iter(match=f"{store.namespace}:*"):
            client.delete(key)
        client.close()


def test_a_store_on_an_applications_own_engine_is_used_through_that_engine() -> None:
    """An engine the application built carries connection settings (a schema search path, TLS client certificates)
    that no URL repeats: an asyncio twin built from its URL would connect elsewhere, and the web side would write
    where the workers never read. The async half goes through that very engine, off the event loop."""
    import sqlalchemy as sa

    from idemtasks.stores.sql import SQLStore
    from tests.services import POSTGRES_URL, require

    require("postgres")
    schema = f"own{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(POSTGRES_URL, connect_args={"options": f"-c search_path={schema}"})
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    store = SQLStore(POSTGRES_URL, engine=engine, table="ops")

    try:
        asyncio.run(_creates_through_the_store_itself(store))
    finally:
        store.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


def test_a_submit_that_opens_its_tasks_store_leaves_the_loop_free_meanwhile() -> None:
    """The task's store, given by URL, opens on its first use; against a database that does not answer that takes
    the connect timeout, during which the loop goes on running everything else."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # accepted by the kernel, never answered
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test?connect_timeout=1"
        app = Celery(f"a{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

        @app.task(shared=False, base=IdempotentTask, store_url=url, name=f"{app.main}.pay")
        def pay(amount: int) -> int:
            return amount

        async def scenario() -> float:
            ticks: list[float] = []

            async def ticker() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.05)

            beat = asyncio.create_task(ticker())
            with pytest.raises(StoreUnavailable):
                await submit_async(pay, (1,), key="k1")
            beat.cancel()
            return max(b - a for a, b in itertools.pairwise(ticks))

        assert asyncio.run(scenario()) < 0.5  # the longest the loop went without running the ticker


def test_requests_for_a_store_that_does_not_answer_share_one_open_and_hold_up_no_other_store() -> None:
    """Ten requests at once for a task whose database does not answer wait for one open between them (one connect
    timeout, not ten in a row), and a request for a task on another store, opened meanwhile, is not held up."""
    with socket.create_server(("127.0.0.1", 0), backlog=32) as silent:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test?connect_timeout=1"
        app = Celery(f"a{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

        @app.task(shared=False, base=IdempotentTask, store_url=url, name=f"{app.main}.stuck")
        def stuck(amount: int) -> int:
            return amount

        @app.task(shared=False, base=IdempotentTask, store_url=f"memory://{app.main}", name=f"{app.main}.fine")
        def fine(amount: int) -> int:
            return amount

        async def scenario() -> tuple[list[float], float]:
            started = time.monotonic()

            async def timed(coro: Any) -> float:
                with contextlib.suppress(StoreUnavailable):
                    await coro
                return time.monotonic() - started

            dead = [asyncio.create_task(timed(submit_async(stuck, (i,), key=f"k{i}"))) for i in range(10)]
            await asyncio.sleep(0.1)  # the open is under way
            healthy = await timed(submit_async(fine, (1,), key="k"))
            return list(await asyncio.gather(*dead)), healthy

        dead, healthy = asyncio.run(scenario())
    assert healthy < 1.0
    assert max(dead) < 3.0


def test_an_open_whose_thread_cannot_start_fails_that_request_and_the_next_one_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had (a process at its limit): the request that asked is told, and the URL is not left waiting
    for good on an open that never started."""
    url = f"memory://open-{uuid.uuid4().hex}"
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if self.name == "idemtasks-open-store":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(StoreUnavailable, match="can't start new thread"):  # a 503 for an HTTP request
        asyncio.run(open_off_the_loop(url))
    monkeypatch.setattr(threading.Thread, "start", start)
    asyncio.run(asyncio.wait_for(open_off_the_loop(url), 5))
    assert opened_store(url) is not None
