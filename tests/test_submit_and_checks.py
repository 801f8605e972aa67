"""Publishing failures on submit, and the start-up checks of lease and delivery settings."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

from idemtasks import IdempotentTask, PublishFailed, Status
from idemtasks import task as task_module
from idemtasks.checks import check_settings
from idemtasks.stores.base import Store
from tests.conftest import drop, make_store
from tests.test_bad_input import free_port


def app_with(broker: str, store: Store) -> tuple[Celery, IdempotentTask]:
    app = Celery(f"pub{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.update(task_publish_retry=False, broker_connection_retry=False, broker_connection_timeout=1,
                    task_default_queue=f"q-{app.main}")

    @app.task(shared=False, base=IdempotentTask, store_url=store, name=f"{app.main}.charge")
    def charge(amount: int) -> int:
        return amount

    return app, charge


def test_failed_publish_leaves_nothing_behind_and_a_repeat_publishes(server_store: Store) -> None:
    _, down = app_with(f"redis://127.0.0.1:{free_port()}/0", server_store)
    with pytest.raises(PublishFailed) as info:
        down.submit((5,), key="k-pub")
    assert server_store.get_by_id(info.value.operation_id) is None  # no record that nothing would ever run
    up_app, up = app_with("memory://", server_store)
    with up_app.connection_for_write() as conn:
        sub = up.submit((5,), key="k-pub")
        assert sub.created and sub.operation.status is Status.PENDING
        # The flag is cleared without waiting where the store pipelines (Redis, PostgreSQL): read it from another
        # connection until it lands.
        stored, deadline = server_store.get_by_id(sub.operation.id), time.monotonic() + 5.0
        while stored is not None and stored.needs_publish and time.monotonic() < deadline:
            time.sleep(0.01)
            stored = server_store.get_by_id(sub.operation.id)
        assert stored is not None and not stored.needs_publish
        received = conn.SimpleQueue(up_app.conf.task_default_queue).get(timeout=5)
        assert received.headers["id"] == sub.operation.id
        received.ack()


def test_a_publish_that_fails_after_the_accept_window_keeps_its_record(server_store: Store,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that hangs, then fails: meanwhile a duplicate past ACCEPT_WINDOW found the record unpublished and
    may be publishing it, its client answered with this id. Removed, that accepted work was lost (its Location a
    404, another payload under the key taken as new). Kept, the duplicate's message, the client's retry or recovery
    runs it."""
    monkeypatch.setattr(task_module, "ABANDON_WITHIN", 0.5)  # the window less the margin
    with socket.socket() as silent:  # accepts, never answers: the publish waits for the broker's socket timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        app, hung = app_with(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", server_store)
        app.conf.broker_transport_options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
        with pytest.raises(PublishFailed) as info:
            hung.submit((5,), key="k-late")
    kept = server_store.get_by_id(info.value.operation_id)
    assert kept is not None and kept.status is Status.PENDING and kept.needs_publish


def test_a_publish_that_fails_at_once_after_a_late_creation_keeps_its_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window runs from the creation, not from the publish: a creation whose answer came late (here, waiting
    for another writer's lock) leaves a duplicate as long to find the record past ACCEPT_WINDOW and publish it."""
    monkeypatch.setattr(task_module, "ABANDON_WITHIN", 3.5)  # the window less the margin
    store = make_store("sqlite", tmp_path)
    path = str(store.engine.url.database)  # type: ignore[attr-defined]
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # another process's write, holding the lock for 4 s
    threading.Timer(4.0, writer.commit).start()
    try:
        # Refused: the publish fails within about 2 s (under the 3.5 s), but 4 s or more after the creation began.
        _, down = app_with(f"redis://127.0.0.1:{free_port()}/0", store)
        with pytest.raises(PublishFailed) as info:
            down.submit((5,), key="k-slow-create")
        kept = store.get_by_id(info.value.operation_id)
        assert kept is not None and kept.status is Status.PENDING and kept.needs_publish
    finally:
        writer.close()
        drop(store)


def test_repeat_submit_publishes_nothing(server_store: Store) -> None:
    app, task = app_with("memory://", server_store)
    first = task.submit((1,), key="k-once")
    again = task.submit((1,), key="k-once")
    assert first.created and not again.created and again.operation.id == first.operation.id
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(app.conf.task_default_queue)
        assert queue.get(timeout=2).headers["id"] == first.operation.id
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.5)


