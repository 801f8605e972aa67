"""Growth: the cost of one operation's claim + completion with 10,000 and with 1,000,000 operations already stored,
and the memory a stored operation takes (Redis ``MEMORY USAGE``; PostgreSQL relation size per row).

The store is filled fast (a Redis pipeline, one ``INSERT … SELECT`` in SQL) with copies of a template record that
the real API wrote, varying only what identifies an operation (id, key, fingerprint): the copies have the layout
of the library under test, whatever it is at the time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.measure import percentile
from bench.procs import pinned_self
from bench.scenarios import POSTGRES_URL, Bench

log = logging.getLogger("bench")

TASK = "bench.charge"
SCOPE = "global"
TTL = 86400.0
#: What the reference service stores for a charge: the result the memory figure is "beyond".
RESULT = {"payment_id": "0" * 56, "account": "acct-00042", "amount": 500}
TEMPLATE_KEY = "tmpl-0000000"  # keys of the filled records have the same length: "fill-0000001"


@dataclass
class GrowthPoint:
    store: str
    stored: int  # operations in the store before the measured ones
    samples: int
    create_p50_us: float
    claim_finish_p50_us: float
    claim_finish_mean_us: float
    claim_finish_p99_us: float
    fill_seconds: float


@dataclass
class Footprint:
    store: str
    bytes_per_op: float  # the figure for the target (see method)
    result_bytes: int
    beyond_result: float
    method: str
    detail: str


def _lifecycle(store: Any, key: str) -> tuple[float, float]:
    """create (submit), then claim + finish (the worker): the two costs, in seconds."""
    from idemtasks.identity import canonical_call, dump_json, fingerprint_of_call
    from idemtasks.models import Status

    call = canonical_call(TASK, ["acct-00042", 500], {})
    t0 = time.perf_counter()
    op = store.create(SCOPE, key, TASK, fingerprint_of_call(call + key), ttl=TTL, payload=call).operation
    t1 = time.perf_counter()
    claim = store.claim(SCOPE, key, TASK, op.fingerprint, owner=f"bench:{key}", lease=60.0, ttl=TTL,
                        operation_id=op.id)
    store.finish(SCOPE, key, op.id, claim.operation.fencing_token, Status.SUCCEEDED,
                 result_json=dump_json(RESULT, what="result"), ttl=TTL)
    return t1 - t0, time.perf_counter() - t1


def measure(store: Any, name: str, stored: int, samples: int, fill_seconds: float) -> GrowthPoint:
    tag = uuid.uuid4().hex[:6]
    for i in range(20):  # warm connections and statement caches
        _lifecycle(store, f"warm-{tag}-{i}")
    pairs = [_lifecycle(store, f"m{tag}-{i:07d}") for i in range(samples)]
    create = [p[0] * 1e6 for p in pairs]
    work = [p[1] * 1e6 for p in pairs]
    return GrowthPoint(name, stored, samples, percentile(create, 50), percentile(work, 50), sum(work) / len(work),
                       percentile(work, 99), fill_seconds)


# ----------------------------------------------------------------- Redis


def _template_redis(store: Any) -> tuple[dict[str, str], dict[str, str]]:
    from idemtasks.identity import key_digest

    _lifecycle(store, TEMPLATE_KEY)
    op = store.get(SCOPE, TEMPLATE_KEY)
    record = store.client.hgetall(store.record_key(key_digest(SCOPE, TEMPLATE_KEY)))
    # A record stores its id without the digest its key already holds (see idemtasks.stores.redis_scripts).
    return record, {"id": op.id[32:], "fingerprint": op.fingerprint}


def _fill_redis(store: Any, record: dict[str, str], ids: dict[str, str], start: int, stop: int) -> None:
    from idemtasks.identity import key_digest

    expire_at = int((time.time() + TTL) * 1000)
    pipe = store.client.pipeline(transaction=False)
    for i in range(start, stop):
        key = f"fill-{i:07d}"
        digest = key_digest(SCOPE, key)
        new_id, fp = secrets.token_hex(12), hashlib.sha256(key.encode()).hexdigest()[:32]
        fields: list[str] = []
        for f, v in record.items():
            fields += [f, v.replace(TEMPLATE_KEY, key).replace(ids["id"], new_id).replace(ids["fingerprint"], fp)]
        rkey = store.record_key(digest)
        pipe.execute_command("HSET", rkey, *fields)
        pipe.execute_command("PEXPIREAT", rkey, expire_at)
        if (i + 1) % 2000 == 0:
            pipe.execute()
    pipe.execute()


def _listpack_what_if(client: Any, record: dict[str, str], key: str) -> tuple[str, int]:
    """The record's encoding, and what it would take in Redis' compact listpack encoding: a hash falls back to a
    real hash table as soon as one value is longer than ``hash-max-listpack-value`` (64 bytes by default)."""
    encoding = str(client.object("encoding", key))
    before = client.config_get("hash-max-listpack-value")["hash-max-listpack-value"]
    probe = f"bench-listpack-probe-{uuid.uuid4().hex}"
    try:
        client.config_set("hash-max-listpack-value", 4096)
        client.hset(probe, mapping=record)
        return encoding, int(client.memory_usage(probe, samples=0) or 0)
    finally:
        client.delete(probe)
        client.config_set("hash-max-listpack-value", before)


def redis_growth(bench: Bench, sizes: list[int], samples: int) -> tuple[list[GrowthPoint], Footprint]:
    from idemtasks.stores.redis import RedisStore, joined

    store = RedisStore(bench.store.url(3), namespace=f"growth-{bench.tag}")
    client = bench.store.client(3)
    client.flushdb()
    points: list[GrowthPoint] = []
    try:
        record, ids = _template_redis(store)
        filled, mem0 = 0, int(client.info("memory")["used_memory"])
        for size in sizes:
            t0 = time.perf_counter()
            _fill_redis(store, record, ids, filled, size)
            fill_s = time.perf_counter() - t0
            mem_filled = int(client.info("memory")["used_memory"]) - mem0
            per_op_server = mem_filled / max(1, size)
            filled = size
            points.append(measure(store, "redis", size, samples, fill_s))
            log.info("  growth redis %9d stored: %6.0f us claim+finish (p50)", size, points[-1].claim_finish_p50_us)
        sample = [k for _, k in zip(range(1000), client.scan_iter(match=f"{store.namespace}:{{*", count=1000),
                                   strict=False)]
        usage = [int(client.memory_usage(k, samples=0) or 0) for k in sample]
        mean_usage = sum(usage) / len(usage)
        result_len = len(joined(record, "r") or "")  # a long result is stored in pieces: r, r2, r3…
        fields = {k: len(v) for k, v in record.items()}
        encoding, compact = _listpack_what_if(client, record, sample[0])
        what_if = "" if encoding == "listpack" else (
            f"; the same record as a listpack (hash-max-listpack-value raised on the bench's server) takes "
            f"{compact:,} B")
        return points, Footprint(
            "redis", mean_usage, result_len, mean_usage - result_len, "MEMORY USAGE … SAMPLES 0, mean of "
            f"{len(sample)} records",
            f"encoding {encoding}{what_if}. used_memory grew {per_op_server:,.0f} B per filled record (adds the "
            f"key-space and expiry dict entries). Fields (name: value length): {json.dumps(fields)}")
    finally:
        client.flushdb()
        store.close()


# ----------------------------------------------------------------- SQL


def _fill_sql(store: Any, template_id: str, start: int, stop: int) -> None:
    """One ``INSERT … SELECT`` per batch: the template row copied, with a new id, key, digest and fingerprint."""
    t, dialect = store.table, store.dialect
    if dialect == "postgresql":
        series = f"generate_series({start}, {stop - 1}) AS g(i)"
        key = "'fill-' || lpad(g.i::text, 7, '0')"
        digest = "md5('d' || g.i)"
        new_id = f"{digest} || substr(md5('r' || g.i), 1, 24)"
        fp = "md5('f' || g.i) || md5('g' || g.i)"
        prefix = ""
    else:  # SQLite: a recursive CTE counts, random hex stands in for the digests
        series = "cnt AS g"
        key = "'fill-' || substr('0000000' || g.i, -7, 7)"
        digest = "lower(hex(randomblob(16)))"
        new_id = "lower(hex(randomblob(28)))"
        fp = "lower(hex(randomblob(32)))"
        prefix = f"WITH RECURSIVE cnt(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM cnt WHERE i < {stop - 1}) "
    exprs = {"id": new_id, "key_hash": digest, "idem_key": key, "fingerprint": fp,
             "payload": f"replace(t.payload, '{TEMPLATE_KEY}', {key})",
             "result": f"replace(t.result, '{TEMPLATE_KEY}', {key})"}
    cols = [c.name for c in t.columns]
    select = ", ".join(exprs.get(c, f"t.{c}") for c in cols)
    sql = (f"{prefix}INSERT INTO {t.name} ({', '.join(cols)}) SELECT {select} FROM {series}, "
           f"(SELECT * FROM {t.name} WHERE id = '{template_id}') AS t")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql)


def sql_growth(bench: Bench, name: str, url: str, sizes: list[int], samples: int,
               batch: int = 100_000) -> tuple[list[GrowthPoint], Footprint | None]:
    from idemtasks.stores.sql import SQLStore

    store = SQLStore(url, table=f"bench_growth_{bench.tag}")
    points: list[GrowthPoint] = []
    try:
        _lifecycle(store, TEMPLATE_KEY)
        template = store.get(SCOPE, TEMPLATE_KEY)
        filled = 0
        for size in sizes:
            t0 = time.perf_counter()
            for start in range(filled, size, batch):
                _fill_sql(store, template.id, start, min(size, start + batch))
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {store.table.name}")
            fill_s = time.perf_counter() - t0
            filled = size
            points.append(measure(store, name, size, samples, fill_s))
            log.info("  growth %s %9d stored: %6.0f us claim+finish (p50)", name, size,
                     points[-1].claim_finish_p50_us)
        footprint = None
        if store.dialect == "postgresql":
            with store.engine.connect() as conn:
                total = int(conn.exec_driver_sql(f"SELECT pg_total_relation_size('{store.table.name}')").scalar_one())
                heap = int(conn.exec_driver_sql(f"SELECT pg_table_size('{store.table.name}')").scalar_one())
                rows = int(conn.exec_driver_sql(f"SELECT count(*) FROM {store.table.name}").scalar_one())
            result_len = len(json.dumps(template.result, separators=(",", ":")))
            footprint = Footprint(
                "postgres", total / rows, result_len, total / rows - result_len,
                f"pg_total_relation_size / rows ({rows:,} rows)",
                f"heap + TOAST {heap / rows:,.0f} B/row, indexes {(total - heap) / rows:,.0f} B/row")
        return points, footprint
    finally:
        store.table.drop(store.engine, checkfirst=True)
        store.close()
        store.engine.dispose()


def run_growth(bench: Bench, sizes: list[int], samples: int, stores: list[str]) -> tuple[list[GrowthPoint],
                                                                                          list[Footprint]]:
    bench.store.pin(frozenset({0}))
    points: list[GrowthPoint] = []
    prints: list[Footprint] = []
    with pinned_self(frozenset({1})):
        if "redis" in stores:
            p, f = redis_growth(bench, sizes, samples)
            points += p
            prints.append(f)
        if "postgres" in stores:
            p, fp = sql_growth(bench, "postgres", POSTGRES_URL, sizes, samples)
            points += p
            prints += [fp] if fp else []
        if "sqlite" in stores:
            p, fp = sql_growth(bench, "sqlite", f"sqlite:///{bench.workdir / 'growth.sqlite3'}", sizes, samples)
            points += p
    return points, prints
