"""Keys, ids, fingerprints and the stored-JSON codec."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import uuid
from typing import Any

import pytest
from kombu import Exchange, Queue

from idemtasks import InvalidKey, NotSerializable, TooLarge
from idemtasks.identity import (
    absolute_expires,
    canonical_call,
    delivery_route,
    digest_from_id,
    dump_json,
    fingerprint,
    is_past,
    key_digest,
    load_json,
    new_operation_id,
    parse_stored_call,
    stored_call,
    validate_key,
    validate_scope,
)


@pytest.mark.parametrize("key", ["a", "order-1001", "x" * 255, "clé unicode", "spaces are fine"])
def test_acceptable_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("bad", ["", "x" * 256, None, 42, b"bytes", "new\nline", "nul\x00"])
def test_unacceptable_keys_raise_invalid_key_with_the_value(bad: Any) -> None:
    with pytest.raises(InvalidKey) as info:
        validate_key(bad)
    assert info.value.value == bad


def test_scope_allows_more_room_than_keys() -> None:
    assert validate_scope("s" * 1024)
    with pytest.raises(InvalidKey):
        validate_scope("s" * 1025)


def test_operation_ids_embed_the_key_digest_and_are_unguessable() -> None:
    d = key_digest("tenant", "k")
    a, b = new_operation_id(d), new_operation_id(d)
    assert a != b and digest_from_id(a) == digest_from_id(b) == d
    assert digest_from_id("not-an-id") is None
    assert digest_from_id(str(uuid.uuid4())) is None


def test_digest_separates_scope_from_key() -> None:
    assert key_digest("ab", "c") != key_digest("a", "bc")


def test_fingerprint_is_canonical() -> None:
    assert fingerprint("t", (1, 2), {"b": 1, "a": 2}) == fingerprint("t", [1, 2], {"a": 2, "b": 1})
    assert fingerprint("t", (1,), {}) != fingerprint("t", (2,), {})
    assert fingerprint("t", (1,), {}) != fingerprint("u", (1,), {})


def test_fingerprint_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(NotSerializable) as info:
        fingerprint("t", (object(),), {})
    assert info.value.what == "arguments"
    with pytest.raises(NotSerializable):
        fingerprint("t", (float("nan"),), {})


@pytest.mark.parametrize("value", [
    {"__type__": "decimal", "__value__": "1.5"},  # would come back as Decimal("1.5")
    [1, {"nested": {"__value__": "ch_1", "__type__": "charge"}}],  # would be refused as it is read
], ids=["top", "nested"])
def test_a_dict_shaped_as_a_type_tag_is_refused_as_it_would_read_back_as_something_else(value: Any) -> None:
    with pytest.raises(NotSerializable, match="'__type__' and '__value__'"):
        dump_json(value, what="result")
    tagged_too = {"__type__": "a key of the application's", "__value__": 1, "other": 2}
    assert load_json(dump_json(tagged_too, what="result")) == tagged_too  # more keys: not a tag


def test_the_type_tag_check_goes_as_deep_as_the_encoder() -> None:
    deep: Any = [dt.datetime(2026, 1, 2)]  # the encoder's own tag, far down: the check walks the value
    tagged: Any = {"__type__": "decimal", "__value__": "1.5"}
    for _ in range(480):
        deep, tagged = [deep], [tagged]
    assert load_json(dump_json(deep, what="result")) == deep
    with pytest.raises(NotSerializable):
        dump_json(tagged, what="result")


def test_stored_values_round_trip_with_their_types() -> None:
    value = {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "amount": decimal.Decimal("1.10"),
             "id": uuid.UUID(int=7), "items": [1, "two", None]}
    assert load_json(dump_json(value, what="result")) == value


def test_size_limit_counts_encoded_bytes() -> None:
    dump_json("é" * 10, what="result", limit=30)
    with pytest.raises(TooLarge) as info:
        dump_json("é" * 20, what="result", limit=30)
    assert (info.value.what, info.value.limit) == ("result", 30) and info.value.size > 30


def test_a_stored_call_keeps_the_routing_and_not_the_rest_of_the_options() -> None:
    call = canonical_call("tasks.charge", (1, "a"), {"b": 2})
    assert stored_call(call, {}) == call
    assert stored_call(call, {"countdown": 5, "headers": {"x": 1}, "queue": None}) == call  # not routing
    payload = stored_call(call, {"queue": Queue("payments"), "exchange": Exchange("ex"), "routing_key": "pay.eu",
                                 "priority": 7, "countdown": 5})
    routing = {"exchange": "ex", "priority": 7, "queue": "payments", "routing_key": "pay.eu"}
    assert parse_stored_call(payload) == ("tasks.charge", [1, "a"], {"b": 2}, routing)
    # Neither a name nor a number (a flag by mistake, an object with no name): left to the task's own route.
    assert stored_call(call, {"priority": True, "queue": object()}) == call


def test_a_stored_call_keeps_the_deadline_as_the_time_it_names() -> None:
    """A copy recovery publishes must expire when the first message would have, not ``expires`` seconds after its
    own publication, which may be hours later."""
    call = canonical_call("tasks.charge", (1,), {})
    before = dt.datetime.now(dt.timezone.utc)
    stored = parse_stored_call(stored_call(call, {"expires": 30, "queue": "payments"}))[3]
    assert stored["queue"] == "payments"
    when = dt.datetime.fromisoformat(stored["expires"])
    assert before + dt.timedelta(seconds=30) <= when <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    assert not is_past(stored["expires"])
    assert is_past(absolute_expires(-1))  # type: ignore[arg-type]


@pytest.mark.parametrize(("expires", "tz", "named"), [
    (dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), None, "2030-01-02T03:04:05+00:00"),
    ("2030-01-02T03:04:05+01:00", None, "2030-01-02T03:04:05+01:00"),
    # A naive time is read as the worker reads it: as UTC, whatever the app's timezone.
    (dt.datetime(2030, 1, 2, 3, 4, 5), None, "2030-01-02T03:04:05+00:00"),
    (dt.datetime(2030, 7, 2, 3, 4, 5), "Europe/Paris", "2030-07-02T03:04:05+00:00"),
])
def test_a_deadline_given_as_a_time_is_stored_with_its_offset(expires: Any, tz: str | None, named: str) -> None:
    assert dt.datetime.fromisoformat(absolute_expires(expires, tz) or "") == dt.datetime.fromisoformat(named)


@pytest.mark.parametrize("expires", [None, True, "not a time", object()])
def test_no_deadline_or_one_that_cannot_be_read_is_not_stored(expires: Any) -> None:
    call = canonical_call("tasks.charge", (1,), {})
    assert absolute_expires(expires) is None
    assert stored_call(call, {"expires": expires}) == call


@pytest.mark.parametrize(("delivery_info", "route"), [
    ({"exchange": "", "routing_key": "payments", "redelivered": False}, {"queue": "payments"}),  # default exchange
    ({"exchange": "tasks", "routing_key": "pay.eu", "priority": 3}, {"exchange": "tasks", "routing_key": "pay.eu",
                                                                      "priority": 3}),
    ({"exchange": "", "routing_key": "payments", "priority": 0}, {"queue": "payments"}),  # no priority given
    ({"is_eager": True}, {}),  # eager mode: nothing was delivered
    (None, {}),
])
def test_a_delivery_is_routed_as_celerys_retry_routes_it(delivery_info: dict[str, Any] | None,
                                                          route: dict[str, Any]) -> None:
    """What a claim-created record keeps of where its message came from, for the copy recovery may publish."""
    assert delivery_route(delivery_info) == route


def test_a_payload_stored_without_routing_parses() -> None:
    assert parse_stored_call(canonical_call("tasks.charge", (1,), {})) == ("tasks.charge", [1], {}, {})


def test_a_stored_call_keeps_the_callbacks_it_can_store() -> None:
    from celery import Celery

    app = Celery("ids", set_as_current=False)
    receipt = app.signature("billing.receipt", args=("eu",))
    call = canonical_call("tasks.charge", (1,), {})
    options = parse_stored_call(stored_call(call, {"link": receipt, "link_error": [receipt]}))[3]
    assert set(options) == {"link", "link_error"} and options["link_error"] == [options["link"]]
    rebuilt = app.signature(options["link"])  # what Celery does with it when the copy's task succeeds
    assert (rebuilt.task, rebuilt.args) == ("billing.receipt", ["eu"])


def test_callbacks_that_cannot_be_stored_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from celery import Celery

    odd = Celery("ids", set_as_current=False).signature("billing.receipt", args=(object(),))
    call = canonical_call("tasks.charge", (1,), {})
    with caplog.at_level(logging.WARNING, logger="idemtasks"):  # whatever level an earlier test left the root at
        assert stored_call(call, {"link": odd, "queue": "payments"}) == call[:-1] + ',{"queue":"payments"}]'
    assert "callbacks cannot be stored" in caplog.text
