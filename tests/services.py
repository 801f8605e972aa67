"""Where the real servers are, and what a test does when one is missing.

A test that needs a server skips with the reason on a laptop without it, and fails when ``CI`` is set: a CI run
that silently skipped the Redis or PostgreSQL tests would prove nothing.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest

REDIS_URL = os.environ.get("IDEMTASKS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("IDEMTASKS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("IDEMTASKS_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
AMQP_URL = os.environ.get("IDEMTASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

_PORTS = {"redis": ("127.0.0.1", 6379), "postgres": ("127.0.0.1", 5432), "mysql": ("127.0.0.1", 3306),
          "rabbitmq": ("127.0.0.1", 5672)}


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(reason: str) -> NoReturn:
    """Skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing service is a failure, not a skip)")
    pytest.skip(reason)


def reachable(service: str) -> bool:
    host, port = _PORTS[service]
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(service: str) -> None:
    if not reachable(service):
        host, port = _PORTS[service]
        missing(f"{service} is not reachable on {host}:{port}")


def pg_sessions(application_name: str) -> int:
    """How many PostgreSQL sessions a client named ``application_name`` has open."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(POSTGRES_URL, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                                    {"n": application_name}).scalar_one())
    finally:
        engine.dispose()
