"""The service's own database: one ledger row per charge."""

from __future__ import annotations

import sqlalchemy as sa

from idemtasks.stores.sql_schema import create_tables

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
    global _engine
    if _engine is None:
        _engine = sa.create_engine(settings.DATABASE_URL, pool_pre_ping=True)
        create_tables(_engine, [ledger])  # every worker process may be first
    return _engine


def account(name: str) -> dict[str, object]:
    with engine().connect() as conn:
        rows = conn.execute(
            sa.select(ledger.c.operation_id, ledger.c.amount).where(ledger.c.account == name).order_by(ledger.c.id)
        ).all()
    charges = [{"operation_id": r.operation_id, "amount": r.amount} for r in rows]
    return {"account": name, "balance": sum(int(r.amount) for r in rows), "charges": charges}
