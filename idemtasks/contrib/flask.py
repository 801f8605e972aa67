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

from collections.abc import Callable, Mapping
from typing import Any

try:
    import flask
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Flask adapter needs Flask: pip install idemtasks[flask]") from exc

from ..http.core import HttpPolicy, Reply
from ..http.endpoint import Endpoint, IncomingRequest, bearer_caller
from ..http.forms import FORM_BODY, parsed_form_body, upload_digest
from ..stores import Store

__all__ = ["Idempotency", "to_response"]


def to_response(reply: Reply) -> flask.Response:
    return flask.Response(reply.json_bytes(), status=reply.status, headers=reply.headers,
                          content_type=reply.media_type)


def _body(req: flask.Request) -> bytes:
    body = req.get_data(cache=True)
    if body or "form" not in req.__dict__:
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
                 caller: Callable[[Mapping[str, str]], str | None] | None = None, status_prefix: str = "") -> None:
        self.endpoint = Endpoint(store, policy=policy, status_prefix=status_prefix)
        # The caller owns its keys and operations; by default the Bearer token names it (hashed before storage).
        self.caller = caller or bearer_caller
        self.blueprint = flask.Blueprint("idemtasks", __name__)
        self.blueprint.add_url_rule(f"{self.endpoint.status_prefix}/operations/<operation_id>", "operation",
                                    self.status_view, methods=["GET"])
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        app.extensions["idemtasks"] = self
        app.register_blueprint(self.blueprint)

    def incoming(self) -> IncomingRequest:
        req = flask.request
        headers = dict(req.headers.items())
        rule = req.url_rule.rule if req.url_rule is not None else req.path
        return IncomingRequest(method=req.method, route=rule, path=req.path,
                               query=req.query_string.decode("latin-1"), body=_body(req),
                               headers=headers, caller=self.caller(headers))

    def check(self, policy: HttpPolicy | None = None) -> flask.Response | None:
        """The key problem of the current write (missing, invalid) as a response, before the view validates."""
        prepared = self.endpoint.prepare(self.incoming(), policy)
        return to_response(prepared) if isinstance(prepared, Reply) else None

    def submit(self, task: Any, args: Any = None, kwargs: Any = None, *, policy: HttpPolicy | None = None,
               **options: Any) -> flask.Response:
        """Record and enqueue ``task(*args, **kwargs)`` for the current request, or replay its key's outcome."""
        return to_response(self.endpoint.submit(self.incoming(), task, args, kwargs, policy=policy, **options))

    def status_view(self, operation_id: str) -> flask.Response:
        caller = self.caller(dict(flask.request.headers.items()))
        return to_response(self.endpoint.status(operation_id, caller))
