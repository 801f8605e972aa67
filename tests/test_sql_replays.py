"""On PostgreSQL a replay of a settled record is answered from the record as it stands: its row is neither
rewritten nor locked.

A rewrite would cost each duplicate delivery and each client retry a durable commit, and leave a dead row version
behind. ``xmin`` and ``ctid`` change with every new row version and ``xmax`` with every row lock, so a replay must
leave all three as they were. Where a write still in flight could change the answer (a completion, the "published"
flag), the statement waits for it instead, as a rewrite did. Both ways a statement reaches the server are checked: a
thread's own connection (its lane) and the pool.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from idemtasks import ClaimOutcome, ErrorInfo, IdempotencyKeyMismatch, Status
from idemtasks.identity import key_digest
from idemtasks.models import ClaimResult, Submission
from idemtasks.stores.sql import SQLStore

from .conftest import drop
from .services import POSTGRES_URL, require

pytestmark = pytest.mark.timeout(60)

TTL = 3600.0


@pytest.fixture(params=["lane", "pool"])
def pg_store(request: pytest.FixtureRequest) -> Iterator[SQLStore]:
    require("postgres")
    store = SQLStore(POSTGRES_URL, table=f"t{uuid.uuid4().hex[:12]}")
    store.pipelines_completions = request.param == "lane"
    yield store
    drop(store)


def version(store: SQLStore, scope: str, key: str) -> tuple[str, str, str]:
    """The row's version (``xmin``, ``ctid``) and its last locker (``xmax``)."""
    query = sa.text(f"SELECT xmin::text, ctid::text, xmax::text FROM {store.table.name} WHERE key_hash = :d")
    with store.engine.connect() as conn:
        row = conn.execute(query, {"d": key_digest(scope, key)}).one()
    return row[0], row[1], row[2]


def claim(store: SQLStore, key: str, fp: str = "fp-a", *, lease: float = 30.0,  # type: ignore[no-untyped-def]
          grace: float | None = None):
    return store.claim("s", key, "tasks.charge", fp, owner=uuid.uuid4().hex, lease=lease, ttl=TTL, grace=grace)


def test_a_repeated_create_of_a_published_operation_leaves_the_row_as_it_was(pg_store: SQLStore) -> None:
    first = pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)
    pg_store.mark_published(first.operation)
    published = pg_store.get("s", "k")  # also waits for this thread's pipelined flag
    before = version(pg_store, "s", "k")

    again = pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)
    with pytest.raises(IdempotencyKeyMismatch):
        pg_store.create("s", "k", "tasks.charge", "fp-b", ttl=TTL)

    assert not again.created
    assert again.operation == published
    assert version(pg_store, "s", "k") == before


def test_a_repeated_create_of_an_operation_failed_before_any_claim_leaves_the_row_as_it_was(
        pg_store: SQLStore) -> None:
    """Revoked before it ran: a client's retry is a replay read, even of a row an earlier release failed with its
    "unpublished" flag still set."""
    op = pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL).operation
    pg_store.finish("s", "k", op.id, op.fencing_token, Status.FAILED, error=ErrorInfo("Revoked", "revoked"), ttl=TTL)
    with pg_store.engine.begin() as conn:  # as an earlier release left it
        conn.execute(sa.text(f"UPDATE {pg_store.table.name} SET needs_publish = true"))
    failed = pg_store.get("s", "k")
    before = version(pg_store, "s", "k")

    again = pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)

    assert not again.created and again.operation == failed
    assert version(pg_store, "s", "k") == before


def in_flight(store: SQLStore, key: str, change: str, call: Callable[[], object]) -> object:
    """Run ``call`` while another transaction holds ``change`` to the record uncommitted, then commit it: ``call``
    must wait for the commit and answer from what it wrote."""
    answers: list[object] = []
    with store.engine.connect() as other:
        other.execute(sa.text(f"UPDATE {store.table.name} SET {change} WHERE key_hash = :d"),
                      {"d": key_digest("s", key)})
        caller = threading.Thread(target=lambda: answers.append(call()))
        caller.start()
        time.sleep(0.3)
        waited = caller.is_alive()
        other.commit()
    caller.join(10)
    assert waited, "answered from the snapshot, without waiting for the write in flight"
    return answers[0]


