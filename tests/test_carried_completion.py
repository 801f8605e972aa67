"""A completion carried over a store outage longer than the lease: stored once the store is back, before recovery
may take the operation over, and the body runs once.

The outage is real: the test's own redis-server stops, and starts again later with its data (an append-only file
synced on every write). A paused server would not do: the calls that time out against it stay in its socket, and
it runs them all when it resumes.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish

from idemtasks import IdempotentTask, Status
from idemtasks.recovery import Sweeper
from idemtasks.stores.redis import RedisStore
from tests import services
from tests.private_redis import PrivateRedis

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[tuple[RedisStore, PrivateRedis]]:
    if shutil.which("redis-server") is None:
        services.missing("redis-server is not installed")
    server = PrivateRedis(tmp_path, durable=True)
    server.start()
    store = RedisStore(server.url, namespace=f"idemtasks-test:{uuid.uuid4().hex[:12]}", socket_timeout=0.5)
    yield store, server
    store.close()
    server.stop()


def test_an_outcome_carried_over_a_long_outage_is_stored_before_recovery_takes_over(
        durable_redis: tuple[RedisStore, PrivateRedis]) -> None:
    """On the pipelined path (the default): its answer is read late, resent, settled and carried over; the path
    without pipelining reaches the same keeper from its retries in place."""
    store, server = durable_redis
    app = Celery(f"c{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, broker_connection_retry_on_startup=False,
                    task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay", lease_seconds=0.6,
              idempotency_ttl=120.0, store_retry_max_delay=10.0)
    def pay(self: IdempotentTask, key: str) -> str:
        runs[key] += 1
        if runs[key] == 1:
            server.stop()  # the store goes away just as the body finishes
        return f"paid-{runs[key]}"

    # The carried message backs off 1, 2, 4 s…: resume the store once a copy is due 4 s later, so that what stores
    # the outcome promptly is this process's keeper, not the carried message.
    far_enough = threading.Event()

    def watch(headers: dict[str, Any] | None = None, **_: Any) -> None:
        header = (headers or {}).get("idemtasks") or {}
        if "finish" in header and int(header.get("outages", 0)) >= 3:
            far_enough.set()

    before_task_publish.connect(watch, weak=False)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=30.0):
            sub = pay.submit(((k := f"k-{uuid.uuid4().hex}"),), key=k)
            assert far_enough.wait(60), "the outcome was never carried over"
            server.start()
            sweeper = Sweeper(app)  # confirm_after: 2 s for this lease
            resumed = time.monotonic()
            sweeper.sweep()  # finds the lapsed lease at once, or the operation already finished
            op = None
            while time.monotonic() - resumed < 2.0:
                op = store.get_by_id(sub.operation.id)
                if op is not None and op.is_final:
                    break
                time.sleep(0.05)
            assert op is not None and op.status is Status.SUCCEEDED and op.result == "paid-1"
            time.sleep(2.5)
            report = sweeper.sweep()
            assert sub.operation.id not in report.requeued
            time.sleep(5.0)  # the carried copy arrives and replays
            assert runs[k] == 1
            final = store.get_by_id(sub.operation.id)
            assert final is not None and final.result == "paid-1" and final.attempts == 1
    finally:
        before_task_publish.disconnect(watch)
