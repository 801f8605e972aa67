"""Keys, scopes, operation ids, fingerprints and the JSON codec for stored values.

The operation id starts with the digest of ``(scope, key)``: a store can find the record from the id alone (one
round trip, and on Redis Cluster the same hash slot), while the random tail keeps the id unguessable and makes an
operation re-created after expiry a different operation.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from kombu.utils.json import JSONEncoder
from kombu.utils.json import loads as _kombu_loads

from .errors import InvalidKey, NotSerializable, TooLarge

__all__ = [
    "DEFAULT_SCOPE",
    "MAX_KEY_LENGTH",
    "MAX_SCOPE_LENGTH",
    "canonical_call",
    "delivery_route",
    "digest_from_id",
    "dump_json",
    "fingerprint",
    "fingerprint_of_call",
    "key_digest",
    "load_json",
    "new_operation_id",
    "parse_stored_call",
    "retried_call",
    "stored_call",
    "validate_key",
    "validate_scope",
]

#: The scope of keys submitted without one: a single global namespace.
DEFAULT_SCOPE = "global"
#: Longest accepted idempotency key, as Stripe and most public APIs allow.
MAX_KEY_LENGTH = 255
#: Longest accepted scope; scopes are built from caller identity and route, so they get more room than keys.
MAX_SCOPE_LENGTH = 1024

logger = logging.getLogger("idemtasks")

_DIGEST_LEN = 32  # hex characters: 128 bits of sha256
_RANDOM_LEN = 24  # hex characters: 96 random bits
ID_LENGTH = _DIGEST_LEN + _RANDOM_LEN
_HEX = frozenset("0123456789abcdef")


def _validate(value: object, *, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidKey(f"{what} must be a string, not {type(value).__name__}", value=value)
    if not value:
        raise InvalidKey(f"{what} must not be empty", value=value)
    if len(value) > limit:
        raise InvalidKey(f"{what} is {len(value)} characters long; the limit is {limit}", value=value)
    if not value.isprintable():
        raise InvalidKey(f"{what} contains characters that are not printable", value=value)
    return value


def validate_key(key: object) -> str:
    """Return ``key`` if it is a string of 1 to 255 printable characters, else raise :class:`InvalidKey`."""
    return _validate(key, what="idempotency key", limit=MAX_KEY_LENGTH)


def validate_scope(scope: object) -> str:
    """Return ``scope`` if it is a string of 1 to 1024 printable characters, else raise :class:`InvalidKey`."""
    return _validate(scope, what="scope", limit=MAX_SCOPE_LENGTH)


@functools.lru_cache(maxsize=256)
def key_digest(scope: str, key: str) -> str:
    """The store's address for ``(scope, key)``. NUL cannot occur in either part, so the join is unambiguous.

    Cached: one operation's claim and completion (or create and publish flag) each need it, and a hash costs
    more than a cache hit. Small, since only the operations a process is handling right now benefit.
    """
    return hashlib.sha256(f"{scope}\x00{key}".encode()).hexdigest()[:_DIGEST_LEN]


def new_operation_id(digest: str) -> str:
    return digest + secrets.token_hex(_RANDOM_LEN // 2)


def digest_from_id(operation_id: str) -> str | None:
    """The ``(scope, key)`` digest inside an operation id, or ``None`` for a string that is not one of our ids."""
    if len(operation_id) != ID_LENGTH or not _HEX.issuperset(operation_id):
        return None
    return operation_id[:_DIGEST_LEN]


class _CanonicalEncoder(JSONEncoder):
    # kombu's encoder knows datetime, Decimal, UUID and friends and tags them so they decode to the same type,
    # which keeps a replayed result identical to the first one. Anything else is refused rather than str()-ed.
    pass


# An encoder keeps only its settings, so one instance per setting serves every thread (``json.dumps`` with ``cls=``
# would build a new one per call, a measurable share of a task's overhead).
_ENCODERS = {
    canonical: _CanonicalEncoder(sort_keys=canonical, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for canonical in (False, True)
}


def dump_json(value: Any, *, what: str, limit: int | None = None, canonical: bool = False) -> str:
    """Serialize ``value`` for storage; raise :class:`NotSerializable` or :class:`TooLarge` instead of storing junk."""
    if value is None:  # what most task bodies return
        return "null"
    try:
        text: str = _ENCODERS[canonical].encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        # Not any exception: a type's own JSON hook that raises something else (a connection it needed) passes it
        # on, and a body's retry_on still applies to it.
        raise NotSerializable(f"{what} cannot be stored as JSON: {exc}", what=what) from exc
    if text.isascii():  # most values: one byte per character, and nothing to check
        size = len(text)
    else:
        # JSON escapes control characters, but not a lone surrogate (an undecodable file name from os.listdir, say):
        # no store can hold that, and finding out at the store would leave the operation running, to run again.
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise NotSerializable(f"{what} cannot be stored: it is not valid Unicode ({exc.reason})",
                                  what=what) from exc
    if limit is not None and size > limit:
        raise TooLarge(what=what, size=size, limit=limit)
    if '"__type__":' in text and _has_type_tag(value):  # the walk only when the text says there may be one
        # kombu's JSON (Celery's, and ours, which keeps a datetime a datetime) reads such a dict back as the type it
        # names, or refuses it: a stored result would replay as something else, or not at all, and arguments would
        # reach no worker (Celery cannot decode their message).
        raise NotSerializable(f"{what} cannot be stored as JSON: a dict whose only keys are '__type__' and "
                              "'__value__' reads back as another type (kombu's tag for one)", what=what)
    return text


def _has_type_tag(value: Any) -> bool:
    """Whether ``value`` holds a dict of its own with exactly kombu's tag keys. Walked without recursion: the
    encoder took the value at any depth its own recursion allows."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.keys() == _TAG_KEYS:
                return True
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


