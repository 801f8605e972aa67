"""The public surface is deliberate: adding or removing a name here is an API change."""

from __future__ import annotations

import subprocess
import sys

import idemtasks

EXPECTED = {
    "Attempt", "IdempotentTask",
    "ClaimOutcome", "ClaimResult", "ErrorInfo", "Operation", "Status", "Submission",
    "Store", "open_store",
    "DEFAULT_LEASE", "DEFAULT_STORE_URL", "DEFAULT_TTL",
    "AttemptsExhausted", "ConfigurationError", "IdempotencyKeyMismatch", "IdemtasksError", "InvalidKey", "LeaseLost",
    "NotSerializable",
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
