"""Recovery: operations whose message was lost, or whose holder died with its message, still finish once."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish

from idemtasks import IdempotentTask, LeaseLost, Operation, Status, recovery
from idemtasks.identity import canonical_call, fingerprint_of_call, parse_stored_call, stored_call
from idemtasks.lease import RENEW_RETRY_MAX
from idemtasks.recovery import MIN_CONFIRM_AFTER, Sweeper, confirm_after_for, install
from idemtasks.stores.base import Store
from idemtasks.task import TASK_ID_SCOPE
from tests import services
from tests.conftest import BACKENDS, drop, make_store
from tests.private_redis import free_port
from tests.workers import ROOT

#: The sweeper's grace before a takeover, shortened for tests (the rule for tasks is confirm_after_for(lease)).
CONFIRM = 0.3


@dataclass
class Rig:
    app: Celery
    task: Any
    store: Store
    runs: Counter[str]

    def lost_submit(self, amount: int, **options: Any) -> tuple[str, str]:
        """What a web process killed between recording the operation and publishing its message leaves behind."""
        key = f"lost-{uuid.uuid4().hex}"
        call = canonical_call(self.task.name, (key, amount), {})
        op = self.store.create("global", key, self.task.name, fingerprint_of_call(call), ttl=3600,
                               payload=stored_call(call, options))
        return key, op.operation.id

    def final_of_message(self, task_id: str, timeout: float = 20) -> Any:
        """The finished operation of a message sent without ``submit`` (its key is the task id)."""
        deadline = time.monotonic() + timeout
        while (op := self.store.get(TASK_ID_SCOPE, task_id)) is None or not op.is_final:
            assert time.monotonic() < deadline, f"{task_id} never finished: {op}"
            time.sleep(0.05)
        return op

    def final(self, op_id: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op = self.store.get_by_id(op_id)
            if op is not None and op.is_final:
                return op
            time.sleep(0.05)
        raise AssertionError(f"{op_id} never finished: {self.store.get_by_id(op_id)}")


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    store = make_store(request.param, tmp_path_factory.mktemp("recovery"))
    app = Celery(f"rec{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_ignore_result=True, idemtasks_pending_after=0.3, idemtasks_sweep_interval=0.3,
                    idemtasks_busy_countdown=0.2, task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.charge",
              lease_seconds=0.5,
              idempotency_ttl=3600.0)
    def charge(self: IdempotentTask, key: str, amount: int) -> int:
        runs[key] += 1
        return amount

    yield Rig(app, charge, store, runs)
    if request.param != "memory":
        drop(store)


def test_pending_operation_whose_message_was_lost_is_published_again(rig: Rig) -> None:
    # A pending_after long enough that the first sweep surely comes within it, even on a busy machine.
    sweeper = Sweeper(rig.app, pending_after=1.0)
    key, op_id = rig.lost_submit(10)
    assert sweeper.sweep().republished == []  # too young: its message may still be on its way
    time.sleep(1.1)
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        assert sweeper.sweep().republished == [op_id]
        op = rig.final(op_id)
    assert op.status is Status.SUCCEEDED and op.result == 10 and rig.runs[key] == 1


@pytest.mark.parametrize(("most", "backoffs"), [(60.0, [0.25, 0.5, 1.0]), (0.4, [0.25, 0.4, 0.4])])
def test_copies_of_an_operation_queued_behind_a_backlog_back_off(rig: Rig, most: float,
                                                                  backoffs: list[float]) -> None:
    """No worker drains the queue (a backlog, or every worker down while beat sweeps): the operation looks lost at
    every sweep. Each copy waits twice as long as the one before it (up to idemtasks_republish_backoff_max) rather
    than pending_after, so a long backlog is not multiplied by its own length. When a worker comes, the body runs
    once and every copy replays."""
    rig.app.conf.idemtasks_republish_backoff_max = most
    sweeper = Sweeper(rig.app, pending_after=0.25)
    key, op_id = rig.lost_submit(40)
    found, copies = [], []
    started = time.monotonic()
    while len(copies) < len(backoffs):
        assert time.monotonic() - started < 10, f"copies at {copies}"
        if sweeper.sweep().republished == [op_id]:
            copies.append(time.monotonic())
            op = rig.store.get_by_id(op_id)
            assert op is not None and op.status is Status.PENDING and op.lease_expires_at is not None
            found.append(round(op.lease_expires_at - op.updated_at, 2))
        time.sleep(0.05)
    assert found == backoffs
    assert copies[2] - copies[1] >= backoffs[1] - 0.05  # not at pending_after
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(op_id)
        time.sleep(0.3)  # the copies behind the first one, replayed
    assert op.status is Status.SUCCEEDED and rig.runs[key] == 1


def test_a_copy_never_backs_off_past_half_of_what_is_left_of_its_record() -> None:
    """A copy lost late (a broker that lost its queue after recovery had published several) must still have one
    behind it before its record expires unrun: the back-off yields to half the record's remaining life, but never
    goes below pending_after, the wait recovery always had."""
    now = 1_000_000.0

    def copied(last: float | None, life: float) -> Operation:
        return Operation(id="op", scope="s", key="k", task_name="t", fingerprint="fp", status=Status.PENDING,
                         result=None, error=None, attempts=0, fencing_token=0, lease_owner=None,
                         lease_expires_at=None if last is None else now + last, created_at=now - 100,
                         updated_at=now, expires_at=now + life)

    assert recovery.next_backoff(copied(None, 86400), 60, 1800, now=now) == 60  # recovery's first copy
    assert recovery.next_backoff(copied(240, 86400), 60, 1800, now=now) == 480
    assert recovery.next_backoff(copied(1200, 86400), 60, 1800, now=now) == 1800
    assert recovery.next_backoff(copied(1200, 1000), 60, 1800, now=now) == 500
    assert recovery.next_backoff(copied(1200, 100), 60, 1800, now=now) == 60


def test_running_operation_whose_holder_died_with_its_message_is_taken_over(rig: Rig) -> None:
    key, op_id = rig.lost_submit(20)
    fp = rig.store.get_by_id(op_id).fingerprint  # type: ignore[union-attr]
    dead = rig.store.claim("global", key, rig.task.name, fp, owner="dead", lease=0.3, ttl=3600).operation
    time.sleep(0.4)
    sweeper = Sweeper(rig.app, confirm_after=CONFIRM)
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        # A lapsed lease is only suspected by the first sweep: its holder may merely have lost the store for a while.
        report = sweeper.sweep()
        assert report.suspected == [op_id] and report.requeued == [] and report.republished == []
        assert rig.store.get_by_id(op_id).status is Status.RUNNING  # type: ignore[union-attr]
        time.sleep(CONFIRM + 0.1)
        report = sweeper.sweep()  # no renewal since the mark: the holder is dead, take it over
        assert report.requeued == [op_id] and report.republished == [op_id] and report.suspected == []
        op = rig.final(op_id)
    assert op.status is Status.SUCCEEDED and op.fencing_token == dead.fencing_token + 1
    with pytest.raises(LeaseLost):
        rig.store.succeed(dead, dead.fencing_token, "0", ttl=3600)
    assert rig.runs[key] == 1


def test_a_holder_that_renews_after_a_store_outage_keeps_its_operation(rig: Rig) -> None:
    """The store was down for longer than the lease: the live holder could not renew. When it comes back, a sweep
    reaching the record first must not take it over; the holder's renewal within the grace keeps it, and its
    completion is accepted. A one-shot sweeper (a new Sweeper per run, as from cron) sees the mark in the store."""
    key, op_id = rig.lost_submit(21)
    fp = rig.store.get_by_id(op_id).fingerprint  # type: ignore[union-attr]
    held = rig.store.claim("global", key, rig.task.name, fp, owner="alive", lease=0.3, ttl=3600).operation
    time.sleep(0.4)  # the outage: no renewal went through
    assert Sweeper(rig.app, confirm_after=CONFIRM).sweep().suspected == [op_id]
    assert rig.store.renew(held, held.fencing_token, lease=30, ttl=3600)  # the keeper's next retry
    time.sleep(CONFIRM + 0.1)
    report = Sweeper(rig.app, confirm_after=CONFIRM).sweep()
    assert op_id not in report.requeued + report.republished + report.suspected
    rig.store.succeed(held, held.fencing_token, "21", ttl=3600)
    op = rig.store.get_by_id(op_id)
    assert op is not None and op.status is Status.SUCCEEDED and op.fencing_token == held.fencing_token
    assert rig.runs[key] == 0  # recovery never published a second copy


def test_the_grace_before_a_takeover_follows_the_tasks_lease(rig: Rig) -> None:
    """Without an override, a suspected operation waits max(MIN_CONFIRM_AFTER, lease / 3) for its holder."""
    assert confirm_after_for(0.5) == MIN_CONFIRM_AFTER == 2.0
    assert confirm_after_for(300.0) == 100.0
    assert RENEW_RETRY_MAX < MIN_CONFIRM_AFTER  # a cut-off holder retries its renewal at least once within the grace
    key, op_id = rig.lost_submit(22)
    fp = rig.store.get_by_id(op_id).fingerprint  # type: ignore[union-attr]
    held = rig.store.claim("global", key, rig.task.name, fp, owner="dead", lease=0.1, ttl=3600).operation
    time.sleep(0.2)
    sweeper = Sweeper(rig.app)  # the task's lease is 0.5 s: MIN_CONFIRM_AFTER applies
    assert op_id in sweeper.sweep().suspected
    time.sleep(CONFIRM + 0.1)
    report = sweeper.sweep()
    assert op_id in report.suspected and op_id not in report.requeued  # still within the 2 s grace
    assert rig.store.get_by_id(op_id).status is Status.RUNNING  # type: ignore[union-attr]
    # Leave nothing behind: Celery shares each test's task with the apps made later, and their sweeps visit its store.
    rig.store.succeed(held, held.fencing_token, "22", ttl=3600)


@pytest.mark.parametrize("rig", ["redis"], indirect=True)  # the stores' side runs on every backend in the contract
def test_a_submit_with_a_countdown_is_not_published_again_before_it_is_due(rig: Rig) -> None:
    """A payment scheduled for later must not be run early by a copy that recovery published."""
    key = f"later-{uuid.uuid4().hex}"
    sub = rig.task.submit((key, 50), key=key, countdown=1.5)
    assert sub.operation.expires_at - sub.operation.created_at >= 3600 + 1.5  # still a record when it runs
    # Due time recorded at creation, before the publish: it holds even if the "published" mark never lands.
    assert sub.operation.updated_at - sub.operation.created_at == pytest.approx(1.5, abs=0.01)
    time.sleep(0.6)  # pending_after (0.3 s) has passed since the publish, not since the message is due
    sweeper = Sweeper(rig.app)
    assert sweeper.sweep().republished == []
    time.sleep(1.4)  # now due, and pending_after later still unclaimed: presumed lost after all
    assert sweeper.sweep().republished == [sub.operation.id]
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(sub.operation.id)
    assert op.status is Status.SUCCEEDED and op.result == 50 and rig.runs[key] == 1  # two messages, one run


def test_a_submitted_message_whose_record_is_gone_stores_its_call_when_claimed(rig: Rig) -> None:
    """The record was lost (expired, purged, or a store restarted empty) while the message waited: the claim creates
    a new one, and the holder stores the call in it, so recovery could still publish it again."""
    key = f"gone-{uuid.uuid4().hex}"
    call = canonical_call(rig.task.name, (key, 60), {})
    created = rig.store.create("global", key, rig.task.name, fingerprint_of_call(call), ttl=3600,
                               payload=stored_call(call, {})).operation
    rig.store.abandon(created)  # the record is gone ...
    assert rig.store.get_by_id(created.id) is None
    rig.task.publish(created, (key, 60), {})  # ... while its message is on the broker
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(created.id)
    assert op.status is Status.SUCCEEDED and op.result == 60 and rig.runs[key] == 1
    assert op.payload == canonical_call(rig.task.name, (key, 60), {})


def test_a_copy_published_by_recovery_goes_to_the_queue_the_submit_named(rig: Rig) -> None:
    """A caller routed the payment to a queue only some workers consume: the copy recovery publishes goes there too,
    not to the default queue, where no worker may know the task."""
    special = f"{rig.app.main}.special"
    key = f"routed-{uuid.uuid4().hex}"
    sub = rig.task.submit((key, 70), key=key, queue=special)
    assert sub.operation.payload == canonical_call(rig.task.name, (key, 70), {})[:-1] + f',{{"queue":"{special}"}}]'
    # Where a message goes is not what it asks for: a repeat routed elsewhere is a replay, not a mismatch.
    again = rig.task.submit((key, 70), key=key)
    assert not again.created and again.operation.id == sub.operation.id
    with rig.app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge(special) == 1  # the broker lost the message
    time.sleep(0.4)  # pending_after
    assert Sweeper(rig.app).sweep().republished == [sub.operation.id]
    with rig.app.connection_for_write() as conn:  # nothing went to the default queue
        assert conn.default_channel.queue_purge(rig.app.conf.task_default_queue) == 0
    with start_worker(rig.app, pool="solo", perform_ping_check=False, queues=[special]):
        op = rig.final(sub.operation.id)
    assert op.status is Status.SUCCEEDED and op.result == 70 and rig.runs[key] == 1


def test_a_message_sent_without_submit_is_recovered_to_the_queue_it_came_from(rig: Rig) -> None:
    """A payment sent by ``send_task`` (or beat, or a plain ``apply_async``) to a queue only some workers consume: the
    record its claim creates keeps where the message came from, and a copy recovery publishes goes there too."""
    special = f"{rig.app.main}.special"
    key = f"plain-{uuid.uuid4().hex}"
    sent = rig.task.apply_async((key, 90), queue=special)
    with start_worker(rig.app, pool="solo", perform_ping_check=False, queues=[special]):
        op = rig.final_of_message(sent.id)
    assert op.status is Status.SUCCEEDED and rig.runs[key] == 1 and op.payload is not None
    name, args, kwargs, route = parse_stored_call(op.payload)
    assert (name, args, kwargs) == (rig.task.name, [key, 90], {})
    assert route == {"queue": special}  # delivered through the default exchange, as Celery sends to a named queue
    # Its holder died with its message (early acks): recovery finds such a record, with that route, pending.
    lost_key = f"lost-{uuid.uuid4().hex}"
    call = canonical_call(rig.task.name, (lost_key, 91), {})
    lost = rig.store.create("global", lost_key, rig.task.name, fingerprint_of_call(call), ttl=3600,
                            payload=stored_call(call, route)).operation
    time.sleep(0.4)  # pending_after
    assert Sweeper(rig.app).sweep().republished == [lost.id]
    with rig.app.connection_for_write() as conn:  # nothing went to the default queue
        assert conn.default_channel.queue_purge(rig.app.conf.task_default_queue) == 0
    with start_worker(rig.app, pool="solo", perform_ping_check=False, queues=[special]):
        done = rig.final(lost.id)
    assert done.status is Status.SUCCEEDED and done.result == 91 and rig.runs[lost_key] == 1


def test_a_copy_by_recovery_keeps_the_time_limits_of_the_call(rig: Rig) -> None:
    """A call bounded by ``time_limit``/``soft_time_limit``: the pool kills a body past the hard limit (a crash, and
    max_crashes fails the operation) and interrupts it at the soft one. A copy that recovery publishes keeps both:
    without them a hung body would run unbounded, renewing its lease for good. So does the record a plain message's
    claim creates."""
    key = f"bounded-{uuid.uuid4().hex}"
    sub = rig.task.submit((key, 75), key=key, time_limit=7, soft_time_limit=5.5)
    assert parse_stored_call(sub.operation.payload or "")[3] == {"time_limit": 7, "soft_time_limit": 5.5}
    with rig.app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge(rig.app.conf.task_default_queue) == 1  # the broker lost the message
    time.sleep(0.4)  # pending_after
    limits: list[Any] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        limits.append((headers or {}).get("timelimit"))

    before_task_publish.connect(record, weak=False)
    try:
        assert Sweeper(rig.app).sweep().republished == [sub.operation.id]
    finally:
        before_task_publish.disconnect(record)
    assert [list(limit) for limit in limits] == [[7, 5.5]]
    plain = f"plain-{uuid.uuid4().hex}"
    sent = rig.task.apply_async((plain, 76), time_limit=8, soft_time_limit=6)
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        assert rig.final(sub.operation.id).result == 75
        op = rig.final_of_message(sent.id)
    assert parse_stored_call(op.payload or "")[3] == {"time_limit": 8, "soft_time_limit": 6}


def test_a_plain_message_stores_no_time_limit_that_is_the_tasks_own(rig: Rig) -> None:
    """Celery sends the task's own limits (or the app's task_time_limit) in every message: those are not the call's,
    and a copy takes the task's limits as they are then (a deploy may have raised them). A call's own are stored."""
    rig.task.time_limit, rig.task.soft_time_limit = 30, 20
    try:
        plain, bounded = f"plain-{uuid.uuid4().hex}", f"bounded-{uuid.uuid4().hex}"
        sent = [rig.task.apply_async((plain, 77)), rig.task.apply_async((bounded, 78), time_limit=8)]
        with start_worker(rig.app, pool="solo", perform_ping_check=False):
            ops = [rig.final_of_message(s.id) for s in sent]
    finally:
        del rig.task.time_limit, rig.task.soft_time_limit  # back to the class's
    assert [parse_stored_call(op.payload or "")[3] for op in ops] == [{}, {"time_limit": 8}]


def test_a_message_on_the_default_queue_stores_no_route(rig: Rig) -> None:
    """Without a route, a copy goes to the task's own: the default queue needs no bytes in every record."""
    key = f"plain-{uuid.uuid4().hex}"
    sent = rig.task.apply_async((key, 95))
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final_of_message(sent.id)
    assert op.payload == canonical_call(rig.task.name, (key, 95), {})


