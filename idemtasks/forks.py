"""What a forked child must not inherit from its parent's threads.

A prefork pool forks its children while threads of the parent (the sweeper, opening a store that does not answer;
the lanes' collector starting) may hold a lock. The child has none of those threads: a lock it inherited held would
never be released, and its first task would wait on it for ever, even once the database is back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["fresh_in_child"]


def fresh_in_child(owner: object, name: str, factory: Callable[[], object]) -> None:
    """Give each forked child a new ``owner.name`` (a module's global, or an object's attribute) made by ``factory``,
    such as ``threading.Lock``. Whoever uses it must read ``owner.name`` each time, not keep a reference."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: setattr(owner, name, factory()))
