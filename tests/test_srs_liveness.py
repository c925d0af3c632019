"""A ``kill -9``'d agent is known dead within 1 s; no listing waits for it.

On the in-memory AMQP network and a ``Clock``: ``FakeTransport.crash()``
is a ``kill -9`` (the private queue goes with the connection, nothing more
is sent), ``hang()`` a SIGSTOP (the queue stays, nothing is sent or read).
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import srs
from scs.membership import DEAD_AFTER_PERIODS, Member, Membership, digest
from scs.srs_liveness import PROBE_INTERVAL, probe_interval, successor
from scs.srs_trust import MessageCodec
from scs.testing import FakeAMQPNetwork

SECRET = b"0123456789abcdef-cluster-secret"
INTERVAL = 2.0
LATENCY = 0.005  # each broker hop
START = 1_000_000.0  # wall-clock-like timestamps (the codec checks freshness)


class Net:
    """SRS agents with a cluster secret on one fake network and clock."""

    def __init__(self, test: SynchronousTestCase, *ids: str, secret: bytes | None = SECRET) -> None:
        self.test = test
        self.secret = secret
        self.clock = Clock()
        self.clock.advance(START)
        self.network = FakeAMQPNetwork(self.clock, latency=LATENCY)
        self.events: list[dict[str, Any]] = []
        self.agents: dict[str, srs.SRS] = {}
        self._runs = 0
        for agent_id in ids:
            self.add(agent_id)
        self.run(0.1)

    def add(self, agent_id: str) -> srs.SRS:
        self._runs += 1
        agent = srs.SRS(
            agent_id,
            self.network.transport(),
            reactor=self.clock,
            url=f"http://{agent_id}.example/",
            heartbeat_interval=INTERVAL,
            rng=random.Random(f"{agent_id}-{self._runs}"),
            handler=lambda op, args, _id=agent_id: {"agent": _id},
            summary=lambda: {"instances": 1, "digest": "d-" + agent_id},
            codec=MessageCodec("scs", self.secret, clock=self.clock.seconds),
        )
        agent.log = Logger(namespace="srs." + agent_id, observer=self.events.append)
        agent.liveness.log = agent.log
        agent.startService()
        self.test.addCleanup(lambda: agent.running and agent.stopService())
        self.agents[agent_id] = agent
        return agent

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def alive(self, observer: str, member: str) -> bool:
        return next(r["alive"] for r in self.agents[observer].members() if r["id"] == member)

    def member(self, observer: str, member: str) -> Member:
        found = self.agents[observer].membership.get(member)
        assert found is not None
        return found

    def until_dead(self, observers: list[str], member: str, limit: float, step: float = 0.01) -> dict[str, float]:
        """Seconds until each observer lists ``member`` not alive (within ``limit``)."""
        started, seen = self.clock.seconds(), {}
        while len(seen) < len(observers) and self.clock.seconds() - started <= limit:
            self.clock.advance(step)
            for observer in observers:
                if observer not in seen and not self.alive(observer, member):
                    seen[observer] = self.clock.seconds() - started
        return seen

    def inject(self, body: bytes) -> None:
        """Publish on the fanout as an outsider (any broker user can)."""
        _direct, fanout = srs.exchange_names("scs")
        self.network.route(fanout, "", body, {})
        self.run(0.05)

    def published(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        inners = (json.loads(json.loads(p.body)["m"]) for p in self.network.published[since:])
        return [inner for inner in inners if inner["type"] == kind]

    def named(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def rejected(self, agent_id: str) -> dict[str, int]:
        return self.agents[agent_id].rejected_counts()


def forged_gone(net: Net, sender: str, about: str, secret: bytes | None) -> bytes:
    codec = MessageCodec("scs", secret, clock=net.clock.seconds)
    return codec.encode("gone", sender, "feedface", "*", {"agent": about})


class KilledAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Net(self, "agent1", "agent2", "agent3")
        for observer in ("agent1", "agent2"):
            self.assertTrue(self.net.alive(observer, "agent3"))

    def test_every_peer_knows_it_dead_within_one_second(self) -> None:
        for offset in (0.0, 0.13, 0.37, 0.49):
            with self.subTest(offset=offset):
                net = Net(self, "agent1", "agent2", "agent3")
                net.run(offset)
                net.agents["agent3"].transport.crash()
                took = net.until_dead(["agent1", "agent2"], "agent3", limit=1.5)
                self.assertEqual(set(took), {"agent1", "agent2"})
                self.assertLessEqual(max(took.values()), 1.0)
                self.assertLessEqual(max(took.values()), PROBE_INTERVAL + 10 * LATENCY)
                for observer in ("agent1", "agent2"):
                    member = net.member(observer, "agent3")
                    self.assertEqual(member.dead_cause, "queue-gone")
                    self.assertIsNotNone(member.dead_since)
                    self.assertEqual(net.agents[observer].live_agents(), ["agent1", "agent2"])
                    dead = net.named("srs.member.dead", agent_id=observer, agent="agent3")
                    self.assertEqual([e["cause"] for e in dead], ["queue-gone"])

    def test_only_the_predecessor_probes_then_a_signed_notice_is_checked(self) -> None:
        net = self.net
        before = len(net.network.published)
        net.run(PROBE_INTERVAL)
        # One probe per agent and period, each to its successor in the ring.
        probes = net.published("probe", before)
        self.assertEqual(
            sorted((p["sender"], p["to"]) for p in probes),
            [
                ("agent1", "agent2"),
                ("agent2", "agent3"),
                ("agent3", "agent1"),
            ],
        )
        before = len(net.network.published)
        net.agents["agent3"].transport.crash()
        net.run(PROBE_INTERVAL + 0.1)
        # agent2 (agent3's predecessor) saw its probe returned and said so;
        # agent1 checked with its own probe before believing it.
        self.assertEqual([(g["sender"], g["to"]) for g in net.published("gone", before)], [("agent2", "*")])
        probes = [(p["sender"], p["to"]) for p in net.published("probe", before)]
        self.assertIn(("agent1", "agent3"), probes)
        self.assertEqual(
            net.named("srs.member.gone_notice", sender="agent2", agent="agent3")[0]["log_namespace"], "srs.agent1"
        )
        # The ring closes over the survivors.
        before = len(net.network.published)
        net.run(PROBE_INTERVAL)
        self.assertEqual(
            sorted((p["sender"], p["to"]) for p in net.published("probe", before)),
            [("agent1", "agent2"), ("agent2", "agent1")],
        )

    def test_a_listing_right_after_the_kill_does_not_wait_for_it(self) -> None:
        net = self.net
        net.agents["agent3"].transport.crash()
        for observer in ("agent1", "agent2"):
            # Not detected yet: still believed alive, so it is asked.
            self.assertTrue(net.alive(observer, "agent3"))
            started = net.clock.seconds()
            d = net.agents[observer].scatter("list", {}, timeout=2.0)
            gathered: list[Any] = []
            d.addCallback(gathered.append)
            while not gathered and net.clock.seconds() - started < 2.5:
                net.clock.advance(0.001)
            took = net.clock.seconds() - started
            self.assertLessEqual(took, 0.1)
            results, missing = gathered[0]
            self.assertEqual(
                (sorted(results), missing), ([p for p in ("agent1", "agent2") if p != observer], ["agent3"])
            )
            # The broker's return is enough: it is not alive any more.
            self.assertFalse(net.alive(observer, "agent3"))

    def test_a_request_routed_just_before_the_queue_went_is_not_waited_out(self) -> None:
        # The broker routed the request to agent3's queue, then dropped the
        # queue with the killed agent's connection: nothing comes back.
        net = self.net
        started = net.clock.seconds()
        d = net.agents["agent1"].scatter("list", {}, timeout=2.0)
        net.agents["agent3"].transport.crash()
        gathered: list[Any] = []
        d.addCallback(gathered.append)
        while not gathered and net.clock.seconds() - started < 2.5:
            net.clock.advance(0.001)
        self.assertLessEqual(net.clock.seconds() - started, 0.1)
        results, missing = gathered[0]
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))
        self.assertFalse(net.alive("agent1", "agent3"))

    def test_a_scatter_stops_waiting_for_an_agent_that_says_bye(self) -> None:
        net = self.net
        net.agents["agent3"].handler = lambda op, args: defer.Deferred()
        d = net.agents["agent1"].scatter("list", {}, timeout=2.0)
        net.run(0.2)
        self.assertNoResult(d)
        net.agents["agent3"].stopService()
        net.run(0.05)
        self.assertEqual(self.successResultOf(d)[1], ["agent3"])

    def test_a_slow_answer_costs_a_few_probes_and_no_verdict(self) -> None:
        net = self.net
        net.agents["agent3"].handler = lambda op, args: task.deferLater(net.clock, 1.0, lambda: {"late": True})
        before = len(net.network.published)
        d = net.agents["agent1"].scatter("list", {}, timeout=2.0)
        net.run(1.1)
        results, missing = self.successResultOf(d)
        self.assertEqual((sorted(results), missing), (["agent2", "agent3"], []))
        checks = [p for p in net.published("probe", before) if p["sender"] == "agent1" and p["to"] == "agent3"]
        self.assertLessEqual(len(checks), 5)  # at 0.05, 0.15, 0.35, 0.75 s
        self.assertTrue(net.alive("agent1", "agent3"))

    def test_listings_after_detection_do_not_ask_it(self) -> None:
        net = self.net
        net.agents["agent3"].transport.crash()
        net.run(1.0)
        before = len(net.network.published)
        d = net.agents["agent1"].scatter("list", {}, timeout=2.0)
        net.run(0.05)
        results, missing = self.successResultOf(d)
        self.assertEqual((sorted(results), missing), (["agent2"], []))
        self.assertEqual([r["to"] for r in net.published("request", before)], ["agent2"])

    def test_a_call_returned_marks_it_gone_for_everyone(self) -> None:
        net = self.net
        net.agents["agent3"].transport.crash()
        d = net.agents["agent1"].call("agent3", "get", {}, timeout=5.0)
        net.run(0.05)
        self.failureResultOf(d)
        self.assertFalse(net.alive("agent1", "agent3"))
        self.assertFalse(net.alive("agent2", "agent3"))

    def test_a_restarted_agent_is_alive_again(self) -> None:
        net = self.net
        old = net.agents["agent3"]
        old.transport.crash()
        net.run(1.0)
        self.assertFalse(net.alive("agent1", "agent3"))
        new = net.add("agent3")
        net.run(0.1)
        for observer in ("agent1", "agent2"):
            self.assertTrue(net.alive(observer, "agent3"))
            member = net.member(observer, "agent3")
            self.assertEqual(member.incarnation, new._incarnation)
            self.assertNotEqual(member.incarnation, old._incarnation)
            self.assertEqual((member.dead_since, member.dead_cause), (None, ""))
            alive = net.named("srs.member.alive", agent_id=observer, agent="agent3")
            self.assertEqual(len(alive), 2)
        # And it stays alive: probes to its new queue are routed.
        net.run(3 * INTERVAL)
        self.assertTrue(net.alive("agent1", "agent3"))

    def test_a_reconnected_agent_is_alive_again(self) -> None:
        net = self.net
        net.agents["agent3"].transport.drop_connection()
        # While it has no queue, probes and notices mark it gone; its hello
        # heartbeat on reconnecting (same run) brings it back.
        net.network.reconnect_delay = 0.3
        net.run(2.0)
        for observer in ("agent1", "agent2"):
            self.assertTrue(net.alive(observer, "agent3"))


class StoppedAgentTests(SynchronousTestCase):
    def test_a_stopped_agent_is_decided_by_heartbeats(self) -> None:
        net = Net(self, "agent1", "agent2", "agent3")
        net.run(0.3)
        heard = net.member("agent1", "agent3").last_seen
        assert heard is not None
        net.agents["agent3"].transport.hang()  # SIGSTOP: its queue stays
        before = len(net.network.published)
        deadline = heard + DEAD_AFTER_PERIODS * INTERVAL
        net.run(deadline - net.clock.seconds() - 0.05)
        self.assertTrue(net.alive("agent1", "agent3"))
        self.assertTrue(net.alive("agent2", "agent3"))
        # Probed all along, never returned: no notice.
        self.assertTrue(any(p["to"] == "agent3" for p in net.published("probe", before)))
        self.assertEqual(net.published("gone", before), [])
        net.run(0.1)
        for observer in ("agent1", "agent2"):
            self.assertFalse(net.alive(observer, "agent3"))
        net.run(INTERVAL)  # the heartbeat tick logs it
        for observer in ("agent1", "agent2"):
            member = net.member(observer, "agent3")
            self.assertEqual(member.dead_cause, "silent")
            self.assertAlmostEqual(member.dead_since or 0, (member.last_seen or 0) + DEAD_AFTER_PERIODS * INTERVAL)
            dead = net.named("srs.member.dead", agent_id=observer, agent="agent3")
            self.assertEqual([e["cause"] for e in dead], ["silent"])
        # SIGCONT: its next heartbeat brings it back.
        net.agents["agent3"].transport.resume()
        net.run(INTERVAL + 0.1)
        self.assertTrue(net.alive("agent1", "agent3"))
        self.assertIsNone(net.member("agent1", "agent3").dead_since)

    def test_a_listing_waits_for_a_stopped_agent_once(self) -> None:
        net = Net(self, "agent1", "agent2", "agent3")
        net.agents["agent3"].transport.hang()
        d = net.agents["agent1"].scatter("list", {}, timeout=1.0)
        net.run(0.9)
        self.assertNoResult(d)
        net.run(0.2)
        self.assertEqual(self.successResultOf(d)[1], ["agent3"])


class ForgedGoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Net(self, "agent1", "agent2", "agent3")

    def assert_all_alive(self) -> None:
        for observer in ("agent1", "agent2", "agent3"):
            self.assertEqual(self.net.agents[observer].live_agents(), ["agent1", "agent2", "agent3"])
            for row in self.net.agents[observer].members():
                self.assertTrue(row["alive"], row)
            self.assertEqual(self.net.named("srs.member.dead", agent_id=observer), [])

    def test_unsigned_or_badly_signed_notices_are_dropped(self) -> None:
        net = self.net
        net.inject(forged_gone(net, "agent3", "agent2", secret=None))
        net.inject(forged_gone(net, "agent3", "agent2", secret=b"guessed-secret-0000"))
        for observer in ("agent1", "agent3"):
            self.assertEqual(net.rejected(observer)["unsigned"], 1)
            self.assertEqual(net.rejected(observer)["bad-signature"], 1)
        self.assertEqual(net.named("srs.member.gone_notice"), [])
        net.run(3 * INTERVAL)
        self.assert_all_alive()

    def test_a_signed_notice_about_a_live_agent_costs_one_probe(self) -> None:
        net = self.net
        before = len(net.network.published)
        for _ in range(50):
            # From an insider (it has the secret) naming a live agent.
            net.inject(forged_gone(net, "agent3", "agent2", secret=SECRET))
        checks = [p for p in net.published("probe", before) if p["sender"] == "agent1" and p["to"] == "agent2"]
        # One check per probe interval, whatever the number of notices
        # (plus agent1's own ring probes to its successor, agent2).
        elapsed = net.clock.seconds() - (START + 0.1)
        self.assertLessEqual(len(checks), 2 * (elapsed / probe_interval(INTERVAL) + 1) + 1)
        self.assertLess(len(checks), 50)
        net.run(3 * INTERVAL)
        self.assert_all_alive()
        self.assertEqual([g for g in net.published("gone", before) if g["incarnation"] != "feedface"], [])

    def test_notices_about_ourselves_strangers_and_garbage(self) -> None:
        net = self.net
        before = len(net.network.published)
        net.inject(forged_gone(net, "agent3", "agent1", secret=SECRET))  # agent1 knows better
        net.inject(forged_gone(net, "agent3", "nobody", secret=SECRET))  # not a member: nothing to check
        net.inject(forged_gone(net, "stranger", "agent2", secret=SECRET))
        codec = MessageCodec("scs", SECRET, clock=net.clock.seconds)
        for payload in ({}, {"agent": 7}, {"agent": "../x"}, {"agent": "a" * 10_000}):
            net.inject(codec.encode("gone", "agent3", "feedface", "*", payload))
        net.inject(codec.encode("probe", "agent3", "feedface", "*", {"x": "y" * 10_000}))
        self.assertGreaterEqual(net.rejected("agent1")["not-a-member"], 1)
        self.assertGreaterEqual(net.rejected("agent1")["malformed"], 3)
        self.assertGreaterEqual(net.rejected("agent1")["oversized"], 2)  # the huge name too
        checks = [p for p in net.published("probe", before) if p["to"] in ("agent1", "nobody")]
        self.assertEqual([p for p in checks if p["sender"] == "agent1"], [])
        self.assertFalse([e for e in net.events if "log_failure" in e])
        net.run(3 * INTERVAL)
        self.assert_all_alive()

    def test_unsigned_cluster_still_checks_before_believing(self) -> None:
        net = Net(self, "agent1", "agent2", "agent3", secret=None)
        for _ in range(10):
            net.inject(forged_gone(net, "agent3", "agent2", secret=None))
        net.run(3 * INTERVAL)
        for observer in ("agent1", "agent3"):
            self.assertTrue(net.alive(observer, "agent2"))
            self.assertEqual(net.named("srs.member.dead", agent_id=observer), [])


class BookkeepingTests(SynchronousTestCase):
    def test_bye_is_a_cause(self) -> None:
        net = Net(self, "agent1", "agent2")
        net.agents["agent2"].stopService()
        net.run(0.05)
        member = net.member("agent1", "agent2")
        self.assertEqual((member.dead_cause, member.dead_since is not None), ("bye", True))
        self.assertEqual([e["cause"] for e in net.named("srs.member.dead", agent_id="agent1")], ["bye"])
        # A bye is not news for the probes: no notice.
        self.assertEqual(net.published("gone"), [])

    def test_digest_from_heartbeats(self) -> None:
        net = Net(self, "agent1", "agent2")
        self.assertEqual(net.member("agent1", "agent2").digest, "d-agent2")
        for value, kept in (
            ("abc123", "abc123"),
            ("x" * 64, "x" * 64),
            ("x" * 65, ""),
            ("ünï", ""),
            ("tab\there", ""),
            (12, ""),
            (None, ""),
            (["a"], ""),
        ):
            self.assertEqual(digest(value), kept)
        table = Membership(INTERVAL)
        payload = {"url": "", "interval": 2, "summary": {"instances": 1, "digest": {"a": 1}}}
        self.assertEqual(table.heartbeat("p", "i", payload, 0.0).digest, "")

    def test_dead_since_first_sighting_and_cleared(self) -> None:
        table = Membership(INTERVAL)
        payload = {"url": "", "interval": 2, "summary": {}}
        member = table.heartbeat("p", "i", payload, 10.0)
        table.transitions(15.0, True)
        self.assertIsNone(member.dead_since)
        table.transitions(17.0, True)
        self.assertEqual((member.dead_since, member.dead_cause), (16.0, "silent"))
        # Its queue goes later: still dead since it fell silent.
        self.assertTrue(table.left("p", 20.0))
        self.assertFalse(table.left("p", 21.0))
        self.assertEqual((member.dead_since, member.dead_cause), (16.0, "silent"))
        table.heartbeat("p", "i2", payload, 30.0)
        self.assertEqual((member.dead_since, member.dead_cause, member.left), (None, "", False))
        self.assertTrue(table.left("p", 31.0))
        self.assertEqual((member.dead_since, member.dead_cause), (31.0, "queue-gone"))

    def test_a_return_overtaken_by_news_of_the_member_is_old_news(self) -> None:
        # Probe sent at 30, the restarted member's hello heard at 30.5, the
        # old queue's return processed at 30.6: it is not gone.
        table = Membership(INTERVAL)
        table.heartbeat("p", "i2", {"url": "", "interval": 2, "summary": {}}, 30.5)
        self.assertFalse(table.left("p", 30.6, sent_at=30.0))
        self.assertIsNone(table.get("p").dead_since)  # type: ignore[union-attr]
        self.assertTrue(table.left("p", 31.2, sent_at=31.0))

    def test_ring(self) -> None:
        self.assertIsNone(successor("b", []))
        self.assertIsNone(successor("b", ["b"]))
        self.assertEqual(successor("b", ["a", "b", "c"]), "c")
        self.assertEqual(successor("c", ["a", "b", "c"]), "a")
        self.assertEqual(successor("a", ["c", "b"]), "b")
        self.assertEqual(successor("z", ["a"]), "a")
        self.assertEqual(probe_interval(2.0), 0.5)
        self.assertEqual(probe_interval(1.0), 0.25)
        self.assertEqual(probe_interval(60.0), 0.5)

    def test_probes_stop_while_disconnected_and_alone(self) -> None:
        net = Net(self, "solo")
        net.run(2.0)
        self.assertEqual(net.published("probe"), [])
        net = Net(self, "agent1", "agent2")
        net.network.stop_broker()
        before = len(net.network.published)
        net.run(2.0)
        self.assertEqual(net.published("probe", before), [])
