"""``POST /payments`` through the reference service: ``uvicorn worker.web:app`` + ``celery -A worker worker``.

The service runs on the bench's private Redis servers (operations in the state server, the broker on the broker
server) with its ledger in a SQLite file of the run's scratch directory, so nothing shared is written. Requests
come from a pool of threads, each with its own ``httpx.Client``, every one with a fresh ``Idempotency-Key``; then
the same keys are sent again once the worker has finished, and answered as replays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.duplicates import wait_idle
from bench.measure import percentile
from bench.procs import ROOT, free_port
from bench.scenarios import Bench


@dataclass
class HttpResult:
    phase: str
    requests: int
    threads: int
    p50_ms: float
    p99_ms: float
    per_second: float
    statuses: dict[str, int] = field(default_factory=dict)


def _check_alive(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError(f"a reference-service process exited with {p.returncode}; see the service logs")


def _start(workdir: Path, env: dict[str, str], port: int) -> list[subprocess.Popen[bytes]]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, cmd in (
        ("celery", [sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "warning", "-c", "2",
                    "--without-gossip", "--without-mingle", "--without-heartbeat"]),
        ("uvicorn", [sys.executable, "-m", "uvicorn", "worker.web:app", "--host", "127.0.0.1", "--port", str(port),
                     "--log-level", "warning", "--no-access-log"]),
    ):
        with (logs / f"service-{name}.log").open("ab") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _post_all(base: str, keys: list[str], threads: int, phase: str) -> HttpResult:
    def one(args: tuple[httpx.Client, str]) -> tuple[float, int]:
        client, key = args
        t0 = time.perf_counter()
        r = client.post(f"{base}/payments", json={"account": f"acct-{hash(key) % 100}", "amount": 100},
                        headers={"Idempotency-Key": key, "Authorization": "Bearer bench"})
        return time.perf_counter() - t0, r.status_code

    clients = [httpx.Client(timeout=30) for _ in range(threads)]
    try:
        jobs = [(clients[i % threads], k) for i, k in enumerate(keys)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(one, jobs))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    ms = [d[0] * 1e3 for d in done]
    statuses: dict[str, int] = {}
    for _, code in done:
        statuses[str(code)] = statuses.get(str(code), 0) + 1
    return HttpResult(phase, len(keys), threads, percentile(ms, 50), percentile(ms, 99), len(keys) / wall, statuses)


def http_bench(bench: Bench, requests: int, threads: int) -> list[HttpResult]:
    bench.broker.pin(frozenset(range(os.cpu_count() or 1)))
    bench.store.pin(frozenset(range(os.cpu_count() or 1)))
    port = free_port()
    data = bench.workdir / "service"
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IDEMTASKS_STORE_URL": bench.store.url(4),
           "CELERY_BROKER_URL": bench.broker.url(4), "DATABASE_URL": f"sqlite:///{data / 'ledger.sqlite3'}",
           "IDEMTASKS_DATA_DIR": str(data)}
    procs = _start(bench.workdir, env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            _check_alive(procs)
            try:
                if httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the reference service did not come up")
            time.sleep(0.2)
        tag = uuid.uuid4().hex[:8]
        _post_all(base, [f"warm-{tag}-{i}" for i in range(50)], threads, "warm-up")
        keys = [f"pay-{tag}-{i}" for i in range(requests)]
        first = _post_all(base, keys, threads, "first request (202)")
        wait_idle(bench.broker.client(4), "celery", lambda: _check_alive(procs), timeout=max(120.0, requests / 10))
        replay = _post_all(base, keys, threads, "replay after completion (200)")
        return [first, replay]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
