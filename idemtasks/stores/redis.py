"""The Redis store: one Lua script (one round trip) per state change, one ``HGETALL`` per read.

Each operation is a hash at ``{namespace}:{<digest>}``. The braces are a Redis Cluster hash tag: everything about
one ``(scope, key)`` lives in one slot, and since the operation id starts with the same digest, a lookup by id
needs no index. Recovery's index of unfinished operations (``{namespace}:pending`` and ``{namespace}:running``) is
the one thing outside that slot. The record layout and the scripts are in :mod:`idemtasks.stores.redis_scripts`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        ClusterError,
        NoScriptError,
        OutOfMemoryError,
        ReadOnlyError,
        RedisClusterException,
        RedisClusterUnreachableError,
        RedisError,
        SlotNotCoveredError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Redis store needs redis-py: pip install idemtasks[redis]") from exc

from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..identity import key_digest, load_json
from ..models import ClaimOutcome, ClaimResult, ErrorInfo, Operation, Status, Takeover
from . import public_url
from . import redis_scripts as lua
from .base import PURGE_GRACE, RENEW_TIMEOUT, ClaimRequest, CreateRequest, FinishRequest, Store, is_stale
from .lanes import opens_lanes, published_answer, settle_own_writes, thread_flag
from .redis_lane import Lane, client_retry, lanes_supported

__all__ = ["DRIVER_ERRORS", "RedisStore", "create_answer", "create_args", "joined", "known_nodes", "parse_record",
           "public_url", "tail"]

logger = logging.getLogger("idemtasks.store")

_STATUS = {"p": Status.PENDING, "r": Status.RUNNING, "s": Status.SUCCEEDED, "f": Status.FAILED}
_STATUS_CODE = {v: k for k, v in _STATUS.items()}
_CLAIM = {"b": ClaimOutcome.BUSY, "d": ClaimOutcome.DONE, "m": ClaimOutcome.MISMATCH}
_TAKEOVER = {0: Takeover.ALIVE, 1: Takeover.REQUEUED, 2: Takeover.SUSPECTED}  # the REQUEUE script's answers
# Failover and resharding answer with errors that a later attempt gets past, unlike a bad command.
# OOM included: a script refused for memory (maxmemory, noeviction) has written nothing, and passes again once keys
# expire or the limit is raised.
# On a cluster: no node reachable, a slot no node serves, or redirections that went on past the client's limit (a
# resharding under way: ClusterError "TTL exhausted"; ClusterDownError is one too).
# And a script the node does not have (NOSCRIPT): a replica just promoted, or a node restarted (scripts are neither
# replicated nor kept), which a cluster client's redirections can reach before it loads the script there.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError, ClusterError, OutOfMemoryError,
              RedisClusterUnreachableError, SlotNotCoveredError, NoScriptError)
#: What a call may raise: a cluster client's own errors (no node reachable, a slot no node serves) are no RedisError.
DRIVER_ERRORS = (RedisError, RedisClusterException)


def known_nodes(client: Any) -> list[tuple[str, int]]:
    """The nodes a cluster client knows by now, to start another client from: the URL names one node only, which
    may be down while the rest of the cluster serves."""
    try:
        return [(node.host, int(node.port)) for node in client.get_nodes()]
    except Exception:  # an application's own client of another kind: the URL's node only
        return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _us(value: str) -> float:
    return int(value) / 1_000_000


def joined(h: dict[str, str], field: str) -> str | None:
    """A long value stored in pieces (``r``, ``r2``, ``r3``…; see redis_scripts), whole again."""
    first = h.get(field)
    if first is None or f"{field}2" not in h:
        return first
    parts, n = [first], 2
    while (piece := h.get(f"{field}{n}")) is not None:
        parts.append(piece)
        n += 1
    return "".join(parts)


def parse_record(flat: list[Any], digest: str | None = None) -> Operation:
    """A record as a flat list (field, value, field, value, …: what ``HGETALL`` and the scripts answer) at the key
    of ``digest`` (or, from the recovery script, with the digest in a ``d`` field)."""
    if flat and type(flat[0]) is str:  # the store's own clients decode every answer: nothing to convert
        h = dict(zip(flat[::2], flat[1::2], strict=True))
    else:
        h = dict(zip(map(_text, flat[::2]), map(_text, flat[1::2]), strict=True))
    le = h.get("le")
    return Operation(
        id=(digest or h["d"]) + h["id"], scope=h["s"], key=h["k"], task_name=h["t"], fingerprint=h["f"],
        status=_STATUS[h["st"]],
        result=load_json(joined(h, "r")), error=ErrorInfo(h["et"], joined(h, "em") or "") if "et" in h else None,
        attempts=int(h["a"]), fencing_token=int(h["tok"]), lease_owner=h.get("lo"),
        lease_expires_at=None if le is None else _us(le), created_at=_us(h["c"]), updated_at=_us(h["u"]),
        expires_at=_us(h["x"]), needs_publish="np" in h, payload=joined(h, "p"), crashes=int(h.get("cr", 0)),
    )


def tail(digest: str, operation_id: str) -> str:
    """What a record stores of an operation id: the part after the digest its key already holds. An id that does
    not start with ``digest`` yields a value no record holds, so every script treats it as somebody else's."""
    return operation_id[len(digest):] if operation_id.startswith(digest) else "!"


