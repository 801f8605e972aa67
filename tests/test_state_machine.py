"""A stateful model of the operation state machine, run against every store.

Holders claim, renew, release and complete one operation while leases run out (suspected by one claim, taken over
by a later one) and zombies finish late. Whatever the interleaving: claims hand out strictly increasing fencing
tokens, only the latest holder can ever complete, at most one completion succeeds, and a completed result never
changes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from idemtasks.errors import LeaseLost
from idemtasks.models import ClaimOutcome, ErrorInfo, Operation, Status
from idemtasks.stores.base import Store
from tests.conftest import BACKENDS, drop, make_store

LEASE = 0.15
TTL = 3600.0


@pytest.fixture(scope="module", params=BACKENDS)
def shared_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = make_store(request.param, Path(tmp_path_factory.mktemp("sm")))
    yield store
    if request.param != "memory":
        drop(store)


def machine_for(store: Store) -> type[RuleBasedStateMachine]:
    class OperationMachine(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            self.scope = f"sm-{uuid.uuid4().hex}"
            self.holders: list[Operation] = []  # every claim that succeeded, in order
            self.completed: Operation | None = None
            self.completions = 0

        def _claim(self) -> None:
            # A grace as short as the lease, so that lapsed leases are suspected and taken over within a run.
            res = store.claim(self.scope, "k", "t", "fp", owner=uuid.uuid4().hex, lease=LEASE, ttl=TTL, grace=LEASE)
            if res.outcome is ClaimOutcome.CLAIMED:
                if self.holders:
                    assert res.operation.fencing_token > self.holders[-1].fencing_token
                    assert self.completed is None, "a completed operation was claimed again"
                self.holders.append(res.operation)
            elif res.outcome is ClaimOutcome.DONE:
                assert self.completed is not None
            else:
                assert res.outcome is ClaimOutcome.BUSY

        @rule()
        def submit(self) -> None:
            store.create(self.scope, "k", "t", "fp", ttl=TTL)

        @rule()
        def claim(self) -> None:
            self._claim()

        @rule()
        def leases_run_out(self) -> None:
            time.sleep(LEASE + 0.05)

        @precondition(lambda self: bool(self.holders))
        @rule(i=st.integers(min_value=0, max_value=50), ok=st.booleans())
        def complete(self, i: int, ok: bool) -> None:
            holder = self.holders[i % len(self.holders)]
            try:
                if ok:
                    store.succeed(holder, holder.fencing_token, f'"{holder.lease_owner}"', ttl=TTL)
                else:
                    store.fail(holder, holder.fencing_token, ErrorInfo("E", str(holder.lease_owner)), ttl=TTL)
            except LeaseLost:
                return
            assert holder is self.holders[-1], "a stale holder completed the operation"
            self.completions += 1
            self.completed = store.get(self.scope, "k")

        @precondition(lambda self: bool(self.holders))
        @rule(i=st.integers(min_value=0, max_value=50))
        def release(self, i: int) -> None:
            holder = self.holders[i % len(self.holders)]
            try:
                store.release(holder, holder.fencing_token, ttl=TTL)
            except LeaseLost:
                return
            assert holder is self.holders[-1], "a stale holder released the operation"

        @precondition(lambda self: bool(self.holders))
        @rule(i=st.integers(min_value=0, max_value=50))
        def renew(self, i: int) -> None:
            holder = self.holders[i % len(self.holders)]
            if store.renew(holder, holder.fencing_token, lease=LEASE, ttl=TTL):
                assert holder is self.holders[-1], "a stale holder renewed its lease"

        @invariant()
        def completed_result_never_changes(self) -> None:
            assert self.completions <= 1
            if self.completed is not None:
                now = store.get(self.scope, "k")
                assert now is not None and now.status in (Status.SUCCEEDED, Status.FAILED)
                assert (now.result, now.error, now.fencing_token) == (
                    self.completed.result, self.completed.error, self.completed.fencing_token)

    return OperationMachine


def test_only_the_latest_holder_completes_and_results_never_change(shared_store: Store) -> None:
    machine = machine_for(shared_store)
    machine.TestCase.settings = settings(max_examples=10, stateful_step_count=12, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
