"""The processes of a chaos run: a Redis of its own, a PostgreSQL database of its own, the web and the workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("IDEMTASKS_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Redis:
    """A redis-server that keeps its data across restarts (append-only file, fsync always): it is the store."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"], stdout=subprocess.DEVNULL)
        wait_port(self.port)

    def restart(self) -> None:
        self.stop()
        time.sleep(0.5)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


class Database:
    """A PostgreSQL database created for the run (the shared server is never restarted, only its connections
    to this database are terminated)."""

    def __init__(self) -> None:
        self.name = f"chaos_{uuid.uuid4().hex[:10]}"
        self.admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        base = sa.make_url(PG_ADMIN_URL)
        self.url = base.set(database=self.name).render_as_string(hide_password=False)

    def create(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))

    def terminate_connections(self) -> int:
        with self.admin.connect() as conn:
            return len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            ), {"d": self.name}).all())

    def drop(self) -> None:
        self.terminate_connections()
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}"'))
        self.admin.dispose()


class Service:
    """``uvicorn worker.web:app`` and ``celery -A worker worker`` processes sharing one environment."""

    def __init__(self, env: dict[str, str], logs: Path, workers: int) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.logs = logs
        self.port = free_port()
        self.web: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        #: Workers that exited by themselves and were started again, as a process supervisor would.
        self.exits = 0
        self._lock = threading.Lock()  # the supervisor and the fault injector both start and stop workers

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> None:
        self.web = self._spawn("web", [sys.executable, "-m", "uvicorn", "worker.web:app", "--port", str(self.port),
                                       "--log-level", "warning"])
        for i in range(len(self.workers)):
            self.start_worker(i)
        wait_port(self.port)

    def start_worker(self, i: int) -> None:
        with self._lock:
            self._start_worker(i)

    def supervise(self) -> None:
        """Start again a worker that exited by itself (a Celery worker can die of an error it calls
        unrecoverable, for example an acknowledgement on a broker connection that was just reset)."""
        with self._lock:
            for i, w in enumerate(self.workers):
                if w is not None and w.poll() is not None:
                    self.exits += 1
                    self._start_worker(i)

    def _start_worker(self, i: int) -> None:
        self.workers[i] = self._spawn(f"worker{i}", [
            sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "2", "-l", "warning",
            "-n", f"chaos{i}-{uuid.uuid4().hex[:4]}@%h", "--without-gossip", "--without-mingle"])

    def children(self) -> list[int]:
        pids = []
        for w in self.workers:
            if w is not None and w.poll() is None:
                pids += [c.pid for c in psutil.Process(w.pid).children()]
        return pids

    def kill_worker(self, i: int) -> None:
        with self._lock:
            w = self.workers[i]
            if w is None:
                return
            with contextlib.suppress(psutil.NoSuchProcess):
                for pid in [*[c.pid for c in psutil.Process(w.pid).children()], w.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            w.wait(timeout=30)
            self.workers[i] = None

    def stop(self) -> None:
        for p in [self.web, *self.workers]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [self.web, *self.workers]:
            if p is None:
                continue
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
