"""The store contract, run against every backend: memory, Redis, PostgreSQL, SQLite and MariaDB."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import pytest

from idemtasks.config import DEFAULT_MAX_RESULT_BYTES
from idemtasks.errors import IdempotencyKeyMismatch, LeaseLost
from idemtasks.identity import digest_from_id, key_digest
from idemtasks.models import MAX_ERROR_TYPE, ClaimOutcome, ErrorInfo, Status, Takeover
from idemtasks.stores.base import DUE_SLACK, Store
from tests import services

TTL = 3600.0
LEASE = 30.0


def claim(store: Store, scope: str, key: str, fp: str = "fp-a", *, lease: float = LEASE, owner: str | None = None,
          ttl: float = TTL, operation_id: str | None = None, payload: str | None = None,
          grace: float | None = None):  # type: ignore[no-untyped-def]
    return store.claim(scope, key, "tasks.charge", fp, owner=owner or uuid.uuid4().hex, lease=lease, ttl=ttl,
                       operation_id=operation_id, payload=payload, grace=grace)


def take_over(store: Store, scope: str, key: str, *, lease: float = LEASE):  # type: ignore[no-untyped-def]
    """A redelivery's claim of a lapsed lease through both phases, with no grace: the first claim marks it."""
    assert claim(store, scope, key, lease=lease, grace=0.0).outcome is ClaimOutcome.BUSY
    res = claim(store, scope, key, lease=lease, grace=0.0)
    assert res.outcome is ClaimOutcome.CLAIMED
    return res


class TestCreate:
    def test_first_create_records_a_pending_operation(self, store: Store, scope: str) -> None:
        sub = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        assert sub.created
        op = sub.operation
        assert (op.scope, op.key, op.task_name, op.fingerprint) == (scope, "k1", "tasks.charge", "fp-a")
        assert op.status is Status.PENDING
        assert (op.attempts, op.fencing_token, op.result, op.error) == (0, 0, None, None)
        assert digest_from_id(op.id) == key_digest(scope, "k1")
        assert op.created_at <= op.updated_at < op.expires_at

    def test_create_answers_the_operation_as_a_lookup_then_finds_it(self, store: Store, scope: str) -> None:
        sub = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL, payload='["tasks.charge",[1],{}]')
        assert store.get_by_id(sub.operation.id) == sub.operation
        assert store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation == sub.operation

    def test_repeat_returns_the_same_operation_without_creating(self, store: Store, scope: str) -> None:
        first = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        again = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        assert not again.created
        assert again.operation.id == first.operation.id

    def test_same_key_with_another_payload_is_a_mismatch(self, store: Store, scope: str) -> None:
        first = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        with pytest.raises(IdempotencyKeyMismatch) as info:
            store.create(scope, "k1", "tasks.charge", "fp-b", ttl=TTL)
        err = info.value
        assert (err.operation_id, err.stored_fingerprint, err.fingerprint) == (first.operation.id, "fp-a", "fp-b")

    def test_scopes_isolate_keys(self, store: Store, scope: str) -> None:
        a = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        b = store.create(scope + "-other", "k1", "tasks.charge", "fp-b", ttl=TTL)
        assert a.created and b.created and a.operation.id != b.operation.id

    def test_keys_differing_only_in_case_or_trailing_space_are_distinct(self, store: Store, scope: str) -> None:
        ids = {store.create(scope, k, "tasks.charge", "fp", ttl=TTL).operation.id for k in ("Key", "key", "key ")}
        assert len(ids) == 3

    def test_expired_operation_is_absent_and_its_key_starts_a_new_one(self, store: Store, scope: str) -> None:
        old = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=1.0).operation
        time.sleep(1.3)
        assert store.get(scope, "k1") is None
        assert store.get_by_id(old.id) is None
        new = store.create(scope, "k1", "tasks.charge", "fp-b", ttl=TTL)
        assert new.created and new.operation.id != old.id


