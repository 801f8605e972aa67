"""HTTP semantics of the ``Idempotency-Key`` header, independent of any web framework.

Defaults follow the IETF draft "The Idempotency-Key HTTP Header Field"; what the big public APIs disagree on is a
field of :class:`HttpPolicy`. Every error is ``application/problem+json`` (RFC 9457) with a stable ``code``.

=====================================================  ==========  ================================
situation                                              status      ``code``
=====================================================  ==========  ================================
first request                                          202         (body: the operation)
replay, operation pending or running                   202         ``Idempotent-Replayed: true``
replay, operation succeeded / failed                   200 / 200   ``Idempotent-Replayed: true``
key missing on an endpoint that requires one           400         ``idempotency_key_required``
key invalid (empty, > 255, not printable ASCII, ",")   400         ``idempotency_key_invalid``
Authorization unreadable (bad Basic, empty Bearer)     400         ``credentials_invalid``
body shorter than its Content-Length (cut off)         400         ``body_incomplete``
same key, different request                            422 (409)   ``idempotency_key_mismatch``
same key, first request still being accepted           409         ``idempotency_key_in_use``
body or arguments over the size limit                  413         ``payload_too_large``
store or broker unreachable, store out of memory        503         ``service_unavailable``
store refused the request (schema, permissions)        500         ``store_error``
status of an unknown / expired / foreign operation     404         ``operation_not_found``
status of the caller's own operation                   200         ``Retry-After`` while unfinished
=====================================================  ==========  ================================
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode
from uuid import UUID

from ..config import ACCEPT_WINDOW, being_accepted
from ..errors import (
    IdempotencyKeyMismatch,
    IdemtasksError,
    InvalidKey,
    NotSerializable,
    PublishFailed,
    StoreError,
    StoreUnavailable,
    TooLarge,
)
from ..identity import MAX_KEY_LENGTH
from ..models import Operation, Status, Submission
from .forms import canonical_body
from .json_body import canonical_json, is_json

__all__ = [
    "ACCEPT_WINDOW",
    "CLOCK_SLACK",
    "HttpPolicy",
    "InvalidCredentials",
    "RepeatedHeader",
    "Reply",
    "RequestHeaders",
    "accepted",
    "caller_scope",
    "earlier_fingerprint",
    "error_reply",
    "owns",
    "poll_after",
    "problem",
    "read_key",
    "request_fingerprint",
    "status_reply",
]

PROBLEM_JSON = "application/problem+json"

logger = logging.getLogger("idemtasks.http")


class InvalidCredentials(IdemtasksError, ValueError):
    """Raised by a caller function when the request's credentials cannot be read: the request cannot be told apart
    from another caller's, so it is refused (400) rather than counted as anonymous."""


class RepeatedHeader(InvalidCredentials):
    """Raised when a request repeats a header that must come once (``Authorization``, the idempotency key)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the request repeats its {name} header")
        self.name = name


@dataclass(frozen=True)
class HttpPolicy:
    """The per-endpoint choices. The defaults are the IETF draft's."""

    header_names: tuple[str, ...] = ("Idempotency-Key", "X-Idempotency-Key")
    required: bool = True
    mismatch_status: int = 422
    succeeded_status: int = 200
    failed_status: int = 200
    #: Request headers that are part of the fingerprint (e.g. ``("Content-Type",)``).
    fingerprint_headers: tuple[str, ...] = ()
    #: ``Retry-After`` seconds for 409, 503 and unfinished operations.
    retry_after: int = 1
    #: Largest request body accepted (413 ``payload_too_large`` beyond it), checked before anything is stored.
    max_body_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """What an adapter turns into its framework's response: status, headers and a JSON body."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def media_type(self) -> str:
        return PROBLEM_JSON if self.status >= 400 else "application/json"

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False, default=_plain_json).encode()

    @property
    def response_headers(self) -> dict[str, str]:
        """``headers`` and ``Cache-Control: no-store``. Every reply describes one caller's operation at one moment:
        a cache that kept a "pending" would serve it to a polling client for ever, and a shared one could serve a
        caller's result, or a replay, to somebody else."""
        return {"Cache-Control": "no-store", **self.headers}


