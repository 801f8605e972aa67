"""``python -m bench.run [--tasks N] [--runs R] [--quick] [--only a,b] [--sections …] [--out DIR]``

Runs every section in one go and writes ``RESULTS.md``, ``results.json`` and ``throughput.png`` to ``--out``
(default ``bench/results``). Needs ``redis-server`` on the PATH (the bench starts its own instances) and, for the
PostgreSQL scenario, the server on 127.0.0.1:5432; a scenario whose library or server is missing is listed under
"Not run" instead of failing the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import duplicates, growth, instructions, latency, report, roundtrips, throughput, web
from bench.measure import percentile
from bench.procs import ROOT, pinned_self
from bench.scenarios import BY_NAME, KEYFUNC, SCENARIOS, Bench, Scenario, postgres_reachable, unavailable

log = logging.getLogger("bench")
SECTIONS = ("throughput", "roundtrips", "duplicates", "latency", "instructions", "growth", "http")
# Bare Celery runs every publish (10 per key) by construction; --dup-scenarios adds it back as a check.
DUP_DEFAULT = ("idemtasks-redis", "idemtasks-redis-keyfunc", "celery-once", "celery-singleton", "powertools")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[1])
    p.add_argument("--tasks", type=int, help="tasks per throughput run (default 5000; --quick 300)")
    p.add_argument("--runs", type=int, help="interleaved rounds per configuration (default 5; --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke run, not a measurement")
    p.add_argument("--only", help=f"comma-separated scenarios (default all: {', '.join(s.name for s in SCENARIOS)})")
    p.add_argument("--configs", default="pinned,prefork", help="throughput configurations (pinned, prefork)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"what to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--dup-scenarios", default=",".join(DUP_DEFAULT), help="scenarios of the duplicate workload")
    p.add_argument("--dup-keys", type=int, help="keys of the duplicate workload (default 500, 10 copies each)")
    p.add_argument("--latency-samples", type=int, help="publishes timed per scenario (default 2000)")
    p.add_argument("--growth-sizes", help="stored operations at which growth is measured (default 10000,1000000)")
    p.add_argument("--growth-stores", default="redis,postgres", help="growth stores (redis, postgres, sqlite)")
    p.add_argument("--http-requests", type=int, help="requests per HTTP phase (default 2000)")
    p.add_argument("--instr-iterations", type=int, help="iterations counted per path under callgrind (default 200)")
    p.add_argument("--instr-paths", default="worker,publish", help="paths counted under callgrind (worker, publish)")
    p.add_argument("--prefetch", type=int, default=1, help="worker_prefetch_multiplier (default 1, as recommended)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (worker logs)")
    a = p.parse_args(argv)
    q = a.quick
    a.tasks = a.tasks or (300 if q else 5000)
    a.runs = a.runs or (1 if q else 5)
    a.dup_keys = a.dup_keys or (20 if q else 500)
    a.latency_samples = a.latency_samples or (100 if q else 2000)
    a.growth_sizes = [int(x) for x in (a.growth_sizes or ("2000,10000" if q else "10000,1000000")).split(",")]
    a.http_requests = a.http_requests or (100 if q else 2000)
    a.instr_iterations = a.instr_iterations or (10 if q else 200)
    a.sections = [s for s in a.sections.split(",") if s]
    unknown = set(a.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return a


def select(names: str | None, pool: tuple[Scenario, ...], skipped: dict[str, str]) -> list[Scenario]:
    wanted = [BY_NAME[n] for n in names.split(",")] if names else list(pool)
    out = []
    for s in wanted:
        why = unavailable(s)
        if why:
            skipped[s.name] = why
        else:
            out.append(s)
    return out


def revision() -> str:
    """The commit measured, and whether the library's files differed from it (workers import them afresh)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "idemtasks")
    return f"{head}{' with uncommitted changes under idemtasks/' if dirty else ''}"


