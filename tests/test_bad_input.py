"""Bad input and broken infrastructure: each gets a named error, and no operation is left stuck in ``running``."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker

from idemtasks import (
    ClaimOutcome,
    ConfigurationError,
    IdempotentTask,
    InvalidKey,
    Status,
    StoreUnavailable,
    TooLarge,
    open_store,
)
from idemtasks.aio import async_store_for
from idemtasks.checks import check_settings
from idemtasks.config import validate
from idemtasks.stores import public_url
from idemtasks.stores.base import Store
from idemtasks.stores.memory import MemoryStore
from idemtasks.stores.sql import SQLStore
from idemtasks.stores.sql_schema import create_tables
from tests import services
from tests.conftest import drop
from tests.private_redis import PrivateRedis, free_port


@pytest.mark.parametrize("url", ["mongodb://localhost/x", "ftp://x", "not a url", "", "redis"])
def test_unknown_store_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/0?socket_timeout=abc", "redis://[::1/0",
    "postgresql+nodriver://127.0.0.1/x", "postgresql+asyncpg://postgres@127.0.0.1:1/test"])
def test_a_store_url_that_cannot_be_used_as_written_is_a_configuration_error(url: str) -> None:
    """Not the driver's own ValueError, TypeError or "no such module": the URL, which no retry will mend."""
    with pytest.raises(ConfigurationError, match="cannot be opened"):
        open_store(url)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("postgresql://app:s3cret@h/db", "postgresql://app:***@h/db"),
    ("mysql+pymysql://app@h/db?password=s3cret&charset=utf8mb4", "mysql+pymysql://app@h/db?password=***&charset=utf8mb4"),
    # libpq's passphrase of the client key, and a parameter whose name merely contains "password=" further on
    ("postgresql://app@h/db?sslkey=k.pem&sslpassword=s3cret", "postgresql://app@h/db?sslkey=k.pem&sslpassword=***"),
    ("postgresql://app:a@h/db?SSLPassword=b&application_name=password=x",
     "postgresql://app:***@h/db?SSLPassword=***&application_name=password=x"),
    ("mysql+pymysql://app@h/db?passwd=s3cret", "mysql+pymysql://app@h/db?passwd=***"),  # PyMySQL's spelling
    # A password SQLAlchemy reads up to its "@", where urllib sees a fragment, a path or a query begin
    ("postgresql://app:s3#cret@h/db", "postgresql://app:***@h/db"),
    ("postgresql://app:s3/cret@h/db?sslmode=require", "postgresql://app:***@h/db?sslmode=require"),
    ("postgresql://app:s3?cret@h/db", "postgresql://app:***@h/db"),
    ("postgresql://app@h/db?%70assword=s3cret", "postgresql://app@h/db?%70assword=***"),
    ("sqlite:////var/lib/app.db", "sqlite:////var/lib/app.db"),  # no password: as given, not rebuilt
    ("sqlite:////var/lib/app.db?sslpassword=s3cret", "sqlite:////var/lib/app.db?sslpassword=***"),  # nor here
    ("memory://", "memory://"),
])
def test_a_store_url_in_messages_and_logs_hides_its_password_and_nothing_else(url: str, shown: str) -> None:
    assert public_url(url) == shown


def test_a_sql_store_shows_its_url_without_the_passwords_its_query_carries() -> None:
    """SQLAlchemy hides only the user's password; the store's URL goes into logs, errors and its place."""
    store = SQLStore("postgresql://app:a@db.example/pay?password=b&sslpassword=c", create_schema=False)
    try:
        assert store.url == "postgresql+psycopg://app:***@db.example/pay?password=***&sslpassword=***"
        assert store.where == f"{store.url} (table 'idemtasks_operations')"
    finally:
        store.close()


@pytest.mark.parametrize(("module", "extra", "url"), [("redis", "redis", "redis://127.0.0.1:1/0"),
                                                       ("sqlalchemy", "sql", "sqlite:///x.sqlite3")])
