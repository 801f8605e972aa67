"""Transactional enqueue (an outbox) for the SQL store.

A web handler records the operation inside its own database transaction, next to its business rows; the message is
published only after the commit. A rollback leaves neither the rows nor the operation. If the process dies between
the commit and the publish, the operation is pending with its call stored, and recovery
(:mod:`idemtasks.recovery`) publishes it once it has waited ``idemtasks_pending_after`` seconds::

    outbox = Outbox(store)                      # a SQLStore on the same database as the handler's tables
    with engine.begin() as conn:
        conn.execute(orders.insert().values(...))
        staged = outbox.stage(conn, charge, (order_id, amount), key=request_key)
    staged.publish()                            # after the commit
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .config import DEFAULT_TTL, being_accepted
from .errors import ConfigurationError, IdempotencyKeyMismatch, StoreUnavailable
from .identity import fingerprint_of_call, key_digest, new_operation_id, stored_call, validate_key, validate_scope
from .models import Operation
from .stores import SQL_SCHEMES, Store, public_url, url_scheme
from .stores.base import CreateRequest, decide_create
from .stores.sql import _MYSQL_DUPLICATE_KEY, _PG_UNIQUE_VIOLATION, DEFAULT_TABLE, SQLStore, _mysql_code, _pg_code
from .task import first_deadline, with_deadline

__all__ = ["Outbox", "Staged"]


@dataclass
class Staged:
    """An operation recorded in a transaction; :meth:`publish` sends its message once that transaction committed."""

    operation: Operation
    created: bool
    task: Any
    args: Any
    kwargs: Any

    def publish(self) -> None:
        if self.created:
            # With the deadline stored with the operation (the task's own expires, as a time), which recovery's
            # copies carry as well: not one counted from this publish.
            self.task.publish(self.operation, self.args, self.kwargs, **first_deadline(self.operation, {}))


class Outbox:
    def __init__(self, store: SQLStore) -> None:
        if not isinstance(store, SQLStore):
            raise ConfigurationError("the outbox needs a SQL store on the same database as the transaction")
        self.store = store

    def stage(self, conn: sa.Connection, task: Any, args: Any = None, kwargs: Any = None, *, key: str,
              scope: str | None = None) -> Staged:
        """Record the operation in ``conn``'s transaction; a repeat of a live key returns it (``created=False``).

        Raises :class:`ConfigurationError` when ``task`` certainly uses another store (Redis, or another table): its
        workers claim, and recovery looks, in the task's own store, so an operation staged here and not published
        before a crash would be lost. Another database behind the same table name is not caught (see the README)."""
        task._settled()
        other = _other_store(task.store_url, self.store)
        if other is not None:
            raise ConfigurationError(f"task {task.name} uses {other}, not this outbox's table "
                                     f"{self.store.table.name!r} in {self.store.url}: its workers and recovery would "
                                     f"never see what is staged here")
        key = validate_key(key)
        scope = validate_scope(scope if scope is not None else task.idempotency_scope)
        call = task.call_of(args, kwargs, self.store)
        digest = key_digest(scope, key)
        try:
            return self._stage(conn, task, args, kwargs, key, scope, call, digest)
        except SQLAlchemyError as exc:  # the caller's connection: an outage is a 503, a statement's fault a 500
            raise self.store._wrap(exc) from exc

    def _stage(self, conn: sa.Connection, task: Any, args: Any, kwargs: Any, key: str, scope: str, call: str,
               digest: str) -> Staged:
        fp = fingerprint_of_call(call)
        t, store = self.store.table, self.store
        now = float(conn.execute(*store.clock_statement()).scalar_one())
        # The deadline (the task's own expires) as a time, stored with the call as submit stores it: recovery fails
        # an operation past it rather than run it late, and its copies carry that time, not one counted anew.
        payload = stored_call(call, with_deadline(task, {}))
        req = CreateRequest(digest, scope, key, task.name, fp, new_operation_id(digest),
                            float(task.idempotency_ttl or DEFAULT_TTL), payload)
        op, _ = decide_create(None, req, now)
        values = {**store._row_values(op, digest), "payload": payload}
        try:
            if conn.dialect.name == "sqlite":
                # No savepoint: a failed statement leaves SQLite's transaction as it was. And an application's own
                # engine may leave transactions to Python's sqlite3, which begins one only at a write: a savepoint
                # taken first would start one of its own and commit the operation on release, whatever the
                # handler's transaction does next.
                conn.execute(t.insert().values(**values))
            else:
                # A savepoint: a duplicate key must not abort the caller's whole transaction (PostgreSQL would).
                with conn.begin_nested():
                    conn.execute(t.insert().values(**values))
            return Staged(op, True, task, args, kwargs)
        except IntegrityError as exc:
            collision = exc
        # At READ COMMITTED a plain read first: it sees the latest committed version, the record that collided,
        # and a row lock would hold that operation's holder (its renewals, its completion) until this transaction
        # ends, the business's own time; a cut renewal sent again would pile up one waiting connection on the server
        # per try, until none were left. Read under a lock when the record is expired (this call replaces it, and
        # must not overwrite a record a claim re-created meanwhile), and at any other level: a plain read there
        # reads the transaction's snapshot, which may hold an older version (a record deleted and re-created since,
        # for another payload), while a locking read reads the latest one (MariaDB/MySQL) or fails the transaction
        # for a retry (PostgreSQL).
        select = sa.select(t).where(t.c.key_hash == digest)
        row = conn.execute(select).one_or_none() if conn.get_isolation_level() == "READ COMMITTED" else None
        if row is None or float(row.expires_at) <= now:
            row = conn.execute(select.with_for_update()).one_or_none()
        if row is None and not _duplicate_key(collision):
            raise collision  # not the key: a column the table lacks a default for, a CHECK (wrapped by stage)
        if row is None:
            # The record that collided was committed after this transaction took its snapshot (PostgreSQL's
            # REPEATABLE READ or SERIALIZABLE: a double-click whose second handler began first). Nothing this
            # transaction can read decides between a replay and a mismatch: a new transaction will see it.
            raise StoreUnavailable(f"SQL store {store.url}: the key {key!r} was recorded by a transaction that "
                                   "committed after this one began; roll back and try again")
        if float(row.expires_at) <= now:  # an expired record counts as absent: this call replaces it
            conn.execute(t.update().where(t.c.key_hash == digest).values(**values))
            return Staged(op, True, task, args, kwargs)
        existing = store._op(row)
        if existing.fingerprint != fp:
            raise IdempotencyKeyMismatch(scope=scope, key=key, operation_id=existing.id,
                                         stored_fingerprint=existing.fingerprint, fingerprint=fp)
        if being_accepted(existing, now):
            # Created and not yet published, by a caller that may still be publishing it: a submit whose publish fails
            # removes the record (Store.abandon), and rows this transaction commits would name an operation that is
            # gone. Such a repeat is what HTTP answers 409 for; here: roll back and try again, and by then the record
            # is published (a replay) or removed (this call records its own). Past ACCEPT_WINDOW no submit removes it.
            raise StoreUnavailable(f"SQL store {store.url}: the key {key!r} is being recorded by another request that "
                                   "has not published it yet; roll back and try again")
        return Staged(existing, False, task, args, kwargs)


def _duplicate_key(exc: IntegrityError) -> bool:
    """Whether the INSERT collided on a unique key (the operation's), rather than broke another constraint."""
    if _pg_code(exc) == _PG_UNIQUE_VIOLATION or _mysql_code(exc) == _MYSQL_DUPLICATE_KEY:
        return True
    # SQLite: SQLITE_CONSTRAINT_PRIMARYKEY / _UNIQUE, or by its message where the driver gives no extended code
    orig = exc.orig
    return getattr(orig, "sqlite_errorcode", None) in (1555, 2067) or "UNIQUE constraint failed" in str(orig)


def _other_store(task_store: Any, outbox: SQLStore) -> str | None:
    """What the task's store is, when it is certainly not the outbox's; ``None`` when it may be.

    Decided on the configuration alone: opening the task's store here could create its table, a write that on SQLite
    would wait for the lock the caller's transaction holds. And databases are not compared: the same one is reached
    through URLs spelled in many ways (driver names, credentials in connect arguments, relative paths). A store
    object this does not know (a wrapper) may be the outbox's, and passes."""
    if task_store is outbox:
        return None
    if isinstance(task_store, Store):
        table = getattr(task_store, "table", None)
        if isinstance(table, sa.Table):
            return None if table.name == outbox.table.name else f"the table {table.name!r} ({task_store.url})"
        if any(cls.__module__ in _NOT_SQL_MODULES for cls in type(task_store).__mro__):
            return f"a {type(task_store).__name__} ({task_store.url}), not SQL"
        return None
    url = str(task_store)  # what the worker opens (see IdempotentTask.store)
    if url_scheme(url) not in SQL_SCHEMES:
        return f"a store that is not SQL ({public_url(url)})"
    if outbox.table.name != DEFAULT_TABLE:
        return (f"the table {DEFAULT_TABLE!r} ({public_url(url)}; a store given by URL uses that table: give the "
                f"task this outbox's store as store_url)")
    return None


_NOT_SQL_MODULES = ("idemtasks.stores.redis", "idemtasks.stores.memory")
