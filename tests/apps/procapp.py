"""A Celery app for tests that run real ``celery worker`` processes; configured entirely by environment variables.

``PROCAPP_BROKER``   broker URL               ``PROCAPP_QUEUE``    queue name (one per test)
``PROCAPP_STORE``    store URL                ``PROCAPP_OPTIONS``  JSON keyword options for the store
``PROCAPP_LEDGER``   SQL URL of the ledger (transactional charge) ``PROCAPP_LEDGER_TABLE`` its table name
``PROCAPP_COUNTER``  Redis URL where every body execution is counted (INCR), under ``PROCAPP_QUEUE``
``PROCAPP_LEASE``    lease seconds
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery

from idemtasks import IdempotentTask
from idemtasks.stores import open_store
from idemtasks.stores.sql_schema import create_tables

QUEUE = os.environ.get("PROCAPP_QUEUE", "procapp")
app = Celery("procapp", broker=os.environ.get("PROCAPP_BROKER", "redis://127.0.0.1:6379/1"))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    idemtasks_lease=float(os.environ.get("PROCAPP_LEASE", "2.0")),
    idemtasks_busy_countdown=0.3,
)
STORE = open_store(os.environ.get("PROCAPP_STORE", "memory://"), **json.loads(os.environ.get("PROCAPP_OPTIONS", "{}")))
COUNTER = redis.Redis.from_url(os.environ.get("PROCAPP_COUNTER", "redis://127.0.0.1:6379/0"))
LEDGER_URL = os.environ.get("PROCAPP_LEDGER")
metadata = sa.MetaData()
ledger = sa.Table(
    os.environ.get("PROCAPP_LEDGER_TABLE", "procapp_ledger"), metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("operation_id", sa.String(64), nullable=False),
    sa.Column("account", sa.String(64), nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
)


def count(key: str) -> None:
    COUNTER.incr(f"{QUEUE}:runs:{key}")


@app.task(base=IdempotentTask, bind=True, store_url=STORE, name="procapp.charge")
def charge(self: IdempotentTask, account: str, amount: int, delay: float = 0.0) -> dict[str, Any]:
    count(self.operation.key)
    time.sleep(delay)
    if amount > 1_000_000:
        raise ValueError(f"amount {amount} declined")
    return {"account": account, "amount": amount}


@app.task(base=IdempotentTask, bind=True, store_url=STORE, name="procapp.ledger_charge", transactional=True,
          transaction_url=LEDGER_URL)
def ledger_charge(self: IdempotentTask, account: str, amount: int, delay: float = 0.0) -> dict[str, Any]:
    count(self.operation.key)
    self.connection.execute(ledger.insert().values(operation_id=self.operation.id, account=account, amount=amount))
    COUNTER.set(f"{QUEUE}:in-body:{self.operation.key}", os.getpid())  # tells a crash test when to strike
    time.sleep(delay)  # the row is written but not committed while the worker may be killed
    return {"account": account, "amount": amount, "token": self.operation.fencing_token}


@app.task(base=IdempotentTask, bind=True, store_url=STORE, name="procapp.overruns", time_limit=1.0)
def overruns(self: IdempotentTask, seconds: float) -> str:
    """Always past its hard time limit: the pool kills the process running it, every time."""
    count(self.operation.key)
    time.sleep(seconds)
    return "finished"


class Flaky(Exception):
    pass


@app.task(base=IdempotentTask, bind=True, store_url=STORE, name="procapp.flaky", autoretry_for=(Flaky,),
          max_retries=5, default_retry_delay=0.1)
def flaky(self: IdempotentTask, failures: int) -> str:
    count(self.operation.key)
    if int(COUNTER.get(f"{QUEUE}:runs:{self.operation.key}") or 0) <= failures:
        raise Flaky("transient")
    return "ok"


if LEDGER_URL:
    create_tables(sa.create_engine(LEDGER_URL), list(metadata.tables.values()))