def test_missing_extra_names_the_pip_command(module: str, extra: str, url: str) -> None:
    code = (f"import sys; sys.modules[{module!r}] = None\nfrom idemtasks import open_store\n"
            f"try:\n    open_store({url!r})\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"pip install idemtasks[{extra}]" in out


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "postgresql+psycopg://postgres@127.0.0.1:{port}/x"])
def test_unreachable_store_raises_store_unavailable(url: str) -> None:
    store = open_store(url.format(port=free_port()), **({"create_schema": False} if "postgres" in url else {}))
    with pytest.raises(StoreUnavailable):
        store.create("s", "k", "t", "fp", ttl=60)
    with pytest.raises(StoreUnavailable):
        store.get("s", "k")


def test_retrying_an_unreachable_redis_store_leaves_the_applications_random_state_alone() -> None:
    """The store's retry jitter has a generator of its own: its background threads (the lanes' collector, the lease
    keeper) retry while the application runs, and must not change what a seeded ``random`` draws next."""
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    random.seed(1234)
    before = random.getstate()
    with pytest.raises(StoreUnavailable):
        store.claim("s", "k", "t", "fp", owner="w1", lease=30, ttl=60)
    with pytest.raises(StoreUnavailable):
        store.get("s", "k")

    async def create() -> None:
        with pytest.raises(StoreUnavailable):
            await async_store_for(store).create("s", "k", "t", "fp", ttl=60)

    asyncio.run(create())
    assert random.getstate() == before


def test_a_redis_store_out_of_memory_is_unavailable_and_writes_nothing(private_redis: PrivateRedis) -> None:
    """Refused for memory, a script has not written: a worker comes back later, as after an outage."""
    store = open_store(private_redis.url)
    store.client.config_set("maxmemory", 1)  # type: ignore[attr-defined]  # below what the server already uses
    with pytest.raises(StoreUnavailable):
        store.create("s", "k", "t", "fp", ttl=60)
    with pytest.raises(StoreUnavailable):
        store.claim("s", "k", "t", "fp", owner="w1", lease=30, ttl=60)
    store.client.config_set("maxmemory", 0)  # type: ignore[attr-defined]
    assert store.get("s", "k") is None
    assert store.claim("s", "k", "t", "fp", owner="w1", lease=30, ttl=60).outcome is ClaimOutcome.CLAIMED


def test_settings_that_would_break_the_guarantees_are_refused() -> None:
    base = {"lease_seconds": 60.0, "idempotency_ttl": 3600.0, "on_busy": "retry"}
    validate("t", base)
    with pytest.raises(ConfigurationError):
        validate("t", {**base, "idempotency_ttl": 90.0})
    with pytest.raises(ConfigurationError):
        validate("t", {**base, "lease_seconds": 0})
    with pytest.raises(ConfigurationError):
        validate("t", {**base, "on_busy": "run-anyway"})


_GOOD_SETTINGS = {"lease_seconds": 60.0, "idempotency_ttl": 3600.0, "on_busy": "retry", "busy_countdown": 1.0,
                  "store_retry_max_delay": 60.0, "max_args_bytes": None, "max_result_bytes": 1024,
                  "pipeline_completions": True, "max_crashes": 3}


@pytest.mark.parametrize(("setting", "value"), [
    ("lease_seconds", float("nan")),  # every comparison false: a lease that never ran out, its operation stuck
    ("lease_seconds", "nan"),
    ("lease_seconds", "sixty"),
    ("idempotency_ttl", float("inf")),  # on Redis, stored as no record at all: every duplicate ran again
    ("idempotency_ttl", 1e300),
    ("idempotency_ttl", 20 * 365 * 24 * 3600.0),
    ("busy_countdown", "x"),
    ("busy_countdown", float("nan")),
    ("store_retry_max_delay", -1.0),
    ("store_retry_max_delay", 0),  # each message would go round the broker at once while the store is away
    ("max_result_bytes", "100"),  # every result failed with a TypeError
    ("max_args_bytes", 0),
    ("pipeline_completions", "no"),
    ("max_crashes", 1.5),
])
def test_settings_of_the_wrong_type_or_out_of_range_are_refused_when_the_task_is_bound(setting: str,
                                                                                      value: object) -> None:
    validate("t", _GOOD_SETTINGS)
    with pytest.raises(ConfigurationError, match=setting):
        validate("t", {**_GOOD_SETTINGS, setting: value})


