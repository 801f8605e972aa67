"""The HTTP rules through the Flask extension and Flask's test client."""

from __future__ import annotations

import importlib
import io
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import flask
import pytest
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

import idemtasks.contrib.flask
from idemtasks.contrib.flask import Idempotency
from idemtasks.http.core import HttpPolicy
from idemtasks.stores.memory import MemoryStore
from tests.http_rules import (
    BACKENDS,
    CONFLICT,
    OPTIONAL,
    Api,
    HttpRules,
    Resp,
    acct,
    lower,
    pay_body,
    paying_worker,
    store_for,
)


def tenant(headers: Mapping[str, str]) -> str | None:
    """A custom caller identity: the tenant header instead of the Bearer token. Asked for in lower case, though
    Werkzeug spells it X-Tenant: a lookup that missed would put every tenant in the anonymous scope."""
    return headers.get("x-tenant")


@dataclass
class Served:
    api: Api  # the default extension, status route at /operations/<id>
    app: flask.Flask
    idem: Idempotency
    v1: Api  # another extension mounted with status_prefix="/v1" and the tenant as caller


def sender(app: flask.Flask) -> Callable[[str, str, bytes, dict[str, str]], Resp]:
    client = app.test_client()

    def send(method: str, path: str, body: bytes, headers: dict[str, str]) -> Resp:
        r = client.open(path, method=method, data=body, headers=headers)
        return Resp(r.status_code, lower(dict(r.headers.items())), r.get_data())

    return send


@pytest.fixture(scope="module", params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with store_for(request, tmp_path_factory) as store, paying_worker(store) as (task, runs):
        app = flask.Flask(__name__)
        app.config["PROPAGATE_EXCEPTIONS"] = True  # a view's exception reaches the test, as with the other clients
        idem = Idempotency(app, store=store)

        @app.post("/payments")
        def payments() -> flask.Response:
            # The key is checked before the view's own validation, so a bad key is never hidden by a bad body.
            problem = idem.check()
            if problem is not None:
                return problem
            args = pay_body(flask.request.get_json(silent=True))
            if args is None:
                return flask.Response(status=400)
            return idem.submit(task, args)

        @app.post("/tips")
        def tips() -> flask.Response:
            return idem.submit(task, pay_body(flask.request.get_json()), policy=OPTIONAL)

        @app.post("/strict")
        def strict() -> flask.Response:
            return idem.submit(task, pay_body(flask.request.get_json()), policy=CONFLICT)

        @app.post("/forms")
        def forms() -> flask.Response:
            # Reads its form (and its upload) before submitting, which leaves no raw body to read.
            form = flask.request.form
            flask.request.files["receipt"].read()
            problem = idem.check()
            if problem is not None:
                return problem
            return idem.submit(task, (form["account"], int(form["amount"])))

        @app.post("/streamed")
        def streamed() -> flask.Response:
            # Reads its raw body as a stream before submitting, which leaves nothing to fingerprint.
            return idem.submit(task, pay_body(json.loads(flask.request.stream.read())))

        v1_app = flask.Flask(__name__)
        v1 = Idempotency(store=store, caller=tenant, status_prefix="/v1/")
        v1.init_app(v1_app)

        @v1_app.post("/v1/payments")
        def v1_payments() -> flask.Response:
            return v1.submit(task, pay_body(flask.request.get_json()))

        yield Served(Api(sender(app), store, runs), app, idem, Api(sender(v1_app), store, runs))


@pytest.fixture
def api(served: Served) -> Api:
    return served.api


@pytest.fixture
def tenants(served: Served) -> Api:
    return served.v1


class TestFlask(HttpRules):
    adapter = idemtasks.contrib.flask

    def test_init_app_registers_the_extension_and_its_status_route(self, served: Served) -> None:
        assert served.app.extensions["idemtasks"] is served.idem
        assert "idemtasks" in served.app.blueprints
        rules = {r.rule: r.endpoint for r in served.app.url_map.iter_rules()}
        assert rules["/operations/<operation_id>"] == "idemtasks.operation"

    def test_status_prefix_moves_the_status_route_and_the_location(self, served: Served) -> None:
        a = acct()
        r = served.v1.send("POST", "/v1/payments", b'{"account": "%s", "amount": 3}' % a.encode(),
                           {"Idempotency-Key": "k-" + a, "X-Tenant": "acme", "Content-Type": "application/json"})
        assert r.status_code == 202
        assert r.headers["location"] == f"/v1/operations/{r.json()['id']}"
        done = served.v1.send("GET", r.headers["location"], b"", {"X-Tenant": "acme"})
        assert done.status_code == 200
        assert served.v1.send("GET", f"/operations/{r.json()['id']}", b"", {"X-Tenant": "acme"}).status_code == 404


    def test_a_repeated_key_header_is_refused_not_read_as_one_joined_key(self, served: Served) -> None:
        """Werkzeug, like a WSGI server, joins the two headers into "k1, k2"."""
        a = acct()
        r = served.app.test_client().post(
            "/payments", data=json.dumps({"account": a, "amount": 5}),
            headers=[("Authorization", "Bearer alice"), ("Idempotency-Key", "k1-" + a), ("Idempotency-Key", "k2-" + a),
                     ("Content-Type", "application/json")])
        assert r.status_code == 400 and r.get_json()["code"] == "idempotency_key_invalid"
        assert served.api.runs[a] == 0

    def test_under_a_script_name_the_location_leads_to_the_status_route(self, served: Served) -> None:
        """A WSGI server mounting the application at /api hands it SCRIPT_NAME=/api: Location must start with it."""
        client = Client(DispatcherMiddleware(NotFound(), {"/api": served.app.wsgi_app}))
        a = acct()
        r = client.post("/api/payments", data=json.dumps({"account": a, "amount": 5}),
                        headers={"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a,
                                 "Content-Type": "application/json"})
        assert r.status_code == 202 and r.headers["Location"] == f"/api/operations/{r.get_json()['id']}"
        assert client.get(r.headers["Location"], headers={"Authorization": "Bearer alice"}).status_code == 200
        served.api.final(r.headers["Location"].removeprefix("/api"))


@pytest.mark.parametrize(("policy", "limit"), [(None, 1024 * 1024), (HttpPolicy(max_body_bytes=100), 100)])
def test_a_body_declared_over_the_limit_is_refused_without_being_read(policy: HttpPolicy | None, limit: int) -> None:
    """The 413 goes by Content-Length, before any of the body is buffered; the policy given to submit() is the one."""
    app = flask.Flask(__name__)
    idem = Idempotency(app, store=MemoryStore())
    body = io.BytesIO(b"x" * (limit + 1))
    with app.test_request_context("/payments", method="POST", input_stream=body, content_length=limit + 1,
                                  headers={"Idempotency-Key": "k", "Content-Type": "application/json"}):
        r = idem.submit(object(), policy=policy)
    assert r.status_code == 413 and r.get_json()["code"] == "payload_too_large"
    assert body.tell() == 0  # not a byte of it read


def test_without_flask_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flask", None)
    monkeypatch.delitem(sys.modules, "idemtasks.contrib.flask")
    with pytest.raises(ImportError, match=r"pip install idemtasks\[flask\]"):
        importlib.import_module("idemtasks.contrib.flask")
