"""A lane interrupted between a write and the bookkeeping of its answer is left in a known state.

Celery prefork raises ``SoftTimeLimitExceeded`` from a signal handler, at whatever bytecode the worker thread is
running; Ctrl-C raises ``KeyboardInterrupt`` the same way. If that lands between a statement written to a lane and
its answer being read (or recorded as pending), the connection is out of step with its calls: every later call
on the thread would read the previous one's answer. The lane must instead drop its connection, hand the answers it
still owed to their resolvers as unknown outcomes (a completion is then sent again, and a resend that finds it had
landed is recognised), and let the exception go on.

The interruption is injected right after a lane's write (or right before it reads an answer), on real servers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from idemtasks import ClaimOutcome, LeaseLost, Status
from idemtasks.models import Operation
from idemtasks.stores import redis_lane, sql_lane
from idemtasks.stores.base import Store
from idemtasks.stores.lanes import COLLECT_AFTER
from idemtasks.stores.redis import RedisStore
from idemtasks.stores.sql import SQLStore
from tests.conftest import drop, make_store
from tests.test_pipelined_completion import Settled, claim, finish_pipelined, held, taken_over, twin

TTL = 3600.0


@pytest.fixture(params=["redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, tmp_path)
    yield s
    drop(s)  # closes it too


@pytest.fixture
def other(store: Store) -> Iterator[Store]:
    """Another worker on the same records, on connections of its own."""
    s = twin(store)
    yield s
    s.close()


Which = Callable[[Store, tuple[Any, ...]], bool]


def is_completion(store: Store, args: tuple[Any, ...]) -> bool:
    if isinstance(store, RedisStore):
        return bool(args[0][1] == store._finish_script.sha)
    return bool(args[0].name.startswith(b"idemtasks_finish_"))


def is_claim(store: Store, args: tuple[Any, ...]) -> bool:
    if isinstance(store, RedisStore):
        return bool(args[0][1] == store._claim_script.sha)
    return bool(args[0].name == b"idemtasks_claim")


class Interrupt:
    """Raise ``SoftTimeLimitExceeded`` once, as a signal handler would, around one of the lane's own methods."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
        self.monkeypatch = monkeypatch
        self.lane_class: Any = redis_lane.Lane if isinstance(store, RedisStore) else sql_lane.PGLane
        self.store = store
        self.fired = 0

    def after_write(self, which: Which) -> None:
        """Right after the lane wrote a statement ``which`` matches, before anything reads or records its answer."""
        original = self.lane_class._send

        def _send(lane: Any, *args: Any) -> None:
            original(lane, *args)
            if not self.fired and which(self.store, args):
                self.fired += 1
                raise SoftTimeLimitExceeded()

        self.monkeypatch.setattr(self.lane_class, "_send", _send)

    def before_read(self) -> None:
        """Right before the lane reads the next answer off its connection."""
        name = "_read" if self.lane_class is redis_lane.Lane else "_result"
        original = getattr(self.lane_class, name)

        def read(lane: Any) -> Any:
            if not self.fired:
                self.fired += 1
                raise SoftTimeLimitExceeded()
            return original(lane)

        self.monkeypatch.setattr(self.lane_class, name, read)

    def undo(self) -> None:
        self.monkeypatch.undo()
        assert self.fired == 1


def dropped(store: Store) -> bool:
    """Whether the thread's lane gave its connection up (the next call opens a fresh one)."""
    lane: Any = store._local.lane  # type: ignore[attr-defined]
    if isinstance(store, RedisStore):
        return lane is None or lane.connection._sock is None
    assert isinstance(store, SQLStore)
    return lane is None or bool(lane.broken)


def zombie(store: Store, other: Store, key: str) -> tuple[Operation, Operation]:
    """An operation this store held, and lost to ``other`` while it was away: its completion will be refused."""
    lost = held(store, key, lease=0.2)
    time.sleep(0.3)
    return lost, taken_over(other, key)


def assert_next_claims_answer_correctly(store: Store) -> None:
    """``busy`` is held by the other worker and nothing has touched a fresh key: each claim must hear its own answer."""
    res = store.claim("s", "busy", "t", "fp", owner=uuid.uuid4().hex, lease=30.0, ttl=TTL)
    assert res.outcome is ClaimOutcome.BUSY and res.operation.key == "busy"
    fresh = f"fresh-{uuid.uuid4().hex[:6]}"
    res = store.claim("s", fresh, "t", "fp", owner=uuid.uuid4().hex, lease=30.0, ttl=TTL)
    assert res.outcome is ClaimOutcome.CLAIMED and res.operation.key == fresh
    assert claim(store, "busy") is ClaimOutcome.BUSY  # and again: nothing left over on the connection



