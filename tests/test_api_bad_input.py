"""Bad input against every route of the HTTP API (issue 2, "Bad input").

Every refusal must be a 4xx JSON error (``Content-Type: application/json``,
an ``"error"`` that names the problem), never a 500, and must leave the store
exactly as it was (``Store.dump()`` before and after).  Hand-written cases
first, then property-based tests (hypothesis) that throw generated methods,
paths, parameters and bodies at every route.

All requests go through ``StubTreq`` (or, for bytes no HTTP client would
send, through a ``twisted.web`` server protocol on a ``StringTransport``) to
an agent on an in-memory store without a supervisor: nothing here touches
the global reactor or sleeps.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import create_engine, event
from sqlalchemy.pool import StaticPool
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from scs.agent import Agent, LocalAgent
from scs.http.api import ALL_METHODS, API
from scs.http.auth import TokenAuth
from scs.http.params import DEFAULT_MAX_BODY, APIRequest
from scs.metrics import AgentMetrics
from scs.store import Store
from scs.tap import http_resource
from scs.testing import FakeControl

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
ORIGIN = "http://127.0.0.1:8001"
JSON = {"Content-Type": ["application/json"]}
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}

Dump = dict[str, list[tuple[Any, ...]]]


# -- harness -------------------------------------------------------------------


@dataclass
class Response:
    status: int
    content_type: list[str]
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        """The body as strict JSON: NaN and Infinity are not JSON."""
        return json.loads(self.body, parse_constant=_not_json)


def _not_json(name: str) -> Any:
    raise AssertionError(f"the answer holds {name}, which is not JSON")


def _foreign_keys_on(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


def copy_store(template: Store) -> Store:
    """A private in-memory copy of ``template`` (SQLite's backup API): far
    cheaper than migrating a new store for each of thousands of requests."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _foreign_keys_on)
    source, target = template.engine.raw_connection(), engine.raw_connection()
    try:
        source.driver_connection.backup(target.driver_connection)
    finally:
        target.close()
        source.close()
    return Store(engine)


_TEMPLATES: dict[bool, Store] = {}


def template_store(seed: bool) -> Store:
    """The migrated store every harness starts from; with ``seed``, app
    ``app1`` with instance ``w1`` (max 4, min 2) consuming declared queue
    ``q1`` and an autoscaling policy on ``q1``, so that requests naming
    them reach the checks behind lookups."""
    if seed not in _TEMPLATES:
        store = Store.in_memory()
        if seed:
            harness = Harness(store=store)
            for method, path in (
                ("PUT", "/app1/"),
                ("PUT", "/app1/queues/q1/"),
                ("PUT", "/app1/instances/w1/?queues=q1&max_concurrency=4&min_concurrency=2"),
                ("PUT", "/app1/autoscaling/?queue=q1&max_instances=4"),
            ):
                response = harness.request(method, path)
                assert response.status == 201, (path, response)
        _TEMPLATES[seed] = store
    return _TEMPLATES[seed]


class Harness:
    """One agent (no supervisor, in-memory store) answering through StubTreq,
    on a copy of ``template_store(seed)`` unless given a store."""

    def __init__(
        self,
        seed: bool = True,
        max_body: int = DEFAULT_MAX_BODY,
        store: Store | None = None,
        site: bool = False,
        token: str | None = None,
    ) -> None:
        self.store = store if store is not None else copy_store(template_store(seed))
        # A fake broker (no queues on it) behind the queue figures and purge.
        agent = Agent(LocalAgent(self.store, "agent1", BROKER, control=FakeControl()))
        self.api = API(agent, max_body=max_body)
        if site:
            # The whole site the daemon serves: the API with the admin page
            # and /metrics mounted, behind the token check, counted.
            auth = None if token is None else TokenAuth(token)
            self.resource = http_resource(agent, AgentMetrics(agent), auth)
        else:
            self.resource = self.api.resource()
        self.treq = StubTreq(self.resource)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, list[str]] | None = None,
    ) -> Response:
        outcome: list[Any] = []
        d = self.treq.request(method, ORIGIN + path, data=body, headers=headers, allow_redirects=False)

        def read(response: Any) -> Any:
            return self.treq.content(response).addCallback(lambda content: outcome.append((response, content)))

        d.addCallback(read)
        d.addErrback(outcome.append)
        self.treq.flush()
        assert outcome, f"no response to {method} {path}"
        if not isinstance(outcome[0], tuple):
            outcome[0].raiseException()
        response, content = outcome[0]
        headers_out = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        return Response(
            status=response.code,
            content_type=headers_out.get("content-type", []),
            headers=headers_out,
            body=content,
        )

    def json_request(self, method: str, path: str, document: Any) -> Response:
        return self.request(method, path, json.dumps(document).encode(), JSON)

    def raw(self, data: bytes, request_factory: Any = APIRequest) -> bytes:
        """Bytes straight into a ``twisted.web`` server for this API, with
        the agent's request class; returns the bytes it answers (ask
        HTTP/1.0 to get an unchunked answer)."""
        site = Site(self.resource, requestFactory=request_factory, reactor=MemoryReactorClock(), timeout=None)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8001))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        return transport.value()

    def dump(self) -> Dump:
        return self.store.dump()


def assert_json(response: Response) -> Any:
    assert response.status < 500, response
    assert response.content_type == ["application/json"], response
    return response.json()


def is_stats_without_supervisor(path: str, response: Response) -> bool:
    """``stats`` needs a live worker: without a supervisor it is a 503."""
    return response.status == 503 and "/stats" in path and b"no supervisor" in response.body