@pytest.mark.parametrize(("setting", "value"), [
    ("lease_seconds", "60"),  # a string from the environment
    ("lease_seconds", Decimal("30")),
    ("idempotency_ttl", Fraction(7200)),
    ("busy_countdown", 0),
    ("pipeline_completions", 1),
])
def test_settings_given_as_other_kinds_of_numbers_still_bind(setting: str, value: object) -> None:
    validate("t", {**_GOOD_SETTINGS, setting: value})


def test_a_task_name_longer_than_the_stores_hold_is_refused_when_the_task_is_bound() -> None:
    """A SQL store's task_name column holds 255 characters: it refused every record of a longer name, and each
    message of the task was sent round again for ever."""
    app = Celery(f"n{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.idemtasks_store_url = "memory://"
    with pytest.raises(ConfigurationError, match="at most 255 characters"):
        @app.task(shared=False, base=IdempotentTask, name="t." + "x" * 300)
        def pay(order: str) -> str:
            return order

        pay._settled()


def test_a_task_class_registered_without_a_name_is_refused_for_bad_settings_too() -> None:
    """app.register_task names the instance, not its class, as the class is bound: its settings are checked all
    the same (a record that expires before its lease ends lets a second run start under the same key)."""
    app = Celery(f"cls{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.idemtasks_store_url = "memory://"

    class Pay(IdempotentTask):
        lease_seconds = 100.0
        idempotency_ttl = 10.0

        def run(self, order: str) -> str:
            return order

    with pytest.raises(ConfigurationError, match=r"Pay: idempotency_ttl \(10.0\) must be at least twice"):
        app.register_task(Pay())


def transactional_pay(store_url: Store | str, transaction_url: str | None, **options: Any) -> tuple[Celery, Any]:
    app = Celery(f"tx{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store_url, transaction_url=transaction_url,
              transactional=True, name="tx.pay", **options)
    def pay(self: IdempotentTask) -> None:
        return None

    return app, pay


@pytest.mark.parametrize("transaction_url", [
    "redis://localhost:6379/0",  # not a SQL database
    "ledger.db",  # not a URL
    "MariaDB+pymysql://root@127.0.0.1/test",  # SQLAlchemy's dialect names are case-sensitive
    "postgresql+nosuchdriver://postgres@127.0.0.1/test",
    "sqlite+aiosqlite:///ledger.db",  # an asyncio driver: the body runs in a synchronous transaction
    "postgresql://u:s3cret@[::1/db",  # not even a URL urllib can split
    "postgresql+nosuchdriver://u@h/db?password=s3cret",  # libpq also takes its password from the query
])
def test_a_transaction_url_sqlalchemy_cannot_open_is_refused_when_the_task_is_bound(transaction_url: str) -> None:
    """A worker refuses to start rather than fail every operation it takes."""
    app, _ = transactional_pay("sqlite:///ops.db", transaction_url)
    with pytest.raises(ConfigurationError, match="a transactional task needs transaction_url, a SQL database URL") \
            as refused:
        app.finalize()
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(("store_url", "transaction_url"), [
    ("sqlite:///ops.db", None),
    ("redis://localhost:6379/0", "postgresql+psycopg://postgres@127.0.0.1/test"),
    ("redis://localhost:6379/0", "mariadb+pymysql://root@127.0.0.1/test"),
    ("redis://localhost:6379/0", "postgres://postgres@127.0.0.1/test"),  # as hosting platforms spell it
    ("postgres://postgres@127.0.0.1/test", None),  # the store's database, through the store's URL
    ("sqlite:///ops.db", ""),  # an empty setting (an unset environment variable) is no setting
])
def test_a_transactional_task_with_a_sql_database_binds(store_url: str, transaction_url: str | None) -> None:
    app, _ = transactional_pay(store_url, transaction_url)
    app.finalize()
    assert app.tasks["tx.pay"].transactional
    assert not any("transactional" in w for w in check_settings(app))


@pytest.mark.parametrize("store_url", ["redis://localhost:6379/0", "memory://"])
def test_without_transaction_url_a_store_that_is_not_sql_is_reported_when_the_worker_starts(store_url: str) -> None:
    """The store URL comes from each app's settings: an app that binds a shared transactional task it never runs
    still starts, and a worker that would run it says so as it starts."""
    app, _ = transactional_pay(store_url, None)
    app.finalize()
    assert any(w.startswith("tx.pay: a transactional task needs a SQL database") and "set transaction_url" in w
               for w in check_settings(app))


def test_a_transaction_url_whose_driver_is_missing_binds_and_is_reported_where_a_worker_starts() -> None:
    """A web process submits without the database driver its workers use; a worker without it says so as it
    starts, and gives each operation it takes back unrun, for a worker that has the driver: a host's missing
    package is not the operation's failure."""
    store = MemoryStore()
    app, pay = transactional_pay(store, "postgresql+psycopg2://u:s3cret@db/shop")  # psycopg2 is not installed here
    app.finalize()
    sub = pay.submit((), key="order-1")  # published: the memory broker keeps it
    assert sub.created and store.get_by_id(sub.operation.id).status is Status.PENDING  # type: ignore[union-attr]
    warned = [w for w in check_settings(app) if w.startswith("tx.pay: a transactional task needs a SQL database "
                                                             "this worker can open")]
    assert len(warned) == 1 and "psycopg2" in warned[0] and "s3cret" not in warned[0]

    app.conf.task_always_eager = True
    ran = pay.submit((), key="order-2")
    op = store.get_by_id(ran.operation.id)
    assert op is not None and op.status is Status.PENDING and op.lease_owner is None and op.error is None
    assert op.attempts == 1 and op.crashes == 0  # claimed, then given back before its body: not a crash


def test_without_a_sql_database_each_operation_fails_once_and_is_not_retried() -> None:
    """A misconfiguration does not pass with time: even under ``retry_on=(ValueError,)`` (ConfigurationError is a
    ValueError), the operation is stored as failed at its first attempt, without running the body."""
    store = MemoryStore()
    app, pay = transactional_pay(store, None, retry_on=(ValueError,))
    app.conf.task_always_eager = True
    sub = pay.submit((), key="order-1")
    op = store.get_by_id(sub.operation.id)
    assert op is not None and op.status is Status.FAILED and op.attempts == 1
    assert op.error is not None and op.error.type == "ConfigurationError"
    assert "a MemoryStore, not a URL" in op.error.message


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_transactional_task_on_a_sql_store_object_runs_its_body_on_the_stores_engine(backend: str,
                                                                                       tmp_path: Path) -> None:
    """A store given as an object is its own URL: without transaction_url, the body, its effects marker and the
    operation share the store's database, through the store's engine (its pool, its driver settings)."""
    from tests.conftest import make_store

    store = make_store(backend, tmp_path)
    assert isinstance(store, SQLStore)
    payments = sa.Table(f"pay_{uuid.uuid4().hex[:8]}", sa.MetaData(), sa.Column("order_id", sa.String(40)))
    payments.create(store.engine)
    try:
        app, _ = transactional_pay(store, None)
        app.finalize()
        assert not any("transactional" in w for w in check_settings(app))  # no warning as the worker starts
        engines: list[sa.Engine] = []

        @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, transactional=True, name="tx.pay2")
        def pay2(self: IdempotentTask, order: str) -> str:
            engines.append(self.connection.engine)
            self.connection.execute(payments.insert().values(order_id=order))
            return order

        app.conf.task_always_eager = True
        op_id = pay2.submit(("o-1",), key="order-1").operation.id
        op = store.get_by_id(op_id)
        assert op is not None and op.status is Status.SUCCEEDED and op.result == "o-1"
        assert engines == [store.engine]
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(payments.c.order_id)).scalars().all() == ["o-1"]
            marker = conn.execute(sa.text("SELECT result FROM idemtasks_effects WHERE operation_id = :id"),
                                  {"id": op_id}).scalar_one()
        assert marker == '"o-1"'
    finally:
        payments.drop(store.engine)
        drop(store)
        store.close()


