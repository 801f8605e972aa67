"""The Redis record layout: a record with a typical result stays in Redis' compact listpack encoding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemtasks.identity import key_digest
from idemtasks.models import ErrorInfo
from idemtasks.stores.redis import RedisStore
from tests.conftest import drop, make_store

TTL = 3600.0


@pytest.fixture
def redis_store(tmp_path: Path) -> Iterator[RedisStore]:
    store = make_store("redis", tmp_path)
    assert isinstance(store, RedisStore)
    yield store
    drop(store)


def encoding(store: RedisStore, key: str) -> str:
    return str(store.client.object("encoding", store.record_key(key_digest("global", key))))


@pytest.mark.parametrize("size", [109, 1_000, 5_000])
def test_a_long_result_and_payload_keep_the_record_a_listpack(redis_store: RedisStore, size: int) -> None:
    # Redis' default hash-max-listpack-value is 64: one longer value would turn the record into a hash table.
    payload = json.dumps({"args": ["é" * size]}, ensure_ascii=False)
    redis_store.create("global", "k1", "tasks.charge", "fp", ttl=TTL, payload=payload)
    held = redis_store.claim("global", "k1", "tasks.charge", "fp", owner="w1", lease=30.0, ttl=TTL).operation
    redis_store.succeed(held, held.fencing_token, json.dumps({"payment_id": "€" * size}, ensure_ascii=False), ttl=TTL)
    assert encoding(redis_store, "k1") == "listpack"
    op = redis_store.get("global", "k1")
    assert op is not None and op.result == {"payment_id": "€" * size} and op.payload == payload


def test_a_long_error_message_keeps_the_record_a_listpack(redis_store: RedisStore) -> None:
    held = redis_store.claim("global", "k1", "tasks.charge", "fp", owner="w1", lease=30.0, ttl=TTL).operation
    redis_store.fail(held, held.fencing_token, ErrorInfo("Declined", "no. " * 200), ttl=TTL)
    assert encoding(redis_store, "k1") == "listpack"
    op = redis_store.get("global", "k1")
    assert op is not None and op.error == ErrorInfo("Declined", "no. " * 200)


def test_reads_judge_expiry_by_the_servers_clock(redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis keeps an expired record's key ten minutes longer (so that a claim re-creating it continues its tokens).
    A read must call it expired when the scripts do, by the server's clock: a web host whose clock is behind would
    otherwise show an expired operation as live, and one ahead would answer 404 for a live one."""
    import asyncio
    import time

    from idemtasks.aio import async_store_for

    expired = redis_store.create("s", "expired", "t", "fp", ttl=0.2).operation
    live = redis_store.create("s", "live", "t", "fp", ttl=30).operation
    time.sleep(0.4)
    real = time.time

    async def read_both() -> tuple[object, object]:
        astore = async_store_for(redis_store)
        try:
            return await astore.get_by_id(expired.id), await astore.get_by_id(live.id)
        finally:
            await astore.client.aclose()  # type: ignore[attr-defined]

    for skew in (-60.0, 60.0):  # this host's clock a minute behind the server's, then a minute ahead
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        assert redis_store.get("s", "expired") is None and redis_store.get_by_id(expired.id) is None
        assert redis_store.get_by_id(live.id) == live
        assert asyncio.run(read_both()) == (None, live)


def test_the_sweep_script_leaves_long_calls_out_of_its_own_answer(redis_store: RedisStore) -> None:
    """One script finds every stale record at once, and the server answers nobody else meanwhile: it reads only
    what recovery needs, and a long call is read afterwards, record by record (its whole call: see the store
    contract). A few hundred calls near the argument limit would otherwise hold the server for seconds."""
    call = json.dumps(["tasks.charge", ["x" * 200_000], {}])
    for n in range(5):
        redis_store.create("global", f"k{n}", "tasks.charge", "fp", ttl=TTL, payload=call)
    answer = redis_store._stale_script(keys=[redis_store._pending_key, redis_store._running_key],
                                       args=[f"{redis_store.namespace}:{{", "0.0", "500"])
    assert len(answer) == 5 and len(json.dumps(answer)) < 5_000  # the five records, without their calls
    assert {op.payload for op in redis_store.stale(pending_after=0.0)} == {call}