_TAG_KEYS = {"__type__", "__value__"}


def load_json(text: str | None) -> Any:
    return None if text is None else _kombu_loads(text)  # type: ignore[no-untyped-call]


def canonical_call(task_name: str, args: Any, kwargs: Any, *, limit: int | None = None) -> str:
    """The task name and its arguments as canonical JSON (sorted keys, tuples as lists): what an operation stores
    so that recovery can publish its message again, and what its fingerprint hashes."""
    return dump_json([task_name, list(args or ()), dict(kwargs or {})], what="arguments", limit=limit,
                     canonical=True)


#: The ``apply_async`` options that say where a message goes. ``submit`` stores them with the call, so that a copy
#: recovery publishes goes where the first one went: a queue that only some workers consume (the ones holding a
#: payment provider's credentials, say) is often why a caller named it, and the default queue may have no consumer
#: that knows the task at all.
ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "priority")
#: The callbacks given to ``submit`` (signatures, or lists of them): stored too, or the follow-up work chained to a
#: payment (its receipt, its notification) would be lost with the message that recovery replaces.
CALLBACK_OPTIONS = ("link", "link_error")
#: The per-call time limits (seconds): stored too, or a copy would run a body its first message bounded without the
#: bound (the pool kills a body past its hard limit, and max_crashes then fails the operation; a copy without the
#: limit ran a hung body for good).
LIMIT_OPTIONS = ("time_limit", "soft_time_limit")


def absolute_expires(value: Any, tz: Any = None) -> str | None:
    """An ``expires`` option as the time it names, in ISO 8601 with its offset: seconds from now, or a time, read as
    the worker reads it (given the app's ``timezone``, ``tz``). ``None`` for no deadline or one it cannot read.

    Stored so, a copy that recovery publishes carries the first message's deadline, not one counted from its own
    publication, and recovery can tell that a deadline has passed (see :meth:`Sweeper._recover
    <idemtasks.recovery.Sweeper._recover>`)."""
    from celery.utils.time import maybe_iso8601, maybe_make_aware

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        when = datetime.now(timezone.utc) + timedelta(seconds=float(value))
    elif isinstance(value, (str, datetime)):
        try:
            when = maybe_iso8601(value)
        except ValueError:
            return None  # Celery refuses it at publishing
    else:
        return None
    return None if when is None else str(maybe_make_aware(when, tz).isoformat())