def test_a_transactional_task_on_an_in_memory_sqlite_store_object_is_refused_at_its_first_attempt() -> None:
    """Every thread shares the one connection of an in-memory SQLite database: the lease keeper's commits would
    commit the body's writes halfway. The operation fails once, without running the body."""
    store = SQLStore("sqlite://")
    runs: list[int] = []
    app, _ = transactional_pay(store, None)

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, transactional=True, name="tx.pay2")
    def pay2(self: IdempotentTask) -> None:
        runs.append(1)

    app.finalize()
    assert any(w.startswith("tx.pay2: a transactional task needs a SQL database") for w in check_settings(app))
    app.conf.task_always_eager = True
    op = store.get_by_id(pay2.submit((), key="order-1").operation.id)
    assert op is not None and op.status is Status.FAILED and op.error is not None and runs == []
    assert op.error.type == "ConfigurationError" and "set transaction_url" in op.error.message
    store.close()


def test_task_key_function_returning_a_bad_key_fails_without_storing(tmp_path: Path) -> None:
    app = Celery("bad", set_as_current=False)
    app.conf.update(task_always_eager=True, idemtasks_store_url="memory://")

    @app.task(shared=False, base=IdempotentTask, key_func=lambda x: "", name="bad.keyed")
    def keyed(x: int) -> int:
        return x

    result = keyed.apply((1,))
    assert isinstance(result.result, InvalidKey)