def assert_refused(response: Response, status: int | tuple[int, ...] = 400, *mentions: str) -> dict[str, Any]:
    """A JSON error with ``status`` whose message or fields mention each of
    ``mentions`` (case-insensitive)."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status in statuses, response
    assert response.content_type == ["application/json"], response
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    text = json.dumps(body, ensure_ascii=False).lower()
    for mention in mentions:
        assert mention.lower() in text, (mention, body)
    return body


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- the routes of DESIGN §5 -------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    # Parameters the route accepts (everything else is "unknown").
    accepts: tuple[str, ...] = ()

    def path(self, app: str = "app1", name: str = "w1", queue: str = "q1") -> str:
        return self.template.format(app=quote(app, safe=""), name=quote(name, safe=""), queue=quote(queue, safe=""))

    @property
    def valid_query(self) -> str:
        """Parameters the route needs to get past its own checks."""
        return "?max=4" if "max" in self.accepts else ""

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(s for s in ("app", "name", "queue") if "{" + s + "}" in self.template)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


INSTANCE_SETTINGS = (
    "max_concurrency",
    "min_concurrency",
    "queues",
    "broker",
    "arguments",
    "nowait",
)
QUEUE_SETTINGS = ("exchange", "routing_key", "exchange_type", "options")
APP_SETTINGS = ("broker", "celery_app", "arguments", "env", "workdir", "python", "task_events")
POLICY_FIELDS = ("queue", "min_instances", "max_instances", "messages_per_instance", "scale_down_after")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/"),
    Route("GET", "/ping/"),
    Route("GET", "/agents/"),
    Route("PUT", "/{app}/", APP_SETTINGS),
    Route("POST", "/{app}/", APP_SETTINGS),
    Route("GET", "/{app}/"),
    Route("DELETE", "/{app}/"),
    Route("POST", "/{app}/restart/", ("rolling",)),
    Route("PUT", "/{app}/restart/", ("rolling",)),
    Route("POST", "/{app}/enable/"),
    Route("PUT", "/{app}/enable/"),
    Route("POST", "/{app}/disable/"),
    Route("PUT", "/{app}/disable/"),
    Route("POST", "/agents/agent1/drain/"),
    Route("PUT", "/agents/agent1/drain/"),
    Route("POST", "/agents/agent1/undrain/"),
    Route("PUT", "/agents/agent1/undrain/"),
    Route("PUT", "/{app}/instances/", INSTANCE_SETTINGS),
    Route("POST", "/{app}/instances/", INSTANCE_SETTINGS),
    Route("GET", "/{app}/instances/"),
    Route("PUT", "/{app}/instances/{name}/", INSTANCE_SETTINGS),
    Route("POST", "/{app}/instances/{name}/", INSTANCE_SETTINGS),
    Route("GET", "/{app}/instances/{name}/"),
    Route("DELETE", "/{app}/instances/{name}/"),
    Route("GET", "/instances/{name}/"),
    Route("DELETE", "/instances/{name}/"),
    Route("POST", "/{app}/instances/{name}/enable/"),
    Route("PUT", "/{app}/instances/{name}/enable/"),
    Route("POST", "/{app}/instances/{name}/disable/"),
    Route("PUT", "/{app}/instances/{name}/disable/"),
    Route("POST", "/{app}/instances/{name}/restart/"),
    Route("PUT", "/{app}/instances/{name}/restart/"),
    Route("GET", "/{app}/instances/{name}/autoscale/"),
    Route("POST", "/{app}/instances/{name}/autoscale/", ("max", "min")),
    Route("PUT", "/{app}/instances/{name}/autoscale/", ("max", "min")),
    Route("GET", "/{app}/instances/{name}/queues/"),
    Route("PUT", "/{app}/instances/{name}/queues/{queue}/"),
    Route("POST", "/{app}/instances/{name}/queues/{queue}/"),
    Route("DELETE", "/{app}/instances/{name}/queues/{queue}/"),
    Route("GET", "/{app}/instances/{name}/stats/"),
    Route("GET", "/{app}/instances/{name}/log/", ("lines",)),
    Route("PUT", "/{app}/queues/{queue}/", QUEUE_SETTINGS),
    Route("POST", "/{app}/queues/{queue}/", QUEUE_SETTINGS),
    Route("GET", "/{app}/queues/"),
    Route("GET", "/{app}/queues/{queue}/"),
    Route("DELETE", "/{app}/queues/{queue}/"),
    Route("POST", "/{app}/queues/{queue}/purge/"),
    Route("PUT", "/{app}/queues/{queue}/purge/"),
    Route("PUT", "/{app}/autoscaling/", POLICY_FIELDS),
    Route("POST", "/{app}/autoscaling/", POLICY_FIELDS),
    Route("GET", "/{app}/autoscaling/"),
    Route("DELETE", "/{app}/autoscaling/"),
)
NAMED_ROUTES = tuple(r for r in ROUTES if r.slots)
NAMED_IDS = [str(r) for r in NAMED_ROUTES]

# Each path with the methods it answers (HEAD comes with GET).
PATHS: dict[str, set[str]] = {}
for _route in ROUTES:
    PATHS.setdefault(_route.template, set()).add(_route.method)
for _methods in PATHS.values():
    if "GET" in _methods:
        _methods.add("HEAD")

SLOT_PARAMETER = {"app": "app", "name": "instance", "queue": "queue"}


def create_routes() -> tuple[Route, ...]:
    return tuple(r for r in ROUTES if "max_concurrency" in r.accepts)


CREATE_IDS = [str(r) for r in create_routes()]


# -- the harness itself ---------------------------------------------------------


def test_harness_sees_changes_in_the_dump(h: Harness) -> None:
    """The store comparison every test relies on notices a change."""
    before = h.dump()
    assert h.request("PUT", "/app1/instances/w2/").status == 201
    assert h.dump() != before


def test_every_route_answers_its_happy_path() -> None:
    """The route table is right: each route answers a valid request with 2xx
    (stats says 503 without a supervisor), so refusals below are refusals
    of the input and not of the route."""
    for route in ROUTES:
        fresh = Harness()
        name = "w2" if "max_concurrency" in route.accepts else "w1"
        response = fresh.request(route.method, route.path(name=name))
        if route.template.endswith("/stats/"):
            assert is_stats_without_supervisor(route.path(), response), response
        elif "max" in route.accepts:
            assert_refused(response, 400, "max")
        else:
            assert 200 <= response.status < 300, (route, response)
            assert_json(response)


# -- parameters: unknown, twice, malformed JSON, not an object --------------------


def every_route() -> Iterator[tuple[Harness, Route]]:
    """Each route of ``ROUTES``, with one harness for all of them: a
    request that wrongly changed the store fails its test right there."""
    h = Harness()
    for route in ROUTES:
        yield h, route


@pytest.mark.parametrize("carrier", ["query", "form", "json"])
def test_unknown_parameter(carrier: str) -> None:
    for h, route in every_route():
        before = h.dump()
        path = route.path()
        if carrier == "query":
            response = h.request(route.method, path + "?bogus_parameter=1")
        elif carrier == "form":
            response = h.request(route.method, path, b"bogus_parameter=1", FORM)
        else:
            response = h.json_request(route.method, path, {"bogus_parameter": 1})
        body = assert_refused(response, 400, "unknown parameter", "bogus_parameter")
        assert body["parameter"] == "bogus_parameter", route
        assert h.dump() == before, route


@pytest.mark.parametrize(
    "how",
    ["query twice", "query and form", "query and json", "json key twice", "form twice"],
)
def test_parameter_given_twice(how: str) -> None:
    for h, route in every_route():
        before = h.dump()
        name = route.accepts[0] if route.accepts else "x"
        path = route.path()
        if how == "query twice":
            response = h.request(route.method, f"{path}?{name}=1&{name}=2")
        elif how == "query and form":
            response = h.request(route.method, f"{path}?{name}=1", f"{name}=2".encode(), FORM)
        elif how == "query and json":
            response = h.json_request(route.method, f"{path}?{name}=1", {name: 2})
        elif how == "json key twice":
            body = f'{{"{name}": 1, "{name}": 2}}'.encode()
            response = h.request(route.method, path, body, JSON)
        else:
            response = h.request(route.method, path, f"{name}=1&{name}=2".encode(), FORM)
        body = assert_refused(response, 400, "twice", name)
        assert body["parameter"] == name, route
        assert h.dump() == before, route


MALFORMED_JSON = [
    b"{",
    b'{"max": }',
    b'{"max": 1,}',
    b"{'max': 1}",
    b'{"max": 1} trailing',
    b'{"max": NaN}',
    b'{"max": Infinity}',
    b'{"max": -Infinity}',
    b'{"max": 1' + b"0" * 5000 + b"}",  # beyond Python's int digits limit
    b'{"a":' + b"[" * 50000,  # deeper than the parser's recursion limit
    b'{"a":' * 10000 + b"1" + b"}" * 10000,
    b"[" * 30000 + b"]" * 30000,
]


@pytest.mark.parametrize("document", MALFORMED_JSON, ids=lambda b: repr(b[:20]))
def test_malformed_json(document: bytes) -> None:
    """Regressions: JSON nested deeper than the parser's recursion limit gave
    a 500; NaN and Infinity were taken."""
    assert len(document) <= DEFAULT_MAX_BODY
    for h, route in every_route():
        before = h.dump()
        response = h.request(route.method, route.path(), document, JSON)
        assert_refused(response, 400, "JSON")
        assert h.dump() == before, route


def test_json_without_content_type() -> None:
    """``curl -d '{...'`` labels JSON as a form; broken JSON is still named as such."""
    for h, route in every_route():
        before = h.dump()
        response = h.request(route.method, route.path(), b'{"max": ', FORM)
        assert_refused(response, 400, "JSON")
        assert h.dump() == before, route


@pytest.mark.parametrize("document", [b"[]", b"[1, 2]", b'"max"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object(document: bytes) -> None:
    for h, route in every_route():
        before = h.dump()
        assert_refused(h.request(route.method, route.path(), document, JSON), 400, "object")
        assert h.dump() == before, route


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "text/xml"])
def test_unsupported_content_type(content_type: str) -> None:
    for h, route in every_route():
        before = h.dump()
        headers = {"Content-Type": [content_type]}
        response = h.request(route.method, route.path(), b"--x\r\n", headers)
        assert_refused(response, 400, "Content-Type")
        assert h.dump() == before, route


# -- non-UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, suffix, body, headers",
    [
        ("query string", "?%FF=1", None, None),
        ("query string", "?max=%C3", None, None),
        ("query string", "?max=%ED%A0%80", None, None),  # an encoded surrogate
        ("body", "", b"max=\xff", FORM),
        ("body", "", b"max=%FF", FORM),
        ("body", "", b'{"max": "\xff"}', JSON),
        ("body", "", b'{"max": 1, "\xc3": 2}', None),
    ],
    ids=["query-name", "query-truncated", "query-surrogate", "form-raw", "form-escaped", "json-raw", "json-unlabelled"],
)
def test_non_utf8_parameters(where: str, suffix: str, body: bytes | None, headers: dict[str, list[str]] | None) -> None:
    for h, route in every_route():
        before = h.dump()
        response = h.request(route.method, route.path() + suffix, body, headers)
        assert_refused(response, 400, where, "UTF-8")
        assert h.dump() == before, route


@pytest.mark.parametrize("route", NAMED_ROUTES, ids=NAMED_IDS)
@pytest.mark.parametrize("escaped", ["%FF", "w%C3", "%ED%A0%80", "a%C0%AF"])
def test_non_utf8_path(h: Harness, route: Route, escaped: str) -> None:
    for slot in route.slots:
        before = h.dump()
        path = route.path().replace(
            "/" + quote({"app": "app1", "name": "w1", "queue": "q1"}[slot]) + "/",
            "/" + escaped + "/",
            1,
        )
        assert escaped in path
        assert_refused(h.request(route.method, path), 400, "path", "UTF-8")
        assert h.dump() == before


def test_raw_bytes_in_the_request_line_are_refused(h: Harness) -> None:
    """Bytes that are not ASCII in the request line never reach the API:
    twisted.web answers a bare 400 itself (no JSON body is possible there)."""
    before = h.dump()
    for line in (
        b"PUT /app1/instances/w\xff/ HTTP/1.0",
        b"PUT /app1/instances/w\xc3\xb6/ HTTP/1.0",
        b"PUT /app1/instances/w2/?max_concurrency=\xff HTTP/1.0",
        b"P\xffT /app1/instances/w2/ HTTP/1.0",
    ):
        answer = h.raw(line + b"\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert h.dump() == before


def test_raw_non_utf8_body_and_host(h: Harness) -> None:
    before = h.dump()
    answer = h.raw(
        b"PUT /app1/ HTTP/1.0\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 12\r\n\r\nbroker=\xff\xfeamq"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ") and b"Content-Type: application/json" in head
    assert "UTF-8" in json.loads(body)["error"]
    # Regression: a Host header that is not ASCII went to Klein, which
    # answered in plain text.
    for host in (b"\xff\xfe", b"h\xc3\xa9"):
        answer = h.raw(b"GET /ping/ HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 "), answer
        assert b"Content-Type: application/json" in head
        assert "Host" in json.loads(body)["error"]
    assert h.dump() == before


def test_raw_requests_reach_the_api(h: Harness) -> None:
    """The raw harness does talk to the API (so its refusals mean something)."""
    answer = h.raw(b"GET /ping/ HTTP/1.0\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(b'{"ok": "pong"}')


# -- body size ----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [FORM, JSON], ids=["form", "json"])
def test_body_over_the_limit(headers: dict[str, list[str]]) -> None:
    body = b'{"x": "' + b"a" * DEFAULT_MAX_BODY + b'"}'
    body = body if headers is JSON else b"x=" + b"a" * DEFAULT_MAX_BODY
    for h, route in every_route():
        before = h.dump()
        response = h.request(route.method, route.path(), body, headers)
        assert_refused(response, 413, "larger than", str(DEFAULT_MAX_BODY))
        assert h.dump() == before, route


def test_body_at_the_limit_is_read() -> None:
    """The limit is the limit: a body of exactly max_body bytes is read."""
    h = Harness(max_body=100)
    body = b"broker=" + quote("amqp://u:" + "p" * 60 + "@h//", safe=":/@").encode()
    body += b"&celery_app=" + b"a" * (100 - len(body) - len(b"&celery_app="))
    assert len(body) == 100
    assert h.request("PUT", "/app1/", body, FORM).status == 200
    before = h.dump()
    assert_refused(h.request("PUT", "/app1/", body + b"a", FORM), 413)
    assert h.dump() == before


# -- methods ------------------------------------------------------------------------


@pytest.mark.parametrize("template", sorted(PATHS), ids=sorted(PATHS))
def test_wrong_methods(h: Harness, template: str) -> None:
    allowed = PATHS[template]
    path = Route("GET", template).path()
    for method in ALL_METHODS:
        if method in allowed:
            continue
        before = h.dump()
        response = h.request(method, path)
        assert response.status == 405, (method, template, response)
        assert response.headers.get("allow"), response
        if method != "HEAD":
            body = assert_refused(response, 405, method)
            assert set(body["allowed"]) <= allowed
        assert h.dump() == before


@pytest.mark.parametrize("template", sorted(PATHS), ids=sorted(PATHS))
@pytest.mark.parametrize("method", ["FOO", "PROPFIND", "TRACE", "CONNECT", "M-SEARCH"])
def test_unknown_methods(h: Harness, template: str, method: str) -> None:
    """Regression: a method Klein's routes do not list was answered in HTML."""
    before = h.dump()
    response = h.request(method, Route("GET", template).path())
    assert_refused(response, 405, method)
    assert h.dump() == before


