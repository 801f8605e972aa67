"""Calls to a SQL store whose wait for an answer is bounded: the lease keeper's renewals, and the calls that send an
outcome nobody renews any more (see :meth:`Store.promptly <idemtasks.stores.base.Store.promptly>` and
:data:`~idemtasks.stores.base.RENEW_TIMEOUT`).

Neither libpq nor PyMySQL bounds the wait for an answer. A statement sent while the network dropped packets waits
until the kernel gives the connection up (about a minute on PostgreSQL with the store's TCP settings, see
``PG_KEEPALIVES``; longer on MariaDB), far past the grace after which a suspected lease is taken over, so a live
holder whose renewal was lost would lose its operation, and its body would run a second time.

Such a call runs on a thread of its own, and its caller waits for it at most the bound. After that the caller gets
``StoreUnavailable`` and sends the call again itself (the keeper and the settler do). The connection the given-up
call holds, from its checkout (and the ping the store's own engines give an idle one then; SQLAlchemy's
``pool_pre_ping`` comes before and is not covered) to its return to the pool (after the COMMIT, on MariaDB), has its
socket shut down, so that the call's thread ends at once; that connection alone is dropped, not every other one in
the pool. A call given up while it connects, or while it waits for a free connection, cannot be cut: once it has its
connection it sends no statement (MariaDB's driver still ends the empty transaction) and hands it back to the pool.
At most :data:`MAX_GIVEN_UP` such calls per store may still be running before the next one fails at once. A given-up
call that lands after all is harmless: each of these calls is fenced on its token, and it is sent again anyway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from ..errors import StoreUnavailable

__all__ = ["MAX_GIVEN_UP", "BoundedCall", "Bounds", "given_up_here", "watch_engine"]

_T = TypeVar("_T")

#: Given-up calls of one store that may still be running (waiting to connect) before the next call fails at once.
MAX_GIVEN_UP = 16

#: Pool record flag: a bounded call was cut while it held this connection, which may have gone back to the pool.
_CUT = "idemtasks_cut"

_current = threading.local()  # the bounded call the current thread runs, if any
_all_bounds: weakref.WeakSet[Bounds] = weakref.WeakSet()


class BoundedCall:
    """One bounded call: the connection it holds, and whether its caller gave it up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._record: Any = None
        self._given_up = False
        self._finished = False
        self.cut = False

    @property
    def given_up(self) -> bool:
        return self._given_up

    def checked_out(self, dbapi_conn: Any, record: Any) -> None:
        with self._lock:
            self._drop_socket()  # the connection it held before, if the pool turned that one down
            if self._given_up:
                return  # it will send nothing (see SQLStore._tx) and hand the connection back as it got it
            # A duplicate of the descriptor, kept until the connection is checked in: the driver may close its own
            # at any moment (on a disconnect), and a number closed there may be reused by any other socket.
            self._sock = _duplicate(_socket_fd(dbapi_conn))
            self._record = record

    def checked_in(self, record: Any) -> None:
        with self._lock:
            if record is self._record:  # not some other connection the garbage collector checked in here
                self._drop_socket()

    def finished(self) -> None:
        with self._lock:
            self._finished = True
            self._drop_socket()

    def give_up(self) -> bool:
        """Stop waiting for the call, and cut the connection it holds; ``False`` if it had finished meanwhile."""
        with self._lock:
            if self._finished:
                return False
            self._given_up = True
            if self._sock is not None:
                # Marked before the cut: the woken thread's error handler reads it (_on_error). And the call may have
                # got its answer just now and go back to the pool with a dead socket: the next checkout of this
                # record drops it (see _on_checkout).
                self.cut = True
                self._record.info[_CUT] = True
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)  # the driver's wait wakes up with end of stream
            return True

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock, self._record = None, None


