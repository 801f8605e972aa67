"""``IdempotentTask``: a Celery base class that claims its operation on every attempt, before the body runs.

The claim happens in ``__call__``, which Celery invokes for every execution — first delivery, broker redelivery,
``retry()``, beat, ``send_task`` and eager ``apply()`` alike — so none of them can run the body unclaimed. Nothing
here depends on ``after_return`` or ``on_failure``: those hooks do not run when a pool child is SIGKILLed, and
``after_return`` is skipped for RETRY/IGNORED/REJECTED. Recovery from a dead holder rests on lease expiry alone.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Retry
from celery.utils.time import maybe_iso8601

from . import checks, config, revoked  # noqa: F401 - revoked connects the handler of discarded messages
from .config import being_accepted
from .errors import IdemtasksError, PublishFailed
from .execution import HEADER, Attempt, header_of, retry_payload, run_attempt
from .forks import fresh_in_child
from .identity import (
    absolute_expires,
    canonical_call,
    fingerprint_of_call,
    parse_stored_call,
    stored_call,
    validate_key,
    validate_scope,
)
from .models import Operation, Status, Submission
from .stores import Store, shared_store
from .stores.base import ABANDON_WITHIN, held_to

__all__ = ["IdempotentTask"]

logger = logging.getLogger("idemtasks.task")


def abandon_deadline() -> float:
    """The monotonic time until which a submit about to create a record may remove it, should its publish fail: a
    duplicate finds the record unpublished once ACCEPT_WINDOW has passed since the creation, and may then publish it
    and answer its client with its id. Taken before the create, whose answer may come late; the store keeps to the
    same window (ABANDON_WITHIN, a second short of ACCEPT_WINDOW) on its own clock."""
    return time.monotonic() + ABANDON_WITHIN


_configure_lock = threading.RLock()
fresh_in_child(sys.modules[__name__], "_configure_lock", threading.RLock)  # the parent's sweeper may hold it

#: Scope of tasks sent without ``submit`` and without ``key_func``: the Celery task id is the key, which still
#: turns broker redeliveries of one message into replays.
TASK_ID_SCOPE = "celery-task-id"


def due_in(eta: Any, countdown: float | None, default: float | None = None) -> float:
    """Seconds until a message is due, as Celery schedules it: an ETA, a countdown, or (for ``retry``) the task's
    ``default_retry_delay``. A countdown given beside an ETA wins, as in Celery, which turns it into the ETA."""
    if countdown:
        return max(0.0, float(countdown))
    if eta is not None:
        if isinstance(eta, str):  # Celery passes an ISO 8601 ETA on as it is, and its worker parses it
            eta = maybe_iso8601(eta)
        if isinstance(eta, datetime):
            now = datetime.now(eta.tzinfo) if eta.tzinfo else datetime.now(timezone.utc).replace(tzinfo=None)
            return max(0.0, (eta - now).total_seconds())
        return 0.0
    return max(0.0, float(countdown if countdown is not None else default or 0.0))


def message_due(task: Any, options: dict[str, Any]) -> float:
    """Seconds until ``task``'s message published with these ``apply_async`` options is due (its countdown or ETA;
    none in eager mode, which runs the body at once whatever the countdown)."""
    if task.app.conf.task_always_eager:
        return 0.0
    return due_in(options.get("eta"), options.get("countdown"))


def with_deadline(task: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the message's deadline (the call's ``expires``, else the task's own, which Celery applies
    too) as the time it names: the message, the stored record and any copy recovery publishes then share one
    deadline, not one counted from each publication."""
    value = options["expires"] if "expires" in options else getattr(task, "expires", None)
    deadline = None if value is None else absolute_expires(value, task.app.conf.timezone)
    return options if deadline is None else {**options, "expires": deadline}


def stored_deadline(op: Operation) -> Any:
    """The deadline stored with the operation's call (its first message's ``expires``, as a time), or ``None``."""
    return parse_stored_call(op.payload)[3].get("expires") if op.payload else None


