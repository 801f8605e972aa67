"""Configuration of the reference service, from the environment.

With nothing set, everything runs on embedded defaults in ``./data``: SQLite for the operations and the ledger,
and kombu's SQL transport (on SQLite) as a broker that needs no server.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("IDEMTASKS_DATA_DIR", "data")).resolve()


def _sqlite(name: str) -> str:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DATA_DIR / name}"


STORE_URL = os.environ.get("IDEMTASKS_STORE_URL") or _sqlite("operations.sqlite3")
BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "sqla+" + _sqlite("broker.sqlite3")
DATABASE_URL = os.environ.get("DATABASE_URL") or _sqlite("ledger.sqlite3")
#: Amounts above this are declined: a terminal failure, stored and replayed.
DECLINE_ABOVE = 1_000_000
#: Seconds between recovery sweeps in each worker, and how long a pending operation may wait before its message is
#: presumed lost and published again.
SWEEP_INTERVAL = float(os.environ.get("IDEMTASKS_SWEEP_INTERVAL", "5"))
PENDING_AFTER = float(os.environ.get("IDEMTASKS_PENDING_AFTER", "30"))
#: Lease of the charge task (seconds): how long a crashed worker's operation waits before another takes it over.
LEASE = float(os.environ.get("IDEMTASKS_LEASE", "60"))
