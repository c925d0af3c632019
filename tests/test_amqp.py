"""Contract of ``scs.srs.ISRSTransport``, run against both implementations.

``FakeTransportContractTests`` runs on ``scs.testing.FakeAMQPNetwork``;
``AMQPTransportContractTests`` runs ``scs.amqp.AMQPTransport`` on the real
RabbitMQ at 127.0.0.1:5672 (guest/guest), each test in its own cluster name so
that runs never see each other. Both use the real reactor (the fake network
schedules deliveries on it) and bound every wait.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from scs import srs
from scs.errors import Unavailable
from scs.testing import FakeAMQPNetwork

BROKER_URL = os.environ.get("SCS_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
WAIT = 5.0  # seconds: upper bound of every wait in these tests


class Recorder:
    """An ITransportReceiver that lets a test await what arrives."""

    def __init__(self) -> None:
        self.connected: Deferred = Deferred()
        self.disconnected: Deferred = Deferred()
        self.messages: DeferredQueue = DeferredQueue()
        self.reply_queue: str | None = None
        self.connections = 0

    def transport_connected(self, reply_queue: str) -> None:
        self.reply_queue = reply_queue
        self.connections += 1
        if not self.connected.called:
            self.connected.callback(reply_queue)

    def transport_disconnected(self, reason: Any) -> None:
        self.reply_queue = None
        if not self.disconnected.called:
            self.disconnected.callback(None)

    def message_received(self, body: bytes, properties: dict[str, str]) -> None:
        self.messages.put((body, properties))

    def message_returned(self, body: bytes, properties: dict[str, str]) -> None:
        raise AssertionError("unexpected returned message %r" % body)

    def next(self) -> Deferred:
        return self.messages.get().addTimeout(WAIT, reactor)


def _body(**fields: Any) -> bytes:
    return srs.encode_message(fields)


class TransportContract:
    """The tests; subclasses say how to build a transport."""

    cluster: str

    def make_transport(self) -> Any:
        raise NotImplementedError

    def break_connection(self, transport: Any) -> None:
        """Lose the connection as a network failure would."""
        raise NotImplementedError

    async def start(self, agent_id: str, cluster: str | None = None) -> tuple[Any, Recorder]:
        transport = self.make_transport()
        recorder = Recorder()
        transport.attach(agent_id, cluster or self.cluster, recorder)
        transport.startService()
        self.addCleanup(self._stop, transport)  # type: ignore[attr-defined]
        await recorder.connected.addTimeout(WAIT, reactor)
        return transport, recorder

    @staticmethod
    def _stop(transport: Any) -> Deferred:
        return defer.maybeDeferred(transport.stopService) if transport.running else defer.succeed(None)

    async def test_direct_reaches_only_its_agent(self) -> None:
        a, ra = await self.start("a")
        b, rb = await self.start("b")
        await a.publish(srs.DIRECT, "b", _body(n=1), {})
        body, _ = await rb.next()
        self.assertEqual(json.loads(body), {"n": 1})  # type: ignore[attr-defined]
        self.assertIsInstance(body, bytes)  # type: ignore[attr-defined]
        # Ordering on one queue shows a got nothing before its own marker.
        await b.publish(srs.DIRECT, "a", _body(marker=True), {})
        body, _ = await ra.next()
        self.assertEqual(json.loads(body), {"marker": True})  # type: ignore[attr-defined]

    async def test_fanout_reaches_every_agent_of_the_cluster_only(self) -> None:
        a, ra = await self.start("a")
        b, rb = await self.start("b")
        c, rc = await self.start("c")
        other, rother = await self.start("d", cluster=self.cluster + "-other")
        await a.publish(srs.FANOUT, "", _body(to="all"), {})
        for r in (ra, rb, rc):
            body, _ = await r.next()
            self.assertEqual(json.loads(body), {"to": "all"})  # type: ignore[attr-defined]
        await a.publish(srs.DIRECT, "d", _body(marker=True), {})
        await other.publish(srs.DIRECT, "d", _body(marker=True), {})
        body, _ = await rother.next()
        self.assertEqual(json.loads(body), {"marker": True})  # type: ignore[attr-defined]

    async def test_reply_by_correlation_id_to_the_private_queue(self) -> None:
        a, ra = await self.start("a")
        b, rb = await self.start("b")
        self.assertTrue(ra.reply_queue.isascii())  # type: ignore[attr-defined, union-attr]
        await a.publish(srs.DIRECT, "b", _body(q=1), {"reply-to": ra.reply_queue, "correlation-id": "c-42"})
        _, props = await rb.next()
        self.assertEqual((props["reply-to"], props["correlation-id"]), (ra.reply_queue, "c-42"))  # type: ignore[attr-defined]
        await b.publish(srs.REPLY, props["reply-to"], _body(answer=2), {"correlation-id": props["correlation-id"]})
        body, props = await ra.next()
        self.assertEqual((json.loads(body), props["correlation-id"]), ({"answer": 2}, "c-42"))  # type: ignore[attr-defined]

    async def test_mandatory_message_to_nobody_comes_back(self) -> None:
        a, ra = await self.start("a")
        returned: Deferred = Deferred()
        ra.message_returned = lambda body, props: returned.callback((body, props))
        await a.publish(srs.DIRECT, "nobody", _body(r=1), {"correlation-id": "c-7"}, mandatory=True)
        body, props = await returned.addTimeout(WAIT, reactor)
        self.assertEqual((json.loads(body), props["correlation-id"]), ({"r": 1}, "c-7"))  # type: ignore[attr-defined]
        # Without mandatory it is dropped silently; a marker shows nothing else came back.
        returned = Deferred()
        await a.publish(srs.DIRECT, "nobody", _body(r=2), {}, mandatory=False)
        await a.publish(srs.DIRECT, "nobody", _body(r=3), {}, mandatory=True)
        body, _ = await returned.addTimeout(WAIT, reactor)
        self.assertEqual(json.loads(body), {"r": 3})  # type: ignore[attr-defined]

    async def test_non_ascii_ids_and_payload_round_trip(self) -> None:
        a, ra = await self.start("agënt-ä")
        b, rb = await self.start("агент-ü")
        payload = {"name": "wörker-ü1", "agent": "агент-ü", "emoji": "\U0001f41b"}
        await a.publish(srs.DIRECT, "агент-ü", srs.encode_message(payload), {"correlation-id": "x"})
        body, props = await rb.next()
        self.assertEqual(json.loads(body), payload)  # type: ignore[attr-defined]
        self.assertEqual(props["correlation-id"], "x")  # type: ignore[attr-defined]

    async def test_refuses_what_txamqp_would_corrupt(self) -> None:
        a, ra = await self.start("a")
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            a.publish(srs.DIRECT, "a", b"{}" + "ü".encode(), {})
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            a.publish(srs.DIRECT, "a", _body(), {"correlation-id": "ü"})
        with self.assertRaises((ValueError, TypeError)):  # type: ignore[attr-defined]
            a.publish(srs.DIRECT, "a", "{}", {})  # type: ignore[arg-type]

    async def test_reconnects_after_losing_the_connection(self) -> None:
        a, ra = await self.start("a")
        b, rb = await self.start("b")
        first_queue = rb.reply_queue
        self.break_connection(b)
        await rb.disconnected.addTimeout(WAIT, reactor)
        with self.assertRaises(Unavailable):  # type: ignore[attr-defined]
            await b.publish(srs.FANOUT, "", _body(), {})
        for _ in range(int(WAIT / 0.02)):
            if rb.reply_queue is not None:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(rb.connections, 2)  # type: ignore[attr-defined]
        self.assertNotEqual(rb.reply_queue, first_queue)  # type: ignore[attr-defined]
        await a.publish(srs.DIRECT, "b", _body(again=True), {})
        body, _ = await rb.next()
        self.assertEqual(json.loads(body), {"again": True})  # type: ignore[attr-defined]

    async def test_not_connected_is_unavailable_and_stop_is_reported(self) -> None:
        lonely = self.make_transport()
        lonely.attach("z", self.cluster, Recorder())
        with self.assertRaises(Unavailable):  # type: ignore[attr-defined]
            await lonely.publish(srs.FANOUT, "", _body(), {})
        a, ra = await self.start("a")
        await a.stopService()
        await ra.disconnected.addTimeout(WAIT, reactor)
        self.assertIsNone(a.reply_queue)  # type: ignore[attr-defined]
        with self.assertRaises(Unavailable):  # type: ignore[attr-defined]
            await a.publish(srs.FANOUT, "", _body(), {})


class FakeTransportContractTests(TransportContract, TestCase):
    def setUp(self) -> None:
        self.cluster = "contract"
        self.network = FakeAMQPNetwork(reactor)

    def make_transport(self) -> Any:
        return self.network.transport()

    def break_connection(self, transport: Any) -> None:
        transport.drop_connection()


class AMQPTransportContractTests(TransportContract, TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.cluster = "test-amqp-%08x" % random.getrandbits(32)

    def make_transport(self) -> Any:
        from scs.amqp import AMQPTransport

        return AMQPTransport(BROKER_URL, reactor=reactor, heartbeat=2, initial_delay=0.1, max_delay=1.0)

    def break_connection(self, transport: Any) -> None:
        transport._client.transport.abortConnection()


class BrokerURLTests(SynchronousTestCase):
    def test_parse(self) -> None:
        # The transport reads its URL with the codebase's one parser.
        from scs.amqp import AMQPTransport
        from scs.records import BrokerInfo

        cases = {
            "amqp://guest:guest@127.0.0.1:5672//": BrokerInfo("127.0.0.1", 5672, "guest", "guest", "/"),
            "amqp://u:p%40ss@rabbit/": BrokerInfo("rabbit", 5672, "u", "p@ss", "/"),
            "amqp://u:p@rabbit:5673/prod": BrokerInfo("rabbit", 5673, "u", "p", "prod"),
            "amqp://rabbit/%2f": BrokerInfo("rabbit", 5672, "guest", "guest", "/"),
            "amqp://rabbit": BrokerInfo("rabbit", 5672, "guest", "guest", "/"),
            "amqps://u:p@rabbit/prod": BrokerInfo("rabbit", 5671, "u", "p", "prod", "amqps"),
            "amqps://rabbit:5999//": BrokerInfo("rabbit", 5999, "guest", "guest", "/", "amqps"),
        }
        for url, expected in cases.items():
            self.assertEqual(BrokerInfo.from_url(url), expected, url)
            self.assertEqual(AMQPTransport(url, reactor=reactor).broker, expected, url)
            # The URL round-trips, scheme included.
            self.assertEqual(BrokerInfo.from_url(expected.url), expected, url)
        self.assertEqual(BrokerInfo.from_url("amqps://rabbit//").url, "amqps://guest:guest@rabbit:5671/%2F")
        self.assertTrue(BrokerInfo.from_url("amqps://rabbit//").ssl)
        self.assertFalse(BrokerInfo.from_url("amqp://rabbit//").ssl)

    def test_amqps_connects_through_tls(self) -> None:
        """amqps:// goes through a TLS wrapper checking the URL's host; amqp://
        stays plain TCP."""
        from twisted.internet.endpoints import HostnameEndpoint

        from scs.amqp import AMQPTransport

        endpoint = AMQPTransport("amqps://guest:guest@rabbit.example//", reactor=reactor).endpoint
        plain_endpoint = AMQPTransport("amqp://guest:guest@rabbit.example//", reactor=reactor).endpoint
        self.assertIsInstance(plain_endpoint, HostnameEndpoint)
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, HostnameEndpoint)
        self.assertEqual(endpoint._wrappedEndpoint._port, 5671)

    def test_refused(self) -> None:
        from scs.amqp import AMQPTransport
        from scs.records import BrokerInfo

        with self.assertRaises(ValueError):
            BrokerInfo.from_url("redis://localhost/")
        with self.assertRaises(ValueError):
            AMQPTransport("redis://localhost/", reactor=Clock())
        # txAMQP would corrupt the login frame: refuse at once, not at connect time.
        with self.assertRaises(ValueError):
            AMQPTransport("amqp://usér:p@127.0.0.1//", reactor=Clock())

    def test_missing_spec_is_reported_at_construction(self) -> None:
        from scs.amqp import AMQPTransport

        with self.assertRaises(FileNotFoundError) as caught:
            AMQPTransport(BROKER_URL, spec_path="/nonexistent/amqp.xml", reactor=Clock())
        self.assertIn("--amqp-spec", str(caught.exception))