def assert_refused_once(settled: Settled, successor: Operation) -> None:
    """The zombie's completion reached ``settle`` as refused: the successor's token is the current one."""
    assert settled.called.wait(COLLECT_AFTER * 20)
    [refusal] = settled.errors
    assert isinstance(refusal, LeaseLost) and refusal.current_token == successor.fencing_token

def test_a_completion_interrupted_right_after_its_write_still_lands(store: Store, other: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    held(other, "busy")
    op, settled = held(store, "k"), Settled()
    interrupt = Interrupt(monkeypatch, store)
    interrupt.after_write(is_completion)
    with pytest.raises(SoftTimeLimitExceeded):
        finish_pipelined(store, op, settled)
    interrupt.undo()
    assert dropped(store)

    assert_next_claims_answer_correctly(store)
    res = store.claim("s", "k", "t", "fp", owner="dup", lease=30.0, ttl=TTL)
    assert res.outcome is ClaimOutcome.DONE and res.operation.id == op.id and res.operation.result == "paid"
    done = store.get("s", "k")
    assert done is not None and done.status is Status.SUCCEEDED and done.result == "paid"
    time.sleep(COLLECT_AFTER * 3)
    assert not settled.errors  # it had landed: the resend recognised it


def test_a_refused_completion_interrupted_right_after_its_write_still_reaches_settle(
        store: Store, other: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    held(other, "busy")
    lost, successor = zombie(store, other, "z")
    settled = Settled()
    interrupt = Interrupt(monkeypatch, store)
    interrupt.after_write(is_completion)
    with pytest.raises(SoftTimeLimitExceeded):
        finish_pipelined(store, lost, settled, result='"late"')
    interrupt.undo()
    assert dropped(store)

    assert_refused_once(settled, successor)
    assert_next_claims_answer_correctly(store)
    op = store.get("s", "z")
    assert op is not None and op.status is Status.RUNNING and op.fencing_token == successor.fencing_token
    time.sleep(COLLECT_AFTER * 3)
    assert len(settled.errors) == 1


def test_a_claim_interrupted_right_after_its_write_leaves_no_answer_behind(store: Store, other: Store,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    held(other, "busy")
    lost, successor = zombie(store, other, "z")
    settled = Settled()
    finish_pipelined(store, lost, settled, result='"late"')  # its answer is pending when the claim goes out
    interrupt = Interrupt(monkeypatch, store)
    interrupt.after_write(is_claim)
    with pytest.raises(SoftTimeLimitExceeded):
        claim(store, "x")
    interrupt.undo()
    assert dropped(store)

    assert_refused_once(settled, successor)
    assert_next_claims_answer_correctly(store)
    # The interrupted claim reached the server: its holder (whose answer was lost) keeps the lease.
    assert claim(store, "x") is ClaimOutcome.BUSY
    x = store.get("s", "x")
    assert x is not None and x.status is Status.RUNNING and x.fencing_token == 1
    time.sleep(COLLECT_AFTER * 3)
    assert len(settled.errors) == 1


def test_an_interruption_before_a_pending_answer_is_read_hands_it_over(store: Store, other: Store,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    held(other, "busy")
    lost, successor = zombie(store, other, "z")
    op, settled, refused = held(store, "k"), Settled(), Settled()
    finish_pipelined(store, lost, refused, result='"late"')
    interrupt = Interrupt(monkeypatch, store)
    interrupt.before_read()  # the next claim starts by reading the zombie's answer: interrupted there
    with pytest.raises(SoftTimeLimitExceeded):
        claim(store, "x")
    interrupt.undo()
    assert dropped(store)

    assert_refused_once(refused, successor)
    assert_next_claims_answer_correctly(store)
    # And the lane carries on: a completion behind all this is answered as usual.
    finish_pipelined(store, op, settled)
    res = store.claim("s", "k", "t", "fp", owner="dup", lease=30.0, ttl=TTL)
    assert res.outcome is ClaimOutcome.DONE and res.operation.result == "paid"
    time.sleep(COLLECT_AFTER * 3)
    assert not settled.errors and len(refused.errors) == 1


def test_a_keyboard_interrupt_right_after_a_completions_write_is_handled_alike(store: Store, other: Store,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Not an Exception: nothing may treat it as an answer, or swallow it.
    held(other, "busy")
    op, settled = held(store, "k"), Settled()
    lane_class: Any = redis_lane.Lane if isinstance(store, RedisStore) else sql_lane.PGLane
    original = lane_class._send
    fired: list[bool] = []

    def _send(lane: Any, *args: Any) -> None:
        original(lane, *args)
        if not fired and is_completion(store, args):
            fired.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(lane_class, "_send", _send)
    with pytest.raises(KeyboardInterrupt):
        finish_pipelined(store, op, settled)
    monkeypatch.undo()
    assert fired and dropped(store)
    assert_next_claims_answer_correctly(store)
    done = store.get("s", "k")
    assert done is not None and done.status is Status.SUCCEEDED and done.result == "paid"
    assert not settled.errors
