"""Recovery: publish again the operations that would otherwise never finish.

Two kinds are found by :meth:`Store.stale <idemtasks.stores.base.Store.stale>`:

* pending operations unchanged for ``idemtasks_pending_after`` seconds — their message was lost between the
  record and the broker (a web process killed mid-submit, a transactional enqueue committed but never
  published), or a broker lost it;
* running operations whose lease ran out — their holder died and its message is gone (early acks, a virtual
  transport's in-memory unacked messages, a Redis broker that would redeliver only after its visibility timeout).
  Such an operation is first put back to pending (fenced on its token), then published.

Either kind whose first message had an ``expires`` that has passed is stored as failed (``Expired``) instead: a copy
would only be discarded unrun, at every sweep (see :mod:`idemtasks.revoked`).

A lapsed lease does not prove the holder dead. During a store outage longer than the lease a live holder cannot
renew, and when the store comes back a sweep may reach the record before the holder's keeper renews it (or before
its completion lands): a takeover then would run the body a second time. So the takeover has two phases
(:meth:`Store.requeue <idemtasks.stores.base.Store.requeue>`): the first sweep that finds the lapsed lease only marks
the operation suspected, in the record itself (so a cron-run one-shot sweep and the sweepers of several workers all
see it); a later sweep requeues it only if no renewal came since the mark and the mark is at least ``confirm_after``
seconds old. The timing rule: ``confirm_after`` must exceed the time a live holder needs to renew once the store
answers again. The keeper retries a failed renewal at most :data:`~idemtasks.lease.RENEW_RETRY_MAX` (1 s) apart, so
``confirm_after = max(MIN_CONFIRM_AFTER, lease / 3)`` (:func:`confirm_after_for`) leaves it at least one more retry
and the round trip. A dead holder's operation is therefore taken over about one sweep interval later than its lease
alone would allow (``lease + confirm_after``, rounded up to the sweeps). A worker's claim of a redelivered message
follows the same two phases with the same mark (:meth:`Store.claim <idemtasks.stores.base.Store.claim>`).

Publishing again is always safe: the worker's claim turns any extra copy into a replay. But a pending operation
whose message is merely queued behind a backlog longer than ``pending_after`` (or whose workers are all down while
beat or cron sweeps) looks lost too, and a copy every ``pending_after`` would multiply the backlog it waits behind.
So each copy backs off from the last: recovery publishes an operation again no sooner than ``pending_after`` after
its first copy, then twice that after the second, and so on up to ``idemtasks_republish_backoff_max`` (at most
about as long again as it already waited), and never past half of what is left of the record's life: a copy lost
late (a broker that lost its queue, a purge) must still have one behind it before the record expires unrun. The
back-off is kept in the record (:meth:`Store.mark_published
<idemtasks.stores.base.Store.mark_published>`), so it holds across sweepers; a claim, a retry or a takeover starts
it afresh.

The sweeper runs as a
thread in every worker process that has ``idemtasks_sweep_interval`` set (so a plain ``celery worker`` recovers by
itself, no beat needed), as the ``idemtasks.sweep`` task for beat, and as ``python -m idemtasks sweep -A app``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import IdemtasksError, LeaseLost, StoreError
from .forks import import_before_forking
from .identity import CALLBACK_OPTIONS, is_past, parse_stored_call
from .models import Operation, Status, Takeover
from .revoked import fail_unrun
from .stores import Store
from .stores.base import MIN_CONFIRM_AFTER, confirm_after_for

__all__ = ["DEFAULT_PENDING_AFTER", "DEFAULT_REPUBLISH_BACKOFF_MAX", "DEFAULT_SWEEP_INTERVAL", "MIN_CONFIRM_AFTER",
           "SweepReport", "Sweeper", "confirm_after_for", "install", "next_backoff"]

logger = logging.getLogger("idemtasks.recovery")

#: Seconds between sweeps of the in-worker sweeper; ``idemtasks_sweep_interval`` (0 or ``None`` turns it off).
DEFAULT_SWEEP_INTERVAL = 30.0
#: Seconds a pending operation may wait, unchanged, before its message is presumed lost and published again;
#: ``idemtasks_pending_after``. Longer than a normal queueing delay, shorter than a client's patience.
DEFAULT_PENDING_AFTER = 60.0
#: Seconds past an operation's deadline (its message's ``expires``) before recovery fails it instead of publishing
#: it: the workers test the deadline on their own clocks, and one behind the sweeper's could still run a copy in time.
EXPIRED_SLACK = 5.0
#: The longest back-off between two copies recovery publishes of one pending operation (see above);
#: ``idemtasks_republish_backoff_max``. Never shorter than ``pending_after``.
DEFAULT_REPUBLISH_BACKOFF_MAX = 1800.0
#: How many stale records this app cannot publish a sweep looks past, beyond its ``limit`` (see ``_sweep_store``).
LOOK_PAST = 5000
#: How many failed recoveries a sweeper remembers having logged (see Sweeper._logged).
_LOGGED_MAX = 10_000


@dataclass
class SweepReport:
    republished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    #: Running under a lapsed lease, marked (or still marked) suspected: taken over by a later sweep unless renewed.
    suspected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Failed as ``Expired``: their first message's ``expires`` had passed.
    expired: list[str] = field(default_factory=list)

    @property
    def taken_over(self) -> int:
        """How many of those published again were taken from dead holders (a requeued one may have expired)."""
        return len(set(self.requeued) & set(self.republished))


class Sweeper:
    """Sweeps every store used by the idempotent tasks of one Celery app.

    ``confirm_after`` overrides :func:`confirm_after_for` for every task (tests; an operator who knows the holders'
    renewal latency): shorter than a live holder needs to renew after an outage, it lets the body run twice.
    """

    def __init__(self, app: Any, *, limit: int = 500, pending_after: float | None = None,
                 confirm_after: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.pending_after = float(pending_after if pending_after is not None
                                   else app.conf.get("idemtasks_pending_after", DEFAULT_PENDING_AFTER))
        self.confirm_after = confirm_after
        self.backoff_max = max(self.pending_after, float(
            app.conf.get("idemtasks_republish_backoff_max") or DEFAULT_REPUBLISH_BACKOFF_MAX))
        #: Operations whose recovery failed and was logged with its traceback: a worker's sweeper meets them again
        #: at every pass until they expire, and one traceback each is enough (bounded, for a process that lives long).
        self._logged: set[str] = set()

    def stores(self) -> list[Store]:
        """The stores of the app's idempotent tasks. One that cannot be opened now (its database down) is left out
        with a warning: the others are still swept."""
        from .task import IdempotentTask

        found: dict[int, Store] = {}
        failed: set[str] = set()
        for task in list(self.app.tasks.values()):
            if isinstance(task, IdempotentTask):
                try:
                    task._settled()
                    store = task.store
                except Exception as exc:  # down, or a driver not installed on this host (not wrapped: not ours)
                    if str(exc) not in failed:  # once per store, not once per task on it
                        failed.add(str(exc))
                        logger.warning("idemtasks: cannot sweep the store of %s now: %s", task.name, exc)
                    continue
                found[id(store)] = store
        return list(found.values())

    def sweep(self) -> SweepReport:
        report = SweepReport()
        for store in self.stores():
            try:
                self._sweep_store(store, report)
            except IdemtasksError as exc:
                logger.warning("idemtasks: sweep of %s failed: %s", store.url, exc)
            except Exception:  # a bug in one store's sweep must not keep the others from theirs
                logger.exception("idemtasks: sweep of %s failed", store.url)
        if report.republished:
            logger.info("idemtasks: recovery published %d operation(s) again (%d taken from dead holders)",
                        len(report.republished), report.taken_over)
        if report.expired:
            logger.warning("idemtasks: recovery failed %d operation(s) past their message's expires: %s",
                           len(report.expired), ", ".join(report.expired[:10]))
        if report.suspected:
            logger.info("idemtasks: %d operation(s) under a lapsed lease are suspected; a later sweep takes them over "
                        "unless their holders renew", len(report.suspected))
        return report

    def _sweep_store(self, store: Store, report: SweepReport) -> None:
        # Records this app cannot publish (another app's tasks in a shared store, a task renamed or removed by a
        # deploy, a record a claim made without its call) stay stale until they expire, and oldest first they come
        # first: the window widens past them (by up to LOOK_PAST), or a few hundred of them would hide every
        # operation this app could recover, for as long as they live. At most ``limit`` are recovered per sweep.
        seen: set[str] = set()
        recovered = skipped = 0
        window = self.limit
        while True:
            batch = store.stale(pending_after=self.pending_after, limit=window)
            new = [op for op in batch if op.id not in seen]
            for op in new:
                seen.add(op.id)
                try:
                    done = self._recover(store, op, report)
                except StoreError:
                    raise  # the store itself failed: so would the rest of this sweep of it
                except Exception:
                    # One record this sweep cannot handle (a stored call it cannot read, say) would otherwise stop
                    # every operation after it, oldest first, at every sweep.
                    if op.id in self._logged:
                        logger.debug("idemtasks: recovery of operation %s failed again; skipped", op.id)
                    else:
                        if len(self._logged) >= _LOGGED_MAX:
                            self._logged.clear()
                        self._logged.add(op.id)
                        logger.exception("idemtasks: recovery of operation %s failed; skipped (logged once)", op.id)
                    report.skipped.append(op.id)
                    done = False
                if done:
                    recovered += 1
                else:
                    skipped += 1
            if not new or len(batch) < window or recovered >= self.limit or window >= self.limit + LOOK_PAST:
                return
            # Past a batch that was all skipped, twice as far: a few passes, not one per ``limit`` of them.
            window = self.limit + min(max(skipped, 2 * (window - self.limit)), LOOK_PAST)

    def _recover(self, store: Store, op: Operation, report: SweepReport) -> bool:
        """Publish ``op`` again, taking it from a dead holder first; False if this app cannot (skipped)."""
        from .task import IdempotentTask

        task = self.app.tasks.get(op.task_name)
        if not isinstance(task, IdempotentTask) or op.payload is None:
            report.skipped.append(op.id)
            return False
        if op.status is Status.RUNNING:
            # Two-phase takeover: a lapsed lease may belong to a live holder that could not renew through a store
            # outage. The first sweep only marks it; a later one requeues it if the holder stayed silent.
            taken = store.requeue(op, confirm_after=self._confirm_after(task))
            if taken is Takeover.SUSPECTED:
                report.suspected.append(op.id)
            if taken is not Takeover.REQUEUED:
                return True  # suspected only, or claimed, renewed or finished meanwhile: alive after all
            report.requeued.append(op.id)
        # With the routing options the first message was published with; with its callbacks only if it never reached
        # the broker. Once it did, it may still be queued (a backlog longer than pending_after) or be redelivered
        # (acks_late), and a copy that replays would send them a second time.
        _name, args, kwargs, options = parse_stored_call(op.payload)
        expires = options.get("expires")
        if isinstance(expires, str) and is_past(expires, by=EXPIRED_SLACK):
            # Past the deadline of its first message: a copy would be discarded unrun (or dropped by the broker,
            # whose message TTL Celery sets from it, before any worker sees it), again at every sweep. Failed as the
            # worker fails a discarded message, under the token read (the requeue kept it).
            try:
                message = f"the message expired (expires={expires}) before a copy of it ran"
                if fail_unrun(task, store, op, "Expired", message):
                    report.expired.append(op.id)
            except LeaseLost:
                pass  # claimed meanwhile, by a message without the deadline: that delivery decides
            except IdemtasksError as exc:  # the store or the ledger: the next sweep tries again
                logger.warning("idemtasks: could not fail expired operation %s: %s", op.id, exc)
            return True
        if not op.needs_publish:
            options = {name: value for name, value in options.items() if name not in CALLBACK_OPTIONS}
        try:
            task.publish(op, args, kwargs, backoff=next_backoff(op, self.pending_after, self.backoff_max), **options)
        except IdemtasksError as exc:
            logger.warning("idemtasks: could not publish operation %s again: %s", op.id, exc)
            return True
        report.republished.append(op.id)
        return True

    def _confirm_after(self, task: Any) -> float:
        if self.confirm_after is not None:
            return self.confirm_after
        task._settled()  # as in stores(): the task's settings may not be read yet in this process
        return confirm_after_for(float(task.lease_seconds or 0.0))


def next_backoff(op: Operation, pending_after: float, most: float, now: float | None = None) -> float:
    """The back-off of the copy recovery publishes of ``op`` as read: twice the last copy's (a pending record's
    ``lease_expires_at`` less its ``updated_at``, both set by that copy's mark), at most ``most`` and half of what
    is left of the record's life, and at least ``pending_after``. A record that was running, or pending without a
    copy of recovery's since its creation, release or takeover, has none: its first copy backs off
    ``pending_after``, the wait recovery always had. ``now``: this host's clock by default, which only moves the
    half-life bound by the clocks' difference."""
    last = 0.0
    if op.status is Status.PENDING and op.lease_expires_at is not None:
        last = op.lease_expires_at - op.updated_at
    left = op.expires_at - (time.time() if now is None else now)
    return max(pending_after, min(most, 2.0 * last, left / 2.0))


