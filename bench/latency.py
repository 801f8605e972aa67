"""Client-side latencies: one publish (``submit`` vs a bare ``apply_async``), and one replay of a finished operation.

Measured in the publisher process, pinned like the throughput runs (publisher on CPU 1, redis-servers on CPU 0),
with the libraries interleaved in small blocks so that none of them gets a quieter moment of the machine.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.app import publisher
from bench.measure import percentile
from bench.procs import pinned_self
from bench.scenarios import Bench, Scenario

PUBLISHER_CPUS = frozenset({1})
REDIS_CPUS = frozenset({0})


@dataclass
class Latency:
    scenario: str
    what: str
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float


def _row(name: str, what: str, xs: list[float]) -> Latency:
    us = [x * 1e6 for x in xs]
    return Latency(name, what, len(us), percentile(us, 50), percentile(us, 99), sum(us) / len(us))


def submit_latency(bench: Bench, scenarios: list[Scenario], samples: int, block: int = 50) -> list[Latency]:
    bench.broker.pin(REDIS_CPUS)
    bench.store.pin(REDIS_CPUS)
    bench.reset_state()
    queue = f"bench.latency.{uuid.uuid4().hex[:8]}"  # nothing consumes it; deleted below
    times: dict[str, list[float]] = {s.name: [] for s in scenarios}
    clients = {s.name: (bench.client(s), publisher(s.lib)) for s in scenarios}
    with pinned_self(PUBLISHER_CPUS):
        for s in scenarios:  # first connections and script loads are not what is measured
            task, publish = clients[s.name]
            for i in range(5):
                publish(task, f"warm-{uuid.uuid4().hex}-{i}", queue)
        for b in range(0, samples, block):
            for s in scenarios:
                task, publish = clients[s.name]
                out = times[s.name]
                for i in range(b, min(samples, b + block)):
                    key = f"lat-{i}-{uuid.uuid4().hex[:8]}"
                    t0 = time.perf_counter()
                    publish(task, key, queue)
                    out.append(time.perf_counter() - t0)
    bench.broker.client().delete(queue)
    bench.reset_state()
    return [_row(s.name, f"{s.publishes_with}", times[s.name]) for s in scenarios]


def replay_latency(bench: Bench, scenarios: list[Scenario], samples: int) -> list[Latency]:
    """How long a duplicate takes to get the stored outcome of a finished operation.

    idemtasks: a repeated ``submit`` (client side), and the worker's claim of a redelivered message (store only).
    Powertools: the decorated body called again with a completed key (its worker-side replay).
    """

    rows: list[Latency] = []
    queue = f"bench.replay.{uuid.uuid4().hex[:8]}"
    with pinned_self(PUBLISHER_CPUS):
        for s in scenarios:
            bench.reset_state()
            keys = [f"replay-{i}-{uuid.uuid4().hex[:8]}" for i in range(samples)]
            if s.lib == "powertools":
                rows += _powertools_replays(s, bench.client(s), keys)
            elif s.lib == "idemtasks":
                rows += _idemtasks_replays(s, bench.client(s), keys, queue)
    bench.broker.client().delete(queue)
    bench.reset_state()
    return rows


def _powertools_replays(s: Scenario, task: Any, keys: list[str]) -> list[Latency]:
    for key in keys:
        task.run(key)  # the first run executes and stores the outcome
    return [_row(s.name, "body called again (worker)", _timed(task.run, keys))]


def _idemtasks_replays(s: Scenario, task: Any, keys: list[str], queue: str) -> list[Latency]:
    from idemtasks.models import Status

    store = task.store_url
    ops = {}
    for key in keys:  # submitted, claimed and finished: what a worker leaves behind
        op = task.submit((key,), key=key, queue=queue).operation
        claim = store.claim(op.scope, op.key, op.task_name, op.fingerprint, owner=f"bench-{key}", lease=60.0,
                            ttl=86400.0, operation_id=op.id)
        store.finish(op.scope, op.key, op.id, claim.operation.fencing_token, Status.SUCCEEDED,
                     result_json='{"ok":true}', ttl=86400.0)
        ops[key] = op

    def again(key: str) -> None:
        task.submit((key,), key=key, queue=queue)

    def redelivered(key: str) -> None:
        op = ops[key]
        store.claim(op.scope, key, op.task_name, op.fingerprint, owner=f"dup-{key}", lease=60.0, ttl=86400.0,
                    operation_id=op.id)

    return [_row(s.name, "submit again (client)", _timed(again, keys)),
            _row(s.name, "claim of a redelivery (worker, store only)", _timed(redelivered, keys))]


def _timed(fn: Any, keys: list[str]) -> list[float]:
    out = []
    for key in keys:
        t0 = time.perf_counter()
        fn(key)
        out.append(time.perf_counter() - t0)
    return out
