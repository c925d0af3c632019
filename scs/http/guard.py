"""The HTTP door: what every request and connection passes before the API,
the admin page or ``/metrics`` see it.

- ``HostOriginGuard`` (a resource wrapping the whole site) answers 400 to a
  ``Host`` the agent does not serve, which defeats DNS rebinding, and 403 to
  a state-changing request that a browser sent from another origin
  (``Origin``, ``Sec-Fetch-Site``), so that no web page can drive the API.
- ``LimitedChannel`` (the ``HTTPChannel`` of ``LimitedSite``) bounds the
  time a client may take to send a request head and answers 431 (JSON) to
  a head that is too large, where twisted.web would drop the connection
  without an answer.
- ``ConnectionCap`` (a wrapping factory) bounds the open connections, so
  that idle sockets cannot eat the file descriptors the supervisor needs to
  spawn workers; a connection over the cap replaces the oldest idle one, so
  a flood of idle sockets cannot lock operators out either.

Allowed hosts: ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``)
and the local address the connection arrived on, each without a port or
with the port the connection arrived on; and each ``--allowed-host`` name
(``NAME`` with any port, ``NAME:PORT`` with that one).  A request without a
``Host`` is accepted only in HTTP/1.0 and only on a loopback TCP connection:
browsers always send ``Host``, and HTTP/1.1 requires it (on a Unix socket,
send ``Host: localhost``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import resource
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

log = Logger(namespace="scs.http.guard")

# Methods that must not change anything: no origin check for them.
SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))
# Sec-Fetch-Site values of a request the page of this agent (or no page at
# all: typed URL, bookmark, curl) sent.  "same-site" is another port or
# subdomain of the same site: another origin, refused.
TRUSTED_FETCH_SITES = frozenset((b"same-origin", b"none"))

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
# File descriptors kept out of the connection cap's reach: the store, logs,
# the broker connection, and three pipes per worker spawned.
FD_RESERVE = 256

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class BadHost(ValueError):
    """A ``Host`` (or ``Origin`` authority) that is not a well-formed host."""


def parse_host(value: bytes | str) -> tuple[str, int | None]:
    """``host[:port]`` (RFC 3986 authority without user info) to a
    normalised host (lower case; IPv6 without brackets, compressed) and a
    port (``None`` when absent or empty).  Raises ``BadHost``."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise BadHost("the Host header is not ASCII") from None
    text = value
    if not text:
        raise BadHost("the Host header is empty")
    if text.startswith("["):
        literal, sep, rest = text[1:].partition("]")
        if not sep:
            raise BadHost(f"unclosed IPv6 literal in host {value!r}")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise BadHost(f"bad IPv6 address in host {value!r}") from None
        if rest and not rest.startswith(":"):
            raise BadHost(f"junk after the IPv6 literal in host {value!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _sep, port_text = text.partition(":")
        if ":" in port_text:
            raise BadHost(f"too many colons in host {value!r} (IPv6 needs brackets)")
        if host.endswith("."):
            host = host[:-1]  # the fully qualified form of the same name
        labels = host.split(".")
        if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
            raise BadHost(f"host {value!r} is not a DNS name or an IP address")
        if all(label.isdigit() for label in labels):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise BadHost(f"bad IPv4 address in host {value!r}") from None
        host = host.lower()
    if port_text == "":
        return host, None
    if not _PORT.match(port_text) or int(port_text) > 65535:
        raise BadHost(f"bad port in host {value!r}")
    return host, int(port_text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


def _local_is_loopback(local: Any) -> bool:
    """Whether the connection arrived on a loopback TCP address."""
    if isinstance(local, (IPv4Address, IPv6Address)):
        address = _ip(local.host)
        return address is not None and address.is_loopback
    return False


def _error(request: IRequest, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps({"error": message}).encode()


class HostOriginGuard(Resource):
    """400 for a Host the agent does not serve, 403 for a state-changing
    request from another origin; every other request goes to ``wrapped``
    (a leaf resource, as the whole site is)."""

    isLeaf = True

    def __init__(self, wrapped: IResource, allowed_hosts: Iterable[str] = ()) -> None:
        super().__init__()
        self.wrapped = wrapped
        # (name, port or None): None allows any port.
        self.allowed = frozenset(parse_host(name) for name in allowed_hosts)

    def render(self, request: IRequest) -> Any:
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            return self._refuse(request, 400, "more than one Host header")
        local = request.getHost()
        if not hosts:
            if request.clientproto == b"HTTP/1.0" and _local_is_loopback(local):
                return self._check_origin(request, None)
            return self._refuse(request, 400, "a Host header is required")
        try:
            host, port = parse_host(hosts[0].strip())
        except BadHost as e:
            return self._refuse(request, 400, str(e))
        if not self._host_allowed(host, port, local):
            return self._refuse(
                request,
                400,
                f"this agent is not served as {hosts[0].decode('ascii', 'replace')!r} (see --allowed-host)",
            )
        return self._check_origin(request, (host, port))

    def _host_allowed(self, host: str, port: int | None, local: Any) -> bool:
        if (host, None) in self.allowed or (host, port) in self.allowed:
            return True
        local_ip = _ip(local.host) if isinstance(local, (IPv4Address, IPv6Address)) else None
        if _is_loopback_name(host) or (local_ip is not None and _ip(host) == local_ip):
            local_port = getattr(local, "port", None)
            return port is None or local_port is None or port == local_port
        return False

    def _check_origin(self, request: IRequest, authority: tuple[str, int | None] | None) -> Any:
        if request.method not in SAFE_METHODS:
            fetch_sites = request.requestHeaders.getRawHeaders(b"sec-fetch-site") or []
            if any(s.strip().lower() not in TRUSTED_FETCH_SITES for s in fetch_sites):
                return self._refuse(request, 403, "cross-site request refused (Sec-Fetch-Site)", origin=True)
            origins = request.requestHeaders.getRawHeaders(b"origin") or []
            if len(origins) > 1 or (origins and not self._same_origin(request, origins[0].strip(), authority)):
                return self._refuse(request, 403, "cross-origin request refused (Origin)", origin=True)
        return self.wrapped.render(request)

    def _same_origin(self, request: IRequest, origin: bytes, authority: tuple[str, int | None] | None) -> bool:
        if authority is None:
            return False  # a browser always sends Host
        try:
            parts = urlsplit(origin.decode("ascii"))
            origin_host, origin_port = parse_host(parts.netloc)
        except (UnicodeDecodeError, ValueError):
            return False  # "null" lands here too
        if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
            return False
        default = 443 if parts.scheme == "https" else 80
        host, port = authority
        if (origin_host, origin_port or default) != (host, port or default):
            return False
        served = "https" if request.isSecure() else "http"
        # Behind an --allowed-host name a TLS proxy may front the agent:
        # the agent cannot see the scheme the browser used.
        named = (host, None) in self.allowed or (host, port) in self.allowed
        return parts.scheme == served or named

    def _refuse(self, request: IRequest, status: int, message: str, origin: bool = False) -> bytes:
        log.info(
            "refused {method} {path}: {why}",
            method=request.method.decode("latin-1")[:20],
            path=request.path.decode("latin-1")[:200],
            why=message,
            event="http.origin_refused" if origin else "http.host_refused",
        )
        return _error(request, status, message)


# -- connections ------------------------------------------------------------------


def _raw_answer(status: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body


class LimitedChannel(HTTPChannel):
    """An ``HTTPChannel`` with a deadline on request heads and a JSON 431
    for heads over ``totalHeadersSize`` bytes or ``maxHeaders`` lines.

    A connection must send a complete request head within
    ``headerTimeout`` seconds of connecting, and within as long of the
    first byte of each further request on a kept-alive connection; the
    idle timeout (``timeOut``, set by the site) covers the silence between
    requests and while a body arrives."""

    headerTimeout: float | None = DEFAULT_HEADER_TIMEOUT
    _headTimer: Any = None
    _awaitingHead = True
    _headBytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self._awaitingHead = True
        self._startHeadTimer()

    def dataReceived(self, data: bytes) -> None:
        if self._awaitingHead and data:
            self._headBytes += len(data)
            if self._headTimer is None:
                self._startHeadTimer()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> Any:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._headTooLarge()
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> Any:
        return self._headTooLarge()

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._headTooLarge()
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        self._awaitingHead = False
        self._headBytes = 0
        self._cancelHeadTimer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Before the parent replays pipelined bytes into dataReceived.
        self._awaitingHead = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancelHeadTimer()
        super().connectionLost(reason)

    def _startHeadTimer(self) -> None:
        if self.headerTimeout:
            self._headTimer = self.callLater(self.headerTimeout, self._headTimedOut)

    def _cancelHeadTimer(self) -> None:
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if not self._awaitingHead or self.transport is None:
            return
        if self._headBytes:
            self.transport.write(
                _raw_answer(
                    b"408 Request Timeout",
                    f"the request head did not arrive within {self.headerTimeout:g} s",
                )
            )
        self._stopReading()
        self.loseConnection()
        # As the idle timeout does: a client that does not read its answer
        # is cut off after abortTimeout.
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _headTooLarge(self) -> None:
        self._cancelHeadTimer()
        self.transport.write(
            _raw_answer(
                b"431 Request Header Fields Too Large",
                f"the request head is over {self.totalHeadersSize} bytes or {self.maxHeaders} header lines",
            )
        )
        self._stopReading()
        self.loseConnection()

    def _stopReading(self) -> None:
        # Whatever else the client sends is not read (and not answered).
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]


class LimitedSite(Site):
    """The agent's ``Site``: ``LimitedChannel`` connections, an idle timeout
    (``timeout``) and a request-head deadline (``header_timeout``)."""

    protocol = LimitedChannel

    def __init__(
        self,
        resource: IResource,
        *,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, **kwargs)
        self.header_timeout = header_timeout
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.headerTimeout = self.header_timeout
        return channel


class ConnectionCap(WrappingFactory):
    """At most ``max_connections`` open connections to ``wrappedFactory``.

    A connection over the cap closes (aborts) the oldest connection that is
    not in the middle of a request (an ``HTTPChannel`` not handling one);
    when every connection is busy the new one is closed at once."""

    protocol = ProtocolWrapper

    def __init__(self, wrappedFactory: Any, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        super().__init__(wrappedFactory)
        self.max_connections = max_connections
        self.evicted = 0
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.max_connections and not self._evict_one():
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warn(
                    "HTTP connection cap ({cap}) reached with every connection busy: refused {n} connection(s) so far",
                    cap=self.max_connections,
                    n=self.refused,
                )
            return None
        return super().buildProtocol(addr)

    def _evict_one(self) -> bool:
        for wrapper in self.protocols:  # oldest first
            if not getattr(wrapper.wrappedProtocol, "_handlingRequest", False):
                del self.protocols[wrapper]
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 1000 == 0:
                    log.warn(
                        "HTTP connection cap ({cap}) reached: closing the oldest idle connections ({n} so far)",
                        cap=self.max_connections,
                        n=self.evicted,
                    )
                transport = wrapper.transport
                if transport is not None:
                    transport.abortConnection()
                return True
        return False

    def unregisterProtocol(self, p: Any) -> None:
        # An evicted connection was already forgotten when it was aborted.
        self.protocols.pop(p, None)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard)
    as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("could not raise the open files limit to {hard}: {error}", hard=hard, error=e)
    return soft, hard


def connection_cap_for(max_connections: int, fd_limit: int) -> int:
    """``max_connections`` lowered so that ``FD_RESERVE`` descriptors stay
    free for the rest of the agent."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit < 0:
        return max_connections
    return max(1, min(max_connections, fd_limit - FD_RESERVE))


class HTTPServerService(StreamServerEndpointService):
    """Serves ``site`` on ``endpoint`` behind a ``ConnectionCap``.

    At start it raises the open files limit to its hard limit (keeping the
    cap ``FD_RESERVE`` below it), and checks the address actually bound:
    unless ``allow_public``, a non-loopback one stops the agent (exit 1),
    whatever the endpoint string seemed to say."""

    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: Any,
        site: Any,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        allow_public: bool = False,
        fd_limit: Callable[[], tuple[int, int]] = raise_fd_limit,
    ) -> None:
        super().__init__(endpoint, ConnectionCap(site, max_connections))
        self.allow_public = allow_public
        self.fd_limit = fd_limit
        self.port: Any = None

    def privilegedStartService(self) -> None:
        wanted = self.factory.max_connections
        soft, _hard = self.fd_limit()
        self.factory.max_connections = connection_cap_for(wanted, soft)
        if self.factory.max_connections < wanted:
            log.warn(
                "--max-connections {wanted} lowered to {cap}: the open files limit is {soft}",
                wanted=wanted,
                cap=self.factory.max_connections,
                soft=soft,
            )
        super().privilegedStartService()
        bound: list[Any] = []
        self._waitingForPort.addCallback(lambda port: bound.append(port) or port)
        if bound:
            self._check_bound(bound[0])
        else:  # an endpoint that listens later
            self._waitingForPort.addCallback(self._check_bound_later)

    def _check_bound(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        if self.allow_public or not isinstance(address, (IPv4Address, IPv6Address)):
            return
        ip = _ip(address.host)
        if ip is not None and ip.is_loopback:
            return
        log.critical(
            "refusing to serve HTTP on {host} (not loopback), bound from the endpoint "
            "given, without --auth-token-file or --allow-remote: stopping",
            host=address.host,
        )
        port.stopListening()
        raise SystemExit(1)

    def _check_bound_later(self, port: Any) -> Any:
        try:
            self._check_bound(port)
        except SystemExit:
            from twisted.internet import reactor

            reactor.stop()
        return port
