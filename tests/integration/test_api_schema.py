"""The API keeps its OpenAPI contract, for inputs nobody wrote by hand (schemathesis).

Every operation that the gateway's ``/openapi.json`` lists, whatever routes it has by
then, gets generated requests: the document's examples, valid ones and invalid ones.
With the admin token:

* no answer is a 5xx (``not_a_server_error``);
* every answer fits the document: its body matches the schema documented for its status
  (``response_schema_conformance``), with the documented media type
  (``content_type_conformance``), and its status is one the document lists
  (``status_code_conformance``);
* every error is JSON in the API's shape, ``{"error", "message"}``;
* a refusal (4xx) leaves no sandbox behind.

An id in the path is, for about half the requests, a live one (the run's sandbox, or the
first of its forwards, tokens, ... that the collection above lists), so the handlers also
run past their "unknown sandbox" branch. Each sandbox a request creates is deleted at once.

Without the token and with a wrong one, every operation answers 401 / 403 and the API's
JSON error, whatever the input, and creates nothing.

Deterministic (a fixed seed per operation, no example database) and bounded (a few
requests per operation). Only loopback traffic: the gateway listens on 127.0.0.1 and no
case that names another address is sent. schemathesis's lazy pytest integration
(``from_fixture``, needed for a document that only a fixture's gateway serves) sets
``Node._nodeid``, which this pytest no longer has; so each operation runs as a Hypothesis
test of its own here, and the test reports every operation that failed, with a curl line.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from schemathesis import Case, CheckContext, GenerationMode, Response

from sandport.control.gateway import Gateway

pytestmark = pytest.mark.integration

#: Each operation's Hypothesis seed is this and its label (a fixed run: no example
#: database either).
SEED = 20_260_501
#: Requests per operation with the admin token (valid and invalid ones, besides the
#: document's examples). A valid POST /api/sandboxes makes a real sandbox (1-2 s).
MAX_EXAMPLES = 20
#: Without it: every answer is the same refusal.
MAX_EXAMPLES_UNAUTHENTICATED = 10
RUN = settings(
    database=None, deadline=None, print_blob=False,
    # Shrinking makes the report minimal; explain is off (it re-runs the failing request).
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)
#: Port specs (the API's docker-like ``publish`` syntax) tried besides the document's own
#: examples, so forwards of each kind get made: any free host port (no clash with tests
#: running in parallel), UDP, ranges, IPv6 (a proxy forward), several at once. Loopback
#: only: no forward listens on an outside address.
PORT_SPEC_EXAMPLES = [
    ["0:7"], ["127.0.0.1:0:7/udp"], ["0:7-9/tcp+udp"], ["[::1]:0:7"], ["[::1]:0:7/udp"],
    ["0:7", "0:7/udp", "127.0.0.1:0:5901"], ["0:7", "0:7"],
]
def errors_are_json(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """A 4xx or 5xx is JSON in the API's shape: ``{"error", "message"}``."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        body = None
    api_error = isinstance(body, dict) and isinstance(body.get("error"), str) and \
        isinstance(body.get("message"), str)
    assert api_error, (
        f"{response.status_code} is not a JSON error: {response.text[:300]!r}")
    return None


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.status_code_conformance,
    errors_are_json,
]


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory()
    return gateway


@pytest.fixture(scope="module")
def admin(gw: Gateway) -> Iterator[httpx.Client]:
    """The test's own client (set-up, live ids, clean-up), with the admin token."""
    with httpx.Client(base_url=gw.base_url, timeout=90,
                      headers={"Authorization": f"Bearer {gw.admin_token}"}) as client:
        yield client
        # Whatever the run made goes: what the API lists and what the gateway runs (its
        # stop would remove them too).
        r = client.get("/api/sandboxes")
        listed = {str(s.get("id")) for s in r.json()["sandboxes"]} if r.is_success else set()
        for sandbox_id in listed | set(gw.sandbox_ids()):
            client.delete(f"/api/sandboxes/{sandbox_id}")
        assert gw.sandbox_ids() == []


@pytest.fixture(scope="module")
def spec(gw: Gateway) -> dict[str, Any]:
    """The document the gateway serves (it takes no token)."""
    r = httpx.get(f"{gw.base_url}/openapi.json", timeout=10)
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()
    assert document["paths"], "the OpenAPI document lists no operation"
    return document


