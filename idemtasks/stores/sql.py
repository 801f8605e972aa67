"""The SQL store (SQLAlchemy 2 Core): PostgreSQL, SQLite and MariaDB/MySQL. Schema: :mod:`.sql_schema`.

On PostgreSQL and SQLite every primitive is one statement in its own transaction: creations and claims are an
``INSERT … ON CONFLICT (key_hash) DO UPDATE`` whose SET clauses choose, column by column, between the new and the
old value (they see the old row), and whose RETURNING row tells the caller what happened; completions, renewals
and the rest are a fenced ``UPDATE``/``DELETE`` whose row count is the answer. MariaDB has neither ``UPDATE …
RETURNING`` nor a SET clause that sees only old values (``ON DUPLICATE KEY UPDATE`` assigns left to right on the
already-updated row), so there a creation or a claim is a locking read, a decision in Python with the reference
functions of :mod:`.base`, and a write, in one transaction.

Clocks: PostgreSQL and MariaDB use the server's clock, so workers with skewed clocks still agree on leases;
SQLite, being in-process, uses the local one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import StaticPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the SQL store needs SQLAlchemy: pip install idemtasks[sql]") from exc

from ..errors import StoreError, StoreUnavailable
from ..identity import load_json
from ..models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status
from .base import ClaimRequest, CreateRequest, FinishRequest, Store, decide_claim, decide_create
from .sql_schema import create_tables, dispose_after_fork, make_engine, operations_table

__all__ = ["SQLStore", "make_engine", "operations_table"]

_R = TypeVar("_R")
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)
# MariaDB: a racing INSERT of the same key won (duplicate key), or a deadlock among such racers. Both roll the
# transaction back, so the whole read-decide-write is simply run again. (A lock wait timeout is not retried: it
# took innodb_lock_wait_timeout already, and leaves as StoreUnavailable.)
_MYSQL_RETRY_CODES = (1062, 1213)
_MYSQL_ATTEMPTS = 8


class _Retry(Exception):
    pass


class SQLStore(Store):
    """Operations in one SQL table (``table``), created on first use unless ``create_schema=False``."""

    def __init__(self, url: str, *, table: str = "idemtasks_operations", engine: sa.Engine | None = None,
                 create_schema: bool = True, engine_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._owns_engine = engine is None
        if engine is None:
            engine = make_engine(url, **(engine_options or {}))
        else:
            dispose_after_fork(engine)
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self.table = operations_table(sa.MetaData(), table)
        self.dialect = engine.dialect.name
        self._autocommit = (engine.execution_options(isolation_level="AUTOCOMMIT")
                            if self.dialect == "postgresql" else engine)
        self._upsert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(self.dialect)
        # A StaticPool (sqlite :memory:) hands every thread the same connection, hence the same transaction: one
        # thread's commit, or the pool's rollback on return, would land in the middle of another's primitive.
        self._serial: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if isinstance(engine.pool, StaticPool) else contextlib.nullcontext())
        if create_schema:
            self._create_schema()

    def _create_schema(self) -> None:
        try:
            create_tables(self.engine, [self.table])
        except SQLAlchemyError as exc:
            raise self._wrap(exc) from exc

    # ----------------------------------------------------------------- plumbing

    def _wrap(self, exc: SQLAlchemyError) -> StoreError:
        # The driver's own message, not SQLAlchemy's, which would quote the statement and its parameters (results,
        # arguments) into logs.
        orig = getattr(exc, "orig", None) or exc
        kind = StoreUnavailable if isinstance(exc, _UNAVAILABLE) else StoreError
        return kind(f"SQL store {self.url}: {type(orig).__name__}: {orig}")

    @contextmanager
    def _guarded(self, *, retry: bool = False) -> Iterator[None]:
        """SQLAlchemy errors leave as StoreUnavailable/StoreError, or as ``_Retry`` for a MariaDB race."""
        try:
            yield
        except SQLAlchemyError as exc:
            if retry and _mysql_code(exc) in _MYSQL_RETRY_CODES:
                raise _Retry from exc
            raise self._wrap(exc) from exc

    @contextmanager
    def _tx(self, *, retry: bool = False, single: bool = True) -> Iterator[sa.Connection]:
        """One short transaction, committed on exit. A ``single`` statement on PostgreSQL runs in autocommit: it is
        atomic on its own, and skipping BEGIN and COMMIT saves two network round trips per state change."""
        engine = self._autocommit if single else self.engine
        with self._guarded(retry=retry), self._serial, engine.begin() as conn:
            yield conn

    def _run(self, conn: sa.Connection, stmt: sa.Executable) -> sa.CursorResult[Any]:
        self.round_trips += 1
        return conn.execute(stmt)

    def _now(self) -> Any:
        """``now`` as a SQL expression, on the server's clock where the server has one."""
        if self.dialect == "postgresql":
            # statement_timestamp() is fixed for the whole statement: every CASE below sees the same instant.
            return sa.cast(sa.literal_column("extract(epoch from statement_timestamp())"), sa.Float(53))
        if self.dialect in ("mysql", "mariadb"):
            return sa.literal_column("UNIX_TIMESTAMP(NOW(6))", sa.Float(53))  # NOW() is fixed per statement too
        return sa.literal(time.time(), sa.Float(53))

    def now(self) -> float:
        if self.dialect == "sqlite":
            return time.time()
        with self._tx() as conn:
            return float(self._run(conn, sa.select(self._now())).scalar_one())

    def _op(self, row: Any) -> Operation:
        return Operation(
            id=row.id, scope=row.scope, key=row.idem_key, task_name=row.task_name, fingerprint=row.fingerprint,
            status=Status(row.status), result=load_json(row.result),
            error=None if row.error_type is None else ErrorInfo(row.error_type, row.error_message or ""),
            attempts=int(row.attempts), fencing_token=int(row.fencing_token), lease_owner=row.lease_owner,
            lease_expires_at=None if row.lease_expires_at is None else float(row.lease_expires_at),
            created_at=float(row.created_at), updated_at=float(row.updated_at), expires_at=float(row.expires_at),
            needs_publish=bool(row.needs_publish), payload=row.payload,
        )

    def _row_values(self, op: Operation, digest: str) -> dict[str, Any]:
        """A new or claimed record as column values; neither carries a result or an error yet."""
        return {
            "id": op.id, "key_hash": digest, "scope": op.scope, "idem_key": op.key, "task_name": op.task_name,
            "fingerprint": op.fingerprint, "status": op.status.value, "result": None, "error_type": None,
            "error_message": None, "attempts": op.attempts, "fencing_token": op.fencing_token,
            "lease_owner": op.lease_owner, "lease_expires_at": op.lease_expires_at, "created_at": op.created_at,
            "updated_at": op.updated_at, "expires_at": op.expires_at, "needs_publish": op.needs_publish,
            "payload": op.payload,
        }

    # ----------------------------------------------------------------- create and claim

    def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        if self._upsert is None:
            def decide(cur: Operation | None, now: float) -> tuple[tuple[Operation, bool], Operation | None]:
                op, created = decide_create(cur, req, now)
                return (op, created), op if created else None

            return self._locked(req.digest, decide)
        with self._tx() as conn:
            row = self._run(conn, self.create_statement(req)).one()
        return self._op(row), row.id == req.new_id

    def create_statement(self, req: CreateRequest) -> Any:
        """PostgreSQL/SQLite: the one statement of ``_create`` (shared with the asyncio store)."""
        t, now = self.table, self._now()
        values = {
            "id": req.new_id, "key_hash": req.digest, "scope": req.scope, "idem_key": req.key,
            "task_name": req.task_name, "fingerprint": req.fingerprint, "status": "pending", "result": None,
            "error_type": None, "error_message": None, "attempts": 0, "fencing_token": 0, "lease_owner": None,
            "lease_expires_at": None, "created_at": now, "updated_at": now, "expires_at": now + req.ttl,
            "needs_publish": True, "payload": req.payload,
        }
        stmt = self._upsert(t).values(**values)
        expired = t.c.expires_at <= now
        # A live record keeps every column (a no-op row version on PostgreSQL: the price of RETURNING it).
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.key_hash],
            set_={c: sa.case((expired, stmt.excluded[c]), else_=t.c[c]) for c in values if c != "key_hash"},
        ).returning(*t.c)
        return stmt

    def _claim(self, req: ClaimRequest) -> ClaimResult:
        if self._upsert is None:
            def decide(cur: Operation | None, now: float) -> tuple[ClaimResult, Operation | None]:
                outcome, op = decide_claim(cur, req, now)
                return ClaimResult(outcome, op), op if outcome is ClaimOutcome.CLAIMED else None

            return self._locked(req.digest, decide)
        t, now = self.table, self._now()
        expired = t.c.expires_at <= now
        claimable = sa.and_(
            t.c.expires_at > now, t.c.fingerprint == req.fingerprint,
            sa.or_(t.c.status == "pending",
                   sa.and_(t.c.status == "running", sa.func.coalesce(t.c.lease_expires_at, 0.0) <= now)),
        )
        wins = sa.or_(expired, claimable)
        stmt = self._upsert(t).values(
            id=req.new_id, key_hash=req.digest, scope=req.scope, idem_key=req.key, task_name=req.task_name,
            fingerprint=req.fingerprint, status="running", attempts=1, fencing_token=1, lease_owner=req.owner,
            lease_expires_at=now + req.lease, created_at=now, updated_at=now, expires_at=now + req.ttl,
            needs_publish=False, payload=req.payload,
        )
        ex = stmt.excluded

        def fresh(col: str) -> Any:  # the new row's value when the old record had expired
            return sa.case((expired, ex[col]), else_=t.c[col])

        def won(col: str, value: Any) -> Any:
            return sa.case((wins, value), else_=t.c[col])

        # Every replay (busy, done, mismatch) rewrites the row with its own values, a dead row version on
        # PostgreSQL: the price of learning the outcome in the same round trip instead of a second SELECT.
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.key_hash], set_={
            "id": fresh("id"), "scope": fresh("scope"), "idem_key": fresh("idem_key"),
            "task_name": fresh("task_name"), "fingerprint": fresh("fingerprint"), "created_at": fresh("created_at"),
            "payload": fresh("payload"),
            "result": sa.case((expired, sa.null()), else_=t.c.result),
            "error_type": sa.case((expired, sa.null()), else_=t.c.error_type),
            "error_message": sa.case((expired, sa.null()), else_=t.c.error_message),
            "attempts": sa.case((expired, 1), (claimable, t.c.attempts + 1), else_=t.c.attempts),
            # An expired record's token carries on, so a holder of the old record never shares a token with the new.
            "fencing_token": sa.case((expired | claimable, t.c.fencing_token + 1), else_=t.c.fencing_token),
            "status": won("status", "running"), "lease_owner": won("lease_owner", req.owner),
            "lease_expires_at": won("lease_expires_at", now + req.lease), "updated_at": won("updated_at", now),
            "expires_at": won("expires_at", now + req.ttl), "needs_publish": won("needs_publish", False),
        }).returning(*t.c)
        with self._tx() as conn:
            op = self._op(self._run(conn, stmt).one())
        if op.lease_owner == req.owner and op.status is Status.RUNNING:  # owners are unique per attempt
            return ClaimResult(ClaimOutcome.CLAIMED, op)
        if op.fingerprint != req.fingerprint:
            return ClaimResult(ClaimOutcome.MISMATCH, op)
        return ClaimResult(ClaimOutcome.DONE if op.is_final else ClaimOutcome.BUSY, op)

    def _locked(self, digest: str, decide: Callable[[Operation | None, float], tuple[_R, Operation | None]]) -> _R:
        """MariaDB/MySQL: lock the row, decide in Python on the server's clock, write what ``decide`` returns.

        The clock is a one-row derived table left-joined to the record, so an absent record still yields ``now``
        in the same statement. Under READ COMMITTED an absent key takes no lock: two racers may both INSERT, and
        the loser's duplicate-key error sends it round again to find (and lock) the winner's row.
        """
        t = self.table
        clock = sa.select(self._now().label("server_now")).subquery("clock")
        read = sa.select(clock.c.server_now, t).select_from(
            clock.outerjoin(t, t.c.key_hash == digest)).with_for_update()
        for _ in range(_MYSQL_ATTEMPTS):
            try:
                with self._tx(retry=True, single=False) as conn:
                    row = self._run(conn, read).one()
                    current = None if row.id is None else self._op(row)
                    result, write = decide(current, float(row.server_now))
                    if write is not None:
                        stmt = t.insert() if current is None else t.update().where(t.c.key_hash == digest)
                        self._run(conn, stmt.values(**self._row_values(write, digest)))
                return result
            except _Retry:
                continue
        raise StoreError(f"SQL store {self.url}: {_MYSQL_ATTEMPTS} conflicting attempts to write one key in a row")

    # ----------------------------------------------------------------- fenced transitions

    def _held(self, digest: str, operation_id: str, token: int, now: Any) -> Any:
        t = self.table
        return sa.and_(t.c.key_hash == digest, t.c.id == operation_id, t.c.status == "running",
                       t.c.fencing_token == token, t.c.expires_at > now)

    def _finish(self, req: FinishRequest) -> bool:
        t, now = self.table, self._now()
        values: dict[str, Any] = {"status": req.status.value, "lease_owner": None, "lease_expires_at": None,
                                  "updated_at": now, "expires_at": now + req.ttl}
        if req.status is Status.SUCCEEDED:
            values["result"] = req.result
        if req.status is Status.FAILED and req.error is not None:
            values.update(error_type=req.error.type[:255], error_message=req.error.message)
        return self._count(t.update().where(self._held(req.digest, req.operation_id, req.token, now))
                           .values(**values)) == 1

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        t, now = self.table, self._now()
        stmt = t.update().where(self._held(digest, operation_id, token, now)).values(
            lease_expires_at=now + lease,
            # greatest() is spelled differently (and NULL-handled differently) on each database; CASE is not.
            expires_at=sa.case((t.c.expires_at < now + ttl, now + ttl), else_=t.c.expires_at),
        )
        return self._count(stmt) == 1

    def _mark_published(self, digest: str, operation_id: str) -> None:
        t, now = self.table, self._now()
        self._count(t.update().where(t.c.key_hash == digest, t.c.id == operation_id, t.c.status == "pending",
                                     t.c.expires_at > now).values(needs_publish=False, updated_at=now))

    def _abandon(self, digest: str, operation_id: str) -> None:
        t = self.table
        self._count(t.delete().where(t.c.key_hash == digest, t.c.id == operation_id, t.c.status == "pending",
                                     t.c.attempts == 0))

    def _requeue(self, digest: str, operation_id: str, token: int) -> bool:
        t, now = self.table, self._now()
        stmt = t.update().where(self._held(digest, operation_id, token, now),
                                sa.func.coalesce(t.c.lease_expires_at, 0.0) <= now).values(
            status="pending", lease_owner=None, lease_expires_at=None, updated_at=now)
        return self._count(stmt) == 1

    def _count(self, stmt: sa.Executable) -> int:
        # rowcount is the number of rows matched (SQLAlchemy asks MySQL drivers for FOUND_ROWS), and it is reliable
        # for plain UPDATE/DELETE on every driver here, unlike for INSERT … ON CONFLICT DO NOTHING on psycopg.
        with self._tx() as conn:
            return int(self._run(conn, stmt).rowcount)

    # ----------------------------------------------------------------- reads

    def _get(self, digest: str) -> Operation | None:
        with self._tx() as conn:
            row = self._run(conn, self.get_statement(digest)).first()
        return None if row is None else self._op(row)

    def get_statement(self, digest: str) -> Any:
        t = self.table
        return sa.select(t).where(t.c.key_hash == digest, t.c.expires_at > self._now())

    def _stale(self, pending_after: float, limit: int) -> list[Operation]:
        t, now = self.table, self._now()
        query = sa.select(t).where(
            t.c.expires_at > now,
            sa.or_(sa.and_(t.c.status == "pending", t.c.updated_at <= now - pending_after),
                   sa.and_(t.c.status == "running", sa.func.coalesce(t.c.lease_expires_at, 0.0) <= now)),
        ).order_by(t.c.updated_at).limit(limit)
        with self._tx() as conn:
            return [self._op(row) for row in self._run(conn, query)]

    def purge_expired(self) -> int:
        return self._count(self.table.delete().where(self.table.c.expires_at <= self._now()))

    def close(self) -> None:
        if self._owns_engine:  # an engine passed in belongs to the caller, who may still be using it
            self.engine.dispose()


def _mysql_code(exc: BaseException) -> int | None:
    args = getattr(getattr(exc, "orig", None), "args", ())
    return args[0] if args and isinstance(args[0], int) else None