def keyed_pay(store_url: Store | str, *, retry_max: float) -> tuple[Celery, Any, Counter[str]]:
    """An app whose ``pay(order)`` is keyed ``order-<order>``, sent without submit, and the count of its runs."""
    app = Celery(f"pay{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(idemtasks_store_retry_max=retry_max, task_ignore_result=True, task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store_url, name=f"{app.main}.pay",
              key_func=lambda order: f"order-{order}")
    def pay(self: IdempotentTask, order: int) -> int:
        runs[self.operation.key] += 1
        return order

    return app, pay, runs


@pytest.mark.timeout(60)
def test_worker_never_runs_the_body_while_the_store_is_down_and_resumes_after(private_redis: PrivateRedis) -> None:
    store = open_store(f"redis://127.0.0.1:{private_redis.port}/0", socket_timeout=0.5)
    app, pay, runs = keyed_pay(store, retry_max=0.5)

    with start_worker(app, pool="solo", perform_ping_check=False):
        private_redis.stop()
        pay.apply_async((7,))
        time.sleep(2.0)  # several claim attempts fail meanwhile, each republishing the message
        assert runs["order-7"] == 0
        private_redis.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ((op := _get(store)) and op.is_final):
            time.sleep(0.1)
    op = _get(store)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == 7
    assert runs["order-7"] == 1


@pytest.mark.timeout(60)
def test_a_worker_whose_store_refuses_loses_nothing_and_runs_the_body_once_it_answers() -> None:
    """Not an outage (the table does not exist yet), yet waited out like one, and logged as a failure."""
    services.require("postgres")
    store = SQLStore(services.POSTGRES_URL, table=f"t{uuid.uuid4().hex[:12]}", create_schema=False)
    app, pay, runs = keyed_pay(store, retry_max=0.3)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("idemtasks.task").addHandler(handler)

    try:
        with start_worker(app, pool="solo", perform_ping_check=False):
            pay.apply_async((7,))
            time.sleep(1.5)  # the claim is refused, and the message republished, several times
            assert runs["order-7"] == 0
            create_tables(store.engine, [store.table])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not ((op := store.get("global", "order-7")) and op.is_final):
                time.sleep(0.1)
        op = store.get("global", "order-7")
        assert op is not None and op.status is Status.SUCCEEDED and op.result == 7
        assert runs["order-7"] == 1
        refusals = [m for m in logged if "the body did not run" in m]
        assert refusals and all(" failed for " in m and "UndefinedTable" in m for m in refusals)
    finally:
        logging.getLogger("idemtasks.task").removeHandler(handler)
        drop(store)


