"""FastAPI / Starlette adapter: async all the way, so the event loop never waits on the store.

::

    idem = Idempotency(store="redis://…")
    app.include_router(idem.router)          # GET /operations/{operation_id}

    @app.post("/payments")
    async def create_payment(request: Request) -> Response:
        body = Payment.model_validate_json(await request.body())
        return await idem.submit(request, charge, (body.account, body.amount))
"""

from __future__ import annotations

from typing import Any

try:
    from fastapi import APIRouter
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the FastAPI adapter needs FastAPI: pip install idemtasks[fastapi]") from exc

from ..aio import AsyncStore, async_store_for, open_off_the_loop, submit_async
from ..errors import ConfigurationError, IdempotencyKeyMismatch, IdemtasksError
from ..http import core
from ..http.core import HttpPolicy, InvalidCredentials, Reply, RequestHeaders
from ..http.endpoint import Caller, Endpoint, IncomingRequest, bearer_caller, declared_length, earlier, known_clock
from ..http.forms import FORM_BODY, Upload, body_consumed, is_form, parsed_form_body, upload_digest
from ..stores import Store

__all__ = ["Idempotency", "to_response"]


def to_response(reply: Reply) -> Response:
    return Response(reply.json_bytes(), status_code=reply.status, headers=reply.response_headers,
                    media_type=reply.media_type)


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except RuntimeError:
        pass
    # The handler read the stream. Only a form can stand in for it: request.form() of any other content type is
    # empty, and every payload under a key would look like that empty form.
    if not is_form(request.headers.get("content-type")):
        raise body_consumed("await request.body() (which keeps it)") from None
    # The handler read its form first, which consumed the stream; the request keeps the parsed form. So does the
    # request's scope keep the stand-in body: a handler calling check() and then submit() reads its uploads once.
    memo = request.scope
    if FORM_BODY not in memo:
        try:
            form = await request.form()
        except Exception:  # not parsed before the stream went: there is nothing left to parse it from
            raise body_consumed("await request.body() or await request.form() (which keep it)") from None
        memo[FORM_BODY] = await _describe(form)
    form_body: bytes = memo[FORM_BODY]
    return form_body


async def _describe(form: Any) -> bytes:
    fields: list[tuple[str, str]] = []
    files: list[Upload] = []
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields.append((name, value))
        else:  # an upload: its file may be on disk, so it is read off the event loop
            digest = await run_in_threadpool(upload_digest, value.file)
            files.append((name, value.filename, value.content_type, digest))
    return parsed_form_body(fields, files)


class Idempotency:
    """Idempotent writes and the status route for one FastAPI application."""

    def __init__(self, *, store: Store | str | None = None, policy: HttpPolicy | None = None,
                 caller: Caller = bearer_caller, status_prefix: str = "") -> None:
        self.endpoint = Endpoint(store, policy=policy, status_prefix=status_prefix)
        # The caller owns its keys and operations; by default the Bearer token or Basic user names it (hashed before
        # storage).
        self.caller = caller
        self.router = APIRouter()
        route = f"{self.endpoint.status_prefix}/operations/{{operation_id}}"
        self.router.add_api_route(route, self.status, methods=["GET"], name="idemtasks-operation")
        # HEAD wherever GET (RFC 9110, 9.3.2; the server drops the body), kept out of the OpenAPI schema, where one
        # route for both methods would give two operations one operationId.
        self.router.add_api_route(route, self.status, methods=["HEAD"], name="idemtasks-operation-head",
                                  include_in_schema=False)

    async def _async_store(self, task: Any | None = None) -> AsyncStore:
        if task is not None:
            task._settled()  # its store_url is read from the app's configuration
        await open_off_the_loop(self.endpoint.given_store, None if task is None else task.store_url)
        return async_store_for(self.endpoint.store_for(task))

    async def incoming(self, request: Request, policy: HttpPolicy | None = None) -> IncomingRequest:
        """``request`` as the endpoint reads it. A body whose Content-Length is over ``policy``'s limit is left
        unread: the endpoint answers 413 from the declared length alone."""
        route = getattr(request.scope.get("route"), "path", request.url.path)
        headers = RequestHeaders(request.headers.items())
        caller = self.caller(headers)
        limit = (policy or self.endpoint.policy).max_body_bytes
        return IncomingRequest(method=request.method, route=route, path=request.url.path, query=request.url.query,
                               body=b"" if declared_length(headers) > limit else await _body(request),
                               headers=headers, caller=caller, root=request.scope.get("root_path", ""))

    async def check(self, request: Request, policy: HttpPolicy | None = None) -> Response | None:
        """The key problem of a write (missing, invalid) as a response, before the handler validates its body."""
        try:
            prepared = self.endpoint.prepare(await self.incoming(request, policy), policy)
        except InvalidCredentials as exc:
            prepared = core.error_reply(exc, policy or self.endpoint.policy)
        return to_response(prepared) if isinstance(prepared, Reply) else None

    async def submit(self, request: Request, task: Any, args: Any = None, kwargs: Any = None, *,
                     policy: HttpPolicy | None = None, **options: Any) -> Response:
        """Record and enqueue ``task(*args, **kwargs)`` for this request, or replay what its key already did."""
        policy = policy or self.endpoint.policy
        try:
            req = await self.incoming(request, policy)
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, policy))
        prepared = self.endpoint.prepare(req, policy)
        if isinstance(prepared, Reply):
            return to_response(prepared)
        key, scope, fp = prepared
        try:
            astore = await self._async_store(task)  # inside: a store given by URL is opened on first use
            try:
                sub = await submit_async(task, args, kwargs, key=key, scope=scope, fingerprint=fp, store=astore,
                                         **options)
            except IdempotencyKeyMismatch as exc:  # perhaps a fingerprint of an earlier version (see Endpoint)
                sub = await submit_async(task, args, kwargs, key=key, scope=scope,
                                         fingerprint=earlier(req, policy, exc), store=astore, **options)
            now = known_clock(sub)
            if now is None:  # only then does the answer depend on a reading of the clock
                now = await astore.now()
        except ConfigurationError:
            raise  # a programming error: the framework's 500, with its traceback (see Endpoint.submit)
        except IdemtasksError as exc:
            return to_response(core.error_reply(exc, policy))
        return to_response(core.accepted(sub, self.endpoint.location(sub.operation.id, req.root), policy, now=now))

    async def status(self, operation_id: str, request: Request) -> Response:
        """``GET …/operations/{operation_id}``: the caller's own operation, or 404."""
        try:
            caller = self.caller(RequestHeaders(request.headers.items()))
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, self.endpoint.policy))
        try:
            op = await (await self._async_store()).get_by_id(operation_id)
        except IdemtasksError as exc:
            return to_response(core.error_reply(exc, self.endpoint.policy, reading=True))
        return to_response(core.status_reply(op, caller, self.endpoint.policy))
