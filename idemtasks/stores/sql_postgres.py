"""PostgreSQL's creation and claim, written out rather than built with SQLAlchemy.

psycopg converts the placeholders of a query longer than 4 KiB (``MAX_CACHED_STATEMENT_LENGTH``) again on every
execution, about 0.2 ms of CPU on a small machine. SQLAlchemy cannot alias the target table of an INSERT, so the
built upserts repeat the full table name in every CASE (7 KiB for the claim). Here the table is aliased ``o`` and
the proposed row, ``excluded``, stands in for the clock (its ``created_at`` is the statement's now, its lease and
expiry now plus lease and ttl), and both statements fit the cache with room to spare for a 63-character table name.

They encode exactly what :class:`~idemtasks.stores.sql_statements.Statements` builds for SQLite; the store contract
tests run against both.

A replay of a settled record does not write. Each statement first reads the live record (``cur``) and proposes a
row only when that record cannot answer by itself. When ``cur`` answers, the INSERT has no row to propose, so it
neither conflicts nor locks: the transaction gets no id, its commit waits for no flush to disk, and the table gets
no dead row version. Such a replay costs about a SELECT, instead of a durable commit of the row rewritten with its
own values.

``cur`` reads the snapshot the statement started with, which does not show a write still in flight, while the
conflict branch waits for that write's row lock and reads what it committed. So ``cur`` answers only where no
write in flight can change the answer: a final record (final until it expires), a record for another payload (a
live record keeps its fingerprint), and, for a creation, a record already published (a creation answers with the
operation as it stands, which a client then polls; a status a moment old is one it would have seen a moment
earlier). Everything else takes the conflict branch as before, so that a duplicate meeting a completion in flight
hears "done" rather than "busy", and a client's retry meeting the "published" flag in flight (a pipelined write,
see :mod:`.sql_lane`) is answered as a replay rather than as a request still being accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .base import DUE_SLACK

__all__ = ["claim", "create"]

_NOW = "extract(epoch from statement_timestamp())::float8"  # fixed for the whole statement
_COLUMNS = ("key_hash", "id", "scope", "idem_key", "task_name", "fingerprint", "status", "result", "error_type",
            "error_message", "attempts", "fencing_token", "lease_owner", "lease_expires_at", "created_at",
            "updated_at", "expires_at", "needs_publish", "payload", "crashes")
_NEW = {**{c: f":p_{c}" for c in ("key_hash", "id", "scope", "idem_key", "task_name", "fingerprint", "payload")},
        "result": "NULL", "error_type": "NULL", "error_message": "NULL", "created_at": _NOW, "updated_at": _NOW,
        "expires_at": f"{_NOW} + :p_ttl"}
_EXPIRED = "o.expires_at <= excluded.created_at"
# Claimable once not expired (every use below tests _EXPIRED first): the same payload, and pending and due (see
# DUE_SLACK), or running under a lease that lapsed and was suspected at least :p_grace ago with no renewal since
# (updated_at >= lease_expires_at: the mark of Store.requeue, which a first claim of a lapsed lease sets too, as
# _SUSPECT).
_LAPSED = "o.status = 'running' AND coalesce(o.lease_expires_at, 0) <= excluded.created_at"
_CLAIMABLE = (f"o.fingerprint = excluded.fingerprint AND (o.status = 'pending' AND o.updated_at <= "
              f"excluded.created_at + {DUE_SLACK!r} OR {_LAPSED} AND o.updated_at >= coalesce(o.lease_expires_at, 0) "
              "AND o.updated_at <= excluded.created_at - :p_grace)")
_SUSPECT = f"o.fingerprint = excluded.fingerprint AND {_LAPSED} AND o.updated_at < coalesce(o.lease_expires_at, 0)"
_FRESH = f"CASE WHEN {_EXPIRED} THEN excluded.{{c}} ELSE o.{{c}} END"
_WON = ("status", "lease_owner", "lease_expires_at", "expires_at", "needs_publish")
_MINE = ("lease_expires_at", "expires_at")  # what a claim sent again by its owner sets

Bind = Callable[[str], Any]


def create(table: sa.Table, column_bind: Bind, seconds_bind: Bind) -> Any:
    """A new pending record, unless a live one holds the key: then it is returned as it is, without a write once it
    was published (the conflict branch, which keeps every column, is for the rest)."""
    # updated_at is when the message is due (a countdown or ETA): recovery counts pending_after from then.
    values = {**_NEW, "status": "'pending'", "attempts": "0", "fencing_token": "0", "crashes": "0",
              "lease_owner": "NULL", "lease_expires_at": "NULL", "needs_publish": "true",
              "updated_at": f"{_NOW} + :p_delay"}
    # A final record answers too: a record stored by an earlier release, failed before any claim, kept its flag.
    return _upsert(table, values, {c: _FRESH.format(c=c) for c in _COLUMNS[1:]}, column_bind, seconds_bind,
                   answers=" AND (NOT c.needs_publish OR c.status IN ('succeeded', 'failed'))")


def claim(table: sa.Table, column_bind: Bind, seconds_bind: Bind) -> Any:
    """:func:`~idemtasks.stores.base.decide_claim` in one statement. A replay of a final record, or one for another
    payload, is answered by ``cur`` without a write; a busy one rewrites the row with its own values in the conflict
    branch, the price of learning the outcome of a completion in flight in the same round trip."""
    values = {**_NEW, "status": "'running'", "attempts": "1", "fencing_token": "1", "crashes": "0",
              "lease_owner": ":p_lease_owner",
              "lease_expires_at": f"{_NOW} + :p_lease", "needs_publish": "false"}
    # m: this claim sent again, its answer lost (owners are unique per attempt): it landed, and its lease starts
    # again from now, as a claim's does (see decide_claim).
    won = ", ".join(f"CASE WHEN w{' OR m' if c in _MINE else ''} THEN excluded.{c} ELSE o.{c} END" for c in _WON)
    set_ = {
        **{c: _FRESH.format(c=c) for c in ("id", "scope", "idem_key", "task_name", "fingerprint", "created_at",
                                           "payload")},
        **{c: f"CASE WHEN {_EXPIRED} THEN NULL ELSE o.{c} END" for c in ("result", "error_type", "error_message")},
        # What a winning claim sets, from one test of "wins" in a sub-select rather than one per column. An expired
        # record's token carries on, so a holder of the old record never shares a token with the new one. A first
        # claim of a lapsed lease sets only updated_at: the suspicion mark. Taking a running record over counts
        # its holder's death; a record never claimed has none (see decide_claim).
        f"({', '.join(_WON)}, fencing_token, attempts, updated_at, crashes)":
            f"(SELECT {won}, CASE WHEN w THEN o.fencing_token + 1 ELSE o.fencing_token END, "
            "CASE WHEN e THEN 1 WHEN w THEN o.attempts + 1 ELSE o.attempts END, "
            "CASE WHEN w OR s THEN excluded.updated_at ELSE o.updated_at END, "
            "CASE WHEN e OR o.attempts = 0 THEN 0 WHEN w AND o.status = 'running' THEN o.crashes + 1 "
            "ELSE o.crashes END "
            f"FROM (SELECT e, e OR {_CLAIMABLE} AS w, {_SUSPECT} AS s, o.lease_owner = excluded.lease_owner AND "
            "o.lease_expires_at > excluded.created_at AS m "
            f"FROM (SELECT {_EXPIRED} AS e) AS x) AS claim)",
    }
    # What no write in flight can change: a final record, another payload.
    answers = " AND (c.status IN ('succeeded', 'failed') OR c.fingerprint <> :p_fingerprint)"
    return _upsert(table, values, set_, column_bind, seconds_bind, answers=answers)


def _upsert(table: sa.Table, values: dict[str, str], set_: dict[str, str], column_bind: Bind,
            seconds_bind: Bind, *, answers: str) -> Any:
    """The live record ``cur`` when it satisfies ``answers`` (``c`` is the record), else the upsert's row."""
    quoted = postgresql.dialect().identifier_preparer.format_table(table)  # type: ignore[no-untyped-call]
    columns = ", ".join(_COLUMNS)
    text = (f"WITH cur AS (SELECT {columns} FROM {quoted} AS c WHERE c.key_hash = :p_key_hash AND "
            f"c.expires_at > {_NOW}{answers}), "
            f"up AS (INSERT INTO {quoted} AS o ({columns}) SELECT {', '.join(values[c] for c in _COLUMNS)} "
            "WHERE NOT EXISTS (SELECT FROM cur) "
            "ON CONFLICT (key_hash) DO UPDATE SET " + ", ".join(f"{c} = {expr}" for c, expr in set_.items())
            + f" RETURNING {', '.join(f'o.{c}' for c in _COLUMNS)}) "
            "SELECT * FROM up UNION ALL SELECT * FROM cur")
    words = " ".join([*values.values(), *set_.values()]).replace("(", " ").replace(")", " ").split()
    names = {word[3:] for word in words if word.startswith(":p_")}
    binds = [column_bind(n) if n in table.c else seconds_bind(f"p_{n}") for n in sorted(names)]  # p_ttl, p_lease, …
    return sa.text(text).bindparams(*binds).columns(*(table.c[c] for c in _COLUMNS))
