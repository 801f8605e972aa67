"""The operations table and the engine settings of the SQL store.

Schema (``operations_table``; created by the store unless ``create_schema=False``, or add it to your migrations):

====================  =====================  ==============================================================
column                type                   note
====================  =====================  ==============================================================
``id``                VARCHAR(64) PK         operation id, also the Celery task id
``key_hash``          CHAR(32) UNIQUE        digest of (scope, key): the uniqueness the store relies on
``scope``             VARCHAR(1024)
``idem_key``          VARCHAR(255)           the client's idempotency key (``key`` is a reserved word)
``task_name``         VARCHAR(255)
``fingerprint``       VARCHAR(64)            hash of the call or the HTTP request, hex (32 characters today)
``status``            VARCHAR(16)            pending / running / succeeded / failed
``result``            TEXT (LONGTEXT) NULL   JSON
``error_type``        VARCHAR(255) NULL
``error_message``     TEXT (LONGTEXT) NULL
``attempts``          INTEGER
``fencing_token``     BIGINT
``lease_owner``       VARCHAR(255) NULL
``lease_expires_at``  DOUBLE NULL            epoch seconds
``created_at`` …      DOUBLE                 ``created_at``, ``updated_at``, ``expires_at``: epoch seconds
``needs_publish``     BOOLEAN                default false; true until the message is confirmed published
``payload``           TEXT (LONGTEXT) NULL   ``[task, args, kwargs]``, then its routing/callbacks
``crashes``           INTEGER                default 0; holders that died mid-body (``Operation.crashes``)
====================  =====================  ==============================================================

Indexes: ``expires_at`` (purge) and ``(status, updated_at)`` (recovery looks for stale pending/running records).
(LONGTEXT) is the type on MariaDB/MySQL, whose TEXT stops at 64 KiB; there the table is InnoDB, utf8mb4, and the
hex columns are ASCII with a binary collation (smaller index entries, byte-wise comparison).

Upgrading: ``crashes`` came after the first release. The store adds it to an existing table when it opens (``ALTER
TABLE … ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0``, which PostgreSQL 11+, MariaDB 10.3+ and SQLite do without
rewriting the table, waiting at most :data:`ALTER_LOCK_WAIT` for the table at a time); with ``create_schema=False``,
add that column in your own migration before deploying.

Uniqueness is on the digest rather than on the raw key because MariaDB's default collations ignore case and
trailing spaces, which would merge keys a client considers distinct. ``fingerprint`` is VARCHAR, not CHAR:
PostgreSQL pads CHAR values when it returns them, and the fingerprint is compared in Python.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import StaticPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the SQL store needs SQLAlchemy: pip install idemtasks[sql]") from exc

from .sql_errors import driver_outage

__all__ = ["ALTER_LOCK_WAIT", "CONNECT_TIMEOUT", "DEFAULT_TABLE", "IDLE_BEFORE_PING", "PACKET_OVERHEAD",
           "PG_KEEPALIVES", "SQLITE_IMMEDIATE", "add_missing_columns", "create_tables", "dispose_after_fork",
           "dispose_for_good", "is_outage", "make_engine", "operations_table", "packet_limit", "packet_value_limit",
           "pg_connect_args", "ping_when_idle", "watch_packet_limit"]

#: The table of a store opened from a URL alone.
DEFAULT_TABLE = "idemtasks_operations"

#: Seconds a pooled connection may sit unused before it is checked with a ping on its next checkout.
IDLE_BEFORE_PING = 1.0

#: Seconds the store's engines wait to connect (PostgreSQL, MariaDB/MySQL; and, through PyMySQL, for the server's
#: greeting and the login) unless the URL or the caller says otherwise: an unreachable server is an outage at once.
CONNECT_TIMEOUT = 5

#: libpq's connection settings for a peer that goes silent: probe after 30 s of quiet, every 10 s, give up after
#: 3 unanswered probes; and drop a connection whose sent data stays unacknowledged for 60 s.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                 "tcp_user_timeout": 60_000}

_T = TypeVar("_T")
logger = logging.getLogger("idemtasks.stores")
_lock = threading.Lock()

# The connection is gone, or the pool has no connection to give: something to wait out, not the statement's fault.
_OUTAGES = (sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)


def is_outage(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means "the database is unreachable for now" (a restart, a killed connection, an
    exhausted pool, a deadlock broken by the server) rather than a fault of the statement. The store, the effects
    ledger and a transactional body's failures all go by this one rule. An ``OperationalError`` is judged by its
    driver's error code (see :mod:`.sql_errors`): a CHECK violation is one too, on MariaDB. So is an ``InternalError``,
    where psycopg files a read-only server's refusal."""
    if isinstance(exc, _OUTAGES) or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        return driver_outage(exc.orig) is not False
    if isinstance(exc, sa.exc.InternalError):
        # psycopg files a read-only transaction (25006, a standby during a failover) here; only a known code counts.
        return driver_outage(exc.orig) is True
    return False


_LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _hex(length: int, *, fixed: bool = False) -> sa.types.TypeEngine[str]:
    base: sa.types.TypeEngine[str] = sa.CHAR(length) if fixed else sa.String(length)
    variant = (mysql.CHAR if fixed else mysql.VARCHAR)(length, charset="ascii", collation="ascii_bin")
    return base.with_variant(variant, "mysql", "mariadb")


def operations_table(metadata: sa.MetaData, name: str = DEFAULT_TABLE) -> sa.Table:
    """The operations table, added to ``metadata`` (for users who manage their schema with migrations)."""
    return sa.Table(
        name, metadata,
        sa.Column("id", _hex(64), primary_key=True),
        sa.Column("key_hash", _hex(32, fixed=True), nullable=False, unique=True),
        sa.Column("scope", sa.String(1024), nullable=False),
        sa.Column("idem_key", sa.String(255), nullable=False),
        sa.Column("task_name", sa.String(255), nullable=False),
        sa.Column("fingerprint", _hex(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", _LONG_TEXT),
        sa.Column("error_type", sa.String(255)),
        sa.Column("error_message", _LONG_TEXT),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires_at", sa.Float(53)),
        sa.Column("created_at", sa.Float(53), nullable=False),
        sa.Column("updated_at", sa.Float(53), nullable=False),
        sa.Column("expires_at", sa.Float(53), nullable=False, index=True),
        sa.Column("needs_publish", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
        sa.Column("payload", _LONG_TEXT),
        # Added after the first release, hence last and with a server default: see "Upgrading" above.
        sa.Column("crashes", sa.Integer, nullable=False, default=0, server_default="0"),
        sa.Index(f"ix_{name}_status_updated", "status", "updated_at"),
        # MyISAM would silently drop the transactions and row locks the MariaDB path depends on.
        mysql_engine="InnoDB", mysql_charset="utf8mb4",
    )


def engine_url(url: str) -> sa.URL:
    """``url`` as the store's engines open it: without a driver, PostgreSQL (``postgres://`` too, as hosting
    platforms spell it) takes psycopg 3 and MySQL/MariaDB PyMySQL, the drivers of the extras."""
    u = sa.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+psycopg")
    if u.drivername in ("mysql", "mariadb"):
        return u.set(drivername=f"{u.drivername}+pymysql")
    return u


def make_engine(url: str, **options: Any) -> sa.Engine:
    """An engine configured for short, concurrent, conditional writes on each supported database."""
    u = engine_url(url)
    backend = u.get_backend_name()
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        # Several worker processes share the file: wait for the write lock instead of failing at once.
        connect_args.update(timeout=30, check_same_thread=False)
        if u.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one connection, or every checkout would see its own empty database
    elif backend == "postgresql":
        connect_args.update(pg_connect_args(u))
    elif backend in ("mysql", "mariadb"):
        # READ COMMITTED: no gap locks, so two racing inserts of one key collide instead of deadlocking. (No session
        # time zone: the store's clock reads UTC_TIMESTAMP(), so a caller's engine or init_command may set any.)
        kwargs.update(pool_recycle=3600, isolation_level="READ COMMITTED")
        if "connect_timeout" not in u.query:  # the URL's own wins, as on PostgreSQL
            connect_args.update(connect_timeout=CONNECT_TIMEOUT)
    kwargs.update(options)
    kwargs["connect_args"] = {**connect_args, **options.get("connect_args", {})}
    bounded = _pymysql_handshake_bounds(u, kwargs["connect_args"])
    engine = sa.create_engine(u, **kwargs)
    if bounded:
        # First among the listeners of both events: before SQLAlchemy's first queries on a new connection (the
        # dialect's initialize on the first, its session set-up on each), which are statements like any other.
        lift = functools.partial(_lift_bounds, bounded)
        sa.event.listen(engine, "first_connect", lift, insert=True)
        sa.event.listen(engine, "connect", lift, insert=True)
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
    elif not kwargs.get("pool_pre_ping"):
        ping_when_idle(engine)
    if backend in ("mysql", "mariadb"):
        sa.event.listen(engine, "connect", _tcp_keepalives)
    dispose_after_fork(engine)
    return engine


def _pymysql_handshake_bounds(url: sa.URL, connect_args: dict[str, Any]) -> tuple[str, ...]:
    """PyMySQL bounds only the TCP connect by ``connect_timeout``: the server's greeting, the TLS handshake (which
    PyMySQL tries whenever the server offers TLS, under its write timeout) and the login then wait for as long as it
    takes, and a server that accepts connections and never answers held the store's opening (and the lock other
    openers of that URL wait on) for good. Bound the reads and writes the caller left unbounded by the connect timeout
    too; :func:`_lift_bounds` lifts those again once connected (statements may be long). The names set, if any."""
    if url.get_driver_name() != "pymysql":
        return ()
    given: Any = connect_args.get("connect_timeout") or url.query.get("connect_timeout") or CONNECT_TIMEOUT
    bound = float(given if not isinstance(given, tuple) else given[-1])
    unset = tuple(name for name in ("read_timeout", "write_timeout")
                  if name not in url.query and name not in connect_args)
    connect_args.update(dict.fromkeys(unset, bound))
    return unset


def _lift_bounds(names: tuple[str, ...], dbapi_conn: Any, _record: Any) -> None:
    # PyMySQL's own attributes: its next read or write sets the socket's timeout from them.
    for name in names:
        if hasattr(dbapi_conn, f"_{name}"):
            setattr(dbapi_conn, f"_{name}", None)


def _tcp_keepalives(dbapi_conn: Any, _record: Any) -> None:
    """MariaDB/MySQL through PyMySQL: PG_KEEPALIVES' timing on the connection's socket. PyMySQL turns keepalives on
    with the kernel's timing (two hours of quiet before the first probe) and has no setting for it, so a server or
    network that vanished without closing the connection held a waiting thread for 15 minutes or more, as on
    PostgreSQL before its keepalives: now such a wait ends as StoreUnavailable within about a minute."""
    sock = getattr(dbapi_conn, "_sock", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # another driver, or a Unix socket: no network to lose
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", PG_KEEPALIVES["keepalives_idle"]),
                        ("TCP_KEEPINTVL", PG_KEEPALIVES["keepalives_interval"]),
                        ("TCP_KEEPCNT", PG_KEEPALIVES["keepalives_count"]),
                        ("TCP_USER_TIMEOUT", PG_KEEPALIVES["tcp_user_timeout"])):
        option = getattr(socket, name, None)  # Linux's names: other systems lack some of them
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def pg_connect_args(url: sa.URL) -> dict[str, Any]:
    """The connection settings every PostgreSQL engine of the store gets (the asyncio one too), unless ``url``'s
    query sets them."""
    # An unreachable server fails fast as StoreUnavailable. A server or network that vanishes without closing the
    # connection would leave a thread waiting for an answer for as long as the kernel keeps retrying (15 minutes or
    # more on Linux): keepalives find a silent peer once the connection is idle, and tcp_user_timeout bounds data
    # left unacknowledged, so the wait ends as StoreUnavailable within about a minute.
    return {k: v for k, v in {"connect_timeout": CONNECT_TIMEOUT, **PG_KEEPALIVES}.items() if k not in url.query}


def ping_when_idle(engine: sa.Engine) -> None:
    """Ping a pooled connection on checkout only when it sat unused for more than :data:`IDLE_BEFORE_PING`.
    (For an asyncio engine, pass its ``sync_engine``: the pool and its events are the same.)

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: one more round trip per state change, which doubled
    the store's cost per task. A connection in steady use was just proven alive; one that sat idle may have been
    closed by a restart, a failover or an idle timeout, and gets the ping. A server restart always outlasts the
    threshold, and the first disconnect SQLAlchemy sees invalidates every older connection in the pool, so the
    only statements that still fail are those in flight when the server went away, as with a ping on every checkout.
    """
    def checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idemtasks_idle_since"] = time.monotonic()

    def checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idemtasks_idle_since", None)
        if since is None or time.monotonic() - since <= IDLE_BEFORE_PING:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (a fresh one, if the server restarted).
            raise sa.exc.DisconnectionError(f"idle connection failed its ping: {exc}") from exc

    sa.event.listen(engine, "checkin", checkin)
    sa.event.listen(engine, "checkout", checkout)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Python's sqlite3 begins a transaction only before a write, on its own: a SAVEPOINT before the first write
    # would start one of its own, and its RELEASE commit it (a body's first insert, taken under a savepoint, would
    # outlive the body's rollback), and reads before the first write would be outside the transaction. The driver
    # is told to leave transactions alone, and each one begins when SQLAlchemy's does (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; several processes share the file
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, not every commit: WAL's usual trade
    cur.close()


#: Execution option: on SQLite, begin with ``BEGIN IMMEDIATE``, which waits (the busy timeout) for the database's
#: write lock and holds it to the end. For a transaction that reads before it writes: a deferred one that has read
#: cannot wait for the lock when it comes to write (another writer may have changed what it read), and fails at once.
SQLITE_IMMEDIATE = "idemtasks_sqlite_immediate"


def _sqlite_begin(conn: sa.Connection) -> None:
    # Otherwise deferred, as the driver's own: a single-statement write takes the lock with that statement, and
    # waits for it there, which is where the store's statements read the clock (see Statements.now).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(SQLITE_IMMEDIATE) else "BEGIN")


#: What a MySQL/MariaDB statement holds besides its one long value (the statement's text, the other values).
PACKET_OVERHEAD = 16 * 1024
_PACKET_INFO = "idemtasks_value_limit"  # in a pooled connection's info: read once per connection
_packet_limits: weakref.WeakKeyDictionary[sa.Engine, int] = weakref.WeakKeyDictionary()
_packet_watched: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def packet_value_limit(packet: int) -> int:
    """The longest value (a result, a stored call) one statement can carry under MySQL/MariaDB's
    ``max_allowed_packet``: what is left of it after :data:`PACKET_OVERHEAD`, halved, since the driver sends values
    inside the statement's text, escaped, and escaping can double a JSON text (every quote and backslash)."""
    return max(0, (packet - PACKET_OVERHEAD) // 2)


def watch_packet_limit(engine: sa.Engine) -> None:
    """Learn the value limit (:func:`packet_value_limit`) of a MySQL/MariaDB ``engine`` from each connection it
    hands out, read once per connection; :func:`packet_limit` tells it. Nothing to learn of another database's.

    A statement over the server's packet limit is cut off with the connection ("server has gone away"), which reads
    as an outage: a result the server can never take would be sent again for ever, and its body run again by each
    takeover. Read at checkout, not only when a connection opens: an application's engine may hold connections
    opened before the store. One listener per engine, however many stores share it."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return
    with _lock:
        if engine in _packet_watched:
            return
        _packet_watched.add(engine)
    ref = weakref.ref(engine)

    def read(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        limit = record.info.get(_PACKET_INFO)
        if limit is None:
            limit = record.info[_PACKET_INFO] = _read_packet(dbapi_conn)
        target = ref()
        if limit >= 0 and target is not None:
            _packet_limits[target] = limit

    sa.event.listen(engine, "checkout", read)


def _read_packet(dbapi_conn: Any) -> int:
    try:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SELECT @@max_allowed_packet")
            row = cursor.fetchone()
        finally:
            cursor.close()
        return packet_value_limit(int(row[0]))
    except Exception as exc:  # a proxy that refuses the query: the limit stays unknown, the connection works on
        logger.warning("idemtasks: could not read the server's max_allowed_packet (%s: %s); values are held to the "
                       "tasks' own limits only", type(exc).__name__, exc)
        return -1


def packet_limit(engine: sa.Engine) -> int | None:
    """The value limit :func:`watch_packet_limit` learnt for ``engine``, or ``None``: before its first checkout, or
    a database without a packet limit."""
    return _packet_limits.get(engine)


def dispose_for_good(engine: sa.Engine) -> None:
    """Close ``engine``'s connections, also those other threads still hold and hand back later.

    ``Engine.dispose`` closes the idle connections and starts a new pool; one still checked out at that moment (a
    bounded call given up while it connected, a renewal on the keeper's thread) goes back to the old pool, which
    nobody empties again, and stays open until the garbage collector finds it (psycopg warns then).
    """
    old = engine.pool
    engine.dispose()
    sa.event.listen(old, "checkin", _close_handed_back)
    old.dispose()  # those handed back before the listener was in place


def _close_handed_back(dbapi_conn: Any, _record: Any) -> None:
    if dbapi_conn is not None:  # None: invalidated, so closed already
        with contextlib.suppress(Exception):  # a connection that already failed
            dbapi_conn.close()


_forked_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def dispose_after_fork(engine: sa.Engine) -> None:
    """Make a forked child drop the pool it inherited (Celery's prefork pool forks after the store was opened).

    Two processes speaking on one socket corrupt the protocol; ``dispose(close=False)`` forgets the parent's
    connections without closing them under the parent's feet.
    """
    _forked_engines.add(engine)


def _reset_after_fork() -> None:
    for engine in list(_forked_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def create_tables(engine: sa.Engine, tables: Sequence[sa.Table], *, attempts: int = 5) -> None:
    """Create whichever of ``tables`` are missing; safe when several processes start at once.

    ``checkfirst`` is a read followed by ``CREATE TABLE``: processes starting together all see no table, and all but
    one then fail (PostgreSQL with DuplicateTable, or a unique violation on ``pg_type`` when the two CREATEs overlap;
    MariaDB with "table exists"). The losers try again, and the check then finds the table made.
    """
    writer = engine.execution_options(**{SQLITE_IMMEDIATE: True})  # a read, then CREATE (see SQLITE_IMMEDIATE)
    _retrying(lambda: tables[0].metadata.create_all(writer, tables=list(tables), checkfirst=True), attempts)


def _retrying(work: Callable[[], _T], attempts: int) -> _T:
    """``work()``, tried again (after a short pause) when it fails: schema changes by processes starting together
    collide, and the losers find the winner's work done on their next look. Not when no connection could be had: a
    server that does not answer would cost the caller the connect timeout once per attempt (25 s, opening a store
    on the web side), for nothing a next look could find."""
    for attempt in range(attempts):
        try:
            return work()
        except SQLAlchemyError as exc:
            if attempt == attempts - 1 or _not_connected(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _not_connected(exc: SQLAlchemyError) -> bool:
    """Whether ``exc`` came before any statement: connecting failed, or the pool had no connection to give."""
    return isinstance(exc, sa.exc.TimeoutError) or (isinstance(exc, sa.exc.DBAPIError) and exc.statement is None)


def add_missing_columns(engine: sa.Engine, table: sa.Table, *, attempts: int = 5) -> list[str]:
    """Add to an existing ``table`` the columns a later release defined (each has a server default, so rows already
    there get it); return their names. Safe when several processes start at once: the ``ALTER`` of a process that
    lost the race fails (the column exists), and the next look finds it there."""

    def add() -> list[str]:
        present = {c["name"].lower() for c in sa.inspect(engine).get_columns(table.name, schema=table.schema)}
        missing = [c for c in table.c if c.name.lower() not in present]
        with engine.begin() as conn:
            for column in missing:
                _add_column(conn, table, column)
        return [c.name for c in missing]

    return _retrying(add, attempts)


#: Seconds an ``ALTER TABLE`` waits for its table lock before it gives up (and is tried again).
ALTER_LOCK_WAIT = 2


def _add_column(conn: sa.Connection, table: sa.Table, column: sa.Column[Any]) -> None:
    """Add ``column``. The ALTER needs the table to itself: while it waits for a long reader (a report, a dump) to
    finish, every statement of the store queues behind it. So its wait is bounded; the caller tries again, and if the
    table stays busy the store fails to open (and is opened again on next use) rather than stall every worker.
    (SQLite waits for its write lock as for any write: the busy timeout.)"""
    dialect = conn.dialect
    spec = sa.schema.CreateColumn(column).compile(dialect=dialect)
    alter = f"ALTER TABLE {dialect.identifier_preparer.format_table(table)} ADD COLUMN {spec}"
    if getattr(dialect, "is_mariadb", False):
        conn.execute(sa.text(f"SET STATEMENT lock_wait_timeout = {ALTER_LOCK_WAIT} FOR {alter}"))
        return
    setting = {"postgresql": ("lock_timeout", f"'{ALTER_LOCK_WAIT}s'"),
               "mysql": ("lock_wait_timeout", str(ALTER_LOCK_WAIT))}.get(dialect.name)
    if setting is None:
        conn.execute(sa.text(alter))
        return
    # A session setting, put back after: the connection returns to the pool. (Inside a transaction that fails,
    # PostgreSQL refuses the reset, and undoes the setting with the rollback.)
    name, value = setting
    conn.execute(sa.text(f"SET SESSION {name} = {value}"))
    try:
        conn.execute(sa.text(alter))
    finally:
        with contextlib.suppress(SQLAlchemyError):
            conn.execute(sa.text(f"SET SESSION {name} = DEFAULT"))
