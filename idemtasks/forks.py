"""What a forked child must not inherit from its parent's threads.

A prefork pool forks its children while threads of the parent (the sweeper, opening a store that does not answer;
the lanes' collector starting) may hold a lock. The child has none of those threads: a lock it inherited held would
never be released, and its first task would wait on it for ever, even once the database is back. Python's own
import locks are such locks, and cannot be made anew: so the worker's main process imports what the sweeper would
otherwise import on its first sweep before it starts it (:func:`import_before_forking`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

__all__ = ["fresh_in_child", "import_before_forking"]


def fresh_in_child(owner: object, name: str, factory: Callable[[], object]) -> None:
    """Give each forked child a new ``owner.name`` (a module's global, or an object's attribute) made by ``factory``,
    such as ``threading.Lock``. Whoever uses it must read ``owner.name`` each time, not keep a reference."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: setattr(owner, name, factory()))


def import_before_forking(app: Any) -> None:
    """Import, in the calling thread, every module the worker side of ``app``'s idempotent tasks loads on first use:
    their stores' backends and drivers, and the ledger's. Called in the worker's main process as it starts
    (``worker_init``), before its pool forks and before the sweeper's thread starts. A child forked while another
    thread of the parent was importing a module (the sweeper at its first sweep) inherits that module's import lock
    held by a thread it does not have, and hangs at its first task for ever; and a child that made those imports in
    its own first task could be cut off mid-import by that task's soft time limit, leaving them half-made for the
    rest of its life. Nothing is connected: a database away at the worker's start must not hold it."""
    import codecs
    import importlib

    from .stores import REDIS_SCHEMES, SQL_SCHEMES, url_scheme
    from .task import IdempotentTask

    with contextlib.suppress(ImportError):  # SQLAlchemy is not installed: no ledger, nothing of it to import
        importlib.import_module(f"{__package__}.effects")
    codecs.lookup("idna")  # a driver connecting to a host name (PyMySQL) loads this codec, and the modules it needs
    for task in list(app.tasks.values()):
        if not isinstance(task, IdempotentTask):
            continue
        for url in (task.store_url, getattr(task, "transaction_url", None)):
            if not isinstance(url, str) or "://" not in url:
                continue  # a Store object, imported as it was made; or none
            # What is not installed here is reported where it is used, as before.
            with contextlib.suppress(Exception):
                scheme = url_scheme(url)
                if scheme in REDIS_SCHEMES:
                    importlib.import_module(f"{__package__}.stores.redis")
                elif scheme in SQL_SCHEMES:
                    _import_sql(url)


def _import_sql(url: str) -> None:
    import sqlalchemy as sa

    from .stores import sql  # noqa: F401  (the store's own module)
    from .stores.lanes import lanes_supported

    dialect = sa.engine.make_url(url).get_dialect()
    dialect.import_dbapi()  # the driver
    if dialect.name == "postgresql" and dialect.driver == "psycopg" and lanes_supported():
        from .stores import sql_lane  # noqa: F401  (the lanes', loaded by the first one otherwise)
