"""Unit tests of scs.srs on the in-memory AMQP network and a fake clock.

Nothing here sleeps or touches the global reactor: deliveries and timers run
on ``twisted.internet.task.Clock`` and ``clock.advance(0)`` delivers
everything in flight.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import errors, membership, srs
from scs.testing import FakeAMQPNetwork

INTERVAL = 2.0


class Cluster:
    """A few SRS agents on one fake network and one clock."""

    def __init__(
        self, test: SynchronousTestCase, *ids: str, cluster: str = "scs", network: FakeAMQPNetwork | None = None
    ):
        self.clock = network.clock if network is not None else Clock()
        self.network = network if network is not None else FakeAMQPNetwork(self.clock)
        self.events: list[dict[str, Any]] = []
        self.agents: dict[str, srs.SRS] = {}
        for agent_id in ids:
            self.add(test, agent_id, cluster=cluster)

    def add(self, test: SynchronousTestCase, agent_id: str, cluster: str = "scs", start: bool = True) -> srs.SRS:
        agent = srs.SRS(
            agent_id,
            cluster=cluster,
            url="http://%s.example/" % srs.routing_key(agent_id),
            transport=self.network.transport(),
            heartbeat_interval=INTERVAL,
            reactor=self.clock,
            rng=random.Random(agent_id),
            summary=lambda: {"instances": 3},
        )
        agent.log = Logger(namespace="srs." + agent_id, observer=self.events.append)
        agent.handler = lambda op, args, _id=agent_id: {"agent": _id, "op": op, "args": args}
        self.agents[agent_id] = agent
        if start:
            agent.startService()
        test.addCleanup(self._stop, agent)
        return agent

    @staticmethod
    def _stop(agent: srs.SRS) -> None:
        if agent.running:
            agent.stopService()

    def settle(self) -> None:
        self.clock.advance(0)

    def failures(self, exception_type: type) -> list[dict[str, Any]]:
        return [e for e in self.events if "log_failure" in e and e["log_failure"].check(exception_type)]

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


def _result(test: SynchronousTestCase, d: defer.Deferred) -> Any:
    return test.successResultOf(d)


class MembershipTests(SynchronousTestCase):
    def test_everyone_sees_everyone_at_once(self) -> None:
        c = Cluster(self, "agent1", "agent2", "agent3")
        c.settle()
        for agent in c.agents.values():
            self.assertEqual(agent.live_agents(), ["agent1", "agent2", "agent3"])
            rows = agent.members()
            self.assertEqual([r["id"] for r in rows], ["agent1", "agent2", "agent3"])
            self.assertTrue(all(r["alive"] for r in rows))
            self.assertEqual({r["instances"] for r in rows}, {3})
        row = c.agents["agent1"].members()[1]
        self.assertEqual(
            row,
            {
                "id": "agent2",
                "url": "http://agent2.example/",
                "alive": True,
                "last_seen": 0.0,
                "instances": 3,
                "requires_token": False,
            },
        )

    def test_late_joiner_learns_members_without_waiting_a_period(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        c.clock.advance(0.5)
        late = c.add(self, "agent3")
        c.settle()
        self.assertEqual(late.live_agents(), ["agent1", "agent2", "agent3"])
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2", "agent3"])

    def test_heartbeats_keep_members_alive(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        for _ in range(20):
            c.clock.advance(INTERVAL)
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2"])
        self.assertEqual(c.agents["agent1"].members()[1]["last_seen"], 20 * INTERVAL)

    def test_silent_peer_dies_after_three_periods(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        c.agents["agent2"].transport.hang()  # stopped: its queue stays (a crash is known at once)
        c.clock.advance(3 * INTERVAL)
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2"])
        c.clock.advance(0.01)
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        row = c.agents["agent1"].members()[1]
        self.assertEqual((row["id"], row["alive"], row["last_seen"]), ("agent2", False, 0.0))
        c.clock.advance(INTERVAL)
        dead = [e for e in c.events_named("srs.member.dead") if e["agent_id"] == "agent1"]
        self.assertEqual([(e["member"], e["why"]) for e in dead], [("agent2", "silent")])

    def test_announced_period_is_bounded(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.agents["agent2"].heartbeat_interval = 1e9
        c.settle()
        c.agents["agent2"].transport.hang()
        c.clock.advance(3 * membership.MAX_PERIOD + 1)
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])

    def test_membership_changes_are_logged_once(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        for _ in range(5):
            c.clock.advance(INTERVAL)
        alive = [e["member"] for e in c.events_named("srs.member.alive") if e["agent_id"] == "agent1"]
        self.assertEqual(alive, ["agent2"])

    def test_stopped_peer_says_bye_and_is_dead_at_once(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        c.agents["agent2"].stopService()
        c.settle()
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        self.assertEqual([r["id"] for r in c.agents["agent1"].members()], ["agent1", "agent2"])

    def test_self_always_listed(self) -> None:
        c = Cluster(self)
        agent = c.add(self, "solo", start=False)
        self.assertEqual(agent.members()[0]["id"], "solo")
        self.assertFalse(agent.members()[0]["alive"])
        self.assertFalse(agent.is_connected())
        agent.startService()
        c.settle()
        self.assertTrue(agent.is_connected())
        self.assertEqual(
            agent.members(),
            [
                {
                    "id": "solo",
                    "url": agent.url,
                    "alive": True,
                    "last_seen": 0.0,
                    "instances": 3,
                    "requires_token": False,
                }
            ],
        )

    def test_summary_failure_reports_zero_instances(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.agents["agent2"].summary = lambda: 1 / 0
        c.clock.advance(INTERVAL)
        self.assertEqual([r["instances"] for r in c.agents["agent1"].members()], [3, 0])
        self.assertTrue(c.failures(ZeroDivisionError))


class CallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = Cluster(self, "agent1", "agent2")
        self.c.settle()
        self.a1, self.a2 = self.c.agents["agent1"], self.c.agents["agent2"]

    def test_call_runs_on_the_target(self) -> None:
        d = self.a1.call("agent2", "get", {"name": "x"})
        self.c.settle()
        self.assertEqual(_result(self, d), {"agent": "agent2", "op": "get", "args": {"name": "x"}})

    def test_call_with_deferred_result(self) -> None:
        later: defer.Deferred = defer.Deferred()
        self.a2.handler = lambda op, args: later
        d = self.a1.call("agent2", "slow", {})
        self.c.settle()
        self.assertNoResult(d)
        later.callback([1, 2])
        self.c.settle()
        self.assertEqual(_result(self, d), [1, 2])

    def test_remote_domain_error_is_reraised_as_same_class(self) -> None:
        def refuse(op: str, args: dict) -> Any:
            raise errors.NotFound("no instance w1", instance="w1")

        self.a2.handler = refuse
        d = self.a1.call("agent2", "get", {})
        self.c.settle()
        error = self.failureResultOf(d, errors.NotFound).value
        self.assertEqual((error.message, error.details, error.status), ("no instance w1", {"instance": "w1"}, 404))

    def test_remote_deferred_error_is_reraised(self) -> None:
        self.a2.handler = lambda op, args: defer.fail(errors.Conflict("exists"))
        d = self.a1.call("agent2", "put", {})
        self.c.settle()
        self.failureResultOf(d, errors.Conflict)

    def test_remote_bug_is_a_generic_error_and_logged_there(self) -> None:
        self.a2.handler = lambda op, args: {}["missing"]
        d = self.a1.call("agent2", "get", {})
        self.c.settle()
        error = self.failureResultOf(d, errors.SCSError).value
        self.assertIs(type(error), errors.SCSError)
        self.assertIn("agent2", error.message)
        self.assertEqual(len(self.c.failures(KeyError)), 1)

    def test_result_not_json_is_an_error(self) -> None:
        self.a2.handler = lambda op, args: {"x": object()}
        d = self.a1.call("agent2", "get", {})
        self.c.settle()
        self.failureResultOf(d, errors.SCSError)

    def test_timeout(self) -> None:
        self.a2.handler = lambda op, args: defer.Deferred()
        d = self.a1.call("agent2", "get", {}, timeout=1.5)
        self.c.clock.advance(1.4)
        self.assertNoResult(d)
        self.c.clock.advance(0.2)
        error = self.failureResultOf(d, errors.GatewayTimeout).value
        self.assertEqual(error.details, {"agent": "agent2"})

    def test_late_reply_after_timeout_is_ignored(self) -> None:
        later: defer.Deferred = defer.Deferred()
        self.a2.handler = lambda op, args: later
        d = self.a1.call("agent2", "get", {}, timeout=1)
        self.c.clock.advance(1)
        self.failureResultOf(d, errors.GatewayTimeout)
        later.callback("too late")
        self.c.settle()  # must not raise AlreadyCalledError

    def test_call_to_unknown_agent_fails_fast(self) -> None:
        d = self.a1.call("nobody", "get", {}, timeout=2)
        self.c.settle()
        error = self.failureResultOf(d, errors.Unavailable).value
        self.assertEqual(error.details, {"agent": "nobody"})
        self.assertEqual([e["member"] for e in self.c.events_named("srs.call.unroutable")], ["nobody"])

    def test_call_to_crashed_agent_fails_fast_before_it_is_dead(self) -> None:
        self.a2.transport.crash()
        self.assertEqual(self.a1.live_agents(), ["agent1", "agent2"])
        d = self.a1.call("agent2", "get", {}, timeout=2)
        self.c.settle()
        self.failureResultOf(d, errors.Unavailable)
        # The broker's word is enough: listings stop waiting for it now.
        self.assertEqual(self.a1.live_agents(), ["agent1"])
        d = self.a1.scatter("list", {})
        self.c.settle()
        self.assertEqual(self.successResultOf(d)[1], [])

    def test_returned_message_of_a_finished_call_is_ignored(self) -> None:
        self.a1.message_returned(b"{}", {"correlation-id": "unknown"})
        self.a1.message_returned(b"{}", {})

    def test_call_to_self_is_local_and_json_shaped(self) -> None:
        self.a1.handler = lambda op, args: {"t": (1, 2)}
        d = self.a1.call("agent1", "get", {})
        self.assertEqual(_result(self, d), {"t": [1, 2]})
        self.assertEqual([p for p in self.c.network.published if b'"request"' in p.body], [])

    def test_call_to_self_errors(self) -> None:
        self.a1.handler = lambda op, args: (_ for _ in ()).throw(errors.BadParameter("bad"))
        self.failureResultOf(self.a1.call("agent1", "x", {}), errors.BadParameter)

    def test_call_when_disconnected_is_unavailable(self) -> None:
        self.c.network.stop_broker()
        self.failureResultOf(self.a1.call("agent2", "get", {}), errors.Unavailable)

    def test_pending_call_fails_when_broker_goes(self) -> None:
        self.a2.handler = lambda op, args: defer.Deferred()
        d = self.a1.call("agent2", "get", {})
        self.c.settle()
        self.c.network.stop_broker()
        self.failureResultOf(d, errors.Unavailable)

    def test_cancel_forgets_the_call(self) -> None:
        self.a2.handler = lambda op, args: defer.Deferred()
        d = self.a1.call("agent2", "get", {})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        timers = [c for c in self.c.clock.getDelayedCalls() if c.func == self.a1._pending._call_timed_out]
        self.assertEqual(timers, [])
        self.c.clock.advance(10)  # the reply arrives or not: nothing fires twice

    def test_messages_carry_version_cluster_and_ascii_properties(self) -> None:
        d = self.a1.call("agent2", "get", {"name": "wörker-ü1"})
        self.c.settle()
        self.successResultOf(d)
        request = [p for p in self.c.network.published if json.loads(json.loads(p.body)["m"])["type"] == "request"][0]
        message = json.loads(json.loads(request.body)["m"])
        self.assertEqual((message["proto"], message["version"], message["cluster"]), ("scs-srs", "2.0", "scs"))
        self.assertEqual((message["to"], message["cid"]), ("agent2", request.properties["correlation-id"]))
        self.assertEqual(message["payload"]["args"], {"name": "wörker-ü1"})
        self.assertTrue(request.body.isascii())
        self.assertEqual(set(request.properties), {"reply-to", "correlation-id"})
        self.assertEqual(request.routing_key, "agent2")


class ScatterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = Cluster(self, "agent1", "agent2", "agent3")
        self.c.settle()
        self.a1 = self.c.agents["agent1"]

    def test_fires_as_soon_as_every_peer_answered(self) -> None:
        d = self.a1.scatter("list", {"app": "foo"})
        self.c.settle()
        results, missing = _result(self, d)
        self.assertEqual(missing, [])
        self.assertEqual(sorted(results), ["agent2", "agent3"])
        self.assertEqual(results["agent3"]["args"], {"app": "foo"})
        self.assertEqual(self.c.clock.seconds(), 0)

    def test_silent_peer_is_missing_at_the_timeout(self) -> None:
        self.c.agents["agent3"].transport.hang()  # its queue stays: only the timeout tells
        d = self.a1.scatter("list", {}, timeout=1.0)
        self.c.clock.advance(0.9)
        self.assertNoResult(d)
        self.c.clock.advance(0.1)
        results, missing = _result(self, d)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))

    def test_peer_that_missed_a_scatter_is_not_waited_for_until_heard_again(self) -> None:
        agent3 = self.c.agents["agent3"]
        agent3.handler = lambda op, args: defer.Deferred()  # alive but stuck
        first = self.a1.scatter("list", {}, timeout=1.0)
        self.c.settle()
        self.c.clock.advance(1.0)
        self.assertEqual(_result(self, first)[1], ["agent3"])
        # Before agent3's next heartbeat: reported missing without waiting.
        second = self.a1.scatter("list", {}, timeout=1.0)
        self.c.settle()
        results, missing = _result(self, second)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))
        # Its heartbeat clears the suspicion: it is waited for again.
        agent3.handler = lambda op, args: {"agent": "agent3"}
        self.c.clock.advance(INTERVAL)
        third = self.a1.scatter("list", {}, timeout=1.0)
        self.c.settle()
        self.assertEqual(
            _result(self, third),
            ({"agent2": {"agent": "agent2", "op": "list", "args": {}}, "agent3": {"agent": "agent3"}}, []),
        )

    def test_hung_peer_costs_one_timeout_not_one_per_scatter(self) -> None:
        self.c.agents["agent3"].transport.hang()
        first = self.a1.scatter("list", {}, timeout=1.0)
        self.c.settle()
        self.c.clock.advance(1.0)
        self.assertEqual(_result(self, first)[1], ["agent3"])
        for _ in range(3):
            d = self.a1.scatter("list", {}, timeout=1.0)
            self.c.settle()
            self.assertEqual(_result(self, d)[1], ["agent3"])

    def test_dead_peer_is_not_waited_for(self) -> None:
        self.c.agents["agent3"].transport.crash()
        self.c.clock.advance(3 * INTERVAL + 0.1)
        d = self.a1.scatter("list", {}, timeout=1.0)
        self.c.settle()
        self.assertEqual(_result(self, d)[1], [])

    def test_errors_are_reported_as_instances(self) -> None:
        self.c.agents["agent2"].handler = lambda op, args: defer.fail(errors.NotFound("no app", app="foo"))
        d = self.a1.scatter("list", {})
        self.c.settle()
        results, missing = _result(self, d)
        self.assertIsInstance(results["agent2"], errors.NotFound)
        self.assertEqual(results["agent2"].details, {"app": "foo"})
        self.assertEqual(missing, [])

    def test_alone_fires_at_once_without_publishing(self) -> None:
        c = Cluster(self, "solo")
        c.settle()
        before = len(c.network.published)
        self.assertEqual(_result(self, c.agents["solo"].scatter("list", {})), ({}, []))
        self.assertEqual(len(c.network.published), before)

    def test_disconnected_fires_at_once_with_peers_alive_at_the_loss_missing(self) -> None:
        self.c.agents["agent3"].stopService()  # said bye: not missed later
        self.c.settle()
        self.c.network.stop_broker()
        self.assertEqual(_result(self, self.a1.scatter("list", {})), ({}, ["agent2"]))
        self.assertEqual(self.a1.live_agents(), ["agent1"])
        self.assertEqual([r["alive"] for r in self.a1.members()], [False, False, False])
        self.c.clock.advance(10 * INTERVAL)
        self.assertEqual(_result(self, self.a1.scatter("list", {})), ({}, ["agent2"]))

    def test_never_connected_misses_nobody(self) -> None:
        c = Cluster(self)
        agent = c.add(self, "agent1", start=False)
        self.assertEqual(_result(self, agent.scatter("list", {})), ({}, []))

    def test_pending_scatter_fires_when_broker_goes(self) -> None:
        self.c.agents["agent3"].handler = lambda op, args: defer.Deferred()
        d = self.a1.scatter("list", {}, timeout=2)
        self.c.settle()
        self.c.network.stop_broker()
        results, missing = _result(self, d)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))

    def test_newcomer_not_yet_in_the_table_is_not_asked(self) -> None:
        # A scatter goes to each live peer by its own key (so that the broker
        # returns it for one whose queue is gone), not to the fanout.
        self.c.agents["agent3"].handler = lambda op, args: defer.Deferred()
        late = self.c.add(self, "agent4")
        self.c.settle()
        # As if agent4's first heartbeat had not reached agent1 yet.
        del self.a1.membership.members["agent4"]
        d = self.a1.scatter("list", {}, timeout=1)
        self.c.settle()
        self.c.clock.advance(1)
        results, missing = _result(self, d)
        self.assertEqual((sorted(results), missing), (["agent2"], ["agent3"]))
        self.assertTrue(late.is_connected())


class BroadcastTests(SynchronousTestCase):
    def test_every_other_agent_runs_it_once(self) -> None:
        c = Cluster(self, "agent1", "agent2", "agent3")
        seen: list[tuple[str, str, dict]] = []
        for agent_id, agent in c.agents.items():
            agent.handler = lambda op, args, _id=agent_id: seen.append((_id, op, args))
        c.settle()
        self.assertIsNone(c.agents["agent1"].broadcast("app.put", {"name": "foo"}))
        c.settle()
        self.assertEqual(sorted(seen), [("agent2", "app.put", {"name": "foo"}), ("agent3", "app.put", {"name": "foo"})])
        self.assertEqual(len([p for p in c.network.published if p.routing_key == "" and b'"reply"' in p.body]), 0)

    def test_refusal_is_logged_not_answered(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.agents["agent2"].handler = lambda op, args: defer.fail(errors.Conflict("no"))
        c.settle()
        c.agents["agent1"].broadcast("app.put", {})
        c.settle()
        self.assertTrue([e for e in c.events if "refused" in e.get("log_format", "")])

    def test_dropped_when_disconnected(self) -> None:
        c = Cluster(self, "agent1")
        c.agents["agent1"].broadcast("app.put", {})
        self.assertEqual(len(c.events_named("srs.broadcast.dropped")), 1)


class IsolationAndVersionTests(SynchronousTestCase):
    def test_two_clusters_on_one_broker_do_not_mix(self) -> None:
        c = Cluster(self, "agent1", "agent2", cluster="blue")
        c.add(self, "agent3", cluster="green")
        c.add(self, "agent4", cluster="green")
        c.settle()
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2"])
        self.assertEqual(c.agents["agent3"].live_agents(), ["agent3", "agent4"])
        d = c.agents["agent1"].scatter("list", {})
        c.settle()
        self.assertEqual(sorted(_result(self, d)[0]), ["agent2"])

    def _inject(self, c: Cluster, **overrides: Any) -> None:
        message = {
            "proto": "scs-srs",
            "version": "2.0",
            "cluster": "scs",
            "type": "heartbeat",
            "sender": "intruder",
            "incarnation": "x",
            "to": "*",
            "ts": c.clock.seconds(),
            "nonce": "00112233445566778899aabb",
            "payload": {"url": "", "interval": INTERVAL, "summary": {}},
        }
        message.update(overrides)
        direct, fanout = srs.exchange_names("scs")
        c.network.route(fanout, "", srs.encode_message({"m": srs.encode_message(message).decode()}), {})
        c.settle()

    def test_other_cluster_name_is_ignored_and_logged_once(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        self._inject(c, cluster="other")
        self._inject(c, cluster="other")
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        rejected = c.events_named("srs.rejected")
        self.assertEqual([(e["reason"], e["detail"]) for e in rejected], [("foreign", "cluster 'other'")])
        self.assertEqual(c.agents["agent1"].codec.rejected["foreign"], 2)

    def test_unknown_major_version_is_ignored(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        self._inject(c, version="3.0")
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        self.assertEqual([e["reason"] for e in c.events_named("srs.rejected")], ["foreign"])

    def test_missing_version_is_ignored(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        self._inject(c, version=None)
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])

    def test_newer_minor_version_with_extra_fields_is_accepted(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        self._inject(c, version="2.7", shiny_new_field=[1])
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "intruder"])

    def test_garbage_is_ignored(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        direct, fanout = srs.exchange_names("scs")
        for body in (b"not json", b"[1]", b'{"proto": "other"}'):
            c.network.route(fanout, "", body, {})
        c.settle()
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        self.assertEqual(c.agents["agent1"].codec.rejected["malformed"], 3)

    def test_another_agent_with_our_id_is_reported(self) -> None:
        c = Cluster(self, "agent1")
        c.settle()
        self._inject(c, sender="agent1", incarnation="someone-else")
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        self.assertEqual([e["sender"] for e in c.events_named("srs.ignored")], ["agent1"])

    def test_exchange_names_include_the_cluster(self) -> None:
        self.assertEqual(srs.exchange_names("scs"), ("scs.scs.direct", "scs.scs.fanout"))
        self.assertNotEqual(srs.exchange_names("a.b"), srs.exchange_names("a%2Eb"))
        self.assertTrue(all(n.isascii() for n in srs.exchange_names("clüster")))


class NonAsciiTests(SynchronousTestCase):
    def test_non_ascii_ids_and_payloads_round_trip(self) -> None:
        c = Cluster(self, "agënt-1", "агент-2")
        c.settle()
        a1, a2 = c.agents["agënt-1"], c.agents["агент-2"]
        self.assertEqual(a1.live_agents(), ["agënt-1", "агент-2"])
        d = a1.call("агент-2", "get", {"name": "wörker-ü1"})
        c.settle()
        self.assertEqual(_result(self, d), {"agent": "агент-2", "op": "get", "args": {"name": "wörker-ü1"}})

        def refuse(op: str, args: dict) -> Any:
            raise errors.NotFound("no instance wörker-ü1", instance="wörker-ü1")

        a2.handler = refuse
        d = a1.scatter("get", {})
        c.settle()
        error = _result(self, d)[0]["агент-2"]
        self.assertEqual((error.message, error.details), ("no instance wörker-ü1", {"instance": "wörker-ü1"}))
        self.assertTrue(all(p.body.isascii() and p.routing_key.isascii() for p in c.network.published))

    def test_routing_keys_do_not_collide(self) -> None:
        ids = ["a b", "a%20b", "ü", "%C3%BC", "a.b", "a"]
        self.assertEqual(len({srs.routing_key(i) for i in ids}), len(ids))


class ReconnectionTests(SynchronousTestCase):
    def test_broker_restart(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        connected: list[str] = []
        c.agents["agent1"].on_connected.append(lambda: connected.append("up"))
        c.settle()
        self.assertEqual(connected, [])  # peers get a moment to answer our hello
        c.clock.advance(INTERVAL / 4)
        self.assertEqual(connected, ["up"])
        c.network.stop_broker()
        self.assertFalse(c.agents["agent1"].is_connected())
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1"])
        dead = [e["why"] for e in c.events_named("srs.member.dead") if e["agent_id"] == "agent1"]
        self.assertEqual(dead, ["disconnected"])
        c.clock.advance(10 * INTERVAL)  # heartbeats are not attempted while down
        c.network.start_broker()
        c.settle()
        c.clock.advance(INTERVAL / 4)
        self.assertEqual(connected, ["up", "up"])
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2"])
        d = c.agents["agent1"].call("agent2", "get", {})
        c.settle()
        self.assertEqual(_result(self, d)["agent"], "agent2")

    def test_one_connection_drop(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        c.agents["agent2"].transport.drop_connection()
        c.settle()
        self.assertTrue(c.agents["agent2"].is_connected())
        self.assertEqual(c.agents["agent1"].live_agents(), ["agent1", "agent2"])
        self.assertEqual(c.agents["agent2"].live_agents(), ["agent1", "agent2"])

    def test_connected_callback_finds_the_peers(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        late = c.add(self, "agent3", start=False)
        gathered: list[Any] = []
        late.on_connected.append(lambda: late.scatter("app_export", {}).addCallback(gathered.append))
        late.startService()
        c.settle()
        self.assertEqual(gathered, [])
        c.clock.advance(INTERVAL / 4)
        c.settle()
        self.assertEqual([sorted(gathered[0][0]), gathered[0][1]], [["agent1", "agent2"], []])

    def test_no_connected_callback_after_a_quick_disconnection(self) -> None:
        c = Cluster(self)
        agent = c.add(self, "agent1", start=False)
        called: list[int] = []
        agent.on_connected.append(lambda: called.append(1))
        agent.startService()
        c.settle()
        c.network.stop_broker()
        c.clock.advance(INTERVAL)
        self.assertEqual(called, [])

    def test_failing_connected_callback_is_logged(self) -> None:
        c = Cluster(self)
        agent = c.add(self, "agent1", start=False)
        agent.on_connected.append(lambda: 1 / 0)
        agent.startService()
        c.settle()
        c.clock.advance(INTERVAL)
        self.assertTrue(agent.is_connected())
        self.assertEqual(len(c.failures(ZeroDivisionError)), 1)

    def test_stop_fails_pending_and_stops_timers(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.settle()
        c.agents["agent2"].handler = lambda op, args: defer.Deferred()
        d = c.agents["agent1"].call("agent2", "get", {})
        c.settle()
        for agent in c.agents.values():
            self.successResultOf(agent.stopService())
        self.failureResultOf(d, errors.Unavailable)
        c.settle()  # the byes in flight are dropped: their queues are gone
        self.assertEqual(c.clock.getDelayedCalls(), [])
