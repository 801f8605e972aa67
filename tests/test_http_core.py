"""The framework-agnostic HTTP rules, tested once; the adapters only translate requests and responses."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import uuid
from datetime import date, datetime, timezone
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from idemtasks.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InvalidKey,
    NotSerializable,
    PublishFailed,
    StoreError,
    StoreUnavailable,
    TooLarge,
)
from idemtasks.http.core import (
    ACCEPT_WINDOW,
    HttpPolicy,
    InvalidCredentials,
    Reply,
    RequestHeaders,
    accepted,
    caller_scope,
    error_reply,
    key_required,
    owns,
    read_key,
    request_fingerprint,
    status_reply,
)
from idemtasks.http.endpoint import bearer_caller
from idemtasks.identity import dump_json, load_json
from idemtasks.models import ErrorInfo, Operation, Status, Submission
from idemtasks.stores.memory import MemoryStore
from tests import services
from tests.conftest import drop

POLICY = HttpPolicy()


def op(status: Status = Status.PENDING, *, scope: str | None = None, needs_publish: bool = False,
       created_ago: float = 60.0) -> Operation:
    now = time.time()
    return Operation(
        id="op1", scope=scope or caller_scope("alice", "POST", "/payments"), key="k", task_name="t",
        fingerprint="fp", status=status, result={"ok": 1} if status is Status.SUCCEEDED else None,
        error=ErrorInfo("Declined", "no") if status is Status.FAILED else None, attempts=1, fencing_token=1,
        lease_owner=None, lease_expires_at=None, created_at=now - created_ago, updated_at=now, expires_at=now + 60,
        needs_publish=needs_publish,
    )


class TestKeys:
    def test_first_configured_header_wins_and_names_are_case_insensitive(self) -> None:
        assert read_key({"idempotency-key": " abc "}, POLICY) == "abc"
        assert read_key({"X-Idempotency-Key": "x"}, POLICY) == "x"
        assert read_key({}, POLICY) is None

    @pytest.mark.parametrize("bad", ["", "   ", "x" * 256, "caf\u00e9", "tab\there"])
    def test_unusable_keys_are_invalid(self, bad: str) -> None:
        with pytest.raises(InvalidKey):
            read_key({"Idempotency-Key": bad}, POLICY)

    @pytest.mark.parametrize("joined", ["k1, k2", "k1,k2", "k1,"])
    def test_a_key_with_a_comma_is_refused_since_it_may_be_two_keys_joined(self, joined: str) -> None:
        """WSGI servers (and any proxy, RFC 9110 5.3) join a repeated header into one, with commas: read as one key,
        a request that sent two would be an operation of its own, a replay of neither."""
        with pytest.raises(InvalidKey, match="comma"):
            read_key({"Idempotency-Key": joined}, POLICY)

    def test_two_headers_that_name_different_keys_are_refused(self) -> None:
        """Which one would the client retry with? Neither can be chosen without guessing, as with a repeated header.
        Both naming the same key is one key."""
        with pytest.raises(InvalidKey, match="different idempotency keys"):
            read_key({"Idempotency-Key": "k1", "X-Idempotency-Key": "k2"}, POLICY)
        assert read_key({"Idempotency-Key": "k1", "X-Idempotency-Key": " k1 "}, POLICY) == "k1"

    @pytest.mark.parametrize("end", ["\xa0", "\x85", "\u2003"])
    def test_only_spaces_and_tabs_are_taken_off_a_key(self, end: str) -> None:
        """A Latin-1 NBSP or NEL at either end (what a server hands on for those bytes) is part of the key, which is
        then not printable ASCII: refused, not read as the key without it, whose operation it would replay."""
        assert read_key({"Idempotency-Key": " \tk1\t "}, POLICY) == "k1"
        for value in (f"k1{end}", f"{end}k1"):
            with pytest.raises(InvalidKey, match="printable ASCII"):
                read_key({"Idempotency-Key": value}, POLICY)

    def test_header_names_are_configurable(self) -> None:
        policy = HttpPolicy(header_names=("Request-Id",))
        assert read_key({"Request-Id": "r1", "Idempotency-Key": "ignored"}, policy) == "r1"

    def test_a_missing_key_names_the_headers_the_endpoint_reads(self) -> None:
        assert "Idempotency-Key or X-Idempotency-Key header" in key_required().body["detail"]
        custom = key_required(HttpPolicy(header_names=("Request-Id",)))
        assert "Request-Id header" in custom.body["detail"]


class TestScopeAndFingerprint:
    def test_scope_hashes_the_caller_and_names_the_endpoint(self) -> None:
        scope = caller_scope("sk_live_secret", "post", "/payments")
        assert "sk_live_secret" not in scope and scope.endswith("|POST /payments")
        assert caller_scope(None, "POST", "/p").startswith("anonymous|")

    def test_only_the_creator_owns_an_operation(self) -> None:
        mine = op(scope=caller_scope("alice", "POST", "/payments"))
        assert owns("alice", mine)
        assert not owns("bob", mine) and not owns(None, mine)

    def test_fingerprint_ignores_query_order_but_not_values_or_body(self) -> None:
        def fp(query: str, body: bytes = b"{}", method: str = "POST") -> str:
            return request_fingerprint(method, "/p", query, body, {}, POLICY)

        assert fp("a=1&b=2") == fp("b=2&a=1")
        assert fp("a=1&b=2&a=3") == fp("b=2&a=1&a=3")
        assert fp("sort=date&sort=name") != fp("sort=name&sort=date")  # a repeated parameter's order may matter
        assert fp("a=1") != fp("a=2")
        assert fp("", b'{"x":1}') != fp("", b'{"x":2}')
        assert fp("", method="PUT") != fp("")

    @pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                              "application/merge-patch+json"])
    def test_a_json_body_serialized_again_is_the_same_request(self, content_type: str) -> None:
        """A client's retry may serialize its body afresh: member order, spacing and string escapes mean nothing."""
        def fp(body: bytes) -> str:
            return request_fingerprint("POST", "/p", "", body, {"Content-Type": content_type}, POLICY)

        first = fp(rb'{"account":"caf\u00e9","amount":500,"meta":{"b":[1,2],"a":null}}')
        assert fp('{\n  "meta": {"a": null, "b": [1, 2]},\n  "amount": 500, "account": "café"\n}'.encode()) == first
        assert fp('{"account":"café","amount":500,"meta":{"a":null,"b":[1,2]}}'.encode("utf-16")) == first

    @pytest.mark.parametrize("other", [
        b'{"account":"a","amount":500.0}',  # another spelling of the number: a parser may read it otherwise
        b'{"account":"a","amount":5e2}',
        b'{"account":"a","amount":"500"}',
        b'{"account":"a","amount":500,"amount":500}',  # a repeated member is kept, not merged
        b'{"account":"a","amount":500,"x":null}',
        b'{"account":"a ","amount":500}',
        b'[{"account":"a","amount":500}]',
    ])
    def test_a_json_body_that_may_mean_something_else_is_another_request(self, other: bytes) -> None:
        def fp(body: bytes) -> str:
            return request_fingerprint("POST", "/p", "", body, {"Content-Type": "application/json"}, POLICY)

        assert fp(other) != fp(b'{"account":"a","amount":500}')

    def test_numbers_keep_every_digit_the_client_sent(self) -> None:
        def fp(body: bytes) -> str:
            return request_fingerprint("POST", "/p", "", body, {"Content-Type": "application/json"}, POLICY)

        # Equal as floats, different as decimal amounts.
        assert fp(b'{"amount":0.1}') != fp(b'{"amount":0.10000000000000000001}')
        assert fp(b'{"n":12345678901234567890}') != fp(b'{"n":12345678901234567891}')

    def test_a_body_that_is_not_json_or_not_declared_json_is_hashed_as_sent(self) -> None:
        def fp(body: bytes, content_type: str = "application/json") -> str:
            return request_fingerprint("POST", "/p", "", body, {"Content-Type": content_type}, POLICY)

        assert fp(b'{"a":1,') != fp(b'{"a":1, ')  # not JSON: as it is
        assert fp(rb'["\ud800"]') != fp(rb'[ "\ud800"]')  # a lone surrogate has no canonical UTF-8 form
        assert fp(b'{"a": 1}', "text/plain") != fp(b'{"a":1}', "text/plain")
        assert fp(b"[" * 50_000 + b"]" * 50_000) != fp(b"[" * 50_001 + b"]" * 50_001)  # deeper than Python recurses

    def test_a_multipart_boundary_leaves_the_fingerprint_alone_but_the_parts_do_not(self) -> None:
        """Browsers and HTTP libraries draw a new boundary for every request, a client's retry included."""
        def fp(boundary: str, content: bytes = b"paid", content_type: str = "multipart/form-data; boundary={}") -> str:
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="r"\r\n\r\n'.encode() + content
                    + f"\r\n--{boundary}--\r\n".encode())
            return request_fingerprint("POST", "/p", "", body, {"Content-Type": content_type.format(boundary)}, POLICY)

        assert fp("aaa") == fp("bbb") == fp("ccc", content_type='Multipart/Form-Data; boundary="{}"')
        assert fp("aaa", b"forged") != fp("aaa")
        assert fp("aaa", content_type="text/plain") != fp("bbb", content_type="text/plain")  # only multipart

    def test_a_boundary_inside_a_value_is_content_not_a_delimiter(self) -> None:
        """Only a delimiter *line* is a boundary (RFC 2046): ``pay--ab-now`` under ``ab`` and ``pay--cd-now`` under
        ``cd`` are two different values."""
        def fp(boundary: str, value: str) -> str:
            body = (f'--{boundary}\r\nContent-Disposition: form-data; name="memo"\r\n\r\n{value}'
                    f"\r\n--{boundary}--\r\n").encode()
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            return request_fingerprint("POST", "/p", "", body, headers, POLICY)

        assert fp("ab", "pay--ab-now") != fp("cd", "pay--cd-now")
        assert fp("ab", "pay--cd-now") == fp("cd", "pay--cd-now")  # the same value, under two boundaries

    def test_a_part_holding_the_canonical_delimiter_is_not_taken_for_one(self) -> None:
        """Canonical bytes inside a part (here a NUL delimiter) cannot make two different forms compare equal."""
        def fp(body: str, boundary: str) -> str:
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            return request_fingerprint("POST", "/p", "", body.encode(), headers, POLICY)

        one_part = "--ab\r\nName: a\r\n\r\nx\r\n--\x00\r\nName: b\r\n\r\ny\r\n--ab--\r\n"
        two_parts = "--cd\r\nName: a\r\n\r\nx\r\n--cd\r\nName: b\r\n\r\ny\r\n--cd--\r\n"
        assert fp(one_part, "ab") != fp(two_parts, "cd")

    def test_chosen_headers_join_the_fingerprint(self) -> None:
        policy = HttpPolicy(fingerprint_headers=("Content-Type",))
        a = request_fingerprint("POST", "/p", "", b"", {"Content-Type": "a"}, policy)
        b = request_fingerprint("POST", "/p", "", b"", {"content-type": "b"}, policy)
        assert a != b


