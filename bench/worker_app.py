"""``celery -A bench.worker_app worker``: the benchmark app, configured by the ``BENCH_*`` environment variables."""

from __future__ import annotations

from typing import Any

import redis
from celery import signals

from bench.app import AppSpec, make_app

spec = AppSpec.from_env()
app, task = make_app(spec, main="bench-worker")


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def report_round_trips(**_: Any) -> None:
    """An idemtasks store counts its round trips per process; hand the worker's count to the bench at exit
    (once per process, so nothing is added to the tasks being timed)."""
    store = getattr(task, "store_url", None)
    trips = getattr(store, "round_trips", 0)
    if trips:
        redis.Redis.from_url(spec.counter).incrby(f"{spec.counter_key}:round-trips", trips)
