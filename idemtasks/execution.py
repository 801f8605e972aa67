"""One attempt of an idempotent task: claim, then run the body, replay, or come back later.

Store round trips: an executed attempt makes two (claim, completion), a replay one (the claim). Lease renewals
happen only for bodies longer than a third of the lease.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from celery import signals
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from .config import body_on_store, sql_problem, transaction_url
from .errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdemtasksError,
    LeaseLost,
    OperationFailed,
    StoreError,
    StoreUnavailable,
)
from .identity import (
    LIMIT_OPTIONS,
    delivery_route,
    dump_json,
    fingerprint_of_call,
    load_json,
    parse_stored_call,
    retried_call,
    stored_call,
)
from .lease import Hold, keeper
from .models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status
from .stores import public_url
from .stores.base import Store, confirm_after_for, held_to
from .stores.lanes import collector

__all__ = ["HEADER", "MAX_ERROR_MESSAGE", "REQUEUE_PAUSE", "Attempt", "error_info", "header_of", "retry_payload",
           "run_attempt", "store_carried"]

logger = logging.getLogger("idemtasks.task")


def _drain_lanes_at_exit(**_: Any) -> None:
    """A prefork pool child leaves through ``os._exit``, past ``atexit``: read the answers its pipelined completions
    are still owed first, so that one whose connection broke is sent again (see :mod:`idemtasks.stores.lanes`)."""
    collector.drain_all()


signals.worker_process_shutdown.connect(_drain_lanes_at_exit, weak=False)

#: The message header that carries ``(scope, key)`` from :meth:`IdempotentTask.submit` to the worker.
HEADER = "idemtasks"


def header_of(request: Any) -> dict[str, Any]:
    """The idemtasks header of a delivery's context: among its message headers, or (as Celery sets some contexts
    up) an attribute of its own; empty if it has none. Every reader goes through here: a fingerprint read from one
    place and the key from the other would turn a submitted HTTP request into a mismatch."""
    header: dict[str, Any] = (request.headers or {}).get(HEADER) or getattr(request, HEADER, None) or {}
    return header


#: Pause (seconds) before a message whose copy the broker refused goes back to its queue (with acks_late).
REQUEUE_PAUSE = 1.0

_HOST = socket.gethostname()
_owners: tuple[int, str, itertools.count[int]] = (0, "", itertools.count())


def _new_owner() -> str:
    """A lease owner unique to this attempt: host, process, a random tag per process and a counter (a fresh UUID
    per task costs a urandom call; the tag keeps two processes that reuse a pid apart)."""
    global _owners
    pid, prefix, counter = _owners
    if pid != os.getpid():  # first use, or a forked pool child
        pid, prefix, counter = _owners = (os.getpid(), f"{_HOST}:{os.getpid()}:{secrets.token_hex(4)}:",
                                          itertools.count(1))
    return f"{prefix}{next(counter)}"
#: Longest stored error message, in characters.
MAX_ERROR_MESSAGE = 2000


def error_info(exc: BaseException) -> ErrorInfo:
    """What a failure stores: the exception's class name and message, as text every store can hold.

    A message may carry a NUL (PostgreSQL refuses it in text, and libpq would cut a parameter short at it) or a lone
    surrogate (not UTF-8), and ``str()`` of an exception may itself raise. Any of these, met at the store, would fail
    the completion and leave the operation running, to run again when its lease is out; so they are replaced here.
    """
    try:
        message = str(exc)[:MAX_ERROR_MESSAGE]
    except Exception:
        message = f"<{type(exc).__name__} whose message could not be read>"
    return ErrorInfo(_storable(type(exc).__name__), _storable(message))


def _storable(text: str) -> str:
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


#: In-process tries of a completion before it is carried over to a republished message (store outage).
_FINISH_DELAYS = (0.1, 0.5, 2.0)
#: The same for a pipelined completion that did not land. Its lease is no longer renewed (the task has moved on),
#: so it may lapse meanwhile and be suspected as soon as the store is back: like the keeper's retries, these are at
#: most RENEW_RETRY_MAX apart, so the outcome lands within the grace before a takeover.
_SETTLE_DELAYS = (0.1, 0.5, 1.0, 1.0)


@dataclass(eq=False)
class Attempt:
    """The operation a body is running for. ``fencing_token`` is what a downstream system can fence on."""

    store: Store = field(repr=False)
    operation: Operation
    ttl: float
    hold: Hold | None = field(default=None, repr=False)
    released: bool = False
    #: The delivery's context (Celery's ``task.request`` is a lookup on a thread-local stack: read it once).
    request: Any = field(default=None, repr=False)
    #: A transactional task's effects ledger, once opened (a failure is sealed in it).
    ledger: Any = field(default=None, repr=False)
    #: The task's lease, in seconds (how often the keeper tries a give-back the store could not take).
    lease: float = field(default=60.0, repr=False)

    @property
    def id(self) -> str:
        return self.operation.id

    @property
    def scope(self) -> str:
        return self.operation.scope

    @property
    def key(self) -> str:
        return self.operation.key

    @property
    def fencing_token(self) -> int:
        return self.operation.fencing_token

    @property
    def lease_lost(self) -> bool:
        """True once a renewal found that another worker took the operation over."""
        return self.hold is not None and self.hold.lost

    def finish(self, status: Status, result_json: str | None, error: ErrorInfo | None, *, again: bool = False) -> None:
        """Store the outcome, fenced on this attempt's token (see :meth:`Store.finish`)."""
        op = self.operation
        self.store.finish(op.scope, op.key, op.id, self.fencing_token, status, result_json=result_json, error=error,
                          ttl=self.ttl, again=again)

    def release(self, *, delay: float = 0.0, crashed: bool = False, payload: str | None = None) -> None:
        """Give the operation back (running → pending) for a retry due in ``delay`` seconds; ``crashed``: because
        this process is going away with the body unfinished; ``payload``: the retry's call, stored in place of the
        operation's (see :meth:`Store.release`)."""
        self.released = True
        if self.hold is not None:
            self.hold.giving_back = True  # before the store takes it: a renewal refused from then on is no takeover
        try:
            self.store.release(self.operation, self.fencing_token, ttl=self.ttl, delay=delay, crashed=crashed,
                               payload=payload)
        except LeaseLost:
            if self.hold is not None:
                self.hold.giving_back = False  # refused: taken over, which a refused renewal then rightly reports
            raise
        if self.hold is not None:
            # Given back: no lease to renew. Left to the keeper until the body returned (a retry's message still
            # being sent, on a slow broker), a renewal would find the record pending and log a takeover.
            keeper.release(self.hold)

    def release_quietly(self, *, delay: float = 0.0, crashed: bool = False, payload: str | None = None) -> None:
        """:meth:`release`, or if the store cannot take it now, have this process's lease keeper send it again until
        it lands. Left to its lease instead, the operation would be taken over once that lapsed, and the takeover
        counted as a crash: a retry or an outage waited out would then use up ``max_crashes``. Should this process
        die first, the takeover happens anyway, and is rightly counted."""
        try:
            self.release(delay=delay, crashed=crashed, payload=payload)
        except LeaseLost as exc:
            logger.warning("idemtasks: could not release operation %s: %s", self.id, exc)
        except IdemtasksError as exc:
            logger.warning("idemtasks: could not release operation %s yet: %s", self.id, exc)
            due, op, token = time.monotonic() + delay, self.operation, self.fencing_token

            def again() -> None:  # due when it was due, not delay seconds after the store came back
                self.store.release(op, token, ttl=self.ttl, delay=max(0.0, due - time.monotonic()), crashed=crashed,
                                   payload=payload)

            keeper.keep_finishing(self.store, op, token, again, lease=self.lease, ttl=self.ttl, what="give-back")


