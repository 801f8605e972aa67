"""The ``charge`` task: one ledger row per operation, exactly once, even if the worker is killed mid-charge."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from idemtasks import IdempotentTask

from . import ledger, settings
from .celery_app import app

logger = logging.getLogger(__name__)


@signals.worker_init.connect(weak=False)
def _create_ledger(**_: Any) -> None:
    # An embedded SQLite ledger's table is made as the worker starts, outside any charge's transaction (see
    # ledger.ensure_table): a file, which cannot keep the start waiting as a database server that does not answer
    # would. A server's table is made by the first charge.
    if not settings.DATABASE_URL.startswith("sqlite"):
        return
    try:
        ledger.engine().dispose()  # the table made; the pool children open connections of their own
    except Exception:
        logger.warning("the ledger's table could not be made as the worker started", exc_info=True)


class Declined(Exception):
    """The amount is over the limit: a terminal failure, stored and replayed."""


class Transient(Exception):
    """A failure worth retrying (the ``flaky-`` accounts' first attempt)."""


@app.task(base=IdempotentTask, bind=True, name="worker.charge", transactional=True,
          transaction_url=settings.DATABASE_URL, autoretry_for=(Transient,), max_retries=5, default_retry_delay=0.5)
def charge(self: IdempotentTask, account: str, amount: int) -> dict[str, Any]:
    if amount > settings.DECLINE_ABOVE:
        raise Declined(f"amount {amount} is over the limit of {settings.DECLINE_ABOVE}")
    if account.startswith("flaky-") and self.request.retries == 0:
        raise Transient("the payment provider timed out; retrying")
    ledger.ensure_table(self.connection)  # made as the worker started, unless its database was away then
    # Written through the task's connection: committed together with the operation's completion marker.
    self.connection.execute(ledger.ledger.insert().values(operation_id=self.operation.id, account=account,
                                                          amount=amount))
    return {"payment_id": self.operation.id, "account": account, "amount": amount}
