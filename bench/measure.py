"""Small measuring tools: statistics, and watching a worker drain a queue without disturbing it."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with a few thousand samples p99 is an observed value)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def pairwise(a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float]) -> float:
    """Median of ``op(a[i], b[i])`` over the rounds both ran: each pair shares a round, so slow drift cancels."""
    pairs = [op(x, y) for x, y in zip(a, b, strict=False) if not (math.isnan(x) or math.isnan(y))]
    return median(pairs)


@dataclass
class Drain:
    """One timed drain: ``tasks`` bodies ran in ``seconds``, costing the worker ``cpu`` seconds."""

    tasks: int
    seconds: float
    cpu: float
    server_cpu: float = 0.0
    store_commands: int = 0

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.tasks * 1e6 if self.tasks else math.nan

    @property
    def server_cpu_us(self) -> float:
        return self.server_cpu / self.tasks * 1e6 if self.tasks else math.nan


def watch_drain(count: Callable[[], int], total: int, *, warmup: int, probes: Callable[[], tuple[float, ...]],
                alive: Callable[[], None], timeout: float) -> tuple[Drain, tuple[float, ...], tuple[float, ...]]:
    """Poll ``count()`` until it reaches ``total``; time the window from the first sample at or past ``warmup``
    (the first tasks pay for connections and lazy imports) to the sample that sees ``total``.

    The poller shares a CPU with the worker in the pinned configuration, so it sleeps long while far from the end
    and polls finely only near it, where the end time must be sharp. ``probes()`` returns the readings (CPU
    counters…) taken at both ends of the window.
    """
    deadline = time.monotonic() + timeout
    start: tuple[float, int, tuple[float, ...]] | None = None
    while True:
        now = time.perf_counter()
        done = count()
        if start is None and done >= warmup:
            start = (now, done, probes())
        if done >= total:
            if start is None or start[1] >= total:
                raise RuntimeError(f"the drain finished before the warm-up mark ({warmup} of {total})")
            end = probes()
            return Drain(total - start[1], now - start[0], 0.0), start[2], end
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s with {done}/{total} tasks done")
        alive()
        if start is None or done <= start[1]:
            time.sleep(0.005)
            continue
        rate = (done - start[1]) / max(now - start[0], 1e-6)
        left = (total - done) / rate
        time.sleep(min(0.05, max(0.0005, left / 4)))


def fmt(value: Any, digits: int = 0, *, signed: bool = False) -> str:
    """A table cell: ``n/a`` for missing values, thousands separators, an explicit sign where asked."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    return f"{value:+,.{digits}f}" if signed else f"{value:,.{digits}f}"
