"""The Redis store on a real three-node Redis Cluster of this test's own: every script touches one slot only."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import (
    ClusterError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
)

from idemtasks.errors import LeaseLost, StoreError, StoreUnavailable
from idemtasks.models import ClaimOutcome, Status, Takeover
from idemtasks.stores.redis import RedisStore
from tests import services


def cluster_ports(n: int) -> list[int]:
    """Ports whose cluster bus (port + 10000) is free as well."""
    import random
    import socket

    found: list[int] = []
    while len(found) < n:
        p = random.randrange(20000, 50000)
        try:
            for port in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        found.append(p)
    return found


@contextlib.contextmanager
def running_cluster(workdir: Path, *, replica: bool = False) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Three masters of this test's own, and the URL of the first; with ``replica``, a fourth node replicating the
    first, and the URL of that replica (whose processes come last)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        services.missing("redis-server and redis-cli are needed for a Redis Cluster")
    ports = cluster_ports(4 if replica else 3)
    procs = [subprocess.Popen(["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                               "--cluster-config-file", f"nodes-{p}.conf", "--save", "", "--appendonly", "no",
                               "--dir", str(workdir)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        time.sleep(0.5)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports[:3]],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait_for(ports[0], "cluster", "info", text="cluster_state:ok")
        if replica:
            subprocess.run(["redis-cli", "--cluster", "add-node", f"127.0.0.1:{ports[3]}", f"127.0.0.1:{ports[0]}",
                            "--cluster-slave"], check=True, capture_output=True, timeout=60)
            _wait_for(ports[3], "info", "replication", text="master_link_status:up")
        yield f"redis://127.0.0.1:{ports[-1 if replica else 0]}/0", procs
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _wait_for(port: int, *command: str, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"{text} never came"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as (url, _):
        yield url


@pytest.fixture
def store(cluster: str) -> Iterator[RedisStore]:
    s = RedisStore(cluster, cluster=True, namespace=f"c{uuid.uuid4().hex[:6]}")
    yield s
    s.close()


def test_keys_spread_over_slots_and_the_whole_life_cycle_works(store: RedisStore) -> None:
    slots = {store.client.keyslot(store.record_key(f"{i:032x}")) for i in range(50)}
    assert len(slots) > 10
    for i in range(20):
        sub = store.create("s", f"k{i}", "t", "fp", ttl=60, payload='["t",[],{}]')
        assert sub.created
        res = store.claim("s", f"k{i}", "t", "fp", owner=f"w{i}", lease=30, ttl=60)
        assert res.outcome is ClaimOutcome.CLAIMED
        store.succeed(res.operation, res.operation.fencing_token, str(i), ttl=60)
        assert store.claim("s", f"k{i}", "t", "fp", owner="x", lease=30, ttl=60).outcome is ClaimOutcome.DONE
        assert store.get_by_id(sub.operation.id).result == i  # type: ignore[union-attr]


def test_recovery_scans_the_cluster(store: RedisStore) -> None:
    lost = store.create("s", "lost", "t", "fp", ttl=60, payload='["t",[],{}]').operation
    dead = store.claim("s", "dead", "t", "fp", owner="gone", lease=0.2, ttl=60).operation
    time.sleep(0.4)
    stale = {op.id: op for op in store.stale(pending_after=0.1)}
    assert set(stale) == {lost.id, dead.id}
    assert store.requeue(stale[dead.id], confirm_after=0.2) is Takeover.SUSPECTED  # the first sweep only marks it
    assert {op.id for op in store.stale(pending_after=0.1)} == {lost.id, dead.id}  # and finds it again
    time.sleep(0.3)
    assert store.requeue(stale[dead.id], confirm_after=0.2) is Takeover.REQUEUED
    assert store.get_by_id(dead.id).status is Status.PENDING  # type: ignore[union-attr]
    # The copy recovery publishes claims it: from then on the holder it was taken from cannot store anything.
    assert store.claim("s", "dead", "t", "fp", owner="copy", lease=5, ttl=60).outcome is ClaimOutcome.CLAIMED
    with pytest.raises(LeaseLost):
        store.succeed(dead, dead.fencing_token, "1", ttl=60)
    # A copy by recovery backs off, on the cluster's scan as through the index.
    store.mark_published(lost, backoff=1.0)
    time.sleep(0.3)
    assert lost.id not in {op.id for op in store.stale(pending_after=0.1)}
    time.sleep(0.8)
    assert lost.id in {op.id for op in store.stale(pending_after=0.1)}


def test_the_async_half_routes_each_record_to_its_slot(store: RedisStore) -> None:
    """The web side's asyncio store writes where the workers' store reads: a plain client would be answered MOVED
    for every key whose slot lives on another node."""
    import asyncio

    from idemtasks.aio import async_store_for

    async def scenario() -> list[str]:
        astore = async_store_for(store)
        ids = []
        for i in range(20):
            sub = await astore.create("s", f"a{i}", "t", "fp", ttl=60, payload='["t",[],{}]')
            assert sub.created
            assert await astore.get_by_id(sub.operation.id) == sub.operation
            ids.append(sub.operation.id)
        assert abs(await astore.now() - store.now()) < 5
        await astore.client.aclose()  # type: ignore[attr-defined]
        return ids

    ids = asyncio.run(scenario())
    assert len({store.client.keyslot(store.record_key(f"{i:032x}")) for i in range(20)}) > 5
    assert all(store.get_by_id(op_id) is not None for op_id in ids)


def test_clients_built_while_the_urls_node_is_down_reach_the_rest_of_the_cluster(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The URL names one node, here a replica; once it is down, the cluster serves on without it. The clients built
    after that, the renewals' own and the asyncio half's, started from that node alone: every renewal failed, so
    live holders were taken over and their bodies ran again, and the asyncio half raised the driver's own error,
    not StoreUnavailable."""
    import asyncio

    from idemtasks.aio import async_store_for

    with running_cluster(Path(tmp_path_factory.mktemp("seed")), replica=True) as (url, procs):
        store = RedisStore(url, cluster=True, namespace=f"c{uuid.uuid4().hex[:6]}")
        held = store.claim("s", "k", "t", "fp", owner="w1", lease=30, ttl=60).operation
        procs[-1].terminate()
        procs[-1].wait(timeout=10)

        assert store.renew(held, held.fencing_token, lease=30, ttl=60)

        async def submits() -> None:
            astore = async_store_for(store)
            try:
                assert (await astore.create("s", "a", "t", "fp", ttl=60)).created
            finally:
                await astore.client.aclose()  # type: ignore[attr-defined]

        asyncio.run(submits())
        for proc in procs[:-1]:  # none left: an outage, in the store's own terms
            proc.terminate()
            proc.wait(timeout=10)
        with pytest.raises(StoreUnavailable):
            asyncio.run(submits())
        store.close()


