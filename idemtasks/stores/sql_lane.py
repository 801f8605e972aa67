"""Pipelined completions for the SQL store on PostgreSQL: a worker thread's own connection, its "lane".

As on Redis (:mod:`.redis_lane`), a worker thread claims on its lane and sends each completion without waiting
for its answer; the answer is read in front of the thread's next statement, or by the collector thread once the
thread has been idle for :data:`~idemtasks.stores.lanes.COLLECT_AFTER`. An executed task then waits for one
commit (the claim's) instead of two. The completion's commit happens while Celery acknowledges the message and
fetches the next one. A thread that submits does the same with its creation (waited for) and the "published"
flag it clears after publishing (not waited for), so a submit waits for one commit.

The lane speaks to libpq directly, through psycopg's ``pgconn``: each statement is prepared once per connection
and then sent as its name and text parameters. The same claim and completion through SQLAlchemy spend three times
the CPU in building parameters, cursors and rows, which on a busy worker is most of the store's cost.

What this changes, and what it does not:

* Each statement is its own implicit transaction (the protocol's Sync ends it), so a completion commits on its
  own, exactly like the pooled path's autocommit, and its fencing is the same ``UPDATE … WHERE`` row count.
* PostgreSQL serves one connection in order and the next claim is sent only after the completion's answer was
  read, so the thread's next claim (a duplicate of the same key, say) always sees the completion.
* Only the worker *learning* the outcome is deferred: a refusal (lease lost) or a broken connection is resolved by
  the store as on Redis, by sending the completion again on the pooled path or handing it to ``settle``.
* Celery may acknowledge the message before the answer is read. A completion lost together with the worker
  process in that instant leaves the operation running until its lease ends and recovery runs it again.

Waiting is done with ``select`` on the socket, never inside a libpq call, so other threads keep the GIL.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy.dialects import postgresql

from .lanes import BaseLane, Pending, resolve_all
from .sql_errors import pg_outage
from .sql_statements import Statements

__all__ = ["LaneError", "LaneStatements", "PGLane", "Prepared"]

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class LaneError(Exception):
    """A statement on a lane failed (``outage``: the database is away, or busy breaking a deadlock); ``broken``
    means the connection is gone, with any statement on it in an unknown state. ``sqlstate`` is the server's error
    code, when the server answered with one."""

    def __init__(self, message: str, *, outage: bool, broken: bool = False, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.outage = outage
        self.broken = broken
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class Prepared:
    """One statement as libpq takes it: ``$n`` placeholders, the parameter names in their order, and the values of
    the parameters the statement fixes itself (an UPDATE's literal status, say)."""

    name: bytes
    text: bytes
    order: tuple[str, ...]
    fixed: Mapping[str, Any]

    @classmethod
    def compile(cls, name: str, statement: Any, dialect: Any) -> Prepared:
        # A dialect without bind casts: libpq infers each parameter's type from where it stands, so a CHAR key
        # compares with its index's type rather than being cast to the parameter's.
        compiled = statement.compile(dialect=dialect)
        if any(b.expanding for b in compiled.binds.values()):
            # SQLAlchemy renders IN (…) of a list as a placeholder it expands per execution: no fixed text to prepare.
            raise ValueError(f"{name}: a statement with an expanding parameter (IN of a list) cannot be prepared")
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in order:
                order.append(match[1])
            return f"${order.index(match[1]) + 1}"

        text = _PLACEHOLDER.sub(number, str(compiled)).replace("%%", "%")
        fixed = {k: b.effective_value for k, b in compiled.binds.items() if not b.required and k in order}
        return cls(name.encode(), text.encode(), tuple(order), fixed)

    def values(self, params: Mapping[str, Any]) -> list[bytes | None]:
        return [_text(params[n] if n in params else self.fixed[n]) for n in self.order]


class LaneStatements:
    """The statements a lane runs for one store (creation, claim, completions and the "published" flag), and how
    to read the row a creation or a claim returns."""

    def __init__(self, sql: Statements) -> None:
        dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        self.create = Prepared.compile("idemtasks_create", sql.create, dialect)
        self.claim = Prepared.compile("idemtasks_claim", sql.claim, dialect)
        self.finish = {status: Prepared.compile(f"idemtasks_finish_{status.value}", stmt, dialect)
                       for status, stmt in sql.finish.items()}
        self.mark_published = Prepared.compile("idemtasks_mark_published", sql.mark_published, dialect)
        self._readers: dict[str, Callable[[bytes], Any]] = {}
        for column in sql.table.c:
            kind = column.type.python_type
            self._readers[column.name] = (int if kind is int else float if kind is float
                                          else (lambda v: v == b"t") if kind is bool else bytes.decode)

    def row(self, res: Any) -> SimpleNamespace:
        """The first row of a text-format result, its columns by name and converted to Python values."""
        values = {}
        for i in range(res.nfields):
            name = res.fname(i).decode()
            raw = res.get_value(0, i)
            values[name] = None if raw is None else self._readers[name](raw)
        return SimpleNamespace(**values)


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if value is True or value is False:
        return b"t" if value else b"f"
    if type(value) is float:
        return repr(value).encode()  # every digit: a lease or a TTL must not lose its fraction
    return str(value).encode()


class PGLane(BaseLane):
    """One PostgreSQL connection owned by one thread (plus the collector, under ``lock``), in autocommit."""

    def __init__(self, dbapi_connection: Any) -> None:
        if dbapi_connection.info.encoding != "utf-8":  # parameters and rows are read and written as UTF-8 here
            dbapi_connection.execute("SET client_encoding TO 'UTF8'")
        # psycopg's prepare_threshold=None is how a connection through a transaction-mode pooler (PgBouncer) says
        # that named prepared statements do not survive: the lane then sends each statement's text every time.
        self._prepares = dbapi_connection.prepare_threshold is not None
        super().__init__()
        self.pgconn: Any = dbapi_connection.pgconn
        self.pgconn.nonblocking = 1  # libpq never blocks: waiting is ours, on the socket, without the GIL
        self.broken = False
        self._prepared: set[bytes] = set()
        # A thread's lane goes when the thread does: close its connection then (only in the process that opened
        # it, since a forked child would otherwise end its parent's session).
        self._closer = weakref.finalize(self, _close, self.pid, dbapi_connection)
        # Not at exit: the collector's exit hook still reads what the lane is owed (a completion whose answer says it
        # must be sent again), and finalize's own hook, registered later, would run first and close it under it.
        # The process's end closes the socket anyway.
        self._closer.atexit = False

    def call(self, stmt: Prepared, params: Mapping[str, Any]) -> Any:
        """Run a statement and return its result (reading a pending completion's answer first)."""
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                try:
                    self._read_pending(done)
                    if self.broken:
                        raise LaneError("connection lost", outage=True, broken=True)
                    return self._execute(stmt, params)
                except LaneError:  # the server's error (every result was read) or a connection already dropped
                    raise
                except BaseException as exc:
                    # Interrupted between a statement and its results (a soft time limit or Ctrl-C, raised by a
                    # signal handler at any bytecode): libpq still holds results the next statement would have to
                    # get past. Drop the connection, as for a lost one; a pending completion is settled as unknown.
                    self._drop(done, exc)
                    raise
        finally:
            resolve_all(done)

    def send(self, stmt: Prepared, params: Mapping[str, Any], resolve: Callable[[Any], None]) -> None:
        """Send a statement without waiting; ``resolve`` gets its row count (or the :class:`LaneError`) later."""

        def write() -> None:
            if self.broken:
                raise LaneError("connection lost", outage=True, broken=True)
            self._send(stmt, params)

        self._send_unanswered(write, resolve, (LaneError,))

    def _collect_pending(self, done: list[tuple[Pending, Any]]) -> None:
        try:
            self._read_pending(done)  # a broken connection is already an answer here (a LaneError)
        except BaseException as exc:  # interrupted mid-read (see call)
            self._drop(done, exc)
            raise

    def _drop(self, done: list[tuple[Pending, Any]], why: BaseException) -> Exception:
        # Broken, like a lost connection: the store opens the thread a new lane, and the resolvers take a broken
        # LaneError for "unknown" (a completion is sent again).
        self.broken = True
        self._closer()
        exc = LaneError(f"OperationalError: connection dropped: interrupted by {type(why).__name__}", outage=True,
                        broken=True)
        pending, self.pending = self.pending, None
        if pending is not None:
            done.append((pending, exc))
        return exc

    def close(self) -> None:
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                self._collect_pending(done)
                self._closer()
                self.broken = True
        finally:
            resolve_all(done)

    # ----------------------------------------------------------------- libpq

    def _send(self, stmt: Prepared, params: Mapping[str, Any]) -> None:
        pg = self.pgconn
        try:
            if not self._prepares:
                pg.send_query_params(stmt.text, stmt.values(params))
                self._flush()
                return
            if stmt.name not in self._prepared:  # once per connection; the server plans it once, too
                pg.send_prepare(stmt.name, stmt.text)
                self._flush()
                self._result()
                self._prepared.add(stmt.name)
            pg.send_query_prepared(stmt.name, stmt.values(params))
        except psycopg.Error as exc:
            raise self._lost(exc) from exc
        self._flush()

    def _execute(self, stmt: Prepared, params: Mapping[str, Any]) -> Any:
        self._send(stmt, params)
        return self._result()

    def _read_pending(self, done: list[tuple[Pending, Any]]) -> None:
        # self.pending is cleared only once its answer is in ``done``: an interrupted read leaves it there for _drop
        # to hand over as unknown. An interruption between the two lines hands it over twice, which is the lesser
        # harm: a resend of a completion that landed is recognised (a refused one reaches settle twice); clearing it
        # first could lose it.
        pending = self.pending
        if pending is None:
            return
        answer: Any
        try:
            answer = int(self._result().command_tuples or 0)
        except LaneError as exc:
            answer = exc
        done.append((pending, answer))
        self.pending = None

    def _flush(self) -> None:
        try:
            while self.pgconn.flush():
                _wait(self.pgconn.socket, write=True)
        except (psycopg.Error, OSError) as exc:
            raise self._lost(exc) from exc

    def _result(self) -> Any:
        """The one result of the statement in flight, once its transaction has ended."""
        pg = self.pgconn
        results = []
        try:
            while True:
                pg.consume_input()
                while pg.is_busy():
                    _wait(pg.socket)
                    pg.consume_input()
                res = pg.get_result()
                if res is None:
                    break
                results.append(res)
        except (psycopg.Error, OSError) as exc:
            raise self._lost(exc) from exc
        if not results:
            raise self._lost(None)
        res = results[-1]
        if res.status == pq.ExecStatus.FATAL_ERROR:
            sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            message = (res.error_message or b"").decode(errors="replace").strip()
            raise LaneError(f"{_error_class(sqlstate).__name__}: {message}", outage=pg_outage(sqlstate),
                            sqlstate=sqlstate)
        return res

    def _lost(self, exc: BaseException | None) -> LaneError:
        self.broken = True
        self._closer()
        return LaneError(f"OperationalError: connection lost: {exc or self.pgconn.error_message!r}", outage=True,
                         broken=True)


def _error_class(sqlstate: str) -> type[psycopg.Error]:
    try:
        return psycopg.errors.lookup(sqlstate)
    except KeyError:
        return psycopg.DatabaseError


def _wait(fileno: int, *, write: bool = False) -> None:
    if hasattr(select, "poll"):  # select() cannot take a descriptor above 1023
        poller = select.poll()
        poller.register(fileno, select.POLLOUT if write else select.POLLIN)
        poller.poll()
    else:  # pragma: no cover - Windows
        select.select([] if write else [fileno], [fileno] if write else [], [fileno])


def _close(pid: int, connection: Any) -> None:
    if os.getpid() == pid:
        with contextlib.suppress(Exception):  # a connection that already failed
            connection.close()
