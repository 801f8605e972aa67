"""Which database errors are outages: the codes, not the classes, decide.

One decision rests on this: wait an error out (the attempt is given back and comes again; the store answers 503), or
blame the statement (a transactional body's failure is stored; the store answers 500). The drivers' classes are too
coarse for it. psycopg files "program limit exceeded", trigger and authorization errors under ``OperationalError``,
and pymysql files every server error it has no entry for under ``OperationalError`` too: a MariaDB CHECK violation
(4025), a trigger's ``SIGNAL`` (1644), a missing privilege (1142). Taken for outages, those sent a transactional
payment round again forever, running its body (and any call it makes outside the transaction) on every pass.

So an ``OperationalError`` is an outage only if its code is on a short list of codes known to pass: connection
failures (a login refused included: rotated credentials are fixed by an operator, not by the payment), a server
shutting down or out of resources, lock timeouts, deadlocks and serialization failures, a read-only server during a
failover. An ``OperationalError`` without a code (a connection that could not be made) and one from a driver not
known here stay outages, as before: waiting is the safe side of not knowing. The pipelined PostgreSQL connections
(:mod:`.sql_lane`) judge their errors by the same SQLSTATE rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["driver_outage", "pg_outage"]

# PostgreSQL SQLSTATE classes: 08 connection exception, 28 invalid authorization (a login refused), 53 insufficient
# resources, 57 operator intervention (admin shutdown, a statement timeout or cancel), 58 system error (I/O).
_PG_CLASSES = frozenset({"08", "28", "53", "57", "58"})
# And single states: 25006 read-only transaction (a standby during a failover), 40000/40001/40003/40P01 transaction
# rollback (serialization failure, deadlock, completion unknown), 55P03 lock not available, 55006 object in use.
_PG_STATES = frozenset({"25006", "40000", "40001", "40003", "40P01", "55P03", "55006"})

# MySQL/MariaDB server error numbers: 1020 record changed since last read (MariaDB's snapshot isolation), 1037,
# 1038 and 1041 out of memory, 1040/1203 too many connections (in all, for the user), 1044/1045 login refused, 1047 a
# Galera node not ready, 1053 shutdown in progress, 1152 and 1154-1161 aborted connection and network read/write
# errors (not 1153, a packet over the size limit), 1205 lock wait timeout, 1213 deadlock, 1290/1836 read-only (a
# replica being promoted), 1317 query interrupted, 1927 connection killed (MariaDB), 1969 statement timeout
# (MariaDB), 3024 execution time exceeded (MySQL), 3101 a Group Replication conflict, 4031 disconnected for
# inactivity. Not 1142/1143, a statement's missing privilege: PostgreSQL reports that as the statement's fault too.
_MYSQL_ERRORS = frozenset({1020, 1037, 1038, 1040, 1041, 1044, 1045, 1047, 1053, 1152, 1154, 1155, 1156, 1157, 1158,
                           1159, 1160, 1161, 1203, 1205, 1213, 1290, 1317, 1836, 1927, 1969, 3024, 3101, 4031})
# The client library's own errors (CR_*: cannot connect, server gone away, connection lost): 2000-2999.
_MYSQL_CLIENT_ERRORS = range(2000, 3000)

# SQLite primary result codes: BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL. Not SQLITE_ERROR, which says
# "no such table" or a syntax error.
_SQLITE_CODES = frozenset({5, 6, 7, 10, 13, 14, 15})


def pg_outage(sqlstate: str | None) -> bool:
    """Whether a PostgreSQL error with this SQLSTATE is an outage (no SQLSTATE: the connection itself failed)."""
    return not sqlstate or sqlstate[:2] in _PG_CLASSES or sqlstate in _PG_STATES


def driver_outage(orig: Any) -> bool | None:
    """What the driver's error code says of ``orig`` (the DB-API exception), or ``None`` for a driver not known
    here."""
    module = type(orig).__module__.split(".", 1)[0]
    if module == "psycopg":
        return pg_outage(getattr(orig, "sqlstate", None))
    if module == "psycopg2":
        return pg_outage(getattr(orig, "pgcode", None))
    if module in ("pymysql", "MySQLdb"):
        errno = orig.args[0] if orig.args and isinstance(orig.args[0], int) else 0
        return not errno or errno in _MYSQL_ERRORS or errno in _MYSQL_CLIENT_ERRORS
    if module == "sqlite3":
        code = getattr(orig, "sqlite_errorcode", None)
        return code is None or code & 0xFF in _SQLITE_CODES
    return None