def run_attempt(task: Any, request: Any, scope: str, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ttl, lease = float(task.idempotency_ttl), float(task.lease_seconds)
    header = header_of(request)
    # A submitted message carries the fingerprint its operation was created with (which may be an HTTP request's
    # hash); other messages are identified by their arguments.
    try:
        store: Store = task.store
    except StoreError as exc:
        # Opened on first use in this process (its table created, or upgraded): a database that is down or busy
        # then must not cost the message, which Celery would otherwise ack as failed.
        _come_back_later(task, exc)
    call = None
    fp = header.get("fp")
    if fp is None:
        call = task.call_of(args, kwargs, store)
        fp = fingerprint_of_call(call)
    # What a claim that creates the record stores, for recovery: the call, where its message came from, its deadline.
    payload = None if call is None else _stored_call_of(task, request, call)
    carried = header.get("finish")
    if carried is not None:
        done = _finish_carried(task, store, scope, key, carried, ttl)
        if done is not _NOTHING:
            return done
    while True:
        try:
            claim = store.claim(scope, key, task.name, fp, owner=_new_owner(), lease=lease, ttl=ttl,
                                operation_id=request.id, payload=payload)
        except StoreError as exc:
            _come_back_later(task, exc)
        op = claim.operation
        if claim.outcome is ClaimOutcome.CLAIMED:
            attempt = Attempt(store, op, ttl, request=request, lease=lease)
            if op.attempts > 1 and _outdated(op, request):
                # A delivery older than the retry the operation was last given back for: the first message
                # redelivered (a visibility timeout, a worker lost after the retry went out), or a duplicate sent
                # back for the due time. Run, it would repeat a step the body finished before retrying, with the
                # arguments of then, and start a second chain of retries. Given back as it was found, due now: the
                # retry message, or recovery's copy of the retry's call, runs it.
                logger.info("idemtasks: delivery %d of operation %s is older than its retry %d; dropped",
                            int(request.retries or 0), op.id, stored_retries(op))
                attempt.release_quietly()
                raise Ignore()
            if task.max_crashes and _crashes(op) >= task.max_crashes:
                return _give_up(task, attempt)
            if op.payload is None and call is None:
                _keep_call(task, store, op, request, args, kwargs)
            return _execute(task, attempt, args, kwargs)
        if claim.outcome is ClaimOutcome.DONE:
            if header.get("seen") == op.fencing_token:
                # Kept under on_busy="ignore" for its follow-up work (see _wait_for_holder), and the holder it saw
                # finished: that holder sent its own. Dropped, as "ignore" would have dropped it at first.
                raise Ignore()
            return _replay(op)
        if claim.outcome is ClaimOutcome.MISMATCH:
            raise IdempotencyKeyMismatch(scope=scope, key=key, operation_id=op.id,
                                         stored_fingerprint=op.fingerprint, fingerprint=fp)
        _wait_for_holder(task, request, claim)


def stored_retries(op: Operation) -> int:
    """The retry count of the operation's last give-back for a retry (see :func:`retry_payload`), 0 if none."""
    if not op.payload or '"retries":' not in op.payload:  # the hot path: no retry since the operation was submitted
        return 0
    try:
        retries = parse_stored_call(op.payload)[3].get("retries", 0)
    except (ValueError, TypeError, AttributeError):  # a stored call this release cannot read: nothing to compare
        return 0
    return retries if isinstance(retries, int) and not isinstance(retries, bool) else 0


def _outdated(op: Operation, request: Any) -> bool:
    """Whether this delivery is older than the operation's last give-back for a retry: its retry count is lower."""
    return int(request.retries or 0) < stored_retries(op)


def _keep_call(task: Any, store: Store, op: Operation, request: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
    """The claim created the record of a submitted message whose record was gone (expired, purged, or lost by a
    store that restarted empty), and the message does not carry the call: store it, or recovery could never publish
    the operation again if this holder died (and on Redis it would stay at the head of the index, in every sweep's
    way). One more round trip, only in this case; the body runs whether or not it lands."""
    try:
        call = task.call_of(args, kwargs, store)
        store.attach_payload(op, op.fencing_token, _stored_call_of(task, request, call))
    except IdemtasksError as exc:  # arguments that cannot be stored as JSON, or the store gone for a moment
        logger.warning("idemtasks: operation %s has no stored call; recovery cannot publish it again: %s", op.id, exc)


def retry_payload(task: Any, attempt: Attempt, args: Any, kwargs: Any) -> str | None:
    """What the give-back before ``task.retry(args, kwargs)`` stores as the operation's call: the retry's arguments
    (Celery's rule: ``None`` keeps the delivery's) and count, with the stored route and callbacks. ``None``, keeping
    the stored call, if the arguments cannot be stored; a copy recovery publishes then asks for the first call again,
    as before retries stored theirs, rather than the retry going out without its give-back."""
    request = attempt.request if attempt.request is not None else task.request
    args = request.args if args is None else args
    kwargs = request.kwargs if kwargs is None else kwargs
    try:
        call = task.call_of(args, kwargs, attempt.store)
    except IdemtasksError as exc:
        logger.warning("idemtasks: operation %s keeps its stored call; the retry's cannot be stored: %s",
                       attempt.id, exc)
        return None
    retries = int(request.retries or 0) + 1
    if attempt.operation.payload:
        try:
            return retried_call(attempt.operation.payload, call, retries)
        except (ValueError, TypeError):  # a stored call this release cannot read: the retry still goes out
            logger.warning("idemtasks: operation %s has a stored call that cannot be read; the retry's replaces it "
                           "with this delivery's route", attempt.id)
    return retried_call(_stored_call_of(task, request, call), call, retries)


def _stored_call_of(task: Any, request: Any, call: str) -> str:
    options = _route_of(task, request)
    # The call's own time limits (hard, soft), which a copy recovery publishes keeps. Celery puts the task's own (or
    # the app's task_time_limit) in every message: those are left out, and a copy takes the task's as they are then.
    limits = getattr(request, "timelimit", None)
    if limits:
        own = (getattr(task, "time_limit", None), getattr(task, "soft_time_limit", None))
        options.update((option, limit) for option, limit, default in zip(LIMIT_OPTIONS, limits, own, strict=False)
                       if limit and limit != default)
    if getattr(request, "expires", None) is None:
        return stored_call(call, options)
    options["expires"] = request.expires  # the message's deadline: a copy recovery publishes keeps it
    # Read only here: one lookup in Celery's settings runs to tens of thousands of instructions.
    return stored_call(call, options, tz=task.app.conf.timezone)


def _route_of(task: Any, request: Any) -> dict[str, Any]:
    """Where this delivery came from, kept with a call the claim stores, unless it is the app's default queue and the
    task has no route of its own: a copy published without options goes there anyway, and the record stays as small
    as a submitted one."""
    route = delivery_route(request.delivery_info)
    default = task._default_route  # None: a copy without options may go elsewhere, so all of it is kept
    if default is not None and (route.get("queue") == default[0]
                                or (route.get("exchange"), route.get("routing_key")) == default[1:]):
        route = {name: value for name, value in route.items() if name == "priority"}
    return route


def _replay(op: Operation) -> Any:
    if op.status is Status.SUCCEEDED:
        return op.result
    assert op.error is not None
    raise OperationFailed(operation_id=op.id, error_type=op.error.type, error_message=op.error.message)


def _wait_for_holder(task: Any, request: Any, claim: ClaimResult) -> None:
    """A duplicate met a live or a suspected lease, or an operation not due yet. Returns to claim again (``wait``),
    or leaves by raising ``Ignore``, having republished this message when it must come back."""
    policy = task.on_busy
    countdown = float(task.busy_countdown)
    op = claim.operation
    lease_end = op.lease_expires_at or 0.0
    # Set when this message must come back at lease_end rather than be dropped, whatever on_busy says.
    keep, seen = False, None
    if op.status is Status.PENDING:
        # Given back for a retry, or submitted with a countdown, and not due yet (see DUE_SLACK): this copy came
        # early. It may be the operation's only copy (its clock ahead of the store's), so it is never dropped, and
        # never held in a worker until then: it comes back when the operation is due (eager mode waits for it).
        lease_end, keep = op.updated_at, True
    elif op.updated_at >= lease_end:
        # A lapsed lease, marked suspected (the mark's time is updated_at): taken over only once the grace is over
        # (see Store.claim). Its holder may be dead and this message the operation's only copy, so it is never
        # dropped, whatever on_busy says: it comes back when the grace ends, or sooner if retrying sooner was asked.
        lease_end, keep = op.updated_at + confirm_after_for(float(task.lease_seconds)), policy == "ignore"
    elif policy == "ignore" and not request.is_eager and _carries_follow_up(request):
        # A live lease may be a holder that has just died (a pool child SIGKILLed: with reject_on_worker_lost its
        # message comes back at once), and this message the only one that carries the follow-up work: a copy
        # recovery publishes has none of it (nor Celery's chain or chord state). Dropped, the operation would still
        # finish, by recovery, but the rest of the chain, the chord's body or the callbacks never run. So it comes
        # back when the lease ends: it then replays the outcome (and sends its follow-up work, as any replay does) or
        # finds the lease lapsed and goes on as above. Should the holder it saw finish, though, the outcome is not
        # replayed: that holder, most often this very message's first delivery, sent its follow-up work itself, and
        # a replay would send it a second time (see "seen" in run_attempt).
        keep, seen = True, op.fencing_token
    if policy == "ignore" and not keep:
        raise Ignore()

    def until_end() -> float:  # a store round trip: only where it is needed (not for a live lease's "retry")
        try:
            now = float(task.store.now())
        except StoreError:
            # The store went away since the claim answered. This message may be the operation's only copy and
            # must not fail (Celery would ack it): this host's clock only decides when it comes back, and a copy
            # that comes early is busy again. The next claim meets the outage, if it lasts, and waits it out.
            now = time.time()
        return max(0.01, lease_end - now + 0.01)

    if keep:
        policy, countdown = "retry", until_end()
    if policy == "retry" and not request.is_eager:
        _republish(task, countdown, seen=seen)
    # "wait" (and eager mode, which has no queue to come back through): poll until the holder finishes or its
    # lease (or the suspicion's grace) runs out, whichever is first; the next claim then replays or takes over.
    time.sleep(max(0.01, min(countdown, until_end())))


def _carries_follow_up(request: Any) -> bool:
    """Whether a delivery carries work to run after it: callbacks (``link``, ``link_error``), the rest of a chain,
    or a chord it is a header of."""
    return bool(request.callbacks or request.errbacks or request.chain or request.chord)


def _execute(task: Any, attempt: Attempt, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    request = attempt.request
    request.idemtasks_attempt = attempt
    attempt.hold = keeper.hold(attempt.store, attempt.operation, attempt.fencing_token, lease=attempt.lease,
                               ttl=attempt.ttl)
    try:
        try:
            if task.transactional:
                result, result_json = _run_transactional(task, attempt, args, kwargs)
            else:
                result = task.run(*args, **kwargs)
                result_json = dump_json(result, what="result", limit=held_to(task.max_result_bytes, attempt.store))
        except Retry:
            raise  # retry() gave the operation back before publishing
        except (Ignore, Reject) as exc:
            _dropped(task, attempt, exc)
            raise
        except BaseException as exc:
            if attempt.released:
                raise
            if _raised_by_cold_shutdown(exc):
                # The worker going away, not the body failing (nor a passing error to retry): given back as a crash,
                # as SystemExit is below. A solo worker's cold-shutdown handler runs on the body's thread, and the
                # pool's refusal to cancel its job (NotImplementedError) surfaces in the body.
                attempt.release_quietly(crashed=True)
                raise
            # A misconfiguration (no SQL database for a transactional task) does not pass with time: never retried.
            if task.retry_on and isinstance(exc, task.retry_on) and not isinstance(exc, ConfigurationError):
                try:
                    task.retry(exc=exc, countdown=min(2.0 ** request.retries, 300.0))
                except Retry:
                    raise
                except BaseException:
                    pass
                if attempt.released:
                    # Given back, but the retry message could not be published (Celery raised Reject): it stays given
                    # back for recovery to publish, rather than stored as failed for a passing error.
                    raise
            if not isinstance(exc, Exception):
                # SystemExit/KeyboardInterrupt (or a pool's own BaseException, as gevent's time limit): the body was
                # cut short from outside, and this process is usually going away (a shutdown, or the prefork pool's
                # hard time limit, whose SIGTERM comes a moment before its SIGKILL). Given back at once rather than
                # left to its lease, and counted as a crash, as a takeover of the lease would have been.
                attempt.release_quietly(crashed=True)
                raise
            if task.transactional and (isinstance(exc, StoreUnavailable) or _database_outage(exc)):
                # The transaction's database dropped the connection (a restart, pg_terminate_backend, a failover)
                # or broke a deadlock — in the body, at BEGIN or at COMMIT: the body's writes rolled back with it.
                # An outage to ride out like the store's, never a payment stored as failed.
                _wait_for_database(task, attempt, exc)
            stored = _fail(task, attempt, error_info(exc))
            if isinstance(stored, _Committed):
                return stored.result
            raise
        _finish(task, attempt, Status.SUCCEEDED, result_json, None)
        return result
    finally:
        keeper.release(attempt.hold)
        request.idemtasks_attempt = None
        request.idemtasks_connection = None


def _raised_by_cold_shutdown(exc: BaseException) -> bool:
    """Whether ``exc`` came out of Celery's cold-shutdown signal handler (SIGQUIT, a second Ctrl-C) run on the body's
    own thread, as in a solo worker. Only that: in a threads pool the handler runs on the main thread and the
    bodies run on, and a body's own failure then is still its failure, not the worker going away."""
    from celery.worker import state

    if state.should_terminate in (None, False):  # set as the handler ends, before its error reaches the body
        return False
    # The body may have wrapped it: raise ... from, raised while handling it, or gathered it in an exception group.
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "_handle_request" and frame.f_globals.get("__name__") == "celery.apps.worker":
                return True
            tb = tb.tb_next
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        try:
            members = getattr(error, "exceptions", ())  # an exception group's
        except Exception:  # a property of some exception class's own that raises: not a group
            members = ()
        if isinstance(members, (list, tuple)):
            pending.extend(e for e in members if isinstance(e, BaseException))
    return False


def _dropped(task: Any, attempt: Attempt, exc: Ignore | Reject) -> None:
    """The body raised ``Ignore`` or ``Reject``: Celery drops this delivery (or, for ``Reject(requeue=True)``, puts
    the message back on the queue).

    Only a requeued message comes back to claim the operation again, so only then is the operation given back. A
    dropped delivery is the body's decision that this operation will not run again (a poison message): given back,
    it would stay pending, and recovery would publish it again every ``pending_after`` and run the body again,
    forever. It is stored as a terminal failure instead, which duplicates replay as ``OperationFailed``. A body that
    wants to run again later must use ``self.retry()``: a message it sent itself before raising ``Ignore`` cannot be
    told apart from any other dropped delivery. When ``retry()`` already gave the operation back (Celery raises
    ``Reject`` when it cannot publish the retry message), it stays given back: recovery publishes it again.
    """
    if attempt.released:
        return
    if isinstance(exc, Reject) and exc.requeue:
        attempt.release_quietly()
        return
    kind = "Reject" if isinstance(exc, Reject) else "Ignore"
    reason = exc.reason if isinstance(exc, Reject) else (exc.args[0] if exc.args else None)
    message = (f"the task body raised {kind}{'(requeue=False)' if kind == 'Reject' else ''}: its delivery was "
               f"dropped on purpose and the operation will not run again")
    if reason:
        message = f"{message} ({error_info(Exception(reason)).message})"
    # Should a zombie's effects have committed meanwhile, _fail stores them as the outcome; Celery still drops
    # this delivery.
    _fail(task, attempt, ErrorInfo(kind, message[:MAX_ERROR_MESSAGE]))


def _crashes(op: Operation) -> int:
    """The deaths counted for ``op`` since it was created: at most one per earlier attempt.

    The bound matters while workers of a release that predates the count run beside newer ones on a SQL store: an
    older process that re-creates an expired record (a key reused after its TTL) keeps the column's value, which
    belongs to the operation that expired, but resets ``attempts``."""
    return min(op.crashes, op.attempts - 1)


def _give_up(task: Any, attempt: Attempt) -> Any:
    """The holders of this operation died ``max_crashes`` times with its body running: store it as failed rather
    than start the body again (see :data:`~idemtasks.config.DEFAULT_MAX_CRASHES`). A transactional task first looks
    in its ledger, where a holder that died after its commit left the outcome, and seals the failure there."""
    op = attempt.operation
    error = ErrorInfo("TooManyCrashes", f"{_crashes(op)} holders of this operation died before its body finished "
                                        f"(killed, out of memory, past the hard time limit, or shut down); with "
                                        f"max_crashes={task.max_crashes}, the body is not started again")
    if task.transactional:
        try:
            attempt.ledger = transaction_ledger(task)
        except StoreError as exc:
            # Whether a holder committed cannot be told, and the failure cannot be sealed against a late one: never
            # store it blind. Given back (not a crash), and this message comes back to look again.
            _wait_for_database(task, attempt, exc)
        except Exception as exc:  # misconfigured (as in the body's path): no holder could have committed anything
            logger.warning("idemtasks: operation %s: no transaction database to look in: %s", op.id, exc)
    stored = _fail(task, attempt, error)
    if isinstance(stored, _Committed):
        logger.warning("idemtasks: operation %s of %s: its holders kept dying, but one had committed its effects "
                       "first; that result is the outcome", op.id, task.name)
        return stored.result
    logger.error("idemtasks: operation %s of %s failed: %s", op.id, task.name, stored.message)
    raise OperationFailed(operation_id=op.id, error_type=stored.type, error_message=stored.message)


@dataclass(frozen=True, slots=True)
class _Committed:
    """What :func:`_fail` stored instead of the failure: the result a holder had committed."""

    result: Any


def _fail(task: Any, attempt: Attempt, error: ErrorInfo) -> ErrorInfo | _Committed:
    """Store a terminal failure; return the failure stored, or the committed result that was stored instead.

    A transactional task seals the failure in its ledger first (:meth:`~idemtasks.effects.EffectsLedger.
    seal_failure`): a holder that lost its lease but kept running may commit its effects at any moment, and the
    operation must not be stored as failed with a payment committed. If such a commit came first, its result is
    the outcome; once the failure is sealed, a later one collides and rolls back.
    """
    if attempt.ledger is not None:  # not opened (a misconfigured URL): no holder could have committed anything
        from .effects import sealed_outcome

        try:
            outcome = sealed_outcome(attempt.ledger, attempt.id, attempt.fencing_token, error)
        except StoreError as exc:
            # Whether effects committed cannot be told: never store the failure blind. The next attempt looks in
            # the ledger before it runs the body.
            _wait_for_database(task, attempt, exc)
        if isinstance(outcome, str):
            logger.warning("idemtasks: operation %s failed (%s) but a previous holder had committed its effects; "
                           "its result is the outcome", attempt.id, error.type)
            _finish(task, attempt, Status.SUCCEEDED, outcome, None)
            return _Committed(load_json(outcome))
        error = outcome  # ours, or the failure an earlier holder sealed before it died
    _finish(task, attempt, Status.FAILED, None, error)
    return error


def _run_transactional(task: Any, attempt: Attempt, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str]:
    ledger = attempt.ledger = transaction_ledger(task)
    if attempt.operation.attempts > 1:
        # A previous holder may have committed its effects (or sealed its failure) and died before completing the
        # operation.
        prior = ledger.lookup(attempt.id)
        if prior is not None:
            return _adopt(attempt, prior)
    try:
        with ledger.transaction() as conn:
            attempt.request.idemtasks_connection = conn
            result = task.run(*args, **kwargs)
            limit = held_to(held_to(task.max_result_bytes, attempt.store), ledger)  # the ledger's server too
            result_json = dump_json(result, what="result", limit=limit)
            prior = ledger.record(conn, attempt.id, attempt.fencing_token, result_json)
            if prior is not None:
                raise _AlreadyCommitted(prior)  # rolls this holder's writes back
    except _AlreadyCommitted as done:
        return _adopt(attempt, done.result_json)
    return result, result_json


def _adopt(attempt: Attempt, marker: str) -> tuple[Any, str]:
    """What another holder committed for this operation: its result, or the failure it sealed (raised, so that
    the failure path stores it: see :func:`_fail`)."""
    from .effects import failure_of

    failed = failure_of(marker)
    if failed is not None:
        raise OperationFailed(operation_id=attempt.id, error_type=failed[0], error_message=failed[1])
    return load_json(marker), marker


def _wait_for_database(task: Any, attempt: Attempt, exc: BaseException) -> NoReturn:
    """The transaction's database is out of reach: give the operation back (not a crash) and have this message come
    back later, as for the store's own outages."""
    attempt.release_quietly()
    _come_back_later(task, StoreUnavailable(f"transaction database unavailable: {exc}"),
                     what="the transaction's database")


def _database_outage(exc: BaseException) -> bool:
    """SQLAlchemy's errors for a lost connection, an exhausted pool or a transient server condition (not the body's
    own SQL): the same rule as the store's StoreUnavailable."""
    from .stores.sql_schema import is_outage

    return is_outage(exc)


def transaction_ledger(task: Any) -> Any:
    """The effects ledger of a transactional task, on the database its body runs in: ``transaction_url``, else its
    store's (the engine of a SQL store given as an object, or the store URL)."""
    from .effects import ledger_for, ledger_on

    if body_on_store(task):
        return ledger_on(task.store_url)
    return ledger_for(_transaction_url(task))


def _transaction_url(task: Any) -> str:
    url = transaction_url(task.name, task.transaction_url, task.store_url)
    # The settings are wrong everywhere (ConfigurationError, the operation fails); a missing driver is this host's:
    # the operation is given back, for a worker that has it (or this one, once it is installed), as in an outage.
    problem = sql_problem(url)
    if problem is not None:
        raise StoreUnavailable(f"{task.name}: the transaction database cannot be opened on this worker: {problem}")
    return url


class _AlreadyCommitted(Exception):
    def __init__(self, result_json: str) -> None:
        super().__init__("another holder committed this operation's effects first")
        self.result_json = result_json


def _finish(task: Any, attempt: Attempt, status: Status, result_json: str | None, error: ErrorInfo | None) -> None:
    """Store the outcome, fenced. A short store outage is ridden out here; a longer one is carried over to a
    republished copy of this message, which completes the operation without running the body again.

    Where the store pipelines completions (Redis, PostgreSQL), the outcome is written without waiting for the
    answer, which is read before the next claim; what then turns out not to have landed is settled by
    :func:`_settler`. Not in eager mode (the caller reads the store next), and not once a renewal found the lease
    lost (the holder must hear it).
    """
    op = attempt.operation
    store = attempt.store
    if task.pipeline_completions and store.pipelines_completions and not attempt.lease_lost \
            and not attempt.request.is_eager:
        store.finish_pipelined(op.scope, op.key, op.id, attempt.fencing_token, status, result_json=result_json,
                               error=error, ttl=attempt.ttl, settle=_settler(task, attempt, status, result_json, error))
        return
    kept = False
    try:
        for delay in (*_FINISH_DELAYS, None):
            try:
                # Sent "again" from the first try: a driver may have sent it twice already (redis-py resends a
                # command whose reply was lost). Finding exactly this outcome under this token is then success:
                # only this holder can finish under it.
                attempt.finish(status, result_json, error, again=True)
                return
            except LeaseLost:
                raise
            except StoreError as exc:
                if delay is None:
                    _keep_finishing(attempt, status, result_json, error)
                    kept = True
                    _come_back_later(task, exc, finish=_carry(attempt, status, result_json, error))
                time.sleep(delay)
    except (LeaseLost, Ignore):
        raise
    except BaseException as exc:
        # Interrupted while storing the outcome: a soft time limit, raised by a signal handler at any bytecode (in
        # the statement, or in a back-off sleep), or a shutdown. The body ran, and Celery acks this message: the
        # keeper sends the outcome until it lands (a resend that finds it landed says so), or the lease would lapse
        # and recovery would run the body again. A process going away (SystemExit, KeyboardInterrupt) takes the
        # keeper's thread with it: one more try here first. (The pipelined path settles an interrupted write itself.)
        if not kept:
            _keep_interrupted(exc, attempt, status, result_json, error)
        raise


def _keep_interrupted(exc: BaseException, attempt: Attempt, status: Status, result_json: str | None,
                      error: ErrorInfo | None) -> None:
    """The keeper takes over an outcome whose storing was interrupted; a process going away gets one try first."""
    if isinstance(exc, Exception) or not _finished_at_once(attempt, status, result_json, error):
        _keep_finishing(attempt, status, result_json, error)


def _finished_at_once(attempt: Attempt, status: Status, result_json: str | None, error: ErrorInfo | None) -> bool:
    try:
        attempt.finish(status, result_json, error, again=True)
    except IdemtasksError:  # refused (taken over: nothing to keep), or the store still away: the keeper tries on
        return False
    return True


def _keep_finishing(attempt: Attempt, status: Status, result_json: str | None, error: ErrorInfo | None) -> None:
    """Have the lease keeper of this process try the completion again until it lands, while it is also carried over
    in a republished message.

    Through an outage longer than the lease, nothing renews the lease: when the store is back, recovery would find it
    lapsed and take the operation over, and the body would run again before the carried message (which backs off up
    to ``store_retry_max_delay``) arrives. The keeper tries at least every second, and a completion lands on a
    record still running under its token even after its lease lapsed; recovery needs two sweeps, ``confirm_after``
    apart, to take an operation over, so the completion is stored first (and it still lands after a takeover until
    a claim moves the token on). Should this process die meanwhile, the carried message still completes the
    operation, unless the copy that recovery published claimed it first.
    """
    def again() -> None:
        attempt.finish(status, result_json, error, again=True)

    keeper.keep_finishing(attempt.store, attempt.operation, attempt.fencing_token, again, lease=attempt.lease,
                          ttl=attempt.ttl)


def _carry(attempt: Attempt, status: Status, result_json: str | None, error: ErrorInfo | None) -> dict[str, Any]:
    return {"id": attempt.id, "token": attempt.fencing_token, "status": status.value, "result": result_json,
            "error": None if error is None else [error.type, error.message]}


def _settler(task: Any, attempt: Attempt, status: Status, result_json: str | None,
             error: ErrorInfo | None) -> Callable[[BaseException], None]:
    """What to do, later and from another thread, with a pipelined completion that did not land (``exc`` says why:
    a refusal, the store away, or an interruption of the thread that was sending it again)."""
    request = attempt.request  # this delivery's context: it outlives the call, for a republish

    def settle(exc: BaseException) -> None:
        op = attempt.operation
        if not isinstance(exc, IdemtasksError):
            _keep_interrupted(exc, attempt, status, result_json, error)
            return
        try:
            for delay in (*_SETTLE_DELAYS, None):
                if isinstance(exc, LeaseLost):
                    logger.error("idemtasks: operation %s was taken over before this attempt's outcome was stored "
                                 "(fencing token %d is stale); the outcome was discarded", op.id,
                                 attempt.fencing_token)
                    return
                if delay is None:
                    break
                time.sleep(delay)
                try:
                    with attempt.store.promptly():  # a resend lost in flight gives way to the next (_SETTLE_DELAYS)
                        attempt.finish(status, result_json, error, again=True)
                    return
                except IdemtasksError as again:
                    exc = again
        except BaseException as stop:
            # Settled in the thread of a later task (its claim read this answer), whose soft time limit or shutdown
            # may land in these sleeps and resends: the keeper takes the outcome over before that goes on.
            _keep_interrupted(stop, attempt, status, result_json, error)
            raise
        _keep_finishing(attempt, status, result_json, error)
        try:
            _come_back_later(task, exc, finish=_carry(attempt, status, result_json, error), request=request,
                             in_delivery=False)
        except Ignore:
            pass
        except SoftTimeLimitExceeded:
            raise  # meant for the task whose thread settles this; the keeper holds the outcome already
        except Exception as publish_exc:
            # Neither the store nor the broker: only this process's keeper still holds the outcome.
            logger.error("idemtasks: the outcome of operation %s could not be stored (%s) nor carried over (%s); "
                         "this process keeps trying to store it", op.id, exc, publish_exc)

    return settle


_NOTHING = object()


def store_carried(store: Store, scope: str, key: str, carried: dict[str, Any],
                  ttl: float) -> tuple[Status, ErrorInfo | None]:
    """Store a completion carried in a message (see :func:`_carry`); raises ``LeaseLost`` or ``StoreError``."""
    status = Status(carried["status"])
    error = None if carried["error"] is None else ErrorInfo(*carried["error"])
    store.finish(scope, key, carried["id"], carried["token"], status, result_json=carried["result"], error=error,
                 ttl=ttl, again=True)
    return status, error


def _finish_carried(task: Any, store: Store, scope: str, key: str, carried: dict[str, Any], ttl: float) -> Any:
    try:
        status, error = store_carried(store, scope, key, carried, ttl)
    except LeaseLost:
        return _NOTHING  # taken over meanwhile: claim normally, which replays or waits for the new holder
    except StoreError as exc:
        _come_back_later(task, exc, finish=carried)
    if status is Status.SUCCEEDED:
        return load_json(carried["result"])
    raise OperationFailed(operation_id=carried["id"], error_type=error.type if error else "Error",
                          error_message=error.message if error else "")


def _come_back_later(task: Any, exc: IdemtasksError, *, finish: dict[str, Any] | None = None,
                     request: Any = None, in_delivery: bool = True, what: str | None = None) -> NoReturn:
    """The store is unreachable or failed: never run the body unclaimed; publish this message again with back-off."""
    request = request or task.request
    if request.is_eager:
        raise exc
    outages = int(header_of(request).get("outages", 0)) + 1
    countdown = min(float(task.store_retry_max_delay), 0.5 * 2.0 ** outages)
    # A store that refuses (a missing table, a permission) is waited out like an outage: its message is never lost,
    # and the log says which of the two it was.
    # ``what`` failed: the store by default, or the transaction's database, which the log must not blame on the store
    how = "unreachable" if isinstance(exc, StoreUnavailable) else "failed"
    logger.error("idemtasks: %s %s for %s[%s] (%s); the body did not run%s, trying again in %.1fs",
                 what or f"store {_store_label(task)}", how, task.name, request.id, exc,
                 "" if finish is None else " again", countdown)
    _republish(task, countdown, request=request, in_delivery=in_delivery, outages=outages, finish=finish)


def _store_label(task: Any) -> str:
    """The task's store for a log line, without opening it (it may be what failed to open)."""
    url = task.store_url
    return url.url if isinstance(url, Store) else public_url(str(url))


def _republish(task: Any, countdown: float, *, request: Any = None, in_delivery: bool = True,
               **extra: Any) -> NoReturn:
    """Send this same message (same task id, same retry count) again later, and drop this delivery. ``in_delivery``:
    called while the delivery runs (not later, from the collector thread, once it was acknowledged)."""
    request = request or task.request
    headers = dict(request.headers or {})
    header = dict(header_of(request))
    header.update({k: v for k, v in extra.items() if v is not None})
    headers[HEADER] = header
    sig = task.signature_from_request(request, countdown=countdown, retries=request.retries, headers=headers)
    try:
        sig.apply_async()
    except Exception as exc:
        if not (in_delivery and task.acks_late):
            raise  # acknowledged already (early acks, or a completion settled later): nothing to hand back
        # The broker refused the copy too (store and broker away together). Failing here would have Celery ack this
        # message as failed, and a message sent without submit whose claim never landed has no record for recovery
        # to find: it is handed back to the broker instead, after a pause, so that a worker does not spin on it
        # while both are away. (A broker's redelivery limit, as on quorum queues, then counts these returns.)
        logger.error("idemtasks: could not publish %s[%s] again (%s); it goes back to its queue", task.name,
                     request.id, exc)
        time.sleep(REQUEUE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    raise Ignore()
