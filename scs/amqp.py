"""The SRS transport on a real broker: the only module that imports txamqp.

``AMQPTransport`` keeps one AMQP 0-9-1 connection through a
``ClientService`` (reconnect with exponential backoff and jitter). Each new
connection is made usable in ``prepareConnection``: authenticate, open a
channel, declare the cluster's direct and fanout exchanges, an exclusive
auto-delete private queue bound to both, and start consuming it. Only then is
the receiver told ``transport_connected``; when the connection goes,
``transport_disconnected``.

txAMQP 0.8.2 on Python 3 shapes what goes on the wire: every
``str`` it encodes is counted in characters, so names, routing keys and
properties are kept ASCII (checked before sending) and bodies are bytes of
ASCII JSON made by ``scs.srs``; bodies may come back as ``str`` and are
turned back into bytes here; property names are hyphenated. A frozen broker
is only noticed through AMQP heartbeats, so one is always negotiated.

The broker URL is read by ``scs.records.BrokerInfo.from_url``, the one
broker-URL parser of the codebase. ``amqps://host:port/vhost`` (port 5671
by default) connects through TLS: ``wrapClientTLS`` around the
``HostnameEndpoint``, with ``optionsForClientTLS(host)``, so the broker's
certificate must chain to the platform trust store and name the URL's host
(a DNS name or an IP address in its subjectAltName). There is no fallback
to plain AMQP: a failed handshake is a failed connection, logged and
retried with backoff like any other.

Private CA. The platform trust store is OpenSSL's default verify paths,
which both halves of the agent read the same way: Twisted's
``platformTrust()`` (pyOpenSSL's ``Context.set_default_verify_paths``) for
SRS, and Python's ``ssl`` (``load_default_certs``, used by py-amqp under
kombu) for the Celery workers and the agent's own control connections. Both
honour the standard ``SSL_CERT_FILE`` (a PEM bundle) and ``SSL_CERT_DIR``
environment variables, and workers inherit the agent's environment, so an
operator points everything at a private CA by starting the agent with
``SSL_CERT_FILE=/etc/scs/broker-ca.pem``. That file replaces the default
bundle (with cryptography's own OpenSSL, as in its wheels, the agent then
trusts that file alone): if other TLS peers need the public CAs too, make
the file the system bundle followed by the private CA.
"""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed as AMQPClosed
from txamqp.content import Content
from txamqp.factory import AMQFactory
from txamqp.protocol import AMQClient
from txamqp.queue import Closed as QueueClosed
from zope.interface import implementer

from scs import srs_wire as wire
from scs.errors import Unavailable
from scs.records import BrokerInfo

DEFAULT_SPEC_PATH = "/usr/share/amqp/specs/0-9-1-rabbit/amqp0-9-1.stripped.extended.xml"


def _require_ascii(what: str, value: str) -> str:
    # txAMQP would write a wrong length and corrupt the frame: refuse instead.
    if not isinstance(value, str) or not value.isascii():
        raise ValueError("%s must be an ASCII str for txAMQP: %r" % (what, value))
    return value


class _Client(AMQClient):
    """An AMQClient that drops the connection when the broker closes our
    channel, so that ClientService reconnects and everything is declared
    again, instead of leaving a connection that can no longer publish."""

    def connectionMade(self) -> None:
        # SRS sends small frames back to back (a reply, then a request):
        # without TCP_NODELAY the second waits out the broker's delayed ACK,
        # about 40 ms (measured in bench/bench_cluster.py).
        # Under TLS our transport is the TLS wrapper, which hands this on
        # to the TCP transport beneath it.
        self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _Factory(AMQFactory):
    protocol = _Client
    noisy = False  # ClientService logs the connection life; no factory chatter


# Bounds of an agent's private queue on the broker.
PRIVATE_QUEUE_MAX_MESSAGES = 20_000
PRIVATE_QUEUE_MAX_BYTES = 64 * 1024 * 1024