class TestClaim:
    def test_claiming_a_pending_operation_runs_it_under_a_lease(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        res = claim(store, scope, "k1", owner="w1")
        assert res.outcome is ClaimOutcome.CLAIMED
        held = res.operation
        assert held.id == op.id and held.status is Status.RUNNING
        assert (held.attempts, held.fencing_token, held.lease_owner) == (1, 1, "w1")
        assert held.lease_expires_at is not None and held.lease_expires_at > store.now()

    def test_claim_without_a_record_creates_it_running(self, store: Store, scope: str) -> None:
        res = claim(store, scope, "beat-key")
        assert res.outcome is ClaimOutcome.CLAIMED
        assert res.operation.status is Status.RUNNING and res.operation.fencing_token == 1
        assert store.get(scope, "beat-key") == res.operation

    def test_claim_uses_the_given_id_only_if_it_belongs_to_the_key(self, store: Store, scope: str) -> None:
        mine = key_digest(scope, "k1") + "ab" * 12
        assert claim(store, scope, "k1", operation_id=mine).operation.id == mine
        foreign = key_digest(scope, "other") + "ab" * 12
        got = claim(store, scope, "k2", operation_id=foreign).operation.id
        assert got != foreign and digest_from_id(got) == key_digest(scope, "k2")

    def test_live_lease_makes_a_duplicate_busy(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", owner="w1").operation
        res = claim(store, scope, "k1", owner="w2")
        assert res.outcome is ClaimOutcome.BUSY
        assert res.operation.lease_owner == "w1" and res.operation.fencing_token == held.fencing_token

    def test_a_claim_sent_again_by_its_owner_under_its_live_lease_is_still_claimed(self, store: Store,
                                                                                   scope: str) -> None:
        """A claim whose answer was lost is sent again (owners are unique per attempt): it landed, so it is this
        owner's claim, with the same token. Its lease starts again from now, as a claim's does: what was left of it
        might end before the holder's first renewal, a third of a lease after the answer."""
        held = claim(store, scope, "k1", owner="w1", lease=1.0).operation
        time.sleep(0.6)
        sent_at = time.time()
        again = claim(store, scope, "k1", owner="w1", lease=1.0)
        assert again.outcome is ClaimOutcome.CLAIMED
        op = again.operation
        assert (op.id, op.fencing_token, op.attempts, op.lease_owner, op.crashes) == (held.id, 1, 1, "w1", 0)
        assert (op.lease_expires_at or 0.0) >= sent_at + 0.9 and op.expires_at > held.expires_at
        assert store.get(scope, "k1") == op
        assert claim(store, scope, "k1", owner="w2", lease=1.0).outcome is ClaimOutcome.BUSY

    def test_an_owners_claim_of_another_payload_is_a_mismatch_and_changes_nothing(self, store: Store,
                                                                                  scope: str) -> None:
        held = claim(store, scope, "k1", owner="w1", lease=1.0).operation
        time.sleep(0.3)
        res = claim(store, scope, "k1", "fp-b", owner="w1", lease=1.0)
        assert res.outcome is ClaimOutcome.MISMATCH
        assert store.get(scope, "k1") == held

    def test_a_claim_sent_again_by_its_owner_after_its_lease_lapsed_is_busy(self, store: Store, scope: str) -> None:
        """Too late to hand back: the lapsed lease is suspected like any other, and only taken (over) after the
        grace, with the next token."""
        held = claim(store, scope, "k1", owner="w1", lease=0.3).operation
        time.sleep(0.5)
        marked = claim(store, scope, "k1", owner="w1", grace=0.4)
        assert marked.outcome is ClaimOutcome.BUSY and marked.operation.fencing_token == held.fencing_token
        time.sleep(0.5)
        res = claim(store, scope, "k1", owner="w1", grace=0.4)
        assert res.outcome is ClaimOutcome.CLAIMED and res.operation.fencing_token == held.fencing_token + 1

    def test_expired_lease_is_suspected_first_then_taken_over_with_a_higher_token(self, store: Store,
                                                                                    scope: str) -> None:
        first = claim(store, scope, "k1", owner="w1", lease=0.3).operation
        time.sleep(0.5)
        # The first claim to find the lapsed lease only marks it: a holder cut off by a store outage may be alive.
        suspected = claim(store, scope, "k1", owner="w2", grace=0.4)
        assert suspected.outcome is ClaimOutcome.BUSY
        op = suspected.operation
        assert (op.status, op.lease_owner, op.fencing_token) == (Status.RUNNING, "w1", first.fencing_token)
        assert op.updated_at >= (op.lease_expires_at or 0.0)  # the mark
        assert claim(store, scope, "k1", owner="w3", grace=0.4).outcome is ClaimOutcome.BUSY  # within the grace
        time.sleep(0.5)
        res = claim(store, scope, "k1", owner="w4", grace=0.4)
        assert res.outcome is ClaimOutcome.CLAIMED
        assert res.operation.id == first.id
        assert res.operation.fencing_token == first.fencing_token + 1
        assert res.operation.attempts == 2 and res.operation.lease_owner == "w4"
        with pytest.raises(LeaseLost):
            store.succeed(first, first.fencing_token, '"late"', ttl=TTL)

    def test_a_renewal_within_the_grace_keeps_a_suspected_holder(self, store: Store, scope: str) -> None:
        first = claim(store, scope, "k1", owner="w1", lease=0.3).operation
        time.sleep(0.5)
        assert claim(store, scope, "k1", owner="w2", grace=0.3).outcome is ClaimOutcome.BUSY  # suspected
        assert store.renew(first, first.fencing_token, lease=0.2, ttl=TTL)  # the holder's store came back in time
        time.sleep(0.5)  # past the grace, and past the renewed lease as well
        again = claim(store, scope, "k1", owner="w3", grace=0.3)
        assert again.outcome is ClaimOutcome.BUSY  # the renewal cancelled the mark: this claim only marks again
        assert again.operation.lease_owner == "w1"
        store.succeed(first, first.fencing_token, '"paid"', ttl=TTL)
        assert claim(store, scope, "k1", owner="w4", grace=0.0).outcome is ClaimOutcome.DONE

    def test_the_default_grace_follows_the_lease(self, store: Store, scope: str) -> None:
        claim(store, scope, "k1", owner="w1", lease=0.2)
        time.sleep(0.3)
        assert claim(store, scope, "k1", owner="w2", lease=0.2).outcome is ClaimOutcome.BUSY  # marks
        time.sleep(0.5)
        # confirm_after_for(0.2) is MIN_CONFIRM_AFTER (2 s): half a second after the mark the holder still has it.
        res = claim(store, scope, "k1", owner="w3", lease=0.2)
        assert res.outcome is ClaimOutcome.BUSY and res.operation.lease_owner == "w1"

    def test_a_sweep_and_a_claim_share_one_suspicion_mark(self, store: Store, scope: str) -> None:
        first = claim(store, scope, "k1", owner="w1", lease=0.3).operation
        time.sleep(0.5)
        assert store.requeue(first, confirm_after=0.3) is Takeover.SUSPECTED  # recovery marks it
        time.sleep(0.4)
        res = claim(store, scope, "k1", owner="w2", grace=0.3)  # a redelivery after the grace: the mark counts
        assert res.outcome is ClaimOutcome.CLAIMED and res.operation.fencing_token == first.fencing_token + 1
        second = claim(store, scope, "k2", owner="w1", lease=0.3).operation
        time.sleep(0.5)
        assert claim(store, scope, "k2", owner="w2", grace=0.3).outcome is ClaimOutcome.BUSY  # a claim marks it
        time.sleep(0.4)
        assert store.requeue(second, confirm_after=0.3) is Takeover.REQUEUED

    def test_a_pending_operation_is_not_claimed_before_it_is_due(self, store: Store, scope: str) -> None:
        """Given back for retry(countdown=…), or submitted with a countdown: a copy of the message that comes sooner
        (a duplicate delivery, a busy copy coming back) must not run the body early, nor start a second chain of
        retries beside the scheduled one."""
        held = claim(store, scope, "retry").operation
        store.release(held, held.fencing_token, ttl=TTL, delay=30.0)
        store.create(scope, "scheduled", "tasks.charge", "fp-a", ttl=TTL, delay=30.0)
        for key in ("retry", "scheduled"):
            early = claim(store, scope, key)
            assert early.outcome is ClaimOutcome.BUSY and early.operation.status is Status.PENDING
            assert early.operation.updated_at > store.now() + 25  # when to come back
            assert store.get(scope, key) == early.operation  # unchanged: no token, no attempt spent
        assert store.get(scope, "retry").fencing_token == held.fencing_token  # type: ignore[union-attr]

    def test_a_pending_operation_due_within_the_slack_is_claimed(self, store: Store, scope: str) -> None:
        """The message that is due arrives a moment before the store records its due time (Celery computes the ETA
        before the publish, the store after it), and clocks differ a little: DUE_SLACK lets it claim."""
        store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL, delay=DUE_SLACK / 2)
        assert claim(store, scope, "k1").outcome is ClaimOutcome.CLAIMED

    def test_a_record_recreated_after_expiry_keeps_counting_tokens(self, store: Store, scope: str) -> None:
        old = claim(store, scope, "k1", lease=0.3, ttl=1.0).operation
        time.sleep(1.3)
        # A redelivered message of the expired operation re-creates it under the same id.
        again = claim(store, scope, "k1", operation_id=old.id)
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.id == old.id
        assert again.operation.fencing_token > old.fencing_token
        with pytest.raises(LeaseLost):
            store.succeed(old, old.fencing_token, '"zombie"', ttl=TTL)

    def test_claim_with_another_payload_is_a_mismatch_and_changes_nothing(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        res = claim(store, scope, "k1", fp="fp-b")
        assert res.outcome is ClaimOutcome.MISMATCH
        assert store.get_by_id(op.id) == op

    @pytest.mark.parametrize("final", [Status.SUCCEEDED, Status.FAILED])
    def test_final_operation_is_done_and_never_claimed_again(self, store: Store, scope: str, final: Status) -> None:
        held = claim(store, scope, "k1").operation
        if final is Status.SUCCEEDED:
            store.succeed(held, held.fencing_token, '{"paid": 1}', ttl=TTL)
        else:
            store.fail(held, held.fencing_token, ErrorInfo("Declined", "too much"), ttl=TTL)
        res = claim(store, scope, "k1")
        assert res.outcome is ClaimOutcome.DONE
        assert res.operation.status is final
        assert res.operation.fencing_token == held.fencing_token


    def test_a_record_created_by_a_claim_without_its_call_can_be_given_it_by_its_holder(
            self, store: Store, scope: str) -> None:
        """A submitted message whose record is gone is claimed into a new record without its call: the holder stores
        it, so that recovery could publish the operation again. Only the holder, once, and never over a call."""
        held = claim(store, scope, "k1").operation
        assert held.payload is None
        call = '["tasks.charge",["' + "é" * 150 + '",1],{}]'  # longer than a Redis chunk, cut inside characters
        assert not store.attach_payload(held, held.fencing_token + 1, call)
        assert store.attach_payload(held, held.fencing_token, call)
        assert not store.attach_payload(held, held.fencing_token, '["tasks.charge",[2],{}]')
        assert store.get(scope, "k1").payload == call  # type: ignore[union-attr]
        submitted = store.create(scope, "k2", "tasks.charge", "fp-a", ttl=TTL, payload='["tasks.charge",[3],{}]')
        again = claim(store, scope, "k2").operation
        assert again.payload == '["tasks.charge",[3],{}]'
        assert not store.attach_payload(again, again.fencing_token, '["tasks.charge",[4],{}]')
        assert store.get_by_id(submitted.operation.id).payload == '["tasks.charge",[3],{}]'  # type: ignore[union-attr]


class TestFinish:
    def test_success_stores_the_result_and_clears_the_lease(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1").operation
        store.succeed(held, held.fencing_token, '{"amount": 5, "tags": ["a"]}', ttl=TTL)
        op = store.get_by_id(held.id)
        assert op is not None and op.status is Status.SUCCEEDED
        assert op.result == {"amount": 5, "tags": ["a"]}
        assert (op.error, op.lease_owner, op.lease_expires_at) == (None, None, None)

    def test_failure_stores_the_error(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1").operation
        store.fail(held, held.fencing_token, ErrorInfo("CardDeclined", "insufficient funds"), ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.FAILED
        assert op.error == ErrorInfo("CardDeclined", "insufficient funds") and op.result is None

    def test_a_long_error_type_is_stored_cut_alike_and_its_resend_recognised(self, store: Store, scope: str) -> None:
        """A generated exception class may have a name longer than a SQL column: every store keeps its first
        MAX_ERROR_TYPE characters, and a resend of that completion (its answer lost) finds it landed."""
        held = claim(store, scope, "k1").operation
        error = ErrorInfo("E" * 300, "declined")
        assert error.type == "E" * MAX_ERROR_TYPE
        store.fail(held, held.fencing_token, error, ttl=TTL)
        store.finish(scope, "k1", held.id, held.fencing_token, Status.FAILED, error=ErrorInfo("E" * 300, "declined"),
                     ttl=TTL, again=True)
        op = store.get(scope, "k1")
        assert op is not None and op.error == ErrorInfo("E" * MAX_ERROR_TYPE, "declined")

    def test_stale_holder_cannot_overwrite_the_new_holders_result(self, store: Store, scope: str) -> None:
        zombie = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.5)
        fresh = take_over(store, scope, "k1").operation
        store.succeed(fresh, fresh.fencing_token, '"fresh"', ttl=TTL)
        with pytest.raises(LeaseLost) as info:
            store.succeed(zombie, zombie.fencing_token, '"zombie"', ttl=TTL)
        assert info.value.fencing_token == zombie.fencing_token
        op = store.get(scope, "k1")
        assert op is not None and op.result == "fresh"

    def test_stale_holder_cannot_complete_while_new_holder_runs(self, store: Store, scope: str) -> None:
        zombie = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.5)
        fresh = take_over(store, scope, "k1").operation
        with pytest.raises(LeaseLost) as info:
            store.fail(zombie, zombie.fencing_token, ErrorInfo("X", "late"), ttl=TTL)
        assert info.value.current_token == fresh.fencing_token
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.RUNNING and op.lease_owner == fresh.lease_owner

    def test_a_result_never_changes_once_stored(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1").operation
        store.succeed(held, held.fencing_token, "1", ttl=TTL)
        with pytest.raises(LeaseLost):
            store.succeed(held, held.fencing_token, "2", ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.result == 1

    def test_release_lets_a_retry_claim_again(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1").operation
        store.release(held, held.fencing_token, ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.PENDING and op.lease_owner is None
        again = claim(store, scope, "k1")
        assert again.outcome is ClaimOutcome.CLAIMED
        assert again.operation.fencing_token == held.fencing_token + 1 and again.operation.attempts == 2

    def test_a_release_for_a_retry_stores_its_call_and_a_plain_one_keeps_the_stored_call(self, store: Store,
                                                                                        scope: str) -> None:
        """What recovery publishes if the retry message is lost: the retry's call, whole, of any length, in place
        of every piece of the previous one; a release without a call keeps the stored one."""
        first = json.dumps(["tasks.charge", ["é" * 5_000], {}], ensure_ascii=False)
        held = claim(store, scope, "k1", payload=first).operation
        store.release(held, held.fencing_token, ttl=TTL, payload='["tasks.charge",["step 2"],{},{"retries":1}]')
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.PENDING
        assert op.payload == '["tasks.charge",["step 2"],{},{"retries":1}]'
        held = claim(store, scope, "k1").operation
        assert held.payload == op.payload  # a claim answers the call as well
        longer = json.dumps(["tasks.charge", ["€" * 30_000], {}, {"retries": 2}], ensure_ascii=False)
        store.release(held, held.fencing_token, ttl=TTL, payload=longer)
        assert [op.payload for op in store.stale(pending_after=0.0) if op.scope == scope] == [longer]
        held = claim(store, scope, "k1").operation
        store.release(held, held.fencing_token, ttl=TTL)  # give-backs other than a retry's
        assert store.get(scope, "k1").payload == longer  # type: ignore[union-attr]
        held = claim(store, scope, "k1").operation
        store.succeed(held, held.fencing_token, "1", ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and (op.status, op.payload, op.result) == (Status.SUCCEEDED, longer, 1)

    def test_a_stale_holders_release_changes_no_call(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", payload='["tasks.charge",[1],{}]', lease=0.2).operation
        time.sleep(0.3)
        take_over(store, scope, "k1")
        with pytest.raises(LeaseLost):
            store.release(held, held.fencing_token, ttl=TTL, payload='["tasks.charge",[2],{},{"retries":1}]')
        assert store.get(scope, "k1").payload == '["tasks.charge",[1],{}]'  # type: ignore[union-attr]

    def test_a_release_for_a_later_retry_is_not_stale_before_the_retry_is_due(self, store: Store, scope: str) -> None:
        """retry(countdown=…) releases the operation: recovery must not publish a copy before the scheduled retry
        had its chance, or the body would run early and a second chain of retries would start beside the first."""
        later = claim(store, scope, "later").operation
        now = claim(store, scope, "now").operation
        store.release(later, later.fencing_token, ttl=TTL, delay=1.0)
        store.release(now, now.fencing_token, ttl=TTL)
        time.sleep(0.6)
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now"}
        time.sleep(1.0)  # 1.6 s in all: due, and pending_after past
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now", "later"}
        assert claim(store, scope, "later").outcome is ClaimOutcome.CLAIMED  # the retry, when it comes, claims it

    def test_a_scheduled_message_is_not_presumed_lost_before_it_is_due(self, store: Store, scope: str) -> None:
        """Published with a countdown: recovery must not publish a copy that would run the body before its time."""
        later = store.create(scope, "later", "tasks.charge", "fp-a", ttl=TTL).operation
        now = store.create(scope, "now", "tasks.charge", "fp-a", ttl=TTL).operation
        store.mark_published(later, delay=1.0)
        store.mark_published(now)
        time.sleep(0.6)
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now"}
        time.sleep(1.0)  # 1.6 s in all: due, and pending_after past
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now", "later"}
        assert claim(store, scope, "later").outcome is ClaimOutcome.CLAIMED  # the message, when it comes, claims it

    def test_a_published_mark_that_lands_after_a_claim_changes_nothing(self, store: Store, scope: str) -> None:
        """The publisher paused between its publish and its mark; meanwhile a worker claimed the operation and gave
        it back for a retry in 600 s. The late mark must not make it due now: a duplicate delivery would run the
        body at once (and recovery publish a copy), starting a second chain of retries beside the scheduled one."""
        published = store.create(scope, "k", "tasks.charge", "fp-a", ttl=TTL).operation
        held = claim(store, scope, "k").operation
        store.release(held, held.fencing_token, ttl=TTL, delay=600)
        store.mark_published(published)
        after = store.get(scope, "k")  # a thread's read waits for its own pipelined mark to land
        assert after is not None and after.updated_at > store.now() + 590
        assert claim(store, scope, "k").outcome is ClaimOutcome.BUSY
        assert not [op for op in store.stale(pending_after=0.0) if op.scope == scope]

    def test_a_scheduled_operation_is_not_presumed_lost_before_it_is_due_even_unmarked(self, store: Store,
                                                                                        scope: str) -> None:
        """The due time is recorded at creation too: if the "published" mark never lands (a store hiccup after the
        publish, a web process killed right after it), recovery still waits for the message's time."""
        later = store.create(scope, "later", "tasks.charge", "fp-a", ttl=TTL, delay=1.0).operation
        store.create(scope, "now", "tasks.charge", "fp-a", ttl=TTL)
        assert later.updated_at - later.created_at == pytest.approx(1.0, abs=0.01)
        assert store.get(scope, "later") == later
        time.sleep(0.6)
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now"}
        time.sleep(1.0)  # 1.6 s in all: due, and pending_after past
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"now", "later"}

    def test_a_copy_by_recovery_is_not_presumed_lost_again_before_its_back_off(self, store: Store,
                                                                              scope: str) -> None:
        """Recovery's copy of a pending operation backs off: the operation is stale again only once both
        ``pending_after`` and the copy's back-off have passed. The copy itself is claimed at once: the back-off
        delays recovery, never the body."""
        for key in ("copied", "first", "claimed"):
            store.create(scope, key, "tasks.charge", "fp-a", ttl=TTL)
        copied, claimed = store.get(scope, "copied"), store.get(scope, "claimed")
        assert copied is not None and claimed is not None
        store.mark_published(copied, backoff=1.0)
        store.mark_published(claimed, backoff=1.0)
        marked = store.get(scope, "copied")
        assert marked is not None and marked.lease_expires_at == pytest.approx(marked.updated_at + 1.0, abs=0.01)
        time.sleep(0.6)
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"first"}
        assert claim(store, scope, "claimed").outcome is ClaimOutcome.CLAIMED
        time.sleep(0.6)  # 1.2 s in all: the back-off has passed too
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"first", "copied"}

    def test_a_release_or_a_mark_without_back_off_keeps_no_back_off_of_its_own(self, store: Store,
                                                                              scope: str) -> None:
        """A retry given back starts recovery's clock afresh, with no back-off from an earlier copy; a publisher's
        own mark (no back-off) leaves recovery's alone."""
        store.create(scope, "retried", "tasks.charge", "fp-a", ttl=TTL)
        store.create(scope, "marked", "tasks.charge", "fp-a", ttl=TTL)
        retried, marked = store.get(scope, "retried"), store.get(scope, "marked")
        assert retried is not None and marked is not None
        store.mark_published(retried, backoff=60.0)
        store.mark_published(marked, backoff=60.0)
        store.mark_published(marked)
        held = claim(store, scope, "retried").operation
        store.release(held, held.fencing_token, ttl=TTL)
        time.sleep(0.6)
        assert {op.key for op in store.stale(pending_after=0.5) if op.scope == scope} == {"retried"}
        again = store.get(scope, "marked")
        assert again is not None and again.lease_expires_at == pytest.approx(again.updated_at + 60.0, abs=1.0)

    def test_renew_extends_only_the_current_holders_lease(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.5).operation
        assert store.renew(held, held.fencing_token, lease=30.0, ttl=TTL)
        time.sleep(0.7)
        assert claim(store, scope, "k1").outcome is ClaimOutcome.BUSY
        assert not store.renew(held, held.fencing_token + 1, lease=30.0, ttl=TTL)

    def test_renew_fails_after_takeover(self, store: Store, scope: str) -> None:
        zombie = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.5)
        take_over(store, scope, "k1")
        assert not store.renew(zombie, zombie.fencing_token, lease=30.0, ttl=TTL)


class TestRequeue:
    """Recovery's takeover is two-phase: a lapsed lease is only suspected at first, and taken over by a later call
    only if nothing renewed it meanwhile (a live holder cut off by a store outage renews once the store is back)."""

    CONFIRM = 0.4

    def test_a_lapsed_lease_is_marked_then_requeued_if_not_renewed(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.ALIVE  # lease still live
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.SUSPECTED
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.RUNNING and op.fencing_token == held.fencing_token
        assert held.id in {o.id for o in store.stale(pending_after=TTL)}  # a later sweep must find it to confirm
        # Still suspected, not yet confirmed: asking again neither requeues nor restarts the wait.
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.SUSPECTED
        time.sleep(self.CONFIRM + 0.1)
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.REQUEUED
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.PENDING and op.fencing_token == held.fencing_token
        assert op.lease_owner is None
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.ALIVE  # nothing left to take over
        again = claim(store, scope, "k1")
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.fencing_token == held.fencing_token + 1
        with pytest.raises(LeaseLost):
            store.succeed(held, held.fencing_token, "0", ttl=TTL)

    def test_a_renewal_after_the_mark_cancels_the_suspicion(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.SUSPECTED
        assert store.renew(held, held.fencing_token, lease=0.3, ttl=TTL)  # the holder reaches the store again
        assert held.id not in {o.id for o in store.stale(pending_after=TTL)}
        time.sleep(self.CONFIRM + 0.1)  # its lease lapsed once more, but it was renewed since the mark
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.SUSPECTED  # a new suspicion, no takeover
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.RUNNING and op.fencing_token == held.fencing_token
        store.succeed(held, held.fencing_token, "7", ttl=TTL)
        assert store.requeue(held, confirm_after=self.CONFIRM) is Takeover.ALIVE
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.SUCCEEDED and op.result == 7

    def test_a_completion_after_the_mark_is_accepted(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=0.0) is Takeover.SUSPECTED  # the first call never takes over
        store.succeed(held, held.fencing_token, "8", ttl=TTL)
        assert store.requeue(held, confirm_after=0.0) is Takeover.ALIVE
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.SUCCEEDED and op.result == 8

    @pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED])
    def test_a_completion_after_a_requeue_lands_until_a_claim_moves_the_token_on(self, store: Store, scope: str,
                                                                                 status: Status) -> None:
        """Recovery gave the operation back, and nobody claimed it since: the holder it was taken from (cut off from
        the store, not dead) may still complete it, and the copy recovery published then replays instead of running
        the body a second time."""
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=0.0) is Takeover.SUSPECTED
        time.sleep(0.01)
        assert store.requeue(held, confirm_after=0.0) is Takeover.REQUEUED
        if status is Status.SUCCEEDED:
            store.succeed(held, held.fencing_token, "9", ttl=TTL)
        else:
            store.fail(held, held.fencing_token, ErrorInfo("Declined", "no"), ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.status is status and op.fencing_token == held.fencing_token
        assert claim(store, scope, "k1").outcome is ClaimOutcome.DONE  # the copy recovery published replays
        assert held.id not in {o.id for o in store.stale(pending_after=0.0)}

    def test_a_stale_token_never_requeues(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        newer = take_over(store, scope, "k1", lease=0.3).operation  # a redelivery took the lapsed lease meanwhile
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=0.0) is Takeover.ALIVE
        assert store.requeue(newer, confirm_after=0.0) is Takeover.SUSPECTED


class TestCrashes:
    """``crashes`` counts the holders that died with the body running, so that a worker can stop starting a body that
    kills its process every time. Only a death counts: a takeover of a lapsed lease (by a claim or by recovery) or a
    release by a holder going away mid-body; a retry's release, a suspicion or a replay does not."""

    def test_a_takeover_of_a_lapsed_lease_counts_one_crash_and_its_suspicion_none(self, store: Store,
                                                                                 scope: str) -> None:
        first = claim(store, scope, "k1", lease=0.3).operation
        assert first.crashes == 0
        time.sleep(0.4)
        assert claim(store, scope, "k1", grace=0.0).outcome is ClaimOutcome.BUSY  # marks it: nobody is dead yet
        assert store.get(scope, "k1").crashes == 0  # type: ignore[union-attr]
        second = claim(store, scope, "k1", lease=0.3, grace=0.0)
        assert second.outcome is ClaimOutcome.CLAIMED and second.operation.crashes == 1
        assert store.get(scope, "k1") == second.operation
        time.sleep(0.4)
        third = take_over(store, scope, "k1").operation
        assert third.crashes == 2 and third.attempts == 3
        store.succeed(third, third.fencing_token, '"paid"', ttl=TTL)
        done = claim(store, scope, "k1")
        assert done.outcome is ClaimOutcome.DONE and done.operation.crashes == 2

    def test_a_requeue_counts_one_crash_and_the_claim_after_it_none(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        assert store.requeue(held, confirm_after=0.0) is Takeover.SUSPECTED
        assert store.get(scope, "k1").crashes == 0  # type: ignore[union-attr]
        time.sleep(0.01)
        assert store.requeue(held, confirm_after=0.0) is Takeover.REQUEUED
        assert store.get(scope, "k1").crashes == 1  # type: ignore[union-attr]
        again = claim(store, scope, "k1")
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.crashes == 1

    def test_a_release_counts_a_crash_only_when_its_holder_is_going_away(self, store: Store, scope: str) -> None:
        held = claim(store, scope, "k1").operation
        store.release(held, held.fencing_token, ttl=TTL, delay=0.0)  # a retry: not a crash
        held = claim(store, scope, "k1").operation
        assert held.crashes == 0
        store.release(held, held.fencing_token, ttl=TTL, crashed=True)  # SystemExit in the body
        assert store.get(scope, "k1").crashes == 1  # type: ignore[union-attr]
        again = claim(store, scope, "k1")
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.crashes == 1
        assert again.operation.fencing_token == held.fencing_token + 1

    def test_a_holder_dying_after_recovery_took_its_operation_is_not_counted_twice(self, store: Store,
                                                                                  scope: str) -> None:
        held = claim(store, scope, "k1", lease=0.3).operation
        time.sleep(0.4)
        store.requeue(held, confirm_after=0.0)
        time.sleep(0.01)
        assert store.requeue(held, confirm_after=0.0) is Takeover.REQUEUED
        store.release(held, held.fencing_token, ttl=TTL, crashed=True)  # its own token still holds the record
        op = store.get(scope, "k1")
        assert op is not None and op.status is Status.PENDING and op.crashes == 1

    def test_a_record_recreated_after_expiry_starts_with_no_crashes(self, store: Store, scope: str) -> None:
        claim(store, scope, "k1", lease=0.3, ttl=3.0)
        time.sleep(0.4)
        assert claim(store, scope, "k1", grace=0.0, ttl=3.0).outcome is ClaimOutcome.BUSY
        taken = claim(store, scope, "k1", lease=0.3, grace=0.0, ttl=1.0).operation
        assert taken.crashes == 1
        time.sleep(1.3)
        again = claim(store, scope, "k1", operation_id=taken.id)
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.crashes == 0
        assert again.operation.fencing_token > taken.fencing_token


class TestLongValues:
    """Payloads, results and error messages of any length and script come back exactly as stored. (The Redis store
    keeps long values in 64-byte pieces: a piece must never end inside a character.)"""

    @staticmethod
    def text(shift: int) -> str:
        # Characters of 2, 3 and 4 UTF-8 bytes; the ASCII prefix moves them across every 64-byte boundary.
        return "x" * shift + "é€😀" * 40 + "end"

    @pytest.mark.parametrize("shift", range(4))
    def test_payload_and_result_round_trip(self, store: Store, scope: str, shift: int) -> None:
        payload = json.dumps({"note": self.text(shift)}, ensure_ascii=False)
        assert store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL, payload=payload).operation.payload == payload
        held = claim(store, scope, "k1", payload=payload).operation
        assert held.payload == payload
        store.succeed(held, held.fencing_token, json.dumps(self.text(shift), ensure_ascii=False), ttl=TTL)
        op = store.get_by_id(held.id)
        assert op is not None and (op.result, op.payload) == (self.text(shift), payload)

    @pytest.mark.parametrize("shift", range(4))
    def test_payload_of_a_claim_without_record_and_error_round_trip(self, store: Store, scope: str,
                                                                     shift: int) -> None:
        payload = json.dumps([self.text(shift)] * 3, ensure_ascii=False)
        held = claim(store, scope, "k1", payload=payload).operation
        assert held.payload == payload
        store.fail(held, held.fencing_token, ErrorInfo("Declined", self.text(shift)), ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.error == ErrorInfo("Declined", self.text(shift)) and op.payload == payload

    def test_values_as_long_as_the_default_limits_round_trip(self, store: Store, scope: str) -> None:
        """A call and a result up to the default limits (1 MiB each), an error message as long: stored, claimed
        and read back whole. (On Redis, a 1 MiB value is 16,384 pieces, more than one Lua call can be given.)"""
        big = json.dumps("€" + "x" * (DEFAULT_MAX_RESULT_BYTES - 9) + "😀", ensure_ascii=False)
        assert len(big.encode()) == DEFAULT_MAX_RESULT_BYTES
        assert store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL, payload=big).operation.payload == big
        held = claim(store, scope, "k1").operation
        store.succeed(held, held.fencing_token, big, ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.result == json.loads(big) and op.payload == big
        failed = claim(store, scope, "k2", payload=big).operation
        assert failed.payload == big
        store.fail(failed, failed.fencing_token, ErrorInfo("Declined", big), ttl=TTL)
        assert store.get(scope, "k2").error == ErrorInfo("Declined", big)  # type: ignore[union-attr]

    def test_recovery_finds_stale_operations_with_long_calls_whole(self, store: Store, scope: str) -> None:
        """Recovery publishes the call it finds: a long one (the Redis store's sweep script leaves it out and reads
        it by itself) comes back whole, beside a short one."""
        calls = {"long": json.dumps(["tasks.charge", ["é" * 100_000], {}], ensure_ascii=False),
                 "short": json.dumps(["tasks.charge", ["a"], {}]),
                 # Around the 16 pieces (1 KiB) the Redis sweep script still answers with its record.
                 **{f"medium{n}": json.dumps(["tasks.charge", ["m" * n], {}]) for n in (900, 1_000, 1_100)}}
        ops = {key: store.create(scope, key, "tasks.charge", "fp-a", ttl=TTL, payload=call).operation
               for key, call in calls.items()}
        held = claim(store, scope, "held", payload=calls["long"], lease=0.2).operation
        time.sleep(0.3)  # its lease lapses: stale as well
        stale = {op.key: op for op in store.stale(pending_after=0.0) if op.scope == scope}
        assert {key: op.payload for key, op in stale.items()} == {**calls, "held": calls["long"]}
        assert stale["long"] == ops["long"] and stale["held"].fencing_token == held.fencing_token

    def test_a_short_value_after_a_long_one_is_not_joined_to_its_leftovers(self, store: Store, scope: str) -> None:
        # An operation that expired with a long payload is re-created by a claim with a short one.
        claim(store, scope, "k1", payload=json.dumps(self.text(0)), ttl=0.3)
        time.sleep(0.5)
        held = claim(store, scope, "k1", payload='["short"]').operation
        assert held.payload == '["short"]'
        op = store.get(scope, "k1")
        assert op is not None and op.payload == '["short"]'


class TestLookup:
    def test_get_by_id_and_by_key_agree(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        assert store.get_by_id(op.id) == op == store.get(scope, "k1")

    def test_unknown_or_malformed_ids_are_none(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        assert store.get_by_id(op.id[:-1] + ("0" if op.id[-1] != "0" else "1")) is None
        assert store.get_by_id("not-an-id") is None
        assert store.get_by_id("") is None
        assert store.get(scope, "nope") is None

    def test_new_operation_needs_publishing_until_marked(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        assert op.needs_publish
        store.mark_published(op)
        again = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        assert not again.created and not again.operation.needs_publish

    def test_claim_clears_needs_publish(self, store: Store, scope: str) -> None:
        store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        assert not claim(store, scope, "k1").operation.needs_publish

    @pytest.mark.parametrize("final", [Status.SUCCEEDED, Status.FAILED])
    def test_an_operation_finished_before_any_claim_needs_no_publishing(self, store: Store, scope: str,
                                                                        final: Status) -> None:
        """A message revoked or expired before it ran fails its operation under the creation's token (and a
        transactional one may succeed with what an earlier holder committed): nothing is left to publish."""
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        succeeded = final is Status.SUCCEEDED
        store.finish(scope, "k1", op.id, op.fencing_token, final, result_json="1" if succeeded else None,
                     error=None if succeeded else ErrorInfo("Revoked", "revoked"), ttl=TTL)
        again = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        assert not again.created and again.operation.status is final
        assert not again.operation.needs_publish

    def test_abandon_removes_only_a_never_claimed_pending_operation(self, store: Store, scope: str) -> None:
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        store.abandon(op)
        assert store.get(scope, "k1") is None
        fresh = store.create(scope, "k1", "tasks.charge", "fp-b", ttl=TTL)
        assert fresh.created
        held = claim(store, scope, "k1", fp="fp-b").operation
        store.abandon(held)
        assert store.get(scope, "k1") is not None

    def test_abandon_keeps_an_operation_another_submit_published_meanwhile(self, store: Store, scope: str) -> None:
        """A publish that failed late (a broker that hung past ACCEPT_WINDOW): meanwhile the client's retry found the
        record unpublished, published it and was answered 202 with its id. Deleting it then lost accepted work: its
        Location answered 404, and another payload under the key was taken as new while the message was refused."""
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        again = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation  # the retry, which publishes
        store.mark_published(again)
        store.abandon(op)  # the first publisher, failing at last
        kept = store.get(scope, "k1")
        assert kept is not None and kept.id == op.id and kept.status is Status.PENDING

    def test_abandon_keeps_an_operation_created_longer_ago_than_it_may_remove(self, store: Store, scope: str) -> None:
        """The submit decided in time to remove its record, but its call reached the store late (a stalled store):
        meanwhile a duplicate found the record unpublished past ACCEPT_WINDOW, published it and answered its client
        with its id, its "published" mark not landed yet. The store's clock decides: it stays."""
        op = store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL).operation
        time.sleep(0.4)
        store.abandon(op, within=0.3)
        kept = store.get(scope, "k1")
        assert kept is not None and kept.id == op.id and kept.needs_publish
        store.abandon(op, within=5.0)
        assert store.get(scope, "k1") is None

    def test_purge_removes_expired_records(self, store: Store, scope: str) -> None:
        store.create(scope, "old", "tasks.charge", "fp", ttl=0.5)
        live = store.create(scope, "live", "tasks.charge", "fp", ttl=TTL).operation
        time.sleep(0.8)
        store.purge_expired()
        assert store.get(scope, "old") is None
        assert store.get(scope, "live") == live

    def test_purge_keeps_an_expired_record_until_its_token_no_longer_matters(self, store: Store, scope: str) -> None:
        # A holder stalled past its record's expiry (a zombie), then a purge, then the message redelivered: the
        # re-created record must continue the old token, or the zombie's renewal and completion would land on it.
        zombie = claim(store, scope, "k1", lease=0.3, ttl=0.5).operation
        time.sleep(0.8)
        store.purge_expired()
        again = claim(store, scope, "k1", operation_id=zombie.id)
        assert again.outcome is ClaimOutcome.CLAIMED and again.operation.id == zombie.id
        assert again.operation.fencing_token == zombie.fencing_token + 1
        assert not store.renew(zombie, zombie.fencing_token, lease=30.0, ttl=TTL)
        with pytest.raises(LeaseLost):
            store.succeed(zombie, zombie.fencing_token, '"zombie"', ttl=TTL)
        store.succeed(again.operation, again.operation.fencing_token, '"fresh"', ttl=TTL)
        op = store.get(scope, "k1")
        assert op is not None and op.result == "fresh"


class TestCost:
    def test_each_state_change_is_one_round_trip(self, store: Store, scope: str) -> None:
        store.create(scope, "k1", "tasks.charge", "fp-a", ttl=TTL)
        before = store.round_trips
        held = claim(store, scope, "k1").operation
        store.succeed(held, held.fencing_token, "null", ttl=TTL)
        executed = store.round_trips - before
        before = store.round_trips
        assert claim(store, scope, "k1").outcome is ClaimOutcome.DONE
        replay = store.round_trips - before
        limit = 2 if "mysql" not in type(store).__name__.lower() and "mysql" not in store.url else 4
        assert executed <= limit and replay <= limit // 2


class TestConcurrency:
    def test_threads_racing_on_one_key_yield_one_winner(self, store: Store, scope: str) -> None:
        outcomes: list[ClaimOutcome] = []
        barrier = threading.Barrier(8)

        def racer(i: int) -> None:
            barrier.wait()
            outcomes.append(claim(store, scope, "hot", owner=f"t{i}").outcome)

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count(ClaimOutcome.CLAIMED) == 1
        assert outcomes.count(ClaimOutcome.BUSY) == 7

    def test_duplicate_deliveries_of_one_message_racing_on_an_absent_key(self, store: Store, scope: str) -> None:
        # The same message delivered twice at once, with no record: both claims carry the same operation id, so on
        # SQL they also race on the primary key, which is not the key the upsert resolves conflicts on.
        threads, keys = 4, 150

        def race(prefix: str) -> None:
            barrier = threading.Barrier(threads)
            outcomes: dict[str, list[ClaimOutcome]] = {f"{prefix}{k}": [] for k in range(keys)}
            errors: list[BaseException] = []

            def racer() -> None:
                for key in outcomes:
                    barrier.wait()
                    try:
                        outcomes[key].append(claim(store, scope, key, operation_id=key_digest(scope, key) + "ab" * 12,
                                                   ttl=60.0).outcome)
                    except Exception as exc:  # counted below, so one error does not hide the others
                        errors.append(exc)

            workers = [threading.Thread(target=racer) for _ in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert errors == []
            for got in outcomes.values():
                assert sorted(o.value for o in got) == ["busy"] * (threads - 1) + ["claimed"], got

        race("k")
        if type(store).__name__ == "SQLStore" and store.pipelines_completions:
            # PostgreSQL claims on each thread's lane; the pooled path (pipelining off) sends the same statement
            # through SQLAlchemy, and must recognise the same race.
            store.pipelines_completions = False
            race("pool-")

    def test_processes_racing_on_one_key_yield_one_winner(self, server_store: Store, scope: str,
                                                          tmp_path: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Event()
        results = ctx.Queue()
        spec = _store_spec(server_store)
        procs = [ctx.Process(target=_claim_in_process, args=(spec, scope, start, results)) for _ in range(6)]
        for p in procs:
            p.start()
        time.sleep(1.0)  # let every child import and connect before the start signal
        start.set()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert got.count("claimed") == 1, got
        assert got.count("busy") == 5, got


def _store_spec(store: Store) -> tuple[str, dict[str, str]]:
    from idemtasks.stores.redis import RedisStore

    if isinstance(store, RedisStore):
        return services.REDIS_URL, {"namespace": store.namespace}
    from idemtasks.stores.sql import SQLStore

    assert isinstance(store, SQLStore)
    return store.engine.url.render_as_string(hide_password=False), {"table": store.table.name}


def _claim_in_process(spec: tuple[str, dict[str, str]], scope: str, start: object, results: object) -> None:
    from idemtasks.stores import open_store

    url, options = spec
    store = open_store(url, **options)
    store.get(scope, "warm-up")  # connect before the race starts
    start.wait()  # type: ignore[attr-defined]
    res = claim(store, scope, "hot")
    results.put(res.outcome.value)  # type: ignore[attr-defined]
