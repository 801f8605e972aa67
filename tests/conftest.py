"""Shared fixtures: one store per backend, each test in its own namespace on the real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemtasks.lease import keeper
from idemtasks.stores.base import Store
from tests import services
from tests.private_redis import private_redis  # noqa: F401  (a fixture)

# IDEMTASKS_TEST_BACKENDS=redis,sqlite narrows a local run; CI runs them all.
_ONLY = [b for b in os.environ.get("IDEMTASKS_TEST_BACKENDS", "").split(",") if b]
BACKENDS = [b for b in ["memory", "redis", "postgres", "sqlite", "mysql"] if not _ONLY or b in _ONLY]
SERVER_BACKENDS = [b for b in ["redis", "postgres", "sqlite", "mysql"] if not _ONLY or b in _ONLY] or _ONLY


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
    it every second (what a worker does until its store is back). Later tests must not share the process with that:
    its retries use the random module in the background (redis-py's back-off jitter), which Hypothesis reports as
    nondeterminism in a strategy."""
    yield
    with keeper._cond:
        keeper._holds = {h for h in keeper._holds if h.finish is None}
