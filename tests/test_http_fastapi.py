"""The HTTP rules through the FastAPI adapter and Starlette's test client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from celery import Celery
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.testclient import TestClient
from starlette.responses import Response

import idemtasks.contrib.fastapi
from idemtasks import IdempotentTask
from idemtasks.contrib.fastapi import Idempotency
from idemtasks.http.core import HttpPolicy
from idemtasks.stores.memory import MemoryStore
from tests.http_rules import (
    BACKENDS,
    CONFLICT,
    OPTIONAL,
    Api,
    HttpRules,
    Resp,
    acct,
    basic,
    lower,
    pay_body,
    paying_worker,
    store_for,
)


@dataclass
class Served:
    api: Api
    mounted: Api  # the same application, mounted under /api in another (ASGI root_path="/api")
    v1: Api  # another application, with status_prefix="/v1" and the tenant as caller


def tenant(headers: Mapping[str, str]) -> str | None:
    """A custom caller identity: the tenant header instead of the Bearer token. Asked for as X-Tenant, though
    Starlette spells it x-tenant: a lookup that missed would put every tenant in the anonymous scope."""
    return headers.get("X-Tenant")


def sender(client: TestClient) -> Callable[[str, str, bytes, dict[str, str]], Resp]:
    def send(method: str, path: str, body: bytes, headers: dict[str, str]) -> Resp:
        raw = {k: v.encode("latin-1") for k, v in headers.items()}
        r = client.request(method, path, content=body or None, headers=raw)
        return Resp(r.status_code, lower(r.headers), r.content)

    return send


@pytest.fixture(scope="module", params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with store_for(request, tmp_path_factory) as store, paying_worker(store) as (task, runs):
        app = FastAPI()
        idem = Idempotency(store=store)
        app.include_router(idem.router)

        @app.post("/payments")
        async def payments(request: Request) -> Response:
            problem = await idem.check(request)
            if problem is not None:
                return problem
            args = pay_body(await request.json())
            if args is None:
                return Response(status_code=400)
            return await idem.submit(request, task, args)

        @app.post("/tips")
        async def tips(request: Request) -> Response:
            return await idem.submit(request, task, pay_body(await request.json()), policy=OPTIONAL)

        @app.post("/strict")
        async def strict(request: Request) -> Response:
            return await idem.submit(request, task, pay_body(await request.json()), policy=CONFLICT)

        @app.post("/forms")
        async def forms(request: Request) -> Response:
            # Reads its form (and its upload) before submitting, which leaves no raw body to read.
            async with request.form() as form:  # closes the upload's temporary file on the way out
                receipt = form["receipt"]
                assert not isinstance(receipt, str)
                await receipt.read()
                problem = await idem.check(request)
                if problem is not None:
                    return problem
                return await idem.submit(request, task, (str(form["account"]), int(str(form["amount"]))))

        @app.post("/streamed")
        async def streamed(request: Request) -> Response:
            # Reads its raw body as a stream before submitting, which leaves nothing to fingerprint.
            raw = b"".join([chunk async for chunk in request.stream()])
            return await idem.submit(request, task, pay_body(json.loads(raw)))

        outer = FastAPI()
        outer.mount("/api", app)
        outer.mount("/t/{tenant}", app)  # root_path holds the decoded tenant: any character at all
        v1_app = FastAPI()
        v1 = Idempotency(store=store, caller=tenant, status_prefix="/v1")
        v1_app.include_router(v1.router)

        @v1_app.post("/v1/payments")
        async def v1_payments(request: Request) -> Response:
            return await v1.submit(request, task, pay_body(await request.json()))

        with TestClient(app) as client, TestClient(outer) as mounted, TestClient(v1_app) as v1_client:
            yield Served(Api(sender(client), store, runs), Api(sender(mounted), store, runs),
                         Api(sender(v1_client), store, runs))


@pytest.fixture
def api(served: Served) -> Api:
    return served.api


@pytest.fixture
def tenants(served: Served) -> Api:
    return served.v1


class TestFastAPI(HttpRules):
    adapter = idemtasks.contrib.fastapi

    def test_under_a_mount_the_location_leads_to_the_status_route(self, served: Served) -> None:
        """Mounted at /api, the application's routes live under /api (ASGI root_path): so must Location."""
        r = served.mounted.post({"account": (a := acct()), "amount": 5}, "k-" + a, path="/api/payments")
        assert r.status_code == 202 and r.headers["location"] == f"/api/operations/{r.json()['id']}"
        assert served.mounted.get(r.headers["location"]).status_code == 200
        assert served.mounted.final(r.headers["location"]).json()["result"] == {"account": a, "amount": 5}

    @pytest.mark.parametrize("segment", ["%E6%97%A5%20x", "%C3%BC", "100%25"])
    def test_a_mount_point_outside_ascii_is_percent_encoded_in_the_location(self, served: Served,
                                                                            segment: str) -> None:
        """Starlette puts the decoded path in root_path: sent as it is, a character outside Latin-1 made every
        retry a 500 after the payment was queued, and one inside it made a Location that is no URI."""
        r = served.mounted.post({"account": (a := acct()), "amount": 6}, "k-" + a, path=f"/t/{segment}/payments")
        assert r.status_code == 202 and r.headers["location"] == f"/t/{segment}/operations/{r.json()['id']}"
        assert served.mounted.final(r.headers["location"]).json()["result"] == {"account": a, "amount": 6}