@implementer(wire.ISRSTransport)
class AMQPTransport(MultiService):
    """``scs.wire.ISRSTransport`` over txAMQP, reconnecting by itself."""

    log = Logger()

    def __init__(
        self,
        broker_url: str,
        *,
        spec_path: str | None = None,
        reactor: Any = None,
        rng: random.Random | None = None,
        heartbeat: int = 5,
        connect_timeout: float = 5.0,
        initial_delay: float = 0.5,
        max_delay: float = 10.0,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._rng = rng if rng is not None else random.Random()
        self.broker = BrokerInfo.from_url(broker_url)
        for what in ("userid", "password", "virtual_host"):
            _require_ascii(what, getattr(self.broker, what))
        spec_path = spec_path or DEFAULT_SPEC_PATH
        if not os.path.isfile(spec_path):
            # txAMQP would try the path as a URL and fail obscurely.
            raise FileNotFoundError(
                "AMQP 0-9-1 spec not found at %s: install Debian's amqp-specs or pass --amqp-spec PATH" % spec_path
            )
        self._factory = _Factory(spec=spec_path, clock=reactor)
        self._factory.set_vhost(self.broker.virtual_host)
        self._factory.set_heartbeat(heartbeat)
        endpoint: Any = HostnameEndpoint(reactor, self.broker.hostname, self.broker.port, timeout=connect_timeout)
        if self.broker.ssl:
            # Verified against the platform trust store (SSL_CERT_FILE for a
            # private CA) and the URL's host name or address; never plain.
            endpoint = wrapClientTLS(optionsForClientTLS(self.broker.hostname), endpoint)
        self.endpoint = endpoint
        self._service = ClientService(
            endpoint,
            self._factory,
            retryPolicy=backoffPolicy(
                initialDelay=initial_delay, maxDelay=max_delay, factor=2.0, jitter=self._rng.random
            ),
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self._service.setServiceParent(self)
        self.agent_id: str | None = None
        self.cluster: str | None = None
        self.receiver: Any = None
        self.reply_queue: str | None = None
        self._channel: Any = None
        self._client: _Client | None = None

    def attach(self, agent_id: str, cluster: str, receiver: wire.ITransportReceiver) -> None:
        self.agent_id, self.cluster, self.receiver = agent_id, cluster, receiver

    def publish(
        self, kind: str, key: str, body: bytes, properties: dict[str, str], mandatory: bool = False
    ) -> Deferred:
        """Send ``body``; fails with Unavailable when there is no connection."""
        if not isinstance(body, bytes) or not body.isascii():
            raise ValueError("AMQP body must be bytes of ASCII")
        props = {"content-type": "application/json", "delivery-mode": 1}
        for name, value in properties.items():
            props[_require_ascii("property name", name)] = _require_ascii("property " + name, value)
        channel = self._channel
        if channel is None or self.cluster is None:
            return defer.fail(Unavailable("not connected to the broker"))
        direct, fanout = wire.exchange_names(self.cluster)
        if kind == wire.DIRECT:
            exchange, routing_key = direct, wire.routing_key(key)
        elif kind == wire.FANOUT:
            exchange, routing_key = fanout, ""
        elif kind == wire.REPLY:
            exchange, routing_key = "", _require_ascii("reply-to queue", key)
        else:
            raise ValueError("unknown publish kind %r" % kind)
        d = channel.basic_publish(
            exchange=exchange, routing_key=routing_key, mandatory=mandatory, content=Content(body, properties=props)
        )
        d.addErrback(self._publish_failed)
        return d

    @staticmethod
    def _publish_failed(failure: Failure) -> Failure:
        if failure.check(AMQPClosed, QueueClosed):
            return Failure(Unavailable("the broker connection is closed"))
        return failure

    # -- connection life ---------------------------------------------------

    def _prepare(self, client: _Client) -> Deferred:
        d = Deferred.fromCoroutine(self._setup(client))

        def failed(failure: Failure) -> Failure:
            # ClientService drops this connection and retries with backoff.
            self.log.warn(
                "AMQP set-up on {host}:{port} failed: {error}",
                host=self.broker.hostname,
                port=self.broker.port,
                error=failure.getErrorMessage(),
                event="amqp.setup.failed",
            )
            return failure

        d.addErrback(failed)
        # Announce on the next reactor turn, once ClientService has seen the
        # preparation succeed: a receiver that stops or restarts us from its
        # callback must not re-enter ClientService mid-transition.
        d.addCallback(lambda _: self._reactor.callLater(0, self._announce, client))
        return d

    def _announce(self, client: _Client) -> None:
        if self._client is client and self.reply_queue is not None:
            self.receiver.transport_connected(self.reply_queue)

    async def _setup(self, client: _Client) -> None:
        assert self.agent_id is not None and self.cluster is not None, "attach() first"
        broker = self.broker
        await client.authenticate(broker.userid, broker.password)
        channel = await client.channel(1)
        await channel.channel_open()
        direct, fanout = wire.exchange_names(self.cluster)
        # Transient and auto-delete: every agent redeclares them identically
        # on each connection (a restarted broker gets them back) and they
        # vanish with the cluster's last queue, so clusters (and test runs)
        # leave nothing behind. Our own binding keeps them alive while we are
        # connected; a bind that loses the race with a deletion fails this
        # preparation and ClientService simply tries again.
        await channel.exchange_declare(exchange=direct, type="direct", durable=False, auto_delete=True)
        await channel.exchange_declare(exchange=fanout, type="fanout", durable=False, auto_delete=True)
        queue = wire.private_queue_name(self.cluster, self.agent_id, "%012x" % self._rng.getrandbits(48))
        # Bounded on the broker too: a flood of messages (from anyone with
        # credentials on the broker) drops the oldest instead of filling the
        # broker's memory while we work through it.
        await channel.queue_declare(
            queue=queue,
            exclusive=True,
            auto_delete=True,
            durable=False,
            arguments={"x-max-length": PRIVATE_QUEUE_MAX_MESSAGES, "x-max-length-bytes": PRIVATE_QUEUE_MAX_BYTES},
        )
        await channel.queue_bind(queue=queue, exchange=direct, routing_key=wire.routing_key(self.agent_id))
        await channel.queue_bind(queue=queue, exchange=fanout, routing_key="")
        reply = await channel.basic_consume(queue=queue, no_ack=True)
        deliveries = await client.queue(reply.consumer_tag)
        self._client, self._channel, self.reply_queue = client, channel, queue
        client.disconnected.wait().addBoth(self._lost, client)
        self._consume(client, deliveries, self._deliver)
        self._consume(client, client.basic_return_queue, self._return)
        self.log.info(
            "AMQP connected to {host}:{port} vhost {vhost}, queue {queue}",
            host=broker.hostname,
            port=broker.port,
            vhost=broker.virtual_host,
            queue=queue,
            event="amqp.connected",
        )

    def _consume(self, client: _Client, deliveries: Any, handle: Any) -> None:
        def got(message: Any) -> None:
            handle(message)
            self._consume(client, deliveries, handle)

        def stopped(failure: Failure) -> None:
            failure.trap(QueueClosed, AMQPClosed)

        deliveries.get().addCallbacks(got, stopped)

    def _deliver(self, message: Any) -> None:
        self._hand_over(self.receiver.message_received, message)

    def _return(self, message: Any) -> None:
        self._hand_over(self.receiver.message_returned, message)

    def _hand_over(self, receive: Any, message: Any) -> None:
        content = message.content
        body = content.body
        # txAMQP hands a body back as str when it happens to decode as UTF-8.
        if isinstance(body, str):
            body = body.encode("utf-8")
        properties = {k: v for k, v in content.properties.items() if isinstance(v, str)}
        try:
            receive(body, properties)
        except Exception:  # noqa: BLE001 - one bad message must not end the consumer loop
            self.log.failure("SRS receiver failed on a message")

    def _lost(self, result: Any, client: _Client) -> None:
        # txAMQP never closes this queue itself: end our loop on it.
        client.basic_return_queue.close()
        if self._client is not client:
            return
        self._client = self._channel = self.reply_queue = None
        self.log.warn(
            "AMQP connection to {host}:{port} lost",
            host=self.broker.hostname,
            port=self.broker.port,
            event="amqp.disconnected",
        )
        self.receiver.transport_disconnected(result if isinstance(result, Failure) else None)
