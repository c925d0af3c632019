"""The cluster bus as an attacker sees it, on the in-memory AMQP network.

An intruder here is anyone who can publish to the cluster's exchanges and
read its fanout (a broker user): it forges, replays, floods, spoofs byes
and replies.  Agents with a cluster secret must act on none of it; agents
without one must still refuse what the HTTP API refuses, keep their tables
bounded and never crash.  Everything runs on a ``Clock``.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import errors, srs
from scs.agent import Agent, ClusterQueues, LocalAgent
from scs.srs_trust import MAX_MESSAGE_BYTES, MessageCodec, Rejected
from scs.store import Store
from scs.testing import FakeAMQPNetwork
from tests.surfaces_support import FakeSupervisor

SECRET = b"0123456789abcdef-cluster-secret"
BROKER = "amqp://guest:s3cret-pw@127.0.0.1:5672//"
INTERVAL = 2.0


class Bus:
    """Agents (full façades on in-memory stores) on one fake network."""

    def __init__(self, test: SynchronousTestCase, *ids: str, secret: bytes | None = SECRET, **srs_options: Any):
        self.test = test
        self.clock = Clock()
        self.clock.advance(1_000_000)  # wall-clock-like timestamps
        self.network = FakeAMQPNetwork(self.clock)
        self.events: list[dict[str, Any]] = []
        self.agents: dict[str, Agent] = {}
        for agent_id in ids:
            self.add(agent_id, secret=secret, **srs_options)
        self.settle()

    def add(self, agent_id: str, secret: bytes | None = SECRET, **srs_options: Any) -> Agent:
        """An agent wired as makeService wires one."""
        store = Store.in_memory()
        self.test.addCleanup(store.close)
        agent: Any = None
        node = srs.SRS(
            agent_id,
            self.network.transport(),
            reactor=self.clock,
            heartbeat_interval=INTERVAL,
            rng=random.Random(agent_id),
            handler=lambda op, args: agent.handle_remote(op, args),
            on_connected=[lambda: agent.sync_apps_from_peers()],
            summary=lambda: agent.local.summary(),
            codec=MessageCodec("scs", secret, clock=self.clock.seconds),
            **srs_options,
        )
        node.log = Logger(namespace="srs." + agent_id, observer=self.events.append)
        local = LocalAgent(
            store, agent_id, BROKER, FakeSupervisor(), clock=self.clock, resolve_queue=ClusterQueues(store, node)
        )
        agent = Agent(local, node, random=random.Random(1), call_timeout=2.0, create_timeout=2.0)
        node.startService()
        self.test.addCleanup(lambda: node.running and node.stopService())
        self.agents[agent_id] = agent
        return agent

    def settle(self) -> None:
        self.clock.advance(0)

    def run(self, coroutine: Any) -> Any:
        d = defer.Deferred.fromCoroutine(coroutine)
        for _ in range(30):
            self.clock.advance(0.1)
        return d

    def inject(self, body: bytes, to: str | None = None) -> None:
        """Publish as an outsider: to one agent's direct key, or the fanout."""
        direct, fanout = srs.exchange_names("scs")
        if to is None:
            self.network.route(fanout, "", body, {})
        else:
            self.network.route(direct, srs.routing_key(to), body, {})
        self.settle()

    def rejected(self, agent_id: str) -> dict[str, int]:
        return dict(self.agents[agent_id].srs.codec.rejected)

    def published(self, **match: Any) -> list[Any]:
        out = []
        for delivery in self.network.published:
            inner = json.loads(json.loads(delivery.body)["m"])
            if all(inner.get(k) == v for k, v in match.items()):
                out.append(delivery)
        return out


def forged(
    kind: str, sender: str, payload: dict[str, Any], *, clock: Clock, secret: bytes | None = None, **header: Any
) -> bytes:
    """A message as an intruder builds it (with a secret: one it guessed)."""
    codec = MessageCodec("scs", secret, clock=clock.seconds)
    to = header.pop("to", "*")
    return codec.encode(kind, sender, header.pop("incarnation", "feedface"), to, payload, **header)


class CodecTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.codec = MessageCodec("scs", SECRET, clock=self.clock.seconds)

    def _open(self, body: bytes, me: str = "agent2", codec: MessageCodec | None = None) -> Any:
        return (codec or self.codec).open(body, me=me)

    def test_round_trip_is_signed_and_sealed(self) -> None:
        body = self.codec.encode(
            "request", "agent1", "i1", "agent2", {"op": "app_put", "args": {"broker": BROKER}}, cid="c1", reply_to="q"
        )
        self.assertNotIn(b"s3cret-pw", body)
        self.assertNotIn(b"app_put", body)
        message = self._open(body)
        self.assertEqual((message.sender, message.to, message.cid, message.reply_to), ("agent1", "agent2", "c1", "q"))
        self.assertEqual(message.payload["args"]["broker"], BROKER)

    def _refused(self, body: bytes, reason: str, **kwargs: Any) -> None:
        with self.assertRaises(Rejected) as caught:
            self._open(body, **kwargs)
        self.assertEqual(caught.exception.reason, reason)

    def test_unsigned_message_is_refused(self) -> None:
        self._refused(forged("heartbeat", "x", {}, clock=self.clock), "unsigned")

    def test_wrong_secret_is_refused(self) -> None:
        self._refused(forged("heartbeat", "x", {}, clock=self.clock, secret=b"another-secret-of-16+"), "bad-signature")

    def test_any_change_to_the_signed_text_is_refused(self) -> None:
        body = json.loads(self.codec.encode("request", "agent1", "i1", "agent2", {"op": "x", "args": {}}))
        inner = json.loads(body["m"])
        for field, value in (("to", "agent3"), ("sender", "agent9"), ("ts", 1e12), ("reply_to", "evil")):
            changed = dict(inner, **{field: value})
            tampered = json.dumps({"m": json.dumps(changed), "s": body["s"]}).encode()
            self._refused(tampered, "bad-signature")

    def test_stale_both_ways(self) -> None:
        old = self.codec.encode("heartbeat", "agent1", "i1", "*", {})
        self.clock.advance(31)
        self._refused(old, "stale")
        future = MessageCodec("scs", SECRET, clock=lambda: self.clock.seconds() + 31)
        self._refused(future.encode("heartbeat", "agent1", "i1", "*", {}), "stale")

    def test_replay_is_refused_within_the_window(self) -> None:
        body = self.codec.encode("heartbeat", "agent1", "i1", "*", {})
        self._open(body)
        self._refused(body, "replayed")
        self.clock.advance(40)
        self._refused(body, "stale")

    def test_message_for_another_agent_is_refused(self) -> None:
        self._refused(self.codec.encode("request", "agent1", "i1", "agent3", {}), "misrouted")

    def test_oversized_and_garbage(self) -> None:
        self._refused(b" " * (MAX_MESSAGE_BYTES + 1), "oversized")
        for body in (b"not json", b"[1]", b'{"m": 1}', b'{"m": "[1]", "s": "00"}', b"\xff\xfe"):
            with self.assertRaises(Rejected):
                self._open(body)
        self.assertGreaterEqual(self.codec.rejected["malformed"], 3)

    def test_remembered_nonces_are_bounded(self) -> None:
        codec = MessageCodec("scs", SECRET, clock=self.clock.seconds, max_nonces=50)
        for _ in range(500):
            codec.open(self.codec.encode("heartbeat", "agent1", "i1", "*", {}), me="agent2")
        self.assertLessEqual(len(codec._seen), 50)

    def test_unsigned_codec_carries_payload_in_clear(self) -> None:
        codec = MessageCodec("scs", None, clock=self.clock.seconds)
        body = codec.encode("heartbeat", "agent1", "i1", "*", {"url": ""})
        self.assertEqual(codec.open(body, me="agent2").payload, {"url": ""})
        # a signed agent does not take it
        self._refused(body, "unsigned")


