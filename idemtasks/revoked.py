"""Messages a worker discards unrun: revoked (``app.control.revoke``) or expired (``expires=``).

Celery drops such a message before the task is called, so no claim ever sees it, and its operation would stay
pending: recovery would publish it again every ``pending_after`` under the same task id, to be discarded again while
the workers remember the revoke, and run once they forgot it (a restart without ``--statedb``, or hours later). A
task that was cancelled would run after all. So the operation of a discarded message is stored as failed
(``Revoked`` or ``Expired``), which clients see and duplicates replay. An operation whose deadline passed while no
message of it could be discarded (its message lost, its holder dead, the store down as the message was discarded)
is failed by recovery instead, which reads the deadline stored with the call (see :mod:`idemtasks.recovery`).

Only an operation still pending under the discarded message's id, keyed by it (a message sent without ``submit``),
or given back for the retry that this message is (its retry count is the one stored with the give-back) is touched:
one that runs, or was created by another message (a duplicate under ``key_func``), belongs to a delivery that was
not revoked. A message revoked with
``terminate=True`` while its body runs is not handled here: its holder dies, and the operation is taken over like
any dead holder's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import signals

from .errors import LeaseLost
from .identity import is_past
from .models import ErrorInfo, Operation, Status

__all__ = ["fail_discarded", "fail_unrun"]

logger = logging.getLogger("idemtasks.task")


def fail_discarded(task: Any, request: Any, *, expired: bool) -> bool:
    """Store the operation of ``request``'s discarded message as failed, if it is still pending under its id, keyed
    by it, or given back for the retry this message is. True if it was."""
    from .execution import header_of, store_carried  # the worker side, imported by then
    from .task import TASK_ID_SCOPE

    scope, key = task._key_of(request, tuple(request.args or ()), dict(request.kwargs or {}))
    store = task.store
    header = header_of(request)
    if header.get("finish") is not None:
        # The body ran: its completion, which the store could not take then, rides in this message. It is the
        # outcome, never "will not run".
        with contextlib.suppress(LeaseLost):  # taken over meanwhile: the new holder decides
            store_carried(store, scope, key, header["finish"], float(task.idempotency_ttl))
        return False
    op = store.get(scope, key)
    # This message's own: submitted under its id, or keyed by it. A message sent without submit (and without
    # key_func) is keyed by its task id, which its retries keep, while its claim gave the operation an id of the
    # store's. An operation a key_func duplicate shares belongs to other deliveries too, and is left alone.
    keyed_by_it = (scope, key) == (TASK_ID_SCOPE, request.id)
    if op is None or op.status is not Status.PENDING:
        return False
    if not (op.id == request.id or keyed_by_it or _carries_it_on(op, request, expired=expired)):
        return False
    what = f"expired (expires={getattr(request, 'expires', None)})" if expired else "was revoked"
    return fail_unrun(task, store, op, "Expired" if expired else "Revoked",
                      f"the message {what} before this delivery ran")


def _carries_it_on(op: Operation, request: Any, *, expired: bool) -> bool:
    """Whether ``request`` is the retry that ``op``'s last give-back stored: under key_func, a message sent without
    submit keeps its task id through its retries while its operation has an id of the store's. Only that retry
    message carries the give-back's retry count: a duplicate that met the operation has the count it was sent with
    (it gave nothing back), and an earlier delivery a lower one. Whichever message it came from (a duplicate that
    took the operation over from a dead holder carries it on too), revoking it cancels the operation. Its own
    deadline passing does only if the operation's passed too: recovery's copy carries the stored deadline (the
    first message's), which this message, a duplicate's retry, may not share."""
    from .execution import stored_retries  # the worker side, imported by then
    from .task import stored_deadline

    retries = int(request.retries or 0)
    if retries == 0 or stored_retries(op) != retries:
        return False
    if not expired:
        return True
    deadline = stored_deadline(op)
    return isinstance(deadline, str) and is_past(deadline)


def fail_unrun(task: Any, store: Any, op: Operation, error_type: str, why: str) -> bool:
    """Store ``op``, whose message will not run, as failed (``error_type``, ``why``), under the token it was read
    with; True if it was. A transactional task whose earlier holder committed its effects gets that result instead."""
    from .execution import transaction_ledger  # the worker side, imported by then

    ttl = float(task.idempotency_ttl)
    scope, key = op.scope, op.key
    ran = " (its body had started before, without an outcome)" if op.attempts else ""
    error = ErrorInfo(error_type, f"{why}{ran}: the operation will not run again")
    if task.transactional and op.attempts:
        # A holder that died after committing its effects left the operation pending for its copy: what it
        # committed is the outcome, and sealing the failure keeps a holder still alive from committing later.
        from .effects import sealed_outcome

        outcome = sealed_outcome(transaction_ledger(task), op.id, op.fencing_token, error)
        if isinstance(outcome, str):
            store.finish(scope, key, op.id, op.fencing_token, Status.SUCCEEDED, result_json=outcome, ttl=ttl)
            return False
        error = outcome
    # A pending record under its token takes a completion until a claim moves the token on: a claim that came
    # first wins, and this raises LeaseLost.
    store.finish(scope, key, op.id, op.fencing_token, Status.FAILED, error=error, ttl=ttl)
    return True


def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, expired: bool = False,
                **_: Any) -> None:
    from .task import IdempotentTask

    if terminated or request is None or not isinstance(sender, IdempotentTask):
        return
    try:
        sender._settled()
        if fail_discarded(sender, request, expired=expired):
            logger.warning("idemtasks: the operation of task %s failed: its message was %s before it ran", request.id,
                           "expired" if expired else "revoked")
    except LeaseLost:  # another delivery claimed the operation meanwhile: it carries the operation on
        logger.info("idemtasks: task %s was %s, and another delivery holds its operation", request.id,
                    "expired" if expired else "revoked")
    except Exception as exc:  # the consumer runs this: a store error must not take the worker's consumer down
        logger.warning("idemtasks: could not record that task %s was %s: %s", getattr(request, "id", "?"),
                       "expired" if expired else "revoked", exc)


signals.task_revoked.connect(_on_revoked, weak=False)
