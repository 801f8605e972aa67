"""The HTTP rules every adapter must keep, written once and run through each framework's own test client.

An adapter's test module provides an ``api`` fixture (an :class:`Api`) serving, on a real store with an embedded
worker: ``POST /payments`` (key required; the view rejects a non-integer amount before submitting),
``POST /tips`` (key optional), ``POST /strict`` (mismatch answered 409), ``POST /forms`` (reads its multipart form
before submitting), ``POST /streamed`` (reads its raw body as a stream before submitting) and the status route. Test
clients re-raise a view's exception rather than answer 500.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from idemtasks import ConfigurationError, IdempotentTask
from idemtasks.http.core import HttpPolicy, caller_scope, request_fingerprint
from idemtasks.stores.base import Store
from tests.conftest import drop, make_store


@dataclass
class Resp:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@dataclass
class Api:
    send: Callable[[str, str, bytes, dict[str, str]], Resp]  # method, path, body, headers
    store: Store
    runs: Counter[str] = field(default_factory=Counter)

    def post(self, body: Any, key: str | None = None, *, token: str = "alice", path: str = "/payments",
             header: str = "Idempotency-Key", authorization: str | None = None) -> Resp:
        headers = {"Authorization": authorization or f"Bearer {token}", "Content-Type": "application/json"}
        if key is not None:
            headers[header] = key
        return self.send("POST", path, json.dumps(body).encode(), headers)

    def post_form(self, fields: dict[str, str], receipt: bytes, key: str, *, boundary: str) -> Resp:
        """A multipart form to ``/forms``, whose view reads its form before submitting, cut by ``boundary`` (which
        browsers and HTTP libraries draw afresh for every request)."""
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="receipt"; filename="receipt.txt"\r\n'
                     "Content-Type: text/plain\r\n\r\n".encode() + receipt + b"\r\n")
        headers = {"Authorization": "Bearer alice", "Idempotency-Key": key,
                   "Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.send("POST", "/forms", b"".join(parts) + f"--{boundary}--\r\n".encode(), headers)

    def get(self, location: str, token: str = "alice") -> Resp:
        return self.send("GET", location, b"", {"Authorization": f"Bearer {token}"})

    def final(self, location: str, token: str = "alice") -> Resp:
        return self.final_with(location, {"Authorization": f"Bearer {token}"})

    def final_with(self, location: str, headers: dict[str, str]) -> Resp:
        """Poll the status route with ``headers`` until the operation is final."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = self.send("GET", location, b"", headers)
            if r.json()["status"] in ("succeeded", "failed"):
                return r
            time.sleep(0.05)
        raise AssertionError(f"{location} never finished")


def basic(user: str, password: str = "") -> str:
    """An ``Authorization`` header with Basic credentials (Stripe sends its secret key as the user name)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pay_body(request_json: Any) -> tuple[str, int] | None:
    """The views' own validation: ``None`` means 400 before anything is submitted."""
    if not isinstance(request_json, dict) or not isinstance(request_json.get("amount"), int):
        return None
    return str(request_json["account"]), int(request_json["amount"])


def pay(h: Counter[str], account: str, amount: int) -> dict[str, Any]:
    """The body behind every adapter's test task."""
    h[account] += 1
    if amount > 1_000_000:
        raise ValueError("declined")
    return {"account": account, "amount": amount}


OPTIONAL = HttpPolicy(required=False)
#: Where alice's keys for ``POST /payments`` live in the store.
PAYMENTS_SCOPE = caller_scope("alice", "POST", "/payments")
CONFLICT = HttpPolicy(mismatch_status=409)


def acct() -> str:
    return f"acct-{uuid.uuid4().hex[:10]}"