class SignedClusterTests(SynchronousTestCase):
    def test_signed_agents_form_a_cluster_and_work(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1", "agent2"])
        reply = self.successResultOf(bus.run(bus.agents["agent1"].instance_create("foo", "w1", on="agent2")))
        self.assertEqual(reply.body["agent"], "agent2")

    def test_forged_heartbeats_make_no_member(self) -> None:
        bus = Bus(self, "agent1")
        for i in range(100):
            bus.inject(forged("heartbeat", f"phantom{i}", {"url": "", "interval": 2, "summary": {}}, clock=bus.clock))
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1"])
        self.assertEqual(bus.rejected("agent1")["unsigned"], 100)
        # logged once, counted always
        self.assertEqual(len([e for e in bus.events if e.get("event") == "srs.rejected"]), 1)

    def test_forged_request_changes_nothing(self) -> None:
        bus = Bus(self, "agent1")
        store = bus.agents["agent1"].store
        before = store.dump()
        for op, args in (
            ("app_put", {"app": "evil", "broker": BROKER}),
            ("instance_create", {"app": "foo", "name": "x", "max_concurrency": 100000}),
            ("app_export", {}),
        ):
            bus.inject(
                forged("request", "intruder", {"op": op, "args": args}, clock=bus.clock, to="agent1"), to="agent1"
            )
            bus.inject(
                forged("request", "intruder", {"op": op, "args": args}, clock=bus.clock, secret=b"guessed-secret-0000"),
                to="agent1",
            )
        self.assertEqual(store.dump(), before)
        self.assertEqual(bus.published(type="reply"), [])

    def test_captured_request_replayed_is_not_run_twice(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1, a2 = bus.agents["agent1"], bus.agents["agent2"]
        self.successResultOf(bus.run(a1.instance_create("foo", "w1", on="agent2")))
        create = [d for d in bus.network.published if d.routing_key == srs.routing_key("agent2") and d is not None]
        self.successResultOf(bus.run(a1.instance_operation("instance_delete", "w1", "foo")))
        self.assertFalse(a2.local.instance_owned("w1"))
        for delivery in create:
            bus.inject(delivery.body, to="agent2")
        self.assertFalse(a2.local.instance_owned("w1"))
        self.assertGreaterEqual(bus.rejected("agent2").get("replayed", 0), 1)

    def test_request_for_one_agent_replayed_to_another_is_refused(self) -> None:
        bus = Bus(self, "agent1", "agent2", "agent3")
        self.successResultOf(bus.run(bus.agents["agent1"].instance_create("foo", "w1", on="agent2")))
        for delivery in bus.network.published:
            if delivery.routing_key == srs.routing_key("agent2"):
                bus.inject(delivery.body, to="agent3")
        self.assertFalse(bus.agents["agent3"].local.instance_owned("w1"))
        self.assertGreaterEqual(bus.rejected("agent3").get("misrouted", 0), 1)

    def test_replayed_bye_of_an_earlier_run_does_not_kill_a_live_agent(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        old = bus.agents["agent2"].srs
        old.stopService()
        bus.settle()
        bye = [d for d in bus.network.published if json.loads(json.loads(d.body)["m"])["type"] == "bye"]
        self.assertEqual(len(bye), 1)
        bus.add("agent2")
        bus.settle()
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1", "agent2"])
        bus.inject(bye[0].body)  # within the window: replayed; later: stale
        bus.clock.advance(31)
        bus.inject(bye[0].body)
        bus.settle()
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1", "agent2"])

    def test_broker_passwords_never_cross_the_bus_in_clear(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"]
        self.successResultOf(bus.run(a1.app_put("foo", broker=BROKER)))
        self.successResultOf(bus.run(a1.instance_create("foo", "w1", on="agent2", broker=BROKER)))
        late = bus.add("agent3")  # copies the apps from its peers
        bus.settle()
        bus.clock.advance(INTERVAL)
        self.assertEqual(late.store.get_app("foo").broker.password, "s3cret-pw")
        self.assertTrue(bus.network.published)
        for delivery in bus.network.published:
            self.assertNotIn(b"s3cret-pw", delivery.body)

    def test_forged_reply_loses_to_the_real_one(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"].srs
        d = a1.scatter("instance_list", {"app": "foo"})
        request = bus.published(type="request")[-1]
        cid = request.properties["correlation-id"]
        # before delivery, the intruder answers (unsigned, then as a non-asked agent)
        reply_to = request.properties["reply-to"]
        bus.network.route(
            "",
            reply_to,
            forged("reply", "agent2", {"ok": True, "result": ["evil"]}, clock=bus.clock, to="agent1", re=cid),
            {},
        )
        bus.settle()
        results, missing = self.successResultOf(d)
        self.assertEqual(results, {"agent2": []})


class UnsignedClusterTests(SynchronousTestCase):
    """No secret: anyone on the broker is a member, but what members can
    ask for is what the API allows, and the tables stay bounded."""

    def _request(self, bus: Bus, op: str, args: dict[str, Any], to: str = "agent1") -> Any:
        cid = "c%d" % len(bus.network.published)
        reply_queue = srs.private_queue_name("scs", "intruder", "q")
        bus.network.queues[reply_queue] = None  # a queue nobody reads
        bus.inject(
            forged(
                "request", "intruder", {"op": op, "args": args}, clock=bus.clock, to=to, cid=cid, reply_to=reply_queue
            ),
            to=to,
        )
        replies = [d for d in bus.network.published if d.routing_key == reply_queue]
        return json.loads(json.loads(replies[-1].body)["m"])["payload"]

    def test_peer_operations_pass_the_api_validators(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        store = bus.agents["agent1"].store
        before = store.dump()
        hostile = [
            ("instance_create", {"app": "foo", "name": "../A-escape"}),
            ("instance_create", {"app": "foo", "name": ""}),
            ("instance_create", {"app": "foo", "name": "nul\x00byte"}),
            ("instance_create", {"app": "foo", "name": "w1", "max_concurrency": 100000}),
            ("instance_create", {"app": "foo", "name": "w1", "arguments": ["-n", "x@y"]}),
            ("instance_create", {"app": "foo", "name": "w1", "arguments": ["--logfile=/tmp/x"]}),
            ("instance_create", {"app": "foo", "name": "w1", "queues": ["amq.rabbitmq.trace"]}),
            ("instance_create", {"app": "foo", "name": "w1", "extra": 1}),
            ("app_put", {"app": "admin"}),
            ("app_put", {"app": "foo", "broker": "redis://x"}),
            ("consume", {"name": "w1", "queue": "a/b"}),
            ("queue_declare", {"app": "foo", "binding": {"name": "q", "options": "[1]"}}),
            ("no_such_operation", {}),
            ("instance_create", ["not", "an", "object"]),
        ]
        for op, args in hostile:
            payload = self._request(bus, op, args)
            self.assertIs(payload["ok"], False, (op, args))
            self.assertIn(payload["error"]["code"], ("bad-parameter", "not-found"), (op, args))
        self.assertEqual(store.dump(), before)

    def test_forged_reply_to_must_be_the_senders_queue(self) -> None:
        bus = Bus(self, "agent1", "agent2", secret=None)
        victim_queue = bus.agents["agent2"].srs._reply_queue
        bus.inject(
            forged(
                "request",
                "intruder",
                {"op": "instance_list", "args": {}},
                clock=bus.clock,
                to="agent1",
                cid="c",
                reply_to=victim_queue,
            ),
            to="agent1",
        )
        self.assertEqual([d for d in bus.network.published if d.routing_key == victim_queue], [])
        self.assertEqual(bus.rejected("agent1")["misrouted"], 1)

    def test_phantom_flood_is_bounded(self) -> None:
        bus = Bus(self, "agent1", secret=None, max_peers=20)
        for i in range(500):
            bus.inject(
                forged(
                    "heartbeat",
                    f"phantom{i}",
                    {"url": "", "interval": 2, "summary": {"instances": 1, "junk": "x" * 1000}},
                    clock=bus.clock,
                )
            )
        node = bus.agents["agent1"].srs
        self.assertEqual(len(node.membership.members), 20)
        self.assertTrue(all(m.instances == 1 for m in node.membership.members.values()))
        # they stop: dead after 3 periods, then evicted as real agents arrive
        bus.clock.advance(4 * INTERVAL)
        real = bus.add("agent2", secret=None)
        bus.settle()
        self.assertIn("agent2", node.live_agents())
        self.assertIn("agent1", real.srs.live_agents())
        # and forgotten after the retention period
        bus.clock.pump([INTERVAL] * 10)
        node.membership.forget_after = 10.0
        bus.clock.pump([INTERVAL] * 10)
        self.assertEqual(sorted(node.membership.members), ["agent2"])

    def test_oversized_heartbeat_is_dropped(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        payload = {"url": "", "interval": 2, "summary": {"instances": 1, "pad": "x" * 10_000}}
        bus.inject(forged("heartbeat", "big", payload, clock=bus.clock))
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1"])
        self.assertEqual(bus.rejected("agent1")["oversized"], 1)

    def test_spoofed_bye_from_another_incarnation_is_ignored(self) -> None:
        bus = Bus(self, "agent1", "agent2", secret=None)
        bus.inject(forged("bye", "agent2", {}, clock=bus.clock, incarnation="not-the-real-one"))
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1", "agent2"])

    def test_malformed_heartbeats_are_dropped(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        for payload in (
            {},
            {"url": 5, "interval": 2, "summary": {}},
            {"url": "javascript:x", "interval": 2, "summary": {}},
            {"url": "", "interval": "2", "summary": {}},
            {"url": "", "interval": 2, "summary": []},
            {"url": "http://" + "x" * 1000, "interval": 2, "summary": {}},
        ):
            bus.inject(forged("heartbeat", "odd", payload, clock=bus.clock))
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1"])

    def test_sender_must_be_an_agent_id(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        bus.inject(forged("heartbeat", "../x", {"url": "", "interval": 2, "summary": {}}, clock=bus.clock))
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1"])

    def test_hostile_app_from_a_peer_is_not_copied(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        peer = bus.agents["agent1"]
        peer.srs.handler = lambda op, args: [
            # An app's item carries every setting (scs.app_sync.SETTINGS).
            {
                "app": "good",
                "broker": BROKER,
                "celery_app": None,
                "arguments": [],
                "env": {},
                "workdir": None,
                "python": None,
                "task_events": False,
            },
            {"app": "bad", "broker": BROKER, "arguments": ["accept_content=pickle"]},
            {"app": "../x"},
        ]
        late = bus.add("agent2", secret=None)
        bus.settle()
        bus.clock.advance(INTERVAL)
        self.assertEqual([a.name for a in late.store.list_apps()], ["good"])


class TrustDomainTests(SynchronousTestCase):
    def test_token_agent_refuses_requests_from_tokenless_peers(self) -> None:
        bus = Bus(self)
        guarded = bus.add("guarded", requires_token=True)
        open_ = bus.add("open")
        bus.settle()
        # the open agent does not place on the guarded one
        self.assertEqual(open_.srs.live_agents(), ["open"])
        # and a request it sends anyway is refused, not run
        d = open_.srs.call("guarded", "instance_create", {"app": "foo", "name": "w1"})
        bus.settle()
        self.failureResultOf(d, errors.Unauthorized)
        self.assertFalse(guarded.local.instance_owned("w1"))
        self.assertEqual(guarded.srs.codec.rejected["untrusted-peer"], 1)
        # the guarded agent may still ask the open one
        self.assertEqual(guarded.srs.live_agents(), ["guarded", "open"])
        rows = {r["id"]: r["requires_token"] for r in open_.srs.members()}
        self.assertEqual(rows, {"guarded": True, "open": False})


class SameNameTests(SynchronousTestCase):
    def test_one_name_created_through_every_agent_at_once_is_one_instance(self) -> None:
        bus = Bus(self, "agent1", "agent2", "agent3")
        creates = [
            defer.Deferred.fromCoroutine(bus.agents[a].instance_create("foo", "same", max_concurrency=2))
            for a in ("agent1", "agent2", "agent3")
        ]
        different = defer.Deferred.fromCoroutine(bus.agents["agent3"].instance_create("foo", "same", max_concurrency=3))
        for _ in range(50):
            bus.clock.advance(0.05)
        statuses = sorted(self.successResultOf(d).status for d in creates)
        self.assertEqual(statuses, [200, 200, 201])
        self.failureResultOf(different, errors.Conflict)
        owners = [a for a, agent in bus.agents.items() if agent.local.instance_owned("same")]
        self.assertEqual(len(owners), 1)

    def test_while_disconnected_a_remote_instance_is_503_and_no_copy_is_made(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"]
        self.successResultOf(bus.run(a1.instance_create("foo", "w1", on="agent2")))
        bus.network.stop_broker()
        bus.settle()
        for coroutine in (
            a1.instance_operation("instance_get", "w1", "foo"),
            a1.instance_operation("instance_delete", "w1", "foo"),
            a1.instance_create("foo", "w1"),
        ):
            self.failureResultOf(bus.run(coroutine), errors.Unavailable)
        self.assertFalse(a1.local.instance_owned("w1"))
        # an unnamed instance can still be created here
        reply = self.successResultOf(bus.run(a1.instance_create("foo")))
        self.assertEqual(reply.body["agent"], "agent1")

    def test_silent_owner_is_503_not_404(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"]
        self.successResultOf(bus.run(a1.instance_create("foo", "w1", on="agent2")))
        bus.agents["agent2"].srs.handler = lambda op, args: defer.Deferred()
        failure = self.failureResultOf(bus.run(a1.instance_operation("instance_get", "w1", "foo")), errors.Unavailable)
        self.assertEqual(failure.value.details["missing_agents"], ["agent2"])


class RejectedMetricTests(SynchronousTestCase):
    def test_rejections_are_counted_by_reason_in_metrics(self) -> None:
        from prometheus_client.exposition import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        from scs.metrics import AgentMetrics

        bus = Bus(self, "agent1")
        for _ in range(3):
            bus.inject(forged("heartbeat", "phantom", {"url": "", "interval": 2, "summary": {}}, clock=bus.clock))
        bus.inject(b"not json")
        text = generate_latest(AgentMetrics(bus.agents["agent1"]).registry).decode()
        samples = {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "scs_srs_rejected_total"
        }
        self.assertEqual((samples["unsigned"], samples["malformed"], samples["replayed"]), (3, 1, 0))


class RedeclareTests(SynchronousTestCase):
    def test_redeclaring_a_queue_through_a_non_owner_updates_the_owners(self) -> None:
        from scs.records import QueueBinding

        bus = Bus(self, "agent1", "agent2")
        a1, a2 = bus.agents["agent1"], bus.agents["agent2"]
        first = self.successResultOf(bus.run(a2.queue_declare("foo", QueueBinding("tasks", "tasks", "tasks"))))
        self.assertEqual(first.status, 201)
        again = self.successResultOf(
            bus.run(a1.queue_declare("foo", QueueBinding("tasks", "ex2", "rk2", "topic", {"durable": True})))
        )
        self.assertEqual((again.body["exchange"], again.body["routing_key"]), ("ex2", "rk2"))
        self.assertEqual(a2.store.get_queue("foo", "tasks").exchange, "ex2")
        self.assertIsNone(a1.store.find_queue("foo", "tasks"))


class SecretsTests(SynchronousTestCase):
    def test_a_refused_broker_url_is_not_echoed(self) -> None:
        from scs.validation import check_broker_url

        for url in ("redis://user:hunter2-pw@host//", "amqp://user:hunter2-pw@host:99999//", "http://u:hunter2-pw@h"):
            with self.assertRaises(errors.BadParameter) as caught:
                check_broker_url(url)
            self.assertNotIn("hunter2", json.dumps(caught.exception.to_json()))


class ReviewFindingsTests(SynchronousTestCase):
    """What a red-team read of this suite's first version found."""

    def test_a_message_from_before_a_restart_is_not_taken_by_the_new_run(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"]
        self.successResultOf(bus.run(a1.instance_create("foo", on="agent2")))
        captured = [d.body for d in bus.network.published if d.routing_key == srs.routing_key("agent2")]
        bus.agents["agent2"].srs.stopService()
        bus.clock.advance(5)  # well inside the 30 s window
        again = bus.add("agent2")
        bus.settle()
        for body in captured:
            bus.inject(body, to="agent2")
        self.assertEqual(again.local.instance_list("foo"), [])
        self.assertGreaterEqual(bus.rejected("agent2")["stale"], 1)

    def test_a_named_create_that_timed_out_is_not_sent_elsewhere(self) -> None:
        bus = Bus(self, "agent1", "agent2", "agent3")
        for other in ("agent2", "agent3"):
            # They say they do not have it, then never answer the create.
            bus.agents[other].srs.handler = lambda op, args: False if op == "instance_owned" else defer.Deferred()
        a1 = bus.agents["agent1"]
        # agent1 decides, and places elsewhere
        a1.placement._coordinator = lambda: "agent1"  # type: ignore[method-assign]
        a1.placement.live_agents = lambda: ["agent2", "agent3"]  # type: ignore[method-assign]
        d = defer.Deferred.fromCoroutine(a1.instance_create("foo", "w1"))
        for _ in range(100):
            bus.clock.advance(0.1)
        self.failureResultOf(d, errors.GatewayTimeout)
        requests = [
            inner
            for inner in (json.loads(json.loads(p.body)["m"]) for p in bus.network.published)
            if inner["type"] == "request"
        ]
        # A scatter asks each peer by its key under one cid; the create is a call.
        cids = [r.get("cid") for r in requests]
        creates = [r for r in requests if r.get("to") in ("agent2", "agent3") and cids.count(r.get("cid")) == 1]
        self.assertEqual(len(creates), 1)

    def test_an_agent_that_holds_instances_and_is_gone_makes_its_names_503(self) -> None:
        bus = Bus(self, "agent1", "agent2")
        a1 = bus.agents["agent1"]
        self.successResultOf(bus.run(a1.instance_create("foo", "w1", on="agent2")))
        bus.clock.advance(INTERVAL)  # agent2's heartbeat now says it holds one
        bus.agents["agent2"].srs.stopService()  # says bye
        bus.settle()
        for coroutine in (a1.instance_create("foo", "w1"), a1.instance_operation("instance_get", "w1", "foo")):
            failure = self.failureResultOf(bus.run(coroutine), errors.Unavailable)
            self.assertEqual(failure.value.details["missing_agents"], ["agent2"])
        self.assertFalse(a1.local.instance_owned("w1"))

    def test_odd_numbers_and_text_are_malformed_not_exceptions(self) -> None:
        bus = Bus(self, "agent1", secret=None)
        codec = MessageCodec("scs", None, clock=bus.clock.seconds)
        inner = json.loads(json.loads(codec.encode("heartbeat", "odd", "i", "*", {}))["m"])
        bodies = [
            json.dumps({"m": json.dumps(dict(inner, ts=10**400))}).encode(),
            json.dumps({"m": "é"}, ensure_ascii=False).encode(),
            forged("heartbeat", "odd", {"url": "", "interval": 10**400, "summary": {}}, clock=bus.clock),
        ]
        for body in bodies:
            bus.agents["agent1"].srs.message_received(body, {})
        self.assertEqual(bus.rejected("agent1")["malformed"], 3)
        self.assertEqual(bus.agents["agent1"].srs.live_agents(), ["agent1"])
        self.assertFalse([e for e in bus.events if "log_failure" in e])

    def test_a_bad_port_does_not_echo_the_password(self) -> None:
        from scs.validation import check_broker_url

        with self.assertRaises(errors.BadParameter) as caught:
            check_broker_url("amqp://guest:se/cret-pw@h/")
        self.assertNotIn("se", caught.exception.message.replace("user", "").replace("host", ""))


class ClusterListingTests(SynchronousTestCase):
    def test_apps_and_instance_details_of_every_agent_in_one_scatter(self) -> None:
        bus = Bus(self, "agent1", "agent2", "agent3")
        a1 = bus.agents["agent1"]
        for name, agent in (("w1", "agent1"), ("w2", "agent2"), ("w3", "agent3")):
            self.successResultOf(bus.run(a1.instance_create("foo", name, on=agent)))
        bus.agents["agent3"].local.app_put("only-here")
        before = len(bus.published(type="request"))
        reply = self.successResultOf(bus.run(a1.instance_list_details("foo")))
        # One scatter: one correlation id, sent to each peer by its key.
        scatters = {json.loads(json.loads(p.body)["m"])["cid"] for p in bus.published(type="request")[before:]}
        self.assertEqual(len(scatters), 1)
        self.assertEqual(
            [(i["name"], i["agent"]) for i in reply.body], [("w1", "agent1"), ("w2", "agent2"), ("w3", "agent3")]
        )
        self.assertTrue(all(i["node"].startswith(i["name"] + "@") for i in reply.body))
        apps = self.successResultOf(bus.run(a1.app_list()))
        self.assertEqual(apps.body, ["foo", "only-here"])
        # a silent agent is named, its instances missing
        bus.agents["agent3"].srs.handler = lambda op, args: defer.Deferred()
        reply = self.successResultOf(bus.run(a1.instance_list_details("foo")))
        self.assertEqual(([i["name"] for i in reply.body], reply.missing), (["w1", "w2"], ("agent3",)))