def with_port_spec_examples(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with PORT_SPEC_EXAMPLES added to each ``publish`` list it declares."""
    document = copy.deepcopy(document)
    for schema in document.get("components", {}).get("schemas", {}).values():
        publish = schema.get("properties", {}).get("publish", {})
        if publish.get("type") == "array" and publish.get("items", {}).get("type") == "string":
            publish["examples"] = [*publish.get("examples", []), *PORT_SPEC_EXAMPLES]
    return document


@pytest.fixture(scope="module")
def api_schema(gw: Gateway, spec: dict[str, Any]) -> Any:
    """schemathesis's view of the served document; requests go to the gateway."""
    config = schemathesis.Config.from_dict({
        "base-url": gw.base_url, "request-timeout": 90, "warnings": False,
        # The tests send the Authorization header themselves (the token, none, a wrong one).
        "generation": {"with-security-parameters": False},
    })
    return schemathesis.openapi.from_dict(with_port_spec_examples(spec), config=config)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


class Live:
    """A sandbox kept for the run (made again when a request deletes it) and its ids."""

    def __init__(self, client: httpx.Client, spec: dict[str, Any]) -> None:
        self.client, self.spec = client, spec
        self.sandbox_id = ""

    def sandbox(self) -> str:
        if not self.sandbox_id or self.client.get(
                f"/api/sandboxes/{self.sandbox_id}").status_code != 200:
            r = self.client.post("/api/sandboxes", json={})
            assert r.status_code == 201, r.text
            self.sandbox_id = r.json()["id"]
        return self.sandbox_id

    def resolve(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with each id in ``path`` a live one, outermost first.

        ``/sandboxes/{x}`` is the kept sandbox; a nested ``.../things/{x}`` is the first
        id that ``GET .../things`` lists, or else the ``things`` field of the parent's
        ``GET`` (a sandbox's forwards); an id that has none stays as generated.
        """
        resolved = dict(params)
        for match in re.finditer(r"\{([^}]+)\}", path):
            collection = path[:match.start()].rstrip("/")
            live = self.sandbox() if collection.endswith("/sandboxes") else \
                self.first_id(collection, resolved)
            if live is not None:
                resolved[match.group(1)] = live
        return resolved

    def first_id(self, collection: str, params: dict[str, Any]) -> str | None:
        field = collection.rsplit("/", 1)[-1]
        for template in (collection, collection.rsplit("/", 1)[0]):
            if "get" not in self.spec["paths"].get(template, {}):
                continue
            try:
                r = self.client.get(template.format(**params))
            except KeyError:  # a parameter of the parent that this path does not have
                continue
            try:
                body = r.json() if r.status_code == 200 else {}
            except ValueError:  # not JSON: the test of that operation says so
                continue
            items = body.get(field) if isinstance(body, dict) else None
            ids = [i["id"] for i in items or [] if isinstance(i, dict) and "id" in i]
            if ids:
                return str(ids[0])
        return None


@pytest.fixture(scope="module")
def live_ids(admin: httpx.Client, spec: dict[str, Any]) -> Live:
    return Live(admin, spec)


IP_LITERAL = re.compile(r"\[([^\]]*)\]|(\d+\.\d+\.\d+\.\d+)")


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def names_an_outside_address(case: Case[Any]) -> bool:
    """An IP literal in the body that is not loopback (the wildcard included): a forward
    there would listen beyond this machine, so the case is not sent."""
    for text in strings(case.body):
        for match in IP_LITERAL.finditer(text):
            try:
                address = ipaddress.ip_address(match.group(1) or match.group(2))
            except ValueError:
                continue
            if not address.is_loopback:
                return True
    return False


def run_every_operation(
    schema: Any, max_examples: int, body: Callable[[Case[Any], bool], None]
) -> None:
    """``body(case, live)`` over the generated cases of each operation; one report."""
    failed: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:
        strategy = st.one_of(
            *schema.get_strategies_from_examples(operation),
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @seed(SEED ^ zlib.crc32(operation.label.encode()))
        @settings(RUN, max_examples=max_examples)
        @given(case=strategy, live=st.booleans())
        def run(case: Case[Any], live: bool) -> None:
            assume(not names_an_outside_address(case))
            body(case, live)

        try:
            run()
        # Every operation runs; the test reports all that failed (schemathesis raises a
        # FailureGroup, a BaseExceptionGroup; pytest's own outcomes are not caught).
        except (Exception, BaseExceptionGroup) as exc:
            notes = "\n".join(getattr(exc, "__notes__", []))
            failed.append(f"=== {operation.label}\n{exc}\n{notes}")
    if failed:
        pytest.fail(f"{len(failed)} of {len(operations)} operations broke the contract:\n\n"
                    + "\n\n".join(failed), pytrace=False)


def test_every_operation_keeps_its_contract(api_schema: Any, gw: Gateway,
                                            admin: httpx.Client, live_ids: Live,
                                            session: requests.Session) -> None:
    token = {"Authorization": f"Bearer {gw.admin_token}"}

    def body(case: Case[Any], live: bool) -> None:
        if live and case.path_parameters:
            case.path_parameters = live_ids.resolve(case.path, case.path_parameters)
        before = set(gw.sandbox_ids())
        response = case.call_and_validate(session=session, headers=token, checks=CHECKS)
        after = set(gw.sandbox_ids())
        for sandbox_id in after - before - {live_ids.sandbox_id}:  # made by this request
            assert admin.delete(f"/api/sandboxes/{sandbox_id}").status_code == 204
        assert response.status_code < 400 or after <= before, (
            f"{case.operation.label} answered {response.status_code} but made sandboxes "
            f"{sorted(after - before)}: {response.text[:300]}\n{case.as_curl_command()}")

    run_every_operation(api_schema, MAX_EXAMPLES, body)


def refused(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Without the admin token 401, with a wrong one 403, and the API's JSON error."""
    sent = response.request.headers.get("Authorization")
    want = (403, "forbidden") if sent else (401, "unauthorized")
    try:
        error = response.json()
    except ValueError:
        error = None
    got = (response.status_code, error.get("error") if isinstance(error, dict) else error)
    assert got == want and isinstance(error, dict) and isinstance(error.get("message"), str), (
        f"{'a wrong token' if sent else 'no token'}: want {want}, got {response.status_code} "
        f"{response.text[:300]}")
    return None


def test_every_operation_needs_the_admin_token(api_schema: Any, gw: Gateway,
                                               live_ids: Live,
                                               session: requests.Session) -> None:
    before = set(gw.sandbox_ids())

    def body(case: Case[Any], live: bool) -> None:
        if live and case.path_parameters:
            case.path_parameters = live_ids.resolve(case.path, case.path_parameters)
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token"}):
            case.call_and_validate(session=session, headers=headers,
                                   checks=[schemathesis.checks.not_a_server_error, refused])

    run_every_operation(api_schema, MAX_EXAMPLES_UNAUTHENTICATED, body)
    assert set(gw.sandbox_ids()) <= before | {live_ids.sandbox_id}


def operations_with_a_body(spec: dict[str, Any]) -> list[tuple[str, str, set[int]]]:
    """(method, path with every parameter "x", documented statuses) of each operation
    that takes a body."""
    return [(method.upper(), re.sub(r"\{[^}]+\}", "x", path),
             {int(code) for code in operation.get("responses", {}) if code.isdigit()})
            for path, item in spec["paths"].items() for method, operation in item.items()
            if isinstance(operation, dict) and "requestBody" in operation]


def test_a_body_that_is_not_json_still_needs_the_token(spec: dict[str, Any],
                                                       gw: Gateway) -> None:
    """No token and a body that is not JSON: 401, before anything reads the body."""
    operations = operations_with_a_body(spec)
    assert operations
    got = {}
    for method, path, _ in operations:
        for body in (b"\xff", b"{"):
            r = httpx.request(method, f"{gw.base_url}{path}", content=body, timeout=10,
                              headers={"Content-Type": "application/json"})
            got[f"{method} {path} {body!r}"] = (r.status_code, r.text[:80])
    assert all(status == 401 for status, _ in got.values()), got


def test_the_document_lists_the_refusals(spec: dict[str, Any]) -> None:
    """Each operation documents 401 and 403, and one with an id in its path 404."""
    missing = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            want = {"401", "403"} | ({"404"} if "{" in path else set())
            if not want <= set(operation.get("responses", {})):
                missing[f"{method.upper()} {path}"] = sorted(
                    want - set(operation.get("responses", {})))
    assert not missing, missing


def test_a_host_address_that_is_not_this_hosts_is_refused(admin: httpx.Client,
                                                          live_ids: Live) -> None:
    """``[fe80::dead]`` (link-local, no zone: bind() fails with EINVAL, and nothing can be
    sent there either) is a 4xx like a taken port, not a 500."""
    got = {}
    for spec in ("[fe80::dead]:0:7", "[fe80::dead]:0:7/udp"):
        for path in ("/api/sandboxes", f"/api/sandboxes/{live_ids.sandbox()}/forwards"):
            r = admin.post(path, json={"publish": [spec]})
            got[f"POST {path} {spec}"] = (r.status_code, r.text[:80])
    assert all(400 <= status < 500 for status, _ in got.values()), got


def test_a_body_that_is_not_utf8_gets_a_documented_answer(spec: dict[str, Any],
                                                          admin: httpx.Client) -> None:
    """With the token, a JSON body that is not UTF-8 gets a status the document lists:
    422, like any body that does not fit the schema."""
    got = {}
    for method, path, documented in operations_with_a_body(spec):
        r = admin.request(method, path, content=b"\xff",
                          headers={"Content-Type": "application/json"})
        if r.status_code not in documented:
            got[f"{method} {path}"] = (r.status_code, r.text[:80], sorted(documented))
    assert not got, got