class HttpRules:
    #: The adapter module under test (its ``upload_digest`` is counted below).
    adapter: ModuleType

    def test_a_form_view_that_checks_before_submitting_reads_its_upload_once(
            self, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
        """The ``/forms`` view calls check() and then submit(): each describes the parsed form, and the second
        must reuse the first's description rather than read the upload again (it may be large)."""
        reads: list[str] = []
        digest = self.adapter.upload_digest

        def counted(file: Any) -> str:
            reads.append("read")
            return str(digest(file))

        monkeypatch.setattr(self.adapter, "upload_digest", counted)
        a = acct()
        r = api.post_form({"account": a, "amount": "5"}, b"paid", "k-" + a, boundary="b-" + a)
        assert r.status_code == 202 and reads == ["read"]
        api.final(r.headers["location"])

    def test_a_form_posted_again_under_a_new_boundary_is_a_replay(self, api: Api) -> None:
        a = acct()
        first = api.post_form({"account": a, "amount": "5"}, b"paid", "k-" + a, boundary="first-" + a)
        assert first.status_code == 202
        api.final(first.headers["location"])
        again = api.post_form({"account": a, "amount": "5"}, b"paid", "k-" + a, boundary="second-" + a)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"] and again.json()["result"] == {"account": a, "amount": 5}
        assert api.runs[a] == 1

    def test_a_form_read_before_submitting_is_still_told_apart_by_its_content(self, api: Api) -> None:
        """The view reads its form first, which consumes the raw body: another field or another file under the
        same key must still be a mismatch, never a replay of the first form."""
        a = acct()
        first = api.post_form({"account": a, "amount": "5"}, b"paid", "k-" + a, boundary="b-" + a)
        other_file = api.post_form({"account": a, "amount": "5"}, b"forged", "k-" + a, boundary="b-" + a)
        other_field = api.post_form({"account": a, "amount": "6"}, b"paid", "k-" + a, boundary="b-" + a)
        assert first.status_code == 202
        assert [r.status_code for r in (other_file, other_field)] == [422, 422]
        assert {r.json()["code"] for r in (other_file, other_field)} == {"idempotency_key_mismatch"}
        api.final(first.headers["location"])
        assert api.runs[a] == 1

    def test_a_body_read_as_a_stream_before_submitting_fails_loudly_rather_than_replay(self, api: Api) -> None:
        """``/streamed`` reads its raw body as a stream, which leaves nothing to fingerprint: were it accepted, the
        same key with another payload would replay the first. A programming error, so the request fails (a 500)."""
        a = acct()
        for amount in (5, 6):
            with pytest.raises(ConfigurationError, match=r"read the body after submit\(\)/check\(\)"):
                api.post({"account": a, "amount": amount}, "k-" + a, path="/streamed")
        assert api.store.get(caller_scope("alice", "POST", "/streamed"), "k-" + a) is None
        assert api.runs[a] == 0

    def test_first_request_is_accepted_with_a_location(self, api: Api) -> None:
        r = api.post({"account": (a := acct()), "amount": 5}, "k-" + a)
        assert r.status_code == 202
        body = r.json()
        assert r.headers["location"] == f"/operations/{body['id']}"
        assert set(body) >= {"id", "status", "result", "error", "created_at", "updated_at", "expires_at", "attempts"}
        done = api.final(r.headers["location"]).json()
        assert done["status"] == "succeeded" and done["result"] == {"account": a, "amount": 5}
        assert api.runs[a] == 1

    def test_replay_while_the_operation_is_pending_is_202_marked_replayed(self, api: Api) -> None:
        a = acct()
        body = json.dumps({"account": a, "amount": 5}).encode()
        headers = {"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a, "Content-Type": "application/json"}
        # A first request that was accepted and published; its worker has not picked it up yet.
        fp = request_fingerprint("POST", "/payments", "", body, headers, HttpPolicy())
        first = api.store.create(PAYMENTS_SCOPE, "k-" + a, "x", fp, ttl=3600).operation
        api.store.mark_published(first)
        api.store.get(PAYMENTS_SCOPE, "k-" + a)  # a thread's read waits for its own pipelined flag to land
        r = api.send("POST", "/payments", body, headers)
        assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true"
        assert r.json()["id"] == first.id and r.json()["status"] == "pending"
        assert r.headers["location"] == f"/operations/{first.id}" and r.headers["retry-after"] == "1"
        assert api.runs[a] == 0  # a replay publishes nothing

    def test_replay_returns_the_same_operation_marked_replayed(self, api: Api) -> None:
        a = acct()
        first = api.post({"account": a, "amount": 5}, "k-" + a)
        api.final(first.headers["location"])
        again = api.post({"account": a, "amount": 5}, "k-" + a)
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["result"] == {"account": a, "amount": 5}
        assert api.runs[a] == 1

    def test_replay_of_a_failed_operation_carries_the_error(self, api: Api) -> None:
        a = acct()
        first = api.post({"account": a, "amount": 2_000_000}, "k-" + a)
        api.final(first.headers["location"])
        again = api.post({"account": a, "amount": 2_000_000}, "k-" + a)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["status"] == "failed"
        assert again.json()["error"] == {"type": "ValueError", "message": "declined"}
        assert api.runs[a] == 1

    def test_missing_key_is_a_400_problem(self, api: Api) -> None:
        r = api.post({"account": acct(), "amount": 5})
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "idempotency_key_required"
        assert r.json()["status"] == 400 and r.json()["type"].startswith("https://")

    def test_optional_endpoint_runs_without_a_key(self, api: Api) -> None:
        r = api.post({"account": (a := acct()), "amount": 1}, path="/tips")
        assert r.status_code == 202
        api.final(r.headers["location"])
        assert api.runs[a] == 1

    @pytest.mark.parametrize("bad", [b"", b"x" * 256, "na\u00efve".encode(), b"k1, k2"])
    def test_invalid_key_is_a_400_problem(self, api: Api, bad: bytes) -> None:
        """Among them a key with a comma: a WSGI server hands two key headers over joined so."""
        headers = {"Idempotency-Key": bad.decode("latin-1"), "Content-Type": "application/json"}
        r = api.send("POST", "/payments", json.dumps({"account": acct(), "amount": 5}).encode(), headers)
        assert r.status_code == 400 and r.json()["code"] == "idempotency_key_invalid"

    def test_same_key_with_another_body_is_a_422_mismatch(self, api: Api) -> None:
        a = acct()
        first = api.post({"account": a, "amount": 5}, "k-" + a)
        r = api.post({"account": a, "amount": 6}, "k-" + a)
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_mismatch"
        assert r.headers["content-type"].startswith("application/problem+json")
        assert api.final(first.headers["location"]).json()["result"] == {"account": a, "amount": 5}
        assert api.runs[a] == 1

    def test_a_retry_that_serializes_its_body_again_is_a_replay(self, api: Api) -> None:
        """Another member order and spacing is the same request: answered 422, a client that gave up on its key
        and sent a fresh one would pay twice."""
        a = acct()
        headers = {"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a, "Content-Type": "application/json"}
        first = api.send("POST", "/payments", json.dumps({"account": a, "amount": 5}).encode(), headers)
        api.final(first.headers["location"])
        again = api.send("POST", "/payments", json.dumps({"amount": 5, "account": a}, indent=2).encode(), headers)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        other = api.send("POST", "/payments", json.dumps({"amount": 6, "account": a}).encode(), headers)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_mismatch"
        assert api.runs[a] == 1

    def test_an_operation_accepted_before_json_bodies_were_canonical_replays_the_same_bytes(self, api: Api) -> None:
        """An earlier version (or a node not yet upgraded, in a rolling upgrade) hashed a JSON body as its bytes: a
        retry of those very bytes must be a replay for as long as the operation lives, not a 422 that could send the
        client to a fresh key and a second payment. Another body is still a mismatch."""
        a = acct()
        body = json.dumps({"account": a, "amount": 5}).encode()  # not canonical: spaces after ":" and ","
        headers = {"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a, "Content-Type": "application/json"}
        earlier = request_fingerprint("POST", "/payments", "", body, headers, HttpPolicy(), raw_json=True)
        assert earlier != request_fingerprint("POST", "/payments", "", body, headers, HttpPolicy())
        first = api.store.create(PAYMENTS_SCOPE, "k-" + a, "x", earlier, ttl=3600).operation
        api.store.mark_published(first)
        r = api.send("POST", "/payments", body, headers)
        assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true" and r.json()["id"] == first.id
        other = api.send("POST", "/payments", json.dumps({"account": a, "amount": 6}).encode(), headers)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_mismatch"
        assert api.runs[a] == 0

    def test_mismatch_status_is_configurable(self, api: Api) -> None:
        a = acct()
        api.post({"account": a, "amount": 5}, "k-" + a, path="/strict")
        r = api.post({"account": a, "amount": 6}, "k-" + a, path="/strict")
        assert r.status_code == 409 and r.json()["code"] == "idempotency_key_mismatch"

    def test_alternative_header_name_is_accepted(self, api: Api) -> None:
        a = acct()
        first = api.post({"account": a, "amount": 5}, "k-" + a, header="X-Idempotency-Key")
        again = api.post({"account": a, "amount": 5}, "k-" + a)
        assert first.status_code == 202 and again.json()["id"] == first.json()["id"]
        api.final(first.headers["location"])
        assert api.runs[a] == 1

    def test_two_callers_with_one_key_get_two_operations_and_cannot_see_each_other(self, api: Api) -> None:
        a = acct()
        mine = api.post({"account": a, "amount": 5}, "shared-" + a, token="alice")
        theirs = api.post({"account": a, "amount": 5}, "shared-" + a, token="bob")
        assert mine.json()["id"] != theirs.json()["id"]
        assert api.get(mine.headers["location"], token="bob").status_code == 404
        assert api.get(mine.headers["location"], token="alice").status_code == 200
        api.final(mine.headers["location"], token="alice")
        api.final(theirs.headers["location"], token="bob")
        assert api.runs[a] == 2

    def test_two_basic_users_with_one_key_get_two_operations_and_cannot_see_each_other(self, api: Api) -> None:
        a = acct()
        alice, bob = basic("sk_alice_" + a), basic("sk_bob_" + a)
        mine = api.post({"account": a, "amount": 5}, "shared-" + a, authorization=alice)
        theirs = api.post({"account": a, "amount": 5}, "shared-" + a, authorization=bob)
        assert mine.status_code == theirs.status_code == 202 and mine.json()["id"] != theirs.json()["id"]
        assert api.send("GET", mine.headers["location"], b"", {"Authorization": bob}).status_code == 404
        assert api.final_with(mine.headers["location"], {"Authorization": alice}).json()["status"] == "succeeded"
        api.final_with(theirs.headers["location"], {"Authorization": bob})
        again = api.post({"account": a, "amount": 5}, "shared-" + a, authorization=alice)
        assert again.json()["id"] == mine.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert api.runs[a] == 2

    def test_a_custom_caller_decides_who_owns_an_operation(self, tenants: Api) -> None:
        """``tenants`` serves ``POST /v1/payments`` with a caller reading ``X-Tenant``, asked for in another case
        than the framework spells it: a lookup that missed would put every tenant in one anonymous scope."""
        a = acct()
        headers = {"Idempotency-Key": "k-" + a, "X-Tenant": "acme", "Content-Type": "application/json"}
        body = b'{"account": "%s", "amount": 3}' % a.encode()
        first = tenants.send("POST", "/v1/payments", body, {**headers, "Authorization": "Bearer alice"})
        # The Bearer token plays no part: the same tenant replays, another tenant gets its own operation.
        again = tenants.send("POST", "/v1/payments", body, {**headers, "Authorization": "Bearer bob"})
        other = tenants.send("POST", "/v1/payments", body, {**headers, "X-Tenant": "globex"})
        assert first.status_code == other.status_code == 202
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert other.json()["id"] != first.json()["id"]
        location = first.headers["location"]
        assert location == f"/v1/operations/{first.json()['id']}"
        assert tenants.send("GET", location, b"", {"X-Tenant": "globex"}).status_code == 404
        assert tenants.final_with(location, {"X-Tenant": "acme"}).json()["status"] == "succeeded"
        tenants.final_with(other.headers["location"], {"X-Tenant": "globex"})
        assert tenants.runs[a] == 2

    def test_an_authorization_scheme_the_default_caller_cannot_read_is_refused_not_made_anonymous(
            self, api: Api) -> None:
        """Anonymous is one scope for everybody: a caller the default identity cannot name would replay another
        tenant's operation. The application must pass ``caller=`` (a 500 until it does)."""
        a = acct()
        with pytest.raises(ConfigurationError, match="caller="):
            api.post({"account": a, "amount": 5}, "k-" + a, authorization='Digest username="alice"')
        with pytest.raises(ConfigurationError, match="caller="):
            api.send("GET", "/operations/" + "0" * 56, b"", {"Authorization": "HMAC alice:signature"})
        assert api.store.get(caller_scope(None, "POST", "/payments"), "k-" + a) is None
        assert api.runs[a] == 0

    @pytest.mark.parametrize("authorization", ["Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(),
                                               "Basic " + base64.b64encode(b":password").decode(), "Bearer "])
    def test_unreadable_credentials_are_a_400_not_anonymous(self, api: Api, authorization: str) -> None:
        a = acct()
        r = api.post({"account": a, "amount": 5}, "k-" + a, authorization=authorization)
        assert r.status_code == 400 and r.json()["code"] == "credentials_invalid"
        status = api.send("GET", "/operations/" + "0" * 56, b"", {"Authorization": authorization})
        assert status.status_code == 400 and status.json()["code"] == "credentials_invalid"
        assert api.store.get(caller_scope(None, "POST", "/payments"), "k-" + a) is None

    def test_no_reply_may_be_kept_by_a_cache(self, api: Api) -> None:
        """A kept "pending" would be served to a polling client for ever; a shared cache could serve one caller's
        result to another."""
        a = acct()
        first = api.post({"account": a, "amount": 7}, "k-" + a)
        replies = [first, api.get(first.headers["location"]), api.post({"account": a, "amount": 7}, "k-" + a),
                   api.post({"account": a, "amount": 7}), api.get("/operations/nope")]
        replies.append(api.final(first.headers["location"]))
        assert [r.status_code for r in replies[-3:]] == [400, 404, 200]
        assert all(r.headers["cache-control"] == "no-store" for r in replies), [r.headers for r in replies]

    def test_the_status_route_answers_head_as_it_answers_get(self, api: Api) -> None:
        """RFC 9110: HEAD wherever GET, with the same status and headers and no content."""
        a = acct()
        location = api.post({"account": a, "amount": 5}, "k-" + a).headers["location"]
        done = api.final(location)
        head = api.send("HEAD", location, b"", {"Authorization": "Bearer alice"})
        assert (head.status_code, head.body, head.headers["cache-control"]) == (200, b"", "no-store")
        assert head.headers["content-type"] == done.headers["content-type"]
        other = api.send("HEAD", location, b"", {"Authorization": "Bearer mallory"})
        assert other.status_code == 404 and other.body == b""

    def test_status_of_unknown_operation_is_404(self, api: Api) -> None:
        r = api.get("/operations/" + "0" * 56)
        assert r.status_code == 404 and r.json()["code"] == "operation_not_found"

    def test_unfinished_operations_carry_retry_after_and_finished_ones_do_not(self, api: Api) -> None:
        a = acct()
        r = api.post({"account": a, "amount": 5}, "k-" + a)
        assert r.headers["retry-after"] == "1"
        done = api.final(r.headers["location"])
        assert done.status_code == 200 and "retry-after" not in done.headers

    def test_rejected_request_stores_nothing_and_can_be_retried(self, api: Api) -> None:
        a = acct()
        bad = api.post({"account": a, "amount": "five"}, "k-" + a)
        assert bad.status_code == 400
        assert api.store.get(PAYMENTS_SCOPE, "k-" + a) is None
        good = api.post({"account": a, "amount": 5}, "k-" + a)
        assert good.status_code == 202 and "idempotent-replayed" not in good.headers
        api.final(good.headers["location"])
        assert api.runs[a] == 1

    def test_duplicate_while_the_first_is_still_being_accepted_is_a_409(self, api: Api) -> None:
        a = acct()
        body = json.dumps({"account": a, "amount": 5}).encode()
        headers = {"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a, "Content-Type": "application/json"}
        # The first request recorded its operation and has not yet published its message.
        fp = request_fingerprint("POST", "/payments", "", body, headers, HttpPolicy())
        api.store.create(PAYMENTS_SCOPE, "k-" + a, "x", fp, ttl=3600)
        r = api.send("POST", "/payments", body, headers)
        assert r.status_code == 409
        assert r.json()["code"] == "idempotency_key_in_use" and r.headers["retry-after"] == "1"
        assert api.runs[a] == 0


BACKENDS = ["redis", "postgres", "sqlite"]


@contextlib.contextmanager
def paying_worker(store: Store) -> Iterator[tuple[Any, Counter[str]]]:
    """A Celery app with one idempotent ``pay`` task on ``store``, served by an embedded worker."""
    app = Celery(f"web{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_ignore_result=True, idemtasks_busy_countdown=0.2, task_default_queue=app.main)
    runs: Counter[str] = Counter()

    @app.task(shared=False, base=IdempotentTask, bind=True, store_url=store, name=f"{app.main}.pay")
    def task(self: IdempotentTask, account: str, amount: int) -> dict[str, Any]:
        return pay(runs, account, amount)

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        yield task, runs


@contextlib.contextmanager
def store_for(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = make_store(request.param, tmp_path_factory.mktemp("store"))
    try:
        yield store
    finally:
        drop(store)
