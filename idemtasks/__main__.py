"""``python -m idemtasks``: operator commands.

``python -m idemtasks sweep -A proj [--every 10]``   publish stuck operations again (once, or in a loop)
``python -m idemtasks purge -A proj``                delete expired operations from SQL stores
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from celery.app.utils import find_app


def _app(path: str) -> Any:
    app = find_app(path)
    app.loader.import_default_modules()  # registers the tasks, whose stores the sweep visits
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idemtasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sweep", "purge"])
    parser.add_argument("-A", "--app", required=True, help="the Celery app, as for `celery -A`")
    parser.add_argument("--every", type=float, default=0.0, help="sweep repeatedly, every N seconds")
    opts = parser.parse_args(argv)
    app = _app(opts.app)
    from .recovery import Sweeper

    sweeper = Sweeper(app)
    if opts.command == "purge":
        for store in sweeper.stores():
            print(f"{store.url}: {store.purge_expired()} expired operation(s) deleted")
        return 0
    while True:
        try:
            report = sweeper.sweep()
        except Exception as exc:  # repeated sweeps outlive a store that is down for a while
            if not opts.every:
                raise
            print(f"sweep failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"published again: {len(report.republished)} (from dead holders: {report.taken_over}), "
                  f"expired: {len(report.expired)}, suspected: {len(report.suspected)}, "
                  f"skipped: {len(report.skipped)}", flush=True)
        if not opts.every:
            return 0
        time.sleep(opts.every)


if __name__ == "__main__":
    raise SystemExit(main())