def create_args(req: CreateRequest) -> list[str]:
    return [tail(req.digest, req.new_id), req.scope, req.key, req.task_name, req.fingerprint, repr(req.ttl),
            req.payload or "", repr(req.delay)]


def create_answer(reply: list[Any], req: CreateRequest) -> tuple[Operation, bool]:
    """The record and ``created`` from the CREATE script's answer (see redis_scripts)."""
    code = _text(reply[0])
    if code != "N":
        return parse_record(reply[1], req.digest), code == "n"
    # Created now: the script answers only the clock's part, not the whole record the request already describes.
    created = _us(_text(reply[1]))
    return Operation(
        id=req.new_id, scope=req.scope, key=req.key, task_name=req.task_name, fingerprint=req.fingerprint,
        status=Status.PENDING, result=None, error=None, attempts=0, fencing_token=0, lease_owner=None,
        lease_expires_at=None, created_at=created, updated_at=_us(_text(reply[3])), expires_at=_us(_text(reply[2])),
        needs_publish=True, payload=req.payload or None,
    ), True


def _without_query(url: str, *names: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    rebuilt = urlunsplit(parts._replace(query=urlencode(query)))
    # urlunsplit drops the "//" of an empty host ("unix:///tmp/r.sock" becomes "unix:/tmp/r.sock"), which redis-py
    # refuses: every renewal of a store on a socket then failed, and live holders were taken over.
    if not parts.netloc and url[:len(parts.scheme) + 3].lower() == f"{parts.scheme}://":  # redis-py takes any case
        rebuilt = f"{parts.scheme}://" + rebuilt[len(parts.scheme) + 1:]
    return rebuilt


def _plain_pool(client: Any) -> bool:
    """Whether a lane may open its own connection from ``client``'s pool settings: a plain pool's connections go
    where those settings say. A Sentinel pool's look their master up as they connect, which a lane's connection,
    connected as it sends, skips: it went to the pool's default host (localhost:6379) instead of the master."""
    pool: Any = getattr(client, "connection_pool", None)
    return type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool) and pool.connection_class in (
        redis.Connection, redis.UnixDomainSocketConnection, redis.SSLConnection)


def finish_args(req: FinishRequest) -> list[str]:
    err = req.error
    return [tail(req.digest, req.operation_id), str(req.token), _STATUS_CODE[req.status], req.result or "",
            err.type if err else "", err.message if err else "", repr(req.ttl), repr(req.delay),
            "1" if req.crashed else "0", req.payload or ""]