@pytest.mark.parametrize("path", ["/app1/x/y/z/", "/app1/instances/w1/x/y/", "/app1/queues/q1/x/"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_unknown_paths_answer_json(h: Harness, path: str, method: str) -> None:
    """Regression: "/" got Werkzeug's HTML 404 (it lists the apps now)."""
    before = h.dump()
    assert_refused(h.request(method, path), 404)
    assert h.dump() == before


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_the_root_only_lists(h: Harness, method: str) -> None:
    before = h.dump()
    assert_refused(h.request(method, "/"), 405)
    assert h.dump() == before


@pytest.mark.parametrize("path", ["//", "///", "/app1//", "/app1//instances/", "/app1/instances//", "/ping//"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_empty_path_segments(h: Harness, path: str, method: str) -> None:
    """Regression: Werkzeug merged "//" away, so "PUT /app1/instances//" (an
    empty instance name) created an instance with a random name, and "//"
    got an HTML 404."""
    before = h.dump()
    assert_refused(h.request(method, path), 400, "empty")
    assert h.dump() == before


# -- names ----------------------------------------------------------------------------

BAD_NAMES: list[tuple[str, str]] = (
    [
        ("space", "a b"),
        ("tab", "a\tb"),
        ("newline", "a\nb"),
        ("trailing-newline", "w1\n"),  # regression: "$" let this through
        ("carriage-return", "w1\r"),
        ("nul", "a\x00b"),
        ("del", "a\x7fb"),
        ("escape", "a\x1b[31m"),
        ("nbsp", "a\u00a0b"),
        ("line-separator", "a\u2028b"),
        ("zero-width-space", "a\u200bb"),
        ("rtl-override", "a\u202eb"),
        ("leading-dash", "-rf"),
        ("leading-dot", ".hidden"),
        ("dot-dot", ".."),
        ("not-nfc", "we\u0301"),
        ("backslash", "a\\b"),
        ("at", "w1@host"),
        ("colon", "a:b"),
        ("percent", "a%41"),
        ("plus", "a+b"),
        ("comma", "a,b"),
        ("quote", "a'b"),
        ("double-quote", 'a"b'),
        ("hash", "a#b"),
        ("question", "a?b"),
        ("tilde", "~a"),
        ("emoji", "w\N{SNOWMAN}"),
    ]
    + [(f"shell-{c}", f"a{c}b") for c in ";|&$`<>(){}[]*!^="]
    + [
        ("command-substitution", "$(reboot)"),
        ("backticks", "`id`"),
        ("pipe", "w1|sh"),
    ]
)


def _long_names(slot: str) -> list[tuple[str, str]]:
    length = 200 if slot == "queue" else 64
    max_bytes = 250 if slot == "queue" else 200
    wide = "\U00020000"  # a letter of four UTF-8 bytes
    return [
        ("too-long", "a" * (length + 1)),
        ("too-long-unicode", "ö" * (length + 1)),
        ("too-many-bytes", wide * (max_bytes // 4 + 1)),
    ]


@pytest.mark.parametrize("route", NAMED_ROUTES, ids=NAMED_IDS)
def test_bad_names(h: Harness, route: Route) -> None:
    for slot in route.slots:
        for label, name in BAD_NAMES + _long_names(slot):
            before = h.dump()
            path = route.path(**{slot: name}) + route.valid_query
            response = h.request(route.method, path)
            body = assert_refused(response, 400, SLOT_PARAMETER[slot])
            assert body.get("parameter") == SLOT_PARAMETER[slot], (label, body)
            assert h.dump() == before, (route, slot, label)


@pytest.mark.parametrize("route", NAMED_ROUTES, ids=NAMED_IDS)
def test_names_with_a_slash(h: Harness, route: Route) -> None:
    """Regression: "w%2Fx" was split into two segments and answered 404."""
    for slot in route.slots:
        for name in ("a/b", "/", "a/", "../etc"):
            before = h.dump()
            assert_refused(h.request(route.method, route.path(**{slot: name})), 400, "'/'")
            assert h.dump() == before


@pytest.mark.parametrize("route", NAMED_ROUTES, ids=NAMED_IDS)
def test_empty_names(h: Harness, route: Route) -> None:
    for slot in route.slots:
        before = h.dump()
        response = h.request(route.method, route.path(**{slot: ""}) + route.valid_query)
        assert_refused(response, 400, "empty")
        assert h.dump() == before


@pytest.mark.parametrize("app", sorted(["ping", "agents", "instances", "static"]))
def test_reserved_app_names(h: Harness, app: str) -> None:
    before = h.dump()
    for method, template in (("PUT", "/{app}/instances/w9/"), ("PUT", "/{app}/queues/q9/")):
        response = h.request(method, Route(method, template).path(app=app))
        assert_refused(response, (400, 404, 405))
    assert h.dump() == before


@pytest.mark.parametrize("name", ["wörker-1", "ü", "приложение", "队列", "λ_2.x", "Ａｐｐ", "x" * 64, "ö" * 64])
def test_valid_unicode_names_work(name: str) -> None:
    h = Harness(seed=False)
    assert h.request("PUT", f"/{quote(name)}/").status == 201
    assert h.request("PUT", f"/{quote(name)}/queues/{quote(name)}/").status == 201
    response = h.request("PUT", f"/{quote(name)}/instances/{quote(name)}/?queues={quote(name)}")
    assert response.status == 201, response
    instance = assert_json(response)
    assert (instance["name"], instance["app"], instance["queues"]) == (name, name, [name])
    assert h.request("GET", f"/{quote(name)}/instances/").json() == [name]
    assert h.request("GET", f"/{quote(name)}/queues/").json() == [name]
    assert h.request("GET", f"/instances/{quote(name)}/").json()["name"] == name
    instance = f"/{quote(name)}/instances/{quote(name)}"
    assert h.request("DELETE", f"{instance}/queues/{quote(name)}/").status == 200
    assert h.request("GET", f"{instance}/queues/").json()["queues"] == []
    assert h.request("DELETE", f"/{quote(name)}/instances/{quote(name)}/").status == 200
    assert h.request("DELETE", f"/{quote(name)}/").status == 200
    after = h.dump()
    # The deletion alone is remembered, for peers that missed it (scs.app_sync).
    assert [row[0] for row in after["app_tombstone"]] == [name]
    assert after == Harness(seed=False).dump() | {"broker": after["broker"], "app_tombstone": after["app_tombstone"]}


def test_unicode_names_in_queue_lists_and_json(h: Harness) -> None:
    response = h.json_request("PUT", "/app1/instances/wörker-1/", {"queues": ["wörker-q", "q1"]})
    assert response.status == 201, response
    assert response.json()["queues"] == ["wörker-q", "q1"]


# -- concurrency ----------------------------------------------------------------------

BAD_CONCURRENCY_TEXT = [
    # "" is not here: an empty form field means "not given" (issue 10);
    # in a JSON body it is a value, and a bad one (below).
    " ",
    "abc",
    "-1",
    "1.5",
    "1.0",
    "1e3",
    "0x10",
    "1_0",
    "+",
    "3 4",
    "257",
    "99999999999999999999",
    "true",
    "None",
    "\u0663",  # ARABIC-INDIC DIGIT THREE
    "\uff13",  # FULLWIDTH DIGIT THREE
    "1\n2",
]
BAD_CONCURRENCY_JSON: list[Any] = [
    "",
    -1,
    257,
    10**30,
    -(10**30),
    1.5,
    2.0,
    1e300,
    True,
    False,
    None,
    "x",
    "1.5",
    [1],
    {"n": 1},
]


@pytest.mark.parametrize("route", create_routes(), ids=CREATE_IDS)
@pytest.mark.parametrize("parameter", ["max_concurrency", "min_concurrency"])
def test_bad_concurrency(h: Harness, route: Route, parameter: str) -> None:
    path = route.path(name="w2")
    values: list[tuple[Any, bool]] = [(v, False) for v in BAD_CONCURRENCY_TEXT]
    values += [(v, True) for v in BAD_CONCURRENCY_JSON]
    if parameter == "max_concurrency":
        values += [("0", False), (0, True)]
    for value, as_json in values:
        before = h.dump()
        if not as_json:
            response = h.request(route.method, f"{path}?{urlencode({parameter: value})}")
        else:
            response = h.json_request(route.method, path, {parameter: value})
        body = assert_refused(response, 400, parameter)
        assert body["parameter"] == parameter, (value, body)
        assert h.dump() == before, value
    # A number too large for a float, which Python reads as infinity.
    before = h.dump()
    response = h.request(route.method, path, f'{{"{parameter}": 1e400}}'.encode(), JSON)
    assert_refused(response, 400, parameter)
    assert h.dump() == before


@pytest.mark.parametrize("route", create_routes(), ids=CREATE_IDS)
@pytest.mark.parametrize(
    "settings_",
    [
        {"max_concurrency": 2, "min_concurrency": 3},
        {"min_concurrency": 0, "max_concurrency": 0},
        {"max_concurrency": "1", "min_concurrency": "256"},
    ],
)
def test_min_greater_than_max(h: Harness, route: Route, settings_: dict[str, Any]) -> None:
    before = h.dump()
    response = h.json_request(route.method, route.path(name="w2"), settings_)
    assert_refused(response, 400, "concurrency")
    assert h.dump() == before


@pytest.mark.parametrize("carrier", ["query", "json"])
def test_bad_autoscale(h: Harness, carrier: str) -> None:
    path = "/app1/instances/w1/autoscale/"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max": 2, "min": 3}, "min"),
        ({"min": 5}, "min"),  # above w1's max of 4
        ({"max": 1}, "min"),  # below w1's min of 2
        ({"max": 0}, "max"),
        ({"max": -3}, "max"),
        ({"min": -1}, "min"),
        ({"max": 100000}, "max"),
        ({"max": "many"}, "max"),
        ({"min": "1.5"}, "min"),
        ({"max": "4", "min": "\u0662"}, "min"),
    ]
    if carrier == "json":
        cases += [({"max": True}, "max"), ({"min": 1.0}, "min"), ({"max": None}, "max")]
    for values, named in cases:
        before = h.dump()
        if carrier == "query":
            response = h.request("POST", f"{path}?{urlencode(values)}")
        else:
            response = h.json_request("POST", path, values)
        assert_refused(response, 400, named)
        assert h.dump() == before, values
    # And the limits themselves are accepted.
    assert h.json_request("POST", path, {"max": 256, "min": 0}).json() == {"max": 256, "min": 0}


def test_concurrency_limits_are_accepted(h: Harness) -> None:
    response = h.request("PUT", "/app1/instances/w2/?max_concurrency=256&min_concurrency=0")
    assert response.status == 201, response
    assert (response.json()["max_concurrency"], response.json()["min_concurrency"]) == (256, 0)
    response = h.json_request("PUT", "/app1/instances/w3/", {"max_concurrency": " 7 "})
    assert response.status == 201 and response.json()["max_concurrency"] == 7


# -- other parameters ---------------------------------------------------------------

BAD_BROKERS: list[tuple[Any, str]] = [
    ("", "broker"),
    ("http://127.0.0.1/", "amqp://"),
    ("redis://localhost:6379/0", "amqp://"),
    ("127.0.0.1:5672", "amqp://"),
    ("amqp:foo", "amqp://"),  # regression: read as virtual host "oo" on localhost
    ("amqp://h:99999/", "port"),
    ("amqp://h:-1/", "port"),
    ("amqp://h:0/", "port"),  # regression: port 0 became 5672
    ("amqp://h:x/", "port"),
    ("amqp://[::1/", "broker"),
    ("amqp://[zz::1]/", "broker"),
    ("amqp://a;b/", "host"),  # regression: stored as host "a;b"
    ("amqp://a|reboot/", "host"),
    ("amqp://$(id)/", "host"),
    ("amqp://h/?heartbeat=1", "query"),
    ("amqp://h/#x", "fragment"),
    ("amqp://h /", "spaces"),
    (" amqp://h/", "spaces"),
    ("amqp://h/\x00", "control"),
    ("amqp://u:p%00@h/", "control"),  # a control character once decoded
    ("amqp://h/v%0Ahost", "control"),
    ("amqp://h/" + "v" * 1100, "too long"),
    (1, "broker"),
    (["amqp://h/"], "broker"),
    ({"url": "amqp://h/"}, "broker"),
    (True, "broker"),
]


@pytest.mark.parametrize("broker, mention", BAD_BROKERS, ids=[repr(b)[:30] for b, _ in BAD_BROKERS])
def test_bad_broker_urls(h: Harness, broker: Any, mention: str) -> None:
    for method, path in (
        ("PUT", "/app1/"),
        ("POST", "/app2/"),
        ("PUT", "/app1/instances/"),
        ("PUT", "/app1/instances/w2/"),
        ("POST", "/app3/instances/w2/"),
    ):
        before = h.dump()
        # An empty form field means "not given": "" is a bad value in JSON only.
        if isinstance(broker, str) and broker:
            response = h.request(method, f"{path}?{urlencode({'broker': broker})}")
        else:
            response = h.json_request(method, path, {"broker": broker})
        body = assert_refused(response, 400, mention)
        assert body["parameter"] == "broker"
        assert h.dump() == before


def test_good_broker_urls_are_stored_in_one_spelling(h: Harness) -> None:
    for url, host, port, vhost in (
        ("amqp://guest:guest@[::1]:5673//", "::1", 5673, "/"),
        ("pyamqp://u:p%40ss@Rabbit.Example.com/prod", "rabbit.example.com", 5672, "prod"),
        ("amqp://", "127.0.0.1", 5672, "/"),
    ):
        response = h.request("PUT", f"/app1/?{urlencode({'broker': url})}")
        assert response.status == 200, (url, response)
        broker = response.json()["broker"]
        assert (broker["hostname"], broker["port"], broker["virtual_host"]) == (host, port, vhost)
        assert broker["password"] == "********"


BAD_QUEUE_SETTINGS: list[tuple[str, Any]] = [
    ("exchange_type", "bogus"),
    ("exchange_type", "Direct"),
    ("exchange_type", "direct\n"),
    ("exchange_type", "x-delayed-message"),
    ("exchange_type", 1),
    ("exchange_type", ["direct"]),
    ("exchange_type", {"direct": 1}),
    ("exchange_type", True),
    ("options", "not json"),
    ("options", "{"),
    ("options", "[1, 2]"),
    ("options", "1"),
    ("options", '"text"'),
    ("options", "true"),
    ("options", '{"a": NaN}'),  # regression: NaN was stored and answered
    ("options", '{"a": Infinity}'),
    ("options", '{"a": 1e400}'),  # a float that overflows to infinity
    ("options", "[" * 5000),  # regression: RecursionError gave a 500
    ("options", '{"a": "' + "x" * 5000 + '"}'),
    ("options", [1]),
    ("options", 3),
    ("options", True),
    ("options", {"a": "x" * 5000}),
    ("exchange", "a b"),
    ("exchange", "a/b"),
    ("exchange", "a;b"),
    ("exchange", "ex\n"),  # regression: "$" let a trailing newline through
    ("exchange", "x" * 201),
    ("exchange", "\U00020000" * 63),  # 252 bytes: over AMQP's short string
    ("exchange", 5),
    ("exchange", ["a"]),
    ("routing_key", "a b"),
    ("routing_key", "a$b"),
    ("routing_key", "rk\n"),
    ("routing_key", "\x00"),
    ("routing_key", {"a": 1}),
]


@pytest.mark.parametrize("parameter, value", BAD_QUEUE_SETTINGS, ids=[f"{p}={v!r}"[:40] for p, v in BAD_QUEUE_SETTINGS])
@pytest.mark.parametrize("queue", ["q1", "q2"], ids=["redeclare", "new"])
def test_bad_queue_declarations(h: Harness, parameter: str, value: Any, queue: str) -> None:
    for method in ("PUT", "POST"):
        before = h.dump()
        if isinstance(value, str):
            response = h.request(method, f"/app1/queues/{queue}/?{urlencode({parameter: value})}")
        else:
            response = h.json_request(method, f"/app1/queues/{queue}/", {parameter: value})
        body = assert_refused(response, 400, parameter)
        assert body["parameter"] == parameter
        assert h.dump() == before


def test_nan_in_a_json_body_option_is_refused(h: Harness) -> None:
    """Regression: ``{"options": {"a": NaN}}`` was stored, then answered as
    ``NaN``, which is not JSON."""
    before = h.dump()
    response = h.request("PUT", "/app1/queues/q2/", b'{"options": {"a": NaN}}', JSON)
    assert_refused(response, 400, "JSON")
    assert h.dump() == before
    response = h.json_request("PUT", "/app1/queues/q2/", {"options": {"x-max-priority": 10}})
    assert response.status == 201
    assert response.json()["options"] == {"x-max-priority": 10}


BAD_INSTANCE_SETTINGS: list[tuple[str, Any]] = [
    ("queues", ","),
    ("queues", "a,,b"),
    ("queues", "a,a"),
    ("queues", "a b"),
    ("queues", "a;rm"),
    ("queues", ["q\n"]),
    ("queues", [" q1"]),
    ("queues", ",".join(f"q{i}" for i in range(101))),  # regression: no limit
    ("queues", [1]),
    ("queues", [""]),
    ("queues", ["a", ["b"]]),
    ("queues", {"a": 1}),
    ("queues", 7),
    ("arguments", "-n other"),
    ("arguments", "--hostname=x"),
    ("arguments", "-Q q9"),
    ("arguments", "-Qq9"),  # regression: attached short options got through
    ("arguments", "-nother@host"),
    ("arguments", "-f/tmp/log"),
    ("arguments", "-D"),
    ("arguments", "--detach"),
    ("arguments", "--pidfile=/tmp/x"),
    # Allow-list (issue "Trust on the bus"): bundled short flags got past the
    # old deny-list, and key=value became Celery configuration.
    ("arguments", "-En x@y"),
    ("arguments", "-EQq"),
    ("arguments", "-Ef/path"),
    ("arguments", "-ED"),
    ("arguments", "accept_content=pickle"),
    ("arguments", ["CELERY_ACCEPT_CONTENT=pickle"]),
    ("arguments", "--include=os"),
    ("arguments", "-c 4"),
    ("arguments", "'unbalanced"),
    ("arguments", "a\x00b"),
    ("arguments", ["ok", ""]),
    ("arguments", ["ok", 1]),
    ("arguments", ["-c", "1\n2"]),
    ("arguments", ["x" * 1001]),
    ("arguments", ["-l"] * 51),
    ("arguments", {"-c": 2}),
    ("arguments", 3),
    ("nowait", "maybe"),
    ("nowait", "2"),
    ("nowait", 1),
    ("nowait", None),
    ("nowait", ["true"]),
]


@pytest.mark.parametrize(
    "parameter, value",
    BAD_INSTANCE_SETTINGS,
    ids=[f"{p}={v!r}"[:40] for p, v in BAD_INSTANCE_SETTINGS],
)
@pytest.mark.parametrize("route", create_routes(), ids=CREATE_IDS)
def test_bad_instance_settings(h: Harness, route: Route, parameter: str, value: Any) -> None:
    before = h.dump()
    path = route.path(name="w2")
    if isinstance(value, str):
        response = h.request(route.method, f"{path}?{urlencode({parameter: value})}")
    else:
        response = h.json_request(route.method, path, {parameter: value})
    body = assert_refused(response, 400, parameter)
    assert body["parameter"] == parameter
    assert h.dump() == before


BAD_APP_SETTINGS: list[tuple[str, Any]] = [
    ("celery_app", "proj\n"),  # regression: "$" let a trailing newline through
    ("celery_app", "proj app"),
    ("celery_app", "proj;reboot"),
    ("celery_app", "proj:app:x"),
    ("celery_app", "1proj"),
    ("celery_app", "proj/app"),
    ("celery_app", "p" * 256),
    ("celery_app", 5),
    ("celery_app", ["proj"]),
    ("arguments", "-A other"),
    ("arguments", "-Aother"),
    ("arguments", "--app=other"),
    ("arguments", "-b amqp://x//"),
    ("arguments", "--autoscale=10,1"),
    ("arguments", "-B"),
    ("arguments", "worker_pool=evil:Pool"),
    ("arguments", '"unbalanced'),
    ("arguments", True),
    ("env", "not json"),
    ("env", "[]"),
    ("env", ["A=1"]),
    ("env", {"LD_PRELOAD": "/tmp/x.so"}),
    ("env", {"CELERY_LOADER": "evil:Loader"}),
    ("env", {"1A": "x"}),
    ("env", {"A": "two\nlines"}),
    ("env", {"A": 1}),
    ("workdir", "relative/dir"),
    ("workdir", "/usr/../tmp"),
    ("workdir", "/no/such/directory/for/scs"),
    ("workdir", "/tmp"),  # writable by every user
    ("workdir", "/dev/null"),
    ("workdir", 5),
    ("python", "python3"),
    ("python", "/no/such/python/for/scs"),
    ("python", "/etc"),
    ("python", "/dev/null"),
    ("python", "/usr/bin/python3\n"),
    ("task_events", "maybe"),
    ("task_events", 2),
]


@pytest.mark.parametrize("parameter, value", BAD_APP_SETTINGS, ids=[f"{p}={v!r}"[:40] for p, v in BAD_APP_SETTINGS])
@pytest.mark.parametrize("app", ["app1", "app2"], ids=["existing", "new"])
def test_bad_app_settings(h: Harness, parameter: str, value: Any, app: str) -> None:
    for method in ("PUT", "POST"):
        before = h.dump()
        if isinstance(value, str):
            response = h.request(method, f"/{app}/?{urlencode({parameter: value})}")
        else:
            response = h.json_request(method, f"/{app}/", {parameter: value})
        body = assert_refused(response, 400, parameter)
        assert body["parameter"] == parameter
        assert h.dump() == before


def test_good_settings_are_accepted(h: Harness) -> None:
    """The refusals above are of the values, not of the parameters."""
    response = h.request(
        "PUT",
        "/app1/?" + urlencode({"celery_app": "proj.celery:app", "arguments": "-l info -Ofair"}),
    )
    assert response.status == 200, response
    assert response.json()["arguments"] == ["-l", "info", "-Ofair"]
    response = h.json_request(
        "PUT",
        "/app1/instances/w2/",
        {"queues": "q1, q2", "arguments": ["-O", "fair", "--loglevel=info"], "nowait": "yes"},
    )
    assert response.status == 202, response
    assert response.json()["queues"] == ["q1", "q2"]
    response = h.request(
        "PUT",
        "/app1/queues/q3/?"
        + urlencode(
            {"exchange": "ex.1", "routing_key": "a.*.#", "exchange_type": "topic", "options": '{"durable": true}'}
        ),
    )
    assert response.status == 201, response
    assert response.json()["options"] == {"durable": True}


def raw_post(h: Harness, content_type: bytes, body: bytes, request_factory: Any) -> bytes:
    return h.raw(
        b"POST /app1/ HTTP/1.0\r\nHost: x\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body,
        request_factory,
    )


def test_twisted_parses_post_bodies_itself() -> None:
    """Why the agent's Site needs ``APIRequest``: with twisted.web's own
    Request, a POST with a malformed Content-Type raises before any resource
    runs (the connection is dropped unanswered) and a multipart body it
    cannot parse gets a bare 400 without JSON."""
    h = Harness()
    with pytest.raises((IndexError, ValueError)):
        raw_post(h, b";0*", b"x", Request)
    answer = raw_post(h, b"multipart/form-data; boundary=zz", b"\x00", Request)
    assert answer == b"HTTP/1.1 400 Bad Request\r\n\r\n"


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b";0*", b"x"),
        (b"\x0b\x01", b"x"),
        (b"multipart/form-data; boundary=zz", b"\x00"),
        (b"multipart/form-data", b"--zz\r\n"),
    ],
)
def test_post_with_a_broken_content_type_or_multipart_body(h: Harness, content_type: bytes, body: bytes) -> None:
    """Regression: with ``APIRequest`` these reach the API, which answers JSON."""
    before = h.dump()
    answer = raw_post(h, content_type, body, APIRequest)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 "), answer
    assert b"Content-Type: application/json" in head, answer
    assert isinstance(json.loads(content)["error"], str)
    assert h.dump() == before


def test_api_request_keeps_no_more_than_the_limit() -> None:
    request = APIRequest(DummyChannel())
    request.gotLength(10**9)
    for _ in range(100):
        request.handleContentChunk(b"x" * 10000)
    assert request.content.tell() == DEFAULT_MAX_BODY + 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_raw_body_gets_413(h: Harness, chunked: bool) -> None:
    before = h.dump()
    body = b"x=" + b"a" * 300_000
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
        body = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (body[i : i + 4096] for i in range(0, len(body), 4096))
            )
            + b"0\r\n\r\n"
        )
        version = b"HTTP/1.1"
    else:
        framing = b"Content-Length: %d\r\n" % len(body)
        version = b"HTTP/1.0"
    answer = h.raw(
        b"PUT /app1/ "
        + version
        + b"\r\nHost: x\r\nConnection: close\r\n"
        + framing
        + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        + body
    )
    assert answer.split(b" ", 2)[1] == b"413", answer[:200]
    assert b"application/json" in answer and b"larger than" in answer
    assert h.dump() == before


