"""The Redis store on deployments other than one plain server on a TCP port: a Unix socket, Sentinel, a server that
evicts keys."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.sentinel import Sentinel

from idemtasks import ClaimOutcome, IdempotentTask, Status
from idemtasks.checks import check_stores
from idemtasks.stores.redis import RedisStore
from tests import services
from tests.private_redis import PrivateRedis, free_port


def _wait_for(ready: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if ready():  # type: ignore[operator]
                return
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} did not start")


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(path), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: redis.Redis(unix_socket_path=str(path)).ping(), "redis-server on a socket")
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("scheme", ["unix", "UNIX"])  # redis-py takes the scheme in any case
def test_a_store_on_a_unix_socket_renews_its_leases(socket_path: Path, scheme: str) -> None:
    """The lease keeper's renewals go through a client built from the store's URL without its timeouts. Rebuilt,
    ``unix:///path`` lost its "//" and redis-py refused it: every renewal failed, and live holders were taken
    over while their bodies ran."""
    store = RedisStore(f"{scheme}://{socket_path}?socket_timeout=3")
    try:
        held = store.claim("s", "k", "tasks.t", "fp", owner="w", lease=5, ttl=60).operation
        with store.promptly():  # as the keeper renews
            assert store.renew(held, held.fencing_token, lease=30, ttl=60)
        store.succeed(held, held.fencing_token, "1", ttl=60)
        op = store.get("s", "k")
        assert op is not None and op.status is Status.SUCCEEDED
    finally:
        store.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[PrivateRedis, int]]:
    """A master of this test's own and one Sentinel watching it as ``mym``."""
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    master = PrivateRedis(tmp_path)
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mym 127.0.0.1 {master.port} 1\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: redis.Redis(port=port).sentinel_get_master_addr_by_name("mym"), "sentinel")
        yield master, port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        master.stop()


def test_a_store_on_a_sentinel_client_writes_to_the_master(sentinel: tuple[PrivateRedis, int]) -> None:
    """A worker thread's claims and completions went through a connection of its own, built from the pool's
    settings. A Sentinel pool's connections look the master up as they connect; that one did not, and went to the
    pool's default host instead (here a port nothing listens on; by default localhost:6379, where a development
    Redis may well answer and keep the records)."""
    master, port = sentinel
    nowhere = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", nowhere)) != 0
    client = Sentinel([("127.0.0.1", port)], socket_timeout=2).master_for(
        "mym", socket_timeout=2, decode_responses=True, host="127.0.0.1", port=nowhere)
    store = RedisStore(master.url, client=client)
    outcomes: list[object] = []

    def worker_thread() -> None:
        try:
            created = store.create("s", "k", "tasks.t", "fp", ttl=60)
            store.mark_published(created.operation)
            claim = store.claim("s", "k", "tasks.t", "fp", owner="w", lease=30, ttl=60)
            outcomes.append(claim.outcome)
            store.succeed(claim.operation, claim.operation.fencing_token, "1", ttl=60)
        except Exception as exc:
            outcomes.append(exc)

    thread = threading.Thread(target=worker_thread)
    thread.start()
    thread.join()
    try:
        assert outcomes == [ClaimOutcome.CLAIMED]
        op = store.get("s", "k")
        assert op is not None and op.status is Status.SUCCEEDED and op.result == 1
        assert redis.Redis.from_url(master.url).exists(store.record_key(op.id[:32])) == 1
    finally:
        store.close()


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own that evicts keys with an expiry when full, as some managed services do,
    with a user who may not use CONFIG."""
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--maxmemory", "64mb",
                             "--maxmemory-policy", "volatile-lru"], stdout=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=port)
        _wait_for(admin.ping, "redis-server")
        admin.acl_setuser("app", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _app_on(url: str, name: str = "t") -> Celery:
    app = Celery(f"dep{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

    @app.task(shared=False, base=IdempotentTask, store_url=url, name=f"{app.main}.{name}")
    def charge() -> None:
        return None

    return app


def test_a_worker_is_warned_of_a_redis_that_evicts_records(evicting_redis: str) -> None:
    """Every record has an expiry, so a volatile-* policy evicts records too: a duplicate would run its body again."""
    [warning] = check_stores(_app_on(evicting_redis))
    assert "maxmemory-policy volatile-lru" in warning and "set maxmemory-policy noeviction" in warning


def test_a_redis_that_keeps_its_keys_or_will_not_say_is_no_warning(evicting_redis: str, tmp_path: Path) -> None:
    no_config = evicting_redis.replace("redis://", "redis://app:pw@")
    assert check_stores(_app_on(no_config)) == []  # CONFIG refused: nothing to tell, nothing raised
    assert check_stores(_app_on(services.REDIS_URL)) == []  # the shared server: noeviction
    # Nor is a SQL store opened for nothing in the worker's parent process.
    database = tmp_path / "never-opened.sqlite3"
    assert check_stores(_app_on(f"sqlite:///{database}")) == [] and not database.exists()


def test_the_check_waits_briefly_for_a_server_that_never_answers_and_asks_no_own_client(
        evicting_redis: str) -> None:
    """It runs as the worker starts, before the pool consumes anything: a server that accepts and never answers
    costs it the short timeout, once; an application's own client (its own timeouts and retries, a minute by
    redis-py's defaults) is not asked at all."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert RedisStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0").server_warnings() == []
        assert time.monotonic() - started < 2.0
    own = RedisStore(evicting_redis, client=redis.Redis.from_url(evicting_redis))
    assert own.server_warnings() == []
    assert RedisStore(evicting_redis).server_warnings() != []  # the same server, by URL