def meta(a: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    versions = {"python": platform.python_version(), "redis-server": next((w[2:] for w in redis_v if
                                                                         w.startswith("v=")), "?")}
    for dist in ("celery", "kombu", "redis", "SQLAlchemy", "psycopg", "celery-once", "celery-singleton",
                 "aws-lambda-powertools"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "command": shlex.join(["python", "-m", "bench.run", *argv]),
        "revision": revision(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "tasks": a.tasks,
        "workload": (f"`bench.incr(key)`, whose body is one Redis INCR; {a.tasks:,} tasks per run published up "
                     f"front to a Redis broker, then drained by a fresh `celery worker`; {a.runs} interleaved "
                     "rounds per configuration; result backend off; task_acks_late, task_reject_on_worker_lost and "
                     f"worker_prefetch_multiplier={a.prefetch} for every scenario. tasks/s is timed from the "
                     "2nd percent of the tasks done to the last one (connections and lazy imports excluded); "
                     "ratios and added µs are medians of per-round pairs with bare Celery."),
        "configs": {c.name: c.description for c in throughput.CONFIGS.values()},
        "orders": duplicates.ORDERS,
        "http": ("`uvicorn worker.web:app` (one process) + `celery -A worker worker -c 2` on the bench's Redis "
                 "servers, ledger in SQLite; keys all distinct; replays sent after the worker finished."),
        "notes": [
            "Two private redis-servers (broker + counter; de-duplication state of every library), persistence off.",
            "PostgreSQL is the shared server on 127.0.0.1:5432 and is not pinned; the bench uses its own table.",
            "Worker CPU is the worker process tree's user + system time over the timed window (psutil).",
            "Other processes on the machine (other sessions' test runs) are not controlled: see the per-run dots "
            "in throughput.png for the spread.",
        ],
    }


def calibrate(bench: Bench) -> str:
    """A Redis round trip on this machine, the unit every added µs figure is made of."""
    out = []
    for label, cpus, redis_cpus in (("pinned, CPU 1 to CPU 0", frozenset({1}), frozenset({0})),
                                    ("unpinned", None, frozenset(range(os.cpu_count() or 1)))):
        bench.store.pin(redis_cpus)
        client = bench.store.client()
        with pinned_self(cpus):
            for _ in range(200):
                client.ping()
            times = []
            for _ in range(3000):
                t0 = time.perf_counter()
                client.ping()
                times.append((time.perf_counter() - t0) * 1e6)
        out.append(f"{label}: p50 {percentile(times, 50):.0f} µs, p99 {percentile(times, 99):.0f} µs")
    return "Redis PING round trip from Python (redis-py + hiredis) — " + "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.monotonic()
    skipped: dict[str, str] = {}
    scenarios = select(a.only, SCENARIOS, skipped)
    if "bare" not in {s.name for s in scenarios} and "throughput" in a.sections:
        scenarios.insert(0, BY_NAME["bare"])  # every ratio is to bare Celery
    names = {s.name for s in scenarios}
    dup_pool = [n for n in a.dup_scenarios.split(",") if n in names or (n == KEYFUNC.name and "idemtasks-redis"
                                                                             in names)]
    workdir = Path(tempfile.mkdtemp(prefix="idemtasks-bench-"))
    res: dict[str, Any] = {"meta": meta(a, argv), "skipped": skipped}
    bench = Bench(workdir, prefetch=a.prefetch).start()
    logs = workdir / "logs"
    try:
        res["meta"]["notes"].insert(0, calibrate(bench))
        if "throughput" in a.sections:
            runs: list[throughput.Run] = []
            for name in a.configs.split(","):
                log.info("throughput, %s: %d tasks x %d rounds x %d scenarios", name, a.tasks, a.runs, len(scenarios))
                runs += throughput.run_config(bench, scenarios, throughput.CONFIGS[name], a.tasks, a.runs, logs)
            res["runs"] = throughput.as_dicts(runs)
            res["throughput"] = throughput.as_dicts(throughput.summarize(runs))
        if "roundtrips" in a.sections:
            log.info("round trips per task")
            bench.broker.pin(throughput.CONFIGS["pinned"].redis_cpus)
            res["roundtrips"] = [asdict(roundtrips.probe(bench, s, min(200, a.tasks), logs)) for s in scenarios]
        if "duplicates" in a.sections:
            res["duplicates"] = []
            for name in dup_pool:
                for order in duplicates.ORDERS:
                    d = duplicates.run_order(bench, BY_NAME[name], order, a.dup_keys, 10, logs)
                    log.info("duplicates %-24s %-6s %5d executions, %5d messages", name, order, d.executions,
                             d.messages)
                    res["duplicates"].append(asdict(d))
        if "latency" in a.sections:
            log.info("publish and replay latency")
            res["submit_latency"] = [asdict(x) for x in latency.submit_latency(bench, scenarios, a.latency_samples)]
            res["replay_latency"] = [asdict(x) for x in latency.replay_latency(
                bench, [s for s in scenarios if s.lib in ("idemtasks", "powertools")], min(a.latency_samples, 1000))]
        if "instructions" in a.sections:
            why = instructions.available()
            if why:
                skipped["instructions (all scenarios)"] = why
            else:
                log.info("instructions per task under callgrind, %d iterations per path", a.instr_iterations)
                paths = [path for path in a.instr_paths.split(",") if path]
                res["instructions"] = [asdict(c) for c in instructions.run(bench, scenarios, a.instr_iterations,
                                                                           paths)]
        if "growth" in a.sections:
            stores = [s for s in a.growth_stores.split(",") if s != "postgres" or postgres_reachable()]
            log.info("growth: %s at %s stored operations", ", ".join(stores), a.growth_sizes)
            points, prints = growth.run_growth(bench, a.growth_sizes, min(2000, a.latency_samples), stores)
            res["growth"], res["footprint"] = [asdict(p) for p in points], [asdict(f) for f in prints]
        if "http" in a.sections:
            log.info("HTTP through the reference service")
            res["http"] = [asdict(h) for h in web.http_bench(bench, a.http_requests, 8)]
    except BaseException:
        log.error("failed; worker logs are in %s", workdir)
        a.keep = True
        raise
    finally:
        bench.close()
        res["meta"]["elapsed_min"] = (time.monotonic() - started) / 60
        if len(res) > 2:
            report.write(res, a.out)
            log.info("wrote %s", a.out / "RESULTS.md")
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