@pytest.mark.parametrize(("error", "outage"), [
    (ClusterError("TTL exhausted."), True),  # redirected past the client's limit: a resharding under way
    (SlotNotCoveredError("no node serves slot 7"), True),
    (MaxConnectionsError(), True),  # the pool's limit reached: it says nothing of itself
    # A node without the script: a replica just promoted, or a node restarted (scripts are not replicated)
    (NoScriptError("No matching script. Please use EVAL."), True),
    (RedisClusterException("cluster mode is not enabled on this node"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_a_cluster_clients_own_errors_are_the_stores(store: RedisStore, error: Exception, outage: bool) -> None:
    """What redis-py raises on a cluster, translated by the rule every call goes through: an outage a later attempt
    gets past is StoreUnavailable (HTTP 503, a worker waits it out), and every message names its cause."""
    translated = store._store_error(error)
    assert type(translated) is (StoreUnavailable if outage else StoreError)
    assert str(translated).endswith(str(error) or type(error).__name__)


def test_a_worker_is_warned_of_any_cluster_node_that_evicts_records(store: RedisStore) -> None:
    """CONFIG GET goes to one node of a cluster: the others must be asked too, each on its own."""
    nodes = store.client.get_primaries()
    last = redis.Redis(host=nodes[-1].host, port=nodes[-1].port)
    last.config_set("maxmemory", "1gb")
    last.config_set("maxmemory-policy", "allkeys-lru")
    try:
        [warning] = store.server_warnings()
        assert "maxmemory-policy allkeys-lru" in warning
        last.config_set("maxmemory", "0")  # no limit: nothing is ever evicted, whatever the policy
        assert store.server_warnings() == []
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.config_set("maxmemory", "0")
        last.close()