def install(app: Any, *, beat_task: bool = True) -> None:
    """Run a sweeper thread in each worker of ``app`` (if ``idemtasks_sweep_interval`` is set) and, with
    ``beat_task``, register the ``idemtasks.sweep`` task for beat schedules."""
    from celery import bootsteps, signals

    if beat_task:
        @app.task(name="idemtasks.sweep", ignore_result=True)  # type: ignore[untyped-decorator]
        def sweep() -> int:
            return len(Sweeper(app).sweep().republished)

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        interval = app.conf.get("idemtasks_sweep_interval", DEFAULT_SWEEP_INTERVAL)
        if not interval:
            return
        # Before the thread: what it would import at its first sweep must not be imported while the pool forks.
        import_before_forking(app)
        sweeper = Sweeper(app)
        stop = threading.Event()

        def stopped() -> bool:
            # worker_shutdown comes with a warm shutdown only: a cold one (or an embedded worker stopped by its
            # host) just stops the worker's blueprint, and a sweeper left running would keep its stores' connections
            # open, sweeping for a worker that is gone.
            state = getattr(getattr(sender, "blueprint", None), "state", None)
            return stop.is_set() or state in (bootsteps.CLOSE, bootsteps.TERMINATE)

        def loop() -> None:
            while not stop.wait(float(interval)) and not stopped():
                try:
                    sweeper.sweep()
                except Exception:  # a sweep must never kill the worker's recovery loop
                    logger.exception("idemtasks: sweep failed")

        threading.Thread(target=loop, name="idemtasks-sweeper", daemon=True).start()
        signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)

    signals.worker_init.connect(start, weak=False)
