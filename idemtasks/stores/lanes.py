"""What the pipelined stores share: a completion whose answer is still owed, and the thread that collects it.

A "lane" is one connection owned by one worker thread (:mod:`.redis_lane`, :mod:`.sql_lane`). A completion is
written to it without waiting, and its answer is read in front of the thread's next call. A thread that goes idle
would leave that answer unread, and its ``settle`` callback unheard, so one collector thread per process reads the
answers idle lanes are still owed after :data:`COLLECT_AFTER`.

A process that exits does not wait for that daemon thread. The answer owed for its last completion decides whether
the completion is sent again (its connection broke before the server ran it), so :meth:`_Collector.drain_all` reads
every owed answer at exit: from ``atexit``, and, for a prefork pool child (which leaves through ``os._exit``, past
``atexit``), from Celery's ``worker_process_shutdown`` signal (see :mod:`idemtasks.execution`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from ..forks import fresh_in_child

__all__ = ["COLLECT_AFTER", "BaseLane", "Pending", "collector", "lanes_supported", "opens_lanes", "pooled_only",
           "published_answer", "resolve_all", "settle_own_writes", "thread_flag"]

logger = logging.getLogger("idemtasks.store")

#: How long an unanswered completion may wait for the next claim before the collector thread reads its answer.
COLLECT_AFTER = 0.1


_pooled = threading.local()


@contextmanager
def thread_flag(local: threading.local, name: str) -> Iterator[None]:
    """Set this thread's flag ``name`` (an attribute of ``local``) for the context, then put back what it was, so
    that such contexts nest."""
    outer = getattr(local, name, False)
    setattr(local, name, True)
    try:
        yield
    finally:
        setattr(local, name, outer)


def pooled_only() -> AbstractContextManager[None]:
    """Within this context, this thread opens no lane: its calls take a pooled connection and give it back. For
    threads that run a few calls for many requests (an event loop's executor, see ``ThreadedAsyncStore``), where a
    lane would hold a connection of its own per thread for the thread's whole life, outside the pool's limits."""
    return thread_flag(_pooled, "on")


def opens_lanes() -> bool:
    """Whether this thread may open a lane (see :func:`pooled_only`)."""
    return not getattr(_pooled, "on", False)


def lanes_supported() -> bool:
    """False under a greenlet pool, whose patched sockets would make one connection per greenlet."""
    return socket.socket.__module__ in ("socket", "_socket")


@dataclass(eq=False)
class Pending:
    """A completion written to a lane whose answer has not been read yet."""

    sent_at: float
    resolve: Callable[[Any], None]  # called with the answer, or with the exception reading it raised


def settle_own_writes(local: threading.local) -> None:
    """Drain the lane of this thread, if it has one (see ``Store._settle_own_writes``)."""
    lane: BaseLane | None = getattr(local, "lane", None)
    if lane is not None and lane.pid == os.getpid():  # a forked child never touches its parent's socket
        lane.drain()


def published_answer(answer: Any) -> None:
    """The late answer to a pipelined "published" flag: only worth a word in the log when it did not land."""
    if isinstance(answer, Exception):
        logger.warning("idemtasks: an operation may stay flagged as unpublished (%s); harmless: its duplicates "
                       "wait a few seconds more, and the claim clears the flag", answer)


def resolve_all(done: list[tuple[Pending, Any]]) -> None:
    """Hand each answer to its resolver. Outside the lane's lock: resolving may send the completion again or sleep
    through an outage. An interruption (a soft time limit, a shutdown) of the thread's own task is raised once
    every answer has been handed over; a resolver's bug is logged, not raised into an unrelated call."""
    interrupted: BaseException | None = None
    for pending, answer in done:
        try:
            pending.resolve(answer)
        except SoftTimeLimitExceeded as exc:
            interrupted = interrupted or exc
        except Exception:  # a callback's bug must not take a claim or the collector down with it
            logger.exception("idemtasks: settling a pipelined completion failed")
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


class BaseLane:
    """One connection owned by one thread (plus the collector, under ``lock``), with at most one unread answer."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.pending: Pending | None = None
        #: Set while the collector settles an answer it took from this lane (outside ``lock``: settling may send a
        #: completion again); ``drain`` waits for it, or the owner could read its own completion's record too early.
        self.settling: threading.Event | None = None
        self.watched_by = 0  # the pid whose collector knows this lane

    def _send_unanswered(self, write: Callable[[], None], resolve: Callable[[Any], None],
                         errors: tuple[type[Exception], ...]) -> None:
        """``write`` one statement and leave its answer pending (read a pending one first: at most one per lane).
        ``errors`` are what ``write`` raises when the statement may not have reached the server: resolving then
        sends it again (a resend recognises a completion that had landed after all)."""
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                try:
                    self._collect_pending(done)
                    pending = Pending(time.monotonic(), resolve)
                    write()
                    self.pending = pending
                except errors as exc:  # only write() raises these
                    done.append((Pending(0.0, resolve), exc))
                    return
                except BaseException as exc:
                    # Interrupted (a soft time limit, Ctrl-C: raised by a signal handler at any bytecode) while the
                    # statement was going out, or before its answer was recorded as pending: left as it is, the
                    # connection would answer this thread's next call with this statement's answer. Drop it, and
                    # settle the statement as unknown: it is sent again, and a resend that finds it had landed says
                    # so (interrupted while reading the previous answer, it had not gone out: the resend is its
                    # first sending). If it was already recorded as pending, self.pending is it (_collect_pending
                    # left none behind) and _drop hands it over: not twice.
                    recorded = self.pending is not None and self.pending.resolve is resolve
                    unknown = self._drop(done, exc)
                    if not recorded:
                        done.append((Pending(0.0, resolve), unknown))
                    raise
            collector.wake(self)
        finally:
            resolve_all(done)

    def drain(self) -> None:
        """Read the pending answer, waiting for it if need be: the write it answers has then been applied (or
        handed over, a carried completion). An answer the collector took is waited for until it is settled."""
        # The owner's own check: only the owner adds a pending answer; the collector may take it, and then sets
        # ``settling`` under the lock before it lets go of the answer.
        if self.pending is None and self.settling is None:
            return
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                self._collect_pending(done)
                settling = self.settling
        finally:
            resolve_all(done)
        if settling is not None:
            settling.wait()

    def collect(self, older_than: float) -> bool:
        """Read a pending answer older than ``older_than`` seconds, unless the owner is busy; True if one is left."""
        done: list[tuple[Pending, Any]] = []
        settling: threading.Event | None = None
        if not self.lock.acquire(blocking=False):
            return True
        try:
            if self.pending is None:
                return False
            if time.monotonic() - self.pending.sent_at < older_than:
                return True
            settling = self.settling = threading.Event()
            self._collect_pending(done)
            return False
        finally:
            self.lock.release()
            try:
                resolve_all(done)
            finally:
                if settling is not None:
                    with self.lock:
                        if self.settling is settling:
                            self.settling = None
                    settling.set()

    def _collect_pending(self, done: list[tuple[Pending, Any]]) -> None:
        """Read the pending answer into ``done``; a broken connection resolves it as unknown instead of raising
        (anything else, an interruption, drops the connection, hands the answer over as unknown and is raised)."""
        raise NotImplementedError

    def _drop(self, done: list[tuple[Pending, Any]], why: BaseException) -> Exception:
        """Close the connection after ``why`` interrupted it mid-conversation, so that the next call opens a fresh
        one, and hand the pending answer to ``done`` as unknown; return the error standing for that unknown."""
        raise NotImplementedError


class _Collector:
    """One daemon thread per process that reads the answers idle lanes are still owed."""

    def __init__(self) -> None:
        self._lanes: weakref.WeakSet[BaseLane] = weakref.WeakSet()
        # Held strongly while an answer may be owed: a lane lives in its thread's locals, and a thread that ends
        # right after its last completion (a thread pool shutting down) would otherwise take the lane, and the
        # answer that decides whether that completion is sent again, with it. Let go once the answer was read.
        self._owed: set[BaseLane] = set()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def wake(self, lane: BaseLane) -> None:
        thread = self._thread
        # is_alive too: a thread ended by what no handler catches would otherwise leave every idle lane's answer
        # unread, and every lane owed, for the rest of the process.
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            try:
                self._start()
            except RuntimeError as exc:  # "can't start new thread": the write went out; its owner's next call reads
                logger.warning("idemtasks: cannot start the thread that reads pipelined answers: %s", exc)
        if lane.watched_by != self._pid:  # once per lane and process, not a weak reference per completion
            # Under the lock: a WeakSet that grows while another thread copies it raises "changed size during
            # iteration" in the copier (the collector, or an exit's drain).
            with self._lock:
                self._lanes.add(lane)
            lane.watched_by = self._pid
        self._owed.add(lane)
        if not self._wake.is_set():  # set by the first completion after an idle spell only: cheap on the hot path
            self._wake.set()

    def drain_all(self) -> None:
        """Read and settle every answer the lanes of this process are still owed, waiting for each (bounded by the
        stores' socket timeouts): a completion whose connection broke is then sent again before the process ends."""
        for lane in self._watched():
            if lane.pid != os.getpid():  # a forked child never touches its parent's socket
                continue
            try:
                lane.drain()
            except Exception:  # pragma: no cover - lanes resolve their own errors; exit must go on
                logger.exception("idemtasks: reading a pipelined completion's answer at exit failed")

    def _watched(self) -> list[BaseLane]:
        with self._lock:  # see wake()
            return list(self._lanes)

    def _start(self) -> None:
        with self._lock:
            # A forked pool child inherits this object but not the thread.
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._pid != os.getpid():
                # A forked child's lanes are its own; a thread that ended in this process leaves its lanes, and
                # what they are owed, to the next (they are added once per process: see wake()).
                self._pid = os.getpid()
                self._lanes = weakref.WeakSet()
                self._owed = set()
            self._wake = threading.Event()
            thread = threading.Thread(target=self._run, name="idemtasks-collector", daemon=True)
            thread.start()
            self._thread = thread

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(COLLECT_AFTER)
            # Clear before looking, so a completion written while we look sets it again: none is ever stranded.
            self._wake.clear()
            try:
                again = self._pass()
            except Exception:  # pragma: no cover - a bug here must not end the thread: try again on the next pass
                logger.exception("idemtasks: collecting pipelined completions failed")
                again = True
            if again:
                self._wake.set()

    def _pass(self) -> bool:
        """Collect what every lane is owed; True if some answer is still to come. (A frame of its own, so that no
        lane is kept alive by a loop variable while the thread sleeps.)"""
        waiting = False
        for lane in self._watched():
            try:
                waiting = lane.collect(COLLECT_AFTER) or waiting
            except Exception:  # pragma: no cover - lanes resolve their own errors; never let the thread die
                logger.exception("idemtasks: collecting a pipelined completion failed")
            waiting = self._release_answered(lane) or waiting
        return waiting

    def _release_answered(self, lane: BaseLane) -> bool:
        """Let go of a lane whose answer was read; True if it is still held (looked at again on the next pass)."""
        if lane not in self._owed:
            return False
        # Under the lane's lock: its owner records a new pending answer under it before calling wake(), so a lane
        # let go here was answered, and one written to since is added again. Busy (its owner mid-call): next pass.
        if not lane.lock.acquire(blocking=False):
            return True
        try:
            if lane.pending is None and lane.settling is None:
                self._owed.discard(lane)
                return False
            return True
        finally:
            lane.lock.release()


collector = _Collector()
atexit.register(collector.drain_all)
# The prefork parent's sweeper publishes through a lane, and may be starting the collector's thread as a child forks.
fresh_in_child(collector, "_lock", threading.Lock)
