"""Throughput: N tasks published up front, then drained by a fresh ``celery worker``; scenarios interleaved.

Each round runs every scenario once (in alternating order, so a slow drift of the machine cancels out), and the
ratios to bare Celery are medians of per-round ratios.
"""

from __future__ import annotations

import logging
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.app import publisher
from bench.measure import median, pairwise, watch_drain
from bench.procs import ALL_CPUS, Worker, pinned_self
from bench.scenarios import Bench, Scenario

log = logging.getLogger("bench")
PUBLISH_THREADS = 4


@dataclass(frozen=True)
class Config:
    name: str
    pool: str
    concurrency: int
    worker_cpus: frozenset[int] | None
    publisher_cpus: frozenset[int] | None
    redis_cpus: frozenset[int]
    description: str


CONFIGS = {
    "pinned": Config("pinned", "solo", 1, frozenset({1}), frozenset({1}), frozenset({0}),
                     "redis-servers on CPU 0; publisher and a solo-pool worker on CPU 1"),
    "prefork": Config("prefork", "prefork", 2, None, None, ALL_CPUS,
                      "prefork pool, concurrency 2, nothing pinned"),
}


@dataclass
class Run:
    config: str
    scenario: str
    round: int
    rate: float  # tasks/s over the timed window
    cpu_us: float  # worker process tree CPU per task
    server_cpu_us: float  # both private redis-servers' CPU per task
    store_commands: float  # commands on the state server per task, worker side (Lua-internal calls included)


@dataclass
class Summary:
    config: str
    scenario: str
    runs: int
    rate: float
    ratio: float
    added_wall_us: float
    added_cpu_us: float
    cpu_us: float
    server_cpu_us: float
    store_commands: float
    rates: list[float] = field(default_factory=list)


def drain_once(bench: Bench, s: Scenario, config: Config, n: int, round_no: int, logdir: Path) -> Run:
    bench.reset_state()
    run_id = uuid.uuid4().hex[:8]
    queue, counter_key = f"bench.{s.name}.{run_id}", f"runs:{run_id}"
    task, publish = bench.client(s), publisher(s.lib)
    keys = [f"{run_id}-{i}" for i in range(n)]
    with pinned_self(config.publisher_cpus):
        # Publishing is not what is timed here (see the latency section), and a SQL store's submit waits on the
        # server: a few threads overlap those waits and keep a full run within its time budget.
        with ThreadPoolExecutor(PUBLISH_THREADS) as pool:
            for _ in pool.map(lambda key: publish(task, key, queue), keys):
                pass
        commands0 = bench.store.commands()
        spec = bench.spec(s, queue=queue, counter_key=counter_key)
        worker = Worker(spec, logdir / f"{config.name}-{s.name}-{round_no}.log", pool=config.pool,
                        concurrency=config.concurrency, cpus=config.worker_cpus)
        counter = bench.counter()

        def probes() -> tuple[float, ...]:
            return worker.cpu_seconds(), bench.broker.cpu_seconds() + bench.store.cpu_seconds()

        with worker.start():
            drain, p0, p1 = watch_drain(lambda: int(counter.get(counter_key) or 0), n, warmup=max(1, n // 50),
                                        probes=probes, alive=worker.check_alive, timeout=max(120.0, n / 20))
        commands1 = bench.store.commands()
    counter.delete(counter_key)
    drain.cpu, drain.server_cpu = p1[0] - p0[0], p1[1] - p0[1]
    return Run(config.name, s.name, round_no, drain.rate, drain.cpu_us, drain.server_cpu_us,
               (commands1 - commands0) / n)


def run_config(bench: Bench, scenarios: list[Scenario], config: Config, n: int, rounds: int,
               logdir: Path) -> list[Run]:
    bench.broker.pin(config.redis_cpus)
    bench.store.pin(config.redis_cpus)
    # An untimed drain first: the first worker after re-pinning the servers starts colder than the rest.
    drain_once(bench, scenarios[0], config, min(n, 300), -1, logdir)
    runs: list[Run] = []
    for r in range(rounds):
        order = scenarios if r % 2 == 0 else scenarios[::-1]
        for s in order:
            run = drain_once(bench, s, config, n, r, logdir)
            log.info("  %-8s round %d %-20s %8.0f tasks/s  %6.0f us CPU/task", config.name, r + 1, s.name,
                     run.rate, run.cpu_us)
            runs.append(run)
    return runs


def summarize(runs: list[Run]) -> list[Summary]:
    out: list[Summary] = []
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config]
        rounds = sorted({r.round for r in mine})

        def series(name: str, attr: str, mine: list[Run] = mine, rounds: list[int] = rounds) -> list[float]:
            by_round = {r.round: getattr(r, attr) for r in mine if r.scenario == name}
            return [by_round.get(i, math.nan) for i in rounds]

        for name in dict.fromkeys(r.scenario for r in mine):
            rate, cpu = series(name, "rate"), series(name, "cpu_us")
            base_rate, base_cpu = series("bare", "rate"), series("bare", "cpu_us")
            out.append(Summary(
                config=config, scenario=name, runs=sum(not math.isnan(x) for x in rate), rate=median(rate),
                ratio=pairwise(rate, base_rate, lambda a, b: a / b),
                added_wall_us=pairwise(rate, base_rate, lambda a, b: 1e6 / a - 1e6 / b),
                added_cpu_us=pairwise(cpu, base_cpu, lambda a, b: a - b),
                cpu_us=median(cpu), server_cpu_us=median(series(name, "server_cpu_us")),
                store_commands=median(series(name, "store_commands")), rates=rate,
            ))
    return out


def as_dicts(items: list[Any]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
