"""Background lease renewal for long-running bodies.

One daemon thread per process renews every live lease a third of the way through it, so a healthy holder never
loses its operation, and a holder that stops renewing (SIGKILL, OOM, a frozen VM) loses it at most one lease later
(plus recovery's grace, see :mod:`idemtasks.recovery`). A renewal that fails is retried every ``lease / 10``, at
most :data:`RENEW_RETRY_MAX` apart, so a holder cut off by a store outage renews promptly once the store is back.
A task shorter than a third of its lease never costs a renewal round trip.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import IdemtasksError, LeaseLost, StoreUnavailable
from .forks import fresh_in_child
from .models import Operation
from .stores.base import Store

__all__ = ["RENEW_RETRY_MAX", "Hold", "LeaseKeeper", "keeper"]

logger = logging.getLogger("idemtasks.lease")

#: Longest wait (seconds) between retries of a renewal that failed: well under recovery's grace for a lapsed lease
#: (:data:`idemtasks.recovery.MIN_CONFIRM_AFTER`), so a holder cut off by a store outage renews before it is taken
#: over once the store is back.
RENEW_RETRY_MAX = 1.0


@dataclass(eq=False, slots=True)
class Hold:
    """One held lease. ``lost`` turns true if a renewal found another holder (or the record gone)."""

    store: Store
    operation: Operation
    token: int
    lease: float
    ttl: float
    due: float
    lost: bool = False
    released: bool = field(default=False, repr=False)
    #: A completion to store instead of a lease to renew (see :meth:`LeaseKeeper.keep_finishing`), tried until
    #: ``until`` (monotonic seconds).
    finish: Callable[[], None] | None = field(default=None, repr=False)
    until: float = float("inf")
    warned: bool = field(default=False, repr=False)
    #: What ``finish`` stores, for the log: the outcome, or a give-back (a release).
    what: str = field(default="outcome", repr=False)
    #: Set by the holder as it gives the operation back: a renewal refused from then on is its own doing, not a
    #: takeover (the give-back may land before the hold is released, or, through an outage, much later).
    giving_back: bool = field(default=False, repr=False)
    #: When the lease was last granted (monotonic): it runs out a lease later, whatever ``due`` says.
    granted: float = field(default_factory=time.monotonic, repr=False)
    #: Its last renewal failed: it goes after the others (see LeaseKeeper._loop).
    failing: bool = field(default=False, repr=False)


class LeaseKeeper:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds: set[Hold] = set()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._wake_at = 0.0  # when the keeper thread will look next on its own

    def hold(self, store: Store, op: Operation, token: int, *, lease: float, ttl: float) -> Hold:
        return self._add(Hold(store, op, token, lease, ttl, due=time.monotonic() + lease / 3))

    def keep_finishing(self, store: Store, op: Operation, token: int, finish: Callable[[], None], *, lease: float,
                       ttl: float, what: str = "outcome") -> Hold:
        """Call ``finish`` (a completion sent ``again``, or a release) at most :data:`RENEW_RETRY_MAX` apart until it
        lands, is refused (``LeaseLost``: taken over), or the record's ``ttl`` has passed. Used when a store outage
        outlasted a completion's retries in place: a completion lands on a record still running under its token even
        after its lease lapsed, and recovery waits a grace of more than that before taking a lapsed lease over."""
        now = time.monotonic()
        return self._add(Hold(store, op, token, lease, ttl, due=now + _retry_interval(lease), finish=finish,
                              until=now + ttl, what=what))

    def _add(self, h: Hold) -> Hold:
        with self._cond:
            # A forked pool child inherits the parent's keeper object but not its thread; a thread that died clears
            # _thread on its way out (cheaper than asking it whether it is alive on every task).
            if self._thread is None or self._pid != os.getpid():
                if self._pid != os.getpid():  # the parent's holds are not this process's to renew
                    self._pid = os.getpid()
                    self._holds = set()
                self._thread = threading.Thread(target=self._run, name="idemtasks-lease-keeper", daemon=True)
                self._thread.start()
            self._holds.add(h)
            # Waking the thread for every task would cost a context switch each; it only needs to hear of a lease
            # due before it looks again by itself (a short lease, or the first hold after an idle spell).
            if h.due < self._wake_at:
                self._wake_at = h.due
                self._cond.notify()
        return h

    def release(self, h: Hold) -> None:
        with self._cond:
            h.released = True
            self._holds.discard(h)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        # One thread renews every hold in turn, and a store that does not answer costs each of its holds
        # RENEW_TIMEOUT: asked for all of them, it would hold the renewals of the healthy stores' holds behind it,
        # whose leases then lapse (16 such holds make a pass 8 s long). So a store whose renewal failed as
        # unavailable is not asked again until a retry interval, counted from the failed call, is over: its other
        # holds stay due, and it is asked then for the one whose lease runs out first. A store failing for some
        # records only (a cluster with a node down) still has its other holds renewed, one failure per interval at
        # most; and one that fails at once is not asked for every hold, over and over.
        resting: dict[int, float] = {}  # id(store) -> monotonic time it is asked again
        while True:
            with self._cond:
                now = time.monotonic()
                resting = {store: until for store, until in resting.items() if until > now}
                # The holds whose last renewal went through come first, the lease that runs out first first: a short
                # one is not kept waiting behind long ones whose store keeps failing (each failure costs up to
                # RENEW_TIMEOUT), nor passed over again.
                due = sorted((h for h in self._holds if max(h.due, resting.get(id(h.store), 0.0)) <= now),
                             key=lambda h: (h.failing, h.granted + h.lease))
                if not due:
                    self._wake_at = min((max(h.due, resting.get(id(h.store), 0.0)) for h in self._holds),
                                        default=now + 3600.0)
                    self._cond.wait(timeout=max(self._wake_at - now, 0.01))
                    continue
            for h in due:
                if id(h.store) in resting:
                    continue
                asked = time.monotonic()
                if not self._renew(h):
                    # From when it was asked: a store that timed out has rested already, one that failed at once not.
                    resting[id(h.store)] = asked + self._rest_of(h)

    def _rest_of(self, failed: Hold) -> float:
        """How long the store of ``failed`` rests: the shortest retry interval among its holds, so that one with a
        short lease does not lapse behind a long lease's longer interval. Worked out on a failure only."""
        with self._cond:
            return min((_retry_interval(h.lease) for h in self._holds if h.store is failed.store),
                       default=_retry_interval(failed.lease))

    def _renew(self, h: Hold) -> bool:
        """Renew (or finish) ``h``; False if its store did not answer."""
        if h.finish is not None:
            return self._finish(h)
        try:
            ok = h.store.renew(h.operation, h.token, lease=h.lease, ttl=h.ttl)
        except Exception as exc:
            # The store is unreachable (or failed in a way nobody foresaw): keep trying sooner; the lease may still be
            # saved before it runs out. The thread must live on, or every hold of the process would lapse with it.
            # At most RENEW_RETRY_MAX apart: after an outage longer than the lease, recovery only suspects a lapsed
            # lease and waits recovery.MIN_CONFIRM_AFTER (or lease / 3) for a renewal before taking the operation
            # over, so a live holder must renew within that grace once the store answers again.
            log = logger.warning if isinstance(exc, IdemtasksError) else logger.exception
            log("idemtasks: could not renew the lease of operation %s: %s", h.operation.id, exc)
            h.due = time.monotonic() + _retry_interval(h.lease)
            h.failing = True
            return not isinstance(exc, StoreUnavailable)
        # Refused: taken over, or the holder's own completion landed just before its thread released the hold (a
        # race, not a loss). Tell them apart before an error log says "taken over".
        finished = not ok and (h.giving_back or _finished_by(h))
        with self._cond:
            if h.released:
                return True
            if ok:
                h.granted, h.failing = time.monotonic(), False
                h.due = h.granted + h.lease / 3
            elif finished:
                self._holds.discard(h)
            else:
                h.lost = True
                self._holds.discard(h)
                logger.error("idemtasks: operation %s was taken over by another worker (fencing token %d is stale); "
                             "this holder's result will be refused", h.operation.id, h.token)
        return True


    def _finish(self, h: Hold) -> bool:
        assert h.finish is not None
        try:
            with h.store.promptly():  # sent again within a suspected lease's grace, as renewals are (RENEW_TIMEOUT)
                h.finish()
        except LeaseLost:
            # For a give-back, also what a resend finds once the first try had landed and a retry claimed since.
            (logger.info if h.what == "give-back" else logger.error)(
                "idemtasks: operation %s was taken over before this attempt's %s could be stored "
                "(fencing token %d is stale); it was discarded", h.operation.id, h.what, h.token)
        except Exception as exc:
            if time.monotonic() < h.until:
                # Said once: the store is down, and this is tried every second until it is back.
                if not h.warned:
                    logger.warning("idemtasks: could not store the %s of operation %s yet (%s); trying again "
                                   "every %gs until the store is back", h.what, h.operation.id, exc,
                                   _retry_interval(h.lease))
                    h.warned = True
                h.due = time.monotonic() + _retry_interval(h.lease)
                h.failing = True  # after the holds that renew (see _loop)
                return not isinstance(exc, StoreUnavailable)
            logger.error("idemtasks: gave up storing the %s of operation %s: its record has expired", h.what,
                         h.operation.id)
        else:
            logger.info("idemtasks: the %s of operation %s was stored after the store came back", h.what,
                        h.operation.id)
        with self._cond:
            self._holds.discard(h)
        return True


def _finished_by(h: Hold) -> bool:
    """Whether the record is final under the hold's token: only its holder can have completed it (the completion is
    fenced on the token). A record put back to pending keeps its token too, but recovery may have done that."""
    try:
        with h.store.promptly():
            op = h.store.get_by_id(h.operation.id)
    except Exception:  # the store went away: say what the refusal said
        return False
    return op is not None and op.is_final and op.fencing_token == h.token


def _retry_interval(lease: float) -> float:
    return max(min(lease / 10, RENEW_RETRY_MAX), 0.05)


#: The process-wide keeper used by :class:`~idemtasks.task.IdempotentTask`.
keeper = LeaseKeeper()
fresh_in_child(keeper, "_cond", threading.Condition)  # see idemtasks.forks
