"""The duplicate workload: 10 publishes of each of 500 keys, in four orders, counting how often the body ran.

An exactly-once library runs each key's body once (500) in every order. Lock-at-publish libraries (celery-once,
celery-singleton) only suppress duplicates that arrive while the first copy is queued or running.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.app import publisher
from bench.procs import Worker
from bench.scenarios import Bench, Scenario

ORDERS = {
    "before": "all published before the worker starts",
    "rounds": "one copy of every key per round, each round published after the previous one finished",
    "during": "all published while the worker runs",
    "burst": "the copies of a key back to back, while the worker runs",
}


@dataclass
class DupResult:
    scenario: str
    order: str
    publishes: int
    keys: int
    executions: int  # bodies that ran
    messages: int  # messages that reached the broker (LPUSH), republished retries included
    seconds: float


def _broker_pushes(bench: Bench) -> int:
    stats = bench.broker.client().info("commandstats")
    return int(stats.get("cmdstat_lpush", {}).get("calls", 0))


def wait_idle(broker: redis.Redis, queue: str, alive: Callable[[], None], timeout: float = 300.0) -> None:
    """Until the queue is empty and nothing is unacknowledged (retries held for their countdown count as
    unacknowledged), seen twice in a row: a message is briefly in neither place while a worker takes it."""
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 2:
        alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {queue} did not drain within {timeout:.0f}s")
        busy = broker.llen(queue) or broker.hlen("unacked")
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1 if busy else 0.2)


def run_order(bench: Bench, s: Scenario, order: str, keys: int, copies: int, logdir: Path) -> DupResult:
    bench.reset_state()
    run_id = uuid.uuid4().hex[:8]
    queue, counter_key = f"bench.dup.{s.name}.{order}.{run_id}", f"runs:{run_id}"
    task, publish = bench.client(s), publisher(s.lib)
    names = [f"{run_id}-{k}" for k in range(keys)]
    sequence = [n for n in names for _ in range(copies)] if order == "burst" else names * copies
    spec = bench.spec(s, queue=queue, counter_key=counter_key)
    worker = Worker(spec, logdir / f"dup-{s.name}-{order}.log", pool="prefork", concurrency=2)
    broker = bench.broker.client()
    pushes0, t0 = _broker_pushes(bench), time.perf_counter()
    try:
        if order == "before":
            for key in sequence:
                publish(task, key, queue)
            worker.start()
            wait_idle(broker, queue, worker.check_alive)
        else:
            worker.start(wait_ready=True)
            if order == "rounds":
                for _ in range(copies):
                    for key in names:
                        publish(task, key, queue)
                    wait_idle(broker, queue, worker.check_alive)
            else:
                for key in sequence:
                    publish(task, key, queue)
                wait_idle(broker, queue, worker.check_alive)
    finally:
        worker.stop()
    counter = bench.counter()
    executions = int(counter.get(counter_key) or 0)
    counter.delete(counter_key)
    return DupResult(s.name, order, len(sequence), keys, executions, _broker_pushes(bench) - pushes0,
                     time.perf_counter() - t0)
