"""Errors a result backend hands back: what a caller of ``AsyncResult.get()`` catches and reads."""

from __future__ import annotations

import json
import pickle
from typing import Any

from celery import Celery

from idemtasks import IdemtasksError, OperationFailed, StoreError

BACKEND = Celery("errors", backend="cache+memory://", set_as_current=False).backend


def through_json(exc: BaseException) -> Any:
    """``exc`` stored by a JSON result backend and read back, as ``AsyncResult.get()`` would raise it."""
    return BACKEND.exception_to_python(json.loads(json.dumps(BACKEND.prepare_exception(exc, "json"))))


class Declined(OperationFailed):
    """An application's own failure, with a field of its own on top of OperationFailed's."""

    def __init__(self, *, reason: str, **fields: Any) -> None:
        super().__init__(**fields)
        self.reason = reason


class SoftDeclined(Declined):
    pass


class Refused(IdemtasksError):
    """A keyword used for the message alone, and one kept under another name."""

    def __init__(self, message: str, *, op: str, retryable: bool = False) -> None:
        super().__init__(message + (" (retryable)" if retryable else ""))
        self.operation_id = op


class Invalid(IdemtasksError):
    """A dict as second argument, and a keyword field with a default."""

    def __init__(self, message: str, errors: dict[str, str], *, code: str = "invalid") -> None:
        super().__init__(message)
        self.errors, self.code = errors, code


class Detailed(IdemtasksError):
    """More than a message given to Exception, and a constructor that may give none."""

    def __init__(self, *details: str, code: str) -> None:
        super().__init__(*details)
        self.code = code


class Frozen(IdemtasksError):
    """A field kept behind a read-only property."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self._code = code

    @property
    def code(self) -> str:
        return self._code


class Coded(IdemtasksError):
    """No keyword-only fields: its args are its own."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def test_a_subclass_keeps_its_fields_and_its_bases_fields() -> None:
    for cls in (Declined, SoftDeclined):
        exc = cls(reason="limit", operation_id="op-9", error_type="Declined", error_message="over the limit")
        rebuilt = through_json(exc)
        assert type(rebuilt) is cls and str(rebuilt) == "Declined: over the limit"
        assert vars(rebuilt) == vars(exc) == {"operation_id": "op-9", "error_type": "Declined",
                                              "error_message": "over the limit", "reason": "limit"}
        assert vars(pickle.loads(pickle.dumps(exc))) == vars(exc)


def test_a_keyword_that_is_not_kept_as_an_attribute_does_not_break_the_constructor() -> None:
    exc = Refused("refused", op="op-1", retryable=True)
    assert str(exc) == "refused (retryable)" and exc.operation_id == "op-1"
    rebuilt = through_json(exc)
    assert type(rebuilt) is Refused and str(rebuilt) == "refused (retryable)"


def test_an_error_without_keyword_fields_keeps_its_args() -> None:
    exc = Coded("X", "declined")
    assert exc.args == ("X: declined",)
    rebuilt = through_json(exc)
    assert type(rebuilt) is Coded and rebuilt.args == ("X: declined",) and str(rebuilt) == "X: declined"
    assert str(StoreError("ledger write failed", "row 42")) == "('ledger write failed', 'row 42')"


def test_an_error_stored_by_an_earlier_release_comes_back_with_its_fields_unknown() -> None:
    rebuilt = BACKEND.exception_to_python({"exc_type": "OperationFailed", "exc_module": "idemtasks.errors",
                                           "exc_message": ["Declined: over the limit"]})
    assert type(rebuilt) is OperationFailed and str(rebuilt) == "Declined: over the limit"
    assert (rebuilt.operation_id, rebuilt.error_type, rebuilt.error_message) == (None, None, None)


def test_a_dict_as_the_constructors_own_argument_is_not_taken_for_a_rebuild() -> None:
    exc = Invalid("bad", {})
    assert (exc.errors, exc.code, str(exc)) == ({}, "invalid", "bad")
    rebuilt = through_json(Invalid("bad", {"amount": "negative"}, code="range"))
    assert type(rebuilt) is Invalid and rebuilt.code == "range"


def test_a_field_behind_a_read_only_property_does_not_break_the_rebuild() -> None:
    rebuilt = through_json(Frozen("frozen", code="x"))
    assert type(rebuilt) is Frozen and str(rebuilt) == "frozen"


def test_arguments_beyond_the_message_and_an_absent_message_come_back_as_given() -> None:
    for details, text in [(("declined", "row 42"), "('declined', 'row 42')"), ((), "")]:
        exc = Detailed(*details, code="c")
        rebuilt = through_json(exc)
        assert str(exc) == str(rebuilt) == text and str(exc) == str(Exception(*details))
        assert type(rebuilt) is Detailed and rebuilt.args == exc.args and rebuilt.code == "c"


def test_a_rebuilt_error_has_the_fields_its_original_had_and_no_others() -> None:
    rebuilt = through_json(Refused("refused", op="op-1"))  # keeps op as operation_id, and retryable not at all
    assert vars(rebuilt) == {}  # no attribute op or retryable; operation_id is not one of its fields
    unplain = Detailed("x", code=object())  # type: ignore[arg-type]
    assert vars(through_json(unplain)) == {"code": None}  # what JSON cannot carry comes back as None
