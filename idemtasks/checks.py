"""Start-up checks: lease and delivery settings, and store servers' own settings, that would quietly weaken the
guarantees.

Run once when a worker starts (``worker_init``), logged as warnings that say what to change; also callable
directly as :func:`check_settings` (the app's settings alone) and :func:`check_stores` (asks each store's server).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from .forks import import_before_forking

__all__ = ["check_settings", "check_stores", "watch"]

logger = logging.getLogger("idemtasks.checks")

#: Brokers that redeliver an unacked message after a visibility timeout, even while the first copy still runs.
_VISIBILITY_BROKERS = ("redis", "rediss", "sqs", "sentinel")
_DEFAULT_VISIBILITY = 3600.0
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def check_settings(app: Any) -> list[str]:
    """Return one warning per idempotent task whose settings undermine exactly-once delivery."""
    from .config import body_on_store, sql_problem
    from .recovery import DEFAULT_PENDING_AFTER, DEFAULT_SWEEP_INTERVAL
    from .stores.base import confirm_after_for
    from .task import IdempotentTask

    conf = app.conf
    broker = str(conf.broker_url or "").split("://", 1)[0].split("+", 1)[0]
    visibility = float((conf.broker_transport_options or {}).get("visibility_timeout", _DEFAULT_VISIBILITY))
    pending_after = float(conf.get("idemtasks_pending_after", DEFAULT_PENDING_AFTER))
    # With the in-worker sweeper off, sweeps come from beat or cron at an interval not known here: assume the default.
    interval = float(conf.get("idemtasks_sweep_interval", DEFAULT_SWEEP_INTERVAL) or DEFAULT_SWEEP_INTERVAL)
    warnings: list[str] = []
    for name, task in sorted(app.tasks.items()):
        if not isinstance(task, IdempotentTask):
            continue
        lease = float(task.lease_seconds or 0.0)
        if not task.acks_late:
            warnings.append(f"{name}: acks_late is off, so a message is acked before the body runs and a killed "
                            "worker loses it; set acks_late=True and task_reject_on_worker_lost=True (or run the "
                            f"sweeper) so the operation is taken over after its lease of {lease:g}s")
        elif not task.reject_on_worker_lost:
            warnings.append(f"{name}: with acks_late but without reject_on_worker_lost, a SIGKILLed pool child's "
                            "message is acked, not redelivered; set task_reject_on_worker_lost=True")
        if broker in _VISIBILITY_BROKERS:
            if task.time_limit and float(task.time_limit) > visibility:
                warnings.append(f"{name}: time_limit {task.time_limit}s exceeds the broker visibility_timeout "
                                f"{visibility:g}s, so long runs are redelivered while running (the duplicate waits "
                                "on the lease); raise broker_transport_options['visibility_timeout']")
            if lease >= visibility:
                warnings.append(f"{name}: lease_seconds {lease:g}s is not shorter than the visibility_timeout "
                                f"{visibility:g}s; after a crash the redelivered message finds a live lease and "
                                "waits; lower idemtasks_lease")
        # Without transaction_url, its body runs on the engine of a SQL store given as an object, if it can.
        on_store = body_on_store(task) and not getattr(task.store_url, "one_connection", True)
        if task.transactional and not on_store \
                and (problem := sql_problem(task.transaction_url or task.store_url)) is not None:
            if task.transaction_url:  # its driver is missing here: the rest was checked as the task was bound
                warnings.append(f"{name}: a transactional task needs a SQL database this worker can open, and its "
                                f"transaction_url is {problem}: every operation it takes is given back, unrun, "
                                "for a worker that can")
            else:
                warnings.append(f"{name}: a transactional task needs a SQL database, and without transaction_url it "
                                f"would use its store, {problem}: every operation it takes will fail; set "
                                "transaction_url")
        # A record expires idempotency_ttl after its last change, and no sweep finds an expired one: an operation
        # whose message was lost, or whose holder died, must still be there when recovery comes for it, and again
        # when a first republish failed (the broker away), or the payment it records is never run.
        ttl, grace = float(task.idempotency_ttl or 0.0), confirm_after_for(lease)
        needed = 2 * (max(pending_after, lease + grace) + 2 * interval)
        if ttl < needed:
            warnings.append(f"{name}: idempotency_ttl {ttl:g}s leaves recovery too little time: an operation whose "
                            f"message was lost is republished after pending_after {pending_after:g}s, and one whose "
                            f"holder died after its lease {lease:g}s and a grace of {grace:g}s, by "
                            f"a sweep every {interval:g}s; one that expires first is never run. Keep "
                            f"idempotency_ttl at {needed:g}s or more")
        if task.time_limit and lease > float(task.time_limit) * 2:
            warnings.append(f"{name}: lease_seconds {lease:g}s is far longer than time_limit {task.time_limit}s; a "
                            "child killed by the time limit keeps its operation until the lease runs out")
    return warnings


def check_stores(app: Any) -> list[str]:
    """Return one warning per setting of a store's server that undermines exactly-once delivery (a Redis that evicts
    keys). A store that cannot be opened now is left out: the worker reports it as it uses it."""
    from .stores import REDIS_SCHEMES, url_scheme
    from .task import IdempotentTask

    warnings: list[str] = []
    asked: set[int] = set()
    for task in list(app.tasks.values()):
        if not isinstance(task, IdempotentTask):
            continue
        try:
            task._settled()
            url = task.store_url
            if isinstance(url, str) and url_scheme(url) not in REDIS_SCHEMES:
                continue  # only Redis servers have settings to check: others are not opened in the parent for nothing
            store = task.store
        except Exception:  # down, or its driver missing here: not this check's to report
            continue
        if id(store) not in asked:
            asked.add(id(store))
            warnings.extend(store.server_warnings())
    return warnings


def watch(app: Any) -> None:
    """Arrange for :func:`check_settings` to be logged when a worker for ``app`` starts."""
    if app in _watched:
        return
    _watched.add(app)
    from celery import signals

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        import_before_forking(app)  # even without the sweeper: a child's first task would import it all otherwise
        for warning in check_settings(app):
            logger.warning("idemtasks: %s", warning)
        try:
            for warning in check_stores(app):
                logger.warning("idemtasks: %s", warning)
        except Exception:  # a check must never keep a worker from starting
            logger.exception("idemtasks: checking the stores' servers failed")

    signals.worker_init.connect(on_worker_init, weak=False)