def _plain_json(value: Any) -> Any:
    """The JSON a client reads for the types a stored result keeps (the store tags them, so that the task's own
    callers get them back as they were): a ``Decimal`` and a ``UUID`` as strings, which keep every digit (a JSON number
    would lose them in a browser), dates and times in ISO 8601, and bytes in base64. Without this, a payment that
    returned its amount as a ``Decimal`` would answer every poll and every replay with a 500."""
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def problem(status: int, code: str, title: str, detail: str, *, retry_after: int | None = None,
            **extra: Any) -> Reply:
    body = {"type": f"https://idemtasks.dev/problems/{code.replace('_', '-')}", "title": title, "status": status,
            "detail": detail, "code": code, **extra}
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return Reply(status, body, headers)


class RequestHeaders(MutableMapping[str, str]):
    """A request's headers, looked up whatever the case of the name: what adapters hand to ``caller=`` and the
    endpoint.

    Frameworks spell header names differently (Starlette lower-cases them, Werkzeug and Django title-case them), and a
    plain dict of them would make ``headers.get("X-Tenant")`` find nothing under one framework: every tenant would
    then share the anonymous scope, where one tenant's key replays another's operation. Iteration (``dict()``,
    ``items()``) gives the names as the framework spelled them, so a caller written against the plain dict adapters
    used to give keeps working.

    A repeated header (Starlette keeps every copy; WSGI servers join them) keeps its first value, which is what
    Starlette's ``headers.get`` and FastAPI's security classes read: a caller function then sees the credentials the
    application authenticated, not a second copy that names another tenant. ``repeated`` holds the lower-cased names
    that came more than once; ``Authorization`` and the idempotency key may not (see :func:`single`).
    """

    __slots__ = ("_items", "repeated")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        self.repeated: set[str] = set()
        for name, value in items:
            lowered = name.lower()
            if lowered in self._items:
                self.repeated.add(lowered)
            else:
                self._items[lowered] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __setitem__(self, name: str, value: str) -> None:
        self._items[name.lower()] = (name, value)

    def __delitem__(self, name: str) -> None:
        del self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"RequestHeaders({dict(self.items())!r})"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if isinstance(headers, RequestHeaders):
        return headers.get(name)
    lowered = name.lower()
    for k, v in headers.items():
        if k.lower() == lowered:
            return v
    return None


def single(headers: Mapping[str, str], name: str) -> str | None:
    """The header ``name``, which the request must not repeat: raises :class:`RepeatedHeader` if it does. For the
    headers that say who calls and which operation this is: a request carrying two has no one meaning."""
    if isinstance(headers, RequestHeaders) and name.lower() in headers.repeated:
        raise RepeatedHeader(name)
    return _header(headers, name)


#: The whitespace HTTP allows around a header value.
_OWS = " \t"


def read_key(headers: Mapping[str, str], policy: HttpPolicy) -> str | None:
    """The request's idempotency key, ``None`` if absent; raises :class:`InvalidKey` if present but unusable.

    HTTP keys are stricter than the core's: printable ASCII only, since header values in other encodings are
    read differently by different servers and proxies, and no comma. A request that names two different keys
    (``Idempotency-Key`` and ``X-Idempotency-Key``, say) has no single one, and is refused like one that repeats a
    header.
    """
    found: list[tuple[str, str]] = []
    for name in policy.header_names:
        try:
            value = single(headers, name)
        except RepeatedHeader as exc:
            raise InvalidKey(f"the request repeats its {name} header", value=None) from exc
        if value is not None:
            # Only what HTTP allows around a value (RFC 9110, 5.5): str.strip() would also take a Latin-1 NBSP or
            # NEL off the ends, and "k\xa0" would replay k's operation instead of being refused as not ASCII.
            found.append((name, value.strip(_OWS)))
    if not found:
        return None
    (_, value), *others = found
    if any(other != value for _, other in others):
        raise InvalidKey(f"the request names different idempotency keys in {', '.join(n for n, _ in found)}",
                         value=None)
    if not value:
        raise InvalidKey("the idempotency key is empty", value=value)
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidKey(f"the idempotency key is longer than {MAX_KEY_LENGTH} characters", value=value)
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidKey("the idempotency key must be printable ASCII", value=value)
    if "," in value:
        # HTTP lets a server or a proxy join a repeated header into one, separated by commas (RFC 9110, 5.3), and
        # WSGI servers do: "k1, k2" may be a request that sent two keys, which has no single one.
        raise InvalidKey("the idempotency key contains a comma, which cannot be told from two keys joined into one "
                         "header", value=value)
    return value


