"""Store or broker outages answer 503 with Retry-After, a store that refuses answers 500, and neither leaves
anything that would block the client's retry."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.responses import Response

from idemtasks import IdempotentTask, open_store
from idemtasks.contrib.fastapi import Idempotency
from idemtasks.stores.base import Store
from idemtasks.stores.sql import SQLStore
from idemtasks.stores.sql_schema import create_tables
from tests.conftest import drop
from tests.private_redis import PrivateRedis
from tests.services import POSTGRES_URL, require
from tests.test_bad_input import free_port


def service(store: Store | str, broker: str) -> TestClient:
    celery = Celery(f"out{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    celery.conf.update(task_publish_retry=False, broker_connection_retry=False, broker_connection_timeout=1,
                       task_default_queue=f"q-{celery.main}")

    @celery.task(base=IdempotentTask, store_url=store, name=f"{celery.main}.pay")
    def pay(amount: int) -> int:
        return amount

    app = FastAPI()
    idem = Idempotency(store=store)

    @app.post("/payments")
    async def payments(request: Request) -> Response:
        return await idem.submit(request, pay, ((await request.json())["amount"],))

    return TestClient(app)


def post(client: TestClient, key: str) -> Any:
    return client.post("/payments", json={"amount": 5}, headers={"Idempotency-Key": key})


def test_unreachable_store_is_a_503_with_retry_after() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    with service(store, "memory://") as client:
        r = post(client, "k1")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "service_unavailable" and r.headers["retry-after"] == "1"


def test_unreachable_broker_is_a_503_and_the_retry_starts_afresh(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ops.sqlite3'}")
    with service(store, f"redis://127.0.0.1:{free_port()}/0") as down:
        r = post(down, "k2")
    assert r.status_code == 503 and r.json()["code"] == "service_unavailable"
    with service(store, "memory://") as up:
        again = post(up, "k2")
    assert again.status_code == 202 and "idempotent-replayed" not in again.headers


def test_a_redis_store_out_of_memory_is_a_503_and_the_retry_starts_afresh(private_redis: PrivateRedis) -> None:
    """A script refused for memory wrote nothing: the client is told to come back, and its retry is a first try."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("maxmemory", 1)  # below what the server already uses: every write is refused (noeviction)
    store = open_store(private_redis.url)
    with service(store, "memory://") as client:
        r = post(client, "k3")
    assert r.status_code == 503 and r.json()["code"] == "service_unavailable" and r.headers["retry-after"] == "1"
    admin.config_set("maxmemory", 0)
    with service(store, "memory://") as client:
        again = post(client, "k3")
    assert again.status_code == 202 and "idempotent-replayed" not in again.headers


def test_a_store_that_refuses_is_a_500_and_the_retry_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    """A store that answers with an error (here its table does not exist yet) is not an outage: no Retry-After,
    the cause in the log and not in the response, and nothing left that would block the key."""
    require("postgres")
    store = SQLStore(POSTGRES_URL, table=f"t{uuid.uuid4().hex[:12]}", create_schema=False)
    try:
        with service(store, "memory://") as client:
            r = post(client, "k4")
        assert r.status_code == 500 and r.json()["code"] == "store_error" and "retry-after" not in r.headers
        assert store.table.name not in r.text
        assert "UndefinedTable" in caplog.text and store.table.name in caplog.text
        create_tables(store.engine, [store.table])
        with service(store, "memory://") as client:
            again = post(client, "k4")
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers
    finally:
        drop(store)


def flask_service(store: str) -> Any:
    import flask

    from idemtasks.contrib.flask import Idempotency as FlaskIdempotency

    celery = Celery(f"out{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

    @celery.task(base=IdempotentTask, store_url=store, name=f"{celery.main}.pay")
    def pay(amount: int) -> int:
        return amount

    app = flask.Flask(__name__)
    idem = FlaskIdempotency(app, store=store)

    @app.post("/payments")
    def payments() -> flask.Response:
        return idem.submit(pay, (flask.request.get_json()["amount"],))

    return app.test_client()


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_a_store_given_by_url_and_down_when_first_used_is_a_503_and_the_retry_starts_afresh(
        tmp_path: Path, framework: str) -> None:
    """The endpoint opens a store given by URL on its first request (a SQL store creates its schema then): a
    database that cannot be opened yet is an outage like any other, not an unhandled 500."""
    url = f"sqlite:///{tmp_path / 'not-yet' / 'ops.sqlite3'}"  # its directory does not exist yet: cannot open

    def attempt() -> Any:
        if framework == "flask":
            r = flask_service(url).post("/payments", json={"amount": 5}, headers={"Idempotency-Key": "k5"})
            return r.status_code, r.headers, r.get_json()
        with service(url, "memory://") as client:
            r = post(client, "k5")
        return r.status_code, r.headers, r.json()

    status, headers, body = attempt()
    assert status == 503 and body["code"] == "service_unavailable" and headers["retry-after"] == "1"
    (tmp_path / "not-yet").mkdir()
    status, headers, body = attempt()
    assert status == 202 and "idempotent-replayed" not in headers and body["status"] == "pending"
