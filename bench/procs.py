"""Processes the benchmark owns: its own redis-server instances and ``celery worker`` subprocesses, CPU pinning.

The shared Redis on 6379 is never touched: the bench starts private servers on free ports, with persistence off,
and shuts them down at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import redis

from bench.app import AppSpec

ROOT = Path(__file__).resolve().parent.parent
ALL_CPUS = frozenset(range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_affinity(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of ``pid`` (sched_setaffinity on a pid moves only its main thread)."""
    cpus = cpus & ALL_CPUS or ALL_CPUS
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def pinned_self(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the block with this process on ``cpus`` (``None``: leave it where it is)."""
    if cpus is None:
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    set_affinity(os.getpid(), cpus)
    try:
        yield
    finally:
        set_affinity(os.getpid(), before)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (a prefork worker's pool children)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class RedisServer:
    """A private ``redis-server`` on a free port, optionally pinned with ``taskset``."""

    def __init__(self, workdir: Path, name: str, cpu: int | None = None) -> None:
        self.workdir = workdir / name
        self.name = name
        self.cpu = cpu
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        if self.cpu is not None and self.cpu in ALL_CPUS:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server {self.name} did not start") from None
                time.sleep(0.05)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pin(self, cpus: frozenset[int]) -> None:
        set_affinity(self.pid, cpus)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def commands(self) -> int:
        """Commands executed so far, including those called inside Lua scripts."""
        stats = self.client().info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(redis.RedisError):
            self.client().shutdown(nosave=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Worker:
    """One ``celery -A bench.worker_app worker`` subprocess for one spec (one queue)."""

    def __init__(self, spec: AppSpec, log: Path, *, pool: str = "solo", concurrency: int = 1,
                 cpus: frozenset[int] | None = None, loglevel: str = "warning") -> None:
        self.spec = spec
        self.log = log
        self.pool = pool
        self.concurrency = concurrency
        self.cpus = cpus
        self.loglevel = loglevel
        self.name = f"bench{uuid.uuid4().hex[:8]}@%h"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = False) -> Worker:
        cmd = [sys.executable, "-m", "celery", "-A", "bench.worker_app", "worker", "-P", self.pool,
               "-c", str(self.concurrency), "-Q", self.spec.queue, "-l", "info" if wait_ready else self.loglevel,
               "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", self.name]
        if self.cpus is not None and self.cpus & ALL_CPUS:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(self.cpus & ALL_CPUS))), *cmd]
        env = {**os.environ, **self.spec.env(), "PYTHONPATH": str(ROOT)}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        if wait_ready:
            deadline = time.monotonic() + 60
            while b" ready." not in self.log.read_bytes():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not become ready; see {self.log}")
                time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{tail}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.pid).children(recursive=True):
                    child.kill()
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
