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
from typing import Any, Callable, Optional

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from scs import errors
from scs.amqp import AMQPTransport
from scs.srs import SRS

pytestmark = pytest.mark.filterwarnings(
    "ignore:twisted.internet.defer.returnValue was deprecated:DeprecationWarning"
)

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


class SRSBrokerTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.cluster = "test-srs-%08x" % random.getrandbits(32)

    def agent(self, agent_id: str, broker_url: str = BROKER_URL, transport: Any = None, instances: int = 0) -> SRS:
        srs = SRS(
            agent_id,
            cluster=self.cluster,
            url="http://127.0.0.1:80%02d/" % (len(agent_id) % 100),
            broker_url=broker_url,
            transport=transport,
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
        self.assertEqual([(r["id"], r["alive"], r["instances"]) for r in rows], [("agent1", True, 0), ("agent2", True, 1), ("agent3", True, 2)])
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
        started = time.monotonic()
        results, missing = await a1.scatter("list", {}, timeout=0.5)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        with self.assertRaises(errors.GatewayTimeout):
            await a1.call("agent3", "get", {}, timeout=0.3)
        await wait_until(lambda: a1.live_agents() == ["agent1", "agent2"], 3 * INTERVAL + 0.5, "agent3 dead")
        self.assertEqual([r["alive"] for r in a1.members()], [True, True, False])
        started = time.monotonic()
        results, missing = await a1.scatter("list", {}, timeout=2.0)
        self.assertEqual((sorted(results), missing), (["agent2"], []))
        self.assertLess(time.monotonic() - started, 0.5)


class RequestTests(SRSBrokerTestCase):
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
        self.assertEqual((results["агент-2"].message, results["агент-2"].details), ("no instance wörker-ü1", {"instance": "wörker-ü1"}))
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
