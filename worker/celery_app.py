"""The Celery app of the reference service, set up the way idemtasks recommends for at-least-once delivery."""

from __future__ import annotations

from celery import Celery

from idemtasks.recovery import install

from . import settings

app = Celery("worker", broker=settings.BROKER_URL, include=["worker.tasks"])
app.conf.update(
    idemtasks_store_url=settings.STORE_URL,
    idemtasks_lease=settings.LEASE,
    # Acknowledge after the body, and requeue when a pool child dies: the claim turns redeliveries into replays.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Results live in the idemtasks store; Celery's result backend would be a second, weaker copy.
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Every worker sweeps for operations whose message was lost or whose holder died with it: a killed worker
    # never needs an operator, and no separate beat process has to be remembered.
    idemtasks_sweep_interval=settings.SWEEP_INTERVAL,
    idemtasks_pending_after=settings.PENDING_AFTER,
)
install(app)
if settings.BROKER_URL.startswith("sqla+"):
    # kombu's SQL transport polls about once a second and stops fetching while the prefetch window is full:
    # a larger window keeps the embedded setup from crawling.
    app.conf.worker_prefetch_multiplier = 16
else:
    app.conf.worker_prefetch_multiplier = 1
