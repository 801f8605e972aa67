"""Stores and how a URL picks one.

``redis://`` and ``rediss://`` open :class:`~idemtasks.stores.redis.RedisStore`; ``postgresql…``, ``sqlite…``,
``mysql…`` and ``mariadb…`` open :class:`~idemtasks.stores.sql.SQLStore`; ``memory://`` opens
:class:`~idemtasks.stores.memory.MemoryStore`. Backends are imported only when asked for, so the core needs
neither redis-py nor SQLAlchemy.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import sys
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, StoreUnavailable
from ..forks import fresh_in_child
from .base import Store

__all__ = ["REDIS_SCHEMES", "SQL_SCHEMES", "Store", "open_in_background", "open_store", "opened_store", "public_url",
           "shared_store", "url_scheme"]

#: URL schemes (before any "+driver") that open a SQL store.
SQL_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql", "mariadb")
#: URL schemes that open a Redis store.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def url_scheme(url: str) -> str:
    """The scheme of a store URL, without its "+driver", in lower case."""
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def open_store(url: str, **options: Any) -> Store:
    """Open a new store for ``url``; ``options`` go to the backend's constructor."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"store URL {url!r} is not a URL (expected e.g. redis://, postgresql+psycopg://, "
                                 "sqlite:///, mysql+pymysql://, memory://)")
    scheme = url_scheme(url)
    if scheme in REDIS_SCHEMES:
        from .redis import RedisStore

        try:
            return RedisStore(url, **options)
        except ConfigurationError:
            raise  # the store's own, which names the problem already
        except (TypeError, ValueError) as exc:
            raise _unusable(url, exc) from exc
    if scheme in SQL_SCHEMES:
        # .sql first: without SQLAlchemy, its ImportError says what to install.
        from .sql import SQLStore  # noqa: I001

        from sqlalchemy.exc import ArgumentError

        try:
            return SQLStore(url, **options)
        except ConfigurationError:
            raise
        except (TypeError, ValueError, ArgumentError) as exc:  # ArgumentError: no such dialect or driver
            raise _unusable(url, exc) from exc
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url, **options)
    raise ConfigurationError(f"store URL scheme {scheme!r} is not supported; use redis, rediss, postgresql, "
                             "sqlite, mysql, mariadb or memory")


def _unusable(url: str, exc: Exception) -> ConfigurationError:
    """What the URL says cannot be used: a port out of range, a query value of the wrong type, no such driver, a
    driver that takes other arguments. No retry mends it."""
    return ConfigurationError(f"store URL {public_url(url)} cannot be opened: {type(exc).__name__}: {exc}")


_shared: dict[tuple[int, str], Store] = {}
# One lock per URL and process, held while its store opens, which may take as long as its connect timeouts (a
# database that accepts connections and never answers): one such store holds up only the callers of its own URL.
# Keyed by the process too, so that a forked child never meets a lock its parent held as it forked.
_opening_locks: dict[tuple[int, str], threading.Lock] = {}
# Opens under way on threads of their own, for the asyncio side (see open_in_background).
_opening: dict[tuple[int, str], concurrent.futures.Future[Store]] = {}
# Guards the two dicts above, only for as long as a lookup: each forked child gets its own (see idemtasks.forks).
_shared_lock = threading.Lock()
fresh_in_child(sys.modules[__name__], "_shared_lock", threading.Lock)


def shared_store(url: str) -> Store:
    """One store per URL and per process: connections must not cross a fork (prefork pool children)."""
    cache_key = (os.getpid(), url)
    store = _shared.get(cache_key)
    if store is None:
        with _shared_lock:
            lock = _opening_locks.setdefault(cache_key, threading.Lock())
        with lock:
            store = _shared.get(cache_key)
            if store is None:
                store = _shared[cache_key] = open_store(url)
    return store


def opened_store(url: str) -> Store | None:
    """The store :func:`shared_store` opened for ``url`` in this process, or ``None``: it never opens one."""
    return _shared.get((os.getpid(), url))


def open_in_background(url: str) -> concurrent.futures.Future[Store]:
    """:func:`shared_store` of ``url`` on a thread of its own, one at a time per URL and process: whoever asks while
    it is under way shares its outcome. Against a database that does not answer, requests arriving together then
    wait for one open, and the threads that run store calls and publishes are not taken up by them."""
    key = (os.getpid(), url)
    with _shared_lock:
        future = _opening.get(key)
        if future is None:
            future = _opening[key] = concurrent.futures.Future()
            # Running: a waiter that gives up (its request cancelled) cannot cancel it for the others.
            future.set_running_or_notify_cancel()
            try:
                threading.Thread(target=_open_into, args=(url, key, future), name="idemtasks-open-store",
                                 daemon=True).start()
            except Exception as exc:  # no thread to be had: this caller is told, and the next one tries again
                del _opening[key]
                failed = StoreUnavailable(f"store {public_url(url)} could not be opened: no thread to open it: {exc}")
                failed.__cause__ = exc
                future.set_exception(failed)
    return future


def _open_into(url: str, key: tuple[int, str], future: concurrent.futures.Future[Store]) -> None:
    try:
        future.set_result(shared_store(url))
    except BaseException as exc:  # the caller's to see: StoreUnavailable, ConfigurationError…
        future.set_exception(exc)
    finally:
        with _shared_lock:
            _opening.pop(key, None)  # a store that failed to open is tried again by the next request


def public_url(url: str) -> str:
    """The URL without its passwords (in the user info, or a query parameter such as libpq's ``password=`` and
    ``sslpassword=`` or PyMySQL's ``passwd=``), for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not one urllib can read (an unclosed IPv6 bracket): its password hidden, its query left out
        return _USERINFO.sub(r"\1:***@", url.split("?", 1)[0], count=1)
    params = parts.query.split("&")
    userinfo = _USERINFO.match(url)
    if userinfo is None and not any(_is_secret(p) for p in params):
        return url  # as given: rebuilt, sqlite:////abs.db would read sqlite://abs.db, a host "abs"
    if parts.query:
        # Only the query is rewritten, in place: the rest stays as given (see above).
        head, _, tail = url.partition("?")
        query = "&".join(f"{p.partition('=')[0]}=***" if _is_secret(p) else p for p in params)
        url = f"{head}?{query}{tail[len(parts.query):]}"
    if userinfo is not None:
        url = _USERINFO.sub(r"\1:***@", url, count=1)
    return url


#: The user info's password as SQLAlchemy reads it: anything up to the first "@", a "#", "/" or "?" too, which
#: urllib would take for the start of a fragment, a path or a query (and so show the rest of the password).
_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*://[^:/@?#]*):[^@]*@")


def _is_secret(param: str) -> bool:
    name, eq, _ = param.partition("=")
    return bool(eq) and unquote(name).lower().endswith(("password", "passwd"))