class TestReplies:
    def test_new_operation_is_202_with_location(self) -> None:
        r = accepted(Submission(op(), True), "/operations/op1", POLICY, now=time.time())
        assert r.status == 202 and r.headers["Location"] == "/operations/op1" and r.body["status"] == "pending"

    @pytest.mark.parametrize(("status", "code"), [(Status.PENDING, 202), (Status.RUNNING, 202),
                                                  (Status.SUCCEEDED, 200), (Status.FAILED, 200)])
    def test_replay_answers_with_the_operation_as_it_stands(self, status: Status, code: int) -> None:
        r = accepted(Submission(op(status), False), "/operations/op1", POLICY, now=time.time())
        assert r.status == code and r.headers["Idempotent-Replayed"] == "true"
        assert ("Retry-After" in r.headers) == (not status.is_final)

    def test_an_operation_due_later_is_polled_when_it_is_due(self) -> None:
        """A countdown, an ETA or a retry's back-off sets a pending operation's updated_at ahead: Retry-After says
        when it is due, not the policy's second, on the first answer, a replay and a status read alike."""
        now = time.time()
        later = dataclasses.replace(op(), created_at=now, updated_at=now + 3600.2)
        assert accepted(Submission(later, True), "/l", POLICY, now=now).headers["Retry-After"] == "3601"
        assert 3599 <= int(accepted(Submission(later, False), "/l", POLICY, now=now).headers["Retry-After"]) <= 3601
        assert 3599 <= int(status_reply(later, "alice", POLICY).headers["Retry-After"]) <= 3601
        # Due, or running (updated_at is then its claim or a renewal): the policy's interval.
        assert status_reply(dataclasses.replace(later, updated_at=now - 5), "alice", POLICY).headers["Retry-After"] \
            == "1"
        running = dataclasses.replace(later, status=Status.RUNNING)
        assert status_reply(running, "alice", POLICY).headers["Retry-After"] == "1"
        assert status_reply(later, "alice", HttpPolicy(retry_after=7200)).headers["Retry-After"] == "7200"

    def test_a_store_clock_a_little_ahead_of_this_hosts_does_not_hold_pollers_back(self) -> None:
        """A replay or a status read compares the store's due time with this host's clock: a few seconds apart
        (CLOCK_SLACK), a fresh operation is not taken for a scheduled one."""
        fresh = dataclasses.replace(op(), updated_at=time.time() + 4.0)
        assert status_reply(fresh, "alice", POLICY).headers["Retry-After"] == "1"
        assert accepted(Submission(fresh, False), "/l", POLICY, now=time.time()).headers["Retry-After"] == "1"

    def test_final_statuses_are_configurable(self) -> None:
        policy = HttpPolicy(succeeded_status=201, failed_status=422)
        assert accepted(Submission(op(Status.SUCCEEDED), False), "/l", policy, now=time.time()).status == 201
        assert accepted(Submission(op(Status.FAILED), False), "/l", policy, now=time.time()).status == 422

    def test_first_request_still_being_accepted_is_409_then_released_after_the_window(self) -> None:
        young = Submission(op(needs_publish=True, created_ago=1.0), False)
        r = accepted(young, "/l", POLICY, now=time.time())
        assert r.status == 409 and r.body["code"] == "idempotency_key_in_use" and r.headers["Retry-After"] == "1"
        old = Submission(op(needs_publish=True, created_ago=60.0), False)
        assert accepted(old, "/l", POLICY, now=time.time()).status == 202

    def test_status_reply_is_200_for_the_owner_and_404_for_anyone_else(self) -> None:
        assert status_reply(op(Status.SUCCEEDED), "alice", POLICY).status == 200
        assert status_reply(op(), "mallory", POLICY).status == 404
        assert status_reply(None, "alice", POLICY).status == 404


    def test_a_result_holding_decimals_dates_and_uuids_is_answered_in_plain_json(self) -> None:
        """The store gives these types back as they were (for the task's own callers); a poll or a replay must
        still answer, with amounts as strings that keep every digit and times in ISO 8601."""
        paid = {"amount": Decimal("10.10"), "at": datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc),
                "day": date(2026, 12, 1), "cutoff": dt_time(17, 0), "charge": UUID(int=7), "receipt": b"\x00\xffpdf"}
        stored = load_json(dump_json(paid, what="result"))
        assert stored == paid  # the store keeps the types: the reply is where they become plain JSON
        done = dataclasses.replace(op(Status.SUCCEEDED), result=stored)
        for reply in (status_reply(done, "alice", POLICY),
                      accepted(Submission(done, False), "/operations/op1", POLICY, now=time.time())):
            assert json.loads(reply.json_bytes())["result"] == {
                "amount": "10.10", "at": "2026-12-01T09:30:00+00:00", "day": "2026-12-01", "cutoff": "17:00:00",
                "charge": "00000000-0000-0000-0000-000000000007", "receipt": "AP9wZGY="}

    def test_a_body_of_another_type_is_still_refused(self) -> None:
        with pytest.raises(TypeError, match="set is not JSON serializable"):
            Reply(200, {"x": {1}}).json_bytes()