def test_api_request_still_reads_form_posts(h: Harness) -> None:
    answer = raw_post(h, b"application/x-www-form-urlencoded", b"celery_app=proj%3Aapp", APIRequest)
    assert answer.startswith(b"HTTP/1.0 200 "), answer
    assert h.store.get_app("app1").celery_app == "proj:app"


# -- conflicts -------------------------------------------------------------------


def test_conflict_leaves_the_store_unchanged(h: Harness) -> None:
    before = h.dump()
    response = h.request("PUT", "/app1/instances/w1/?max_concurrency=8")
    assert_refused(response, 409, "w1", "other settings")
    assert h.dump() == before


def test_conflict_in_another_app_creates_no_app(h: Harness) -> None:
    """Regression: the app named in the URL was created before the store
    found the conflict, so the 409 left a new app behind."""
    before = h.dump()
    response = h.request("PUT", "/app2/instances/w1/")
    assert_refused(response, 409, "w1")
    assert h.dump() == before


# -- property-based ------------------------------------------------------------------

# Text for names and values: everything, with the characters that matter
# for paths, queries and shells made likely.
SPECIAL = "/%?#&=;|$`<>()[]{}*!'\" \t\n\r\x00\x7f.,:@+-_~\\ö\u00a0\u2028\U00020000"
texts = st.text(alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8")), max_size=80)
names = st.one_of(st.sampled_from(["app1", "w1", "q1", "wörker-1", "", "..", "ping"]), texts)
parameter_names = st.one_of(
    st.sampled_from(sorted({p for r in ROUTES for p in r.accepts} | {"max", "min", "x"})),
    texts,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
methods = st.one_of(
    st.sampled_from(ALL_METHODS),
    st.text(alphabet=string.ascii_uppercase + "-_", min_size=1, max_size=8),
)
routes = st.sampled_from(ROUTES)
# Well-formed but arbitrary media types for StubTreq, whose server uses
# twisted.web's own Request: a malformed Content-Type on a POST breaks it
# (see test_twisted_parses_post_bodies_itself).  The raw property, on the
# agent's APIRequest, sends any bytes.
media_types = st.from_regex(
    r"[a-zA-Z]{1,10}/[a-zA-Z0-9.+-]{1,10}(; ?[a-z]{1,8}=[a-zA-Z0-9-]{1,8}){0,2}",
    fullmatch=True,
)
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def is_twisted_multipart_refusal(method: str, headers: dict[str, list[str]] | None, response: Response) -> bool:
    """twisted.web parses a multipart POST body itself, before any resource
    runs, and answers a bare 400 (no JSON) when it cannot (reported)."""
    content_type = ((headers or {}).get("Content-Type") or [""])[0]
    return (
        method == "POST"
        and content_type.split(";")[0].strip().lower() == "multipart/form-data"
        and response.status == 400
        and response.body == b""
    )


def check_response(
    h: Harness,
    before: Dump,
    response: Response,
    method: str = "",
    path: str = "",
    headers: dict[str, list[str]] | None = None,
) -> None:
    """The property every answer has: JSON, below 500, and a refusal leaves
    the store as it was.  (HEAD answers carry no body.)"""
    if response.status >= 400:
        assert h.dump() == before, response
    if is_stats_without_supervisor(path, response) or is_twisted_multipart_refusal(method, headers, response):
        return
    assert response.status < 500, response
    assert response.content_type == ["application/json"], response
    if method != "HEAD":
        body = response.json()
        if response.status >= 400:
            assert isinstance(body, dict) and isinstance(body["error"], str), body


@PROPERTY_SETTINGS
@given(
    route=routes,
    method=methods,
    segments=st.fixed_dictionaries({"app": names, "name": names, "queue": names}),
    query=st.lists(st.tuples(parameter_names, texts), max_size=4),
)
def test_property_paths_and_queries(
    route: Route, method: str, segments: dict[str, str], query: list[tuple[str, str]]
) -> None:
    h = Harness()
    before = h.dump()
    path = route.path(**segments)
    if query:
        path += "?" + urlencode(query)
    check_response(h, before, h.request(method, path), method, path)


@PROPERTY_SETTINGS
@given(
    route=routes,
    document=st.one_of(
        st.dictionaries(parameter_names, json_values, max_size=5),
        json_values,
    ),
)
def test_property_json_bodies(route: Route, document: Any) -> None:
    h = Harness()
    before = h.dump()
    path = route.path(name="w2")
    check_response(h, before, h.json_request(route.method, path, document), route.method, path)
    if isinstance(document, dict):
        # The same parameters as a form, where every value is text.
        form = urlencode([(k, v if isinstance(v, str) else json.dumps(v)) for k, v in document.items()])
        before = h.dump()
        path = route.path(name="w3")
        response = h.request(route.method, path, form.encode(), FORM)
        check_response(h, before, response, route.method, path)


@PROPERTY_SETTINGS
@given(
    route=routes,
    parameters=st.dictionaries(
        st.sampled_from(sorted({p for r in ROUTES for p in r.accepts} | {"max", "min"})),
        st.one_of(texts, st.integers(-300, 300).map(str), json_values),
        max_size=4,
    ),
    as_json=st.booleans(),
)
def test_property_known_parameters(route: Route, parameters: dict[str, Any], as_json: bool) -> None:
    """Known parameter names with arbitrary values reach every validator."""
    h = Harness()
    before = h.dump()
    path = route.path(name="w2", queue="q2")
    if as_json:
        response = h.json_request(route.method, path, parameters)
    else:
        pairs = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in parameters.items()]
        response = h.request(route.method, f"{path}?{urlencode(pairs)}")
    check_response(h, before, response, route.method, path)


@PROPERTY_SETTINGS
@given(
    route=routes,
    body=st.binary(max_size=300),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(
            [
                "application/json",
                "application/x-www-form-urlencoded",
                "text/plain",
                "application/json; charset=latin-1",
                "multipart/form-data; boundary=x",
                "application/octet-stream",
            ]
        ),
        media_types,
    ),
    escaped_path=st.binary(min_size=1, max_size=12),
)
def test_property_bytes(route: Route, body: bytes, content_type: str | None, escaped_path: bytes) -> None:
    h = Harness()
    headers = None if content_type is None else {"Content-Type": [content_type]}
    before = h.dump()
    path = route.path()
    response = h.request(route.method, path, body, headers)
    check_response(h, before, response, route.method, path, headers)
    # Arbitrary bytes as a percent-escaped name in each slot.
    for slot in route.slots:
        before = h.dump()
        path = route.path(**{slot: "SLOT"}).replace("SLOT", quote(escaped_path, safe=""), 1)
        check_response(h, before, h.request(route.method, path), route.method, path)


