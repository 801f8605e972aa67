"""Shared fixtures: one store per backend, each test in its own namespace on the real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.transport import memory as memory_transport

from idemtasks.lease import keeper
from idemtasks.stores.base import Store
from tests import services
from tests.blackhole import blackhole  # noqa: F401  (a fixture)
from tests.private_redis import private_redis  # noqa: F401  (a fixture)

# IDEMTASKS_TEST_BACKENDS=redis,sqlite narrows a local run; CI runs them all.
_ONLY = [b for b in os.environ.get("IDEMTASKS_TEST_BACKENDS", "").split(",") if b]
BACKENDS = [b for b in ["memory", "redis", "postgres", "sqlite", "mysql"] if not _ONLY or b in _ONLY]
SERVER_BACKENDS = [b for b in ["redis", "postgres", "sqlite", "mysql"] if not _ONLY or b in _ONLY] or _ONLY

# An embedded worker on the in-memory broker drains it in 2 s waits (Celery's loop for transports without an event
# loop), polls an empty queue once a second, and looks for its shutdown only between waits and once more after the
# last: each took 4 s to stop and up to 1 s to see a message, minutes over the suite. Waits are cut to 0.1 s here.
# What is delivered, and when a message counts as received, is unchanged: a shorter wait only returns sooner.
_IDLE_WAIT = 0.1
_drain_events = memory_transport.Transport.drain_events


def _drain_in_short_waits(self: memory_transport.Transport, connection: object, timeout: float | None = None) -> None:
    _drain_events(self, connection, timeout=timeout if timeout is None else min(timeout, _IDLE_WAIT))


memory_transport.Transport.drain_events = _drain_in_short_waits


def make_store(backend: str, tmp_path: Path) -> Store:
    """A fresh, isolated store: its own Redis key namespace or its own SQL table."""
    name = f"t{uuid.uuid4().hex[:12]}"
    if backend == "memory":
        from idemtasks.stores.memory import MemoryStore

        return MemoryStore()
    if backend == "redis":
        services.require("redis")
        from idemtasks.stores.redis import RedisStore

        return RedisStore(services.REDIS_URL, namespace=f"idemtasks-test:{name}")
    from idemtasks.stores.sql import SQLStore

    if backend == "sqlite":
        return SQLStore(f"sqlite:///{tmp_path / 'store.sqlite3'}", table=name)
    services.require(backend)
    url = services.POSTGRES_URL if backend == "postgres" else services.MYSQL_URL
    return SQLStore(url, table=name)


def drop(store: Store) -> None:
    """Remove what a test store wrote on a shared server."""
    kind = type(store).__name__
    if kind == "SQLStore":
        store.table.drop(store.engine, checkfirst=True)  # type: ignore[attr-defined]
    elif kind == "RedisStore":
        client = store.client  # type: ignore[attr-defined]
        for k in client.scan_iter(match=f"{store.namespace}:*", count=1000):  # type: ignore[attr-defined]
            client.delete(k)
    store.close()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path)
    yield s
    if request.param != "memory":
        drop(s)


@pytest.fixture(params=SERVER_BACKENDS)
def server_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path)
    yield s
    if request.param != "memory":
        drop(s)


@pytest.fixture
def scope() -> str:
    return f"scope-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _forget_unstored_outcomes() -> Iterator[None]:
    """A test that leaves its store down for good may leave this process's lease keeper retrying an outcome against
    it every second (what a worker does until its store is back), for the rest of the session: forget them."""
    yield
    with keeper._cond:
        keeper._holds = {h for h in keeper._holds if h.finish is None}
