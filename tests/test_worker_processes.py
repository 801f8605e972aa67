"""With real ``celery worker`` processes on a Redis broker: duplicates, retries, failures and SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from idemtasks import LeaseLost, Status
from idemtasks.recovery import Sweeper
from idemtasks.stores.base import Store
from tests import services
from tests.conftest import SERVER_BACKENDS, drop, make_store
from tests.workers import Worker, client_app, store_env, wait_until

pytestmark = pytest.mark.slow
BROKER = services.REDIS_URL.rsplit("/", 1)[0] + "/1"


@dataclass
class Rig:
    store: Store
    queue: str
    tasks: dict[str, Any]
    worker: Worker
    counter: redis.Redis
    ledger_url: str
    ledger_table: str

    def runs(self, key: str) -> int:
        return int(self.counter.get(f"{self.queue}:runs:{key}") or 0)

    def final(self, op_id: str, timeout: float = 60.0) -> Any:
        return wait_until(lambda: (op := self.store.get_by_id(op_id)) is not None and op.is_final and op,
                          timeout, f"operation {op_id} to finish")

    def ledger_rows(self, op_id: str) -> int:
        engine = sa.create_engine(self.ledger_url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text(f"SELECT count(*) FROM {self.ledger_table} WHERE operation_id = :o"),
                                        {"o": op_id}).scalar_one())
        finally:
            engine.dispose()


def _rig(backend: str, tmp_path: Path, *, concurrency: int = 2, lease: float = 2.0,
         ledger_url: str | None = None, pool: str = "prefork") -> Iterator[Rig]:
    services.require("redis")
    store = make_store(backend, tmp_path)
    queue = f"q{uuid.uuid4().hex[:10]}"
    ledger_url = (ledger_url or f"sqlite:///{tmp_path / 'ledger.sqlite3'}").replace("{queue}", queue)
    ledger_table = f"ledger_{queue}"
    env = {**store_env(store), "PROCAPP_BROKER": BROKER, "PROCAPP_QUEUE": queue, "PROCAPP_LEASE": str(lease),
           "PROCAPP_COUNTER": services.REDIS_URL, "PROCAPP_LEDGER": ledger_url, "PROCAPP_LEDGER_TABLE": ledger_table}
    worker = Worker(env, tmp_path / "worker.log", concurrency=concurrency, pool=pool).start()
    _, tasks = client_app(BROKER, queue, store)
    counter = redis.Redis.from_url(services.REDIS_URL)
    try:
        yield Rig(store, queue, tasks, worker, counter, ledger_url, ledger_table)
    finally:
        worker.kill()
        for k in counter.scan_iter(match=f"{queue}:*"):
            counter.delete(k)
        redis.Redis.from_url(BROKER).delete(queue)
        drop(store)


@pytest.fixture(params=SERVER_BACKENDS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(request.param, tmp_path)


@pytest.mark.timeout(180)
def test_50_submits_and_200_duplicate_deliveries_run_the_body_once(rig: Rig) -> None:
    charge = rig.tasks["charge"]
    key = f"pay-{uuid.uuid4().hex}"
    subs: list[Any] = []
    barrier = threading.Barrier(10)

    def submitter() -> None:
        barrier.wait()
        for _ in range(5):
            subs.append(charge.submit(("acct", 25, 0.5), key=key))

    threads = [threading.Thread(target=submitter) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(subs) == 50
    op_id = subs[0].operation.id
    assert {s.operation.id for s in subs} == {op_id}
    assert sum(s.created for s in subs) == 1
    headers = {"idemtasks": {"scope": "global", "key": key}}
    for _ in range(200):  # the same message again and again, as a broker redelivering it would
        charge.apply_async(("acct", 25, 0.5), task_id=op_id, headers=headers)
    op = rig.final(op_id)
    assert op.status is Status.SUCCEEDED and op.result == {"account": "acct", "amount": 25}
    # every copy must have been consumed (replayed or parked and replayed) before counting
    wait_until(lambda: rig.counter.llen(rig.queue) == 0, 120, "the queue to drain")
    replays = [charge.submit(("acct", 25, 0.5), key=key) for _ in range(5)]
    assert all(r.operation.result == op.result and not r.created for r in replays)
    assert rig.runs(key) == 1


@pytest.mark.timeout(120)
def test_retryable_error_twice_then_success_stores_one_result(rig: Rig) -> None:
    key = f"flaky-{uuid.uuid4().hex}"
    sub = rig.tasks["flaky"].submit((2,), key=key)
    op = rig.final(sub.operation.id)
    assert op.status is Status.SUCCEEDED and op.result == "ok"
    assert rig.runs(key) == 3 and op.attempts == 3


@pytest.mark.timeout(120)
def test_terminal_failure_is_replayed_not_rerun(rig: Rig) -> None:
    charge = rig.tasks["charge"]
    key = f"big-{uuid.uuid4().hex}"
    sub = charge.submit(("acct", 5_000_000), key=key)
    op = rig.final(sub.operation.id)
    assert op.status is Status.FAILED and op.error is not None and op.error.type == "ValueError"
    for _ in range(5):
        charge.apply_async(("acct", 5_000_000), task_id=op.id, headers={"idemtasks": {"scope": "global", "key": key}})
    again = charge.submit(("acct", 5_000_000), key=key)
    assert not again.created and again.operation.status is Status.FAILED
    wait_until(lambda: rig.counter.llen(rig.queue) == 0, 60, "the queue to drain")
    assert rig.runs(key) == 1


@pytest.fixture(params=["redis", "postgres"])
def crash_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(request.param, tmp_path, concurrency=1, lease=2.0)


@pytest.mark.timeout(180)
def test_sigkilled_child_is_taken_over_after_its_lease_and_effects_commit_once(crash_rig: Rig) -> None:
    rig = crash_rig
    key = f"crash-{uuid.uuid4().hex}"
    sub = rig.tasks["ledger_charge"].submit(("acct", 40, 8.0), key=key)
    op_id = sub.operation.id
    # Strike while the body sleeps with its ledger row written but not committed.
    holder_pid = int(wait_until(lambda: rig.counter.get(f"{rig.queue}:in-body:{key}"), 60, "the body to start"))
    os.kill(holder_pid, signal.SIGKILL)  # no hook runs: only the lease can free the operation
    running = rig.store.get_by_id(op_id)
    assert running is not None and running.status is Status.RUNNING
    assert running.lease_owner is not None and int(running.lease_owner.split(":")[1]) == holder_pid
    op = rig.final(op_id, timeout=120)
    assert op.status is Status.SUCCEEDED
    assert op.attempts == 2 and op.fencing_token == running.fencing_token + 1
    assert running.crashes == 0 and op.crashes == 1  # the takeover counted the killed holder
    assert op.result["token"] == op.fencing_token
    assert rig.runs(key) == 2  # the body ran again after the crash ...
    assert rig.ledger_rows(op_id) == 1  # ... but its database effects exist exactly once
    with pytest.raises(LeaseLost):  # the killed holder's late completion is fenced off
        rig.store.succeed(running, running.fencing_token, '{"zombie": true}', ttl=3600)
    assert rig.store.get_by_id(op_id) == op


@pytest.mark.timeout(180)
def test_a_body_killed_by_the_hard_time_limit_every_time_fails_after_max_crashes(crash_rig: Rig) -> None:
    """The pool kills the process past ``time_limit`` (SIGTERM, then SIGKILL) and acknowledges the message; recovery
    publishes the operation again. Without a cap the body would be started again after every kill, for ever."""
    from idemtasks.recovery import Sweeper

    rig = crash_rig
    key = f"overrun-{uuid.uuid4().hex}"
    op_id = rig.tasks["overruns"].submit((30.0,), key=key).operation.id
    sweeper = Sweeper(rig.tasks["overruns"].app, pending_after=0.5, confirm_after=0.5)

    def swept_final() -> Any:
        sweeper.sweep()
        op = rig.store.get_by_id(op_id)
        return op is not None and op.is_final and op

    op = wait_until(swept_final, 150, "the operation to be given up")
    assert op.status is Status.FAILED and op.error is not None and op.error.type == "TooManyCrashes"
    assert op.crashes == 3
    # Started at most three times, never a fourth. (A kill can land between a fresh pool child's claim and the
    # body's first line: that holder died too, without a run to count.)
    assert 1 <= rig.runs(key) <= 3


@pytest.mark.timeout(120)
def test_a_transactional_body_whose_database_connection_is_killed_is_retried_not_failed(tmp_path: Path) -> None:
    services.require("postgres")
    # The worker's ledger connections carry a name of their own, so only they are terminated.
    ledger_url = f"{services.POSTGRES_URL}?application_name=ledger-{{queue}}"
    rig = _rig("redis", tmp_path, concurrency=1, lease=5.0, ledger_url=ledger_url)
    r = next(rig)
    try:
        key = f"blip-{uuid.uuid4().hex}"
        op_id = r.tasks["ledger_charge"].submit(("acct", 70, 2.0), key=key).operation.id
        wait_until(lambda: r.counter.get(f"{r.queue}:in-body:{key}"), 60, "the body to start")
        admin = sa.create_engine(services.POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                          "WHERE application_name = :n"), {"n": f"ledger-{r.queue}"}).scalar_one()
        admin.dispose()
        assert killed >= 1
        op = r.final(op_id, timeout=60)
        assert op.status is Status.SUCCEEDED, op.error  # an outage is ridden out, never stored as a failure
        assert r.runs(key) == 2 and op.attempts == 2
        assert r.ledger_rows(op_id) == 1
        # The log blames the transaction's database, not the store, which answered throughout.
        log = r.worker.log.read_text()
        assert "the transaction's database unreachable" in log and "unreachable for procapp.ledger_charge" in log
        assert not any("store " in line and "unreachable for" in line for line in log.splitlines())
    finally:
        next(rig, None)


def test_stale_holder_cannot_commit_effects_twice(tmp_path: Path) -> None:
    """Two holders of one operation (a zombie and its successor) both finish their bodies: one commit wins."""
    from idemtasks.effects import EffectsLedger

    ledger = EffectsLedger(f"sqlite:///{tmp_path / 'effects.sqlite3'}")
    rows = sa.Table("rows", sa.MetaData(), sa.Column("op", sa.String(64)))
    rows.create(ledger.engine)
    outcomes: list[str | None] = []

    class Collided(Exception):
        pass

    for token in (1, 2):
        try:
            with ledger.transaction() as conn:
                conn.execute(rows.insert().values(op="op-1"))
                prior = ledger.record(conn, "op-1", token, f'"result of {token}"')
                outcomes.append(prior)
                if prior is not None:
                    raise Collided
        except Collided:
            pass
    assert outcomes == [None, '"result of 1"']
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one() == 1



@pytest.mark.timeout(180)
def test_a_cold_shutdown_of_a_solo_worker_gives_the_operation_back(tmp_path: Path) -> None:
    """SIGQUIT (or a second Ctrl-C) makes Celery cancel the running tasks from the main process's signal handler; in
    a solo worker that is the body's own thread, and the pool's refusal to kill a job (NotImplementedError) is
    raised inside the body. That is the worker going away, not the body failing: the operation was stored as
    failed with that error, and every duplicate replayed it."""
    rig_iter = _rig("redis", tmp_path, pool="solo")
    rig = next(rig_iter)
    try:
        key = f"cold-{uuid.uuid4().hex}"
        op_id = rig.tasks["charge"].submit(("acct", 7, 6.0), key=key).operation.id
        wait_until(lambda: rig.runs(key) == 1, 60, "the body to start")
        assert rig.worker.proc is not None
        rig.worker.proc.send_signal(signal.SIGQUIT)
        rig.worker.proc.wait(timeout=30)
        given_back = rig.store.get_by_id(op_id)
        assert given_back is not None and given_back.status is Status.PENDING and given_back.crashes == 1
        rig.worker.start()  # the operation runs again, as after any crash of its holder
        client = rig.tasks["charge"].app
        Sweeper(client, pending_after=0.0).sweep()  # whether or not the broker kept the cancelled message
        op = rig.final(op_id)
        assert op.status is Status.SUCCEEDED and op.result == {"account": "acct", "amount": 7}
        assert rig.runs(key) == 2
    finally:
        with contextlib.suppress(StopIteration):
            next(rig_iter)


@pytest.mark.timeout(180)
def test_a_body_that_fails_by_itself_during_a_cold_shutdown_of_a_threads_pool_is_failed(tmp_path: Path) -> None:
    """A threads pool's bodies run on while the main thread shuts down: a body that fails then failed by itself, and
    must be stored so, not given back as a crash and run a second time."""
    rig_iter = _rig("redis", tmp_path, pool="threads")
    rig = next(rig_iter)
    try:
        key = f"cold-{uuid.uuid4().hex}"
        op_id = rig.tasks["charge"].submit(("acct", 2_000_000, 3.0), key=key).operation.id  # declined, after 3 s
        wait_until(lambda: rig.runs(key) == 1, 60, "the body to start")
        assert rig.worker.proc is not None
        rig.worker.proc.send_signal(signal.SIGQUIT)
        rig.worker.proc.wait(timeout=60)
        op = rig.store.get_by_id(op_id)
        assert op is not None and op.status is Status.FAILED and op.error is not None
        assert op.error.type == "ValueError" and op.crashes == 0 and rig.runs(key) == 1
    finally:
        with contextlib.suppress(StopIteration):
            next(rig_iter)