def _iter_raw_targets() -> Iterator[bytes]:
    for route in ROUTES:
        yield route.path().encode()


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from([m.encode() for m in ALL_METHODS] + [b"FOO"]),
    target=st.sampled_from(list(_iter_raw_targets())),
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"Content-Type", b"Host", b"X-Anything", b"Content-Length"]),
            st.one_of(
                st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                media_types.map(str.encode),
            ),
        ),
        max_size=3,
    ),
    body=st.binary(max_size=100),
)
def test_property_raw_http(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Raw requests with arbitrary header bytes: whatever reaches the API
    answers JSON below 500; twisted.web itself may refuse a bare 400."""
    h = Harness()
    before = h.dump()
    head = method + b" " + target + b" HTTP/1.0\r\n"
    if not any(name == b"Host" for name, _ in headers):
        head += b"Host: x\r\n"
    if not any(name == b"Content-Length" for name, _ in headers):
        head += b"Content-Length: %d\r\n" % len(body)
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    answer = h.raw(head + b"\r\n" + body)
    if not answer:  # a Content-Length longer than the body: still reading
        assert h.dump() == before
        return
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split(b" ")[1])
    if status == 503 and target.endswith(b"/stats/"):
        # stats without a supervisor (HEAD: the same answer without a body)
        assert method == b"HEAD" or b"no supervisor" in answer, answer
        return
    assert status < 500, answer
    if status >= 400:
        assert h.dump() == before, answer
    if status_line.startswith(b"HTTP/1.0"):  # the API answered, not the framing
        head_out, _, content = rest.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head_out, answer
        if method != b"HEAD":
            json.loads(content)


SITE_PATHS = [
    "/admin",
    "/admin/",
    "/admin/login",
    "/admin/logout",
    "/admin/apps",
    "/admin/instances",
    "/admin/instance/enable",
    "/admin/instance/delete",
    "/admin/queues",
    "/admin/queues/delete",
    "/admin/nothing/here",
    "/metrics",
    "/metrics/",
]
FORM_FIELDS = sorted(
    {p for r in ROUTES for p in r.accepts}
    | {"app", "name", "instance", "queue", "token", "csrf", "action", "max", "min"}
)


@PROPERTY_SETTINGS
@given(
    path=st.one_of(
        st.sampled_from(SITE_PATHS),
        st.builds(lambda route, app, name: route.path(app=app, name=name), routes, names, names),
    ),
    method=methods,
    query=st.lists(st.tuples(parameter_names, texts), max_size=3),
    form=st.lists(st.tuples(st.sampled_from(FORM_FIELDS), texts), max_size=5),
    token=st.sampled_from([None, "s3cret-token"]),
    send_token=st.booleans(),
)
def test_property_whole_site(
    path: str,
    method: str,
    query: list[tuple[str, str]],
    form: list[tuple[str, str]],
    token: str | None,
    send_token: bool,
) -> None:
    """The site the daemon serves (admin page, /metrics, the token guard
    around the API) never answers 5xx and refuses without changing the
    store; outside the admin page and /metrics every answer is JSON."""
    h = Harness(site=True, token=token)
    before = h.dump()
    headers = dict(FORM)
    if token is not None and send_token:
        headers["Authorization"] = [f"Bearer {token}"]
    target = path + ("?" + urlencode(query) if query else "")
    response = h.request(method, target, urlencode(form).encode(), headers)
    if response.status >= 400:
        assert h.dump() == before, response
    if is_stats_without_supervisor(path, response):
        return
    assert response.status < 500, response
    if not path.startswith(("/admin/", "/metrics")) or method not in ALL_METHODS:
        assert response.content_type == ["application/json"], response
        if method != "HEAD":
            response.json()


def test_admin_without_slash_redirects_in_json() -> None:
    """Regression: Werkzeug's redirect from "/admin" to "/admin/" was HTML."""
    h = Harness(site=True)
    response = h.request("GET", "/admin")
    assert response.status == 308, response
    # A path alone: a redirect never echoes the Host the client sent.
    assert response.headers["location"] == ["/admin/"]
    assert assert_json(response) == {"location": "/admin/"}