def _caller_id(caller: str | None) -> str:
    # Hashed: the identity may be a secret API token, and the scope is stored in plain text.
    return hashlib.sha256(caller.encode()).hexdigest()[:32] if caller else "anonymous"


def caller_scope(caller: str | None, method: str, route: str) -> str:
    """The scope of a key: the caller's identity and the endpoint (method and route template)."""
    return f"{_caller_id(caller)}|{method.upper()} {route}"


def owns(caller: str | None, op: Operation) -> bool:
    """Whether ``caller`` created ``op``: another caller's operation is reported as not found."""
    return op.scope.startswith(_caller_id(caller) + "|")


def request_fingerprint(method: str, path: str, query: str, body: bytes, headers: Mapping[str, str],
                        policy: HttpPolicy, *, raw_json: bool = False) -> str:
    """A hash of what makes two requests "the same": method, path, query (parameters in name order), body and chosen
    headers. ``raw_json``: a JSON body as its bytes, as versions before its canonical form hashed it (see
    :func:`earlier_fingerprint`)."""
    h = hashlib.sha256()
    # Sorted by name only: the order of distinct parameters means nothing, but the values of a repeated one
    # (?sort=date&sort=name) keep theirs, which an API may well read as meaningful. (sorted() is stable.)
    canonical_query = urlencode(sorted(parse_qsl(query, keep_blank_values=True), key=lambda pair: pair[0]))
    for part in (method.upper(), path, canonical_query):
        h.update(part.encode() + b"\x00")
    for name in policy.fingerprint_headers:
        h.update(f"{name.lower()}:{_header(headers, name) or ''}".encode() + b"\x00")
    content_type = _header(headers, "Content-Type")
    # JSON in its canonical form (a retry may serialize it again); a multipart body without the boundary its client
    # draws per request; any other body as it is.
    h.update((not raw_json and is_json(content_type) and canonical_json(body)) or canonical_body(body, content_type))
    return "http:" + h.hexdigest()[:27]  # 32 characters like a call's fingerprint: 108 bits, tagged with its origin


def earlier_fingerprint(method: str, path: str, query: str, body: bytes, headers: Mapping[str, str],
                        policy: HttpPolicy) -> str | None:
    """This request's fingerprint as an earlier version computed it (a JSON body hashed as its bytes); ``None`` if
    the body is not JSON, which no version hashed otherwise. An operation accepted before an upgrade (or by a node
    not yet upgraded, during a rolling one) keeps that fingerprint for its TTL: the client's retry of the very same
    bytes must still be a replay, not a 422 that could lead it to a fresh key and a second payment."""
    if not is_json(_header(headers, "Content-Type")):
        return None
    return request_fingerprint(method, path, query, body, headers, policy, raw_json=True)


#: How far ahead of this host's clock a pending operation must be due before ``Retry-After`` says so: its due time
#: is on the store's clock, and a web host a few seconds behind would otherwise send every fresh operation's poller
#: away for that long.
CLOCK_SLACK = 5.0


def poll_after(op: Operation, policy: HttpPolicy, now: float | None = None) -> str:
    """``Retry-After`` for an unfinished operation: the policy's interval, or the time until a pending operation is
    due if that is later (a countdown, an ETA, a retry's back-off: its ``updated_at`` is set ahead to then), so that
    a client does not poll every second for an hour. ``now``: the store's clock, if known (a new operation's
    ``created_at``); otherwise this host's, and only a due time over :data:`CLOCK_SLACK` ahead counts."""
    if op.status is not Status.PENDING:
        return str(policy.retry_after)
    due = op.updated_at - (time.time() if now is None else now)
    if now is None and due <= CLOCK_SLACK:
        due = 0.0
    return str(max(policy.retry_after, math.ceil(due)))


