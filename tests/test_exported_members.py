"""The public surface is deliberate: adding or removing a name here is an API change."""

from __future__ import annotations

import json
import subprocess
import sys

import idemtasks

EXPECTED = {
    "Attempt", "IdempotentTask",
    "ClaimOutcome", "ClaimResult", "ErrorInfo", "Operation", "Status", "Submission",
    "Store", "open_store",
    "DEFAULT_LEASE", "DEFAULT_STORE_URL", "DEFAULT_TTL",
    "ConfigurationError", "IdempotencyKeyMismatch", "IdemtasksError", "InvalidKey", "LeaseLost", "NotSerializable",
    "OperationFailed", "PublishFailed", "StoreError", "StoreUnavailable", "TooLarge",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(idemtasks.__all__) == EXPECTED
    assert len(idemtasks.__all__) == len(EXPECTED)


def test_every_exported_name_exists_and_belongs_to_the_package() -> None:
    for name in idemtasks.__all__:
        member = getattr(idemtasks, name)
        module = getattr(member, "__module__", "idemtasks")
        assert module.startswith("idemtasks"), (name, module)


def test_importing_the_package_loads_no_backend_or_framework() -> None:
    # Measured against Celery's own imports (Celery itself may import Django when it is installed).
    code = ("import sys, celery, celery.app.task; before = set(sys.modules); import idemtasks; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(','.join(sorted(new & {'redis', 'sqlalchemy', 'fastapi', 'starlette', 'flask', 'django'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_errors_share_one_root() -> None:
    for name in EXPECTED:
        obj = getattr(idemtasks, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, idemtasks.IdemtasksError), name


def test_every_error_survives_a_json_result_backend() -> None:
    """Celery's JSON result backends keep a failure's class, module and message, and rebuild it from the message
    alone: each error must come back as itself (its fields unknown), not as a bare ``Exception``."""
    from celery import Celery

    backend = Celery("errors", backend="cache+memory://", set_as_current=False).backend
    for name in EXPECTED:
        cls = getattr(idemtasks, name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        stored = {"exc_type": cls.__name__, "exc_module": cls.__module__, "exc_message": ["what happened"]}
        rebuilt = backend.exception_to_python(stored)
        assert type(rebuilt) is cls and str(rebuilt) == "what happened", name


def test_an_errors_fields_survive_a_json_result_backend() -> None:
    """What a task raised comes back from ``AsyncResult.get()`` with its fields, not only its class and message:
    a caller that catches ``OperationFailed`` can read which error the operation stored."""
    from celery import Celery

    backend = Celery("errors", backend="cache+memory://", set_as_current=False).backend
    raised = [
        idemtasks.OperationFailed(operation_id="op-1", error_type="CardDeclined", error_message="insufficient funds"),
        idemtasks.LeaseLost(operation_id="op-2", fencing_token=7, current_token=None),
        idemtasks.TooLarge(what="result", size=2_000_000, limit=1_000_000),
        idemtasks.IdempotencyKeyMismatch(scope="s", key="k", operation_id="op-3", stored_fingerprint="a",
                                         fingerprint="b"),
        idemtasks.InvalidKey("key is empty", value=""),
        idemtasks.PublishFailed("broker refused", operation_id="op-4"),
    ]
    for exc in raised:
        stored = json.loads(json.dumps(backend.prepare_exception(exc, serializer="json")))
        rebuilt = backend.exception_to_python(stored)
        assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc), exc
        assert vars(rebuilt) == vars(exc), exc
    failed = backend.exception_to_python(json.loads(json.dumps(backend.prepare_exception(raised[0], "json"))))
    assert (failed.operation_id, failed.error_type, failed.error_message) == ("op-1", "CardDeclined",
                                                                              "insufficient funds")


def test_a_field_json_cannot_carry_comes_back_unknown() -> None:
    from celery import Celery

    backend = Celery("errors", backend="cache+memory://", set_as_current=False).backend
    exc = idemtasks.InvalidKey("key is not a string", value=b"raw")
    rebuilt = backend.exception_to_python(json.loads(json.dumps(backend.prepare_exception(exc, "json"))))
    assert type(rebuilt) is idemtasks.InvalidKey and str(rebuilt) == str(exc) and rebuilt.value is None
