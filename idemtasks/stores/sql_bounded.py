"""Calls to a SQL store whose wait for an answer is bounded: the lease keeper's renewals, and the calls that send an
outcome nobody renews any more (see :meth:`Store.promptly <idemtasks.stores.base.Store.promptly>` and
:data:`~idemtasks.stores.base.RENEW_TIMEOUT`).

Neither libpq nor PyMySQL bounds the wait for an answer. A statement sent while the network dropped packets waits
until the kernel gives the connection up (about a minute with the store's TCP settings, see ``PG_KEEPALIVES``), far
past the grace after which a suspected lease is taken over, so a live holder whose renewal was lost would lose its
operation, and its body would run a second time.

Such a call runs on a thread of its own and its caller waits for it at most the bound. After that the caller gets
``StoreUnavailable`` and sends the call again itself, on another connection (the keeper and the settler do). The
socket of the connection the given-up call is using is shut down, so that its thread ends at once and the connection
is dropped rather than handed back to the pool. A given-up call that still lands is harmless: each of these calls
is fenced on its token, and it is sent again anyway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa

from ..errors import StoreUnavailable

__all__ = ["BoundedCall", "run_bounded"]

_T = TypeVar("_T")


class BoundedCall:
    """One bounded call, as its own thread sees it: which connection it is using, and whether it was given up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._given_up = False
        self._cut = False

    @contextlib.contextmanager
    def watching(self, conn: sa.Connection) -> Iterator[None]:
        """Within this context, giving the call up shuts ``conn``'s socket down."""
        fd = _socket_fd(conn.connection.dbapi_connection)
        with self._lock:
            if self._given_up:  # its caller stopped waiting while it checked out a connection: nothing to send
                raise StoreUnavailable("a bounded call given up before its statement")
            self._fd = fd
        answered = False
        try:
            yield
            answered = True
        finally:
            with self._lock:
                self._fd = None
                cut = self._cut
            if cut:
                # Cut just as its answer came (else the driver saw the socket die and the connection is invalid
                # already): its socket is dead all the same, so the connection must not go back to the pool.
                conn.invalidate()
                if answered:
                    raise StoreUnavailable("a bounded call given up as it was answered")  # the caller has moved on

    def give_up(self) -> None:
        with self._lock:
            self._given_up = True
            if self._fd is None:
                return  # still checking a connection out or connecting: the connect timeout ends that
            with contextlib.suppress(OSError):
                # Through a duplicate of the descriptor, which the driver may close at any moment after this lock;
                # a shutdown acts on the socket both share, and wakes the driver's wait with end of stream.
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                self._cut = True


def run_bounded(fn: Callable[[BoundedCall], _T], *, timeout: float, name: str) -> _T:
    """``fn(call)`` on a thread of its own; its answer, or ``StoreUnavailable`` once ``timeout`` seconds passed."""
    call = BoundedCall()
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, fn(call)))
        except BaseException as exc:  # handed to the caller, or dropped with the call once it was given up
            outcome.append((False, exc))
        finally:
            done.set()

    # A thread per call: these calls are rare (a renewal every third of a lease, resends after a failure), and one
    # given up may still be waiting to connect, which must not hold up the next.
    threading.Thread(target=run, name="idemtasks-bounded-call", daemon=True).start()
    if not done.wait(timeout):
        call.give_up()
        raise StoreUnavailable(f"{name}: no answer within {timeout} s; sent again on another connection")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _socket_fd(dbapi_conn: Any) -> int | None:
    """The socket of a driver's connection: psycopg's (and psycopg2's) ``fileno()``, PyMySQL's ``_sock``; none for
    SQLite, a file."""
    with contextlib.suppress(Exception):  # a connection the driver already closed has none
        fileno = getattr(dbapi_conn, "fileno", None)
        if fileno is not None:
            return int(fileno())
        sock = getattr(dbapi_conn, "_sock", None)
        if sock is not None:
            return int(sock.fileno())
    return None
