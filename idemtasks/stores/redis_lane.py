"""Pipelined completions for the Redis store: a worker thread's own connection, its "lane".

A worker thread claims on its lane and writes each completion to it without waiting for the answer. The answer is
read in front of the next claim's, which went out behind it on the same connection, so an executed task costs one
synchronous round trip (the claim) instead of two. A thread left idle has its answers read by a collector thread
after :data:`COLLECT_AFTER`.

What this changes, and what it does not:

* The fencing check is the script's, so it is as strict as ever: a stale token is refused on the server.
* Redis applies a completion as soon as it reads it, so clients see the outcome no later than before, and a
  duplicate claim sent behind it on the same lane always finds it done (one connection is served in order).
* Only the worker *learning* the outcome is deferred. When the answer is not "done", the store resolves it: it
  sends the completion again if the connection broke or the script cache was flushed (a completion that had in
  fact landed is recognised by its fencing token), and hands what it cannot settle — the lease was lost, the
  store stays down — to the ``settle`` callback given with the completion (see :mod:`idemtasks.execution`).
* Celery may acknowledge the message before the answer is read. If the completion is then lost together with the
  worker process — the connection breaks at that moment *and* the process dies before it sent the completion
  again — the operation stays running until its lease runs out and recovery runs it again: the same exposure as a
  Redis server that loses its last writes in a crash.

A thread that submits does the same with the "published" flag it clears after publishing a new operation's
message: a submit costs one synchronous round trip, the create. A lane lives as long as its thread, so a server
that starts a thread per request (a development server) pays a connection per request; thread pools do not.

Greenlet pools (gevent, eventlet) patch the socket module; lanes would multiply connections per greenlet, so
they are not used there and every call takes the ordinary, synchronous path.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.backoff import AbstractBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .lanes import COLLECT_AFTER, BaseLane, Pending, lanes_supported, resolve_all

_hiredis_pack: Callable[[Any], bytes] | None
try:  # redis-py's own packer wraps hiredis in a per-argument generator: measurable at a few µs a task
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency of the redis extra
    _hiredis_pack = None

__all__ = ["COLLECT_AFTER", "JitterBackoff", "Lane", "Pending", "client_retry", "lanes_supported"]

#: Tries of one call on a broken connection (the client's own retry policy for ordinary calls).
_TRIES = 3

# Retry jitter comes from a generator of the store's own. The module-level functions of ``random`` share one
# state with the application: a lane's collector or the lease keeper retrying in the background would move it
# under the application's feet, so a program that seeds ``random`` (a simulation, a property-based test) would not
# draw the same numbers twice.
_jitter = random.Random()


class JitterBackoff(AbstractBackoff):
    """Equal-jitter back-off (half fixed, half random) for the store's clients, drawn from :data:`_jitter`."""

    def __init__(self, cap: float, base: float) -> None:
        self.cap, self.base = cap, base

    def compute(self, failures: int) -> float:
        half = min(self.cap, self.base * 2 ** failures) / 2
        return float(half + _jitter.uniform(0, half))


