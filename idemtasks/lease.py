"""Background lease renewal for long-running bodies.

One daemon thread per process renews every live lease a third of the way through it, so a healthy holder never
loses its operation, and a holder that stops renewing (SIGKILL, OOM, a frozen VM) loses it at most one lease later.
A task shorter than a third of its lease never costs a renewal round trip.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .errors import IdemtasksError
from .models import Operation
from .stores.base import Store

__all__ = ["Hold", "LeaseKeeper", "keeper"]

logger = logging.getLogger("idemtasks.lease")


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


class LeaseKeeper:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds: set[Hold] = set()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._wake_at = 0.0  # when the keeper thread will look next on its own

    def hold(self, store: Store, op: Operation, token: int, *, lease: float, ttl: float) -> Hold:
        h = Hold(store, op, token, lease, ttl, due=time.monotonic() + lease / 3)
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
        while True:
            with self._cond:
                now = time.monotonic()
                due = [h for h in self._holds if h.due <= now]
                if not due:
                    self._wake_at = min((h.due for h in self._holds), default=now + 3600.0)
                    self._cond.wait(timeout=max(self._wake_at - now, 0.01))
                    continue
            for h in due:
                self._renew(h)

    def _renew(self, h: Hold) -> None:
        try:
            ok = h.store.renew(h.operation, h.token, lease=h.lease, ttl=h.ttl)
        except Exception as exc:
            # The store is unreachable (or failed in a way nobody foresaw): keep trying sooner; the lease may still be
            # saved before it runs out. The thread must live on, or every hold of the process would lapse with it.
            log = logger.warning if isinstance(exc, IdemtasksError) else logger.exception
            log("idemtasks: could not renew the lease of operation %s: %s", h.operation.id, exc)
            h.due = time.monotonic() + max(h.lease / 10, 0.05)
            return
        with self._cond:
            if h.released:
                return
            if ok:
                h.due = time.monotonic() + h.lease / 3
            else:
                h.lost = True
                self._holds.discard(h)
                logger.error("idemtasks: operation %s was taken over by another worker (fencing token %d is stale); "
                             "this holder's result will be refused", h.operation.id, h.token)


#: The process-wide keeper used by :class:`~idemtasks.task.IdempotentTask`.
keeper = LeaseKeeper()
