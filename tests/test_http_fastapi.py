"""The HTTP rules through the FastAPI adapter and Starlette's test client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.responses import Response

import idemtasks.contrib.fastapi
from idemtasks.contrib.fastapi import Idempotency
from tests.http_rules import (
    BACKENDS,
    CONFLICT,
    OPTIONAL,
    Api,
    HttpRules,
    Resp,
    lower,
    pay_body,
    paying_worker,
    store_for,
)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
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

        with TestClient(app) as client:
            def send(method: str, path: str, body: bytes, headers: dict[str, str]) -> Resp:
                raw = {k: v.encode("latin-1") for k, v in headers.items()}
                r = client.request(method, path, content=body or None, headers=raw)
                return Resp(r.status_code, lower(r.headers), r.content)

            yield Api(send, store, runs)


class TestFastAPI(HttpRules):
    adapter = idemtasks.contrib.fastapi

    pass