class RedisStore(Store):
    """Operations in Redis. ``namespace`` prefixes every key, so several applications can share one server.

    ``client`` lets an application share its own ``redis.Redis``; the store then leaves it open on :meth:`close`.
    """

    def __init__(self, url: str, *, namespace: str = "idemtasks", client: Any = None,
                 socket_timeout: float = 5.0, cluster: bool = False) -> None:
        super().__init__()
        self.url = public_url(url)
        if "{" in namespace or "}" in namespace:
            # Redis Cluster hashes the first {...} of a key: braces here would put every record in one slot.
            raise ConfigurationError(f"Redis namespace {namespace!r} must not contain braces")
        self.namespace = namespace
        self._pending_key, self._running_key = f"{namespace}:pending", f"{namespace}:running"
        # On Redis Cluster a script may only touch its record's slot: no index keys, and recovery scans instead.
        self.cluster = cluster
        self._indexes = [] if cluster else [self._pending_key, self._running_key]
        self.socket_timeout = socket_timeout
        self._raw_url = url  # with its password: the asyncio twin of this store connects with it
        self._own_client = client is None
        # Retried as client_retry says. A create or claim resent after a lost reply answers as the first run did (see
        # redis_scripts); a resent finish whose first run landed is refused, and the worker, which always finishes
        # with again=True, finds its own outcome stored.
        factory = redis.RedisCluster.from_url if cluster else redis.Redis.from_url
        self.client: Any = client or factory(
            url, decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            health_check_interval=30, **client_retry(Retry),
        )
        # The lease keeper's renewals and completions wait RENEW_TIMEOUT at most, and are not retried here: the
        # keeper sends them again on a new connection, soon enough to land within a suspected lease's grace (see
        # RENEW_TIMEOUT). Built on first use (most tasks end before their first renewal). An application's own
        # client is used as is.
        self._prompt: Any = None if client is None else client
        self._prompt_lock = threading.Lock()
        # Without the URL's own timeouts, which redis-py would let override these.
        prompt = min(socket_timeout, RENEW_TIMEOUT)
        self._prompt_factory: Callable[[], Any] = lambda: factory(
            _without_query(url, "socket_timeout", "socket_connect_timeout"), decode_responses=True,
            socket_timeout=prompt, socket_connect_timeout=prompt, retry=Retry(NoBackoff(), 0),
            **self.startup_nodes(redis.cluster.ClusterNode),
        )
        self._create_script = self.client.register_script(lua.CREATE)
        self._claim_script = self.client.register_script(lua.CLAIM)
        self._finish_script = self.client.register_script(lua.FINISH)
        self._renew_script = self.client.register_script(lua.RENEW)
        self._published_script = self.client.register_script(lua.MARK_PUBLISHED)
        self._abandon_script = self.client.register_script(lua.ABANDON)
        self._attach_script = self.client.register_script(lua.ATTACH_PAYLOAD)
        self._requeue_script = self.client.register_script(lua.REQUEUE)
        self._stale_script = self.client.register_script(lua.STALE)
        self._get_script = self.client.register_script(lua.GET)
        # A worker thread's claims and completions go through its own connection (see redis_lane); a cluster
        # routes by slot, and an application's own client may not be a plain pool (Sentinel), so those stay
        # synchronous.
        self._local = threading.local()
        self._lanes = not cluster and isinstance(self.client, redis.Redis) and _plain_pool(self.client) \
            and lanes_supported()
        self.pipelines_completions = self._lanes
        self._loaded_for = 0  # the pid that loaded the lanes' scripts

    def startup_nodes(self, node: Callable[[str, int], Any]) -> dict[str, Any]:
        """On a cluster, another client's ``startup_nodes``: every node this store's client knows, made with
        ``node`` (a sync or an asyncio ``ClusterNode``). A client built later from the URL alone (the renewals' own, or
        the asyncio half's) could not start while the URL's node is down, though the cluster serves without it: its
        live holders could then not renew, and were taken over."""
        if not self.cluster:
            return {}
        return {"startup_nodes": [node(host, port) for host, port in known_nodes(self.client)]}

    @property
    def where(self) -> str:
        return f"{self.url} (namespace {self.namespace!r})"

    def record_key(self, digest: str) -> str:
        return f"{self.namespace}:{{{digest}}}"

    @contextmanager
    def _call(self, *, count: bool = True) -> Iterator[None]:
        """Count one round trip and translate redis-py's exceptions into the store's own."""
        self.round_trips += count
        try:
            yield
        except DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: Exception) -> StoreError:
        why = str(exc) or type(exc).__name__  # some say nothing of themselves (MaxConnectionsError)
        if isinstance(exc, _TRANSIENT):
            return StoreUnavailable(f"Redis store {self.url} unavailable: {why}")
        return StoreError(f"Redis store {self.url} failed: {why}")

    def _create(self, req: CreateRequest) -> tuple[Operation, bool]:
        keys = [self.record_key(req.digest), *self._indexes[:1]]
        return create_answer(self._run(self._create_script, lua.CREATE, keys, create_args(req)), req)

    def _run(self, script: Any, source: str, keys: list[str], args: list[str]) -> Any:
        """One script call and its answer: on this thread's lane where there is one, so that it reads a pipelined
        completion's answer first (see redis_lane)."""
        lane = self._lane()
        self.round_trips += 1
        # _call's translation without its context manager: this is every claim's and every create's path.
        try:
            if lane is None:
                return script(keys=keys, args=args)
            return lane.call(script.sha, source, keys, args)
        except DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    def _settle_own_writes(self) -> None:
        settle_own_writes(self._local)

    def _lane(self) -> Lane | None:
        lane: Lane | None = getattr(self._local, "lane", None)
        if lane is not None and lane.pid == os.getpid():  # a forked child never touches its parent's socket
            return lane
        if not self._lanes or not opens_lanes():
            return None
        pool = self.client.connection_pool
        # No health-check PING: it would read a pipelined completion's answer as its PONG.
        conn = pool.connection_class(**{**pool.connection_kwargs, "health_check_interval": 0})
        if self._loaded_for != os.getpid():
            with self._call(count=False):  # once per process, not per task
                # A pipelined call's NOSCRIPT is only heard a call later: load what lanes send up front.
                for script in (lua.CREATE, lua.CLAIM, lua.FINISH, lua.MARK_PUBLISHED):
                    self.client.script_load(script)
            self._loaded_for = os.getpid()
        lane = self._local.lane = Lane(conn, self.client.script_load)
        return lane

    def _claim(self, req: ClaimRequest) -> ClaimResult:
        keys = [self.record_key(req.digest), *self._indexes]
        args = [tail(req.digest, req.new_id), req.scope, req.key, req.task_name, req.fingerprint, req.owner,
                repr(req.lease), repr(req.ttl), req.payload or "", repr(req.grace)]
        reply = self._run(self._claim_script, lua.CLAIM, keys, args)
        code = _text(reply[0])
        if code != "c":
            return ClaimResult(_CLAIM[code], parse_record(reply[1], req.digest))
        # A win comes back without what the request already says (scope, key, fingerprint, owner) and without
        # what a claimed record cannot have (result, error): serialising the whole hash is most of a script's cost.
        fields = reply[1:9] if type(reply[1]) is str else [_text(v) for v in reply[1:9]]
        op_id, task, created, attempts, token, lease, updated, expires = fields
        payload = reply[9]  # Lua's false: no payload
        return ClaimResult(ClaimOutcome.CLAIMED, Operation(
            id=req.digest + op_id, scope=req.scope, key=req.key, task_name=task, fingerprint=req.fingerprint,
            status=Status.RUNNING, result=None, error=None, attempts=int(attempts), fencing_token=int(token),
            lease_owner=req.owner, lease_expires_at=_us(lease), created_at=_us(created), updated_at=_us(updated),
            expires_at=_us(expires), payload=None if payload is None else _text(payload), crashes=int(reply[10]),
        ))

    def _finish(self, req: FinishRequest) -> bool:
        with self._call():
            return bool(self._finish_script(keys=[self.record_key(req.digest), *self._indexes],
                                            args=finish_args(req), client=self._client_of_call()))

    def finish_pipelined(self, scope: str, key: str, operation_id: str, token: int, status: Status, *,
                         result_json: str | None = None, error: ErrorInfo | None = None, ttl: float,
                         settle: Callable[[BaseException], None]) -> None:
        lane = self._lane()
        req = FinishRequest(key_digest(scope, key), operation_id, token, status, result_json, error, ttl)
        if lane is None:
            self._finish_or_raise(req, again=True)  # as the worker's in-place completion (a lost reply resent)
            return

        # An error reply (NOSCRIPT after a restart) or a broken connection: the resolver sends it again.
        self.round_trips += 1
        try:
            lane.send(self._finish_script.sha, [self.record_key(req.digest), *self._indexes], finish_args(req),
                      self._answer_resolver(req, settle))
        except RedisError as exc:
            # An error reply while the lane reconnected (its SELECT, say): the lane has already handed the completion
            # to its resolver as unknown, which sent it again or settled it. Raising now would have Celery report a
            # body whose outcome is handled as failed.
            logger.warning("idemtasks: the lane of %s failed while sending a completion (%s); it was sent again "
                           "or carried over", self.url, self._store_error(exc))

    def _renew(self, digest: str, operation_id: str, token: int, lease: float, ttl: float) -> bool:
        with self._call():  # always promptly (see Store.promptly)
            return bool(self._renew_script(keys=[self.record_key(digest)], client=self._prompt_client(),
                                           args=[tail(digest, operation_id), str(token), repr(lease), repr(ttl)]))

    def promptly(self) -> AbstractContextManager[None]:
        return thread_flag(self._local, "prompt")

    def _client_of_call(self) -> Any:
        """The short-timeout client for a call made :meth:`promptly`, or ``None`` (a script's own client)."""
        return self._prompt_client() if getattr(self._local, "prompt", False) else None

    def _prompt_client(self) -> Any:
        """The client whose calls wait at most RENEW_TIMEOUT, built on first use."""
        with self._prompt_lock:
            if self._prompt is None:
                try:
                    self._prompt = self._prompt_factory()
                except RedisClusterException as exc:  # a cluster client connects when built: no node answered
                    raise RedisConnectionError(str(exc)) from exc
            return self._prompt

    def _mark_published(self, digest: str, operation_id: str, token: int, delay: float, backoff: float) -> None:
        keys, args = [self.record_key(digest)], [tail(digest, operation_id), str(token), repr(delay), repr(backoff)]
        lane = self._lane()
        if lane is None:
            with self._call():
                self._published_script(keys=keys, args=args)
            return
        # Not waited for: the flag only makes a duplicate of a just-created operation wait for ACCEPT_WINDOW, and
        # the worker's claim clears it anyway. A submit then costs one synchronous round trip, the create.
        self.round_trips += 1

        def resolve(answer: Any) -> None:
            if isinstance(answer, Exception):
                # A NOSCRIPT (a restarted or failed-over server: only the scripts a lane calls reload themselves,
                # and this one is only ever sent unanswered) or a broken connection: sent once more, synchronously,
                # through the client, which loads the script. Left unset, the flag would make recovery send the
                # callbacks of a message that is on the broker, every submit of this process after the restart.
                try:
                    with self._call():
                        self._published_script(keys=keys, args=args)
                    return
                except StoreError as exc:
                    answer = exc
            published_answer(answer)

        try:
            lane.send(self._published_script.sha, keys, args, resolve)
        except RedisError as exc:  # as in finish_pipelined
            raise self._store_error(exc) from exc

    def _attach_payload(self, digest: str, operation_id: str, token: int, payload: str) -> bool:
        with self._call():
            return bool(int(self._attach_script(keys=[self.record_key(digest)],
                                                args=[tail(digest, operation_id), str(token), payload])))

    def _abandon(self, digest: str, operation_id: str, within: float) -> None:
        with self._call():
            self._abandon_script(keys=[self.record_key(digest), *self._indexes[:1]],
                                 args=[tail(digest, operation_id), repr(float(within))])

    def _requeue(self, digest: str, operation_id: str, token: int, confirm_after: float) -> Takeover:
        with self._call():
            answer = self._requeue_script(keys=[self.record_key(digest), *self._indexes],
                                          args=[tail(digest, operation_id), str(token), repr(float(confirm_after))])
        return _TAKEOVER[int(answer)]

    def _stale(self, pending_after: float, limit: int) -> list[Operation]:
        if self.cluster:
            return self._scan_stale(pending_after, limit)
        with self._call():
            found = self._stale_script(keys=[self._pending_key, self._running_key],
                                       args=[f"{self.namespace}:{{", repr(float(pending_after)), str(int(limit))])
        ops = [op for op in map(self._whole, found) if op is not None]
        return sorted(ops, key=lambda op: op.updated_at)[:limit]

    def _whole(self, flat: list[Any]) -> Operation | None:
        """A record the recovery script found stale, with its call read on its own if the script left it out
        (``p+``); ``None`` if the record is gone meanwhile."""
        op = parse_record(flat)
        if not any(_text(field) == "p+" for field in flat[::2]):
            return op
        whole = self._get(_text(flat[1]))  # the digest: the script's first field, 'd'
        return whole if whole is not None and whole.id == op.id else None

    def _scan_stale(self, pending_after: float, limit: int) -> list[Operation]:
        """Redis Cluster: no index can span the slots, so walk every node's records (a sweep, not a hot path)."""
        now, ops = self.now(), []
        with self._call():
            for key in self.client.scan_iter(match=f"{self.namespace}:{{*}}", count=1000):
                flat = self.client.execute_command("HGETALL", key)
                if isinstance(flat, dict):
                    flat = [x for pair in flat.items() for x in pair]
                if not flat:
                    continue
                op = parse_record(flat, _text(key)[-33:-1])
                if is_stale(op, now, pending_after):
                    ops.append(op)
        return sorted(ops, key=lambda op: op.updated_at)[:limit]

    def _get(self, digest: str) -> Operation | None:
        with self._call():
            flat = self._get_script(keys=[self.record_key(digest)], client=self._client_of_call())
        return parse_record(flat, digest) if flat else None

    def now(self) -> float:
        with self._call():
            seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1_000_000

    def purge_expired(self, *, grace: float = PURGE_GRACE) -> int:
        return 0  # Redis expires records by itself, KEEP_MS after their expiry

    def server_warnings(self) -> list[str]:
        # Every record has an expiry, so volatile-* policies evict records as surely as allkeys-*: a record evicted
        # is a duplicate that runs its body again, or an unpublished operation recovery can no longer find.
        if not self._own_client:
            # An application's client waits as long as its own timeouts and retries say (a minute, by redis-py's
            # defaults, for a server that accepts and never answers): it must not hold a worker's start.
            return []
        prompt = self._prompt_client()  # waits RENEW_TIMEOUT at most, and never retries
        # CONFIG GET goes to one node of a cluster: each primary is asked on its own, and one that cannot say (down,
        # or refusing CONFIG) does not silence the others.
        nodes = prompt.get_primaries() if self.cluster else [None]
        evicting: set[str] = set()
        for node in nodes:
            try:
                with self._call(count=False):
                    answer = prompt.config_get("maxmemory*", **({} if node is None else {"target_nodes": node}))
            except StoreError:  # CONFIG refused (a managed service, an ACL user) or the server away: cannot tell
                continue
            settings = {_text(name): _text(value) for name, value in dict(answer).items()}
            # maxmemory 0 is no limit: nothing is ever evicted, whatever the policy says.
            if settings.get("maxmemory", "0") != "0" and settings.get("maxmemory-policy", "noeviction") != "noeviction":
                evicting.add(settings["maxmemory-policy"])
        if not self.cluster:
            prompt.connection_pool.disconnect()  # asked once, in the worker's main process: no idle connection kept
        if not evicting:
            return []
        return [f"the Redis server of store {self.url} evicts keys when its memory is full (maxmemory-policy "
                f"{', '.join(sorted(evicting))}): an evicted record's duplicate runs its body again, and an evicted "
                "unpublished operation is never recovered; set maxmemory-policy noeviction (a full server then "
                "refuses new operations instead)"]

    def close(self) -> None:
        lane: Lane | None = getattr(self._local, "lane", None)
        if lane is not None and lane.pid == os.getpid():
            self._local.lane = None
            lane.close()
        if self._own_client:
            self.client.close()
            with self._prompt_lock:
                if self._prompt is not None:
                    self._prompt.close()