class TestRequestHeaders:
    def test_lookups_ignore_case_and_iteration_keeps_the_frameworks_spelling(self) -> None:
        """A caller written against a plain dict of the framework's headers (``dict(headers)``, a loop over
        ``items()``) keeps working; one that asks in another case than the framework spells finds the header too."""
        headers = RequestHeaders([("X-Tenant", "acme"), ("Content-Type", "application/json"), ("X-Tenant", "globex")])
        # A repeated header keeps its first value: Starlette's headers.get reads that one, and so does the
        # application's own authentication, which must agree with the caller function on who calls.
        assert headers.get("x-tenant") == headers["X-TENANT"] == "acme" and "x-TeNaNt" in headers
        assert headers.repeated == {"x-tenant"}
        assert dict(headers) == {"X-Tenant": "acme", "Content-Type": "application/json"}
        assert [name for name, _ in headers.items() if name == "Content-Type"] == ["Content-Type"]
        headers["x-request-id"] = "r1"
        del headers["CONTENT-TYPE"]
        assert dict(headers) == {"X-Tenant": "acme", "x-request-id": "r1"} and len(headers) == 2


class TestErrors:
    @pytest.mark.parametrize(("exc", "status", "code"), [
        (InvalidKey("bad", value=""), 400, "idempotency_key_invalid"),
        (IdempotencyKeyMismatch(scope="s", key="k", operation_id="o", stored_fingerprint="a", fingerprint="b"),
         422, "idempotency_key_mismatch"),
        (TooLarge(what="arguments", size=10, limit=5), 413, "payload_too_large"),
        (NotSerializable("x", what="arguments"), 400, "invalid_request"),
        (StoreUnavailable("down"), 503, "service_unavailable"),
        (PublishFailed("broker down", operation_id="o"), 503, "service_unavailable"),
        (StoreError("relation does not exist"), 500, "store_error"),
    ])
    def test_each_error_has_its_documented_problem(self, exc: Exception, status: int, code: str) -> None:
        r = error_reply(exc, POLICY)
        assert (r.status, r.body["code"], r.media_type) == (status, code, "application/problem+json")
        assert r.body["status"] == status and r.body["title"] and r.body["type"].startswith("https://")
        assert ("Retry-After" in r.headers) == (status == 503)
        if status == 503:
            assert r.headers["Retry-After"] == "1"

    def test_a_status_read_that_fails_says_so_rather_than_speak_of_recording(self) -> None:
        for exc, status in ((StoreUnavailable("down"), 503), (StoreError("no table"), 500)):
            r = error_reply(exc, POLICY, reading=True)
            assert r.status == status and "could not be read" in r.body["detail"]
            assert "idempotency key" not in r.body["detail"] and "recorded" not in r.body["detail"]

    def test_a_write_that_met_an_outage_is_not_said_to_be_unrecorded(self) -> None:
        """A store that timed out may still apply the creation once it answers again: the client must retry with the
        same key (and may meet the operation then), not take the 503 as "nothing happened"."""
        for exc in (StoreUnavailable("timed out"), PublishFailed("broker down", operation_id="o")):
            detail = error_reply(exc, POLICY).body["detail"]
            assert "may not have been recorded" in detail and "same idempotency key" in detail

    def test_unknown_exceptions_are_not_swallowed(self) -> None:
        with pytest.raises(KeyError):
            error_reply(KeyError("x"), POLICY)