def test_a_repeated_create_waits_for_the_published_flag_in_flight(pg_store: SQLStore) -> None:
    """The submit that created the operation sends its "published" flag without waiting: a client's retry that
    meets the flag in flight is a replay, not a request still being accepted."""
    pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)

    again = in_flight(pg_store, "k", "needs_publish = false",
                      lambda: pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL))

    assert isinstance(again, Submission) and not again.created
    assert not again.operation.needs_publish


def test_a_busy_claim_waits_for_the_completion_in_flight(pg_store: SQLStore) -> None:
    """A duplicate that meets the holder's completion in flight hears "done", not "busy"."""
    claim(pg_store, "k")

    replay = in_flight(pg_store, "k", "status = 'succeeded', result = '42', lease_owner = NULL",
                       lambda: claim(pg_store, "k"))

    assert isinstance(replay, ClaimResult)
    assert replay.outcome is ClaimOutcome.DONE and replay.operation.result == 42


@pytest.mark.parametrize("final", [Status.SUCCEEDED, Status.FAILED])
def test_a_claim_of_a_finished_operation_leaves_the_row_as_it_was(pg_store: SQLStore, final: Status) -> None:
    op = claim(pg_store, "k").operation
    if final is Status.SUCCEEDED:
        pg_store.succeed(op, op.fencing_token, "42", ttl=TTL)
    else:
        pg_store.fail(op, op.fencing_token, ErrorInfo("CardDeclined", "no"), ttl=TTL)
    stored = pg_store.get("s", "k")
    before = version(pg_store, "s", "k")

    replays = [claim(pg_store, "k") for _ in range(3)]

    assert {r.outcome for r in replays} == {ClaimOutcome.DONE}
    assert all(r.operation == stored for r in replays)
    assert version(pg_store, "s", "k") == before


@pytest.mark.parametrize("status", [Status.PENDING, Status.RUNNING, Status.SUCCEEDED])
def test_a_claim_with_another_payload_leaves_the_row_as_it_was(pg_store: SQLStore, status: Status) -> None:
    if status is Status.PENDING:
        pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)
    else:
        op = claim(pg_store, "k").operation
        if status is Status.SUCCEEDED:
            pg_store.succeed(op, op.fencing_token, "42", ttl=TTL)
    before = version(pg_store, "s", "k")

    mismatch = claim(pg_store, "k", fp="fp-b")

    assert mismatch.outcome is ClaimOutcome.MISMATCH
    assert mismatch.operation.fingerprint == "fp-a"
    assert version(pg_store, "s", "k") == before


def test_a_claim_that_wins_writes_a_new_row_version(pg_store: SQLStore) -> None:
    """The check above can see a write: claiming a pending operation, or one whose lease ended, makes one."""
    pg_store.create("s", "k", "tasks.charge", "fp-a", ttl=TTL)
    pending = version(pg_store, "s", "k")

    first = claim(pg_store, "k", lease=0.05)
    running = version(pg_store, "s", "k")
    time.sleep(0.1)
    suspicion = claim(pg_store, "k", grace=0.0)  # the lapsed lease is marked first (see Store.claim)
    marked = version(pg_store, "s", "k")
    takeover = claim(pg_store, "k", grace=0.0)

    assert (first.outcome, suspicion.outcome, takeover.outcome) == (
        ClaimOutcome.CLAIMED, ClaimOutcome.BUSY, ClaimOutcome.CLAIMED)
    assert takeover.operation.fencing_token == first.operation.fencing_token + 1
    assert pending[:2] != running[:2] != marked[:2] != version(pg_store, "s", "k")[:2]
