"""A duplicate becomes a replay: runnable with no servers (SQLite store, in-memory broker, in-process worker)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

from idemtasks import IdempotentTask

data = Path(tempfile.mkdtemp(prefix="idemtasks-example-"))
app = Celery("example", broker="memory://", backend="cache+memory://")
app.conf.update(idemtasks_store_url=f"sqlite:///{data / 'operations.sqlite3'}", task_acks_late=True)
executions = 0


@app.task(base=IdempotentTask, bind=True)
def charge(self: IdempotentTask, account: str, amount: int) -> dict[str, object]:
    global executions
    executions += 1
    # The key and fencing token are what a payment provider call would carry as its own idempotency key.
    return {"account": account, "amount": amount, "provider_key": f"{self.operation.id}-{self.operation.fencing_token}"}


def main() -> None:
    with start_worker(app, pool="solo", perform_ping_check=False):
        first = charge.submit(("alice", 500), key="order-1001")
        print(f"submit #1: operation {first.operation.id[:12]}… created={first.created}")
        while not (op := charge.store.get_by_id(first.operation.id)) or not op.is_final:
            time.sleep(0.05)
        print(f"           status={op.status.value} result={op.result}")
        second = charge.submit(("alice", 500), key="order-1001")
        print(f"submit #2: operation {second.operation.id[:12]}… created={second.created} "
              f"status={second.operation.status.value}")
        # A broker redelivering the same message: the claim turns it into a replay of the stored result.
        headers = {"idemtasks": {"scope": "global", "key": "order-1001"}}
        again = charge.apply_async(("alice", 500), task_id=first.operation.id, headers=headers).get(timeout=10)
        print(f"redelivery returned {again}")
        try:
            charge.submit(("alice", 900), key="order-1001")
        except Exception as exc:  # IdempotencyKeyMismatch
            print(f"same key, other payload: {type(exc).__name__}")
    print(f"the body ran {executions} time(s)")


if __name__ == "__main__":
    main()
