"""Pooled SQL connections: checked with a ping only after sitting idle, never on every state change.

On PostgreSQL a thread's claims go through its own connection (its lane, see ``idemtasks.stores.sql_lane``), and
everything else through the pool; both must survive a connection the server closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.pool import NullPool

from idemtasks import ClaimOutcome, Status
from idemtasks.errors import StoreUnavailable
from idemtasks.identity import key_digest, new_operation_id
from idemtasks.stores import sql_schema
from idemtasks.stores.base import CreateRequest
from idemtasks.stores.sql import SQLStore
from idemtasks.stores.sql_async import AsyncSQLStore
from idemtasks.stores.sql_lane import Prepared
from idemtasks.stores.sql_schema import PG_KEEPALIVES, make_engine

from .services import MYSQL_URL, POSTGRES_URL, pg_sessions, require

pytestmark = pytest.mark.timeout(60)


def _terminate(app: str) -> int:
    with sa.create_engine(POSTGRES_URL, poolclass=NullPool).connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :app"),
            {"app": app}).scalar_one())


@pytest.fixture
def pg_store() -> SQLStore:
    require("postgres")
    app = f"idem-{uuid.uuid4().hex[:12]}"
    store = SQLStore(POSTGRES_URL, table="idemtasks_ping_ops",
                     engine_options={"connect_args": {"application_name": app}})
    store.app = app  # type: ignore[attr-defined]
    yield store  # type: ignore[misc]
    store.close()


def _round(store: SQLStore) -> None:
    key = uuid.uuid4().hex
    claim = store.claim("s", key, "t", "f" * 32, owner=uuid.uuid4().hex, lease=30, ttl=60)
    store.finish("s", key, claim.operation.id, claim.operation.fencing_token, Status.SUCCEEDED,
                 result_json="1", ttl=60)
    assert store.get("s", key).status is Status.SUCCEEDED  # type: ignore[union-attr]


def test_a_busy_connection_is_not_pinged(pg_store: SQLStore) -> None:
    _round(pg_store)
    before = pg_store.round_trips
    _round(pg_store)
    assert pg_store.round_trips - before == 3  # claim, finish, get: no ping in between
    with sa.create_engine(POSTGRES_URL, poolclass=NullPool).connect() as conn:
        statements = conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app"), {"app": pg_store.app}).scalar_one()
    assert statements == 2  # this thread's lane (the claims) and one pooled connection did it all


def test_an_idle_connection_closed_by_the_server_is_replaced_without_an_error(pg_store: SQLStore) -> None:
    _round(pg_store)
    assert _terminate(pg_store.app) == 2  # a restart, a failover or an idle timeout: the lane's and the pool's
    time.sleep(sql_schema.IDLE_BEFORE_PING + 0.2)
    _round(pg_store)  # the claim was sent again on a new lane; the ping on checkout replaced the pooled one


def test_a_connection_closed_while_in_steady_use_fails_once_as_unavailable(pg_store: SQLStore) -> None:
    _round(pg_store)
    assert _terminate(pg_store.app) == 2
    # Within the idle threshold nothing is pinged: the one pooled statement that meets the dead connection fails as
    # an outage (the caller retries it, as it would a statement in flight during a restart) ...
    with pytest.raises(StoreUnavailable):
        pg_store.get("s", uuid.uuid4().hex)
    # ... and the pool, having seen the disconnect, replaced the connection for the next one.
    _round(pg_store)


def test_a_claim_that_meets_a_dead_lane_is_sent_again_on_a_new_one(pg_store: SQLStore) -> None:
    _round(pg_store)
    key = uuid.uuid4().hex
    first = pg_store.claim("s", key, "t", "f" * 32, owner="first", lease=30, ttl=60)
    assert _terminate(pg_store.app) == 2
    # Sent twice when the answer is lost, a claim cannot win twice: its owner is unique, so the second sending
    # finds the record held by that very owner and answers it as claimed, with the same token.
    again = pg_store.claim("s", key, "t", "f" * 32, owner="first", lease=30, ttl=60)
    assert again.outcome is ClaimOutcome.CLAIMED
    assert again.operation.fencing_token == first.operation.fencing_token
    other = pg_store.claim("s", key, "t", "f" * 32, owner="second", lease=30, ttl=60)
    assert other.outcome is ClaimOutcome.BUSY


def test_a_creation_that_meets_a_dead_lane_is_sent_again_and_is_still_a_creation(pg_store: SQLStore) -> None:
    _round(pg_store)
    assert _terminate(pg_store.app) == 2
    assert pg_store.create("s", uuid.uuid4().hex, "t", "f" * 32, ttl=60).created  # on a new lane
    # Why sending it again is safe: a creation whose answer was lost, sent again, finds the record it made, which
    # carries this request's new id, and is answered as a creation (so the submit goes on to publish).
    key = uuid.uuid4().hex
    digest = key_digest("s", key)
    req = CreateRequest(digest, "s", key, "t", "f" * 32, new_operation_id(digest), 60.0, None)
    (first, created), (again, created_again) = pg_store._create(req), pg_store._create(req)
    assert created and created_again and again.id == first.id == req.new_id


@pytest.fixture
def pg_async() -> Iterator[tuple[AsyncSQLStore, str]]:
    require("postgres")
    app = f"idem-{uuid.uuid4().hex[:12]}"
    # In the URL, so that the asyncio engine (built from the store's URL) carries it too.
    store = SQLStore(f"{POSTGRES_URL}?application_name={app}", table="idemtasks_ping_ops")
    astore = AsyncSQLStore(store)
    yield astore, app
    asyncio.run(astore.engine.dispose())
    store.close()


async def _create(astore: AsyncSQLStore) -> None:
    sub = await astore.create("s", uuid.uuid4().hex, "t", "f" * 32, ttl=60)
    assert sub.created


def test_the_async_store_replaces_an_idle_connection_closed_by_the_server(pg_async: tuple[AsyncSQLStore, str]) -> None:
    astore, app = pg_async

    async def scenario() -> None:
        await _create(astore)
        assert _terminate(app) >= 1  # the asyncio engine's connection (and the table-creating one's)
        await asyncio.sleep(sql_schema.IDLE_BEFORE_PING + 0.2)
        await _create(astore)  # pinged on checkout, found dead, replaced

    asyncio.run(scenario())


def test_the_async_store_does_not_ping_a_connection_in_steady_use(pg_async: tuple[AsyncSQLStore, str]) -> None:
    astore, app = pg_async

    async def scenario() -> None:
        await _create(astore)
        assert _terminate(app) >= 1  # the asyncio engine's connection (and the table-creating one's)
        # No ping within the idle threshold: the request that meets the dead connection fails as an outage (a 503
        # the client retries) ...
        with pytest.raises(StoreUnavailable):
            await _create(astore)
        await _create(astore)  # ... and the next one gets a new connection

    asyncio.run(scenario())


def test_mariadb_idle_connections_are_pinged_too() -> None:
    require("mysql")
    store = SQLStore(MYSQL_URL, table="idemtasks_ping_ops")
    try:
        _round(store)
        with store.engine.connect() as conn:
            conn.execute(sa.text("SET SESSION wait_timeout = 1"))  # the server drops it once idle for 1 s
        time.sleep(max(sql_schema.IDLE_BEFORE_PING, 1.0) + 1.5)
        _round(store)
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP settings")
def test_mariadb_connections_find_a_vanished_server_within_a_minute_as_postgresql_ones_do() -> None:
    """PyMySQL has no setting for it: the store sets the keepalives' timing and the bound on unacknowledged data on
    each connection's socket (the kernel's own wait 15 minutes or more before a thread waiting for an answer from a
    server that vanished without closing the connection gets an error)."""
    require("mysql")
    store = SQLStore(MYSQL_URL, table="idemtasks_ping_ops")
    try:
        with store.engine.connect() as conn:
            sock = conn.connection.dbapi_connection._sock  # type: ignore[union-attr]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert [sock.getsockopt(socket.IPPROTO_TCP, option) for option in (
                socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)] == [
                PG_KEEPALIVES["keepalives_idle"], PG_KEEPALIVES["keepalives_interval"],
                PG_KEEPALIVES["keepalives_count"], PG_KEEPALIVES["tcp_user_timeout"]]
    finally:
        store.close()


def test_racing_creations_on_an_applications_repeatable_read_engine_are_replays_not_errors() -> None:
    """An application's own engine may run at MariaDB's default level, REPEATABLE READ, where the locking read of an
    absent key takes a gap lock and racing creations of that key deadlock. Such double clicks are replays all the
    same: the store's statements run at READ COMMITTED, and the application's connections keep their own level."""
    require("mysql")
    threads = 16
    engine = sa.create_engine(MYSQL_URL, isolation_level="REPEATABLE READ", pool_size=threads)
    store = SQLStore(MYSQL_URL, engine=engine, table=f"idemtasks_rr_{uuid.uuid4().hex[:10]}")
    errors: list[BaseException] = []

    def racer(key: str, barrier: threading.Barrier, created: list[bool]) -> None:
        barrier.wait()
        try:
            created.append(store.create("s", key, "t", "f" * 32, ttl=60).created)
        except Exception as exc:  # counted, so that one error does not hide the others
            errors.append(exc)

    try:
        for i in range(30):
            created: list[bool] = []
            barrier = threading.Barrier(threads)
            workers = [threading.Thread(target=racer, args=(f"k{i}", barrier, created)) for _ in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert created.count(True) == 1
        assert errors == []
        with engine.connect() as conn:
            assert conn.get_isolation_level() == "REPEATABLE READ"
    finally:
        store.table.drop(engine, checkfirst=True)
        store.close()
        engine.dispose()


@pytest.mark.parametrize(("threshold", "prepared"), [(5, 1), (None, 0)])
def test_a_lane_prepares_its_statements_unless_the_connection_says_not_to(threshold: int | None,
                                                                          prepared: int) -> None:
    # prepare_threshold=None is psycopg's setting for a transaction-mode pooler (PgBouncer), where a named prepared
    # statement may be gone by the next transaction: the lane then sends the claim's text every time.
    require("postgres")
    store = SQLStore(POSTGRES_URL, table="idemtasks_ping_ops",
                     engine_options={"connect_args": {"prepare_threshold": threshold}})
    try:
        _round(store)
        _round(store)
        lane = store._lane()
        assert lane is not None
        probe = Prepared.compile("probe", sa.text("SELECT count(*) FROM pg_prepared_statements WHERE name != 'probe'"),
                                 postgresql.dialect())  # type: ignore[no-untyped-call]
        assert lane.call(probe, {}).get_value(0, 0) == str(prepared).encode()  # the claim's, or none
    finally:
        store.close()


@pytest.mark.parametrize("url_options", [True, False])
def test_commit_settings_given_to_the_store_reach_its_lane_as_well_as_its_pool(url_options: bool) -> None:
    # The README's trade of durability for speed (synchronous_commit=off) is a connection option; the lane's
    # connection is where claims and completions commit, so it must get the option the pool gets.
    require("postgres")
    option = "-c synchronous_commit=off"
    url = POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + "options=-c%20synchronous_commit%3Doff"
    store = (SQLStore(url, table="idemtasks_ping_ops") if url_options else
             SQLStore(POSTGRES_URL, table="idemtasks_ping_ops", engine_options={"connect_args": {"options": option}}))
    try:
        _round(store)
        lane = store._lane()
        assert lane is not None
        show = Prepared.compile("show_commit", sa.text("SELECT current_setting('synchronous_commit')"),
                                postgresql.dialect())  # type: ignore[no-untyped-call]
        assert lane.call(show, {}).get_value(0, 0) == b"off"
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
    finally:
        store.close()


def _conninfo(pgconn: Any) -> dict[str, str]:
    """The settings a libpq connection was opened with."""
    return {o.keyword.decode(): o.val.decode() for o in pgconn.info if o.val is not None}


async def _async_conninfo(store: SQLStore) -> dict[str, str]:
    web = AsyncSQLStore(store)
    try:
        async with web.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            return _conninfo(raw.driver_connection.pgconn)  # type: ignore[union-attr]
    finally:
        await web.engine.dispose()


@pytest.mark.parametrize("override", ["none", "url", "connect_args"])
def test_keepalives_bound_a_silent_server_on_every_connection(override: str) -> None:
    """Without them, a thread waiting for a server that vanished without a word waits for as long as the kernel
    retries; the defaults reach both kinds of connection, and what the user gives wins."""
    require("postgres")
    url, options = POSTGRES_URL, {}
    if override == "url":
        url += ("&" if "?" in url else "?") + "keepalives_idle=7"
    elif override == "connect_args":
        options = {"connect_args": {"keepalives_idle": 7}}
    store = SQLStore(url, table="idemtasks_ping_ops", engine_options=options)
    try:
        _round(store)
        lane = store._lane()
        assert lane is not None
        with store.engine.connect() as conn:
            pooled = _conninfo(conn.connection.dbapi_connection.pgconn)  # type: ignore[union-attr]
        laned = _conninfo(lane.pgconn)
        web = asyncio.run(_async_conninfo(store))
        idle = "30" if override == "none" else "7"
        for params in (pooled, laned, web):
            assert params["keepalives_idle"] == idle
            assert (params["keepalives_interval"], params["keepalives_count"]) == ("10", "3")
            assert params["tcp_user_timeout"] == "60000"
    finally:
        store.close()


def test_closing_the_store_ends_the_lanes_of_threads_that_outlive_it() -> None:
    """A worker thread's lane otherwise lives as long as the thread (a pool's, the keeper's): closing the store
    must end every connection it opened, not only the calling thread's."""
    require("postgres")
    name = f"lanes-{uuid.uuid4().hex[:8]}"
    store = SQLStore(POSTGRES_URL, table=f"t{uuid.uuid4().hex[:12]}",
                     engine_options={"connect_args": {"application_name": name}})
    claimed, done = threading.Event(), threading.Event()

    def worker() -> None:  # claims on its own lane, then stays alive past the store's close
        store.claim("global", "k", "tasks.pay", "fp", owner="w", lease=30, ttl=3600)
        claimed.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert claimed.wait(10)
        assert pg_sessions(name) >= 1
        store.table.drop(store.engine)
        store.close()
        assert pg_sessions(name) == 0
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("service", ["postgres", "mysql"])
def test_a_connection_handed_back_after_the_store_closed_is_closed_not_left_open(service: str) -> None:
    """Another thread held a pooled connection while the store closed (a bounded call given up while it connected,
    a renewal on the keeper's thread): handed back later, it must be closed then, not wait for the garbage
    collector (psycopg warns when it finds one open)."""
    require(service)
    store = SQLStore(POSTGRES_URL if service == "postgres" else MYSQL_URL, table=f"t{uuid.uuid4().hex[:12]}")
    held = store.engine.connect()
    held.exec_driver_sql("SELECT 1")
    dbapi = held.connection.dbapi_connection
    store.table.drop(store.engine)
    store.close()
    assert _is_open(dbapi), "closing the store must not close a connection under another thread"
    held.close()  # its thread is done with it
    assert not _is_open(dbapi)