def is_past(expires: str, *, by: float = 0.0) -> bool:
    """Whether the deadline :func:`absolute_expires` stored has passed, by ``by`` seconds at least, on this host's
    clock (the worker's test, on the worker's)."""
    return datetime.fromisoformat(expires) + timedelta(seconds=by) <= datetime.now(timezone.utc)


def stored_call(call: str, options: dict[str, Any], *, tz: Any = None) -> str:
    """The payload an operation stores: its ``call``, followed by the routing, callback and time limit ``options`` it
    was published with, and its ``expires`` deadline as a time (``tz``: the app's ``timezone``).

    The fingerprint stays the call's alone: where a message goes, and what follows it, is not what it asks for, so a
    repeat sent to another queue is a replay. A kombu ``Queue`` or ``Exchange`` is kept by name; a value that is
    neither a name nor a number is left out (the copy then takes the task's own route). Callbacks that cannot be
    stored as JSON are left out with a warning: a pickle-serialized app can still send them the first time.
    """
    kept: dict[str, Any] = {}
    for option in ROUTING_OPTIONS:
        value = options.get(option)
        value = getattr(value, "name", value)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            kept[option] = value
    for option in LIMIT_OPTIONS:
        value = options.get(option)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            kept[option] = value
    if options.get("expires") is not None and (expires := absolute_expires(options["expires"], tz)) is not None:
        kept["expires"] = expires
    callbacks = {option: options[option] for option in CALLBACK_OPTIONS if options.get(option)}
    if callbacks:
        try:
            dump_json(callbacks, what="callbacks")
            kept.update(callbacks)
        except NotSerializable as exc:
            logger.warning("idemtasks: %s; a copy that recovery publishes will go without them", exc)
    if not kept:
        return call
    # ``call`` is a canonical JSON array: one more element goes before its closing bracket.
    return f"{call[:-1]},{dump_json(kept, what='publish options', canonical=True)}]"


def retried_call(payload: str, call: str, retries: int) -> str:
    """The stored ``payload`` (see :func:`stored_call`) with the call of a retry in place of its own, and the retry's
    count: what an operation given back for a retry stores, so that a copy recovery publishes in place of a lost
    retry message asks for what the retry asked for, and counts against ``max_retries`` where the retry would have.
    Where the message goes, its callbacks and its deadline stay those of the first publish."""
    options = {**parse_stored_call(payload)[3], "retries": retries}
    return f"{call[:-1]},{dump_json(options, what='publish options', canonical=True)}]"


def delivery_route(delivery_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where a delivered message came from, as publish options, read as Celery's own ``retry`` reads it: through the
    default exchange its routing key is its queue; otherwise its exchange and routing key. A record that a claim
    creates (a message sent by ``send_task``, beat or a plain ``apply_async``) stores them with its call, so that a
    copy recovery publishes goes where the first message went, not to the task's default route, which the workers of
    a routed deployment may not consume."""
    info = delivery_info or {}
    route: dict[str, Any] = {}
    exchange, routing_key = info.get("exchange"), info.get("routing_key")
    if routing_key:
        route.update({"queue": routing_key} if not exchange else {"exchange": exchange, "routing_key": routing_key})
    if info.get("priority"):  # 0 is what a message sent without one has (the virtual transports' default)
        route["priority"] = info["priority"]
    return route


def parse_stored_call(payload: str) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    """The task name, arguments and publish options of a stored payload (see :func:`stored_call`)."""
    name, args, kwargs, *options = load_json(payload)
    return name, args, kwargs, (options[0] if options else {})


def fingerprint_of_call(call: str) -> str:
    """128 bits of sha256, like the key digest: a stored record pays for every byte, and a client can only ever
    collide with its own operations (fingerprints are compared within one scope and key)."""
    return hashlib.sha256(call.encode()).hexdigest()[:_DIGEST_LEN]


def fingerprint(task_name: str, args: Any, kwargs: Any, *, limit: int | None = None) -> str:
    """A stable hash of the task name and its arguments in canonical JSON."""
    return fingerprint_of_call(canonical_call(task_name, args, kwargs, limit=limit))
