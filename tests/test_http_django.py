"""The HTTP rules through the Django adapter and Django's test client."""

from __future__ import annotations

import importlib
import io
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="tests.apps.django_urls", SECRET_KEY="tests",
        MIDDLEWARE=[], INSTALLED_APPS=[], DATABASES={}, USE_TZ=True,
    )
    import django

    django.setup()

from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.urls import clear_url_caches, include, path, resolve

import idemtasks.contrib.django
from idemtasks.contrib.django import Idempotency
from idemtasks.http.core import HttpPolicy
from idemtasks.stores.memory import MemoryStore
from tests.apps import django_urls
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
    Django spells it X-Tenant: a lookup that missed would put every tenant in the anonymous scope."""
    return headers.get("x-tenant")


@dataclass
class Served:
    api: Api  # status route at /operations/<id>; the same client also serves /v1
    idem: Idempotency
    v1: Idempotency  # mounted under v1/ with status_prefix="/v1" and the tenant as caller
    mounted: Client  # requests to the same project served under SCRIPT_NAME=/api


@pytest.fixture(scope="module", params=BACKENDS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with store_for(request, tmp_path_factory) as store, paying_worker(store) as (task, runs):
        idem = Idempotency(store=store)
        v1 = Idempotency(store=store, caller=tenant, status_prefix="/v1")

        def payments(request: HttpRequest) -> HttpResponse:
            # The key is checked before the view's own validation, so a bad key is never hidden by a bad body.
            problem = idem.check(request)
            if problem is not None:
                return problem
            args = pay_body(json.loads(request.body or b"null"))
            if args is None:
                return HttpResponse(status=400)
            return idem.submit(request, task, args)

        def tips(request: HttpRequest) -> HttpResponse:
            return idem.submit(request, task, pay_body(json.loads(request.body)), policy=OPTIONAL)

        def strict(request: HttpRequest) -> HttpResponse:
            return idem.submit(request, task, pay_body(json.loads(request.body)), policy=CONFLICT)

        def forms(request: HttpRequest) -> HttpResponse:
            # Reads its form (and its upload) before submitting, which leaves no raw body to read.
            request.FILES["receipt"].read()
            problem = idem.check(request)
            if problem is not None:
                return problem
            return idem.submit(request, task, (request.POST["account"], int(request.POST["amount"])))

        def streamed(request: HttpRequest) -> HttpResponse:
            # Reads its raw body as a stream before submitting, which leaves nothing to fingerprint.
            return idem.submit(request, task, pay_body(json.loads(request.read())))

        def v1_payments(request: HttpRequest) -> HttpResponse:
            return v1.submit(request, task, pay_body(json.loads(request.body)))

        django_urls.urlpatterns[:] = [
            path("payments", payments), path("tips", tips), path("strict", strict), path("forms", forms),
            path("streamed", streamed),
            path("", include(idem.urls())),
            path("v1/payments", v1_payments), path("v1/", include(v1.urls())),
        ]
        clear_url_caches()
        client = Client()
        mounted = Client(SCRIPT_NAME="/api")  # a WSGI server mounting the project at /api

        def send(method: str, path_: str, body: bytes, headers: dict[str, str]) -> Resp:
            if method == "GET":
                r = client.get(path_, headers=headers)
            else:
                r = client.generic(method, path_, data=body, content_type=headers.get("Content-Type", ""),
                                   headers={k: v for k, v in headers.items() if k != "Content-Type"})
            return Resp(r.status_code, lower(dict(r.headers.items())), r.content)

        yield Served(Api(send, store, runs), idem, v1, mounted)
        django_urls.urlpatterns.clear()
        clear_url_caches()


@pytest.fixture
def api(served: Served) -> Api:
    return served.api


@pytest.fixture
def tenants(served: Served) -> Api:
    return served.api  # the same client serves /v1


class TestDjango(HttpRules):
    adapter = idemtasks.contrib.django

    def test_urls_mount_the_status_view(self, served: Served) -> None:
        match = resolve("/operations/abc")
        assert match.url_name == "idemtasks-operation" and match.kwargs == {"operation_id": "abc"}

    def test_status_route_answers_get_and_head_only(self, served: Served) -> None:
        r = served.api.send("POST", "/operations/abc", b"", {"Authorization": "Bearer alice"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"

    def test_status_prefix_moves_the_location_to_where_the_urls_are_included(self, served: Served) -> None:
        a = acct()
        r = served.api.send("POST", "/v1/payments", b'{"account": "%s", "amount": 3}' % a.encode(),
                            {"Idempotency-Key": "k-" + a, "X-Tenant": "acme", "Content-Type": "application/json"})
        assert r.status_code == 202
        assert r.headers["location"] == f"/v1/operations/{r.json()['id']}"
        assert served.api.send("GET", r.headers["location"], b"", {"X-Tenant": "acme"}).status_code == 200

    def test_the_route_template_scopes_keys_when_the_view_is_resolved(self, served: Served) -> None:
        a = acct()
        r = served.api.post({"account": a, "amount": 5}, "k-" + a)
        op = served.api.store.get_by_id(r.json()["id"])
        assert op is not None and op.scope.endswith("|POST /payments")


    def test_under_a_script_name_the_location_leads_to_the_status_route(self, served: Served) -> None:
        """A WSGI server mounting the project at /api hands it SCRIPT_NAME=/api and the rest of the path as
        PATH_INFO: Location must start with /api."""
        a = acct()
        auth = {"Authorization": "Bearer alice", "Idempotency-Key": "k-" + a}
        r = served.mounted.post("/payments", data={"account": a, "amount": 5}, content_type="application/json",
                                headers=auth)
        assert r.status_code == 202 and r["Location"] == f"/api/operations/{r.json()['id']}"
        path_info = r["Location"].removeprefix("/api")
        assert served.mounted.get(path_info, headers={"Authorization": "Bearer alice"}).status_code == 200
        served.api.final(path_info)


@pytest.mark.parametrize(("policy", "limit"), [(None, 1024 * 1024), (HttpPolicy(max_body_bytes=100), 100)])
def test_a_body_declared_over_the_limit_is_refused_without_being_read(policy: HttpPolicy | None, limit: int) -> None:
    """The 413 goes by Content-Length, before any of the body is buffered; the policy given to submit() is the one."""
    data = b"x" * (limit + 1)
    body = io.BytesIO(data)
    request = RequestFactory().generic("POST", "/payments", data, content_type="application/json",
                                       headers={"Idempotency-Key": "k"}, **{"wsgi.input": body})
    r = Idempotency(store=MemoryStore()).submit(request, object(), policy=policy)
    assert r.status_code == 413 and json.loads(r.content)["code"] == "payload_too_large"
    assert body.tell() == 0  # not a byte of it read


def test_without_django_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django.http", None)
    monkeypatch.delitem(sys.modules, "idemtasks.contrib.django")
    with pytest.raises(ImportError, match=r"pip install idemtasks\[django\]"):
        importlib.import_module("idemtasks.contrib.django")
