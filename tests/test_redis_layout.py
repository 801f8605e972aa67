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
