"""The SQL store's statements, each built once per store and run with a dictionary of parameters.

Building a CASE-heavy upsert as a new expression on every call, and deriving its cache key, cost milliseconds of
CPU per task; built once, SQLAlchemy compiles each statement once and psycopg prepares it on the server. Parameters
are named ``p_<column>`` so they never collide with the column-named parameters SQLAlchemy makes for VALUES and SET.
PostgreSQL's creation and claim are written out instead, in :mod:`.sql_postgres`, to stay under psycopg's query
cache.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..models import Status
from . import sql_postgres
from .base import DUE_SLACK

__all__ = ["Statements"]

_EPOCH = sa.Float(53)
_IDENTITY = ("id", "key_hash", "scope", "idem_key", "task_name", "fingerprint", "payload")


class Statements:
    """Every statement of :class:`~idemtasks.stores.sql.SQLStore` on one table and dialect."""

    def __init__(self, table: sa.Table, dialect: str) -> None:
        self.table = table
        self.dialect = dialect
        #: INSERT … ON CONFLICT, where the dialect has one that sees the old row (not MariaDB).
        self.upsert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)

    def now(self) -> Any:
        """``now`` as a SQL expression, on the server's clock where the server has one."""
        if self.dialect == "postgresql":
            # statement_timestamp() is fixed for the whole statement: every CASE below sees the same instant.
            return sa.cast(sa.literal_column("extract(epoch from statement_timestamp())"), _EPOCH)
        if self.dialect in ("mysql", "mariadb"):
            # UTC_TIMESTAMP() is fixed per statement too, and unlike UNIX_TIMESTAMP(NOW()) ignores the session's time
            # zone, which the caller's engine sets (or leaves at the server's): converting local time back to epoch
            # seconds is ambiguous in a DST fall-back hour, where the clock would jump back an hour and live leases
            # look expired. Microseconds are an exact integer; divided by the DOUBLE 1e6, not by the integer
            # 1000000, whose DECIMAL quotient keeps only div_precision_increment (4) decimals.
            return sa.literal_column("(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)",
                                     _EPOCH)
        # SQLite runs in-process, on the local clock, but a write may wait for the database's one write lock for up to
        # the busy timeout (30 s) inside the statement: a time read before the statement would start a lease that
        # waited that long already lapsed. SQLite's own 'now' is read after the lock (it is fixed per step, so every
        # CASE sees one instant) but has only milliseconds; the larger of it and params()'s reading keeps the
        # microseconds when nothing waited, so a record's times never fall behind a reading of store.now().
        return sa.func.max(sa.bindparam("p_now", type_=_EPOCH),
                           sa.cast(sa.literal_column("(julianday('now') - 2440587.5) * 86400.0"), _EPOCH))

    def params(self, **values: Any) -> dict[str, Any]:
        """The parameters of one execution (plus the clock, on SQLite)."""
        if self.dialect == "sqlite":
            values["p_now"] = time.time()
        return values

    def p(self, column: str) -> Any:
        """The placeholder ``p_<column>``, typed like the column."""
        return sa.bindparam(f"p_{column}", type_=self.table.c[column].type)

    def _seconds(self, name: str) -> Any:
        return sa.bindparam(name, type_=_EPOCH)

    def _new_row(self, now: Any, **values: Any) -> dict[str, Any]:
        """A record's columns for an INSERT: its identity from the parameters, the rest from ``values``."""
        return {**{c: self.p(c) for c in _IDENTITY}, "result": None, "error_type": None, "error_message": None,
                "created_at": now, "updated_at": now, "expires_at": now + self._seconds("p_ttl"), **values}

    @cached_property
    def clock(self) -> Any:
        return sa.select(self.now())

    @cached_property
    def create(self) -> Any:
        if self.dialect == "postgresql":
            return sql_postgres.create(self.table, self.p, self._seconds)
        t, now = self.table, self.now()
        values = self._new_row(now, status="pending", attempts=0, fencing_token=0, crashes=0, lease_owner=None,
                               lease_expires_at=None, needs_publish=True, updated_at=now + self._seconds("p_delay"))
        stmt = self.upsert(t).values(**values)
        expired = t.c.expires_at <= now
        # A live record keeps every column: rewritten with its own values, the price of RETURNING it.
        return stmt.on_conflict_do_update(
            index_elements=[t.c.key_hash],
            set_={c: sa.case((expired, stmt.excluded[c]), else_=t.c[c]) for c in values if c != "key_hash"},
        ).returning(*t.c)

    @cached_property
    def claim(self) -> Any:
        if self.dialect == "postgresql":
            return sql_postgres.claim(self.table, self.p, self._seconds)
        t, now = self.table, self.now()
        lease_until, owner = now + self._seconds("p_lease"), self.p("lease_owner")
        expired = t.c.expires_at <= now
        lease = sa.func.coalesce(t.c.lease_expires_at, 0.0)
        same = sa.and_(t.c.expires_at > now, t.c.fingerprint == self.p("fingerprint"))  # live, this payload
        lapsed = sa.and_(t.c.status == "running", lease <= now)
        # A lapsed lease is taken in two phases with requeue's mark (see Store.claim and the note above requeue):
        # ``suspect`` marks it, and only a mark at least p_grace old, with no renewal since, lets a claim win.
        suspect = sa.and_(same, lapsed, t.c.updated_at < lease)
        claimable = sa.and_(same, sa.or_(
            sa.and_(t.c.status == "pending", t.c.updated_at <= now + DUE_SLACK),  # due (see DUE_SLACK)
            sa.and_(lapsed, t.c.updated_at >= lease, t.c.updated_at <= now - self._seconds("p_grace")),
        ))
        wins = sa.or_(expired, claimable)
        # This claim sent again, its answer lost (owners are unique per attempt): it landed, and its lease starts
        # again from now, as a claim's does (see decide_claim).
        mine = sa.and_(same, t.c.status == "running", t.c.lease_owner == owner, lease > now)
        values = self._new_row(now, status="running", attempts=1, fencing_token=1, crashes=0, lease_owner=owner,
                               lease_expires_at=lease_until, needs_publish=False)
        stmt = self.upsert(t).values(**values)

        def fresh(col: str) -> Any:  # the new row's value when the old record had expired
            return sa.case((expired, stmt.excluded[col]), else_=t.c[col])

        def won(col: str, value: Any) -> Any:
            return sa.case((wins, value), else_=t.c[col])

        # Every replay (busy, done, mismatch) rewrites the row with its own values: the price of learning the
        # outcome in one statement, since SQLite has no INSERT inside WITH (on PostgreSQL, see sql_postgres).
        return stmt.on_conflict_do_update(index_elements=[t.c.key_hash], set_={
            **{c: fresh(c) for c in ("id", "scope", "idem_key", "task_name", "fingerprint", "created_at", "payload")},
            **{c: sa.case((expired, sa.null()), else_=t.c[c]) for c in ("result", "error_type", "error_message")},
            "attempts": sa.case((expired, 1), (claimable, t.c.attempts + 1), else_=t.c.attempts),
            # An expired record's token carries on, so a holder of the old record never shares a token with the new.
            "fencing_token": sa.case((expired | claimable, t.c.fencing_token + 1), else_=t.c.fencing_token),
            # Taking a running record over (its lease lapsed through the grace) counts its holder's death; a record
            # never claimed has none (see decide_claim).
            "crashes": sa.case((expired, 0), (claimable & (t.c.status == "running"), t.c.crashes + 1),
                               (t.c.attempts == 0, 0), else_=t.c.crashes),
            "status": won("status", "running"), "lease_owner": won("lease_owner", owner),
            "lease_expires_at": sa.case((wins | mine, lease_until), else_=t.c.lease_expires_at),
            "updated_at": sa.case((wins | suspect, now), else_=t.c.updated_at),
            "expires_at": sa.case((wins | mine, values["expires_at"]), else_=t.c.expires_at),
            "needs_publish": won("needs_publish", False),
        }).returning(*t.c)

    def _held(self, now: Any, *, given_back: bool = False) -> Any:
        """The record is still held under the fencing token ``p_fencing_token``: running, or (``given_back``, for a
        completion) pending with that token still (see ``_finish`` in stores.base)."""
        t = self.table
        # Not IN (…): SQLAlchemy renders it with an expanding parameter, which the lanes' prepared statements lack.
        running = t.c.status == "running"
        status = sa.or_(running, t.c.status == "pending") if given_back else running
        return sa.and_(t.c.key_hash == self.p("key_hash"), t.c.id == self.p("id"), status,
                       t.c.fencing_token == self.p("fencing_token"), t.c.expires_at > now)

    @cached_property
    def finish(self) -> dict[Status, Any]:
        """One statement per final status (and PENDING, for a release): each sets only what it stores."""
        t, now = self.table, self.now()
        common: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now,
                                  "expires_at": now + self._seconds("p_ttl")}
        # A final record has no message left to publish: one failed before any claim (revoked, expired) would keep
        # its "unpublished" flag, and every replay of it would then be answered as a request still being accepted.
        final = {"needs_publish": False}
        stores: dict[Status, dict[str, Any]] = {
            Status.SUCCEEDED: {"result": self.p("result"), **final},
            Status.FAILED: {"error_type": self.p("error_type"), "error_message": self.p("error_message"), **final},
            # A release: recovery counts from updated_at, set ahead to when the retry is due (see Store.release).
            # p_crashed (0 or 1) counts a holder going away mid-body, if the record is still running: crashes is
            # set first, since MySQL assigns SET clauses left to right and would otherwise see status 'pending'.
            # p_payload: a retry's call replaces the stored one; NULL keeps it.
            Status.PENDING: {"crashes": t.c.crashes + sa.case((t.c.status == "running",
                                                                sa.bindparam("p_crashed", type_=sa.Integer)),
                                                               else_=0),
                             "updated_at": now + self._seconds("p_delay"),
                             "payload": sa.func.coalesce(sa.bindparam("p_payload", type_=t.c.payload.type),
                                                         t.c.payload)},
        }

        def assignments(status: Status, extra: dict[str, Any]) -> list[tuple[str, Any]]:
            rest = {c: v for c, v in common.items() if c not in extra}
            return [*extra.items(), ("status", status.value), *rest.items()]

        return {status: t.update().where(self._held(now, given_back=True)).ordered_values(*assignments(status, extra))
                for status, extra in stores.items()}

    @cached_property
    def renew(self) -> Any:
        t, now = self.table, self.now()
        live_until = now + self._seconds("p_ttl")
        return t.update().where(self._held(now)).values(
            lease_expires_at=now + self._seconds("p_lease"),
            # greatest() is spelled differently (and NULL-handled differently) on each database; CASE is not.
            expires_at=sa.case((t.c.expires_at < live_until, live_until), else_=t.c.expires_at),
        )

    # Recovery's two-phase takeover (see Store.requeue). A running record's updated_at is set by its claim and left
    # alone by renew, so updated_at < lease_expires_at until ``suspect`` marks it with updated_at = now (>= the lapsed
    # lease); a renewal puts the lease above updated_at again, which cancels the mark. ``requeue`` takes the record
    # only when marked, not renewed since, and marked at least p_confirm_after seconds ago. SQLStore sends ``requeue``
    # first and ``suspect`` when it matched nothing: two statements, each with a single-column or all-constant SET
    # (MySQL assigns SET clauses left to right on the already-updated row, so one CASE-heavy statement could not
    # safely do both), each atomic and fenced on its own.

    def _lapsed(self, now: Any) -> Any:
        return sa.and_(self._held(now), sa.func.coalesce(self.table.c.lease_expires_at, 0.0) <= now)

    @cached_property
    def requeue(self) -> Any:
        t, now = self.table, self.now()
        return t.update().where(
            self._lapsed(now), t.c.updated_at >= sa.func.coalesce(t.c.lease_expires_at, 0.0),
            t.c.updated_at <= now - self._seconds("p_confirm_after"),
        ).values(status="pending", lease_owner=None, lease_expires_at=None, updated_at=now,
                 crashes=t.c.crashes + 1)  # its holder died: one crash

    @cached_property
    def suspect(self) -> Any:
        """Mark a lapsed lease (updated_at = now) unless it is marked already, in which case the row is matched but
        keeps its mark's time; its row count (rows matched) is 1 either way."""
        t, now = self.table, self.now()
        marked = t.c.updated_at >= sa.func.coalesce(t.c.lease_expires_at, 0.0)
        return t.update().where(self._lapsed(now)).values(updated_at=sa.case((marked, t.c.updated_at), else_=now))

    @cached_property
    def mark_published(self) -> Any:
        t, now = self.table, self.now()
        # Fenced on the publisher's token: see Store.mark_published. p_backoff is NULL for no back-off, which keeps
        # lease_expires_at as it is: a NULL rather than a test of the value, since a prepared statement's parameter
        # takes its type from where it stands, and one compared with 0 would be taken for an integer.
        due = now + self._seconds("p_delay")
        return t.update().where(t.c.key_hash == self.p("key_hash"), t.c.id == self.p("id"), t.c.status == "pending",
                                t.c.fencing_token == self.p("fencing_token"),
                                t.c.expires_at > now).values(
            needs_publish=False, updated_at=due,
            lease_expires_at=sa.func.coalesce(due + self._seconds("p_backoff"), t.c.lease_expires_at))

    @cached_property
    def attach_payload(self) -> Any:
        t, now = self.table, self.now()
        return t.update().where(t.c.key_hash == self.p("key_hash"), t.c.id == self.p("id"),
                                t.c.fencing_token == self.p("fencing_token"), t.c.payload.is_(None),
                                t.c.expires_at > now).values(payload=self.p("payload"))

    @cached_property
    def abandon(self) -> Any:
        t, now = self.table, self.now()
        # Only while still flagged unpublished, and within p_within of its creation: see Store.abandon.
        return t.delete().where(t.c.key_hash == self.p("key_hash"), t.c.id == self.p("id"), t.c.status == "pending",
                                t.c.attempts == 0, t.c.needs_publish.is_(True),
                                t.c.created_at > now - self._seconds("p_within"))

    @cached_property
    def get(self) -> Any:
        t = self.table
        return sa.select(t).where(t.c.key_hash == self.p("key_hash"), t.c.expires_at > self.now())

    @cached_property
    def locked_read(self) -> Any:
        """MariaDB: the server's clock left-joined to the record, which is locked FOR UPDATE when it exists."""
        t = self.table
        clock = sa.select(self.now().label("server_now")).subquery("clock")
        return sa.select(clock.c.server_now, t).select_from(
            clock.outerjoin(t, t.c.key_hash == self.p("key_hash"))).with_for_update()

    @cached_property
    def insert(self) -> Any:
        """Every column from the parameter of its own name."""
        return self.table.insert().values({c.name: sa.bindparam(c.name, type_=c.type) for c in self.table.c})

    @cached_property
    def replace(self) -> Any:
        """Every column of the record ``p_key_hash`` from the parameter of its own name."""
        t = self.table
        return t.update().where(t.c.key_hash == self.p("key_hash")).values(
            {c.name: sa.bindparam(c.name, type_=c.type) for c in t.c})
