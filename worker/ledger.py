"""The service's own database: one ledger row per charge."""

from __future__ import annotations

import sqlalchemy as sa

from idemtasks.stores.sql_schema import create_tables, make_engine

from . import settings

metadata = sa.MetaData()
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("operation_id", sa.String(64), nullable=False, index=True),
    sa.Column("account", sa.String(255), nullable=False, index=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
)

_engine: sa.Engine | None = None


def engine() -> sa.Engine:
    """The ledger's engine, its table created on first use (every process may be first; processes that create it
    together are sorted out by create_tables). Connecting waits as long as the store's connections do."""
    global _engine
    if _engine is None:
        made = make_engine(settings.DATABASE_URL, pool_pre_ping=True)
        create_tables(made, [ledger])
        _engine = made  # only once the table exists: a process whose first try failed tries again
    return _engine


def ensure_table(conn: sa.Connection) -> None:
    """Make sure the table exists before a charge writes to it through ``conn``, its own transaction.

    On SQLite through ``conn`` itself: the charge's transaction holds the database's write lock (BEGIN IMMEDIATE),
    which another connection's CREATE TABLE would wait on until the busy timeout; and that lock serialises the
    charges, so two never create it together. Elsewhere through the ledger's engine, whose create_tables copes with
    charges that create it together (inside their own transactions, both would see no table, and the loser's
    duplicate CREATE would fail the payment for good)."""
    if _engine is not None:
        return
    if conn.dialect.name == "sqlite":
        metadata.create_all(conn, checkfirst=True)
    else:
        engine()


def account(name: str) -> dict[str, object]:
    with engine().connect() as conn:
        rows = conn.execute(
            sa.select(ledger.c.operation_id, ledger.c.amount).where(ledger.c.account == name).order_by(ledger.c.id)
        ).all()
    charges = [{"operation_id": r.operation_id, "amount": r.amount} for r in rows]
    return {"account": name, "balance": sum(int(r.amount) for r in rows), "charges": charges}