def checked(**conf: object) -> list[str]:
    app = Celery(f"chk{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(idemtasks_store_url="memory://", **conf)

    @app.task(shared=False, base=IdempotentTask, name=f"{app.main}.task", time_limit=conf.pop("time_limit", None))  # type: ignore[misc]
    def task() -> None:
        return None

    app.finalize()
    # Only this task's: an app also holds the shared tasks other modules of the suite have defined.
    return [w for w in check_settings(app) if w.startswith(f"{task.name}: ")]


def test_recommended_settings_raise_no_warning() -> None:
    assert checked(broker_url="redis://localhost//", task_acks_late=True, task_reject_on_worker_lost=True) == []


def test_early_acks_are_reported() -> None:
    warnings = checked(broker_url="amqp://localhost//")
    assert any("acks_late is off" in w for w in warnings)


def test_acks_late_without_reject_on_worker_lost_is_reported() -> None:
    warnings = checked(broker_url="amqp://localhost//", task_acks_late=True)
    assert any("reject_on_worker_lost" in w for w in warnings)


def test_lease_and_time_limit_against_the_visibility_timeout_are_reported() -> None:
    warnings = checked(broker_url="redis://localhost//", task_acks_late=True, task_reject_on_worker_lost=True,
                       broker_transport_options={"visibility_timeout": 30}, time_limit=100)
    assert any("time_limit 100s exceeds the broker visibility_timeout 30s" in w for w in warnings)
    assert any("lease_seconds 60s is not shorter than the visibility_timeout 30s" in w for w in warnings)


@pytest.mark.parametrize(("conf", "needed"), [
    ({"idemtasks_ttl": 240.0}, 280),  # 2 x (lease 60 s + grace 20 s + 2 sweeps of 30 s)
    ({"idemtasks_ttl": 400.0, "idemtasks_pending_after": 300.0}, 720),  # 2 x (pending_after + 2 sweeps)
    ({"idemtasks_ttl": 20.0, "idemtasks_lease": 1.0, "idemtasks_pending_after": 2.0, "idemtasks_sweep_interval": 5.0},
     26),  # 2 x (lease 1 s + the minimum grace of 2 s + 2 sweeps of 5 s)
])
def test_a_ttl_too_short_for_recovery_to_find_the_record_is_reported(conf: dict[str, float], needed: int) -> None:
    """Recovery never finds an expired record: a payment whose message was lost would be gone, unrun."""
    warnings = checked(broker_url="amqp://localhost//", task_acks_late=True, task_reject_on_worker_lost=True, **conf)
    assert len(warnings) == 1 and "leaves recovery too little time" in warnings[0]
    assert warnings[0].endswith(f"Keep idempotency_ttl at {needed}s or more")
    conf["idemtasks_ttl"] = float(needed)
    assert checked(broker_url="amqp://localhost//", task_acks_late=True, task_reject_on_worker_lost=True, **conf) == []


def test_warnings_are_logged_when_a_worker_starts(caplog: pytest.LogCaptureFixture) -> None:
    from celery import signals

    app = Celery(f"chk{uuid.uuid4().hex[:6]}", broker="amqp://localhost//", set_as_current=False)
    app.conf.update(idemtasks_store_url="memory://")

    @app.task(shared=False, base=IdempotentTask, name=f"{app.main}.logged")
    def task() -> None:
        return None

    app.finalize()
    task.bind(app)

    class FakeWorker:  # the sender of worker_init is the worker; only its .app is read
        pass

    sender = FakeWorker()
    sender.app = app  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="idemtasks.checks"):
        signals.worker_init.send(sender=sender)
    assert any("acks_late is off" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("as_text", [False, True])
@pytest.mark.parametrize(("eta_in", "countdown"), [(600.0, 5.0), (600.0, None), (None, 5.0), (600.0, 0), (None, None)])
def test_a_message_is_due_when_celery_schedules_it(eta_in: float | None, countdown: float | None,
                                                    as_text: bool) -> None:
    """The due time recorded for a retry or a submit is the one Celery gives the message: a countdown given beside
    an ETA replaces it. Recorded later, a copy would be held back; earlier, one could run the body before its time."""
    from datetime import datetime, timedelta, timezone

    from idemtasks.task import due_in

    app = Celery(f"due{uuid.uuid4().hex[:6]}", set_as_current=False)
    eta: datetime | str | None = None if eta_in is None else datetime.now(timezone.utc) + timedelta(seconds=eta_in)
    if as_text and isinstance(eta, datetime):  # an ISO 8601 string, which Celery takes too
        eta = eta.isoformat()
    message = app.amqp.as_task_v2("id", "name", countdown=countdown, eta=eta)
    scheduled = message.headers["eta"]
    now = datetime.now(timezone.utc)
    expected = 0.0 if scheduled is None else (datetime.fromisoformat(scheduled) - now).total_seconds()
    assert due_in(eta, countdown) == pytest.approx(expected, abs=0.5)