def client_retry(retry_class: Callable[..., Any]) -> dict[str, Any]:
    """The retry settings of the store's clients (redis-py's ``Retry``, or its asyncio twin), as client keyword
    arguments. Two retries ride out a stale pooled connection or a failover; redis-py's default (ten) would hold a
    worker for ten socket timeouts when the server is gone."""
    return {"retry": retry_class(JitterBackoff(cap=0.5, base=0.02), 2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}


class Lane(BaseLane):
    """One Redis connection owned by one thread (plus the collector, under ``lock``)."""

    def __init__(self, connection: Any, load_script: Callable[[str], Any]) -> None:
        super().__init__()
        self.connection = connection
        self._load_script = load_script
        # redis-py's Connection formats its address and checks its health settings on every read and write: a few
        # µs per call, several times per task. A lane owns its connection, so it talks to the socket and the parser
        # itself once connected, with the same error translation; a redis-py without those attributes (or without
        # hiredis) keeps the ordinary path.
        self._direct = _hiredis_pack is not None and hasattr(connection, "_sock") \
            and callable(getattr(getattr(connection, "_parser", None), "read_response", None))

    def call(self, sha: str, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run a script and wait for its answer (reading a pending completion's answer first)."""
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                for attempt in range(_TRIES):
                    try:
                        self._send(("EVALSHA", sha, str(len(keys)), *keys, *args))
                        self._read_pending(done)
                        return self._read()
                    except NoScriptError:
                        # The server restarted or its script cache was flushed: load and send again.
                        self._load_script(script)
                    except (RedisConnectionError, RedisTimeoutError) as exc:
                        self._broken(done, exc)
                        if attempt == _TRIES - 1:
                            raise
                        time.sleep(_jitter.uniform(0.01, 0.02) * 2 ** attempt)
                    except ResponseError:  # an error reply to this call: every answer sent was read
                        raise
                    except BaseException as exc:
                        # Interrupted between the write and its answer (a soft time limit or Ctrl-C, raised by a
                        # signal handler at any bytecode): the answers still on the connection would be read as the
                        # next calls'. Drop it; a completion whose answer was pending is settled as unknown.
                        self._drop(done, exc)
                        raise
                raise RedisConnectionError("script could not be loaded")  # pragma: no cover - NOSCRIPT every time
        finally:
            resolve_all(done)

    def send(self, sha: str, keys: Sequence[str], args: Sequence[str], resolve: Callable[[Any], None]) -> None:
        """Write a script call without waiting; ``resolve`` gets its answer (or the error reading it) later."""
        self._send_unanswered(lambda: self._send(("EVALSHA", sha, str(len(keys)), *keys, *args)), resolve,
                              (RedisConnectionError, RedisTimeoutError))

    def _collect_pending(self, done: list[tuple[Pending, Any]]) -> None:
        try:
            self._read_pending(done)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._broken(done, exc)
        except BaseException as exc:  # interrupted mid-read (see call)
            self._drop(done, exc)
            raise

    def _send(self, command: tuple[str, ...]) -> None:
        conn = self.connection
        sock = conn._sock if self._direct else None
        if sock is None:  # not connected yet (or after a failure), or no direct path: redis-py connects and sends
            packed = [_hiredis_pack(command)] if _hiredis_pack is not None else conn.pack_command(*command)
            conn.send_packed_command(packed, check_health=False)
            return
        try:
            sock.sendall(_hiredis_pack(command))  # type: ignore[misc]  # _direct implies hiredis
        except TimeoutError as exc:  # socket.timeout
            conn.disconnect()
            raise RedisTimeoutError("Timeout writing to socket") from exc
        except OSError as exc:
            conn.disconnect()
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # As redis-py does: a command half written (interrupted by a signal handler's exception) would run
            # together with the next one.
            conn.disconnect()
            raise

    def _read(self) -> Any:
        conn = self.connection
        if not self._direct:
            return conn.read_response()
        try:
            answer = conn._parser.read_response()
        except TimeoutError as exc:  # socket.timeout; redis-py's own TimeoutError is not a subclass of it
            conn.disconnect()
            raise RedisTimeoutError("Timeout reading from socket") from exc
        except OSError as exc:
            conn.disconnect()
            raise RedisConnectionError(f"Error while reading from socket: {exc}") from exc
        except BaseException:
            # As redis-py does: a half-read answer leaves the connection out of step with its commands.
            conn.disconnect()
            raise
        if isinstance(answer, ResponseError):
            raise answer
        return answer

    def _read_pending(self, done: list[tuple[Pending, Any]]) -> None:
        # self.pending is cleared only once its answer is in ``done``: whatever interrupts the read (a broken
        # connection, a signal handler's exception) leaves it there for _broken or _drop to hand over as unknown.
        # An interruption between the two lines hands it over twice, which is the lesser harm: a resend of a
        # completion that landed is recognised (a refused one reaches settle twice); clearing it first could lose it.
        pending = self.pending
        if pending is None:
            return
        try:
            answer: Any = self._read()
        except ResponseError as exc:  # an error reply: NOSCRIPT after a restart, OOM, … (the lane is still in step)
            answer = exc
        done.append((pending, answer))
        self.pending = None

    def _broken(self, done: list[tuple[Pending, Any]], exc: Exception) -> None:
        """The connection failed mid-conversation: whatever was pending on it has an unknown outcome."""
        self.connection.disconnect()
        pending, self.pending = self.pending, None
        if pending is not None:
            done.append((pending, exc))

    def _drop(self, done: list[tuple[Pending, Any]], why: BaseException) -> Exception:
        # A connection error is what the store's resolvers already take for "unknown": the completion is sent again.
        exc = RedisConnectionError(f"connection dropped: interrupted by {type(why).__name__}")
        self._broken(done, exc)
        return exc

    def close(self) -> None:
        done: list[tuple[Pending, Any]] = []
        try:
            with self.lock:
                self._collect_pending(done)
                self.connection.disconnect()
        finally:
            resolve_all(done)
