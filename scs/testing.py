"""Test helpers shared by the test suite (fakes for the reactor-facing parts)."""


# --- SRS: in-memory AMQP network (owner: SRS transport) -------------------
# FakeAMQPNetwork is a tiny broker in one process: exchanges (direct, fanout
# and the default one), exclusive queues, deliveries scheduled on an injected
# clock. FakeTransport implements scs.srs.ISRSTransport on it and refuses what
# txAMQP 0.8.2 would corrupt (non-bytes or non-ASCII bodies, non-ASCII or
# unknown properties), so unit tests catch what only the real broker would.

from typing import Any as _Any, Optional as _Optional

import attr as _attr
from twisted.application.service import Service as _Service
from twisted.internet import defer as _defer
from twisted.python.failure import Failure as _Failure
from zope.interface import implementer as _implementer

from scs import srs as _srs
from scs.errors import Unavailable as _Unavailable

# The properties the SRS transports may set (txAMQP spells them hyphenated).
AMQP_PROPERTIES = frozenset({"content-type", "reply-to", "correlation-id", "delivery-mode", "message-id", "type"})


@_attr.s(auto_attribs=True)
class FakeDelivery:
    exchange: str
    routing_key: str
    body: bytes
    properties: dict


class FakeAMQPNetwork:
    """An in-memory broker shared by FakeTransports.

    ``clock`` schedules every delivery ``latency`` seconds later, so nothing
    is delivered re-entrantly inside ``publish`` (as with a real broker);
    with ``twisted.internet.task.Clock``, ``clock.advance(0)`` delivers all.
    """

    def __init__(self, clock: _Any, latency: float = 0.0, reconnect_delay: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self.reconnect_delay = reconnect_delay
        self.running = True
        self.exchanges: dict[str, tuple[str, set[tuple[str, str]]]] = {}
        self.queues: dict[str, "FakeTransport"] = {}
        self.published: list[FakeDelivery] = []
        self.transports: list["FakeTransport"] = []
        self._queue_counter = 0

    def transport(self) -> "FakeTransport":
        """A new transport on this network (give it to ``SRS(transport=...)``)."""
        t = FakeTransport(self)
        self.transports.append(t)
        return t

    def stop_broker(self) -> None:
        """The broker goes away: every connection drops, queues vanish."""
        self.running = False
        for t in list(self.transports):
            t._lose("broker stopped")
        self.exchanges.clear()

    def start_broker(self) -> None:
        """The broker is back: running transports reconnect after ``reconnect_delay``."""
        self.running = True
        for t in self.transports:
            if t.running and not t.connected:
                t._schedule_connect(self.reconnect_delay)

    def declare(self, exchange: str, kind: str) -> None:
        known = self.exchanges.setdefault(exchange, (kind, set()))
        if known[0] != kind:
            raise ValueError("exchange %s redeclared as %s" % (exchange, kind))

    def route(self, exchange: str, routing_key: str, body: bytes, properties: dict) -> None:
        self.published.append(FakeDelivery(exchange, routing_key, body, dict(properties)))
        if exchange == "":
            targets = [routing_key] if routing_key in self.queues else []
        else:
            kind, bindings = self.exchanges[exchange]
            targets = sorted({q for q, key in bindings if kind == "fanout" or key == routing_key})
        for queue in targets:
            self.clock.callLater(self.latency, self._deliver, queue, body, dict(properties))

    def _deliver(self, queue: str, body: bytes, properties: dict) -> None:
        # The queue may have gone (connection lost) while the message was in flight.
        transport = self.queues.get(queue)
        if transport is not None and transport.receiver is not None:
            transport.receiver.message_received(body, properties)

    def _new_queue_nonce(self) -> str:
        self._queue_counter += 1
        return "%08x" % self._queue_counter


@_implementer(_srs.ISRSTransport)
class FakeTransport(_Service):
    """scs.srs.ISRSTransport on a FakeAMQPNetwork."""

    def __init__(self, network: FakeAMQPNetwork) -> None:
        self.network = network
        self.agent_id: _Optional[str] = None
        self.cluster: _Optional[str] = None
        self.receiver: _Any = None
        self.reply_queue: _Optional[str] = None
        self.crashed = False
        self._pending_connect: _Any = None

    @property
    def connected(self) -> bool:
        return self.reply_queue is not None

    def attach(self, agent_id: str, cluster: str, receiver: _Any) -> None:
        self.agent_id, self.cluster, self.receiver = agent_id, cluster, receiver

    def startService(self) -> None:
        super().startService()
        self._schedule_connect(0)

    def stopService(self) -> _Any:
        super().stopService()
        if self._pending_connect is not None and self._pending_connect.active():
            self._pending_connect.cancel()
        self._lose("stopped")
        return _defer.succeed(None)

    def crash(self) -> None:
        """Freeze like a killed process: the queue vanishes, nothing is told to
        the receiver, later publishes are silently dropped."""
        self.crashed = True
        self._drop_queue()

    def drop_connection(self) -> None:
        """Only this transport's connection breaks; it reconnects like ClientService."""
        self._lose("connection lost")
        if self.running and self.network.running:
            self._schedule_connect(self.network.reconnect_delay)

    def publish(self, kind: str, key: str, body: bytes, properties: dict[str, str]) -> _defer.Deferred:
        if not isinstance(body, bytes):
            raise TypeError("AMQP body must be bytes, got %r" % type(body))
        body.decode("ascii")  # raises: txAMQP 0.8.2 would corrupt non-ASCII
        for name, value in properties.items():
            if name not in AMQP_PROPERTIES:
                raise ValueError("unknown AMQP property %r (names are hyphenated)" % name)
            if not isinstance(value, str) or not value.isascii():
                raise ValueError("AMQP property %s must be an ASCII str: %r" % (name, value))
        if not key.isascii() and kind != _srs.DIRECT:
            raise ValueError("AMQP key must be ASCII: %r" % key)
        if self.crashed:
            return _defer.succeed(None)
        if not self.connected:
            return _defer.fail(_Unavailable("not connected to the broker"))
        direct, fanout = _srs.exchange_names(self.cluster)
        if kind == _srs.DIRECT:
            self.network.route(direct, _srs.routing_key(key), body, properties)
        elif kind == _srs.FANOUT:
            self.network.route(fanout, "", body, properties)
        elif kind == _srs.REPLY:
            self.network.route("", key, body, properties)
        else:
            raise ValueError("unknown publish kind %r" % kind)
        return _defer.succeed(None)

    def _schedule_connect(self, delay: float) -> None:
        if self._pending_connect is not None and self._pending_connect.active():
            return
        self._pending_connect = self.network.clock.callLater(delay, self._connect)

    def _connect(self) -> None:
        if not self.running or not self.network.running or self.crashed or self.connected:
            return
        direct, fanout = _srs.exchange_names(self.cluster)
        self.network.declare(direct, "direct")
        self.network.declare(fanout, "fanout")
        queue = _srs.private_queue_name(self.cluster, self.agent_id, self.network._new_queue_nonce())
        self.network.queues[queue] = self
        self.network.exchanges[direct][1].add((queue, _srs.routing_key(self.agent_id)))
        self.network.exchanges[fanout][1].add((queue, ""))
        self.reply_queue = queue
        self.receiver.transport_connected(queue)

    def _drop_queue(self) -> None:
        queue, self.reply_queue = self.reply_queue, None
        if queue is None:
            return
        self.network.queues.pop(queue, None)
        for _kind, bindings in self.network.exchanges.values():
            bindings.difference_update({b for b in bindings if b[0] == queue})

    def _lose(self, why: str) -> None:
        was_connected = self.connected
        self._drop_queue()
        if was_connected and not self.crashed:
            self.receiver.transport_disconnected(_Failure(_Unavailable(why)))
