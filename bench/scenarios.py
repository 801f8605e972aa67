"""The scenarios under test, and the shared set-up they run on (private Redis servers, a PostgreSQL table, SQLite).

Two private Redis servers: ``broker`` (Celery's broker, and the counter the task body increments) and ``store``
(every library's de-duplication state). Keeping the state apart makes its command counts exact and mirrors a
deployment that gives the broker its own instance; the comparison stays fair since every library gets the same.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.app import AppSpec, make_app
from bench.procs import RedisServer

POSTGRES_URL = os.environ.get("IDEMTASKS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Scenario:
    name: str
    lib: str  # see bench.app.LIBS
    store: str = "redis"  # where the library keeps its state: redis, postgres(-async-commit) or sqlite
    package: str = ""  # module that must be importable

    @property
    def publishes_with(self) -> str:
        return "submit" if self.lib == "idemtasks" else "apply_async"


SCENARIOS = (
    Scenario("bare", "bare"),
    Scenario("idemtasks-redis", "idemtasks"),
    Scenario("idemtasks-postgres", "idemtasks", "postgres"),
    # The same store with the server's commit flush off: what the flush costs, at a price in durability (README).
    Scenario("idemtasks-postgres-async-commit", "idemtasks", "postgres-async-commit"),
    Scenario("idemtasks-sqlite", "idemtasks", "sqlite"),
    Scenario("celery-once", "celery-once", package="celery_once"),
    Scenario("celery-singleton", "celery-singleton", package="celery_singleton"),
    Scenario("powertools", "powertools", package="aws_lambda_powertools"),
)
#: Duplicate workload only: idemtasks without submit, every copy published, settled by the worker's claim.
KEYFUNC = Scenario("idemtasks-redis-keyfunc", "idemtasks-keyfunc")
BY_NAME = {s.name: s for s in (*SCENARIOS, KEYFUNC)}


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return True
    except OSError:
        return False


def unavailable(s: Scenario) -> str | None:
    """Why a scenario cannot run here, or ``None``."""
    if s.package and importlib.util.find_spec(s.package) is None:
        return f"{s.package} is not installed (pip install -e '.[bench]')"
    if s.store.startswith("postgres") and not postgres_reachable():
        return "PostgreSQL is not reachable on 127.0.0.1:5432"
    return None


class Bench:
    """Servers and stores shared by every section of one benchmark run."""

    def __init__(self, workdir: Path, *, prefetch: int = 1, redis_cpu: int | None = 0) -> None:
        self.workdir = workdir
        self.prefetch = prefetch
        self.tag = uuid.uuid4().hex[:8]
        self.broker = RedisServer(workdir, "broker", cpu=redis_cpu)
        self.store = RedisServer(workdir, "store", cpu=redis_cpu)
        self.table = f"bench_ops_{self.tag}"  # unique, dropped in close()
        self.sqlite_url = f"sqlite:///{workdir / 'store.sqlite3'}"
        self._clients: dict[str, tuple[Any, Any]] = {}
        self._sql_engines: list[Any] = []

    def start(self) -> Bench:
        self.broker.start()
        self.store.start()
        return self

    def store_url(self, s: Scenario) -> str:
        if s.store == "postgres":
            return POSTGRES_URL
        if s.store == "postgres-async-commit":
            return POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + "options=-c%20synchronous_commit%3Doff"
        if s.store == "sqlite":
            return self.sqlite_url
        return self.store.url(0)

    def spec(self, s: Scenario, *, queue: str = "bench", counter_key: str = "bench:runs") -> AppSpec:
        return AppSpec(lib=s.lib, broker=self.broker.url(0), store=self.store_url(s), counter=self.broker.url(1),
                       counter_key=counter_key, queue=queue, table=self.table, namespace=f"bench-{self.tag}",
                       prefetch=self.prefetch)

    def client(self, s: Scenario) -> Any:
        """The publisher's copy of the scenario's task (one app per scenario, reused across runs)."""
        if s.name not in self._clients:
            app, task = make_app(self.spec(s), main=f"bench-client-{s.name}")
            self._clients[s.name] = (app, task)
            store = getattr(task, "store_url", None)
            if hasattr(store, "engine"):
                self._sql_engines.append(store)
        return self._clients[s.name][1]

    def counter(self) -> Any:
        return self.broker.client(1)

    def reset_state(self) -> None:
        """Start every run from empty stores, so runs of one scenario are alike (growth is measured apart)."""
        self.store.client(0).flushdb()
        for store in self._sql_engines:
            verb = "TRUNCATE" if store.dialect == "postgresql" else "DELETE FROM"  # no dead rows left behind
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"{verb} {store.table.name}")

    def close(self) -> None:
        for store in self._sql_engines:
            try:
                store.table.drop(store.engine, checkfirst=True)
            finally:
                store.close()
                store.engine.dispose()
        for app, _ in self._clients.values():
            app.close()
        self.broker.stop()
        self.store.stop()