def _is_open(dbapi: Any) -> bool:
    return bool(dbapi.open) if hasattr(dbapi, "open") else not dbapi.closed  # PyMySQL, psycopg


def test_opening_a_store_on_a_server_that_does_not_answer_gives_up_after_one_connect_timeout() -> None:
    """Making the table is tried again when processes starting together collide; a connection that could not be made
    is not, or each try would cost the connect timeout again (five of them, opening a store on the web side)."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # accepted by the kernel, never answered
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            SQLStore(f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test?connect_timeout=1")
        assert time.monotonic() - started < 2.5


def _mysql_greeting(tls: bool) -> bytes:
    """A MariaDB server's first packet (protocol 10), offering TLS or not."""
    caps = 0x0200 | 0x8000 | 0x80000 | 0x0008 | 0x0001 | (0x0800 if tls else 0)
    body = (b"\x0a" + b"10.11.0-test\x00" + struct.pack("<I", 7) + b"abcdefgh" + b"\x00"
            + struct.pack("<H", caps & 0xFFFF) + b"\x21" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16)
            + b"\x15" + b"\x00" * 10 + b"ijklmnopqrst\x00" + b"mysql_native_password\x00")
    return struct.pack("<I", len(body))[:3] + b"\x00" + body


@pytest.mark.parametrize(("server", "given"), [
    ("never greets", ""), ("greets, offers TLS, then goes silent", ""),
    ("never greets", "&write_timeout=30"), ("greets, offers TLS, then goes silent", "&read_timeout=30")])
