"""Bounded calls to a SQL store (the keeper's renewals, resends of an outcome nobody renews): the caller waits at
most RENEW_TIMEOUT, and the connection the given-up call holds is cut, that connection alone."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from idemtasks.errors import StoreUnavailable
from idemtasks.stores import sql_bounded
from idemtasks.stores.base import RENEW_TIMEOUT
from idemtasks.stores.sql import SQLStore
from idemtasks.stores.sql_bounded import MAX_GIVEN_UP, Bounds

from . import services

pytestmark = pytest.mark.timeout(30)


class _Record:
    """What the pool's listeners see of a connection record: its ``info``."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}


class _Driver:
    """A driver connection as the bound sees it: a socket behind ``fileno()``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def _bounded_threads() -> int:
    return sum(t.name == "idemtasks-bounded-call" for t in threading.enumerate())


class TestWithoutAServer:
    def test_a_call_waiting_for_an_answer_that_never_comes_is_given_up_and_its_socket_cut(self) -> None:
        ours, server = socket.socketpair()
        record, ended = _Record(), threading.Event()

        def statement() -> bytes:
            sql_bounded._on_checkout(_Driver(ours), record, None)  # what the pool does when the call checks out
            try:
                return ours.recv(1)  # the answer, lost
            finally:
                ended.set()

        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer within"):
            Bounds("store").run(statement, timeout=0.2)
        assert time.monotonic() - started < 0.5
        assert ended.wait(1), "the given-up call still waits on its socket"
        assert record.info[sql_bounded._CUT], "the connection may have gone back to the pool: it must be dropped"
        with pytest.raises(sa.exc.DisconnectionError):
            sql_bounded._on_checkout(_Driver(ours), record, None)  # its next checkout, by anyone
        ours.close()
        server.close()

    def test_a_socket_that_took_the_closed_connections_number_is_left_alone(self) -> None:
        """The driver may close its socket during the call (on a disconnect), and the next socket opened, by any
        thread, gets its number: the cut acts on a duplicate taken at checkout, not on the number."""
        ours, server = socket.socketpair()
        opened: list[socket.socket] = []
        release = threading.Event()

        def statement() -> None:
            sql_bounded._on_checkout(_Driver(ours), _Record(), None)
            number = ours.fileno()
            ours.close()
            opened.extend(socket.socketpair())
            assert number in (opened[0].fileno(), opened[1].fileno())  # the number was reused
            release.wait(2)

        with pytest.raises(StoreUnavailable):
            Bounds("store").run(statement, timeout=0.2)
        release.set()
        opened[0].sendall(b"x")
        assert opened[1].recv(1) == b"x"
        opened[1].sendall(b"y")
        assert opened[0].recv(1) == b"y"
        for s in (server, *opened):
            s.close()

    def test_an_answer_that_comes_in_time_is_returned_and_an_error_raised(self) -> None:
        bounds = Bounds("store")
        assert bounds.run(lambda: 42, timeout=1) == 42

        def refused() -> None:
            raise StoreUnavailable("refused")

        with pytest.raises(StoreUnavailable, match="refused"):
            bounds.run(refused, timeout=1)

    def test_calls_given_up_while_connecting_are_counted_and_the_next_fails_at_once(self) -> None:
        """A call that waits to connect holds no socket to cut: it ends with its connect timeout. Beyond
        MAX_GIVEN_UP of those, the next call does not start a thread that would wait as well."""
        bounds, release = Bounds("store"), threading.Event()
        for _ in range(MAX_GIVEN_UP):
            with pytest.raises(StoreUnavailable, match="no answer"):
                bounds.run(lambda: release.wait(5), timeout=0.01)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="still waiting to connect"):
            bounds.run(lambda: 1, timeout=1)
        assert time.monotonic() - started < 0.1
        release.set()
        deadline = time.monotonic() + 2
        while _bounded_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bounds.run(lambda: 1, timeout=1) == 1

    def test_without_a_new_thread_the_call_is_made_on_the_callers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """At interpreter exit (Python 3.12 refuses new threads in atexit, where the lanes' last answers are read)
        a resend must still be sent, unbounded as it used to be, not dropped."""
        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        caller = threading.current_thread()
        assert Bounds("store").run(lambda: threading.current_thread() is caller, timeout=0.1)


@pytest.fixture(params=["postgres", "mysql"])
def store(request: pytest.FixtureRequest) -> Iterator[SQLStore]:
    services.require(request.param)
    url = services.POSTGRES_URL if request.param == "postgres" else services.MYSQL_URL
    store = SQLStore(url, table=f"bounded_{uuid.uuid4().hex[:12]}")
    yield store
    store.table.drop(store.engine)
    store.close()


def test_a_slow_statement_made_promptly_is_given_up_and_only_its_connection_dropped(store: SQLStore) -> None:
    sleep, backend_id = (("SELECT pg_sleep(3)", "SELECT pg_backend_pid()") if store.dialect == "postgresql"
                         else ("SELECT SLEEP(3)", "SELECT CONNECTION_ID()"))
    with store.engine.connect() as conn:
        other = conn.exec_driver_sql(backend_id).scalar_one()  # checked out across the cut, then given back

        started = time.monotonic()
        with store.promptly(), pytest.raises(StoreUnavailable, match="no answer within"):
            store._count(sa.text(sleep), {})
        assert time.monotonic() - started < RENEW_TIMEOUT + 0.3
        deadline = time.monotonic() + 1
        while _bounded_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _bounded_threads(), "the given-up statement was not cut"

    # SQLAlchemy drops every connection older than a disconnect it sees; this one was cut on purpose. The pool holds
    # two records now: the cut one (connecting again) and the other one, still the same connection.
    with store.engine.connect() as a, store.engine.connect() as b:
        assert other in {a.exec_driver_sql(backend_id).scalar_one(), b.exec_driver_sql(backend_id).scalar_one()}
    assert store.get("s", "k") is None  # and the store goes on
