"""The SQL store's statements: what each database is sent, not only what it answers (the contract suite checks that)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from psycopg import _queries as psycopg_queries
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from idemtasks.stores.sql_schema import operations_table
from idemtasks.stores.sql_statements import Statements

# PostgreSQL truncates identifiers at 63 bytes: no table name can be longer.
LONGEST_TABLE = "t" * 63


@pytest.mark.parametrize("table", ["idemtasks_operations", LONGEST_TABLE])
@pytest.mark.parametrize("name", ["create", "claim"])
def test_postgres_create_and_claim_fit_psycopgs_query_cache(table: str, name: str) -> None:
    """Above psycopg's limit a query's placeholders are converted again on every execution, a tenth of a
    millisecond or more of CPU on each submit and each task; every other statement is short anyway."""
    stmt = getattr(Statements(operations_table(sa.MetaData(), table), "postgresql"), name)
    compiled = stmt.compile(dialect=pg_psycopg.dialect())

    assert len(str(compiled)) <= psycopg_queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(compiled.params) <= psycopg_queries.MAX_CACHED_STATEMENT_PARAMS


def test_postgres_claim_reads_the_clock_once_per_row_it_proposes() -> None:
    """The proposed row carries the statement's clock into the conflict branch: the server evaluates
    ``statement_timestamp()`` only where the new row is built, so every CASE compares against one instant."""
    sql = str(Statements(operations_table(sa.MetaData()), "postgresql").claim.compile(dialect=pg_psycopg.dialect()))
    insert, _, update = sql.partition("ON CONFLICT")

    assert "statement_timestamp()" in insert
    assert "statement_timestamp()" not in update
    assert "excluded.created_at" in update


def test_every_statement_a_postgres_lane_sends_can_be_prepared() -> None:
    """A lane prepares each statement once, with fixed text: an ``IN`` of a list (an expanding parameter) has none,
    and slipped into a completion's WHERE it broke every pipelined completion on PostgreSQL."""
    from idemtasks.stores.sql_lane import LaneStatements, Prepared

    table = operations_table(sa.MetaData())
    lanes = LaneStatements(Statements(table, "postgresql"))
    for prepared in (lanes.create, lanes.claim, lanes.mark_published, *lanes.finish.values()):
        assert b"POSTCOMPILE" not in prepared.text and b"$1" in prepared.text
    with pytest.raises(ValueError, match="expanding parameter"):
        Prepared.compile("q", sa.select(table.c.id).where(table.c.status.in_(["a", "b"])),
                         sa.dialects.postgresql.dialect())
