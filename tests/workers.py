"""Real ``celery worker`` processes for crash and duplicate-delivery tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from celery import Celery

from idemtasks import IdempotentTask
from idemtasks.stores.base import Store
from tests import services

ROOT = Path(__file__).resolve().parent.parent


def store_env(store: Store) -> dict[str, str]:
    """How a worker process opens the same isolated store as the test."""
    from idemtasks.stores.memory import MemoryStore
    from idemtasks.stores.redis import RedisStore
    from idemtasks.stores.sql import SQLStore

    if isinstance(store, RedisStore):
        return {"PROCAPP_STORE": services.REDIS_URL, "PROCAPP_OPTIONS": json.dumps({"namespace": store.namespace})}
    if isinstance(store, SQLStore):
        return {"PROCAPP_STORE": store.engine.url.render_as_string(hide_password=False),
                "PROCAPP_OPTIONS": json.dumps({"table": store.table.name})}
    assert not isinstance(store, MemoryStore), "a memory store cannot be shared with a worker process"
    raise AssertionError(type(store))


class Worker:
    """One ``celery -A tests.apps.procapp worker`` process on its own queue."""

    def __init__(self, env: dict[str, str], log: Path, *, concurrency: int = 2, pool: str = "prefork") -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.log = log
        self.concurrency = concurrency
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.apps.procapp", "worker", "--pool", self.pool,
                 "-c", str(self.concurrency), "-l", "info", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-n", f"w{uuid.uuid4().hex[:6]}@%h"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker did not become ready:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children()
        for pid in [*(c.pid for c in children), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        # The pool children too: one still dying may hold the SQLite file's write lock, and a teardown that reads
        # the file, then drops a table, would fail at once rather than wait for it.
        psutil.wait_procs(children, timeout=20)


def client_app(broker: str, queue: str, store: Store) -> tuple[Celery, dict[str, Any]]:
    """A publishing app whose tasks mirror the worker's by name (their bodies never run here)."""
    app = Celery(f"client{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)
    tasks: dict[str, Any] = {}
    for name in ("charge", "ledger_charge", "flaky", "overruns"):
        tasks[name] = app.task(shared=False, base=IdempotentTask, name=f"procapp.{name}", store_url=store,
                              bind=True)(_never)
    return app, tasks


def _never(self: Any, *args: Any, **kwargs: Any) -> None:
    raise AssertionError("the client app never runs task bodies")


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
