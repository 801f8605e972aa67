"""End to end: ``uvicorn worker.web:app`` and ``celery -A worker worker`` as real processes.

Run on the embedded defaults (SQLite files and a server-less broker) and on Redis + PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests import services
from tests.test_bad_input import free_port
from tests.workers import ROOT

pytestmark = pytest.mark.slow


class Service:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Service:
        for name, cmd in (("worker", [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "2",
                                      "-l", "info", "--without-gossip", "--without-mingle"]),
                          ("web", [sys.executable, "-m", "uvicorn", "worker.web:app", "--port", str(self.port)])):
            with (self.tmp / f"{name}.log").open("ab") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out,
                                                   stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                # The status route: it touches neither the ledger nor its table, which the first payment must find
                # made by the worker (the web process makes it too, as it shows an account).
                if httpx.get(f"{self.base}/operations/warm-up", timeout=1).status_code == 404:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("service did not start:\n" + (self.tmp / "web.log").read_text()[-2000:])

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        deadline = time.monotonic() + 4
        for p in self.procs:
            try:
                # A warm shutdown takes 2-4 s here; now and then a pool child then waits for its parent to read
                # its last acknowledgements, which billiard allows 30 s. Nothing checks a stopped service: kill it.
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def post(self, body: Any, key: str, token: str = "alice") -> httpx.Response:
        headers = {"Idempotency-Key": key, **({"Authorization": f"Bearer {token}"} if token else {})}
        return httpx.post(f"{self.base}/payments", json=body, timeout=10, headers=headers)

    def get(self, path: str, token: str = "alice") -> httpx.Response:
        return httpx.get(f"{self.base}{path}", timeout=10, headers={"Authorization": f"Bearer {token}"})

    def final(self, location: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.get(location).json()
            if body["status"] in ("succeeded", "failed"):
                return body
            time.sleep(0.2)
        raise AssertionError(f"{location} did not finish")


@pytest.fixture(scope="module", params=["embedded", "redis+postgres"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    env = {"IDEMTASKS_DATA_DIR": str(tmp / "data")}
    namespace_db = None
    if request.param == "redis+postgres":
        services.require("redis")
        services.require("postgres")
        base = services.REDIS_URL.rsplit("/", 1)[0]
        namespace_db = f"{base}/5"
        env.update(IDEMTASKS_STORE_URL=namespace_db, CELERY_BROKER_URL=f"{base}/6",
                   DATABASE_URL=services.POSTGRES_URL)
    svc = Service(env, tmp).start()
    yield svc
    svc.stop()
    if namespace_db is not None:
        for url in (namespace_db, env["CELERY_BROKER_URL"]):
            redis.Redis.from_url(url).flushdb()  # databases 5 and 6 belong to this test alone


def acct(prefix: str = "acct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_replay_returns_the_same_operation_and_charges_once(service: Service) -> None:
    a = acct()
    first = service.post({"account": a, "amount": 700}, "k-" + a)
    assert first.status_code == 202
    done = service.final(first.headers["location"])
    assert done["result"] == {"payment_id": done["id"], "account": a, "amount": 700}
    again = service.post({"account": a, "amount": 700}, "k-" + a)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert service.get(f"/accounts/{a}").json()["balance"] == 700


def test_key_reused_with_another_payload_is_a_422(service: Service) -> None:
    a = acct()
    service.post({"account": a, "amount": 1}, "k-" + a)
    r = service.post({"account": a, "amount": 2}, "k-" + a)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")


def test_20_concurrent_identical_posts_make_one_operation_and_one_ledger_row(service: Service) -> None:
    a = acct()

    def client() -> str:
        for _ in range(100):  # clients retry 409 after Retry-After, as Stripe's libraries do
            r = service.post({"account": a, "amount": 30}, "k-" + a)
            if r.status_code != 409:
                assert r.status_code in (200, 202), r.text
                return str(r.json()["id"])
            time.sleep(float(r.headers["retry-after"]) / 10)
        raise AssertionError("still in use")

    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(lambda _: client(), range(20)))
    assert len(ids) == 1
    service.final(f"/operations/{ids.pop()}")
    account = service.get(f"/accounts/{a}").json()
    assert account["balance"] == 30 and len(account["charges"]) == 1


def test_declined_amount_is_a_stored_failure_without_a_ledger_row(service: Service) -> None:
    a = acct()
    r = service.post({"account": a, "amount": 5_000_000}, "k-" + a)
    done = service.final(r.headers["location"])
    assert done["status"] == "failed" and done["error"]["type"] == "Declined"
    replay = service.post({"account": a, "amount": 5_000_000}, "k-" + a)
    assert replay.status_code == 200 and replay.json()["error"] == done["error"]
    assert service.get(f"/accounts/{a}").json()["charges"] == []


def test_flaky_account_fails_once_then_charges_once(service: Service) -> None:
    a = acct("flaky")
    r = service.post({"account": a, "amount": 12}, "k-" + a)
    done = service.final(r.headers["location"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert len(service.get(f"/accounts/{a}").json()["charges"]) == 1


def test_another_caller_cannot_see_the_operation(service: Service) -> None:
    a = acct()
    r = service.post({"account": a, "amount": 3}, "k-" + a, token="alice")
    assert service.get(r.headers["location"], token="mallory").status_code == 404
    assert service.get(r.headers["location"], token="alice").status_code == 200


@pytest.mark.parametrize("body", [b"not json", b'{"account": "x"}', b'{"account": "x", "amount": -5}'])
def test_invalid_bodies_are_problems_and_store_nothing(service: Service, body: bytes) -> None:
    key = f"k-{uuid.uuid4().hex}"
    r = httpx.post(f"{service.base}/payments", content=body, timeout=10,
                   headers={"Idempotency-Key": key, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    ok = service.post({"account": acct(), "amount": 1}, key, token="")
    assert ok.status_code == 202
