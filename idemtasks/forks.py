"""What a forked child must not inherit from its parent's threads.

A prefork pool forks its children while threads of the parent (the sweeper, opening a store that does not answer;
the lanes' collector starting) may hold a lock. The child has none of those threads: a lock it inherited held would
never be released, and its first task would wait on it for ever, even once the database is back. Python's own
import locks are such locks, and cannot be made anew: so the worker's main process imports and opens what the
sweeper would otherwise import on its first sweep before it starts it (:func:`open_before_forking`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["fresh_in_child", "open_before_forking"]


def fresh_in_child(owner: object, name: str, factory: Callable[[], object]) -> None:
    """Give each forked child a new ``owner.name`` (a module's global, or an object's attribute) made by ``factory``,
    such as ``threading.Lock``. Whoever uses it must read ``owner.name`` each time, not keep a reference."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: setattr(owner, name, factory()))


def open_before_forking(app: Any) -> None:
    """Open the stores of ``app``'s idempotent tasks, and import the worker side's modules, in the calling thread:
    the worker's main process, as it starts (``worker_init``), before its pool forks and before the sweeper's thread
    starts. A child forked while another thread of the parent was importing a module (the sweeper at its first
    sweep: a store's backend, its driver) inherits that module's import lock held by a thread it does not have,
    and hangs on it at its first task for ever. And a child that made those imports in its own first task could be
    cut off mid-import by that task's soft time limit, leaving them half-made for the rest of its life. A store that
    cannot be opened now is left alone: the sweeper and the tasks report it as they use it."""
    from . import effects, execution, revoked  # noqa: F401  (imported here, not later on another thread)
    from .task import IdempotentTask

    for task in list(app.tasks.values()):
        if isinstance(task, IdempotentTask):
            try:
                task._settled()
                task.store  # noqa: B018  (opened: shared with the tasks and the sweeper)
            except Exception:  # down, or a driver not installed here: reported where it is used
                continue
