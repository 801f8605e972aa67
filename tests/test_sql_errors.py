"""Which database errors are outages, decided by the driver's code: real errors from real servers.

A statement's fault must not be waited out: a transactional payment whose INSERT breaks a CHECK rule would otherwise
come back forever, running its body on every pass.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker

from idemtasks import IdempotentTask, Status, open_store
from idemtasks.stores.sql_errors import pg_outage
from idemtasks.stores.sql_schema import is_outage
from tests import services


def _error(engine: sa.Engine, *statements: str) -> sa.exc.DBAPIError:
    with pytest.raises(sa.exc.DBAPIError) as caught, engine.connect() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    return caught.value


def _server(service: str, url: str) -> Iterator[sa.Engine]:
    services.require(service)
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres() -> Iterator[sa.Engine]:
    yield from _server("postgres", services.POSTGRES_URL)


@pytest.fixture
def mariadb() -> Iterator[sa.Engine]:
    yield from _server("mysql", services.MYSQL_URL)


def test_postgresql_a_statement_over_a_program_limit_is_its_own_fault(postgres: sa.Engine) -> None:
    exc = _error(postgres, "SELECT concat(" + ", ".join(["1"] * 101) + ")")  # 54023: over 100 arguments
    assert isinstance(exc, sa.exc.OperationalError)  # psycopg's class for it: the class alone would say outage
    assert not is_outage(exc)


def test_postgresql_a_statement_timeout_is_an_outage(postgres: sa.Engine) -> None:
    exc = _error(postgres, "SET statement_timeout = 50", "SELECT pg_sleep(2)")  # 57014
    assert is_outage(exc)


def test_postgresql_a_read_only_server_is_an_outage_though_psycopg_files_it_as_internal(postgres: sa.Engine) -> None:
    """A standby during a failover refuses writes with 25006, which psycopg raises as an InternalError: the class
    alone would make the store answer 500 (and a transactional body's payment fail) instead of waiting it out."""
    exc = _error(postgres, "SET TRANSACTION READ ONLY", "CREATE TABLE ro_probe (i int)")
    assert isinstance(exc, sa.exc.InternalError)
    assert is_outage(exc)


def test_postgresql_an_unreachable_server_is_an_outage() -> None:
    from tests.private_redis import free_port

    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x?connect_timeout=1")
    with pytest.raises(sa.exc.OperationalError) as caught:
        engine.connect()
    assert is_outage(caught.value)


@pytest.mark.parametrize(("sqlstate", "outage"), [
    (None, True), ("08006", True), ("25006", True), ("28P01", True), ("40001", True), ("40P01", True), ("53300", True),
    ("55P03", True), ("57P01", True), ("57014", True), ("58030", True),
    ("54000", False), ("54023", False), ("55000", False), ("40002", False), ("27000", False), ("2F005", False),
    ("42501", False), ("23514", False),
])
def test_postgresql_sqlstates(sqlstate: str | None, outage: bool) -> None:
    """The rule the pipelined connection applies to the SQLSTATE its error arrives with."""
    assert pg_outage(sqlstate) is outage


def test_mariadb_a_check_violation_is_the_statements_fault(mariadb: sa.Engine) -> None:
    table = f"checked_{uuid.uuid4().hex[:8]}"
    try:
        exc = _error(mariadb, f"CREATE TABLE {table} (amount INT CHECK (amount > 0))",
                     f"INSERT INTO {table} VALUES (-5)")
    finally:
        with mariadb.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    assert isinstance(exc, sa.exc.OperationalError) and exc.orig.args[0] == 4025
    assert not is_outage(exc)


def test_mariadb_a_lock_wait_timeout_is_an_outage(mariadb: sa.Engine) -> None:
    table = f"locked_{uuid.uuid4().hex[:8]}"
    with mariadb.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (id INT PRIMARY KEY) ENGINE=InnoDB")
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
    try:
        with mariadb.connect() as holder:
            holder.exec_driver_sql(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
            exc = _error(mariadb, "SET SESSION innodb_lock_wait_timeout = 1",
                         f"UPDATE {table} SET id = 2 WHERE id = 1")
            holder.rollback()
    finally:
        with mariadb.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    assert exc.orig.args[0] == 1205
    assert is_outage(exc)


def test_sqlite_a_missing_table_is_the_statements_fault(tmp_path: Path) -> None:
    exc = _error(sa.create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}"), "SELECT * FROM nowhere")
    assert isinstance(exc, sa.exc.OperationalError)
    assert not is_outage(exc)


def test_sqlite_a_locked_database_is_an_outage(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}", connect_args={"timeout": 0.05})
    with engine.connect() as holder:
        holder.exec_driver_sql("CREATE TABLE t (x INT)")
        holder.commit()
        holder.exec_driver_sql("BEGIN EXCLUSIVE")
        exc = _error(engine, "INSERT INTO t VALUES (1)")
        holder.rollback()
    assert is_outage(exc)


@pytest.mark.timeout(60)
def test_a_transactional_payment_that_breaks_a_check_rule_fails_once(mariadb: sa.Engine, tmp_path: Path) -> None:
    """Before, MariaDB's CHECK error (an OperationalError in pymysql) was taken for an outage: the attempt was
    given back and came again, forever, running the body each time."""
    table = f"ledger_{uuid.uuid4().hex[:8]}"
    with mariadb.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (amount INT CHECK (amount > 0))")
    store = open_store(f"sqlite:///{tmp_path / 'ops.sqlite3'}")
    app = Celery(f"chk{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(idemtasks_store_retry_max=0.3, task_ignore_result=True, task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", transactional=True,
              transaction_url=services.MYSQL_URL)
    def pay(self: IdempotentTask, amount: int) -> int:
        runs[self.operation.key] += 1
        self.connection.exec_driver_sql(f"INSERT INTO {table} VALUES ({int(amount)})")
        return amount

    key = f"order-{uuid.uuid4().hex}"
    try:
        with start_worker(app, pool="solo", perform_ping_check=False):
            op_id = pay.submit((-5,), key=key).operation.id
            op = _until(lambda: store.get_by_id(op_id), lambda op: op is not None and op.is_final, timeout=20)
            time.sleep(1.0)  # time enough for a wrongly given-back attempt to come again
    finally:
        with mariadb.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    assert op.status is Status.FAILED and op.error is not None and op.error.type == "OperationalError"
    assert "CONSTRAINT" in op.error.message.upper()
    assert runs[key] == 1


def _until(read: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if done(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"not done after {timeout} s: {read()!r}")

