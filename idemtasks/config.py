"""Settings, in Celery's idiom: ``idemtasks_*`` keys in ``app.conf``, overridable per task class.

==============================  ======================================  ==========================================
``app.conf`` key                task attribute                          default
==============================  ======================================  ==========================================
``idemtasks_store_url``         ``store_url``                           :data:`DEFAULT_STORE_URL`
``idemtasks_ttl``               ``idempotency_ttl``                     :data:`DEFAULT_TTL` (24 h)
``idemtasks_lease``             ``lease_seconds``                       :data:`DEFAULT_LEASE` (60 s)
``idemtasks_scope``             ``idempotency_scope``                   :data:`~idemtasks.identity.DEFAULT_SCOPE`
``idemtasks_on_busy``           ``on_busy``                             :data:`DEFAULT_ON_BUSY` (``"retry"``)
``idemtasks_busy_countdown``    ``busy_countdown``                      :data:`DEFAULT_BUSY_COUNTDOWN` (1 s)
``idemtasks_store_retry_max``   ``store_retry_max_delay``               :data:`DEFAULT_STORE_RETRY_MAX_DELAY` (60 s)
``idemtasks_max_args_bytes``    ``max_args_bytes``                      :data:`DEFAULT_MAX_ARGS_BYTES` (256 KiB)
``idemtasks_max_result_bytes``  ``max_result_bytes``                    :data:`DEFAULT_MAX_RESULT_BYTES` (1 MiB)
``idemtasks_pipeline``          ``pipeline_completions``                :data:`DEFAULT_PIPELINE` (``True``)
``idemtasks_max_crashes``       ``max_crashes``                         :data:`DEFAULT_MAX_CRASHES` (3)
==============================  ======================================  ==========================================

Task-only attributes: ``key_func`` (key for messages sent without :meth:`submit`), ``retry_on`` (exception types
that are retried rather than stored as terminal failures), ``transactional`` and ``transaction_url``.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from typing import Any

from .errors import ConfigurationError
from .identity import DEFAULT_SCOPE
from .models import Operation, Status

__all__ = [
    "ACCEPT_WINDOW",
    "DEFAULT_BUSY_COUNTDOWN",
    "DEFAULT_LEASE",
    "DEFAULT_MAX_ARGS_BYTES",
    "DEFAULT_MAX_CRASHES",
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_ON_BUSY",
    "DEFAULT_PIPELINE",
    "DEFAULT_STORE_RETRY_MAX_DELAY",
    "DEFAULT_STORE_URL",
    "DEFAULT_TTL",
    "MAX_TASK_NAME",
    "MAX_TTL",
    "ON_BUSY_POLICIES",
    "SETTINGS",
    "being_accepted",
]

#: The embedded default: a SQLite file in the working directory, so nothing needs a server to try idemtasks.
DEFAULT_STORE_URL = "sqlite:///idemtasks.sqlite3"
#: How long an operation is remembered after its last change (Stripe keeps keys at least 24 h).
DEFAULT_TTL = 24 * 3600.0
#: How long a claim stays valid without renewal. A running task renews it every third of this. A crashed worker's
#: operation is taken over this long after its last renewal plus a grace of max(2 s, lease / 3) (see
#: :meth:`Store.claim <idemtasks.stores.base.Store.claim>`), which a holder merely cut off from the store uses to renew.
DEFAULT_LEASE = 60.0
#: What a duplicate does when another worker holds a live lease: ``"retry"`` (republish itself after
#: ``busy_countdown`` and replay the holder's result once it is stored), ``"wait"`` (poll the store in place, holding a
#: worker slot), or ``"ignore"`` (drop the duplicate; the holder's result is in the store).
DEFAULT_ON_BUSY = "retry"
ON_BUSY_POLICIES = ("retry", "wait", "ignore")
#: Delay before a busy duplicate looks again.
DEFAULT_BUSY_COUNTDOWN = 1.0
#: Cap of the exponential back-off used while the store is unreachable (the body never runs unclaimed).
DEFAULT_STORE_RETRY_MAX_DELAY = 60.0
#: Limits on the canonical JSON of stored arguments and results; a payments API has no business storing more.
DEFAULT_MAX_ARGS_BYTES = 256 * 1024
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024
#: Write a completion without waiting for its answer where the store can (Redis, PostgreSQL): one synchronous round
#: trip per executed task instead of two. See :mod:`idemtasks.stores.redis_lane` and :mod:`idemtasks.stores.sql_lane`
#: for what that defers and what it does not.
DEFAULT_PIPELINE = True
#: How many holders of one operation may die with its body running (killed by the OOM killer or the pool's hard time
#: limit, or gone with a shutdown) before a worker stores it as failed (``TooManyCrashes``) instead of starting the
#: body again. Without a cap, a body that kills its process every time would be taken over and started again after
#: every lease, for ever, repeating whatever it did before it died. ``0`` never gives up. Retries, requeues and store
#: outages waited out are not crashes.
DEFAULT_MAX_CRASHES = 3

#: How long a just-created operation counts as "still being accepted": its message is not yet confirmed published.
#: A duplicate inside this window is told to come back (HTTP 409); after it, the first request is presumed dead and
#: the message is published again, which is safe because the worker's claim deduplicates.
ACCEPT_WINDOW = 10.0


def being_accepted(op: Operation, now: float) -> bool:
    """Whether ``op`` is still being accepted at ``now`` (the store's clock): created less than ACCEPT_WINDOW ago and
    not yet published. Its creator may still publish it, or remove it should that fail: a repeat is told to come back
    (HTTP 409, the outbox's "try again") rather than answered with its id, and does not publish it itself."""
    return op.status is Status.PENDING and op.needs_publish and now - op.created_at < ACCEPT_WINDOW

#: (task attribute, ``app.conf`` key, default)
SETTINGS: tuple[tuple[str, str, Any], ...] = (
    ("store_url", "idemtasks_store_url", DEFAULT_STORE_URL),
    ("idempotency_ttl", "idemtasks_ttl", DEFAULT_TTL),
    ("lease_seconds", "idemtasks_lease", DEFAULT_LEASE),
    ("idempotency_scope", "idemtasks_scope", DEFAULT_SCOPE),
    ("on_busy", "idemtasks_on_busy", DEFAULT_ON_BUSY),
    ("busy_countdown", "idemtasks_busy_countdown", DEFAULT_BUSY_COUNTDOWN),
    ("store_retry_max_delay", "idemtasks_store_retry_max", DEFAULT_STORE_RETRY_MAX_DELAY),
    ("max_args_bytes", "idemtasks_max_args_bytes", DEFAULT_MAX_ARGS_BYTES),
    ("max_result_bytes", "idemtasks_max_result_bytes", DEFAULT_MAX_RESULT_BYTES),
    ("pipeline_completions", "idemtasks_pipeline", DEFAULT_PIPELINE),
    ("max_crashes", "idemtasks_max_crashes", DEFAULT_MAX_CRASHES),
)
#: The task attributes :func:`validate` reads.
VALIDATED = (*(attr for attr, _, _ in SETTINGS), "transactional", "transaction_url")


#: Longest ``idempotency_ttl`` (seconds): ten years. Stores keep times to the microsecond in 64-bit integers (Redis),
#: and a longer TTL (``inf``, ``1e300``) was stored as none: every duplicate ran again.
MAX_TTL = 10 * 365 * 24 * 3600.0


def _number(task_name: str, name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as seconds, if it reads as a finite number above 0 (or 0, with ``zero``): any number type, or a
    string of one (from the environment). NaN (every comparison with it is false: a lease of NaN never ran out) and
    infinity are refused."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise ConfigurationError(f"{task_name}: {name} must be a finite number of seconds, "
                                 f"{'0 or more' if zero else 'above 0'}, not {value!r}")
    return seconds


def _byte_limit(task_name: str, name: str, value: Any) -> None:
    # Whole numbers of any type (numpy's too), not strings: the limit is compared with sizes as it is.
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ConfigurationError(f"{task_name}: {name} must be a whole number of bytes above 0, or None, not {value!r}")


#: Longest task name: what the SQL stores' ``task_name`` column holds.
MAX_TASK_NAME = 255


def validate(task_name: str, values: dict[str, Any]) -> None:
    """Refuse settings that would break the guarantees rather than discover it under load."""
    if len(task_name) > MAX_TASK_NAME:
        # A SQL store refused every record of such a task: each claim failed, and its message went round for ever.
        raise ConfigurationError(f"{task_name[:80]}…: a task name must be at most {MAX_TASK_NAME} characters, not "
                                 f"{len(task_name)}")
    lease = _number(task_name, "lease_seconds", values["lease_seconds"])
    ttl = _number(task_name, "idempotency_ttl", values["idempotency_ttl"])
    if ttl > MAX_TTL:
        raise ConfigurationError(f"{task_name}: idempotency_ttl must be at most {MAX_TTL:.0f} s (ten years), not {ttl}")
    for name in ("busy_countdown", "store_retry_max_delay"):
        if name in values:
            # No zero store_retry_max_delay: while the store is away, each message would go round the broker at once,
            # again and again.
            _number(task_name, name, values[name], zero=name == "busy_countdown")
    for name in ("max_args_bytes", "max_result_bytes"):
        if name in values:
            _byte_limit(task_name, name, values[name])
    if "pipeline_completions" in values and values["pipeline_completions"] not in (True, False):  # 1, numpy's too
        raise ConfigurationError(f"{task_name}: pipeline_completions must be True or False, not "
                                 f"{values['pipeline_completions']!r}")
    # The record must outlive any lease on it, or a running operation could expire and its key start a second one.
    if ttl < 2 * lease:
        raise ConfigurationError(f"{task_name}: idempotency_ttl ({ttl}) must be at least twice lease_seconds ({lease})")
    crashes = values.get("max_crashes", DEFAULT_MAX_CRASHES)
    if isinstance(crashes, bool) or not isinstance(crashes, int) or crashes < 0:
        raise ConfigurationError(f"{task_name}: max_crashes must be a whole number, 0 or more, not {crashes!r}")
    if values["on_busy"] not in ON_BUSY_POLICIES:
        raise ConfigurationError(f"{task_name}: on_busy must be one of {ON_BUSY_POLICIES}, not {values['on_busy']!r}")
    # A transaction_url must name a SQL database in every app. Without one, the store URL is used, which each app
    # sets for itself: a shared task bound to an app that never runs it must not stop that app from starting, so that
    # case is logged when a worker starts (checks.check_settings) and refused when the task runs. The same goes for
    # the driver: a web process that only submits need not have the database driver its workers use.
    if values.get("transactional") and values.get("transaction_url"):
        transaction_url(task_name, values["transaction_url"], None)


def transaction_url(task_name: str, url: Any, store_url: Any) -> str:
    """The database a transactional task's body and its effects ledger use: ``transaction_url``, else the task's
    store URL. Refused (:class:`ConfigurationError`) unless SQLAlchemy knows how to open it; whether its driver is
    installed is this host's matter, which the worker checks where the body runs."""
    url = url or store_url
    problem = sql_problem(url, driver=False)
    if problem is not None:
        raise ConfigurationError(f"{task_name}: a transactional task needs transaction_url, a SQL database URL, "
                                 f"and its database is {problem}")
    return str(url)


def is_sql_store(store: Any) -> bool:
    """Whether ``store`` is a SQL store given as an object, whose engine runs a transactional task's body when it
    has no ``transaction_url``. (Only once the SQL store's module is loaded can an object be one: SQLAlchemy may be
    absent.)"""
    module = sys.modules.get("idemtasks.stores.sql")
    return module is not None and isinstance(store, module.SQLStore)


def body_on_store(task: Any) -> bool:
    """Whether a transactional task's body runs on its store's engine: no ``transaction_url``, and a SQL store given
    as an object. (Otherwise it runs on ``transaction_url``, else on a database opened from the store's URL.)"""
    return not task.transaction_url and is_sql_store(task.store_url)


def sql_problem(url: Any, *, driver: bool = True) -> str | None:
    """Why SQLAlchemy could not open ``url``, or ``None`` if it can (no connection is made). ``driver``: the
    driver must be installed in this process too."""
    if not isinstance(url, str):
        return f"a {type(url).__name__}, not a URL"
    return _dialect_problem(url, driver)


@functools.lru_cache(maxsize=64)
def _dialect_problem(url: str, driver: bool) -> str | None:
    # Cached: the worker checks again before each transactional body, and loading a dialect is not free.
    from .stores import public_url

    try:
        import sqlalchemy as sa

        from .stores.sql_schema import engine_url
    except ImportError:
        return "a URL, but SQLAlchemy is not installed (pip install idemtasks[sql])"
    try:
        # SQLAlchemy hides the user's password; public_url the one a query may carry too (?password=, libpq's way).
        shown = public_url(sa.make_url(url).render_as_string(hide_password=True))
    except Exception:  # not shown: what cannot be read as a URL cannot have its password hidden either
        return "a URL that cannot be read"
    try:
        dialect = engine_url(url).get_dialect()  # as the ledger opens it: postgres:// takes psycopg, say
        if dialect.is_async:
            return f"{shown}, an asyncio driver (the body runs in a synchronous transaction)"
        if driver:
            dialect.import_dbapi()  # the driver itself: a dialect loads without it
    except Exception as exc:  # not a URL (ArgumentError), no such dialect (NoSuchModuleError), no driver (ImportError)
        return f"{shown} ({type(exc).__name__}: {exc})"
    return None
