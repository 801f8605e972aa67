"""The SQL store (SQLAlchemy 2 Core): PostgreSQL, SQLite and MariaDB/MySQL. Schema: :mod:`.sql_schema`.

On PostgreSQL and SQLite every primitive is one statement in its own transaction: creations and claims are an
``INSERT … ON CONFLICT (key_hash) DO UPDATE`` whose SET clauses choose, column by column, between the new and the
old value (they see the old row), and whose RETURNING row tells the caller what happened; completions, renewals
and the rest are a fenced ``UPDATE``/``DELETE`` whose row count is the answer. MariaDB has neither ``UPDATE …
RETURNING`` nor a SET clause that sees only old values (``ON DUPLICATE KEY UPDATE`` assigns left to right on the
already-updated row), so there a creation or a claim is a locking read, a decision in Python with the reference
functions of :mod:`.base`, and a write, in one transaction.

Clocks: PostgreSQL and MariaDB use the server's clock, so workers with skewed clocks still agree on leases;
SQLite, being in-process, uses the local one, read once a write holds the database's lock.

The statements themselves are in :mod:`.sql_statements`, built once per store. On PostgreSQL through psycopg, a
thread creates, claims and completes on a connection of its own, and does not wait for the answer to a completion
or to the "published" flag (see :mod:`.sql_lane`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import StaticPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the SQL store needs SQLAlchemy: pip install idemtasks[sql]") from exc

from ..errors import StoreError, StoreUnavailable
from ..forks import fresh_in_child
from ..identity import key_digest, load_json
from ..models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status, Takeover
from . import public_url
from .base import (
    PURGE_GRACE,
    RENEW_TIMEOUT,
    ClaimRequest,
    CreateRequest,
    FinishRequest,
    Store,
    decide_claim,
    decide_create,
)
from .lanes import lanes_supported, opens_lanes, published_answer, settle_own_writes, thread_flag
from .sql_bounded import Bounds, given_up_here, watch_engine
from .sql_schema import (
    DEFAULT_TABLE,
    add_missing_columns,
    create_tables,
    dispose_after_fork,
    dispose_for_good,
    is_outage,
    make_engine,
    operations_table,
    packet_limit,
    watch_packet_limit,
)
from .sql_statements import Statements

if TYPE_CHECKING:
    from .sql_lane import LaneError, LaneStatements, PGLane, Prepared

__all__ = ["DEFAULT_TABLE", "PURGE_GRACE", "SQLStore", "make_engine", "operations_table"]

_R = TypeVar("_R")
#: Guards every store's set of lanes (a lane is made once per thread and store: no contention worth a lock each).
_lanes_lock = threading.Lock()
fresh_in_child(sys.modules[__name__], "_lanes_lock", threading.Lock)  # a thread may hold it as a pool child forks
# MariaDB: a racing INSERT of the same key won (duplicate key), or a deadlock among such racers. Both roll the
# transaction back, so the whole read-decide-write is simply run again. (A lock wait timeout is not retried: it
# took innodb_lock_wait_timeout already, and leaves as StoreUnavailable.)
_MYSQL_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY
_MYSQL_RETRY_CODES = (_MYSQL_DUPLICATE_KEY, 1213)
_MYSQL_ATTEMPTS = 8
#: Seconds a MariaDB locking read may take before the clock it read (at its start) is read again: a wait for the
#: record's lock, not a round trip; beyond it, one more round trip, only then.
_MYSQL_LOCK_WAITED = 0.05
# PostgreSQL: the upsert resolves conflicts on key_hash only. Two claims of an absent key with the same operation id
# (one message delivered twice at once) both insert, and the loser collides on the primary key instead, which ends
# the statement with a unique violation once the winner commits. Sent again, it finds the winner's row and answers
# as a replay. No other unique index can collide, so any unique violation is retried, but only a few times.
_PG_UNIQUE_VIOLATION = "23505"
_PG_ATTEMPTS = 3



class _Retry(Exception):
    pass


def _connection_broke(exc: StoreUnavailable) -> bool:
    """Whether the connection broke under the call (its answer lost), rather than the pool or the server refusing."""
    cause = exc.__cause__
    return isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated


class SQLStore(Store):
    """Operations in one SQL table (``table``), created on first use unless ``create_schema=False``."""

    def __init__(self, url: str, *, table: str = DEFAULT_TABLE, engine: sa.Engine | None = None,
                 create_schema: bool = True, engine_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        #: Whether the store built its engine (and disposes of it on close), rather than the application.
        self.owns_engine = engine is None
        if engine is None:
            engine = make_engine(url, **(engine_options or {}))
        else:
            dispose_after_fork(engine)
        #: The driver's connection settings given by the caller, which the asyncio store's engine gets as well.
        self.connect_args: dict[str, Any] = dict((engine_options or {}).get("connect_args", {}))
        self.engine = engine
        # SQLAlchemy hides the user's password; public_url those a query carries (libpq's password=, sslpassword=).
        self.url = public_url(engine.url.render_as_string(hide_password=True))
        self.table = operations_table(sa.MetaData(), table)
        self.dialect = engine.dialect.name
        #: What the store's own transactions go through: the engine, or on MariaDB/MySQL a view of an application's
        #: engine at READ COMMITTED. At its default, REPEATABLE READ, a locking read of an absent key takes a gap lock,
        #: and racing creations of one key deadlock round after round instead of colliding. The view shares the pool;
        #: it sets the level as it takes a connection and puts the application's back as it returns it.
        self._transactional = (engine.execution_options(isolation_level="READ COMMITTED")
                               if self.dialect in ("mysql", "mariadb") and not self.owns_engine else engine)
        self._autocommit = (engine.execution_options(isolation_level="AUTOCOMMIT")
                            if self.dialect == "postgresql" else self._transactional)
        self.sql = Statements(self.table, self.dialect)
        # A StaticPool (sqlite :memory:) hands every thread the same connection, hence the same transaction: one
        # thread's commit, or the pool's rollback on return, would land in the middle of another's primitive.
        #: Whether every thread gets the same connection (StaticPool): such an engine cannot run a body's transaction.
        self.one_connection = isinstance(engine.pool, StaticPool)
        self._serial: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self.one_connection else contextlib.nullcontext())
        self._local = threading.local()
        self._bounds = Bounds(f"SQL store {self.url}")
        if self.dialect != "sqlite":
            watch_engine(engine)  # lets a bounded call cut the connection it holds (see promptly)
        watch_packet_limit(engine)
        self._lane_sql: LaneStatements | None = None
        #: Every thread's lane, so that close() ends them all (a lane otherwise lives as long as its thread).
        self._all_lanes: weakref.WeakSet[PGLane] = weakref.WeakSet()
        #: Whether threads create, claim and complete on lanes (PostgreSQL through psycopg, not under greenlets).
        self.pipelines_completions = self.dialect == "postgresql" and engine.dialect.driver == "psycopg" \
            and lanes_supported()
        if self.pipelines_completions:
            # Now, on the thread that opens the store (a worker's main process, before its pool forks), not on the
            # first thread that sends on a lane: the prefork parent's sweeper does, and a child forked while it
            # imported would inherit the module's import lock held (see idemtasks.forks).
            from . import sql_lane  # noqa: F401
        if create_schema:
            self._create_schema()

    @property
    def where(self) -> str:
        return f"{self.url} (table {self.table.name!r})"

    @property
    def value_limit(self) -> int | None:
        return packet_limit(self.engine)

    def _create_schema(self) -> None:
        try:
            create_tables(self.engine, [self.table])
            add_missing_columns(self.engine, self.table)  # a table an earlier release created
        except SQLAlchemyError as exc:
            if self.owns_engine:  # nobody will close a store that failed to open: its pool goes with it
                dispose_for_good(self.engine)
            raise self._wrap(exc) from exc

    # ----------------------------------------------------------------- plumbing

    def _wrap(self, exc: SQLAlchemyError) -> StoreError:
        # The driver's own message, not SQLAlchemy's, which would quote the statement and its parameters (results,
        # arguments) into logs.
        orig = getattr(exc, "orig", None) or exc
        kind = StoreUnavailable if is_outage(exc) else StoreError
        return kind(f"SQL store {self.url}: {type(orig).__name__}: {orig}")

    @contextmanager
    def _guarded(self, *, retry: bool = False) -> Iterator[None]:
        """SQLAlchemy errors leave as StoreUnavailable/StoreError, or as ``_Retry`` for a race between writers of one
        key (MariaDB's duplicate key or deadlock, PostgreSQL's duplicate primary key)."""
        try:
            yield
        except SQLAlchemyError as exc:
            if retry and (_mysql_code(exc) in _MYSQL_RETRY_CODES or _pg_code(exc) == _PG_UNIQUE_VIOLATION):
                raise _Retry from exc
            raise self._wrap(exc) from exc

    @contextmanager
    def _tx(self, *, retry: bool = False, single: bool = True) -> Iterator[sa.Connection]:
        """One short transaction, committed on exit. A ``single`` statement on PostgreSQL runs in autocommit: it is
        atomic on its own, and skipping BEGIN and COMMIT saves two network round trips per state change."""
        engine = self._autocommit if single else self._transactional
        with self._guarded(retry=retry), self._serial, engine.begin() as conn:
            if given_up_here():  # a bounded call given up while it found this connection: it goes back unused
                raise StoreUnavailable(f"SQL store {self.url}: a call given up before its statement")
            yield conn

    def _run(self, conn: sa.Connection, stmt: sa.Executable, params: dict[str, Any]) -> sa.CursorResult[Any]:
        self.round_trips += 1
        return conn.execute(stmt, params)

    def clock_statement(self) -> tuple[Any, dict[str, Any]]:
        """The statement that reads ``now`` on the store's clock, and its parameters."""
        return self.sql.clock, self.sql.params()

    def now(self) -> float:
        if self.dialect == "sqlite":
            return time.time()
        with self._tx() as conn:
            return float(self._run(conn, *self.clock_statement()).scalar_one())

    def _op(self, row: Any) -> Operation:
        return Operation(
            id=row.id, scope=row.scope, key=row.idem_key, task_name=row.task_name, fingerprint=row.fingerprint,
            status=Status(row.status), result=load_json(row.result),
            error=None if row.error_type is None else ErrorInfo(row.error_type, row.error_message or ""),
            attempts=int(row.attempts), fencing_token=int(row.fencing_token), lease_owner=row.lease_owner,
            lease_expires_at=None if row.lease_expires_at is None else float(row.lease_expires_at),
            created_at=float(row.created_at), updated_at=float(row.updated_at), expires_at=float(row.expires_at),
            needs_publish=bool(row.needs_publish), payload=row.payload, crashes=int(row.crashes),
        )

    def _row_values(self, op: Operation, digest: str) -> dict[str, Any]:
        """A new or claimed record as column values; neither carries a result or an error yet."""
        return {
            "id": op.id, "key_hash": digest, "scope": op.scope, "idem_key": op.key, "task_name": op.task_name,
            "fingerprint": op.fingerprint, "status": op.status.value, "result": None, "error_type": None,
            "error_message": None, "attempts": op.attempts, "fencing_token": op.fencing_token,
            "lease_owner": op.lease_owner, "lease_expires_at": op.lease_expires_at, "created_at": op.created_at,
            "updated_at": op.updated_at, "expires_at": op.expires_at, "needs_publish": op.needs_publish,
            "payload": op.payload, "crashes": op.crashes,
        }

    # ----------------------------------------------------------------- create and claim

    def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        if self.sql.upsert is None:
            def decide(cur: Operation | None, now: float) -> tuple[tuple[Operation, bool], Operation | None]:
                op, created = decide_create(cur, req, now)
                return (op, created), op if created else None

            return self._locked(req.digest, decide)
        stmt, params = self.create_statement(req)
        row = self._upsert(stmt, lambda: self._lanes().create, params)
        return self._op(row), row.id == req.new_id

    def create_statement(self, req: CreateRequest) -> tuple[Any, dict[str, Any]]:
        """PostgreSQL/SQLite: the one statement of ``_create`` and its parameters (shared with the asyncio store)."""
        return self.sql.create, self.sql.params(
            p_id=req.new_id, p_key_hash=req.digest, p_scope=req.scope, p_idem_key=req.key,
            p_task_name=req.task_name, p_fingerprint=req.fingerprint, p_payload=req.payload, p_ttl=req.ttl,
            p_delay=req.delay)

    def _claim(self, req: ClaimRequest) -> ClaimResult:
        # A claim whose connection broke may have landed with only its answer lost, which would leave the operation
        # held by an owner no worker is, until lease and grace passed and a crash was counted. So it is sent once
        # more (a lane does so on its own: see _call_on_lane). Owners are unique per attempt: the same claim finds its
        # own live lease, answers it as claimed with the same token and starts the lease again from now (see
        # decide_claim); or it is the claim.
        if self.sql.upsert is None:
            def decide(cur: Operation | None, now: float) -> tuple[ClaimResult, Operation | None]:
                outcome, op = decide_claim(cur, req, now)
                # A win, or a lapsed lease's suspicion mark (see Store.claim): anything decide_claim changed.
                return ClaimResult(outcome, op), None if op is cur else op

            return self._locked(req.digest, decide, resend_lost_commit=True)
        try:
            return self._claim_upserted(req)
        except StoreUnavailable as exc:
            if not _connection_broke(exc):
                raise
        return self._claim_upserted(req)

    def _claim_upserted(self, req: ClaimRequest) -> ClaimResult:
        """PostgreSQL/SQLite: the claim's one statement, and its outcome read from the row it returns."""
        params = self.sql.params(
            p_id=req.new_id, p_key_hash=req.digest, p_scope=req.scope, p_idem_key=req.key, p_task_name=req.task_name,
            p_fingerprint=req.fingerprint, p_payload=req.payload, p_lease_owner=req.owner, p_lease=req.lease,
            p_ttl=req.ttl, p_grace=req.grace)
        op = self._op(self._upsert(self.sql.claim, lambda: self._lanes().claim, params))
        if op.fingerprint != req.fingerprint:
            return ClaimResult(ClaimOutcome.MISMATCH, op)
        # Owners are unique per attempt: held by this one, it is this claim's win, or the same claim sent again (see
        # _claim) under its live lease, which that started again. A lapsed one is busy, as decide_claim has it: the
        # statement just marked it (updated_at >= lease_expires_at), or found it marked.
        if op.lease_owner == req.owner and op.status is Status.RUNNING and (op.lease_expires_at or 0) > op.updated_at:
            return ClaimResult(ClaimOutcome.CLAIMED, op)
        return ClaimResult(ClaimOutcome.DONE if op.is_final else ClaimOutcome.BUSY, op)

    def _upsert(self, stmt: Any, on_lane: Callable[[], Prepared], params: dict[str, Any]) -> Any:
        """PostgreSQL/SQLite: the row a creation or a claim returns, on this thread's lane or through the pool, sent
        again when it lost a race on the primary key (see ``_PG_UNIQUE_VIOLATION``)."""
        for _ in range(_PG_ATTEMPTS):
            try:
                lane = self._lane()
                if lane is not None:
                    return self._call_on_lane(lane, on_lane(), params)
                with self._tx(retry=True) as conn:
                    return self._run(conn, stmt, params).one()
            except _Retry:
                continue
        raise StoreError(f"SQL store {self.url}: {_PG_ATTEMPTS} duplicate primary keys in a row")

    def _locked(self, digest: str, decide: Callable[[Operation | None, float], tuple[_R, Operation | None]], *,
                resend_lost_commit: bool = False) -> _R:
        """MariaDB/MySQL: lock the row, decide in Python on the server's clock, write what ``decide`` returns.

        The clock is a one-row derived table left-joined to the record, so an absent record still yields ``now``
        in the same statement. Under READ COMMITTED an absent key takes no lock: two racers may both INSERT, and
        the loser's duplicate-key error sends it round again to find (and lock) the winner's row.

        ``resend_lost_commit``: go round once more when the connection broke at the COMMIT of a write, which may
        have landed (a claim: see ``_claim``). Only then: a transaction cut off before its COMMIT was rolled back, and
        a connection dead on this side only may still hold the row's lock on the server, which a second round would
        wait for (``innodb_lock_wait_timeout``, 50 s by default) before failing all the same.
        """
        for _ in range(_MYSQL_ATTEMPTS):
            committing = False
            try:
                with self._tx(retry=True, single=False) as conn:
                    asked = time.monotonic()
                    row = self._run(conn, self.sql.locked_read, {"p_key_hash": digest}).one()
                    now = float(row.server_now)
                    if time.monotonic() - asked > _MYSQL_LOCK_WAITED:
                        # The statement's clock was read when it started, before it waited for the record's lock
                        # (another claim's transaction, or any other holding it): a lease granted on that time would
                        # start in the past by the wait. Read the clock again, now that the lock is held.
                        now = float(self._run(conn, *self.clock_statement()).scalar_one())
                    current = None if row.id is None else self._op(row)
                    result, write = decide(current, now)
                    if write is not None:
                        if current is None:
                            self._run(conn, self.sql.insert, self._row_values(write, digest))
                        else:
                            self._run(conn, self.sql.replace, {**self._row_values(write, digest), "p_key_hash": digest})
                        committing = True
                return result
            except _Retry:
                continue
            except StoreUnavailable as exc:
                if not (resend_lost_commit and committing and _connection_broke(exc)):
                    raise
                resend_lost_commit = False
        raise StoreError(f"SQL store {self.url}: {_MYSQL_ATTEMPTS} conflicting attempts to write one key in a row")

    # ----------------------------------------------------------------- fenced transitions

    def _finish(self, req: FinishRequest) -> bool:
        return self._count(self.sql.finish[req.status], self._finish_params(req)) == 1

    def _finish_params(self, req: FinishRequest) -> dict[str, Any]:
        params = self.sql.params(p_key_hash=req.digest, p_id=req.operation_id, p_fencing_token=req.token, p_ttl=req.ttl)
        if req.status is Status.SUCCEEDED:
            params["p_result"] = req.result
        if req.status is Status.FAILED:
            error = req.error
            params.update(p_error_type=error and error.type, p_error_message=error and error.message)
        if req.status is Status.PENDING:
            params.update(p_delay=req.delay, p_crashed=int(req.crashed), p_payload=req.payload)
        return params

    def finish_pipelined(self, scope: str, key: str, operation_id: str, token: int, status: Status, *,
                         result_json: str | None = None, error: ErrorInfo | None = None, ttl: float,
                         settle: Callable[[BaseException], None]) -> None:
        req = FinishRequest(key_digest(scope, key), operation_id, token, status, result_json, error, ttl)
        resolve = self._answer_resolver(req, settle)
        try:
            lane = self._lane()
        except StoreError as exc:  # no connection for a lane: the resolver tries the pooled path, then settles
            resolve(exc)
            return
        if lane is None:
            self._finish_or_raise(req, again=True)  # as the worker's in-place completion (a lost reply resent)
            return
        self.round_trips += 1
        lane.send(self._lanes().finish[status], self._finish_params(req), resolve)

    # ----------------------------------------------------------------- lanes (PostgreSQL, see sql_lane)

    def _lanes(self) -> LaneStatements:
        if self._lane_sql is None:
            from .sql_lane import LaneStatements

            self._lane_sql = LaneStatements(self.sql)
        return self._lane_sql

    def _settle_own_writes(self) -> None:
        settle_own_writes(self._local)

    def _lane(self) -> PGLane | None:
        """This thread's lane, opened on first use (and again after its connection broke or the process forked)."""
        if not self.pipelines_completions:
            return None
        lane: PGLane | None = getattr(self._local, "lane", None)
        if lane is not None and lane.pid == os.getpid() and not lane.broken:
            return lane
        if not opens_lanes():
            return None
        from .sql_lane import PGLane

        dbapi: Any = None
        try:
            # A pool connection, so the engine's connect arguments and events apply, then detached: the lane keeps
            # it for as long as its thread lives, and the pool must not count it nor hand it to anyone else.
            conn = self.engine.connect()
            if lane is not None and lane.broken:
                # The last lane's connection died. If the server restarted, the pooled ones are dead too, and the
                # pool does not know: a statement through SQLAlchemy lets it see the disconnect and drop them all.
                try:
                    conn.exec_driver_sql("SELECT 1")
                except sa.exc.DBAPIError as exc:
                    conn.close()
                    if not exc.connection_invalidated:
                        raise
                    conn = self.engine.connect()
            conn.detach()
            dbapi = conn.connection.dbapi_connection
            dbapi.rollback()  # the ping, or a checkout's, may have opened a transaction; autocommit needs none
            dbapi.autocommit = True
            lane = PGLane(dbapi)  # sets the session up: a driver error there is the store's too
        except SQLAlchemyError as exc:
            raise self._wrap(exc) from exc
        except Exception as exc:  # the driver's own error, outside SQLAlchemy's translation
            if dbapi is not None:
                with contextlib.suppress(Exception):
                    dbapi.close()  # detached: nobody else would ever close it
            raise StoreUnavailable(f"SQL store {self.url}: {type(exc).__name__}: {exc}") from exc
        self._local.lane = lane
        with _lanes_lock:  # see close()
            self._all_lanes.add(lane)
        return lane

    def _call_on_lane(self, lane: PGLane, stmt: Prepared, params: dict[str, Any]) -> Any:
        """A creation or a claim on this thread's lane, and the row it returns."""
        from .sql_lane import LaneError

        self.round_trips += 1
        try:
            return self._lanes().row(lane.call(stmt, params))
        except LaneError as exc:
            if exc.sqlstate == _PG_UNIQUE_VIOLATION:  # lost a race on the primary key: _upsert sends it again
                raise _Retry from exc
            if not exc.broken:
                raise self._lane_error(exc) from exc
        # The connection broke (a restart, an idle timeout): once more on a new one. Sending either twice is safe.
        # A claim's owner is unique to this attempt: if the first one landed, the second finds the record held by
        # that owner and answers it as claimed, with the same fencing token. A creation that landed is found live
        # with this request's new id, which is how a creation is told apart from a replay.
        try:
            return self._lanes().row(self._lane().call(stmt, params))  # type: ignore[union-attr]
        except LaneError as exc:
            if exc.sqlstate == _PG_UNIQUE_VIOLATION:
                raise _Retry from exc
            raise self._lane_error(exc) from exc

    def _lane_error(self, exc: LaneError) -> StoreError:
        return (StoreUnavailable if exc.outage else StoreError)(f"SQL store {self.url}: {exc}")

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        params = self.sql.params(p_key_hash=digest, p_id=operation_id, p_fencing_token=token, p_lease=lease,
                                 p_ttl=ttl)
        with self.promptly():  # always (see Store.promptly)
            return self._count(self.sql.renew, params) == 1

    def promptly(self) -> contextlib.AbstractContextManager[None]:
        # Not on SQLite: a file, whose only wait is for the write lock. A call given up there could not be cut, and
        # one more would pile up behind it every time the keeper sent it again.
        return contextlib.nullcontext() if self.dialect == "sqlite" else thread_flag(self._local, "prompt")

    def _bounded(self, fn: Callable[..., _R], *args: Any) -> _R:
        """``fn(*args)``; for a thread that calls :meth:`promptly`, on a thread of its own, waited for at most
        RENEW_TIMEOUT (see :mod:`.sql_bounded`)."""
        if not getattr(self._local, "prompt", False):
            return fn(*args)
        return self._bounds.run(lambda: fn(*args), timeout=RENEW_TIMEOUT)

    def _mark_published(self, digest: str, operation_id: str, token: int, delay: float, backoff: float) -> None:
        params = self.sql.params(p_key_hash=digest, p_id=operation_id, p_fencing_token=token, p_delay=delay,
                                 p_backoff=backoff or None)
        lane = self._lane()
        if lane is None:
            self._count(self.sql.mark_published, params)
            return
        # Not waited for, as on Redis: the flag only makes a duplicate of a just-created operation wait for
        # ACCEPT_WINDOW, and the worker's claim clears it anyway. A submit then waits for one commit, the create's.
        self.round_trips += 1
        lane.send(self._lanes().mark_published, params, published_answer)

    def _attach_payload(self, digest: str, operation_id: str, token: int, payload: str) -> bool:
        params = self.sql.params(p_key_hash=digest, p_id=operation_id, p_fencing_token=token, p_payload=payload)
        return self._count(self.sql.attach_payload, params) == 1

    def _abandon(self, digest: str, operation_id: str, within: float) -> None:
        self._count(self.sql.abandon, self.sql.params(p_key_hash=digest, p_id=operation_id, p_within=within))

    def _requeue(self, digest: str, operation_id: str, token: int, confirm_after: float) -> Takeover:
        params = self.sql.params(p_key_hash=digest, p_id=operation_id, p_fencing_token=token,
                                 p_confirm_after=confirm_after)
        if self._count(self.sql.requeue, params) == 1:
            return Takeover.REQUEUED
        # Not (yet) confirmed: mark it, or find it marked. Whatever happened between the two statements is safe:
        # each is fenced on the token and the lapsed lease, and a mark only ever delays a takeover.
        params = self.sql.params(p_key_hash=digest, p_id=operation_id, p_fencing_token=token)
        return Takeover.SUSPECTED if self._count(self.sql.suspect, params) == 1 else Takeover.ALIVE

    def _count(self, stmt: sa.Executable, params: dict[str, Any]) -> int:
        return self._bounded(self._count_now, stmt, params)

    def _count_now(self, stmt: sa.Executable, params: dict[str, Any]) -> int:
        # rowcount is the number of rows matched (SQLAlchemy asks MySQL drivers for FOUND_ROWS), and it is reliable
        # for plain UPDATE/DELETE on every driver here, unlike for INSERT … ON CONFLICT DO NOTHING on psycopg.
        with self._tx() as conn:
            return int(self._run(conn, stmt, params).rowcount)

    # ----------------------------------------------------------------- reads

    def _get(self, digest: str) -> Operation | None:
        return self._bounded(self._get_now, digest)

    def _get_now(self, digest: str) -> Operation | None:
        with self._tx() as conn:
            row = self._run(conn, *self.get_statement(digest)).first()
        return None if row is None else self._op(row)

    def get_statement(self, digest: str) -> tuple[Any, dict[str, Any]]:
        """The read of ``_get`` and its parameters (shared with the asyncio store)."""
        return self.sql.get, self.sql.params(p_key_hash=digest)

    def _stale(self, pending_after: float, limit: int) -> list[Operation]:
        t, now = self.table, self.sql.now()
        query = sa.select(t).where(
            t.c.expires_at > now,
            # A pending record's lease_expires_at is the back-off of recovery's last copy (Store.mark_published).
            sa.or_(sa.and_(t.c.status == "pending", t.c.updated_at <= now - pending_after,
                           sa.func.coalesce(t.c.lease_expires_at, 0.0) <= now),
                   sa.and_(t.c.status == "running", sa.func.coalesce(t.c.lease_expires_at, 0.0) <= now)),
        ).order_by(t.c.updated_at).limit(limit)
        with self._tx() as conn:
            return [self._op(row) for row in self._run(conn, query, self.sql.params())]

    def purge_expired(self, *, grace: float = PURGE_GRACE) -> int:
        """Delete the records expired for more than ``grace`` seconds (see :data:`PURGE_GRACE`); return how many."""
        t = self.table
        older = t.c.expires_at <= self.sql.now() - sa.bindparam("p_grace", type_=t.c.expires_at.type)
        return self._count(t.delete().where(older), self.sql.params(p_grace=grace))

    def close(self) -> None:
        self._local.lane = None
        # Other threads' lanes too: a thread that outlives the store (a pool's, the keeper's) would keep its
        # connection open. Closed under the lane's lock, it is seen as broken by its thread, which would open a
        # new one if it used the store again.
        with _lanes_lock:  # a WeakSet that grows while it is copied raises in the copier
            lanes = list(self._all_lanes)
        for lane in lanes:
            if lane.pid == os.getpid():
                lane.close()
        if self.owns_engine:  # an engine passed in belongs to the caller, who may still be using it
            dispose_for_good(self.engine)


def _pg_code(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg, psycopg2


def _mysql_code(exc: BaseException) -> int | None:
    args = getattr(getattr(exc, "orig", None), "args", ())
    return args[0] if args and isinstance(args[0], int) else None