def _operation_reply(op: Operation, policy: HttpPolicy, headers: dict[str, str]) -> Reply:
    if op.status is Status.SUCCEEDED:
        return Reply(policy.succeeded_status, op.to_dict(), headers)
    if op.status is Status.FAILED:
        return Reply(policy.failed_status, op.to_dict(), headers)
    return Reply(202, op.to_dict(), {**headers, "Retry-After": poll_after(op, policy)})


def accepted(sub: Submission, location: str, policy: HttpPolicy, *, now: float) -> Reply:
    """The answer to a write: 202 for a new operation, the operation as it stands for a replay, 409 while the
    first request is still being accepted."""
    op = sub.operation
    if sub.created:
        # Created just now, on the store's clock: the delay it was created with, exactly.
        return Reply(202, op.to_dict(), {"Location": location, "Retry-After": poll_after(op, policy, op.created_at)})
    if being_accepted(op, now):
        return problem(409, "idempotency_key_in_use", "Request in progress",
                       "a request with this idempotency key is still being processed; retry later",
                       retry_after=policy.retry_after)
    return _operation_reply(op, policy, {"Location": location, "Idempotent-Replayed": "true"})


def status_reply(op: Operation | None, caller: str | None, policy: HttpPolicy) -> Reply:
    if op is None or not owns(caller, op):
        return problem(404, "operation_not_found", "Not found", "no such operation")
    # The status resource itself exists: always 200, with a hint of when to poll again while unfinished.
    return Reply(200, op.to_dict(), {} if op.is_final else {"Retry-After": poll_after(op, policy)})


def error_reply(exc: Exception, policy: HttpPolicy, *, reading: bool = False) -> Reply:
    """Map an idemtasks error to its documented problem response; anything else is re-raised by the caller.
    ``reading``: the error of a status read, which records and queues nothing."""
    if isinstance(exc, InvalidKey):
        return problem(400, "idempotency_key_invalid", "Invalid idempotency key", str(exc))
    if isinstance(exc, InvalidCredentials):
        return problem(400, "credentials_invalid", "Invalid credentials", str(exc))
    if isinstance(exc, IdempotencyKeyMismatch):
        return problem(policy.mismatch_status, "idempotency_key_mismatch", "Idempotency key reused",
                       "this idempotency key was already used with a different request", operation=exc.operation_id)
    if isinstance(exc, TooLarge):
        return problem(413, "payload_too_large", "Payload too large", str(exc))
    if isinstance(exc, NotSerializable):
        return problem(400, "invalid_request", "Invalid request", str(exc))
    if isinstance(exc, (StoreUnavailable, PublishFailed)):
        logger.warning("idemtasks: answered 503: %s", exc)
        return problem(503, "service_unavailable", "Service unavailable",
                       "the operation could not be read; retry later" if reading else
                       "the request may not have been recorded or queued; retry with the same idempotency key",
                       retry_after=max(policy.retry_after, 1))
    if isinstance(exc, StoreError):
        # The store answered and refused (a missing table, a permission): waiting would not help, so no
        # Retry-After. The store's own message, which names it, goes to the log, not to the client.
        logger.error("idemtasks: answered 500: %s", exc)
        return problem(500, "store_error", "Store error",
                       "the operation could not be read" if reading else "the request could not be recorded")
    if isinstance(exc, IdemtasksError):
        logger.error("idemtasks: answered 500: %s: %s", type(exc).__name__, exc)
        return problem(500, "internal_error", "Internal error", type(exc).__name__)
    raise exc


def key_required(policy: HttpPolicy | None = None) -> Reply:
    names = (policy or HttpPolicy()).header_names
    return problem(400, "idempotency_key_required", "Idempotency key required",
                   f"this endpoint requires an idempotency key, in the {' or '.join(names)} header")
