"""The request flow every adapter shares: read the key, scope it, fingerprint the request, submit, answer.

Adapters only translate their framework's request into an :class:`IncomingRequest` and a :class:`~.core.Reply`
back into a response; the semantics live here and in :mod:`idemtasks.http.core`, tested once.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import ConfigurationError, IdempotencyKeyMismatch, IdemtasksError, InvalidKey
from ..models import Status, Submission
from ..stores import Store, shared_store
from . import core
from .core import HttpPolicy, InvalidCredentials, Reply
from .forms import is_stand_in

__all__ = ["Caller", "Endpoint", "IncomingRequest", "bearer_caller", "declared_length"]

#: Who a request comes from, from its headers (a :class:`~.core.RequestHeaders` from the adapters: lookups ignore
#: the case of the name): ``None`` is anonymous.
Caller = Callable[[Mapping[str, str]], "str | None"]


#: What a path keeps unencoded besides letters, digits and ``_.-~`` (RFC 3986's pchar, and the slashes between).
_PATH_SAFE = "/!$&'()*+,;=:@"


#: The characters of an HTTP token (RFC 9110, 5.6.2), which an authentication scheme is.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class IncomingRequest:
    """What the HTTP layer needs of a request. ``route`` is the route template (``/payments``), not the path;
    ``root`` is where the application is mounted (ASGI ``root_path``, WSGI ``SCRIPT_NAME``), which ``Location``
    starts with."""

    method: str
    route: str
    path: str
    query: str
    body: bytes
    headers: Mapping[str, str]
    caller: str | None
    root: str = ""


def declared_length(headers: Mapping[str, str]) -> int:
    """Content-Length, which a form's stand-in body (see :mod:`.forms`) does not measure, and which adapters check
    before reading a body at all; 0 when absent or bad."""
    value = (core._header(headers, "Content-Length") or "").strip()
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    return int(value) if value.isascii() and value.isdigit() else 0


def _basic_user(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidCredentials("the Basic credentials are not base64 of UTF-8 text") from None
    user, colon, _ = decoded.partition(":")
    if not colon or not user:
        raise InvalidCredentials("the Basic credentials have no user name (user:password)")
    return user


def bearer_caller(headers: Mapping[str, str]) -> str | None:
    """The default caller identity, from ``Authorization``: the token of ``Bearer <token>``, the user name of
    ``Basic <credentials>`` (Stripe's secret key), ``None`` (anonymous) without the header.

    Any other scheme raises :class:`~idemtasks.errors.ConfigurationError`: all its callers would share the anonymous
    scope, where one tenant's key replays another's operation, so the application must say who calls (``caller=``).
    Basic credentials that cannot be read raise :class:`~.core.InvalidCredentials` (answered 400) rather than fall
    back to anonymous, for the same reason.
    """
    value = core.single(headers, "Authorization")  # repeated: RepeatedHeader, answered 400
    value = None if value is None else value.strip(core._OWS)
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    credentials = credentials.strip(core._OWS)  # no more: "tok\xa0" is not the token "tok" (refused below)
    if scheme.lower() == "bearer":
        if not credentials:
            raise InvalidCredentials("the Bearer token is empty")
        if any(ch.isspace() or ch == "," for ch in credentials):
            # No token has these (RFC 6750): two headers a WSGI server joined ("Bearer a, Bearer b") would otherwise
            # read as a third caller beside the two the client named.
            raise InvalidCredentials("the Bearer token has a space or a comma: two tokens, or none")
        if ":" in credentials:
            # Nor this one, which keeps "basic:<user>" (below) for Basic callers: a token "basic:alice" would share
            # the Basic user alice's operations.
            raise InvalidCredentials("the Bearer token has a ':', which no token has (RFC 6750)")
        return credentials
    if scheme.lower() == "basic":
        # Tagged: a Bearer token has no ":" (RFC 6750), so no token can pass for a Basic user of the same name.
        return "basic:" + _basic_user(credentials)
    if not scheme or not all(ch in _TCHAR for ch in scheme):
        # Not a scheme at all ("Bearer\ttok", "Bearer,"): the client's mistake (400), not an application's scheme
        # the default identity does not know (a configuration problem, below), which no client can cause by itself.
        raise InvalidCredentials("the Authorization header is not a scheme, a space, then credentials")
    raise ConfigurationError(f"the default caller identity reads Bearer and Basic credentials, not {scheme!r}: "
                             f"pass caller= (a function of the request headers) to say who calls")


class Endpoint:
    """Idempotent writes and status reads for one API, in any framework.

    ``status_prefix`` is where the adapter mounts the status route: ``Location`` is
    ``{status_prefix}/operations/{id}``.
    """

    def __init__(self, store: Store | str | None = None, *, policy: HttpPolicy | None = None,
                 status_prefix: str = "") -> None:
        if store is None:
            # The status route has no task to take a store from: refuse now rather than 500 on every poll.
            raise ConfigurationError("an idempotent endpoint needs the store its tasks use (store=URL or Store)")
        #: The store as given: a :class:`Store`, or the URL :meth:`store_for` opens on first use.
        self.given_store = store
        self.policy = policy or HttpPolicy()
        self.status_prefix = status_prefix.rstrip("/")

    def store_for(self, task: Any | None = None) -> Store:
        """The endpoint's store; a ``task`` writing elsewhere would hand out locations that answer 404."""
        store = self.given_store if isinstance(self.given_store, Store) else shared_store(str(self.given_store))
        if task is not None:
            task._settled()
            if not store.same_place(task.store):
                raise ConfigurationError(f"task {task.name} writes to {task.store.where or task.store.url}, but this "
                                         f"endpoint reads operations from {store.where or store.url}")
        return store

    def location(self, operation_id: str, root: str = "") -> str:
        """The status route of ``operation_id``, under ``root`` (where the application is mounted)."""
        # Both are decoded paths (ASGI's root_path, Django's request.path, Werkzeug's root path): a header takes
        # them percent-encoded, and Starlette cannot send a character outside Latin-1 at all (a 500 on every retry).
        return f"{quote(root.rstrip('/') + self.status_prefix, safe=_PATH_SAFE)}/operations/{operation_id}"

    def prepare(self, req: IncomingRequest, policy: HttpPolicy | None = None) -> tuple[str, str, str] | Reply:
        """Key, scope and fingerprint of a write, or the problem reply that ends it (nothing is stored)."""
        policy = policy or self.policy
        # The body's own length for one read without Content-Length (chunked); a form read before submit goes by
        # Content-Length alone, whatever its stand-in's length.
        measured = 0 if is_stand_in(req.body) else len(req.body)
        declared = declared_length(req.headers)
        if max(measured, declared) > policy.max_body_bytes:
            return core.problem(413, "payload_too_large", "Payload too large",
                                f"the request body is over {policy.max_body_bytes} bytes")
        if not is_stand_in(req.body) and measured < declared and not any(
                core._header(req.headers, name) is not None for name in ("Transfer-Encoding", "Content-Encoding")):
            # The client stopped sending (a dropped upload): some servers (gunicorn) hand the application what came,
            # and the cut-off payload would be recorded and run, its key then refusing the whole one as a mismatch.
            # Content-Length means nothing beside Transfer-Encoding (RFC 9112), and beside Content-Encoding it counts
            # the encoded bytes, which an application that decodes the body itself (gzip) does not hand on.
            return core.problem(400, "body_incomplete", "Incomplete request body",
                                f"the request body is {measured} bytes, not the {declared} its Content-Length "
                                "says: nothing was recorded; send the whole request again")
        try:
            key = core.read_key(req.headers, policy)
        except InvalidKey as exc:
            return core.error_reply(exc, policy)
        if key is None:
            if policy.required:
                return core.key_required(policy)
            key = f"anonymous-{uuid.uuid4().hex}"  # an optional endpoint: recorded, but nothing to deduplicate
        scope = core.caller_scope(req.caller, req.method, req.route)
        fp = core.request_fingerprint(req.method, req.path, req.query, req.body, req.headers, policy)
        return key, scope, fp

    def submit(self, req: IncomingRequest, task: Any, args: Any = None, kwargs: Any = None, *,
               policy: HttpPolicy | None = None, **options: Any) -> Reply:
        """Record and enqueue ``task(*args, **kwargs)`` for this request, or replay what the key already did."""
        policy = policy or self.policy
        prepared = self.prepare(req, policy)
        if isinstance(prepared, Reply):
            return prepared
        key, scope, fp = prepared
        try:
            # Inside: a store given by URL is opened on first use, and a database that is down then is a 503 like
            # any other outage.
            store = self.store_for(task)
            try:
                sub = task.submit(args, kwargs, key=key, scope=scope, fingerprint=fp, **options)
            except IdempotencyKeyMismatch as exc:
                sub = task.submit(args, kwargs, key=key, scope=scope, fingerprint=earlier(req, policy, exc), **options)
            now = accept_clock(sub, store.now)
        except ConfigurationError:
            raise  # a programming error (a task writing to another store): the framework's 500, with its traceback
        except IdemtasksError as exc:
            return core.error_reply(exc, policy)
        return core.accepted(sub, self.location(sub.operation.id, req.root), policy, now=now)

    def status(self, operation_id: str, caller: str | None, *, task: Any | None = None) -> Reply:
        """``GET …/operations/{id}``: the caller's own operation, or 404."""
        try:
            op = self.store_for(task).get_by_id(operation_id)
        except IdemtasksError as exc:
            return core.error_reply(exc, self.policy, reading=True)
        return core.status_reply(op, caller, self.policy)


def earlier(req: IncomingRequest, policy: HttpPolicy, exc: IdempotencyKeyMismatch) -> str:
    """The fingerprint an earlier version gave this request, if that is what the operation holds (a replay after
    all: see :func:`.core.earlier_fingerprint`); otherwise the mismatch stands and ``exc`` is raised again."""
    stored = exc.stored_fingerprint
    if core.earlier_fingerprint(req.method, req.path, req.query, req.body, req.headers, policy) != stored:
        raise exc
    return stored


def accept_clock(sub: Submission, now: Callable[[], float]) -> float:
    """The store's time, read only when the answer depends on it: a replay of an operation still being accepted."""
    known = known_clock(sub)
    return now() if known is None else known


def known_clock(sub: Submission) -> float | None:
    """The time the answer to ``sub`` is decided on, if no reading of the store's clock is needed (``None``: read
    it). The reading ``submit`` decided on, where it read one: read again a moment later, past ACCEPT_WINDOW, the
    answer would be a replay of an operation that ``submit`` decided not to publish yet."""
    if sub.checked_at is not None:
        return sub.checked_at
    op = sub.operation
    # Only a pending record's flag matters (see core.accepted): a record stored by an earlier release may have kept
    # it when it failed before any claim.
    return None if not sub.created and op.status is Status.PENDING and op.needs_publish else op.updated_at