class TestLimits:
    def test_oversized_body_is_a_413_before_anything_is_stored(self) -> None:
        from idemtasks.http.endpoint import Endpoint, IncomingRequest
        from idemtasks.stores.memory import MemoryStore

        store = MemoryStore()
        endpoint = Endpoint(store, policy=HttpPolicy(max_body_bytes=10))
        req = IncomingRequest("POST", "/p", "/p", "", b"x" * 11, {"Idempotency-Key": "k"}, "alice")
        reply = endpoint.submit(req, object(), ())
        assert reply.status == 413 and reply.body["code"] == "payload_too_large"
        assert store.round_trips == 0

    def test_a_form_described_after_parsing_is_measured_by_its_content_length(self) -> None:
        """A form read before submitting reaches the endpoint as a short description: the declared length counts."""
        from idemtasks.http.endpoint import Endpoint, IncomingRequest
        from idemtasks.http.forms import parsed_form_body
        from idemtasks.stores.memory import MemoryStore

        store = MemoryStore()
        endpoint = Endpoint(store, policy=HttpPolicy(max_body_bytes=100))
        described = parsed_form_body([("a", "1")], [])
        assert len(described) < 100
        req = IncomingRequest("POST", "/p", "/p", "", described, {"Idempotency-Key": "k", "Content-Length": "101"},
                              "alice")
        reply = endpoint.submit(req, object(), ())
        assert reply.status == 413 and store.round_trips == 0


    def test_a_body_shorter_than_its_content_length_is_refused_and_nothing_is_stored(self) -> None:
        """A client that stopped sending mid-upload: gunicorn hands the application what came. Recorded, the cut-off
        payload ran, and its key refused the client's whole retry as a mismatch."""
        from idemtasks.http.endpoint import Endpoint, IncomingRequest

        store = MemoryStore()
        endpoint = Endpoint(store)
        headers = {"Idempotency-Key": "k", "Content-Length": "17", "Content-Type": "application/x-www-form-urlencoded"}
        cut = IncomingRequest("POST", "/p", "/p", "", b"tag=trunc&n=1", headers, "alice")
        reply = endpoint.submit(cut, object(), ())
        assert reply.status == 400 and reply.body["code"] == "body_incomplete" and store.round_trips == 0
        whole = IncomingRequest("POST", "/p", "/p", "", b"tag=trunc&n=12345", headers, "alice")
        assert not isinstance(endpoint.prepare(whole), Reply)
        # Beside Transfer-Encoding a Content-Length means nothing (RFC 9112): the body is what the chunks carried.
        chunked = IncomingRequest("POST", "/p", "/p", "", b"tag=x", {**headers, "Transfer-Encoding": "chunked"},
                                  "alice")
        assert not isinstance(endpoint.prepare(chunked), Reply)
        # Beside Content-Encoding it counts encoded bytes: an application that decodes gzip itself hands on fewer.
        gzipped = IncomingRequest("POST", "/p", "/p", "", b"[1,2,3]", {**headers, "Content-Length": "27",
                                                                      "Content-Encoding": "gzip"}, "alice")
        assert not isinstance(endpoint.prepare(gzipped), Reply)

    @pytest.mark.parametrize("value", ["\x01" * 30, '"' * 60, "\\" * 60, "\n" * 60])
    def test_a_form_whose_description_is_longer_than_its_body_is_not_a_413(self, value: str) -> None:
        """JSON escapes a control character in six bytes and a quote in two: whether a form is too large must not
        depend on whether the view read it before submitting."""
        from idemtasks.http.endpoint import Endpoint, IncomingRequest
        from idemtasks.http.forms import parsed_form_body

        described = parsed_form_body([("a", value)], [])
        assert len(described) > 100
        headers = {"Idempotency-Key": "k", "Content-Length": "90", "Content-Type": "application/x-www-form-urlencoded"}
        req = IncomingRequest("POST", "/p", "/p", "", described, headers, "alice")
        assert not isinstance(Endpoint(MemoryStore(), policy=HttpPolicy(max_body_bytes=100)).prepare(req), Reply)
        # A raw body of the same bytes is measured as it is.
        raw = IncomingRequest("POST", "/p", "/p", "", bytes(described), headers, "alice")
        reply = Endpoint(MemoryStore(), policy=HttpPolicy(max_body_bytes=100)).prepare(raw)
        assert isinstance(reply, Reply) and reply.status == 413

    @pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "12x", "-1", ""])
    def test_a_content_length_that_is_not_ascii_digits_counts_as_absent(self, length: str) -> None:
        """"²".isdigit() is true, but int() refuses it: that must not become a 500."""
        from idemtasks.http.endpoint import Endpoint, IncomingRequest, declared_length
        from idemtasks.stores.memory import MemoryStore

        assert declared_length({"Content-Length": length}) == 0
        req = IncomingRequest("POST", "/p", "/p", "", b"{}", {"Idempotency-Key": "k", "Content-Length": length}, "a")
        assert not isinstance(Endpoint(MemoryStore()).prepare(req), Reply)


def basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


class TestDefaultCaller:
    def test_a_bearer_token_names_the_caller(self) -> None:
        assert bearer_caller({"authorization": "bearer sk_live_1"}) == "sk_live_1"

    def test_a_basic_user_names_the_caller_whatever_the_password(self) -> None:
        assert bearer_caller(basic(b"sk_live_1:")) == bearer_caller(basic(b"sk_live_1:other"))
        assert bearer_caller(basic(b"alice:x")) != bearer_caller(basic(b"bob:x"))
        # A user of the same name as a token is still someone else, and no token can pass for that user.
        assert bearer_caller(basic(b"alice:")) != bearer_caller({"Authorization": "Bearer alice"})
        with pytest.raises(InvalidCredentials, match="':'"):
            bearer_caller({"Authorization": "Bearer basic:alice"})

    def test_no_authorization_is_anonymous(self) -> None:
        assert bearer_caller({}) is None and bearer_caller({"Authorization": "  "}) is None

    @pytest.mark.parametrize("header", ["Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
                                        "Basic " + base64.b64encode(b":pw").decode(),
                                        "Basic " + base64.b64encode(b"\xff:pw").decode(), "Basic", "Bearer",
                                        "Bearer  "])
    def test_unreadable_credentials_are_refused_rather_than_made_anonymous(self, header: str) -> None:
        with pytest.raises(InvalidCredentials):
            bearer_caller({"Authorization": header})
        assert error_reply(InvalidCredentials("x"), POLICY).status == 400

    @pytest.mark.parametrize("header", ["Bearer t1, Bearer t2", "Bearer t1,t2", "Bearer t1 t2"])
    def test_two_bearer_tokens_joined_into_one_header_are_refused(self, header: str) -> None:
        """A WSGI server joins a repeated header with ", ": read as one token, that would be a third caller beside
        the two the client named. A token (RFC 6750) has neither spaces nor commas."""
        with pytest.raises(InvalidCredentials):
            bearer_caller({"Authorization": header})

    def test_a_repeated_authorization_header_is_refused(self) -> None:
        headers = RequestHeaders([("authorization", "Bearer t1"), ("authorization", "Bearer t2")])
        assert headers["Authorization"] == "Bearer t1"  # what Starlette's headers.get reads too
        with pytest.raises(InvalidCredentials, match="repeats"):
            bearer_caller(headers)

    @pytest.mark.parametrize("header", ["Bearer\ttok", "Bearer,", "Bearer\xa0tok", "(Bearer) tok", "Bearer\ttok\t"])
    def test_a_header_that_is_not_a_scheme_and_credentials_is_the_clients_mistake(self, header: str) -> None:
        """Any client can send garbage: a 400, not the 500 of an application whose callers use a scheme the default
        identity does not read."""
        with pytest.raises(InvalidCredentials, match="not a scheme"):
            bearer_caller({"Authorization": header})

    def test_a_bearer_token_keeps_what_is_not_http_whitespace(self) -> None:
        assert bearer_caller({"Authorization": "\tBearer tok\t "}) == "tok"
        with pytest.raises(InvalidCredentials):
            bearer_caller({"Authorization": "Bearer tok\xa0"})  # not the caller "tok"

    @pytest.mark.parametrize("header", ['Digest username="alice"', "HMAC alice:sig", "Token t", "t"])
    def test_another_scheme_needs_a_caller_function(self, header: str) -> None:
        with pytest.raises(ConfigurationError, match="caller="):
            bearer_caller({"Authorization": header})