@pytest.mark.timeout(60)
def test_a_store_that_cannot_be_opened_yet_loses_no_message(tmp_path: Path) -> None:
    """The store is opened on first use in each worker process (its table created or upgraded). A database that
    cannot be opened then is waited out like an outage: before, Celery acked the message as failed, and a message
    sent without ``submit`` had no record for recovery to publish again."""
    later = tmp_path / "later"  # a SQLite file in a directory that does not exist yet: it cannot be opened
    url = f"sqlite:///{later / 'ops.sqlite3'}"
    app, pay, runs = keyed_pay(url, retry_max=0.3)

    with start_worker(app, pool="solo", perform_ping_check=False):
        pay.apply_async((7,))
        time.sleep(1.5)  # every delivery fails to open the store, and republishes its message
        assert runs["order-7"] == 0
        later.mkdir()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and runs["order-7"] == 0:
            time.sleep(0.1)
    store = open_store(url)
    op = store.get("global", "order-7")
    assert op is not None and op.status is Status.SUCCEEDED and op.result == 7
    assert runs["order-7"] == 1
    store.close()


def _get(store: object) -> object:
    try:
        return store.get("global", "order-7")  # type: ignore[attr-defined]
    except StoreUnavailable:
        return None


def _transactional_app(tmp_path: Path, name: str) -> tuple[Store, Celery]:
    """A SQLite store and an app on the in-memory broker, whose store outages are retried within 0.3 s."""
    store = open_store(f"sqlite:///{tmp_path / 'ops.sqlite3'}")
    app = Celery(f"{name}{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    # The in-memory broker is shared by the whole process: a message still coming back when the test ends must
    # not reach another test, so each app gets a queue (and keys) no other test uses.
    app.conf.update(idemtasks_store_retry_max=0.3, task_ignore_result=True, task_default_queue=app.main)
    return store, app


@pytest.mark.timeout(60)
def test_a_transactional_task_whose_database_is_down_never_stores_a_failure(tmp_path: Path) -> None:
    store, app = _transactional_app(tmp_path, "dbdown")
    runs: Counter[str] = Counter()
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/ledger?connect_timeout=1"

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", transactional=True,
              transaction_url=nowhere)
    def pay(self: IdempotentTask, order: int) -> int:
        runs[self.operation.key] += 1
        return order

    with start_worker(app, pool="solo", perform_ping_check=False):
        key = f"order-{uuid.uuid4().hex}"
        op_id = pay.submit((7,), key=key).operation.id
        time.sleep(3.0)  # several attempts meet the unreachable database, each coming back later
        op = store.get_by_id(op_id)
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(app.main)
    # Settle it, so that no sweeper of a later test (recovery sweeps every store it knows) finds it pending.
    assert op is not None
    held = store.claim("global", key, op.task_name, op.fingerprint, owner="test", lease=60.0, ttl=3600.0)
    if held.outcome is ClaimOutcome.CLAIMED:
        store.succeed(held.operation, held.operation.fencing_token, "7", ttl=3600.0)
    assert runs[key] == 0
    # Given back for the next attempt (or still held by the one in flight): never stored as the payment's outcome.
    assert op is not None and op.status in (Status.PENDING, Status.RUNNING) and op.attempts >= 2


