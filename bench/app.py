"""The benchmark's Celery app: one trivial task, ``bench.incr`` (its body is one Redis INCR), behind each library.

The publisher builds the app with :func:`make_app`; a worker subprocess builds the same app from the environment
(:mod:`bench.worker_app`), so both sides agree on the task name, its base class and its store.
Libraries other than idemtasks are imported only when asked for: CI installs the ``dev`` extra, not ``bench``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis
from celery import Celery

TASK = "bench.incr"

#: What a publish does per library: ``submit`` (idemtasks), or a plain ``apply_async`` (the lock libraries take
#: their lock inside it; Powertools de-duplicates in the worker).
LIBS = ("bare", "idemtasks", "idemtasks-keyfunc", "celery-once", "celery-singleton", "powertools")


@dataclass(frozen=True)
class AppSpec:
    """Everything a worker needs to rebuild the publisher's app; travels as ``BENCH_*`` environment variables."""

    lib: str
    broker: str
    store: str  # Redis URL of the library's state, or the SQL URL of an idemtasks store
    counter: str  # Redis URL where the body counts its executions
    counter_key: str = "bench:runs"
    queue: str = "bench"
    table: str = ""  # idemtasks SQL store table (unique per benchmark run)
    namespace: str = "bench-idemtasks"  # idemtasks Redis key prefix
    prefetch: int = 1

    def env(self) -> dict[str, str]:
        return {f"BENCH_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] = os.environ) -> AppSpec:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"BENCH_{f.name.upper()}")
            if raw is not None:
                kwargs[f.name] = int(raw) if f.type == "int" else raw
        return cls(**kwargs)

    def replace(self, **changes: Any) -> AppSpec:
        return AppSpec(**{**asdict(self), **changes})


def open_idemtasks_store(spec: AppSpec) -> Any:
    from idemtasks.stores import open_store

    if spec.store.startswith("redis"):
        return open_store(spec.store, namespace=spec.namespace)
    return open_store(spec.store, table=spec.table)


def make_app(spec: AppSpec, *, main: str = "bench") -> tuple[Celery, Any]:
    """The app and its ``bench.incr`` task, with the delivery settings idemtasks recommends, for every library
    alike: the baseline is what a deployment that cares about duplicates would run."""
    app = Celery(main, broker=spec.broker, set_as_current=False)
    app.conf.update(
        task_default_queue=spec.queue,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=spec.prefetch,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    counter = redis.Redis.from_url(spec.counter)
    counter_key = spec.counter_key
    options: dict[str, Any] = {"name": TASK, "bind": True}

    if spec.lib in ("idemtasks", "idemtasks-keyfunc"):
        from idemtasks import IdempotentTask

        options.update(base=IdempotentTask, store_url=open_idemtasks_store(spec))
        if spec.lib == "idemtasks-keyfunc":
            # Messages sent with apply_async, no submit: duplicates reach the worker and are settled by the claim.
            options["key_func"] = _key_of
    elif spec.lib == "celery-once":
        from celery_once import QueueOnce

        app.conf.ONCE = {"backend": "celery_once.backends.Redis",
                         "settings": {"url": spec.store, "default_timeout": 3600}}
        options.update(base=QueueOnce, once={"graceful": True})
    elif spec.lib == "celery-singleton":
        from celery_singleton import Singleton

        app.conf.singleton_backend_url = spec.store
        options["base"] = Singleton
    elif spec.lib == "powertools":
        body = _powertools_body(spec, counter)

        @app.task(**options)
        def incr_powertools(self: Any, key: str) -> None:
            body(order={"key": key})

        return app, incr_powertools
    elif spec.lib != "bare":
        raise ValueError(f"unknown library {spec.lib!r}; expected one of {LIBS}")

    @app.task(**options)
    def incr(self: Any, key: str) -> None:
        counter.incr(counter_key)

    return app, incr


def _key_of(key: str) -> str:
    return key


def _powertools_body(spec: AppSpec, counter: redis.Redis) -> Any:
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.persistence.redis import RedisCachePersistenceLayer

    # No Lambda context in a Celery worker, so Powertools cannot set an in-progress expiry and warns on every
    # first call; the consequence (a crashed holder blocks its key until the record's TTL) is noted in the results.
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left", category=UserWarning)
    layer = RedisCachePersistenceLayer(client=redis.Redis.from_url(spec.store))
    # The key is the task's own key: each task is distinct, so the throughput figure is the pure overhead.
    config = IdempotencyConfig(event_key_jmespath="key", expires_after_seconds=86400)

    @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
    def charge(order: dict[str, str]) -> None:
        counter.incr(spec.counter_key)

    return charge


def publisher(lib: str) -> Any:
    """How a client publishes one ``bench.incr(key)`` with library ``lib``: ``fn(task, key, queue)``."""
    if lib == "idemtasks":
        return lambda task, key, queue: task.submit((key,), key=key, queue=queue)
    if lib == "celery-once":
        return lambda task, key, queue: task.apply_async((key,), queue=queue, once={"graceful": True})
    return lambda task, key, queue: task.apply_async((key,), queue=queue)