def task_on(app: Any, store: Any, name: str) -> Any:
    """A task of ``app`` that writes to ``store``."""
    from idemtasks import IdempotentTask

    @app.task(shared=False, base=IdempotentTask, store_url=store, name=name)
    def t() -> None:
        return None

    return t


class TestEndpointWiring:
    def test_an_endpoint_needs_a_store(self) -> None:
        from idemtasks.errors import ConfigurationError
        from idemtasks.http.endpoint import Endpoint

        with pytest.raises(ConfigurationError):
            Endpoint(None)

    def test_a_task_writing_to_another_store_is_refused(self) -> None:
        from celery import Celery

        from idemtasks import IdempotentTask
        from idemtasks.errors import ConfigurationError
        from idemtasks.http.endpoint import Endpoint, IncomingRequest
        from idemtasks.stores.memory import MemoryStore

        app = Celery("wiring", set_as_current=False)

        @app.task(shared=False, base=IdempotentTask, store_url=MemoryStore("memory://other"), name="wiring.t")
        def t() -> None:
            return None

        req = IncomingRequest("POST", "/p", "/p", "", b"", {"Idempotency-Key": "k"}, "alice")
        with pytest.raises(ConfigurationError):
            Endpoint(MemoryStore("memory://mine")).submit(req, t)

    @pytest.mark.parametrize("backend", ["sqlite", "redis"])
    def test_a_task_on_another_table_or_namespace_of_the_same_database_is_refused(
        self, backend: str, tmp_path: Path
    ) -> None:
        """One URL, two places: the task's operations would be written where the status route never looks, and
        every ``Location`` it hands out would answer 404."""
        from celery import Celery

        from idemtasks.errors import ConfigurationError
        from idemtasks.http.endpoint import Endpoint, IncomingRequest

        namespace = f"wiring-{uuid.uuid4().hex[:8]}"

        def open_at(place: str) -> Any:
            if backend == "sqlite":
                from idemtasks.stores.sql import SQLStore
                return SQLStore(f"sqlite:///{tmp_path / 'ops.db'}", table=place)
            services.require("redis")
            from idemtasks.stores.redis import RedisStore
            return RedisStore(services.REDIS_URL, namespace=f"idemtasks-test:{namespace}-{place}")

        app = Celery("wiring", broker="memory://", set_as_current=False)

        mine, other, mine_again = open_at("mine"), open_at("other"), open_at("mine")
        endpoint = Endpoint(mine)
        req = IncomingRequest("POST", "/p", "/p", "", b"", {"Idempotency-Key": "k"}, "alice")
        with pytest.raises(ConfigurationError, match="other") as refused:
            endpoint.submit(req, task_on(app, other, "wiring.elsewhere"))
        assert mine.url == other.url and mine.where in str(refused.value) and other.where in str(refused.value)
        # Another object for the same place is the same store.
        assert endpoint.submit(req, task_on(app, mine_again, "wiring.here")).status == 202
        for store in (mine, other, mine_again):
            drop(store)

    def test_a_store_of_another_kind_is_compared_by_url(self, tmp_path: Path) -> None:
        """A wrapper (for metrics, say) around the endpoint's store cannot name its table: its URL decides."""
        from celery import Celery

        from idemtasks.errors import ConfigurationError
        from idemtasks.http.endpoint import Endpoint
        from idemtasks.stores.base import Store
        from idemtasks.stores.sql import SQLStore

        inner = SQLStore(f"sqlite:///{tmp_path / 'ops.db'}")
        wrapper_class = type("Wrapper", (Store,), {"url": inner.url})
        wrapper_class.__abstractmethods__ = frozenset()  # its calls would go to the inner store: none made here
        app = Celery("wiring", broker="memory://", set_as_current=False)

        assert Endpoint(inner).store_for(task_on(app, wrapper_class(), "wiring.wrapped")) is inner
        assert Endpoint(inner.url).store_for(task_on(app, wrapper_class(), "wiring.wrapped_by_url")).url == inner.url
        elsewhere = type("Wrapper", (Store,), {"url": f"sqlite:///{tmp_path / 'other.db'}"})
        elsewhere.__abstractmethods__ = frozenset()
        with pytest.raises(ConfigurationError, match=r"other\.db"):
            Endpoint(inner).store_for(task_on(app, elsewhere(), "wiring.elsewhere"))
        inner.close()

    def test_two_memory_stores_are_two_places_whatever_their_url(self) -> None:
        from celery import Celery

        from idemtasks import IdempotentTask
        from idemtasks.errors import ConfigurationError
        from idemtasks.http.endpoint import Endpoint

        app = Celery("wiring", broker="memory://", set_as_current=False)

        @app.task(shared=False, base=IdempotentTask, store_url=MemoryStore(), name="wiring.own_memory")
        def t() -> None:
            return None

        with pytest.raises(ConfigurationError, match="instance"):
            Endpoint(MemoryStore()).store_for(t)
        assert Endpoint(t.store).store_for(t) is t.store