def test_the_openapi_schema_lists_the_status_route_once() -> None:
    """HEAD is served but kept out of the schema: one route for both methods gave two operations one operationId,
    which FastAPI warns about (an error under this suite's warning filter) and client generators refuse."""
    app = FastAPI()
    app.include_router(Idempotency(store=MemoryStore()).router)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    assert list(schema["paths"]["/operations/{operation_id}"]) == ["get"]


@pytest.mark.parametrize(("policy", "limit"), [(None, 1024 * 1024), (HttpPolicy(max_body_bytes=100), 100)])
def test_a_body_declared_over_the_limit_is_refused_without_being_read(policy: HttpPolicy | None, limit: int) -> None:
    """The 413 goes by Content-Length, before any of the body is received; the policy given to submit() is the one.
    (The reviewer's probe: an 8 MiB body, counted as the application receives it.)"""
    app = FastAPI()
    idem = Idempotency(store=MemoryStore())

    @app.post("/payments")
    async def payments(request: Request) -> Response:
        return await idem.submit(request, object(), policy=policy)

    received: list[int] = []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            received.append(len(message.get("body", b"")))
            return message

        await app(scope, counted, send)

    with TestClient(counting) as client:
        r = client.post("/payments", content=b"x" * max(limit + 1, 8 * 1024 * 1024),
                        headers={"Idempotency-Key": "k", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert sum(received) == 0


@pytest.mark.parametrize("name", ["Authorization", "Idempotency-Key"])
def test_a_request_that_repeats_its_credentials_or_its_key_is_refused(name: str) -> None:
    """Starlette keeps every copy of a repeated header, and FastAPI's own security (HTTPBasic, HTTPBearer) reads the
    first. Had idemtasks read another copy, a request authenticated as one tenant would act in another's scope:
    replay its results, learn its operation ids from a mismatch, read their status. Neither header may be repeated."""
    store = MemoryStore()
    app = FastAPI()
    idem = Idempotency(store=store)
    app.include_router(idem.router)
    checked: list[str] = []
    authenticated = Depends(HTTPBasic())

    @app.post("/payments")
    async def payments(request: Request, who: HTTPBasicCredentials = authenticated) -> Response:
        checked.append(who.username)
        return await idem.submit(request, object(), ("acct", 5))

    copies = {"Authorization": [basic("mallory", "pw"), basic("alice")], "Idempotency-Key": ["k1", "k2"]}[name]
    headers = [("Authorization", basic("mallory", "pw")), ("Idempotency-Key", "k1"),
               ("Content-Type", "application/json")]
    headers = [(k, v) for k, v in headers if k != name] + [(name, value) for value in copies]
    with TestClient(app) as client:
        r = client.post("/payments", content=b'{"account": "acct", "amount": 5}', headers=headers)
    assert checked == ["mallory"]  # what the application authenticated
    assert r.status_code == 400, r.text
    codes = {"Authorization": "credentials_invalid", "Idempotency-Key": "idempotency_key_invalid"}
    assert r.json()["code"] == codes[name]
    assert name in r.json()["detail"]
    assert not store._records  # nothing recorded, under anyone's scope


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port whose connections are accepted (by the kernel, into the backlog) and never answered: a database
    server that is frozen, or behind a network that drops what it sends."""
    with socket.create_server(("127.0.0.1", 0), backlog=32) as server:
        yield server.getsockname()[1]


def test_a_store_given_by_url_is_opened_off_the_loop_so_other_requests_go_on() -> None:
    """The first request opens the store: it connects, which against a database that does not answer takes the
    connect timeout. Meanwhile the process answers its other requests; the request itself gets a 503."""
    with _silent_server() as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=1"
        celery = Celery(f"f{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)

        @celery.task(shared=False, base=IdempotentTask, store_url=url, name=f"{celery.main}.pay")
        def pay(amount: int) -> int:
            return amount

        app = FastAPI()
        idem = Idempotency(store=url)
        app.include_router(idem.router)

        @app.post("/payments")
        async def payments(request: Request) -> Response:
            return await idem.submit(request, pay, (1,))

        @app.get("/health")
        async def health() -> dict[str, bool]:
            return {"ok": True}

        async def scenario() -> tuple[int, float, int, int]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                posted = asyncio.create_task(client.post("/payments", headers={"Idempotency-Key": "k1"}))
                polled = asyncio.create_task(client.get(f"/operations/{'ab' * 28}"))
                started = time.monotonic()
                await asyncio.sleep(0.3)  # both are opening the store by now
                answer = await client.get("/health")
                waited = time.monotonic() - started - 0.3
                return answer.status_code, waited, (await posted).status_code, (await polled).status_code

        status, waited, posted, polled = asyncio.run(scenario())
    assert status == 200 and waited < 1.0
    assert posted == polled == 503