def test_a_claim_keeps_the_default_queue_only_for_a_task_routed_elsewhere() -> None:
    """A copy published without options goes to the task's own route: the default queue, unless routes send the task
    elsewhere, and then a message that came through the default queue keeps that queue too."""
    from celery.app.task import Context

    from idemtasks.execution import _route_of

    def pay_task(**conf: Any) -> Any:  # the routes are read when the task is bound, as the settings are
        app = Celery(f"route{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
        app.conf.update(conf)

        @app.task(shared=False, base=IdempotentTask, store_url="memory://", name="tasks.pay")
        def pay() -> None:
            pass

        return pay

    through_default = [Context(delivery_info={"exchange": "", "routing_key": "celery"}),
                       Context(delivery_info={"exchange": "celery", "routing_key": "celery"})]
    pay = pay_task()
    assert [_route_of(pay, ctx) for ctx in through_default] == [{}, {}]
    pay = pay_task(task_routes={"tasks.pay": {"queue": "payments"}})
    assert [_route_of(pay, ctx) for ctx in through_default] == [{"queue": "celery"},
                                                                 {"exchange": "celery", "routing_key": "celery"}]


@pytest.mark.parametrize("reached_the_broker", [False, True])
def test_a_copy_by_recovery_carries_the_callbacks_only_of_a_message_never_sent(rig: Rig,
                                                                               reached_the_broker: bool) -> None:
    """Follow-up work chained to a payment (its receipt) is not lost with a web process that died between recording
    the operation and publishing it. Once the message reached the broker, a copy goes without the callbacks: that
    message may still be queued, or be redelivered, and would send them too."""
    receipts: list[int] = []

    @rig.app.task(shared=False, name=f"{rig.app.main}.receipt")
    def receipt(amount: int) -> None:
        receipts.append(amount)

    key = f"linked-{uuid.uuid4().hex}"
    if reached_the_broker:
        op_id = rig.task.submit((key, 80), key=key, link=receipt.s()).operation.id
        with rig.app.connection_for_write() as conn:
            assert conn.default_channel.queue_purge(rig.app.conf.task_default_queue) == 1  # then the broker lost it
    else:
        call = canonical_call(rig.task.name, (key, 80), {})
        op_id = rig.store.create("global", key, rig.task.name, fingerprint_of_call(call), ttl=3600,
                                 payload=stored_call(call, {"link": receipt.s()})).operation.id
    time.sleep(0.4)  # pending_after
    assert Sweeper(rig.app).sweep().republished == [op_id]
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(op_id)
        deadline = time.monotonic() + (1.0 if reached_the_broker else 10.0)
        while not receipts and time.monotonic() < deadline:
            time.sleep(0.05)
    assert op.status is Status.SUCCEEDED and rig.runs[key] == 1
    assert receipts == ([] if reached_the_broker else [80])


def test_records_this_app_cannot_publish_do_not_hide_the_ones_it_can(rig: Rig) -> None:
    """Stale records of a task this app does not know (another app sharing the store, a task a deploy renamed) come
    first, oldest first, and stay until they expire: a sweep looks past them."""
    renamed = [rig.store.create("global", f"renamed-{uuid.uuid4().hex}", "old.charge", "fp", ttl=3600,
                                payload='["old.charge",[],{}]').operation.id for _ in range(4)]
    time.sleep(0.05)
    key, op_id = rig.lost_submit(90)
    time.sleep(0.4)  # pending_after
    report = Sweeper(rig.app, limit=3).sweep()
    assert report.republished == [op_id] and set(renamed) <= set(report.skipped)
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(op_id)
    assert op.status is Status.SUCCEEDED and op.result == 90 and rig.runs[key] == 1


def test_a_record_recovery_cannot_read_does_not_keep_the_others_from_their_sweep(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A stored call this release cannot read (written by hand, or damaged) comes first, oldest first, at every
    sweep: it is logged and skipped, and the operations after it are still published again."""
    unreadable = rig.store.create("global", f"bad-{uuid.uuid4().hex}", rig.task.name, "fp", ttl=3600,
                                  payload="not a stored call").operation.id
    time.sleep(0.05)
    _key, op_id = rig.lost_submit(95)
    sweeper = Sweeper(rig.app, pending_after=0.0)
    with caplog.at_level("ERROR", logger="idemtasks.recovery"):
        report = sweeper.sweep()
    assert report.republished == [op_id] and unreadable in report.skipped
    assert any(f"recovery of operation {unreadable} failed" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("ERROR", logger="idemtasks.recovery"):  # a worker's sweeper: the next passes
        assert unreadable in sweeper.sweep().skipped
    assert not any(unreadable in r.getMessage() for r in caplog.records)  # one traceback is enough


def stepping_task(rig: Rig, seen: list[tuple[int, int]], *, new_arguments: bool = True) -> Any:
    """A body that records its progress in its retry's arguments: step 1 retries as step 2 (or, without
    ``new_arguments``, as itself), to a queue no worker consumes (the retry message can then be lost at will)."""

    @rig.app.task(shared=False, base=IdempotentTask, bind=True, store_url=rig.store, name=f"{rig.app.main}.steps",
                  lease_seconds=0.5, idempotency_ttl=3600.0, max_retries=1)
    def steps(self: IdempotentTask, key: str, step: int) -> int:
        seen.append((step, self.request.retries))
        if self.request.retries == 0:
            self.retry(args=(key, 2) if new_arguments else None, countdown=0.2, queue=f"{rig.app.main}.lost")
        return step

    return steps


def given_back(rig: Rig, op_id: str, attempts: int) -> None:
    """Wait until the operation has been claimed ``attempts`` times and is pending again."""
    deadline = time.monotonic() + 20
    while (op := rig.store.get_by_id(op_id)) is None or op.attempts < attempts or op.status is not Status.PENDING:
        assert time.monotonic() < deadline, op
        time.sleep(0.05)


def lose_the_retry(rig: Rig) -> None:
    with rig.app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge(f"{rig.app.main}.lost") == 1


# Each store's release is the store contract's: here one store for each kind of retry.
@pytest.mark.parametrize(("rig", "new_arguments"), [("redis", True), ("postgres", False)], indirect=["rig"],
                         ids=["redis-new-arguments", "postgres-same-arguments"])
def test_a_lost_retry_comes_back_as_the_retry_not_as_the_first_call(rig: Rig, new_arguments: bool) -> None:
    """The retry message is lost (a worker killed while holding it, a broker that dropped it). The copy recovery
    publishes asks for what the retry asked for, with its count, so the finished step does not run again and
    ``max_retries`` still counts."""
    seen: list[tuple[int, int]] = []
    steps = stepping_task(rig, seen, new_arguments=new_arguments)
    key = f"steps-{uuid.uuid4().hex}"
    op_id = steps.submit((key, 1), key=key).operation.id
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        given_back(rig, op_id, 1)
    lose_the_retry(rig)
    time.sleep(0.6)  # due (0.2) and pending_after (0.3) past
    assert Sweeper(rig.app).sweep().republished == [op_id]
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        op = rig.final(op_id)
    step = 2 if new_arguments else 1
    assert seen == [(1, 0), (step, 1)] and op.status is Status.SUCCEEDED and op.result == step


@pytest.mark.parametrize("rig", ["redis", "postgres"], indirect=True)
def test_a_delivery_older_than_the_last_retry_is_dropped_not_run(rig: Rig) -> None:
    """The first message comes again after the body retried with new arguments (a broker's redelivery after its
    visibility timeout, a worker lost once the retry went out): it does not run the finished step again. The
    operation is given back as it was, and the retry's call runs once, here from recovery's copy."""
    seen: list[tuple[int, int]] = []
    steps = stepping_task(rig, seen)
    key = f"steps-{uuid.uuid4().hex}"
    op = steps.submit((key, 1), key=key).operation
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        given_back(rig, op.id, 1)
        time.sleep(0.2)  # the retry is due
        steps.publish(op, (key, 1), {})  # the first message, again: its arguments, retry 0
        given_back(rig, op.id, 2)
        assert seen == [(1, 0)]  # claimed and given back, unrun
        lose_the_retry(rig)
        time.sleep(0.4)  # pending_after
        assert Sweeper(rig.app).sweep().republished == [op.id]
        done = rig.final(op.id)
    assert seen == [(1, 0), (2, 1)] and done.status is Status.SUCCEEDED and done.result == 2


def test_live_and_finished_operations_are_left_alone(rig: Rig) -> None:
    key, op_id = rig.lost_submit(30)
    fp = rig.store.get_by_id(op_id).fingerprint  # type: ignore[union-attr]
    rig.store.claim("global", key, rig.task.name, fp, owner="alive", lease=30, ttl=3600)
    done_key, done_id = rig.lost_submit(31)
    held = rig.store.claim("global", done_key, rig.task.name, rig.store.get_by_id(done_id).fingerprint,  # type: ignore[union-attr]
                           owner="w", lease=30, ttl=3600).operation
    rig.store.succeed(held, held.fencing_token, "31", ttl=3600)
    time.sleep(0.4)
    report = Sweeper(rig.app, confirm_after=0.0).sweep()
    assert op_id not in report.republished and done_id not in report.republished
    assert op_id not in report.suspected and done_id not in report.suspected


def test_a_worker_sweeps_by_itself_without_beat(rig: Rig) -> None:
    install(rig.app, beat_task=False)
    key, op_id = rig.lost_submit(40)
    before = _sweepers()
    with start_worker(rig.app, pool="solo", perform_ping_check=False):
        assert len(_sweepers() - before) == 1
        op = rig.final(op_id)
    assert op.status is Status.SUCCEEDED and rig.runs[key] == 1
    # The sweeper goes with its worker, even one stopped without a warm shutdown (an embedded worker here): left
    # running, it would keep sweeping the store, and its connections open, for a worker that is gone.
    deadline = time.monotonic() + 5
    while _sweepers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sweepers() - before


def _sweepers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "idemtasks-sweeper"}


def test_a_store_that_cannot_be_opened_does_not_keep_the_others_from_their_sweep(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Another task's database is down (its store is opened for the first time by this sweep): the operations of
    the stores that answer are still published again."""
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=1"

    @rig.app.task(shared=False, base=IdempotentTask, bind=True, store_url=down, name=f"{rig.app.main}.elsewhere")
    def elsewhere(self: IdempotentTask) -> None:
        return None

    # And one this host has no driver for: SQLAlchemy's error, not one of ours.
    @rig.app.task(shared=False, base=IdempotentTask, bind=True, store_url="postgresql+nosuchdriver://h/db",
                  name=f"{rig.app.main}.nodriver")
    def nodriver(self: IdempotentTask) -> None:
        return None

    _key, op_id = rig.lost_submit(45)
    with caplog.at_level("WARNING", logger="idemtasks.recovery"):
        report = Sweeper(rig.app, pending_after=0.0).sweep()
    assert report.republished == [op_id]
    for name in ("elsewhere", "nodriver"):
        assert any(f"cannot sweep the store of {rig.app.main}.{name} now" in r.getMessage() for r in caplog.records)


_STARTING_WORKER = """
import sys, threading, time
if sys.argv[3] == "without sqlalchemy":
    sys.modules["sqlalchemy"] = None  # an idemtasks[redis] install: no SQL, no ledger
from celery import Celery, signals
from idemtasks import IdempotentTask, recovery
app = Celery("starting", broker="memory://", set_as_current=False)
app.conf.update(idemtasks_sweep_interval=sys.argv[2] == "sweeper" and 600)
@app.task(base=IdempotentTask, store_url=sys.argv[1], name="starting.t")
def t():
    return None
recovery.install(app)
app.finalize()
watched = ("idemtasks.stores.sql", "idemtasks.stores.sql_lane", "psycopg", "idemtasks.stores.redis",
           "idemtasks.effects")
assert not any(name in sys.modules for name in watched[:2]), "imported too soon to tell"
started = time.monotonic()
signals.worker_init.send(sender=None)  # as the worker's main process starts, before its pool forks
took = time.monotonic() - started
sweeping = any(thread.name == "idemtasks-sweeper" for thread in threading.enumerate())
print(" ".join(name for name in watched if name in sys.modules), "|", f"{took:.1f}", sweeping)
"""


@pytest.mark.parametrize("sweeper", ["sweeper", "no sweeper"])
def test_a_worker_imports_its_stores_before_its_pool_forks(sweeper: str) -> None:
    """Python's import locks are not made anew in a forked child: a pool child forked while the parent's sweeper
    thread imported the store's backend or driver at its first sweep inherited that lock held, and hung at its
    first task for ever (every child of a worker recycling them, in a black-box test). And a child that imported
    them itself could be cut off mid-import by its first task's soft time limit, broken for the rest of its life.
    So the worker's main process imports them as it starts, connecting to nothing: a database that accepts and
    never answers (here) must not hold the worker's start."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        out = subprocess.run([sys.executable, "-c", _STARTING_WORKER, url, sweeper, "with sqlalchemy"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, timing = out.stdout.split("|")
    assert imported.split() == ["idemtasks.stores.sql", "idemtasks.stores.sql_lane", "psycopg", "idemtasks.effects"]
    took, sweeping = timing.split()
    assert float(took) < 2.0 and sweeping == str(sweeper == "sweeper"), out.stdout + out.stderr


def test_a_worker_without_sqlalchemy_still_sweeps() -> None:
    """An idemtasks[redis] install has no SQLAlchemy: importing the ledger's module fails there, which must not keep
    the sweeper from starting."""
    services.require("redis")
    out = subprocess.run([sys.executable, "-c", _STARTING_WORKER, services.REDIS_URL, "sweeper", "without sqlalchemy"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, timing = out.stdout.split("|")
    assert imported.split() == ["idemtasks.stores.redis"] and timing.split()[1] == "True", out.stdout + out.stderr


def test_a_pool_child_forked_while_a_store_opens_opens_its_own(tmp_path: Path) -> None:
    """A prefork pool forks its children while the parent's sweeper may be opening a store that does not answer
    (the lock of the store cache held for the whole connect timeout). The child must not inherit that lock held by a
    thread it does not have: it would wait on it for ever, even once the database is back."""
    code = """
import os, signal, threading, time
from idemtasks import effects, lease, task
from idemtasks import stores
from idemtasks.stores import lanes, sql
held = threading.Event()
url_lock = stores._opening_locks.setdefault((os.getpid(), "memory://"), threading.Lock())
def opener():  # the parent's sweeper, stuck opening a store: holds every lock a store or ledger opens under
    with (stores._shared_lock, url_lock, effects._lock, task._configure_lock, lanes.collector._lock,
          lease.keeper._cond, sql._lanes_lock):
        held.set()
        time.sleep(30)
threading.Thread(target=opener, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(10)
    store = stores.shared_store("memory://")
    with effects._lock, task._configure_lock, lanes.collector._lock, lease.keeper._cond, sql._lanes_lock:
        pass
    os._exit(0 if store.url == "memory://" else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
os._exit(0)  # not through the exit hooks: the opener holds the locks they take for the rest of its 30 s
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "child 0", out.stdout + out.stderr


def test_sweep_command_runs_once_and_reports() -> None:
    out = subprocess.run([sys.executable, "-m", "idemtasks", "sweep", "-A", "tests.apps.procapp"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT),
                                                                           "PROCAPP_STORE": "memory://"})
    assert out.returncode == 0, out.stderr
    assert "published again: 0" in out.stdout


def test_the_beat_task_sweeps(tmp_path: object) -> None:
    app = Celery(f"beat{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(task_always_eager=True, idemtasks_store_url="memory://")
    install(app)
    assert app.tasks["idemtasks.sweep"].apply().get() == 0


class TestDeadlines:
    """A message sent with ``expires`` must not run after it. Its copies carry the first message's deadline, and an
    operation past it is failed as ``Expired`` by recovery, which no message of it may be left to do: lost before
    the broker, or its holder dead (its redelivery, discarded unrun, found it running)."""

    @pytest.fixture(autouse=True)
    def no_slack(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(recovery, "EXPIRED_SLACK", 0.0)  # the clocks here are one clock

    def test_a_deadline_passed_by_less_than_the_slack_is_still_published(
            self, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
        """A worker whose clock is behind the sweeper's may still run a copy within its deadline."""
        monkeypatch.setattr(recovery, "EXPIRED_SLACK", 30.0)
        _key, op_id = rig.lost_submit(5, expires=0.1)
        time.sleep(0.2)
        report = Sweeper(rig.app, pending_after=0.0).sweep()
        assert report.republished == [op_id] and report.expired == []

    def test_an_operation_whose_message_was_lost_fails_once_its_deadline_passed(self, rig: Rig) -> None:
        key, op_id = rig.lost_submit(10, expires=0.2)
        time.sleep(0.4)
        with published_deadlines() as sent:
            report = Sweeper(rig.app, pending_after=0.0).sweep()
        assert report.expired == [op_id] and report.republished == [] and sent == {}  # no copy: nothing can run
        op = rig.store.get_by_id(op_id)
        assert op is not None and op.status is Status.FAILED and op.error is not None and op.error.type == "Expired"
        assert "before a copy of it ran" in op.error.message and "had started" not in op.error.message
        assert "(expires=)" not in op.error.message  # it names the deadline
        assert rig.runs[key] == 0
        assert Sweeper(rig.app, pending_after=0.0).sweep().expired == []  # failed once, and final

    def test_an_operation_whose_holder_died_after_its_deadline_is_failed_not_run_again(self, rig: Rig) -> None:
        key, op_id = rig.lost_submit(20, expires=0.3)
        fp = rig.store.get_by_id(op_id).fingerprint  # type: ignore[union-attr]
        dead = rig.store.claim("global", key, rig.task.name, fp, owner="dead", lease=0.3, ttl=3600).operation
        time.sleep(0.4)
        sweeper = Sweeper(rig.app, confirm_after=CONFIRM)
        assert sweeper.sweep().suspected == [op_id]
        time.sleep(CONFIRM + 0.1)
        report = sweeper.sweep()
        assert report.requeued == [op_id] and report.expired == [op_id] and report.republished == []
        op = rig.store.get_by_id(op_id)
        assert op is not None and op.status is Status.FAILED and op.error is not None and op.error.type == "Expired"
        assert "its body had started before, without an outcome" in op.error.message
        with pytest.raises(LeaseLost):  # the dead holder, should it wake up, is fenced off
            rig.store.succeed(dead, dead.fencing_token, "0", ttl=3600)

    def test_a_copy_published_before_the_deadline_carries_the_first_messages(self, rig: Rig) -> None:
        key, op_id = rig.lost_submit(30, expires=60)
        stored = parse_stored_call(rig.store.get_by_id(op_id).payload or "")[3]["expires"]  # type: ignore[union-attr]
        time.sleep(0.1)
        with published_deadlines() as sent:
            assert Sweeper(rig.app, pending_after=0.0).sweep().republished == [op_id]
        assert sent == {op_id: stored}
        with start_worker(rig.app, pool="solo", perform_ping_check=False):  # and the copy runs: its deadline is ahead
            op = rig.final(op_id)
        assert op.status is Status.SUCCEEDED and rig.runs[key] == 1

    def test_a_record_a_claim_creates_keeps_the_messages_deadline(self, rig: Rig) -> None:
        """A message sent without submit (beat, send_task, a plain apply_async): if its holder dies, recovery's
        copy must expire when it would have."""
        with start_worker(rig.app, pool="solo", perform_ping_check=False):
            sent = rig.task.apply_async((f"plain-{uuid.uuid4().hex}", 40), expires=60)
            op = rig.final_of_message(sent.id)
        expires = parse_stored_call(op.payload)[3]["expires"]
        assert 50 < (dt.datetime.fromisoformat(expires) - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 60

    def test_submit_stores_the_deadline_it_publishes_with(self, rig: Rig) -> None:
        with published_deadlines() as sent:
            sub = rig.task.submit((f"sub-{uuid.uuid4().hex}", 50), key=f"k-{uuid.uuid4().hex}", expires=60)
        expires = parse_stored_call(sub.operation.payload or "")[3]["expires"]
        assert 50 < (dt.datetime.fromisoformat(expires) - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 60
        assert sent == {sub.operation.id: expires}

    def test_the_tasks_own_expires_is_stored_as_a_deadline_too(self, rig: Rig) -> None:
        """Celery applies a task's ``expires`` to each of its messages: recovery's copy must not count it again."""
        @rig.app.task(shared=False, base=IdempotentTask, bind=True, store_url=rig.store, expires=60,
                      name=f"{rig.app.main}.quote")
        def quote(self: IdempotentTask, amount: int) -> int:
            return amount

        with published_deadlines() as sent:
            sub = quote.submit((1,), key=f"k-{uuid.uuid4().hex}")
        stored = parse_stored_call(sub.operation.payload or "")[3]["expires"]
        assert 50 < (dt.datetime.fromisoformat(stored) - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 60
        assert sent == {sub.operation.id: stored}  # the message went with the same deadline

    def test_a_repeat_that_publishes_keeps_the_first_requests_deadline(
            self, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
        """The first request died before publishing; the client's repeat publishes the message: with the deadline
        stored, not one counted from the repeat (recovery would otherwise fail an operation whose message is
        still valid, or a copy would run past the first deadline)."""
        import idemtasks.config

        monkeypatch.setattr(idemtasks.config, "ACCEPT_WINDOW", 0.0)  # the first request is presumed dead at once
        key, op_id = rig.lost_submit(6, expires=60)
        stored = parse_stored_call(rig.store.get_by_id(op_id).payload or "")[3]["expires"]  # type: ignore[union-attr]
        with published_deadlines() as sent:
            again = rig.task.submit((key, 6), key=key, expires=600)
        assert not again.created and sent == {op_id: stored}


@contextlib.contextmanager
def published_deadlines() -> Iterator[dict[str, Any]]:
    """The ``expires`` of each task message published in the context, by task id."""
    from celery import signals

    sent: dict[str, Any] = {}

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers:
            sent[headers["id"]] = headers.get("expires")

    signals.before_task_publish.connect(record, weak=False)
    try:
        yield sent
    finally:
        signals.before_task_publish.disconnect(record)