class EdgeClock(MemoryStore):
    """A memory store whose clock crosses ACCEPT_WINDOW between two readings of one request."""

    def __init__(self) -> None:
        super().__init__("memory://edge")
        self.readings: list[float] = []

    def now(self) -> float:
        created = min(op.created_at for op in self._records.values())
        self.readings.append(created + ACCEPT_WINDOW + (-0.01 if not self.readings else 1.0))
        return self.readings[-1]


def test_a_retry_at_the_end_of_the_accept_window_is_answered_as_submit_decided() -> None:
    """The first request recorded its operation and died before publishing. A retry just before ACCEPT_WINDOW ran
    out is not published again (the first may still be at it): it must hear 409 "in use", decided on the same
    reading of the clock. Read again a moment later, past the window, it would hear a 202 replay, and no message
    would be on its way."""
    from celery import Celery

    from idemtasks import IdempotentTask
    from idemtasks.http.endpoint import Endpoint, IncomingRequest

    store = EdgeClock()
    app = Celery("edge", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="edge")
    published: list[str] = []

    @app.task(shared=False, base=IdempotentTask, store_url=store, name="edge.t")
    def t(amount: int) -> int:
        return amount

    def dies_before_publishing(op: Operation, *args: object, **kwargs: object) -> None:
        return None

    def publishes(op: Operation, *args: object, **kwargs: object) -> None:
        published.append(op.id)

    endpoint = Endpoint(store)
    req = IncomingRequest("POST", "/p", "/p", "", b'{"amount": 1}',
                          {"Idempotency-Key": "k", "Content-Type": "application/json"}, "alice")
    t.publish = dies_before_publishing
    assert endpoint.submit(req, t, (1,)).status == 202
    t.publish = publishes

    reply = endpoint.submit(req, t, (1,))

    assert (reply.status, published) == (409, []), (reply.status, reply.body, store.readings)
    assert len(store.readings) == 1


