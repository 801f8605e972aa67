"""HTTP API of the reference service: ``uvicorn worker.web:app``.

``POST /payments`` (with an ``Idempotency-Key``), ``GET /operations/{id}``, ``GET /accounts/{account}``.
"""

from __future__ import annotations

import json
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from idemtasks.contrib.fastapi import Idempotency, to_response
from idemtasks.http import core

from . import ledger, settings
from .tasks import charge

app = FastAPI(title="idemtasks reference payments service")
idem = Idempotency(store=settings.STORE_URL)
app.include_router(idem.router)


class Payment(BaseModel):
    account: str = Field(min_length=1, max_length=255)
    amount: int = Field(gt=0)


def _invalid(detail: str, errors: Any = None) -> Response:
    extra = {} if errors is None else {"errors": errors}
    return to_response(core.problem(400, "invalid_request", "Invalid request", detail, **extra))


@app.exception_handler(RequestValidationError)
async def _validation_problem(_: Request, exc: RequestValidationError) -> Response:
    return _invalid("the request is not valid", json.loads(json.dumps(exc.errors(), default=str)))


@app.post("/payments", status_code=202)
async def create_payment(request: Request) -> Response:
    # The key is checked first, then the body: a request rejected here stores nothing and may simply be retried.
    problem = await idem.check(request)
    if problem is not None:
        return problem
    try:
        payment = Payment.model_validate_json(await request.body())
    except ValidationError as exc:
        return _invalid("the body must be JSON {\"account\": str, \"amount\": int > 0}",
                        json.loads(exc.json(include_url=False)))
    return await idem.submit(request, charge, (payment.account, payment.amount))


@app.get("/accounts/{account}")
async def get_account(account: str) -> dict[str, object]:
    return await anyio.to_thread.run_sync(ledger.account, account)
