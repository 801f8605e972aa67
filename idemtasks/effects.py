"""Transactional mode: the body's database writes commit exactly once, together with a completion marker.

The body of a ``transactional`` task runs inside one SQL transaction on the user's database. Before it commits, a
row keyed by the operation id is inserted into ``idemtasks_effects`` in that same transaction. The primary key lets
exactly one transaction per operation commit: a second holder (a takeover after a crash, or a zombie that lost its
lease but kept running) collides with the committed marker, rolls its own writes back, and adopts the stored result.
Because the marker lives next to the business rows, this holds whatever store keeps the operations (Redis or SQL).

A holder whose body failed seals the failure the same way, before it stores the operation as failed: it inserts a
*failure marker* (``result`` is ``!failed `` followed by the JSON ``[error type, message]``, which no result's JSON
can look like) in a transaction of its own. A zombie that commits later collides with it and rolls back; if a zombie
committed first, the insert collides with its marker, and the committed result is adopted instead of the failure.

Table ``idemtasks_effects``: ``operation_id`` VARCHAR(64) primary key, ``fencing_token`` BIGINT,
``result`` TEXT (JSON, or a failure marker), ``created_at`` DOUBLE (epoch seconds).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import Retry

from .errors import ConfigurationError, IdemtasksError, StoreError, StoreUnavailable
from .forks import fresh_in_child
from .models import ErrorInfo

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql
    from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("transactional tasks need SQLAlchemy: pip install idemtasks[sql]") from exc

__all__ = ["FAILURE_PREFIX", "EffectsLedger", "effects_table", "failure_of", "ledger_for", "ledger_on",
           "sealed_outcome"]

#: How a failure marker's ``result`` starts: JSON text never starts with ``!``.
FAILURE_PREFIX = "!failed "


def failure_of(marker: str) -> tuple[str, str] | None:
    """``(error type, message)`` if ``marker`` is a failure marker, ``None`` if it is a committed result."""
    if not marker.startswith(FAILURE_PREFIX):
        return None
    error_type, message = json.loads(marker[len(FAILURE_PREFIX):])
    return str(error_type), str(message)


def sealed_outcome(ledger: EffectsLedger, operation_id: str, token: int, error: ErrorInfo) -> str | ErrorInfo:
    """Seal ``error`` as the operation's failure (:meth:`EffectsLedger.seal_failure`) and say what stands: the
    result marker another holder committed first (the outcome, to adopt), or the failure sealed, ``error`` or one an
    earlier holder sealed before it died."""
    marker = ledger.seal_failure(operation_id, token, error.type, error.message)
    failed = failure_of(marker)
    return marker if failed is None else ErrorInfo(*failed)


def effects_table(metadata: sa.MetaData, name: str = "idemtasks_effects") -> sa.Table:
    """The marker table, for users who manage their schema with migrations."""
    return sa.Table(
        name, metadata,
        sa.Column("operation_id", sa.String(64), primary_key=True),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("result", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")),
        sa.Column("created_at", sa.Float(53), nullable=False, index=True),
    )


class EffectsLedger:
    """The marker table on one database, and the transactions the bodies run in."""

    def __init__(self, url: str, *, engine: sa.Engine | None = None, create_schema: bool = True) -> None:
        if engine is None:
            from .stores.sql_schema import make_engine

            engine = make_engine(url)
        self.engine = engine
        from .stores.sql_schema import watch_packet_limit

        watch_packet_limit(engine)  # the result goes into the marker's row: held to the server's packet limit too
        self.table = effects_table(sa.MetaData())
        #: The guard of each transaction under way, by its connection's id (see _Guard).
        self._guards: dict[int, _Guard] = {}
        if create_schema:
            from .stores.sql_schema import create_tables

            with _wrapped():
                create_tables(engine, [self.table])

    @property
    def value_limit(self) -> int | None:
        """The longest result the ledger's server can take (see :attr:`Store.value_limit
        <idemtasks.stores.base.Store.value_limit>`), or ``None``."""
        from .stores.sql_schema import packet_limit

        return packet_limit(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A connection inside a transaction: committed on normal exit, rolled back on an exception.

        Only the database's own failures are wrapped; what the body raises passes through unchanged.
        """
        from .stores.sql_schema import SQLITE_IMMEDIATE

        with _wrapped():
            # On SQLite the body takes the write lock as it begins: a body that reads, then writes, would otherwise
            # fail at once whenever another writer held the lock when it came to write (see SQLITE_IMMEDIATE).
            conn = self.engine.connect().execution_options(**{SQLITE_IMMEDIATE: True})
            tx = conn.begin()
        guard = self._guards[id(conn)] = _Guard(tx)
        sa.event.listen(conn, "commit", guard.check)
        try:
            yield conn
            if (problem := guard.problem()) is not None:  # the body went on past a refusal, or rolled back itself
                raise problem
        except BaseException as exc:
            guard.ours = True
            if guard.refused is not None:
                # SQLAlchemy counts the refused commit as done, though the database never saw it: the connection
                # would go back to the pool in the body's open transaction, which its next user could commit. It
                # is rolled back on the driver's connection (discarded if even that fails).
                try:
                    conn.connection.rollback()
                except Exception:
                    conn.invalidate()
                # What the body met after the refusal (SQLAlchemy's PendingRollback…) gives way to it; a retry the
                # body sent meanwhile stands (the operation is given back and its message out).
                if exc is not guard.refused and not isinstance(exc, Retry):
                    raise guard.refused from exc
            elif tx.is_active:  # not after a rollback of the body's own (an ORM Session's, as an exception unwinds)
                tx.rollback()
            raise
        else:
            guard.ours = True
            with _wrapped():
                tx.commit()
        finally:
            guard.ours = True
            del self._guards[id(conn)]
            conn.close()

    def record(self, conn: sa.Connection, operation_id: str, token: int, result_json: str) -> str | None:
        """Insert the marker inside the body's transaction; return ``None`` if this transaction owns the effects,
        or the marker of the holder that got there first, a result or a failure (the caller must then roll back)."""
        guard = self._guards.get(id(conn))
        if guard is not None and (problem := guard.problem()) is not None:  # see _Guard
            raise problem
        try:
            with _wrapped(aborted=_ABORTED), conn.begin_nested():
                conn.execute(self.table.insert().values(
                    operation_id=operation_id, fencing_token=token, result=result_json, created_at=time.time()))
            return None
        except IntegrityError:
            # The other holder committed first (on PostgreSQL and MariaDB our INSERT waited for its commit).
            prior = self.lookup(operation_id, conn=conn)
            if prior is None:  # pragma: no cover - would mean the row vanished between two statements
                raise StoreError(f"effects marker of {operation_id} collided but cannot be read") from None
            return prior

    def seal_failure(self, operation_id: str, token: int, error_type: str, message: str) -> str:
        """Insert a failure marker in a transaction of its own, so that no holder can commit effects afterwards;
        return the marker that stands: this one, or what another holder committed first (a result, which the
        caller must adopt, or an earlier failure marker)."""
        marker = FAILURE_PREFIX + json.dumps([error_type, message])
        try:
            with _wrapped(), self.engine.begin() as conn:
                conn.execute(self.table.insert().values(
                    operation_id=operation_id, fencing_token=token, result=marker, created_at=time.time()))
            return marker
        except IntegrityError:
            # On PostgreSQL and MariaDB the INSERT waited for a holder's open transaction: that one committed.
            prior = self.lookup(operation_id)
            if prior is None:  # pragma: no cover - would mean the row vanished between two statements
                raise StoreError(f"effects marker of {operation_id} collided but cannot be read") from None
            return prior

    def lookup(self, operation_id: str, *, conn: sa.Connection | None = None) -> str | None:
        """The result JSON (or failure marker) committed for ``operation_id``, or ``None`` if nothing was."""
        query = sa.select(self.table.c.result).where(self.table.c.operation_id == operation_id)
        with _wrapped():
            if conn is not None:
                row = conn.execute(query).first()
            else:
                with self.engine.connect() as own:
                    row = own.execute(query).first()
        return None if row is None else str(row[0])

    def purge(self, older_than: float) -> int:
        """Delete markers of operations that have long expired from the store."""
        with _wrapped(), self.engine.begin() as conn:
            return int(conn.execute(self.table.delete().where(self.table.c.created_at < older_than)).rowcount)


#: Why the marker cannot be written into a transaction PostgreSQL holds aborted (SQLSTATE 25P02): a statement of the
#: body failed, and the body caught the error and went on.
_ABORTED = ("the body's transaction cannot take the effects marker, so nothing it wrote can commit: a statement "
            "that fails inside it must be rolled back to a savepoint (self.connection.begin_nested()) before the "
            "body goes on, or PostgreSQL refuses every later one")


class _Guard:
    """The body's transaction is the ledger's to end, with the marker.

    A body's own ``commit()`` is refused: its writes would be kept without the marker, so that its operation could
    fail, or its holder die, and run again, writing them twice. A rollback of its own is let through (an ORM Session
    bound to the connection rolls it back as an exception unwinds, and nothing is kept), but a body that goes on
    and returns after one cannot commit: its later writes are not in the transaction the marker closes."""

    def __init__(self, tx: sa.RootTransaction) -> None:
        self.tx = tx
        self.ours = False
        self.refused: IdemtasksError | None = None

    def check(self, _conn: sa.Connection) -> None:
        if not self.ours:
            self.refused = IdemtasksError("a transactional body must not commit self.connection: the transaction "
                                          "commits with the effects marker once the body returns (use "
                                          "self.connection.begin_nested() for a savepoint); nothing was committed")
            raise self.refused

    def problem(self) -> IdemtasksError | None:
        """Why the body's transaction cannot commit, if it cannot."""
        if self.refused is not None:
            return self.refused
        if not self.tx.is_active:
            return IdemtasksError("the transactional body rolled back self.connection and went on: its transaction "
                                  "commits with the effects marker, and what the body wrote after the rollback is "
                                  "not in it; nothing was committed (use self.connection.begin_nested() for a "
                                  "savepoint)")
        return None


@contextmanager
def _wrapped(*, aborted: str | None = None) -> Iterator[None]:
    try:
        yield
    except IntegrityError:
        raise
    except (SQLAlchemyError, DBAPIError) as exc:
        from .stores.sql import _pg_code
        from .stores.sql_schema import is_outage

        orig = getattr(exc, "orig", None) or exc  # the driver's message: SQLAlchemy's quotes statement and values
        if is_outage(exc):
            raise StoreUnavailable(f"transaction database unreachable: {type(orig).__name__}: {orig}") from exc
        why = f"{type(orig).__name__}: {orig}"
        if aborted and _pg_code(exc) == "25P02":  # in_failed_sql_transaction
            why = f"{aborted} ({why})"
        raise StoreError(f"transaction database error: {why}") from exc


_ledgers: dict[tuple[int, str], EffectsLedger] = {}
# By store: a store dropped by its application takes its ledger along.
_store_ledgers: weakref.WeakKeyDictionary[Any, tuple[int, EffectsLedger]] = weakref.WeakKeyDictionary()
# Held while a ledger opens (its engine, its table): each forked child gets its own (see idemtasks.forks).
_lock = threading.Lock()
fresh_in_child(sys.modules[__name__], "_lock", threading.Lock)


def ledger_for(url: str) -> EffectsLedger:
    """One ledger per database URL and per process (pool children must not share their parent's sockets)."""
    key = (os.getpid(), url)
    with _lock:
        ledger = _ledgers.get(key)
        if ledger is None:
            ledger = _ledgers[key] = EffectsLedger(url)
        return ledger


def ledger_on(store: Any) -> EffectsLedger:
    """The ledger on a SQL store's own engine, its pool and driver settings: the database of a transactional task
    whose store is given as an object and which names no ``transaction_url``. One per store and per process.

    The marker table is created if it is missing, whatever the store's ``create_schema`` says, as it is for a
    ``transaction_url``: without it no body could ever commit, and every attempt would come back, for ever. (Where
    it exists, creating it is only a look.)"""
    if store.one_connection:
        # One connection for every thread (an in-memory SQLite database): the lease keeper's renewals, committed
        # on it while the body runs, would commit the body's writes with them, halfway.
        raise ConfigurationError(f"a transactional task cannot run its body on {store.where}, whose one connection "
                                 "every thread shares; set transaction_url")
    with _lock:
        pid, ledger = _store_ledgers.get(store, (None, None))
        if ledger is None or pid != os.getpid():
            ledger = EffectsLedger(store.url, engine=store.engine)
            _store_ledgers[store] = (os.getpid(), ledger)
        return ledger

