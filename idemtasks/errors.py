"""The exceptions idemtasks raises.

Every exception derives from one root, so ``except IdemtasksError`` catches them all::

    IdemtasksError
    ├── InvalidKey                  the idempotency key or scope is not acceptable
    ├── IdempotencyKeyMismatch      one key, two different payloads
    ├── NotSerializable             arguments or a result cannot be stored as JSON
    ├── TooLarge                    arguments or a result exceed a configured size limit
    ├── ConfigurationError          a setting or store URL makes no sense
    ├── StoreError                  the store failed
    │   └── StoreUnavailable        the store cannot be reached (retry later)
    ├── PublishFailed               the operation was recorded but the broker refused the message
    ├── LeaseLost                   a holder was fenced off: another worker took the operation over
    └── OperationFailed             replay of an operation whose stored outcome is a failure

Driver exceptions (redis-py, SQLAlchemy, kombu) are never leaked: they are wrapped with ``raise … from exc``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = [
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "IdemtasksError",
    "InvalidKey",
    "LeaseLost",
    "NotSerializable",
    "OperationFailed",
    "PublishFailed",
    "StoreError",
    "StoreUnavailable",
    "TooLarge",
]


class IdemtasksError(Exception):
    """Raised by idemtasks, never directly: the root of every error below."""

    #: The keyword-only fields of this class's constructor and its bases', carried in ``args`` (see _carrying).
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            own = [name for name, p in inspect.signature(init).parameters.items() if p.kind is p.KEYWORD_ONLY]
            cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))
            cls.__init__ = _carrying(init)  # type: ignore[method-assign]

    def __str__(self) -> str:
        if _carried(self.args) is not None:  # the fields are not part of the text: what Exception makes of the rest
            rest = self.args[:-1]
            return "" if not rest else str(rest[0]) if len(rest) == 1 else str(rest)
        return super().__str__()

    def __reduce__(self) -> tuple[object, ...]:
        # Celery pickles exceptions (result backends, eager mode) and replaces any it cannot round-trip with a
        # base class; keyword-only constructors need this to survive as themselves, fields included.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


_PLAIN = (str, int, float, bool, type(None))
_MISSING = object()


#: The one key of the dict that follows the message in ``args``: named so that no application's own dict argument
#: is taken for it.
_FIELDS_KEY = "idemtasks_fields"


def _carried(args: tuple[Any, ...]) -> dict[str, Any] | None:
    """The fields ``args`` carries after the message (and any other arguments), or ``None`` if it carries none."""
    if args and isinstance(args[-1], dict) and set(args[-1]) == {_FIELDS_KEY}:
        carried = args[-1][_FIELDS_KEY]
        return carried if isinstance(carried, dict) else None
    return None


def _carrying(init: Callable[..., None]) -> Callable[..., None]:
    """``init``, whose exception also survives a result backend that stores JSON (Celery's default).

    Such a backend keeps a failure's class, module and ``args`` only, and rebuilds it as ``cls(*args)``: a
    constructor with required keyword fields would refuse, and the caller of ``AsyncResult.get()`` would get a bare
    ``Exception`` instead of the ``OperationFailed`` it catches. So a class with keyword-only fields has ``args`` =
    ``(message, …, {"idemtasks_fields": {field: value}})``: the arguments it gave ``Exception``, then the fields it
    set, those JSON cannot carry as ``None``, from which ``cls(*args)`` rebuilds it, fields included. Called with
    positional arguments its constructor does not take (``cls(message)``, from an earlier release), it is rebuilt
    with those fields ``None``. A class without such fields keeps its ``args``.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: IdemtasksError, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        carried = None if kwargs else _carried(args)
        if carried is None and args and not kwargs:
            try:
                signature.bind(self, *args)
            except TypeError:
                # The message alone (an earlier release's), or arguments the constructor cannot take: the fields
                # are not known.
                carried = dict.fromkeys(fields)
        if carried is not None:
            Exception.__init__(self, *args)
            for name in fields:
                if name in carried:  # those the original had, not others
                    with contextlib.suppress(AttributeError):  # a read-only property: left unset, not fatal
                        setattr(self, name, carried[name])
            return
        init(self, *args, **kwargs)
        if fields:
            # Only attributes named as the fields: a constructor may use a keyword for the message alone.
            values = {name: getattr(self, name, _MISSING) for name in fields}
            kept = {k: v if isinstance(v, _PLAIN) else None for k, v in values.items() if v is not _MISSING}
            given = self.args[:-1] if _carried(self.args) is not None else self.args  # a base's init carried its own
            self.args = (*given, {_FIELDS_KEY: kept})

    return __init__


def _rebuild(cls: type[IdemtasksError], args: tuple[object, ...], state: dict[str, object]) -> IdemtasksError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class InvalidKey(IdemtasksError, ValueError):
    """Raised when an idempotency key or scope is empty, too long, not a string or not printable."""

    def __init__(self, message: str, *, value: object) -> None:
        super().__init__(message)
        self.value = value


class IdempotencyKeyMismatch(IdemtasksError):
    """Raised when a key already names an operation whose payload fingerprint differs from this request's."""

    def __init__(
        self, *, scope: str, key: str, operation_id: str, stored_fingerprint: str, fingerprint: str
    ) -> None:
        super().__init__(
            f"idempotency key {key!r} in scope {scope!r} was used for operation {operation_id} with a different payload"
        )
        self.scope = scope
        self.key = key
        self.operation_id = operation_id
        self.stored_fingerprint = stored_fingerprint
        self.fingerprint = fingerprint


class NotSerializable(IdemtasksError, TypeError):
    """Raised when task arguments (``what="arguments"``) or a result (``what="result"``) are not JSON-serializable."""

    def __init__(self, message: str, *, what: str) -> None:
        super().__init__(message)
        self.what = what


class TooLarge(IdemtasksError, ValueError):
    """Raised when serialized arguments or a result exceed the configured size limit."""

    def __init__(self, *, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what}: {size} bytes serialized, over the limit of {limit}")
        self.what = what
        self.size = size
        self.limit = limit


class ConfigurationError(IdemtasksError, ValueError):
    """Raised when a setting, a task option or a store URL is invalid (for example an unknown URL scheme)."""


class StoreError(IdemtasksError):
    """Raised when the store answered with an error that retrying will not fix."""


class StoreUnavailable(StoreError):
    """Raised when the store cannot be reached or timed out; the operation is unchanged and a retry is safe."""


class PublishFailed(IdemtasksError):
    """Raised when the operation was recorded but its message could not be published; submitting again republishes."""

    def __init__(self, message: str, *, operation_id: str) -> None:
        super().__init__(message)
        self.operation_id = operation_id


class LeaseLost(IdemtasksError):
    """Raised when a holder tries to change an operation after another holder took it over (stale fencing token)."""

    def __init__(self, *, operation_id: str, fencing_token: int, current_token: int | None) -> None:
        super().__init__(
            f"operation {operation_id}: fencing token {fencing_token} is stale"
            + ("" if current_token is None else f" (current holder has {current_token})")
        )
        self.operation_id = operation_id
        self.fencing_token = fencing_token
        self.current_token = current_token


class OperationFailed(IdemtasksError):
    """Raised when a replayed operation's stored outcome is a failure; carries the original error's type and message."""

    def __init__(self, *, operation_id: str, error_type: str, error_message: str) -> None:
        super().__init__(f"{error_type}: {error_message}")
        self.operation_id = operation_id
        self.error_type = error_type
        self.error_message = error_message