class ClockReadings(MemoryStore):
    def __init__(self) -> None:
        super().__init__("memory://readings")
        self.readings = 0

    def now(self) -> float:
        self.readings += 1
        return super().now()


def test_a_replay_of_an_operation_failed_before_any_claim_reads_no_clock() -> None:
    """Revoked before it ran, by an earlier release that left the record flagged as unpublished: a client's retry
    is answered with the failure, without a second round trip to read the store's clock."""
    from celery import Celery

    from idemtasks import IdempotentTask
    from idemtasks.http.endpoint import Endpoint, IncomingRequest

    store = ClockReadings()
    app = Celery("legacy", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="legacy")

    @app.task(shared=False, base=IdempotentTask, store_url=store, name="legacy.t")
    def t(amount: int) -> int:
        return amount

    t.publish = lambda *args, **kwargs: None
    endpoint = Endpoint(store)
    req = IncomingRequest("POST", "/p", "/p", "", b'{"amount": 1}',
                          {"Idempotency-Key": "k", "Content-Type": "application/json"}, "alice")
    assert endpoint.submit(req, t, (1,)).status == 202
    [(digest, op)] = store._records.items()
    store.finish(op.scope, op.key, op.id, op.fencing_token, Status.FAILED, error=ErrorInfo("Revoked", "r"), ttl=60)
    store._records[digest] = dataclasses.replace(store._records[digest], needs_publish=True)
    store.readings = 0

    reply = endpoint.submit(req, t, (1,))

    assert (reply.status, reply.body["status"], store.readings) == (200, "failed", 0), (reply.status, reply.body)


@pytest.mark.parametrize("scheduled", ["countdown", "eta"])
def test_retry_after_of_a_scheduled_submit_is_when_it_is_due_on_the_first_answer_and_on_replays(
        scheduled: str) -> None:
    """Through the endpoint as a view calls it: the first answer knows the delay exactly (on the store's clock), a
    replay and a status read count from this host's clock."""
    from datetime import timedelta

    from celery import Celery

    from idemtasks import IdempotentTask
    from idemtasks.http.endpoint import Endpoint, IncomingRequest

    store = MemoryStore()
    app = Celery("sched", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue=f"sched-{uuid.uuid4().hex}")

    @app.task(shared=False, base=IdempotentTask, store_url=store, name="sched.t")
    def t(amount: int) -> int:
        return amount

    endpoint = Endpoint(store)
    req = IncomingRequest("POST", "/p", "/p", "", b'{"amount": 1}',
                          {"Idempotency-Key": "k", "Content-Type": "application/json"}, "alice")
    options: dict[str, Any] = ({"countdown": 3600} if scheduled == "countdown"
                               else {"eta": datetime.now(timezone.utc) + timedelta(hours=1)})
    first = endpoint.submit(req, t, (1,), **options)
    assert first.status == 202 and int(first.headers["Retry-After"]) in (3599, 3600)
    replay = endpoint.submit(req, t, (1,), **options)
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert 3590 <= int(replay.headers["Retry-After"]) <= 3600
    status = endpoint.status(first.body["id"], "alice")
    assert status.status == 200 and 3590 <= int(status.headers["Retry-After"]) <= 3600
    # Without a schedule: the policy's second, on every answer.
    plain = IncomingRequest("POST", "/p", "/p", "", b'{"amount": 2}',
                            {"Idempotency-Key": "k2", "Content-Type": "application/json"}, "alice")
    assert endpoint.submit(plain, t, (2,)).headers["Retry-After"] == "1"


def test_a_raw_body_that_looks_like_a_form_stand_in_is_still_measured() -> None:
    """The stand-in is known by its type, not by its first bytes, which any client can send."""
    from idemtasks.http.endpoint import Endpoint, IncomingRequest

    raw = b"idemtasks-parsed-form:" + b"x" * 5_000
    headers = {"Idempotency-Key": "k", "Content-Type": "application/x-www-form-urlencoded"}  # chunked: no length
    reply = Endpoint(MemoryStore(), policy=HttpPolicy(max_body_bytes=100)).prepare(
        IncomingRequest("POST", "/p", "/p", "", raw, headers, "alice"))
    assert isinstance(reply, Reply) and reply.status == 413
