"""Flask adapter: an extension with ``init_app`` and a blueprint for the status route.

::

    idem = Idempotency(store="redis://…")
    idem.init_app(app)                       # GET /operations/<operation_id>

    @app.post("/payments")
    def create_payment():
        body = request.get_json()
        return idem.submit(charge, (body["account"], body["amount"]))
"""

from __future__ import annotations

from typing import Any

try:
    import flask
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Flask adapter needs Flask: pip install idemtasks[flask]") from exc

from ..http import core
from ..http.core import HttpPolicy, InvalidCredentials, Reply, RequestHeaders
from ..http.endpoint import Caller, Endpoint, IncomingRequest, bearer_caller, declared_length
from ..http.forms import FORM_BODY, body_consumed, is_form, parsed_form_body, upload_digest
from ..stores import Store

__all__ = ["Idempotency", "to_response"]


def to_response(reply: Reply) -> flask.Response:
    return flask.Response(reply.json_bytes(), status=reply.status, headers=reply.response_headers,
                          content_type=reply.media_type)


def _body(req: flask.Request) -> bytes:
    body = req.get_data(cache=True)
    if body:
        return body
    if not (is_form(req.content_type) and "form" in req.__dict__):
        if declared_length(RequestHeaders(req.headers.items())) > 0 or "Transfer-Encoding" in req.headers:
            # There was a body, and the view read it as a stream: every payload would look like this empty one.
            raise body_consumed("request.get_data() (which keeps it)")
        return body
    # The view read request.form first, which consumed the stream: get_data() has nothing left to give. The stand-in
    # is kept on the request, so that a view calling check() and then submit() reads its uploads once.
    memo: dict[str, Any] = req.__dict__
    if FORM_BODY not in memo:
        memo[FORM_BODY] = parsed_form_body(
            ((name, value) for name, values in req.form.lists() for value in values),
            ((name, f.filename, f.content_type, upload_digest(f.stream)) for name, f in req.files.items(multi=True)))
    form_body: bytes = memo[FORM_BODY]
    return form_body


class Idempotency:
    """Idempotent writes and the status route for a Flask application."""

    def __init__(self, app: flask.Flask | None = None, *, store: Store | str | None = None,
                 policy: HttpPolicy | None = None,
                 caller: Caller | None = None, status_prefix: str = "") -> None:
        self.endpoint = Endpoint(store, policy=policy, status_prefix=status_prefix)
        # The caller owns its keys and operations; by default the Bearer token or Basic user names it (hashed before
        # storage).
        self.caller = caller or bearer_caller
        self.blueprint = flask.Blueprint("idemtasks", __name__)
        self.blueprint.add_url_rule(f"{self.endpoint.status_prefix}/operations/<operation_id>", "operation",
                                    self.status_view, methods=["GET"])
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        app.extensions["idemtasks"] = self
        app.register_blueprint(self.blueprint)

    def incoming(self, policy: HttpPolicy | None = None) -> IncomingRequest:
        """The current request as the endpoint reads it. A body whose Content-Length is over ``policy``'s limit is
        left unread: the endpoint answers 413 from the declared length alone."""
        req = flask.request
        headers = RequestHeaders(req.headers.items())
        caller = self.caller(headers)
        limit = (policy or self.endpoint.policy).max_body_bytes
        rule = req.url_rule.rule if req.url_rule is not None else req.path
        return IncomingRequest(method=req.method, route=rule, path=req.path,
                               query=req.query_string.decode("latin-1"),
                               body=b"" if declared_length(headers) > limit else _body(req),
                               headers=headers, caller=caller, root=req.script_root)

    def check(self, policy: HttpPolicy | None = None) -> flask.Response | None:
        """The key problem of the current write (missing, invalid) as a response, before the view validates."""
        try:
            prepared = self.endpoint.prepare(self.incoming(policy), policy)
        except InvalidCredentials as exc:
            prepared = core.error_reply(exc, policy or self.endpoint.policy)
        return to_response(prepared) if isinstance(prepared, Reply) else None

    def submit(self, task: Any, args: Any = None, kwargs: Any = None, *, policy: HttpPolicy | None = None,
               **options: Any) -> flask.Response:
        """Record and enqueue ``task(*args, **kwargs)`` for the current request, or replay its key's outcome."""
        try:
            req = self.incoming(policy)
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, policy or self.endpoint.policy))
        return to_response(self.endpoint.submit(req, task, args, kwargs, policy=policy, **options))

    def status_view(self, operation_id: str) -> flask.Response:
        try:
            caller = self.caller(RequestHeaders(flask.request.headers.items()))
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, self.endpoint.policy))
        return to_response(self.endpoint.status(operation_id, caller))