class Bounds:
    """A store's bounded calls: runs them, and counts those given up that are still running."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reset()
        _all_bounds.add(self)

    def _reset(self) -> None:
        # Also in a forked child: the calls its parent gave up do not run there, and a lock may have been held.
        self._lock = threading.Lock()
        self._given_up_running = 0

    @property
    def given_up_running(self) -> int:
        """Calls given up that still run (waiting to connect, or cut and ending)."""
        return self._given_up_running

    def run(self, fn: Callable[[], _T], *, timeout: float) -> _T:
        """``fn()`` on a thread of its own; its answer, or ``StoreUnavailable`` once ``timeout`` seconds passed."""
        with self._lock:
            if self._given_up_running >= MAX_GIVEN_UP:
                raise StoreUnavailable(f"{self.name}: {MAX_GIVEN_UP} calls given up earlier still run")
        call = BoundedCall()
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def run() -> None:
            _current.call = call
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the caller, or dropped with the call once it was given up
                outcome.append((False, exc))
            finally:
                call.finished()
                done.set()
                if call.given_up:
                    with self._lock:
                        self._given_up_running -= 1

        try:
            threading.Thread(target=run, name="idemtasks-bounded-call", daemon=True).start()
        except RuntimeError:
            # No new thread: the interpreter is exiting (the lanes' last answers are read from atexit, where
            # Python 3.12 refuses new threads) or out of threads. Sent here, unbounded, as it always was.
            return fn()
        try:
            answered = done.wait(timeout)
        except BaseException:  # interrupted (a soft time limit): the call is given up all the same
            self._give_up(call)
            raise
        if not answered and self._give_up(call):
            raise StoreUnavailable(f"{self.name}: no answer within {timeout} s; sent again on another connection")
        done.wait()  # it finished as it was given up: its answer stands
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _give_up(self, call: BoundedCall) -> bool:
        with self._lock:
            if call.give_up():
                self._given_up_running += 1
                return True
            return False


def watch_engine(engine: sa.Engine) -> None:
    """Let bounded calls through ``engine`` cut the connection they hold. SQLAlchemy keeps one registration of a
    listener per target however often it is made, and carries the pool's over when a fork recreates the pool."""
    # First among the checkout listeners: the call holds the connection before an idle one's ping is sent.
    sa.event.listen(engine.pool, "checkout", _on_checkout, insert=True)
    sa.event.listen(engine.pool, "checkin", _on_checkin)
    sa.event.listen(engine, "handle_error", _on_error)


def _call_here() -> BoundedCall | None:
    """The bounded call this thread runs, if any."""
    return getattr(_current, "call", None)


def given_up_here() -> bool:
    """Whether this thread runs a bounded call that was given up: it must send nothing more."""
    call = _call_here()
    return call is not None and call.given_up


def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if record.info.pop(_CUT, False):
        # The pool takes another connection, and drops this one alone (not every connection older than it).
        raise sa.exc.DisconnectionError("the connection was cut by a bounded call that was given up")
    call = _call_here()
    if call is not None:
        call.checked_out(dbapi_conn, record)


def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
    call = _call_here()
    if call is not None:
        call.checked_in(record)


def _on_error(ctx: sa.engine.ExceptionContext) -> None:
    call = _call_here()
    if call is not None and call.cut and ctx.is_disconnect:
        # Cut on purpose, which says nothing of the other connections: SQLAlchemy would drop them all.
        ctx.invalidate_pool_on_disconnect = False


def _duplicate(fd: int | None) -> socket.socket | None:
    """A socket object of our own for ``fd``; ``None`` if there is none to have (the call cannot be cut then)."""
    if fd is None:
        return None
    try:
        copy = os.dup(fd)
    except OSError:  # out of descriptors
        return None
    try:
        return socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return None


def _after_fork() -> None:
    for bounds in list(_all_bounds):
        bounds._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _socket_fd(dbapi_conn: Any) -> int | None:
    """The socket of a driver's connection: psycopg's (and psycopg2's) ``fileno()``, PyMySQL's ``_sock``. None for
    SQLite (a file), and for drivers that do not show theirs: there a given-up call runs on until its driver ends it."""
    with contextlib.suppress(Exception):  # a connection the driver already closed has none
        fileno = getattr(dbapi_conn, "fileno", None)
        if fileno is not None:
            return int(fileno())
        sock = getattr(dbapi_conn, "_sock", None)
        if sock is not None:
            return int(sock.fileno())
    return None
