"""The store contract: public operations here, a few atomic primitives in each backend.

A backend implements only what must be atomic, each primitive in one round trip where the server allows it:

* ``_create``  insert a pending operation unless a live one holds the key (submit);
* ``_claim``   pending/absent/expired/dead-lease → running under a new lease and a higher fencing token (worker);
  taking a dead lease over counts a crash (``crashes``), as recovery's ``_requeue`` and a ``crashed`` release do;
* ``_finish``  running → succeeded/failed, or → pending for a retry, only while the caller's token is current (a
  record recovery gave back to pending keeps its token until a claim moves it on: the holder it was taken from may
  still complete it, and the copy that recovery published then replays instead of running the body again);
* ``_renew``   push a live lease further, fenced;
* ``_stale``   list what recovery must publish again; ``_requeue`` suspect, then give back, a dead holder's
  operation (fenced; see :meth:`Store.requeue`);
* ``_mark_published`` clear ``needs_publish`` once the message of a new operation reached the broker;
* ``_abandon`` delete a new operation whose message could not be published, so a retry starts afresh;
* ``_attach_payload`` give the holder's call to a record a claim created without one;
* ``_get``     read one record by its ``(scope, key)`` digest.

A duplicate, a busy lease or a stale token are ordinary return values; only infrastructure failures raise
(:class:`~idemtasks.errors.StoreUnavailable` / :class:`~idemtasks.errors.StoreError`).

Every record expires ``ttl`` seconds after its last write, so an operation can never expire while a worker is
still renewing its lease; an expired record is treated as absent everywhere.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ACCEPT_WINDOW
from ..errors import IdempotencyKeyMismatch, IdemtasksError, LeaseLost
from ..identity import digest_from_id, key_digest, load_json, new_operation_id
from ..models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status, Submission, Takeover

__all__ = ["ABANDON_WITHIN", "DUE_SLACK", "MIN_CONFIRM_AFTER", "PURGE_GRACE", "RENEW_TIMEOUT", "ClaimRequest",
           "CreateRequest", "FinishRequest", "Store", "confirm_after_for", "decide_claim", "decide_create", "is_stale",
           "takeover_phase"]

#: Seconds an expired record is kept before :meth:`Store.purge_expired` deletes it: as long as Redis keeps an expired
#: record's key (``KEEP_MS`` in :mod:`.redis_scripts`). A claim that re-creates an expired record continues its
#: fencing token; one that finds no record at all starts again at 1, which a holder of the old record (a worker
#: stalled past the expiry, whose message was redelivered) may hold too, so that its renewals and completion would be
#: accepted and the new holder's refused.
PURGE_GRACE = 600.0

#: Seconds after its creation (on the store's clock) past which :meth:`Store.abandon` keeps a record: a second short of
#: ACCEPT_WINDOW, from which a duplicate finding it unpublished takes it over (publishes it and answers with its id).
#: A submit counts the same window on its own clock (``task.abandon_deadline``), which never agrees with the store's:
#: hence the second.
ABANDON_WITHIN = ACCEPT_WINDOW - 1.0

#: Fewest seconds between suspecting a lapsed lease and taking the operation over (by a claim or by recovery): twice
#: the keeper's longest wait between renewal retries (:data:`idemtasks.lease.RENEW_RETRY_MAX`), so a holder that lost
#: the store only for a while renews within the grace, with a retry and a round trip to spare.
MIN_CONFIRM_AFTER = 2.0

#: Longest wait (seconds) for the answer to a lease renewal, where the store can bound it (Redis: the renewals' socket
#: timeout; PostgreSQL and MariaDB: see :mod:`.sql_bounded`), before the keeper gives it up and sends it again on a new
#: connection. A renewal sent while the network dropped packets waits for an answer that never comes; waiting the
#: store's usual timeout (5 s on Redis, times redis-py's retries) could outlast the grace of :data:`MIN_CONFIRM_AFTER`
#: after the network is back, and a live holder would be taken over. This, plus the keeper's longest pause between
#: retries, is under that grace.
RENEW_TIMEOUT = 0.5

#: Seconds before its due time (``updated_at``) a pending operation may already be claimed. An operation given back
#: for a retry, or submitted with a countdown, is due later: a copy of its message that arrives sooner (a duplicate
#: delivery, a busy copy coming back) must not run the body early, nor start a second chain of retries beside the
#: scheduled one. The slack covers the message that *is* due, which Celery sends a moment before the store records
#: its due time, and the clocks of worker and store, which never agree exactly.
DUE_SLACK = 1.0


def confirm_after_for(lease: float) -> float:
    """Seconds a suspected operation of a task with this lease waits for a renewal before it is taken over.

    It must exceed the time a live holder needs to renew once the store answers again: the keeper retries a failed
    renewal every ``lease / 10`` but at most :data:`~idemtasks.lease.RENEW_RETRY_MAX` apart, so
    :data:`MIN_CONFIRM_AFTER` covers it. For long leases, a third of the lease (a healthy keeper's renewal period)
    keeps the grace in proportion, at little cost next to the lease a dead holder's operation already waited.
    """
    return max(MIN_CONFIRM_AFTER, lease / 3)


@dataclass(frozen=True, slots=True)
class CreateRequest:
    digest: str
    scope: str
    key: str
    task_name: str
    fingerprint: str
    new_id: str
    ttl: float
    payload: str | None = None
    delay: float = 0.0  # seconds until the message is due: updated_at is set that far ahead (see Store.create)


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    digest: str
    scope: str
    key: str
    task_name: str
    fingerprint: str
    new_id: str  # used only when the claim has to create the record (absent or expired)
    owner: str  # unique per attempt: how a backend tells its own win from somebody else's record
    lease: float
    ttl: float
    payload: str | None = None
    grace: float = 0.0  # seconds a suspected lapsed lease is left to its holder (see Store.claim)


@dataclass(frozen=True, slots=True)
class FinishRequest:
    digest: str
    operation_id: str
    token: int
    status: Status  # SUCCEEDED, FAILED, or PENDING for a release
    result: str | None  # JSON text
    error: ErrorInfo | None
    ttl: float
    #: A release only: seconds until the retry's message is due. Recovery's clock for a pending record starts from
    #: its ``updated_at``, which is set that far ahead, so the sweeper does not publish a copy before the retry runs.
    delay: float = 0.0
    #: A release only: the holder is going away with the body unfinished (``SystemExit``), which counts as a crash
    #: (see :attr:`Operation.crashes <idemtasks.models.Operation.crashes>`) if the record is still running.
    crashed: bool = False
    #: A release only: the call recovery publishes from now on, replacing the stored one (a retry's arguments and
    #: count, see :func:`~idemtasks.identity.retried_call`); ``None`` keeps it.
    payload: str | None = None


def held_to(limit: int | None, store: Any) -> int | None:
    """A task's size limit (``max_result_bytes``, ``max_args_bytes``), held to what ``store``'s server can take (see
    :attr:`Store.value_limit`)."""
    server: int | None = getattr(store, "value_limit", None)
    if server is None:
        return limit
    return server if limit is None else min(limit, server)


def is_stale(op: Operation, now: float, pending_after: float) -> bool:
    """What :meth:`Store.stale` returns, for backends that decide in Python: live, and pending since ``pending_after``
    seconds or more and past the back-off recovery's last copy set (a pending record's ``lease_expires_at``, see
    :meth:`Store.mark_published`), or running under a lease that ran out."""
    if op.expires_at <= now:
        return False
    if op.status is Status.PENDING:
        return op.updated_at <= now - pending_after and (op.lease_expires_at or 0.0) <= now
    return op.status is Status.RUNNING and (op.lease_expires_at or 0.0) <= now


def takeover_phase(op: Operation, now: float, grace: float) -> str:
    """Where a running operation stands in the two-phase takeover of a lapsed lease (see :meth:`Store.requeue`):
    ``"live"`` (its lease has not run out), ``"mark"`` (lapsed and not suspected since its last claim or renewal:
    mark it now, take nothing yet), ``"wait"`` (suspected, but the holder's ``grace`` is not over) or ``"take"``."""
    lease = op.lease_expires_at or 0.0
    if lease > now:
        return "live"
    if op.updated_at < lease:  # the mark is updated_at >= lease_expires_at; a renewal moves the lease past it
        return "mark"
    return "wait" if op.updated_at > now - grace else "take"


def decide_create(current: Operation | None, req: CreateRequest, now: float) -> tuple[Operation, bool]:
    """Reference semantics of ``_create`` for backends that decide in Python under a lock or row lock."""
    if current is not None and current.expires_at > now:
        return current, False
    op = Operation(
        id=req.new_id, scope=req.scope, key=req.key, task_name=req.task_name, fingerprint=req.fingerprint,
        status=Status.PENDING, result=None, error=None, attempts=0, fencing_token=0, lease_owner=None,
        lease_expires_at=None, created_at=now, updated_at=now + req.delay, expires_at=now + req.ttl, needs_publish=True,
        payload=req.payload,
    )
    return op, True


def decide_claim(current: Operation | None, req: ClaimRequest, now: float) -> tuple[ClaimOutcome, Operation]:
    """Reference semantics of ``_claim``; the Redis script and the SQL statement encode the same table."""
    if current is None or current.expires_at <= now:
        op, _ = decide_create(None, CreateRequest(
            req.digest, req.scope, req.key, req.task_name, req.fingerprint, req.new_id, req.ttl, req.payload), now)
        # An expired record's token carries on: a holder of the old record never shares a token with the new one.
        current = op if current is None else dataclasses.replace(op, fencing_token=current.fencing_token)
    elif current.fingerprint != req.fingerprint:
        return ClaimOutcome.MISMATCH, current
    elif current.status.is_final:
        return ClaimOutcome.DONE, current
    elif current.status is Status.PENDING and current.updated_at > now + DUE_SLACK:
        return ClaimOutcome.BUSY, current  # not due yet (see DUE_SLACK)
    elif (current.status is Status.RUNNING and current.lease_owner == req.owner
          and (current.lease_expires_at or 0.0) > now):
        # This very claim, sent again because its answer was lost (owners are unique per attempt): it landed. Its
        # lease starts again from now, as a claim's does: what was left of it may end before the holder's first
        # renewal, a third of a lease away. A lapsed one is not handed back: another claim may be taking it over.
        return ClaimOutcome.CLAIMED, dataclasses.replace(current, lease_expires_at=now + req.lease,
                                                         expires_at=now + req.ttl)
    elif current.status is Status.RUNNING and (phase := takeover_phase(current, now, req.grace)) != "take":
        return ClaimOutcome.BUSY, dataclasses.replace(current, updated_at=now) if phase == "mark" else current
    # Taking a running record over means its holder died (or stayed cut off through lease and grace): one crash. A
    # record never claimed has none: a count there was left by a release that predates it, re-creating an expired
    # record without knowing the column (see execution._crashes).
    claimed = dataclasses.replace(
        current, status=Status.RUNNING, attempts=current.attempts + 1, fencing_token=current.fencing_token + 1,
        lease_owner=req.owner, lease_expires_at=now + req.lease, updated_at=now, expires_at=now + req.ttl,
        needs_publish=False,
        crashes=0 if current.attempts == 0 else current.crashes + (current.status is Status.RUNNING),
    )
    return ClaimOutcome.CLAIMED, claimed


class Store(abc.ABC):
    """Where operations live. Thread-safe; after a fork, each process opens its own connections."""

    #: The URL this store was opened from (without a password), for logs and diagnostics.
    url: str = ""

    @property
    def where(self) -> str | None:
        """Where operations are kept: the URL, and the namespace or table in it, or ``None`` when not known (a store
        of another kind, such as a wrapper around one of these, which compares by ``url``).

        Two stores with the same ``where`` see the same operations; the URL alone does not say so."""
        return None

    def same_place(self, other: Store) -> bool:
        """Whether ``other`` keeps its operations where this store does, as far as both can tell."""
        if self.where is None or other.where is None:
            return self.url == other.url
        return self.where == other.where

    def __init__(self) -> None:
        #: Store round trips made by this instance; tests and benchmarks read it to check the cost per task.
        self.round_trips = 0

    # ----------------------------------------------------------------- public operations

    def create(self, scope: str, key: str, task_name: str, fingerprint: str, *, ttl: float,
               payload: str | None = None, delay: float = 0.0) -> Submission:
        """Record a pending operation for ``(scope, key)``, or return the live one (``created=False``).

        ``payload`` is the call (:func:`~idemtasks.identity.canonical_call`), kept for recovery. ``delay``: seconds
        until its message is due (a countdown or ETA); ``updated_at`` is set that far ahead, so recovery waits
        ``pending_after`` from then even if the "published" mark (:meth:`mark_published`) never lands.
        Raises :class:`IdempotencyKeyMismatch` when the live operation was created for another payload.
        """
        digest = key_digest(scope, key)
        req = CreateRequest(digest, scope, key, task_name, fingerprint, new_operation_id(digest), ttl, payload,
                            max(0.0, delay))
        op, created = self._create(req)
        if not created and op.fingerprint != fingerprint:
            raise IdempotencyKeyMismatch(
                scope=scope, key=key, operation_id=op.id, stored_fingerprint=op.fingerprint, fingerprint=fingerprint
            )
        return Submission(op, created)

    def claim(
        self, scope: str, key: str, task_name: str, fingerprint: str, *,
        owner: str, lease: float, ttl: float, operation_id: str | None = None, payload: str | None = None,
        grace: float | None = None,
    ) -> ClaimResult:
        """Try to become the holder of ``(scope, key)``; the outcome says whether the body may run.

        ``owner`` must be unique to the attempt: the same claim sent again (its answer lost) is told from another's
        by it, and answered as claimed under its live lease, which starts again from now.

        ``operation_id`` is the id to give the record if the claim must create it (a message whose record expired,
        or a task sent without :meth:`submit`); it is ignored when it does not belong to ``(scope, key)``.

        A running operation whose lease ran out is taken in two phases, as :meth:`requeue` does and for the same
        reason (a holder cut off by a store outage may be alive, its body still running): the first claim to find
        the lapsed lease marks the operation suspected and answers ``BUSY``; a claim succeeds only once the mark is
        ``grace`` seconds old (default :func:`confirm_after_for` of ``lease``) with no renewal since. A broker's
        redelivery, which Redis sends after its visibility timeout whether or not the first delivery still runs,
        then cannot start the body beside a live holder that merely could not renew for a while.

        A pending operation that is not due yet (given back for a retry, or submitted with a countdown: its
        ``updated_at`` is ahead) answers ``BUSY`` until :data:`DUE_SLACK` before its due time.
        """
        digest = key_digest(scope, key)
        new_id = operation_id if operation_id and digest_from_id(operation_id) == digest else new_operation_id(digest)
        grace = confirm_after_for(lease) if grace is None else max(0.0, grace)
        return self._claim(ClaimRequest(digest, scope, key, task_name, fingerprint, new_id, owner, lease, ttl,
                                        payload, grace))

    def succeed(self, op: Operation, token: int, result_json: str, *, ttl: float) -> None:
        """Store the result; raises :class:`LeaseLost` if ``token`` is no longer the current fencing token."""
        self.finish(op.scope, op.key, op.id, token, Status.SUCCEEDED, result_json=result_json, ttl=ttl)

    def fail(self, op: Operation, token: int, error: ErrorInfo, *, ttl: float) -> None:
        """Store a terminal failure; raises :class:`LeaseLost` like :meth:`succeed`."""
        self.finish(op.scope, op.key, op.id, token, Status.FAILED, error=error, ttl=ttl)

    def release(self, op: Operation, token: int, *, ttl: float, delay: float = 0.0, crashed: bool = False,
                payload: str | None = None) -> None:
        """Give the operation back (running → pending) so a retry can claim it; raises :class:`LeaseLost`.

        ``delay``: seconds until the retry's message is due (its countdown or ETA). The record's ``updated_at`` is
        set that far ahead, and recovery waits ``pending_after`` from then: a copy published sooner would run the
        body early, and start a second chain of retries beside the scheduled one. The record lives ``ttl`` beyond it.

        ``crashed``: the holder gives the operation back because its process is going away mid-body (a shutdown, or
        the pool's hard time limit, which sends ``SystemExit`` before it kills): counted in ``crashes``, as a
        takeover of its lapsed lease would have been. A retry, a requeue or an outage waited out is not a crash.

        ``payload``: the call to store in place of the operation's, in the same write: a retry's arguments and count,
        which recovery publishes if the retry message is lost. Without it, a lost retry would come back as the first
        call, from retry zero, and run again steps the body had finished.
        """
        self._settle_own_writes()
        delay = max(0.0, delay)
        self._finish_or_raise(FinishRequest(key_digest(op.scope, op.key), op.id, token, Status.PENDING, None, None,
                                            ttl + delay, delay, crashed, payload), again=False)

    def finish(self, scope: str, key: str, operation_id: str, token: int, status: Status, *,
               result_json: str | None = None, error: ErrorInfo | None = None, ttl: float, again: bool = False) -> None:
        """Move a held operation to ``status``; raises :class:`LeaseLost` when ``token`` is stale.

        ``again``: this completion was sent before and its answer lost (a dropped connection), so it may have
        landed; finding exactly it stored is then success rather than :class:`LeaseLost`. A repeat is otherwise
        refused like any completion of a finished operation.
        """
        self._settle_own_writes()
        self._finish_or_raise(FinishRequest(key_digest(scope, key), operation_id, token, status, result_json, error,
                                            ttl), again=again)

    #: Whether :meth:`finish_pipelined` can send a completion without waiting for its answer.
    pipelines_completions = False

    @property
    def value_limit(self) -> int | None:
        """The longest value (a result or a stored call, in bytes of JSON) the store's server can take, where it has
        a limit of its own (MySQL/MariaDB's ``max_allowed_packet``, learnt from the connections the store uses);
        ``None``: none known. A task's ``max_result_bytes`` and ``max_args_bytes`` are held to it as well."""
        return None

    def finish_pipelined(self, scope: str, key: str, operation_id: str, token: int, status: Status, *,
                         result_json: str | None = None, error: ErrorInfo | None = None, ttl: float,
                         settle: Callable[[BaseException], None]) -> None:
        """:meth:`finish`, without waiting for the answer where the backend can (see ``pipelines_completions``).

        What cannot be settled by sending the completion again — :class:`LeaseLost`, or a
        :class:`~idemtasks.errors.StoreError` that outlasts a resend — is passed to ``settle`` later, from another
        thread. So is an interruption of that resend (anything else it raised): the outcome is then still unknown.
        A backend that cannot pipeline finishes synchronously and raises, like :meth:`finish`.
        """
        self.finish(scope, key, operation_id, token, status, result_json=result_json, error=error, ttl=ttl)

    def _answer_resolver(self, req: FinishRequest, settle: Callable[[BaseException], None]) -> Callable[[Any], None]:
        """What a pipelining backend does with a completion's late answer: ``1`` (one record changed) is done; any
        other count is a refusal, and ``settle`` hears why; anything else (a broken connection, an error reply)
        left the outcome unknown, so the completion is sent again on the ordinary path."""

        def resolve(answer: Any) -> None:
            if answer == 1:
                return
            try:
                # Promptly: nothing renews this lease any more (its task has moved on), so a resend lost in flight
                # must give way to the settler's next try before a lapsed lease's grace is over (see RENEW_TIMEOUT).
                lost = None
                with self.promptly():
                    if isinstance(answer, int):
                        lost = self._refusal(req, again=False)
                    else:
                        self._finish_or_raise(req, again=True)
                if lost is not None:
                    settle(lost)
            except IdemtasksError as exc:
                settle(exc)
            except BaseException as exc:
                # The answer is read by whichever thread next uses the lane: often the next task's claim, whose soft
                # time limit or shutdown may land in this resend. The outcome is still unknown, and nothing else
                # holds it (the earlier task's message is acked): settle hears so first, then the interruption goes
                # on to the task it was meant for.
                settle(exc)
                raise

        return resolve

    def _finish_or_raise(self, req: FinishRequest, *, again: bool) -> None:
        if not self._finish(req) and (lost := self._refusal(req, again=again)) is not None:
            raise lost

    def _refusal(self, req: FinishRequest, *, again: bool) -> LeaseLost | None:
        """Why a completion was refused: ``LeaseLost``, or ``None`` when it was sent ``again`` and this very
        completion had landed the first time."""
        current = self._get(req.digest)
        if (again and current is not None and current.id == req.operation_id and current.status is req.status
                and current.fencing_token == req.token and current.error == req.error
                and (req.status is not Status.SUCCEEDED or current.result == load_json(req.result))):
            return None  # nobody else can finish under this token (every claim moves it on): it was this one
        return LeaseLost(
            operation_id=req.operation_id, fencing_token=req.token,
            current_token=None if current is None or current.id != req.operation_id else current.fencing_token,
        )

    def renew(self, op: Operation, token: int, *, lease: float, ttl: float) -> bool:
        """Extend a live lease; ``False`` means the caller is no longer the holder."""
        self._settle_own_writes()
        return self._renew(key_digest(op.scope, op.key), op.id, token, lease, ttl)

    def mark_published(self, op: Operation, *, delay: float = 0.0, backoff: float = 0.0) -> None:
        """Clear ``needs_publish``: the message of ``op`` is with the broker.

        ``delay``: seconds until that message is due (a countdown or ETA). As for a release, ``updated_at`` is set
        that far ahead and recovery waits ``pending_after`` from then: a copy published sooner would run the body
        before its time.

        ``backoff`` (recovery's copies only): recovery publishes the record again no sooner than that many seconds
        after it is due, even once ``pending_after`` has passed. The time is kept in the pending record's
        ``lease_expires_at``, which a pending record has no other use for; ``updated_at`` cannot carry it, since a
        claim takes it for the due time and would turn the copy itself away. 0 leaves it as it is.

        Fenced on ``op``'s token: a mark that lands after a worker claimed the operation (the publisher paused
        between its publish and this call) would otherwise undo what the claim did since, such as a retry's
        countdown, and the body would be due at once.
        """
        self._mark_published(key_digest(op.scope, op.key), op.id, op.fencing_token, max(0.0, delay), max(0.0, backoff))

    def attach_payload(self, op: Operation, token: int, payload: str) -> bool:
        """Store the call of an operation whose record a claim created without one, so that recovery can publish it
        again if its holder dies. A submitted message names its operation but does not carry the call as the record
        keeps it; when its record is gone (expired, purged, lost by a store that restarted empty) the claim creates
        a new one without it. Fenced on ``token``; a record that already holds a call keeps it. True if stored."""
        return self._attach_payload(key_digest(op.scope, op.key), op.id, token, payload)

    def abandon(self, op: Operation, *, within: float = ABANDON_WITHIN) -> None:
        """Delete ``op`` if it is still pending, never claimed and still flagged unpublished: its message could not
        be published, and a retry of the request must be free to start over rather than find a record that nothing
        will run. A record another submit (a client's retry past ACCEPT_WINDOW) or recovery published meanwhile has
        a message on the broker, and that retry was answered with its id: it stays. So does one created ``within``
        seconds ago or longer, by the store's clock: a duplicate finds a record that old abandoned by its creator,
        and may publish it and answer with its id before its "published" mark lands; this call, decided in time by
        its sender, may still reach the store after that."""
        self._settle_own_writes()
        self._abandon(key_digest(op.scope, op.key), op.id, within)

    def stale(self, *, pending_after: float, limit: int = 500) -> list[Operation]:
        """Operations that may never finish by themselves: pending and unchanged for ``pending_after`` seconds
        (and past the back-off of recovery's last copy, see :meth:`mark_published`), or running under a lease that
        ran out (see :mod:`idemtasks.recovery`)."""
        self._settle_own_writes()
        return self._stale(pending_after, limit)

    def requeue(self, op: Operation, *, confirm_after: float) -> Takeover:
        """Take a running operation whose lease ran out away from its holder, in two phases, fenced on its token.

        A lapsed lease does not prove the holder dead: during a store outage longer than the lease, a live holder
        cannot renew, and once the store is back the first sweep may reach the record before the holder's keeper
        does. So the first call only marks the operation suspected (``SUSPECTED``; it stays running). A later call
        puts it back to pending (``REQUEUED``; the token stays, so the holder may still complete it until the copy
        recovery publishes claims it) only if the lease was not renewed since the mark and the mark is at least
        ``confirm_after`` seconds old (store clock).
        A renewal or a completion in between cancels the suspicion; ``ALIVE`` means there is nothing to take over.

        The mark is kept in the record, so it holds across sweeper processes and one-shot sweeps. No extra column:
        a running record's ``updated_at`` is set by the claim and left alone by renewals, so ``updated_at <
        lease_expires_at`` while the holder is unsuspected. Marking sets ``updated_at`` to now (≥ the lapsed lease);
        a renewal sets ``lease_expires_at`` to now + lease, above it again. Hence "marked and not renewed since" is
        ``updated_at >= lease_expires_at``, and the takeover condition is ``lease_expires_at <= now`` and
        ``lease_expires_at <= updated_at <= now - confirm_after``.
        """
        self._settle_own_writes()
        return self._requeue(key_digest(op.scope, op.key), op.id, op.fencing_token, max(0.0, confirm_after))

    def get(self, scope: str, key: str) -> Operation | None:
        """The live operation for ``(scope, key)``, or ``None``."""
        self._settle_own_writes()
        return self._get(key_digest(scope, key))

    def get_by_id(self, operation_id: str) -> Operation | None:
        """The live operation with this id, or ``None`` (unknown, expired, or replaced after expiry)."""
        digest = digest_from_id(operation_id)
        if digest is None:
            return None
        self._settle_own_writes()
        op = self._get(digest)
        return op if op is not None and op.id == operation_id else None

    def _settle_own_writes(self) -> None:  # noqa: B027 - only a pipelining backend has anything to wait for
        """Wait for the answers this thread's pipelined writes still owe. Those writes went out on the thread's
        lane, the calls above go through other connections: without this, a thread could read its own completion
        as still running (PostgreSQL commits it a moment later) or act on a state it had already changed."""

    def server_warnings(self) -> list[str]:
        """What the server's own settings undermine, each a sentence saying what to change; asked once as a worker
        starts (see :mod:`idemtasks.checks`). A server that cannot say (down, or the question refused) has none."""
        return []

    def promptly(self) -> contextlib.AbstractContextManager[None]:
        """Within this context, this thread's renewals and completions wait at most :data:`RENEW_TIMEOUT` for the
        store's answer where the backend can bound the wait (Redis, PostgreSQL, MariaDB), and fail as
        :class:`StoreUnavailable` after it. The lease keeper's calls run so: it sends them again itself, on a new
        connection, within a suspected lease's grace. Renewals run so always."""
        return contextlib.nullcontext()

    def now(self) -> float:
        """The clock leases are measured with; backends with a server clock override this."""
        return time.time()

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to close
        """Release connections."""

    # ----------------------------------------------------------------- atomic primitives

    @abc.abstractmethod
    def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        """Atomically: if no live record holds ``req.digest``, write a pending one; return (record, created)."""

    @abc.abstractmethod
    def _claim(self, req: ClaimRequest) -> ClaimResult:
        """Atomically apply :func:`decide_claim` to the record at ``req.digest`` and return its outcome."""

    @abc.abstractmethod
    def _finish(self, req: FinishRequest) -> bool:
        """Atomically: if the record is ``req.operation_id`` with fencing token ``req.token``, running (or pending:
        given back by a requeue and not claimed since), move it to ``req.status`` with the result or error, clear the
        lease and reset its expiry; report whether it did. A ``crashed`` release of a running record adds one to
        ``crashes``."""

    @abc.abstractmethod
    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        """Atomically: if running with ``token``, set the lease to now + ``lease`` (and expiry to now + ``ttl``).
        Never touches ``updated_at``: a lease pushed above it is how a renewal cancels recovery's suspicion."""

    @abc.abstractmethod
    def _mark_published(self, digest: str, operation_id: str, token: int, delay: float, backoff: float) -> None:
        """If the record is ``operation_id``, still pending and not claimed since (its token is still ``token``):
        clear ``needs_publish`` and set ``updated_at`` to now plus ``delay`` (recovery's clock for pending records
        restarts with every publish, from when it is due); with ``backoff`` > 0, set ``lease_expires_at`` to that
        much later still (see :meth:`mark_published`)."""

    @abc.abstractmethod
    def _attach_payload(self, digest: str, operation_id: str, token: int, payload: str) -> bool:
        """If the live record is ``operation_id`` under ``token`` and holds no payload: store ``payload``."""

    @abc.abstractmethod
    def _abandon(self, digest: str, operation_id: str, within: float) -> None:
        """Delete the record if it is ``operation_id``, pending, never claimed (attempts 0), still flagged
        ``needs_publish``, and created less than ``within`` seconds ago (the store's clock)."""

    @abc.abstractmethod
    def _get(self, digest: str) -> Operation | None:
        """Read the live record at ``digest`` (``None`` if absent or expired)."""

    @abc.abstractmethod
    def _stale(self, pending_after: float, limit: int) -> list[Operation]:
        """Up to ``limit`` live records pending and unchanged for ``pending_after`` seconds or more and past
        recovery's back-off, or running under an expired lease, oldest first (:func:`is_stale`)."""

    @abc.abstractmethod
    def _requeue(self, digest: str, operation_id: str, token: int, confirm_after: float) -> Takeover:
        """Atomically, if running with ``token`` under an expired lease: when marked (``updated_at >=
        lease_expires_at``) at least ``confirm_after`` seconds ago, move to pending (token unchanged, ``crashes``
        plus one) and answer ``REQUEUED``; when marked more recently, change nothing; when not marked, set
        ``updated_at`` to now. Both answer ``SUSPECTED``. Otherwise change nothing and answer ``ALIVE``. See
        :meth:`Store.requeue`."""

    @abc.abstractmethod
    def purge_expired(self, *, grace: float = PURGE_GRACE) -> int:
        """Delete the records expired for more than ``grace`` seconds (see :data:`PURGE_GRACE`); return how many
        (stores with native expiry may return 0)."""
