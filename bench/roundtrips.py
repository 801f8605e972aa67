"""Store round trips per task, counted exactly rather than timed.

Redis-backed libraries: ``MONITOR`` on the private state server during a small untimed drain; commands a Lua script
issues are reported by Redis as coming from ``lua``, so round trips (client commands) and the work inside scripts
are told apart. SQL stores: idemtasks' own ``round_trips`` counter, read in the publisher and reported by the
worker at shutdown (see :mod:`bench.worker_app`).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.app import publisher
from bench.measure import watch_drain
from bench.procs import RedisServer, Worker
from bench.scenarios import Bench, Scenario


class Monitor:
    """Counts the commands a Redis server executes, split by who sent them (a client or a Lua script)."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.client: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self._marker = f"bench-monitor-{uuid.uuid4().hex}"
        self._seen = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def start(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        self.sync()
        return self

    def _run(self) -> None:
        conn = redis.Redis(host="127.0.0.1", port=self.server.port, decode_responses=True)
        with conn.monitor() as m:
            self._ready.set()
            while True:
                cmd = m.next_command()
                words = str(cmd["command"]).split(" ", 2)
                if words[0].upper() == "ECHO" and self._marker in cmd["command"]:
                    self._seen.set()
                    if self._stop:
                        return
                    continue
                (self.lua if cmd["client_type"] == "lua" else self.client)[words[0].upper()] += 1

    def sync(self) -> None:
        """Wait until every command sent before this call has been counted."""
        self._seen.clear()
        self.server.client().echo(self._marker)
        if not self._seen.wait(10):
            raise RuntimeError("MONITOR fell behind")

    def take(self) -> tuple[Counter[str], Counter[str]]:
        self.sync()
        out = (self.client, self.lua)
        self.client, self.lua = Counter(), Counter()
        return out

    def stop(self) -> None:
        self._stop = True
        self.sync()
        self._thread.join(5)


@dataclass
class RoundTrips:
    scenario: str
    publish: float  # round trips per task in the publisher
    worker: float  # round trips per task in the worker
    inside_scripts: float  # commands run inside Lua scripts per task (Redis only)
    detail: str  # per-command breakdown
    method: str
    commands: dict[str, Any] = field(default_factory=dict)


#: Sent once per connection, not per task: left out of the per-task figures.
_SETUP = frozenset({"HELLO", "PING", "SCRIPT", "CLIENT", "SELECT", "INFO"})


def _per_task(c: Counter[str], n: int) -> str:
    return ", ".join(f"{k} {v / n:.2f}" for k, v in c.most_common())


def _tasks_only(c: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in c.items() if k not in _SETUP})


def probe(bench: Bench, s: Scenario, n: int, logdir: Path) -> RoundTrips:
    bench.reset_state()
    run_id = uuid.uuid4().hex[:8]
    queue, counter_key = f"bench.rt.{s.name}.{run_id}", f"runs:{run_id}"
    task, publish = bench.client(s), publisher(s.lib)
    sql = s.store != "redis" and s.lib.startswith("idemtasks")
    store = getattr(task, "store_url", None)
    rt0 = store.round_trips if sql else 0
    mon = Monitor(bench.store).start()
    for i in range(n):
        publish(task, f"{run_id}-{i}", queue)
    pub_client = _tasks_only(mon.take()[0])
    spec = bench.spec(s, queue=queue, counter_key=counter_key)
    counter = bench.counter()
    with Worker(spec, logdir / f"roundtrips-{s.name}.log", pool="solo").start() as worker:
        watch_drain(lambda: int(counter.get(counter_key) or 0), n, warmup=1, probes=lambda: (),
                    alive=worker.check_alive, timeout=120)
    worker_client, worker_lua = mon.take()
    worker_client = _tasks_only(worker_client)
    mon.stop()
    if sql:
        reported = int(counter.get(f"{counter_key}:round-trips") or 0)
        pub_rt = (store.round_trips - rt0) / n
        return RoundTrips(s.name, pub_rt, reported / n, 0.0, f"statements: {pub_rt:.2f} submit, {reported / n:.2f} "
                          "worker", "idemtasks round_trips counter (logical statements)")
    return RoundTrips(
        s.name, sum(pub_client.values()) / n, sum(worker_client.values()) / n, sum(worker_lua.values()) / n,
        "; ".join(x for x in (f"publish: {_per_task(pub_client, n)}" if pub_client else "",
                              f"worker: {_per_task(worker_client, n)}" if worker_client else "") if x),
        "Redis MONITOR", {"publish": dict(pub_client), "worker": dict(worker_client), "lua": dict(worker_lua)},
    )
