"""SRS agents on the real RabbitMQ (127.0.0.1:5672, guest/guest).

Real ``scs.amqp`` transports and the real reactor; every test uses its own
cluster name so that runs and other users of the shared broker never mix.
Every wait is bounded. ``PrivateBrokerRestartTests`` starts a private
RabbitMQ node (its own name, ports and data directory) to restart it; the
shared broker is never stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from scs import errors
from scs.amqp import AMQPTransport
from scs.srs import SRS

BROKER_URL = os.environ.get("SCS_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
INTERVAL = 0.5  # SRS heartbeat period: short so that death is seen quickly


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 20 ms; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("not within %.1fs: %s" % (timeout, what))
        await sleep(0.02)
    return time.monotonic() - start


def queue_gone(queue: str) -> bool:
    """Whether the broker has no queue ``queue`` (a passive declare: an
    exclusive queue of another connection answers "locked" while it exists)."""
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(BROKER_URL, connect_timeout=5) as connection:
        try:
            connection.channel().queue_declare(queue=queue, passive=True)
        except NotFound:
            return True
        except Exception:  # noqa: BLE001 - e.g. RESOURCE_LOCKED: it is still there
            return False
    return False


async def wait_for_queue_gone(queue: str, timeout: float) -> None:
    from twisted.internet.threads import deferToThread

    start = time.monotonic()
    while not await deferToThread(queue_gone, queue):
        if time.monotonic() - start > timeout:
            raise AssertionError("not within %.1fs: queue %s deleted by the broker" % (timeout, queue))
        await sleep(0.05)


class SRSBrokerTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.cluster = "test-srs-%08x" % random.getrandbits(32)

    def agent(self, agent_id: str, broker_url: str = BROKER_URL, transport: Any = None, instances: int = 0) -> SRS:
        srs = SRS(
            agent_id,
            transport or AMQPTransport(broker_url, reactor=reactor),
            cluster=self.cluster,
            url="http://127.0.0.1:80%02d/" % (len(agent_id) % 100),
            heartbeat_interval=INTERVAL,
            reactor=reactor,
            summary=lambda: {"instances": instances},
        )
        srs.handler = lambda op, args: {"agent": agent_id, "op": op, "args": args}
        srs.startService()
        self.addCleanup(lambda: srs.stopService() if srs.running else None)
        return srs

    async def cluster_of(self, *ids: str) -> list[SRS]:
        agents = [self.agent(i, instances=n) for n, i in enumerate(ids)]
        everyone = sorted(ids)
        await wait_until(
            lambda: all(a.live_agents() == everyone for a in agents), 4 * INTERVAL + 5, "all members alive"
        )
        return agents


class MembershipTests(SRSBrokerTestCase):
    async def test_three_agents_see_each_other_within_two_periods(self) -> None:
        agents = [self.agent(i, instances=n) for n, i in enumerate(["agent1", "agent2", "agent3"])]
        # The clock starts once every agent is connected: connecting is the
        # broker's business, membership is ours.
        await wait_until(lambda: all(a.is_connected() for a in agents), 10, "connected")
        took = await wait_until(
            lambda: all(a.live_agents() == ["agent1", "agent2", "agent3"] for a in agents),
            2 * INTERVAL,
            "membership",
        )
        self.assertLessEqual(took, 2 * INTERVAL)
        await sleep(1.5 * INTERVAL)  # a heartbeat later, the summaries have arrived
        rows = agents[0].members()
        self.assertEqual(
            [(r["id"], r["alive"], r["instances"]) for r in rows],
            [("agent1", True, 0), ("agent2", True, 1), ("agent3", True, 2)],
        )
        self.assertTrue(all(isinstance(r["last_seen"], float) and r["last_seen"] > time.time() - 5 for r in rows))

    async def test_stopped_peer_says_bye(self) -> None:
        a1, a2 = await self.cluster_of("agent1", "agent2")
        await a2.stopService()
        took = await wait_until(lambda: a1.live_agents() == ["agent1"], INTERVAL, "agent2 gone")
        self.assertLess(took, INTERVAL)

    async def test_crashed_peer_is_missing_then_dead(self) -> None:
        a1, a2, a3 = await self.cluster_of("agent1", "agent2", "agent3")
        # As kill -9 looks to the others: the queue vanishes, no bye is said.
        await a3.transport.stopService()
        crashed_at = time.monotonic()
        # Returned by the broker at once, or (routed just before the broker
        # dropped the queue) missing at the timeout.
        results, missing = await a1.scatter("list", {}, timeout=0.5)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))
        # Its queue is gone: known dead within a second (ring probes), not
        # after three heartbeat periods.
        await wait_until(lambda: a1.live_agents() == ["agent1", "agent2"], 1.0, "agent3 dead")
        await wait_until(lambda: a2.live_agents() == ["agent1", "agent2"], 1.0, "agent3 dead for agent2")
        self.assertLess(time.monotonic() - crashed_at, 1.0 + 0.5)
        self.assertEqual([r["alive"] for r in a1.members()], [True, True, False])
        self.assertEqual(a1.membership.members["agent3"].dead_cause, "queue-gone")
        started = time.monotonic()
        results, missing = await a1.scatter("list", {}, timeout=2.0)
        self.assertEqual((sorted(results), missing), (["agent2"], []))
        self.assertLess(time.monotonic() - started, 0.5)

    async def test_call_to_crashed_peer_fails_fast(self) -> None:
        a1, a2 = await self.cluster_of("agent1", "agent2")
        queue = a2.transport.reply_queue
        self.assertTrue(queue)
        await a2.transport.stopService()
        # The broker drops the exclusive queue once it has processed the
        # close, a moment after our side is done; a request routed before
        # that would be lost in the queue and time out, as with kill -9.
        # Wait for that (a fixed pause is too short on a loaded machine).
        await wait_for_queue_gone(queue, 10.0)
        # Its queue is gone, so the broker returns the request at once, and
        # the peer counts as gone from then on.
        started = time.monotonic()
        with self.assertRaises(errors.Unavailable):
            await a1.call("agent2", "get", {}, timeout=2.0)
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(a1.live_agents(), ["agent1"])


class RequestTests(SRSBrokerTestCase):
    async def test_call_timeout(self) -> None:
        a1, a2 = await self.cluster_of("agent1", "agent2")
        a2.handler = lambda op, args: Deferred()
        started = time.monotonic()
        with self.assertRaises(errors.GatewayTimeout):
            await a1.call("agent2", "hang", {}, timeout=0.3)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)

    async def test_call_and_remote_errors(self) -> None:
        a1, a2 = await self.cluster_of("agent1", "agent2")
        self.assertEqual(await a1.call("agent2", "get", {"x": 1}), {"agent": "agent2", "op": "get", "args": {"x": 1}})

        def refuse(op: str, args: dict) -> Any:
            raise errors.Conflict("exists with other settings", name=args["name"])

        a2.handler = refuse
        with self.assertRaises(errors.Conflict) as caught:
            await a1.call("agent2", "put", {"name": "w1"})
        self.assertEqual(caught.exception.details, {"name": "w1"})

    async def test_scatter_gathers_every_peer(self) -> None:
        a1, a2, a3 = await self.cluster_of("agent1", "agent2", "agent3")
        a3.handler = lambda op, args: defer.fail(errors.NotFound("no app foo"))
        results, missing = await a1.scatter("list", {"app": "foo"}, timeout=2.0)
        self.assertEqual(missing, [])
        self.assertEqual(results["agent2"], {"agent": "agent2", "op": "list", "args": {"app": "foo"}})
        self.assertIsInstance(results["agent3"], errors.NotFound)

    async def test_broadcast(self) -> None:
        a1, a2, a3 = await self.cluster_of("agent1", "agent2", "agent3")
        seen: list[str] = []
        for a in (a1, a2, a3):
            a.handler = lambda op, args, _id=a.agent_id: seen.append(_id)
        a1.broadcast("app.put", {"name": "foo"})
        await wait_until(lambda: sorted(seen) == ["agent2", "agent3"], 2, "broadcast delivered")

    async def test_non_ascii_round_trip(self) -> None:
        a1, a2 = await self.cluster_of("agënt-1", "агент-2")
        answer = await a1.call("агент-2", "get", {"name": "wörker-ü1"})
        self.assertEqual(answer, {"agent": "агент-2", "op": "get", "args": {"name": "wörker-ü1"}})

        def refuse(op: str, args: dict) -> Any:
            raise errors.NotFound("no instance wörker-ü1", instance="wörker-ü1")

        a2.handler = refuse
        results, missing = await a1.scatter("get", {})
        self.assertEqual(
            (results["агент-2"].message, results["агент-2"].details),
            ("no instance wörker-ü1", {"instance": "wörker-ü1"}),
        )
        self.assertEqual([r["id"] for r in a2.members()], ["agënt-1", "агент-2"])

    async def test_two_clusters_on_one_broker(self) -> None:
        a1, a2 = await self.cluster_of("agent1", "agent2")
        self.cluster = self.cluster + "-other"
        b1 = self.agent("agent1")
        b2 = self.agent("agent3")
        await wait_until(lambda: b1.live_agents() == ["agent1", "agent3"], 3, "other cluster")
        await sleep(2 * INTERVAL)
        self.assertEqual(a1.live_agents(), ["agent1", "agent2"])
        self.assertEqual(await b2.call("agent1", "who", {}), {"agent": "agent1", "op": "who", "args": {}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateBroker:
    """A RabbitMQ node of our own: own node name, ports, config and data
    directory (owned by the rabbitmq user), so it can be stopped freely."""

    SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

    def __init__(self) -> None:
        import pwd

        if os.geteuid() != 0 or not os.path.exists(self.SERVER) or not shutil.which("rabbitmqctl"):
            raise SkipTest("needs root and a RabbitMQ installation to run a private node")
        try:
            self.user = pwd.getpwnam("rabbitmq")
        except KeyError:
            raise SkipTest("no rabbitmq user") from None
        self.dir = tempfile.mkdtemp(prefix="scs-rabbit-")
        self.port = _free_port()
        self.dist_port = _free_port()
        self.node = "scs-test-%d@localhost" % self.port
        self.url = "amqp://guest:guest@127.0.0.1:%d//" % self.port
        files = {
            # Not the system's config: that one listens on the shared 5672.
            "rabbitmq.conf": "listeners.tcp.local = 127.0.0.1:%d\n" % self.port,
            "rabbitmq-env.conf": "ERL_EPMD_ADDRESS=127.0.0.1\n",
            "enabled_plugins": "[].\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)
        for root, _dirs, names in os.walk(self.dir):
            for name in [root] + [os.path.join(root, n) for n in names]:
                os.chown(name, self.user.pw_uid, self.user.pw_gid)
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            "HOME": self.user.pw_dir,  # the shared Erlang cookie, so rabbitmqctl reaches it
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.dir, "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_PID_FILE": os.path.join(self.dir, "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(os.path.join(self.dir, "server.log"), "ab")
        self.process = subprocess.Popen(
            ["runuser", "-u", "rabbitmq", "--", self.SERVER],
            env=self.env,
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def ready(self, timeout: float = 60) -> None:
        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, "private broker exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        await wait_until(listening, timeout, "private broker listening")

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # rabbitmqctl as root runs itself as the rabbitmq user; off the reactor thread.
        from twisted.internet.threads import deferToThread

        await deferToThread(subprocess.run, ["rabbitmqctl", "-n", self.node, "stop"], capture_output=True, timeout=60)
        process = self.process
        await wait_until(lambda: process.poll() is not None, 30, "private broker stopped")

    async def destroy(self) -> None:
        try:
            await self.stop()
        finally:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            shutil.rmtree(self.dir, ignore_errors=True)


class PrivateBrokerRestartTests(SRSBrokerTestCase):
    timeout = 180

    async def test_agents_reconnect_after_broker_restart(self) -> None:
        broker = PrivateBroker()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(broker.destroy()))
        broker.start()
        await broker.ready()

        def agent(agent_id: str) -> SRS:
            transport = AMQPTransport(broker.url, reactor=reactor, heartbeat=2, initial_delay=0.2, max_delay=1.0)
            return self.agent(agent_id, transport=transport)

        a1, a2 = agent("agent1"), agent("agent2")
        reconnections: list[str] = []
        a1.on_connected.append(lambda: reconnections.append("up"))
        await wait_until(lambda: a1.live_agents() == a2.live_agents() == ["agent1", "agent2"], 10, "cluster up")

        await broker.stop()
        await wait_until(lambda: not a1.is_connected() and not a2.is_connected(), 10, "disconnection noticed")
        self.assertEqual(a1.live_agents(), ["agent1"])
        self.assertEqual([r["alive"] for r in a1.members()], [False, False])
        with self.assertRaises(errors.Unavailable):
            await a1.call("agent2", "get", {})
        started = time.monotonic()
        self.assertEqual(await a1.scatter("list", {}, timeout=2.0), ({}, ["agent2"]))
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(await a1.call("agent1", "local", {}), {"agent": "agent1", "op": "local", "args": {}})

        broker.start()
        await broker.ready()
        await wait_until(
            lambda: a1.live_agents() == a2.live_agents() == ["agent1", "agent2"], 20, "cluster whole again"
        )
        await wait_until(lambda: reconnections == ["up", "up"], INTERVAL, "connected callbacks run again")
        self.assertEqual((await a1.call("agent2", "get", {}))["agent"], "agent2")
        results, missing = await a2.scatter("list", {})
        self.assertEqual((list(results), missing), (["agent1"], []))
