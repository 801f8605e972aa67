"""Schema creation when many worker processes start at once.

Every worker creates the tables it needs on first use. ``CREATE TABLE`` after an existence check is a race: the
processes that lose it must find the table made, not store a payment as failed (the chaos suite found exactly that).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from idemtasks.stores.sql_schema import create_tables

from .services import MYSQL_URL, POSTGRES_URL, require

pytestmark = pytest.mark.timeout(60)

CONTENDERS = 8
ROUNDS = 4


def _server(name: str) -> str:
    require({"postgresql": "postgres", "mariadb": "mysql"}[name])
    return {"postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[name]


def _all_at_once(work: Callable[[sa.Engine], None], url: str) -> list[BaseException]:
    """Run ``work`` on CONTENDERS threads, each with its own connection, released together by a barrier."""
    barrier = threading.Barrier(CONTENDERS)
    errors: list[BaseException] = []
    engines = [sa.create_engine(url, poolclass=NullPool) for _ in range(CONTENDERS)]

    def contend(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            work(engine)
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    return errors


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_processes_creating_the_same_table_together_all_succeed(server: str) -> None:
    url = _server(server)
    for _ in range(ROUNDS):
        name = f"race_{uuid.uuid4().hex[:12]}"
        table = sa.Table(name, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("account", sa.String(64), index=True))
        try:
            errors = _all_at_once(lambda engine, table=table: create_tables(engine, [table]), url)
            assert errors == []
            with sa.create_engine(url, poolclass=NullPool).connect() as conn:
                assert sa.inspect(conn).has_table(name)
        finally:
            table.drop(sa.create_engine(url, poolclass=NullPool), checkfirst=True)


def test_stores_and_effects_ledgers_opened_together_all_work() -> None:
    from idemtasks.effects import EffectsLedger
    from idemtasks.stores.sql import SQLStore

    url = _server("postgresql")
    suffix = uuid.uuid4().hex[:10]
    made: list[object] = []

    def open_both(engine: sa.Engine) -> None:
        made.append(SQLStore(url, engine=engine, table=f"ops_{suffix}"))
        made.append(EffectsLedger(url, engine=engine))

    try:
        assert _all_at_once(open_both, url) == []
        assert len(made) == 2 * CONTENDERS
    finally:
        with sa.create_engine(url, poolclass=NullPool).begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS ops_{suffix}"))