def test_opening_a_mariadb_store_on_a_server_that_stops_answering_gives_up_after_the_connect_timeout(
        server: str, given: str) -> None:
    """PyMySQL's connect_timeout bounds the TCP connect only; the server's greeting, the TLS handshake (tried
    whenever the server offers TLS, under the write timeout) and the login are waited for within it too (the opening
    held its URL's lock for good), whichever of the read and write timeouts the caller left unset."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as fake:
        held: list[socket.socket] = []

        def greet() -> None:
            with contextlib.suppress(OSError):
                conn, _ = fake.accept()
                held.append(conn)
                conn.sendall(_mysql_greeting(tls=True))  # then nothing more

        if server != "never greets":  # otherwise accepted by the kernel, never answered
            threading.Thread(target=greet, daemon=True).start()
        outcome: list[BaseException] = []

        def open_it() -> None:
            try:
                SQLStore(f"mysql+pymysql://root@127.0.0.1:{fake.getsockname()[1]}/test?connect_timeout=1{given}")
            except BaseException as exc:  # reported below
                outcome.append(exc)

        opener = threading.Thread(target=open_it, daemon=True)
        opener.start()
        opener.join(5)
        for conn in held:
            conn.close()
        assert not opener.is_alive() and len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)


def test_once_connected_mariadb_statements_are_not_bounded_by_the_connect_timeout() -> None:
    """Nor SQLAlchemy's first statements on a new connection (an application's first_connect listener here, the
    dialect's own set-up otherwise), which a loaded server may take longer than the connect timeout to answer."""
    require("mysql")
    engine = make_engine(MYSQL_URL + ("&" if "?" in MYSQL_URL else "?") + "connect_timeout=1")

    def slow_setup(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SELECT SLEEP(1.2)")

    sa.event.listen(engine, "first_connect", slow_setup)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT SLEEP(1.5)").scalar_one() == 0  # longer than the connect timeout
    finally:
        engine.dispose()
