"""Django adapter: ``submit`` for views, and URL patterns for the status route.

::

    idem = Idempotency(store="redis://…")
    urlpatterns = [path("payments", create_payment), path("", include(idem.urls()))]

    def create_payment(request):
        body = json.loads(request.body)
        return idem.submit(request, charge, (body["account"], body["amount"]))
"""

from __future__ import annotations

from typing import Any

try:
    from django.http import HttpRequest, HttpResponse
    from django.http.request import RawPostDataException
    from django.urls import URLPattern, path
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Django adapter needs Django: pip install idemtasks[django]") from exc

from ..http import core
from ..http.core import HttpPolicy, InvalidCredentials, Reply, RequestHeaders
from ..http.endpoint import Caller, Endpoint, IncomingRequest, bearer_caller, declared_length
from ..http.forms import FORM_BODY, body_consumed, is_form, parsed_form_body, upload_digest
from ..stores import Store

__all__ = ["Idempotency", "to_response"]


def to_response(reply: Reply) -> HttpResponse:
    response = HttpResponse(reply.json_bytes(), status=reply.status, content_type=reply.media_type)
    for name, value in reply.response_headers.items():
        response[name] = value
    return response


def _body(request: HttpRequest) -> bytes:
    try:
        body: bytes = request.body
        return body
    except RawPostDataException:  # the view read the stream, through request.POST of a multipart request or not
        pass
    # Only a form Django parsed is described: request.POST of any other content type is empty (and parsing it now,
    # after the view read the stream, would be too), so every payload under a key would look like that empty form.
    if not (is_form(request.content_type) and "_post" in request.__dict__):
        raise body_consumed("request.body (which keeps it)")
    # Kept on the request: a view that calls check() and then submit() reads its uploads once, not twice.
    memo: dict[str, Any] = request.__dict__
    if FORM_BODY not in memo:
        memo[FORM_BODY] = parsed_form_body(
            ((name, value) for name, values in request.POST.lists() for value in values),
            ((name, f.name, f.content_type, upload_digest(f)) for name, files in request.FILES.lists() for f in files))
    form_body: bytes = memo[FORM_BODY]
    return form_body


class Idempotency:
    """Idempotent writes and the status route for a Django project."""

    def __init__(self, *, store: Store | str | None = None, policy: HttpPolicy | None = None,
                 caller: Caller | None = None, status_prefix: str = "") -> None:
        self.endpoint = Endpoint(store, policy=policy, status_prefix=status_prefix)
        # The caller owns its keys and operations; by default the Bearer token or Basic user names it (hashed before
        # storage).
        self.caller = caller or bearer_caller

    def incoming(self, request: HttpRequest, policy: HttpPolicy | None = None) -> IncomingRequest:
        """``request`` as the endpoint reads it. A body whose Content-Length is over ``policy``'s limit is left
        unread: the endpoint answers 413 from the declared length alone."""
        headers = RequestHeaders(request.headers.items())
        caller = self.caller(headers)
        limit = (policy or self.endpoint.policy).max_body_bytes
        match = getattr(request, "resolver_match", None)
        route = "/" + match.route.lstrip("/") if match is not None and match.route else request.path
        # request.path is SCRIPT_NAME (or FORCE_SCRIPT_NAME) followed by path_info: the rest is where Django is mounted.
        path_info = request.path_info
        root = request.path[:-len(path_info)] if path_info and request.path.endswith(path_info) else ""
        return IncomingRequest(method=request.method or "POST", route=route, path=request.path,
                               query=request.META.get("QUERY_STRING", ""),
                               body=b"" if declared_length(headers) > limit else _body(request), headers=headers,
                               caller=caller, root=root)

    def check(self, request: HttpRequest, policy: HttpPolicy | None = None) -> HttpResponse | None:
        """The key problem of a write (missing, invalid) as a response, before the view validates its body."""
        try:
            prepared = self.endpoint.prepare(self.incoming(request, policy), policy)
        except InvalidCredentials as exc:
            prepared = core.error_reply(exc, policy or self.endpoint.policy)
        return to_response(prepared) if isinstance(prepared, Reply) else None

    def submit(self, request: HttpRequest, task: Any, args: Any = None, kwargs: Any = None, *,
               policy: HttpPolicy | None = None, **options: Any) -> HttpResponse:
        """Record and enqueue ``task(*args, **kwargs)`` for this request, or replay its key's outcome."""
        try:
            req = self.incoming(request, policy)
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, policy or self.endpoint.policy))
        return to_response(self.endpoint.submit(req, task, args, kwargs, policy=policy, **options))

    def status_view(self, request: HttpRequest, operation_id: str) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):  # HEAD wherever GET (RFC 9110, 9.3.2); the server drops its body
            return HttpResponse(status=405, headers={"Allow": "GET, HEAD"})
        try:
            caller = self.caller(RequestHeaders(request.headers.items()))
        except InvalidCredentials as exc:
            return to_response(core.error_reply(exc, self.endpoint.policy))
        return to_response(self.endpoint.status(operation_id, caller))

    def urls(self) -> list[URLPattern]:
        """``path("", include(idem.urls()))`` mounts ``operations/<id>`` (prefix it to match ``status_prefix``)."""
        return [path("operations/<str:operation_id>", self.status_view, name="idemtasks-operation")]
