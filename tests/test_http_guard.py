"""The HTTP door (scs.http.guard): Host and Origin checks on the whole site,
head size and time limits, the connection cap, the check of the address
actually bound, and the options that set them.

Raw bytes go into the agent's own ``LimitedSite`` on a ``StringTransport``
whose local address plays the listening socket; time is a
``MemoryReactorClock``.  Nothing here touches the global reactor or sleeps.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from scs.agent import Agent, LocalAgent
from scs.http.api import API
from scs.http.auth import TokenAuth
from scs.http.guard import (
    FD_RESERVE,
    BadHost,
    ConnectionCap,
    HTTPServerService,
    LimitedSite,
    connection_cap_for,
    parse_host,
)
from scs.http.params import APIRequest
from scs.metrics import AgentMetrics
from scs.store import Store
from scs.tap import Options, endpoint_interface, endpoint_is_loopback, http_resource

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 8001)
TOKEN = "0123456789abcdef-token"


# -- harness -------------------------------------------------------------------


class Door:
    """The whole site of one agent (in-memory store, no supervisor) behind
    ``LimitedSite``, fed raw bytes."""

    def __init__(
        self,
        allowed_hosts: tuple[str, ...] = (),
        token: str | None = None,
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.store = Store.in_memory()
        agent = Agent(LocalAgent(self.store, "agent1", BROKER))
        auth = TokenAuth(token) if token else None
        self.clock = MemoryReactorClock()
        self.site = LimitedSite(
            http_resource(agent, AgentMetrics(agent), auth, allowed_hosts=allowed_hosts),
            requestFactory=APIRequest,
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
            reactor=self.clock,
        )

    def connect(self, local: Any = LOOPBACK) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(local)
        transport = StringTransport(hostAddress=local, peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(transport)
        return protocol, transport

    def raw(self, data: bytes, local: Any = LOOPBACK) -> tuple[int, dict[str, str], bytes]:
        protocol, transport = self.connect(local)
        protocol.dataReceived(data)
        return parse_answer(transport.value())

    def request(
        self,
        method: str,
        path: str,
        host: str | None = "127.0.0.1:8001",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        local: Any = LOOPBACK,
        version: str = "HTTP/1.0",
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} {version}\r\n"
        if host is not None:
            head += f"Host: {host}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        return self.raw(head.encode("latin-1") + body, local)


def parse_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    assert answer, "no answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_json_error(answer: tuple[int, dict[str, str], bytes], status: int, mention: str = "") -> None:
    code, headers, body = answer
    assert code == status, answer
    assert headers.get("content-type") == "application/json", answer
    error = json.loads(body)["error"]
    assert mention.lower() in error.lower(), error


@pytest.fixture
def door() -> Door:
    return Door()


# -- Host ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8001", ("localhost", 8001)),
        ("127.0.0.1:8001", ("127.0.0.1", 8001)),
        ("[::1]:8001", ("::1", 8001)),
        ("[0:0::1]", ("::1", None)),
        ("scs.example.com.", ("scs.example.com", None)),
        ("x:", ("x", None)),
        ("my_host-1", ("my_host-1", None)),
    ],
)
def test_parse_host(value: str, expected: tuple[str, int | None]) -> None:
    assert parse_host(value) == expected
    assert parse_host(value.encode()) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b".",
        b"..",
        b"a..b",
        b"-a",
        b"a b",
        b"x:abc",
        b"x:99999",
        b"::1",
        b"[::1",
        b"[::g]",
        b"[::1]x",
        b"a@b",
        b"a/b",
        b"\xff",
        b"h\xc3\xa9",
        b"999.1.1.1",
        b"x" * 64,
        b"%41",
    ],
)
def test_parse_host_refuses_what_is_not_a_host(value: bytes) -> None:
    with pytest.raises(BadHost):
        parse_host(value)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8001", "127.0.0.1", "localhost:8001", "LOCALHOST", "127.3.2.1:8001", "[::1]:8001", "[::1]"],
)
def test_loopback_hosts_with_the_agent_port_or_none_are_served(door: Door, host: str) -> None:
    status, _, body = door.request("GET", "/ping/", host=host)
    assert (status, json.loads(body)) == (200, {"ok": "pong"})


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8001", "localhost:9999", "127.0.0.1:80", "10.0.0.6:8001", "0.0.0.0:8001"],
)
def test_other_hosts_get_400_and_change_nothing(door: Door, host: str) -> None:
    before = door.store.dump()
    assert_json_error(door.request("PUT", "/app1/", host=host), 400, "not served")
    assert_json_error(door.request("GET", "/ping/", host=host), 400, "--allowed-host")
    assert door.store.dump() == before


def test_dns_rebinding_cannot_reach_admin_or_metrics(door: Door) -> None:
    for method, path in (("GET", "/admin/"), ("POST", "/admin/apps"), ("GET", "/metrics")):
        assert_json_error(door.request(method, path, host="rebind.attacker.example:8001"), 400)


def test_the_address_the_connection_arrived_on_is_served() -> None:
    door = Door()
    local = IPv4Address("TCP", "192.0.2.5", 8001)
    assert door.request("GET", "/ping/", host="192.0.2.5:8001", local=local)[0] == 200
    assert door.request("GET", "/ping/", host="192.0.2.5", local=local)[0] == 200
    assert_json_error(door.request("GET", "/ping/", host="192.0.2.5:8002", local=local), 400)
    assert_json_error(door.request("GET", "/ping/", host="192.0.2.6:8001", local=local), 400)
    # An IPv4 client on an IPv6 wildcard socket.
    mapped = IPv6Address("TCP", "::ffff:192.0.2.5", 8001)
    assert door.request("GET", "/ping/", host="192.0.2.5:8001", local=mapped)[0] == 200
    v6 = IPv6Address("TCP", "2001:db8::5", 8001)
    assert door.request("GET", "/ping/", host="[2001:db8::5]:8001", local=v6)[0] == 200


def test_allowed_host_names_any_port_and_name_port_only_that() -> None:
    door = Door(allowed_hosts=("SCS.example.com", "other.example:8443"))
    assert door.request("GET", "/ping/", host="scs.example.com")[0] == 200
    assert door.request("GET", "/ping/", host="scs.example.com:443")[0] == 200
    assert door.request("GET", "/ping/", host="other.example:8443")[0] == 200
    assert_json_error(door.request("GET", "/ping/", host="other.example"), 400)
    assert_json_error(door.request("GET", "/ping/", host="evil.scs.example.com"), 400)


def test_malformed_and_repeated_host_headers_get_json_400(door: Door) -> None:
    for host in (".", ".\x04q", "a b", "x:abc", "[::1", "\xff"):
        assert_json_error(door.request("GET", "/ping/", host=host), 400)
    answer = door.raw(b"GET /ping/ HTTP/1.0\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
    assert_json_error(answer, 400, "more than one")


def test_the_api_alone_refuses_a_host_werkzeug_cannot_read() -> None:
    """Regression (hypothesis, test_property_raw_http): "Host: ." made
    Werkzeug raise BadHost, answered as a 500 HTML page."""

    store = Store.in_memory()
    site = LimitedSite(
        API(Agent(LocalAgent(store, "agent1", BROKER))).resource(),
        requestFactory=APIRequest,
        reactor=MemoryReactorClock(),
    )
    for host in (b".", b".\x04q", b"a..b"):
        protocol = site.buildProtocol(LOOPBACK)
        transport = StringTransport(hostAddress=LOOPBACK)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"DELETE /app1/instances/w1/stats/ HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        assert_json_error(parse_answer(transport.value()), 400, "host")


def test_missing_host_only_in_http10_on_loopback(door: Door) -> None:
    assert door.request("GET", "/ping/", host=None)[0] == 200
    unix = UNIXAddress(b"/run/scs.sock")
    assert door.request("GET", "/ping/", host="localhost", local=unix)[0] == 200
    assert_json_error(door.request("GET", "/ping/", host=None, local=unix), 400, "required")
    remote = IPv4Address("TCP", "192.0.2.5", 8001)
    assert_json_error(door.request("GET", "/ping/", host=None, local=remote), 400, "Host header is required")
    assert_json_error(door.request("GET", "/ping/", host=None, version="HTTP/1.1"), 400, "required")


def test_redirects_never_echo_the_host() -> None:
    door = Door(allowed_hosts=("scs.example.com",))
    status, headers, body = door.request("GET", "/admin", host="scs.example.com")
    assert status == 308
    assert headers["location"] == "/admin/"
    assert json.loads(body) == {"location": "/admin/"}


# -- Origin ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9999"},
        {"Origin": "http://127.0.0.1"},
        {"Origin": "https://127.0.0.1:8001"},
        {"Origin": "http://127.0.0.1:8001/path"},
        {"Origin": "garbage"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "who-knows"},
        {"Origin": "http://127.0.0.1:8001", "Sec-Fetch-Site": "cross-site"},
    ],
)
@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_state_changing_requests_from_another_origin_get_403(door: Door, headers: dict[str, str], method: str) -> None:
    before = door.store.dump()
    assert_json_error(door.request(method, "/app1/", headers=headers), 403, "refused")
    assert door.store.dump() == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://127.0.0.1:8001"},
        {"Origin": "HTTP://127.0.0.1:8001"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {"Origin": "http://127.0.0.1:8001", "Sec-Fetch-Site": "same-origin"},
    ],
)
def test_same_origin_and_non_browser_requests_pass(door: Door, headers: dict[str, str]) -> None:
    assert door.request("PUT", "/app1/", headers=headers)[0] == 201


def test_origin_with_default_port_matches_host_without_port() -> None:
    door = Door(allowed_hosts=("scs.example.com",))
    ok = {"Origin": "http://scs.example.com"}
    assert door.request("PUT", "/app1/", host="scs.example.com", headers=ok)[0] == 201
    assert door.request("PUT", "/app2/", host="scs.example.com:80", headers=ok)[0] == 201
    # Behind a TLS proxy the agent sees plain HTTP for an https page.
    tls = {"Origin": "https://scs.example.com"}
    assert door.request("PUT", "/app3/", host="scs.example.com", headers=tls)[0] == 201
    assert_json_error(door.request("PUT", "/app4/", host="scs.example.com:8001", headers=tls), 403)


def test_reads_are_not_origin_checked(door: Door) -> None:
    for method in ("GET", "HEAD", "OPTIONS"):
        status = door.request(method, "/ping/", headers={"Origin": "http://evil.example"})[0]
        assert status in (200, 405), method


def test_admin_forms_from_another_origin_are_refused_before_the_page(door: Door) -> None:
    before = door.store.dump()
    answer = door.request("POST", "/admin/apps", headers={"Origin": "http://evil.example"}, body=b"name=x&csrf=y")
    assert_json_error(answer, 403)
    assert door.store.dump() == before


def test_host_is_checked_before_the_token() -> None:
    door = Door(token=TOKEN)
    assert_json_error(door.request("GET", "/ping/", host="evil.example"), 400)
    assert door.request("GET", "/ping/")[0] == 401
    ok = door.request("GET", "/ping/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok[0] == 200


# -- head limits and timeouts ---------------------------------------------------------


def test_a_20kb_header_gets_431_json(door: Door) -> None:
    protocol, transport = door.connect()
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    status, headers, body = parse_answer(transport.value())
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert "16384" in json.loads(body)["error"]
    assert transport.disconnecting


def test_many_small_headers_over_the_total_get_431(door: Door) -> None:
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    answer = door.raw(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + lines + b"\r\n")
    assert_json_error(answer, 431)


def test_too_many_header_lines_get_431(door: Door) -> None:
    lines = b"".join(b"X: %d\r\n" % i for i in range(600))
    assert_json_error(door.raw(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + lines + b"\r\n"), 431)


def test_a_head_just_under_the_limit_is_served(door: Door) -> None:
    answer = door.raw(b"GET /ping/ HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 15000 + b"\r\n\r\n")
    assert answer[0] == 200


def test_a_slow_head_gets_408_after_the_header_timeout(door: Door) -> None:
    protocol, transport = door.connect()
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    door.clock.advance(5)
    protocol.dataReceived(b"X-Slow: 1\r\n")  # bytes keep coming: not idle
    door.clock.advance(4.9)
    assert not transport.disconnecting
    door.clock.advance(0.2)
    assert_json_error(parse_answer(transport.value()), 408, "10 s")
    assert transport.disconnecting


def test_a_silent_connection_is_closed_after_the_header_timeout(door: Door) -> None:
    _protocol, transport = door.connect()
    door.clock.advance(9.9)
    assert not transport.disconnecting
    door.clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_kept_alive_connection_idles_until_the_idle_timeout() -> None:
    door = Door(header_timeout=10, idle_timeout=30)
    protocol, transport = door.connect()
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"pong" in transport.value()
    transport.clear()
    door.clock.advance(20)  # past the header timeout: no request under way
    assert not transport.disconnecting
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"pong" in transport.value()
    door.clock.advance(29)
    assert not transport.disconnecting
    door.clock.advance(2)
    assert transport.disconnecting


def test_the_head_deadline_restarts_for_each_request() -> None:
    door = Door(header_timeout=10, idle_timeout=300)
    protocol, transport = door.connect()
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    door.clock.advance(50)
    protocol.dataReceived(b"GET /ping/ HTTP/1.1\r\n")
    door.clock.advance(9)
    assert not transport.disconnecting
    door.clock.advance(2)
    assert transport.disconnecting
    assert b"408" in transport.value()


# -- connection cap -------------------------------------------------------------------


def _open(cap: ConnectionCap, port: int) -> tuple[Any, StringTransport]:
    address = IPv4Address("TCP", "127.0.0.1", port)
    protocol = cap.buildProtocol(address)
    if protocol is None:
        return None, None  # type: ignore[return-value]
    transport = StringTransport(hostAddress=LOOPBACK, peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def test_connection_over_the_cap_replaces_the_oldest_idle_one(door: Door) -> None:
    cap = ConnectionCap(door.site, max_connections=3)
    opened = [_open(cap, 40000 + i) for i in range(3)]
    assert len(cap.protocols) == 3
    newest, newest_transport = _open(cap, 40010)
    assert newest is not None
    assert opened[0][1].disconnected  # aborted
    assert not opened[1][1].disconnecting
    assert len(cap.protocols) == 3
    # The aborted connection going away does not upset the count.
    opened[0][0].connectionLost(None)
    assert len(cap.protocols) == 3
    newest.dataReceived(b"GET /ping/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"pong" in newest_transport.value()


def test_busy_connections_are_never_evicted(door: Door) -> None:
    cap = ConnectionCap(door.site, max_connections=2)
    opened = [_open(cap, 40000 + i) for i in range(2)]
    for protocol, _ in opened:
        protocol.wrappedProtocol._handlingRequest = True  # a request under way
    assert _open(cap, 40010) == (None, None)
    assert cap.refused == 1
    assert not any(t.disconnecting for _, t in opened)
    opened[1][0].wrappedProtocol._handlingRequest = False
    assert _open(cap, 40011)[0] is not None
    assert opened[1][1].disconnected


def test_the_cap_keeps_descriptors_for_the_agent() -> None:
    assert connection_cap_for(1000, 20000) == 1000
    assert connection_cap_for(1000, 1024) == 1024 - FD_RESERVE
    assert connection_cap_for(1000, 100) == 1


# -- the address actually bound ----------------------------------------------------------


class _Port:
    def __init__(self, address: Any) -> None:
        self.address = address
        self.stopped = False

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> Any:
        self.stopped = True
        return succeed(None)


class _Endpoint:
    def __init__(self, address: Any) -> None:
        self.port = _Port(address)
        self.factory: Any = None

    def listen(self, factory: Any) -> Any:
        self.factory = factory
        return succeed(self.port)


def _service(address: Any, allow_public: bool = False, soft: int = 20000) -> tuple[HTTPServerService, _Endpoint]:
    endpoint = _Endpoint(address)
    service = HTTPServerService(
        endpoint,
        Door().site,
        max_connections=1000,
        allow_public=allow_public,
        fd_limit=lambda: (soft, soft),
    )
    return service, endpoint


def test_a_non_loopback_bind_stops_the_agent_without_token_or_allow_remote() -> None:
    service, endpoint = _service(IPv4Address("TCP", "0.0.0.0", 8001))
    with pytest.raises(SystemExit) as e:
        service.privilegedStartService()
    assert e.value.code == 1
    assert endpoint.port.stopped


@pytest.mark.parametrize(
    "address, allow_public",
    [
        (IPv4Address("TCP", "127.0.0.1", 8001), False),
        (IPv6Address("TCP", "::1", 8001), False),
        (UNIXAddress(b"/run/scs.sock"), False),
        (IPv4Address("TCP", "0.0.0.0", 8001), True),
    ],
)
def test_loopback_binds_or_allowed_public_ones_start(address: Any, allow_public: bool) -> None:
    service, endpoint = _service(address, allow_public)
    service.privilegedStartService()
    assert service.port is endpoint.port and not endpoint.port.stopped
    assert isinstance(endpoint.factory, ConnectionCap)
    assert endpoint.factory.max_connections == 1000


def test_a_low_open_files_limit_lowers_the_cap() -> None:
    service, endpoint = _service(IPv4Address("TCP", "127.0.0.1", 8001), soft=1024)
    service.privilegedStartService()
    assert endpoint.factory.max_connections == 1024 - FD_RESERVE


# -- options -----------------------------------------------------------------------------


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["-i", "a", "--without-srs", *argv])
    return options


def test_http_limit_options_and_defaults() -> None:
    options = parse()
    assert options["max-connections"] == 1000
    assert options["http-header-timeout"] == 10.0
    assert options["http-idle-timeout"] == 60.0
    assert options["allowed-host"] == []
    options = parse(
        "--max-connections",
        "50",
        "--http-header-timeout",
        "2.5",
        "--http-idle-timeout",
        "7",
        "--allowed-host",
        "scs.example.com",
        "--allowed-host",
        "other.example:8443",
    )
    assert options["max-connections"] == 50
    assert (options["http-header-timeout"], options["http-idle-timeout"]) == (2.5, 7.0)
    assert options["allowed-host"] == ["scs.example.com", "other.example:8443"]


@pytest.mark.parametrize(
    "argv, mention",
    [
        (["--max-connections", "0"], "--max-connections"),
        (["--http-header-timeout", "0"], "--http-header-timeout"),
        (["--http-idle-timeout", "-1"], "--http-idle-timeout"),
        (["--allowed-host", "a b"], "--allowed-host"),
        (["--allowed-host", "http://x/"], "--allowed-host"),
        (["--http", "tcp:8001:interface=127.0.0.1:interface=0.0.0.0"], "interface= twice"),
        (["--http", "tcp:notaport:interface=127.0.0.1"], "bad endpoint"),
    ],
)
def test_bad_http_options_are_refused(argv: list[str], mention: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert mention in str(e.value)


def test_endpoints_are_read_as_twisted_reads_them() -> None:
    assert endpoint_interface("tcp:8001:interface=127.0.0.1") == "127.0.0.1"
    assert endpoint_interface("tcp:8001") == ""
    assert endpoint_interface("tcp6:8001:interface=\\:\\:1") == "::1"
    assert endpoint_interface("tcp:interface=127.0.0.1:port=8001") == "127.0.0.1"
    assert endpoint_interface("unix:/tmp/x") is None
    assert not endpoint_is_loopback("tcp:8001:interface=0.0.0.0:backlog=5")
    assert endpoint_is_loopback("tcp:port=8001:interface=127.0.0.2")
    with pytest.raises(usage.UsageError):
        endpoint_is_loopback("tcp:8001:interface=127.0.0.1:interface=0.0.0.0")