@pytest.mark.timeout(60)
def test_a_transactional_body_that_finds_its_pool_exhausted_is_retried_not_failed(tmp_path: Path) -> None:
    store, app = _transactional_app(tmp_path, "pool")
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", transactional=True,
              transaction_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    def pay(self: IdempotentTask, order: int) -> int:
        runs[self.operation.key] += 1
        if runs[self.operation.key] == 1:
            # What SQLAlchemy raises when every connection of a pool the body uses is busy: infrastructure, like a
            # lost connection, so the attempt rolls back and comes back later instead of storing a failure.
            raise sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out")
        return order

    key = f"order-{uuid.uuid4().hex}"
    with start_worker(app, pool="solo", perform_ping_check=False):
        op_id = pay.submit((7,), key=key).operation.id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ((op := store.get_by_id(op_id)) and op.is_final):
            time.sleep(0.1)
    op = store.get_by_id(op_id)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == 7
    assert runs[key] == 2


def test_a_retry_of_an_operation_whose_stored_call_cannot_be_read_still_retries() -> None:
    """A damaged or hand-written record: the retry's call replaces the stored one, rather than the retry failing
    the payment on a JSON error of the old call."""
    store = MemoryStore()
    app = Celery(f"rt{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    seen: list[tuple[int, int]] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name="rt.step", max_retries=2)
    def step(self: IdempotentTask, n: int) -> int:
        seen.append((n, self.request.retries))
        if self.request.retries == 0:
            self.retry(args=(n + 1,), countdown=0)
        return n

    op = store.create("global", "k", "rt.step", "fp", ttl=3600, payload="not a stored call").operation
    step.publish(op, (1,), {})
    done = store.get_by_id(op.id)
    assert done is not None and done.status is Status.SUCCEEDED and done.result == 2
    assert seen == [(1, 0), (2, 1)] and done.payload == '["rt.step",[2],{},{"retries":1}]'


def test_a_transactional_task_on_a_store_that_creates_no_schema_still_gets_its_markers_table(tmp_path: Path) -> None:
    """Without the markers' table no body could ever commit, and every attempt would come back for ever: it is
    created if missing, as it is for a transaction_url, even where the store leaves its own schema to migrations."""
    url = f"sqlite:///{tmp_path / 'shop.sqlite3'}"
    SQLStore(url, table="ops").close()  # the operations table, as a migration would make it
    store = SQLStore(url, table="ops", create_schema=False)
    app = Celery(f"tx{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, transactional=True, name="tx.pay3")
    def pay3(self: IdempotentTask) -> str:
        return "paid"

    op = store.get_by_id(pay3.submit((), key="order-1").operation.id)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == "paid"
    assert "idemtasks_effects" in sa.inspect(store.engine).get_table_names()
    store.close()


@pytest.mark.parametrize(("submitted", "retry_with", "sent"), [
    ((), {"a": 1, "b": 2}, ([5], {"b": 2})),  # retry(args=[5]) of a call by keywords: b kept, a replaced
    ((1, 2), {}, ([5, 2], {})),
])
def test_the_call_a_retry_stores_is_the_one_celery_sends(submitted: tuple[int, ...], retry_with: dict[str, int],
                                                         sent: tuple[list[int], dict[str, int]]) -> None:
    """Celery merges a retry's new positional arguments with the inherited keyword ones by parameter name: recovery
    must publish what Celery sent, or Celery's own argument check refuses the copy at every sweep."""
    store = MemoryStore()
    app = Celery(f"rt{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    calls: list[tuple[int, int]] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name="rt.charge", max_retries=1)
    def charge(self: IdempotentTask, a: int, b: int) -> int:
        calls.append((a, b))
        if self.request.retries == 0:
            self.retry(args=[5] if not submitted else [5, b], countdown=0)
        return a + b

    op = charge.submit(submitted, retry_with, key="k").operation
    done = store.get_by_id(op.id)
    assert done is not None and done.status is Status.SUCCEEDED and calls[-1] == (5, 2)
    assert done.payload == json.dumps(["rt.charge", sent[0], sent[1], {"retries": 1}], separators=(",", ":"))


def test_a_task_class_that_builds_its_retry_signature_itself_still_gives_the_operation_back() -> None:
    """The give-back rides on Celery's signature_from_request; a subclass that overrides it without calling super()
    still gets its operation given back for the retry (once the retry is out), not left to its lease and a crash."""
    store = MemoryStore()
    app = Celery(f"rt{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True

    class Routed(IdempotentTask):
        def signature_from_request(self, request: Any = None, args: Any = None, kwargs: Any = None,
                                   queue: Any = None, **extra: Any) -> Any:
            request = self.request if request is None else request
            return self.signature(request.args if args is None else args,
                                  request.kwargs if kwargs is None else kwargs, {"queue": "special", **extra},
                                  type=self)

    @app.task(shared=False, base=Routed, bind=True, store_url=store, name="rt.routed", max_retries=1,
              lease_seconds=30.0)
    def routed(self: IdempotentTask, n: int) -> int:
        if self.request.retries == 0:
            self.retry(args=(n + 1,), countdown=0)
        return n

    op = store.get_by_id(routed.submit((1,), key="k").operation.id)
    assert op is not None and op.status is Status.SUCCEEDED and op.result == 2 and op.crashes == 0
    assert op.payload == '["rt.routed",[2],{},{"retries":1}]'


@pytest.mark.timeout(90)
def test_values_over_the_mariadb_servers_packet_limit_are_too_large_and_a_body_runs_once() -> None:
    """MariaDB cuts a statement over its ``max_allowed_packet`` off with the connection ("server has gone away"), which
    reads as an outage: a result under the task's own limit but over the server's was sent again and again, and each
    takeover of the lapsed lease ran the body again, until TooManyCrashes; such arguments looped the same way. The
    store learns the server's limit from the connections it uses (an application's engine's, opened before it,
    included) and holds the task's limits to it, on every path that stores a call or a result."""
    from celery.signals import task_failure

    from idemtasks.aio import submit_async
    from idemtasks.stores.sql_schema import packet_value_limit

    services.require("mysql")
    engine = sa.create_engine(services.MYSQL_URL)
    with engine.connect() as conn:  # pooled before the store exists: no new connection will tell it the limit
        packet = int(conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar_one())
    store = SQLStore(services.MYSQL_URL, engine=engine, table=f"t{uuid.uuid4().hex[:12]}")
    failures: list[tuple[str, type[BaseException]]] = []

    def failed(task_id: str, exception: BaseException, **_: Any) -> None:
        failures.append((task_id, type(exception)))

    task_failure.connect(failed, weak=False)
    try:
        assert store.value_limit == packet_value_limit(packet)
        app = Celery(f"pkt{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
        app.conf.update(task_ignore_result=True, task_default_queue=app.main, idemtasks_lease=2.0,
                        idemtasks_max_result_bytes=4 * packet, idemtasks_max_args_bytes=4 * packet)
        runs: Counter[str] = Counter()

        @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.big")
        def big(self: IdempotentTask, pad: str = "") -> str:
            runs[self.operation.key] += 1
            return "x" * (packet + 1)  # under the task's limit, over the server's

        over = "y" * (packet + 1)
        with pytest.raises(TooLarge):  # arguments too: refused before anything is stored
            big.submit((over,), key="too-big-args")
        with pytest.raises(TooLarge):
            asyncio.run(submit_async(big, (over,), key="too-big-args"))
        assert store.get("global", "too-big-args") is None
        with start_worker(app, pool="solo", perform_ping_check=False):
            sub = big.submit((), key="big-result")
            sent = big.apply_async((over,))  # without submit: its claim would store the call
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ((op := store.get_by_id(sub.operation.id)) and op.is_final
                                                       and len(failures) == 2):
                time.sleep(0.1)
            time.sleep(0.5)
        op = store.get_by_id(sub.operation.id)
        assert op is not None and op.status is Status.FAILED and op.error is not None
        assert op.error.type == "TooLarge" and op.attempts == 1
        assert runs["big-result"] == 1
        # Each failed once (the second one's message not sent round as in an outage), with TooLarge.
        assert sorted(failures) == sorted([(sub.operation.id, TooLarge), (sent.id, TooLarge)])
        assert store.get("celery-task-id", sent.id) is None and runs[sent.id] == 0
    finally:
        task_failure.disconnect(failed)
        drop(store)
        engine.dispose()
