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
from idemtasks.stores.sql_bounded import MAX_GIVEN_UP, BoundedCall, Bounds

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


def _drained(bounds: Bounds, within: float = 2.0) -> None:
    """Wait until no call ``bounds`` gave up still runs."""
    deadline = time.monotonic() + within
    while bounds.given_up_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not bounds.given_up_running, "a given-up call still runs"


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
        call = BoundedCall()
        sql_bounded._current.call = call
        try:
            sql_bounded._on_checkout(_Driver(ours), _Record(), None)
            number = ours.fileno()
            ours.close()
            a, b = socket.socketpair()
            assert number in (a.fileno(), b.fileno())  # the number was reused
            assert call.give_up()
            a.sendall(b"x")
            assert b.recv(1) == b"x"
            b.sendall(b"y")
            assert a.recv(1) == b"y"
        finally:
            call.finished()
            del sql_bounded._current.call
        for s in (server, a, b):
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
        with pytest.raises(StoreUnavailable, match="given up earlier still run"):
            bounds.run(lambda: 1, timeout=1)
        assert time.monotonic() - started < 0.1
        release.set()
        _drained(bounds)
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
    store = SQLStore(url, table=f"bounded_{uuid.uuid4().hex[:12]}",
                     engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 5})
    yield store
    store.table.drop(store.engine)
    store.close()


def _backend_id(store: SQLStore, conn: sa.Connection) -> int:
    query = "SELECT pg_backend_pid()" if store.dialect == "postgresql" else "SELECT CONNECTION_ID()"
    return int(conn.exec_driver_sql(query).scalar_one())


def _pooled_ids(store: SQLStore) -> set[int]:
    with store.engine.connect() as a, store.engine.connect() as b:  # both of the pool's connections
        return {_backend_id(store, a), _backend_id(store, b)}


def test_a_slow_statement_made_promptly_is_given_up_and_only_its_connection_dropped(store: SQLStore) -> None:
    sleep = "SELECT pg_sleep(3)" if store.dialect == "postgresql" else "SELECT SLEEP(3)"
    _pooled_ids(store)  # both open: the bounded call takes a pooled connection, it does not connect
    with store.engine.connect() as conn:
        other = _backend_id(store, conn)  # checked out across the cut, then given back

        started = time.monotonic()
        with store.promptly(), pytest.raises(StoreUnavailable, match="no answer within"):
            store._count(sa.text(sleep), {})
        assert time.monotonic() - started < RENEW_TIMEOUT + 0.3
        _drained(store._bounds, within=1.0)  # the statement was cut: its thread ended long before the sleep

    # SQLAlchemy drops every connection older than a disconnect it sees; this one was cut on purpose. The pool holds
    # the cut record (connecting again) and the other one, still the same connection.
    assert other in _pooled_ids(store)
    assert store.get("s", "k") is None  # and the store goes on


def test_a_call_given_up_while_it_waited_for_a_connection_hands_it_back_unused(store: SQLStore) -> None:
    """It cannot be cut while it waits; once it has the connection it sends nothing, and the connection stays."""
    with store.engine.connect() as a, store.engine.connect() as b:  # the whole pool
        ids = {_backend_id(store, a), _backend_id(store, b)}
        with store.promptly(), pytest.raises(StoreUnavailable, match="no answer within"):
            store.get("s", "k")
        assert store._bounds.given_up_running == 1
    _drained(store._bounds)  # it got a connection and gave it back
    assert _pooled_ids(store) == ids
    assert store.engine.pool.checkedout() == 0


def test_where_no_thread_can_be_started_the_call_is_made_in_place(store: SQLStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    op = store.claim("s", "k", "t", "f" * 32, owner="me", lease=30, ttl=60).operation
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert store.renew(op, op.fencing_token, lease=30, ttl=60)  # renewals are always bounded