def first_deadline(op: Operation, options: dict[str, Any]) -> dict[str, Any]:
    """For a repeat that publishes an operation's message (its first request died before doing so): the deadline
    stored with the operation, not one counted from this repeat."""
    stored = stored_deadline(op)
    return options if stored is None else {**options, "expires": stored}


def record_ttl(task: Any, due: float) -> float:
    """The TTL a submitted record is created with: ``idempotency_ttl`` beyond the time its message is ``due``, so
    that a scheduled message still finds its record when it runs, and a client's retry meanwhile is a replay."""
    return float(task.idempotency_ttl or config.DEFAULT_TTL) + due


class IdempotentTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """Base class for exactly-once tasks: ``@app.task(base=IdempotentTask, bind=True)``.

    Settings are read from ``app.conf`` (``idemtasks_*``) at bind time unless the task sets them; see
    :mod:`idemtasks.config`.
    """

    store_url: ClassVar[str | Store | None] = None
    idempotency_ttl: ClassVar[float | None] = None
    lease_seconds: ClassVar[float | None] = None
    idempotency_scope: ClassVar[str | None] = None
    on_busy: ClassVar[str | None] = None
    busy_countdown: ClassVar[float | None] = None
    store_retry_max_delay: ClassVar[float | None] = None
    max_args_bytes: ClassVar[int | None] = None
    max_result_bytes: ClassVar[int | None] = None
    pipeline_completions: ClassVar[bool | None] = None
    max_crashes: ClassVar[int | None] = None
    #: ``key_func(*args, **kwargs) -> str``: the idempotency key of a message sent without :meth:`submit`.
    key_func: ClassVar[Callable[..., str] | None] = None
    #: Exceptions retried with back-off (bounded by ``max_retries``) instead of being stored as terminal failures.
    retry_on: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Run the body inside a SQL transaction committed together with the operation's completion marker.
    transactional: ClassVar[bool] = False
    #: Database of that transaction (defaults to the store URL when the store is SQL).
    transaction_url: ClassVar[str | None] = None
    _idemtasks_configured: ClassVar[bool] = False
    #: Where a copy published without routing options goes: the app's default queue, as (queue, exchange, routing
    #: key), or ``None`` when routes of the app or the task's ``queue`` send it elsewhere. Read at bind time, like
    #: the settings: a claim reads it for every message sent without ``submit`` (see ``execution._route_of``).
    _default_route: ClassVar[tuple[str, str, str] | None] = None

    @classmethod
    def bind(cls, app: Any) -> Any:
        bound = super().bind(app)
        cls._configure(app)
        checks.watch(app)
        return bound

    @classmethod
    def _configure(cls, app: Any) -> None:
        with _configure_lock:
            if cls.__dict__.get("_idemtasks_configured"):
                return
            for attr, conf_key, default in config.SETTINGS:
                if getattr(cls, attr, None) is None:
                    setattr(cls, attr, app.conf.get(conf_key, default))
            # Also a class without a name of its own: app.register_task names the instance, not its class.
            name = getattr(cls, "name", None) or f"{cls.__module__}.{cls.__qualname__}"
            config.validate(name, {attr: getattr(cls, attr) for attr in config.VALIDATED})
            conf = app.conf
            queue = conf.task_default_queue
            cls._default_route = None if conf.task_routes or getattr(cls, "queue", None) else (
                queue, conf.task_default_exchange or queue, conf.task_default_routing_key or queue)
            cls._idemtasks_configured = True

    def _settled(self) -> None:
        # Celery binds tasks lazily, and a thread can use a task while another is still binding it: read the
        # settings here too rather than trust that bind() has finished.
        if not type(self).__dict__.get("_idemtasks_configured"):
            type(self)._configure(self.app)

    # ----------------------------------------------------------------- the worker side

    @property
    def store(self) -> Store:
        url = self.store_url
        return url if isinstance(url, Store) else shared_store(str(url))

    @property
    def operation(self) -> Attempt:
        """The running attempt: operation id, scope, key and fencing token (pass them downstream)."""
        attempt: Attempt | None = getattr(self.request, "idemtasks_attempt", None)
        if attempt is None:
            raise RuntimeError("no idempotent operation is running in this task context")
        return attempt

    @property
    def connection(self) -> Any:
        """The SQLAlchemy connection of a ``transactional`` task's body, inside its open transaction."""
        conn = getattr(self.request, "idemtasks_connection", None)
        if conn is None:
            raise RuntimeError("self.connection is only available inside the body of a transactional task")
        return conn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._settled()
        request = self.request
        if request.called_directly:
            # A plain function call: no message, nothing to deduplicate.
            return super().__call__(*args, **kwargs)
        scope, key = self._key_of(request, args, kwargs)
        return run_attempt(self, request, scope, key, args, kwargs)

    def _key_of(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        header = header_of(request)
        if header and "key" in header:  # a republished message may carry only bookkeeping (outage count)
            return header["scope"], header["key"]
        # Read through the class: a plain function given as ``key_func=`` would otherwise bind to the task.
        key_func = type(self).key_func
        if key_func is not None:
            return validate_scope(self.idempotency_scope), validate_key(key_func(*args, **kwargs))
        return TASK_ID_SCOPE, validate_key(request.id)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """Celery's ``retry``, preceded by giving the operation back so the new message can claim it.

        When the retries are exhausted Celery re-raises the error instead of publishing; the claim is then kept so
        the failure is stored as terminal.
        """
        limit = self.max_retries if max_retries is None else max_retries
        request = self.request
        attempt: Attempt | None = getattr(request, "idemtasks_attempt", None)
        if attempt is not None:
            # The retry message belongs to this operation whatever its arguments: name it in the header, or a
            # message sent without submit would be identified by the new arguments (a fingerprint mismatch, or with
            # key_func another key) and the released operation would be left pending, republished with the old
            # ones by the sweeper, forever. Celery copies the request's headers unless ``headers=`` replaces them.
            # Only the identity is carried: bookkeeping of this delivery (outage count, carried completion) is not.
            op = attempt.operation
            headers = dict(options.pop("headers", None) or request.headers or {})
            headers[HEADER] = {"scope": op.scope, "key": op.key, "fp": op.fingerprint}
            options["headers"] = headers
        if attempt is not None and not attempt.released and (limit is None or request.retries + 1 <= limit):
            # Released as due when the retry is: recovery must not publish a copy of a released operation before
            # its retry had the chance to run (a copy would run the body early and start a second chain of retries).
            # Quietly: if the store cannot take the release, the retry still goes out, and its claim waits for the
            # lease to run out (busy), then takes the operation over.
            # Eager mode runs the retry at once, in this thread, whatever its countdown: due now.
            # Given back as Celery builds the retry's signature (signature_from_request, below), before it sends it:
            # only there are the retry's arguments what Celery sends (it merges new arguments with the inherited
            # keyword arguments by parameter name), which the give-back stores for recovery.
            request.idemtasks_give_back = 0.0 if request.is_eager else due_in(eta, countdown, self.default_retry_delay)
        try:
            sent = super().retry(args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta, countdown=countdown,
                                 max_retries=max_retries, **options)
        except Retry:
            # A subclass that built the retry's signature without calling ours (below): given back now that the
            # retry went out, with the arguments given here. Its claim may come first and find the operation busy;
            # left undone, the operation would wait for its lease, then count a crash.
            self._give_back(request, args, kwargs)
            raise
        else:
            if isinstance(sent, Retry):  # throw=False: as above
                self._give_back(request, args, kwargs)
            return sent
        finally:
            if attempt is not None:
                request.idemtasks_give_back = None

    def _give_back(self, request: Any, args: Any, kwargs: Any) -> None:
        """The give-back :meth:`retry` asked for, if not made yet: once, with the retry's call (see
        :func:`~idemtasks.execution.retry_payload`)."""
        delay = getattr(request, "idemtasks_give_back", None)
        if delay is not None:
            request.idemtasks_give_back = None
            attempt: Attempt = request.idemtasks_attempt
            attempt.release_quietly(delay=delay, payload=retry_payload(self, attempt, args, kwargs))

    def call_of(self, args: Any, kwargs: Any, store: Any) -> str:
        """The call as stored and fingerprinted (:func:`~idemtasks.identity.canonical_call`), refused over
        ``max_args_bytes`` held to what ``store``'s server can take (see :func:`~idemtasks.stores.base.held_to`)."""
        return canonical_call(self.name, args, kwargs, limit=held_to(self.max_args_bytes, store))

    def _sendable(self, args: Any, kwargs: Any) -> bool:
        """Whether Celery's ``apply_async`` would accept these arguments: its check against the task's signature,
        which it makes only when ``typing`` is on."""
        check = getattr(self, "__header__", None) if self.typing else None
        if check is None:  # typing off, or a task class without Celery's header: Celery checks nothing either
            return True
        try:
            check(*(args or ()), **(kwargs or {}))
        except TypeError:
            return False
        return True

    def signature_from_request(self, request: Any = None, args: Any = None, kwargs: Any = None, queue: Any = None,
                               **extra_options: Any) -> Any:
        """Celery's, preceded, for the retry that :meth:`retry` is sending, by giving the operation back with the
        retry's call as Celery sends it. (This method serves other callers too: the give-back is made only once.)"""
        request = self.request if request is None else request
        if getattr(request, "idemtasks_give_back", None) is None or request.is_eager \
                or self._sendable(request.args if args is None else args, request.kwargs if kwargs is None else kwargs):
            self._give_back(request, args, kwargs)
        # Otherwise Celery's own check in apply_async refuses this call, and retry() turns that into
        # Reject(requeue=False): given back, the operation would stay pending with a call no copy of which can ever be
        # published (recovery would fail at every sweep); kept, it fails with that Reject. Should the retry go out
        # after all (an apply_async overridden to mend its arguments), retry() gives the operation back then. (Checked
        # only here, where the arguments are those Celery sends; an eager retry runs through apply(), which checks
        # nothing.)
        return super().signature_from_request(request, args, kwargs, queue, **extra_options)

    def replace(self, sig: Any) -> Any:
        """Refused while an operation runs, before anything is sent.

        Celery's ``replace`` sends the replacement under this task id and raises ``Ignore``: the operation's
        outcome would be decided by a message idemtasks does not claim, and no result could be stored for it (the
        replacement's is not known yet, and storing none would tell clients the payment succeeded before it ran).
        Call the follow-up work from the body, or chain it when submitting, instead. The error is the body's, so it
        is stored as the operation's terminal failure.
        """
        if getattr(self.request, "idemtasks_attempt", None) is not None:
            raise IdemtasksError(f"{self.name}: self.replace() is not supported by idempotent tasks (the replacement "
                                 "would run unclaimed and the operation could never store its outcome); nothing was "
                                 "sent")
        return super().replace(sig)

    # ----------------------------------------------------------------- the client side

    def submit(self, args: Any = None, kwargs: Any = None, *, key: str, scope: str | None = None,
               fingerprint: str | None = None, **options: Any) -> Submission:
        """Record the operation for ``(scope, key)`` and publish its message, once.

        A repeat with the same payload returns the existing operation (``created=False``) and publishes nothing;
        another payload raises :class:`~idemtasks.errors.IdempotencyKeyMismatch`. ``fingerprint`` replaces the
        hash of the arguments when something else defines "the same request" (the HTTP layer hashes the request).
        ``options`` go to ``apply_async`` (queue, countdown, …). If publishing fails, the new record is removed
        and :class:`~idemtasks.errors.PublishFailed` is raised, so submitting again starts afresh (unless it failed
        ACCEPT_WINDOW or more after the creation began: a duplicate may have published the record since, and it is
        kept).

        With a ``countdown`` or ``eta`` the record lives ``idempotency_ttl`` beyond the time the message is due, and
        recovery waits ``idemtasks_pending_after`` from that time before it presumes the message lost.
        """
        self._settled()
        key = validate_key(key)
        scope = validate_scope(scope if scope is not None else self.idempotency_scope)
        store = self.store
        call = self.call_of(args, kwargs, store)
        fp = fingerprint or fingerprint_of_call(call)
        # The due time goes with the record as well as with the "published" mark: should the mark fail, recovery
        # still waits for the message's time before it presumes the message lost.
        due = message_due(self, options)
        options = with_deadline(self, options)
        payload = stored_call(call, options)  # its deadline already a time, with its offset (with_deadline)
        abandon_by = abandon_deadline()  # counted from before the create, whose answer may come late
        sub = store.create(scope, key, self.name, fp, ttl=record_ttl(self, due), payload=payload, delay=due)
        op = sub.operation
        if sub.created:
            self.publish(op, args, kwargs, abandon_by=abandon_by, due=due, **options)
        elif op.status is Status.PENDING and op.needs_publish:
            # Created by a request that died before publishing, once it had ACCEPT_WINDOW to do so: the claim makes
            # a second copy harmless. The reading goes with the answer (an HTTP 409 or a replay is decided on it).
            checked_at = store.now()
            sub = dataclasses.replace(sub, checked_at=checked_at)
            if not being_accepted(op, checked_at):
                self.publish(op, args, kwargs, due=due, **first_deadline(op, options))
        return sub

    def publish(self, op: Operation, args: Any, kwargs: Any, *, abandon_by: float | None = None,
                due: float | None = None, backoff: float = 0.0, **options: Any) -> None:
        """Publish the message of a recorded operation (used by :meth:`submit` and by recovery). ``due``: seconds
        until the message is due, if the caller has already read it from ``options``. ``backoff``: recovery's, see
        :meth:`Store.mark_published <idemtasks.stores.base.Store.mark_published>`. ``abandon_by``: the
        :func:`abandon_deadline` of the caller that created ``op``, which removes it if its publish fails sooner."""
        headers = {**options.pop("headers", {}), HEADER: {"scope": op.scope, "key": op.key, "fp": op.fingerprint}}
        if self.app.conf.task_always_eager:
            # Eager mode runs the body right here: what it raises is the body's outcome, not a publishing failure.
            self.apply_async(args, kwargs, task_id=op.id, headers=headers, **options)
            return
        if due is None or options.get("eta") is not None:  # an ETA is counted from now, after the create
            due = due_in(options.get("eta"), options.get("countdown"))
        try:
            self.apply_async(args, kwargs, task_id=op.id, headers=headers, **options)
        except Exception as exc:
            if abandon_by is not None and time.monotonic() >= abandon_by:
                # Past ACCEPT_WINDOW since the creation: a duplicate may have found the record unpublished since,
                # and be publishing it now (its "published" mark not landed yet), its client answered with this id.
                # Left pending and flagged for that duplicate, the client's retry, or recovery.
                logger.warning("idemtasks: operation %s kept after its publish failed late: a duplicate may have "
                               "published it meanwhile", op.id)
            elif abandon_by is not None:
                try:
                    self.store.abandon(op)
                except IdemtasksError as cleanup_exc:
                    # Left pending and flagged: a repeat after ACCEPT_WINDOW (or the sweeper) publishes it.
                    logger.error("idemtasks: could not remove unpublished operation %s: %s", op.id, cleanup_exc)
            raise PublishFailed(f"operation {op.id} was recorded but its message was not published: {exc}",
                                operation_id=op.id) from exc
        try:
            # The due time again, now counted from the publish: the record's, set at its creation, is a moment early.
            self.store.mark_published(op, delay=due, backoff=backoff)
        except IdemtasksError as exc:
            # The flag only makes duplicates wait ACCEPT_WINDOW, and the worker's claim clears it; a scheduled
            # message's due time is in the record since its creation.
            logger.warning("idemtasks: could not mark operation %s as published: %s", op.id, exc)
