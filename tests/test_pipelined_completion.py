"""Pipelined completions on Redis and PostgreSQL: written without waiting, never lost, and still fenced.

A worker thread's completion goes out on its own connection and its answer is read behind the next claim, or by
the collector thread when the worker goes idle. These tests drive that path on real servers, including the
answers that are not "done": a refused (zombie) completion, a flushed script cache, a connection killed before the
server ran the completion, and a server that is gone.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from idemtasks import ClaimOutcome, LeaseLost, Status, StoreUnavailable
from idemtasks.stores.base import Store
from idemtasks.stores.lanes import COLLECT_AFTER, BaseLane, _Collector
from idemtasks.stores.redis import RedisStore
from idemtasks.stores.sql import SQLStore
from tests import services
from tests.conftest import drop, make_store
from tests.private_redis import PrivateRedis

TTL = 3600.0


class Settled:
    """The ``settle`` callback of one completion: what it was handed, if anything."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.called = threading.Event()

    def __call__(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.called.set()


@pytest.fixture(params=["redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path)
    yield s
    drop(s)  # closes it too


def twin(store: Store) -> Store:
    """Another client of the same records: another worker, on connections of its own."""
    if isinstance(store, RedisStore):
        return RedisStore(services.REDIS_URL, namespace=store.namespace)
    assert isinstance(store, SQLStore)
    return SQLStore(services.POSTGRES_URL, table=store.table.name, create_schema=False)


def claim(store: Store, key: str, *, lease: float = 30.0) -> ClaimOutcome:
    return store.claim("s", key, "t", "fp", owner=uuid.uuid4().hex, lease=lease, ttl=TTL).outcome


def held(store: Store, key: str, *, lease: float = 30.0, grace: float | None = None):  # type: ignore[no-untyped-def]
    res = store.claim("s", key, "t", "fp", owner=uuid.uuid4().hex, lease=lease, ttl=TTL, grace=grace)
    assert res.outcome is ClaimOutcome.CLAIMED
    return res.operation


def taken_over(store: Store, key: str):  # type: ignore[no-untyped-def]
    """A lapsed lease taken over by a redelivery's claims, with no grace: the first marks it, the second takes it."""
    assert store.claim("s", key, "t", "fp", owner="suspicious", lease=30.0, ttl=TTL, grace=0.0).outcome \
        is ClaimOutcome.BUSY
    return held(store, key, grace=0.0)


def finish_pipelined(store: Store, op, settled: Settled, result: str = '"paid"') -> None:  # type: ignore[no-untyped-def]
    store.finish_pipelined(op.scope, op.key, op.id, op.fencing_token, Status.SUCCEEDED, result_json=result, ttl=TTL,
                           settle=settled)


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_a_store_pipelines_completions_and_a_duplicate_behind_one_replays_it(store: Store) -> None:
    assert store.pipelines_completions
    op, settled = held(store, "k"), Settled()
    finish_pipelined(store, op, settled)
    # The duplicate's claim goes out behind the completion on the same connection: the server has run it first.
    res = store.claim("s", "k", "t", "fp", owner="dup", lease=30.0, ttl=TTL)
    assert res.outcome is ClaimOutcome.DONE and res.operation.result == "paid"
    assert not settled.errors


def test_the_outcome_is_visible_to_other_clients_without_another_claim(store: Store) -> None:
    op, settled = held(store, "k"), Settled()
    finish_pipelined(store, op, settled)
    reader = twin(store)
    try:
        assert wait_for(lambda: (o := reader.get("s", "k")) is not None and o.status is Status.SUCCEEDED, 1.0)
    finally:
        reader.close()
    assert not settled.errors


def test_a_thread_reads_its_own_pipelined_completion_at_once(store: Store) -> None:
    # Reads go through the pool, not the lane; a read right behind a completion still in flight (a commit takes a
    # while) must not answer "running", as an on_success hook that looks its operation up would otherwise see.
    for i in range(20):
        op, settled = held(store, f"k{i}"), Settled()
        finish_pipelined(store, op, settled)
        by_key, by_id = store.get("s", f"k{i}"), store.get_by_id(op.id)
        assert by_key is not None and by_key.status is Status.SUCCEEDED and by_key.result == "paid"
        assert by_id == by_key
        assert not settled.errors


def test_a_zombies_pipelined_completion_is_refused_and_it_hears_so_while_idle(store: Store) -> None:
    zombie, settled = held(store, "k", lease=0.2), Settled()
    time.sleep(0.3)
    other = twin(store)  # another worker, another connection
    try:
        successor = taken_over(other, "k")
    finally:
        other.close()
    finish_pipelined(store, zombie, settled, result='"late"')
    # Nothing else runs on the zombie's connection: the collector reads the refusal.
    assert settled.called.wait(COLLECT_AFTER * 20)
    [lost] = settled.errors
    assert isinstance(lost, LeaseLost) and lost.current_token == successor.fencing_token
    op = store.get("s", "k")
    assert op is not None and op.status is Status.RUNNING and op.result is None


def test_a_completion_sent_after_the_script_cache_was_flushed_is_sent_again(private_redis: PrivateRedis) -> None:
    store = RedisStore(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    try:
        op, settled = held(store, "k"), Settled()
        admin.script_flush()  # what a restarted server looks like to a loaded script
        finish_pipelined(store, op, settled)
        assert claim(store, "other") is ClaimOutcome.CLAIMED  # reads the NOSCRIPT answer, then sends it again
        done = store.get("s", "k")
        assert done is not None and done.status is Status.SUCCEEDED and done.result == "paid"
        assert not settled.errors
    finally:
        admin.close()
        store.close()


def test_a_published_flag_sent_after_the_script_cache_was_flushed_is_sent_again(private_redis: PrivateRedis) -> None:
    """Only the scripts a lane calls reload themselves; the flag is only ever sent unanswered. Left unset, every
    submit of the process after a restart would leave its operation looking unpublished to recovery."""
    store = RedisStore(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    try:
        op = store.create("s", "k", "t", "fp", ttl=TTL).operation
        assert op.needs_publish
        admin.script_flush()
        store.mark_published(op)
        assert wait_for(lambda: (o := store.get("s", "k")) is not None and not o.needs_publish, COLLECT_AFTER * 30)
    finally:
        admin.close()
        store.close()


def test_a_thread_that_ends_right_after_its_completion_leaves_its_answer_to_the_collector(
        private_redis: PrivateRedis) -> None:
    """A thread pool shutting down: the worker thread ends with its last completion's answer unread, and its lane
    (its connection) goes with its thread's locals. The answer decides whether the completion is sent again."""
    store = RedisStore(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    settled = Settled()

    def last_task() -> None:
        op = held(store, "k")
        admin.script_flush()  # so that the answer says: not run, send it again
        finish_pipelined(store, op, settled)

    try:
        thread = threading.Thread(target=last_task)
        thread.start()
        thread.join()
        del thread
        gc.collect()
        assert wait_for(lambda: (o := store.get("s", "k")) is not None and o.status is Status.SUCCEEDED, 5.0)
        assert not settled.errors
    finally:
        admin.close()
        store.close()


def test_a_completion_whose_connection_is_killed_before_it_ran_is_sent_again(private_redis: PrivateRedis) -> None:
    store = RedisStore(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    try:
        op, settled = held(store, "k"), Settled()
        # Hold every write, so the completion sits unrun in the server while its connection is killed under it. The
        # resend waits out the rest of the pause: under RENEW_TIMEOUT, after which a resend gives way to the
        # settler's next try (the settler here only records what reaches it).
        admin.execute_command("CLIENT", "PAUSE", "450", "WRITE")
        finish_pipelined(store, op, settled)
        time.sleep(0.05)
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        # The collector reads a dead connection: the outcome is unknown, so the store sends it again.
        assert wait_for(lambda: (o := store.get("s", "k")) is not None and o.status is Status.SUCCEEDED, 5.0)
        assert store.get("s", "k").result == "paid"  # type: ignore[union-attr]
        time.sleep(COLLECT_AFTER * 3)
        assert not settled.errors
    finally:
        admin.close()
        store.close()


# A worker process's last task: its completion goes out, the connection dies before the server ran it, and the
# process ends at once, before the collector (a daemon thread, COLLECT_AFTER later) would read the lost answer.
_EXITING_WORKER = """
import os, sys, time
import redis
from celery import signals
import idemtasks.execution  # the worker side, as a pool child has it loaded
from idemtasks.models import Status
from idemtasks.stores.redis import RedisStore

url, how = sys.argv[1], sys.argv[2]
store, admin = RedisStore(url), redis.Redis.from_url(url)
op = store.claim("s", "k", "t", "fp", owner="last", lease=30.0, ttl=60.0).operation
admin.execute_command("CLIENT", "PAUSE", "800", "WRITE")  # the completion waits in the server, unrun
store.finish_pipelined("s", "k", op.id, op.fencing_token, Status.SUCCEEDED, result_json='"paid"', ttl=60.0,
                       settle=lambda exc: print("settled:", exc))
time.sleep(0.02)
admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
admin.execute_command("CLIENT", "UNPAUSE")
if how == "pool child":  # what billiard does when a prefork child ends: the signal, then os._exit
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    os._exit(0)
sys.exit(0)
"""


@pytest.mark.parametrize("how", ["interpreter exit", "pool child"])
def test_a_process_that_exits_right_after_a_completion_whose_connection_died_sends_it_again(
        private_redis: PrivateRedis, how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _EXITING_WORKER, private_redis.url, how], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    store = RedisStore(private_redis.url)
    try:
        op = store.get("s", "k")
        assert op is not None and op.status is Status.SUCCEEDED and op.result == "paid"
        assert "settled" not in proc.stdout  # nothing refused it, nothing was lost
    finally:
        store.close()


def test_a_completion_the_store_never_ran_reaches_settle_as_unavailable(private_redis: PrivateRedis) -> None:
    store = RedisStore(private_redis.url, socket_timeout=0.5)
    admin = redis.Redis.from_url(private_redis.url)
    try:
        op, settled = held(store, "k"), Settled()
        admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        finish_pipelined(store, op, settled)
        private_redis.stop()  # gone before the completion ran
        assert settled.called.wait(10.0)
        assert all(isinstance(e, StoreUnavailable) for e in settled.errors) and len(settled.errors) == 1
    finally:
        admin.close()
        store.close()


def test_stores_that_cannot_pipeline_finish_at_once_and_raise(tmp_path: Path) -> None:
    sql = make_store("sqlite", tmp_path)
    try:
        assert not sql.pipelines_completions
        zombie = sql.claim("s", "k", "t", "fp", owner="a", lease=0.2, ttl=TTL).operation
        time.sleep(0.3)
        assert sql.claim("s", "k", "t", "fp", owner="b", lease=30.0, ttl=TTL, grace=0.0).outcome is ClaimOutcome.BUSY
        assert sql.claim("s", "k", "t", "fp", owner="b", lease=30.0, ttl=TTL, grace=0.0).outcome is ClaimOutcome.CLAIMED
        settled = Settled()
        with pytest.raises(LeaseLost):
            sql.finish_pipelined("s", "k", zombie.id, zombie.fencing_token, Status.SUCCEEDED, result_json="1",
                                 ttl=TTL, settle=settled)
        assert not settled.errors
    finally:
        drop(sql)


def test_a_postgres_completion_whose_connection_is_killed_before_it_ran_is_sent_again(tmp_path: Path) -> None:
    store = make_store("postgres", tmp_path)
    assert isinstance(store, SQLStore)
    admin = sa.create_engine(services.POSTGRES_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        op, settled = held(store, "k"), Settled()
        table = store.table.name
        waiting = f"SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE {table} %'"
        with admin.connect() as killer, admin.execution_options(isolation_level="READ COMMITTED").connect() as locker:
            # Hold the record's row lock, so the completion waits in the server while its connection is killed.
            locker.execute(sa.text(f"SELECT 1 FROM {table} WHERE id = :id FOR UPDATE"), {"id": op.id})
            finish_pipelined(store, op, settled)
            assert wait_for(lambda: killer.execute(sa.text(waiting)).first() is not None, 5.0)
            kill = f"SELECT count(pg_terminate_backend(pid)) FROM ({waiting}) w"
            assert killer.execute(sa.text(kill)).scalar_one() == 1
            time.sleep(0.05)
            locker.rollback()
        # The collector reads a dead connection: the outcome is unknown, so the store sends it again.
        assert wait_for(lambda: (o := store.get("s", "k")) is not None and o.status is Status.SUCCEEDED, 5.0)
        assert store.get("s", "k").result == "paid"  # type: ignore[union-attr]
        time.sleep(COLLECT_AFTER * 3)
        assert not settled.errors
        assert claim(store, "other") is ClaimOutcome.CLAIMED  # and the thread's next claim opens a new lane
    finally:
        admin.dispose()
        drop(store)


def test_a_read_waits_for_the_completion_the_collector_is_sending_again(private_redis: PrivateRedis) -> None:
    """The collector found this thread's completion unanswered on a broken connection and is sending it again: a
    read by the thread meanwhile waits for that, so it never finds its own completed operation still running."""
    store = RedisStore(private_redis.url)
    admin = redis.Redis.from_url(private_redis.url)
    op = held(store, "k")
    lane = store._lane()
    assert lane is not None
    port = lane.connection._sock.getsockname()[1]
    # Scripts that write wait, reads go on: the resend still waits when the read comes, and lands before
    # RENEW_TIMEOUT, after which it would give way to the settler's next try (which this one only records).
    admin.execute_command("CLIENT", "PAUSE", "450", "WRITE")
    settled = Settled()
    finish_pipelined(store, op, settled)
    time.sleep(0.05)
    admin.execute_command("CLIENT", "KILL", "ADDR", f"127.0.0.1:{port}")  # its completion, queued, never runs
    time.sleep(COLLECT_AFTER + 0.2)  # the collector met the broken connection: its resend waits for the pause
    got = store.get("s", "k")
    assert got is not None and got.status is Status.SUCCEEDED and not settled.errors
    store.close()


class _IdleLane(BaseLane):
    """A lane with nothing owed: what the collector meets on the threads that completed long ago."""

    def _collect_pending(self, done: list[Any]) -> None:
        return None


class _EndingLane(_IdleLane):
    """A lane whose look ends the collector's thread, as what no handler catches would."""

    def collect(self, older_than: float) -> bool:
        raise SystemExit  # not an Exception: it ends the thread


def test_the_collector_lives_through_lanes_added_while_it_looks() -> None:
    """Threads that start (a web server's, one per request) add their lanes while the collector copies its set of
    them. Unguarded, the copy raised "changed size during iteration", which ended the collector's thread: from then
    on no idle lane's answer was read, so a completion whose connection broke was never sent again."""
    watcher = _Collector()
    parked = [_IdleLane() for _ in range(2000)]
    for lane in parked:
        watcher.wake(lane)
    failures: list[BaseException] = []
    stop = threading.Event()

    def look() -> None:
        while not stop.is_set():
            try:
                watcher._pass()
            except BaseException as exc:
                failures.append(exc)
                return

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: the race within seconds
    looker = threading.Thread(target=look)
    try:
        looker.start()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not failures:
            watcher.wake(_IdleLane())
    finally:
        stop.set()
        looker.join()
        sys.setswitchinterval(switching)
    assert failures == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the ending, on purpose
def test_a_collector_whose_thread_ended_is_started_again() -> None:
    watcher = _Collector()
    ending = _EndingLane()
    watcher.wake(ending)
    first = watcher._thread
    assert first is not None
    first.join(timeout=5)
    assert not first.is_alive()
    watcher._lanes.discard(ending)
    watcher.wake(_IdleLane())
    assert watcher._thread is not first and watcher._thread is not None and watcher._thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the ending, on purpose
def test_a_collector_started_again_still_reads_what_idle_lanes_are_owed(store: Store) -> None:
    """A lane is watched once per process: the thread started after one that ended must keep the lanes it watched,
    and read the answer of a completion such a lane's thread then left while it idles."""
    from idemtasks.stores.lanes import collector
    lanes: list[Any] = []
    ended, idle = threading.Event(), threading.Event()

    def complete_twice_then_idle() -> None:
        finish_pipelined(store, held(store, "k1"), Settled())  # the collector now watches this thread's lane
        lanes.append(getattr(store._local, "lane", None))  # type: ignore[attr-defined]
        ended.wait(10)
        finish_pipelined(store, held(store, "k2"), Settled())  # starts the collector again
        idle.wait(10)  # alive, and idle: nobody but the collector reads its lane's answer

    worker = threading.Thread(target=complete_twice_then_idle)
    worker.start()
    try:
        assert wait_for(lambda: bool(lanes) and lanes[0].pending is None)
        lane = lanes[0]
        ending = _EndingLane()
        collector.wake(ending)  # ends the collector's thread at its next look
        thread = collector._thread
        assert thread is not None
        thread.join(timeout=5)
        collector._lanes.discard(ending)
        ended.set()
        assert wait_for(lambda: collector._thread is not thread)
        assert wait_for(lambda: lane.pending is None), "the answer was never read"
        op = store.get("s", "k2")
        assert op is not None and op.status is Status.SUCCEEDED
    finally:
        ended.set()
        idle.set()
        worker.join()


_EXITING_SUBMITTER = """
import logging, sys, uuid
logging.basicConfig(level=logging.WARNING)
from idemtasks.stores.sql import SQLStore
store = SQLStore(sys.argv[1], table=sys.argv[2], create_schema=False)
op = store.create("s", sys.argv[3], "t", "fp", ttl=60).operation
store.mark_published(op)  # pipelined: its answer is still owed as the interpreter exits
"""


def test_a_process_that_exits_after_a_pipelined_write_reads_its_answer_on_an_open_connection(tmp_path: Path) -> None:
    """At exit the collector reads every answer still owed. The lanes' own closers ran first (weakref.finalize's
    exit hook was registered after the collector's, so ran before it): the answer was read on a closed connection,
    taken for unknown, and every such process logged a false 'may stay flagged as unpublished'."""
    pg_store, key = make_store("postgres", tmp_path), uuid.uuid4().hex
    assert isinstance(pg_store, SQLStore)
    try:
        proc = subprocess.run([sys.executable, "-c", _EXITING_SUBMITTER, services.POSTGRES_URL, pg_store.table.name,
                               key], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert "unpublished" not in proc.stderr and "connection" not in proc.stderr, proc.stderr
        op = pg_store.get("s", key)
        assert op is not None and not op.needs_publish
    finally:
        drop(pg_store)
