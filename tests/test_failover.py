"""Issue 11 on the fake network and a Clock: the replica of the peers'
instances, the failover decision (once for the cluster), the fence of an
agent that comes back, drain, and the orphaned listing."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import failover, srs
from scs.agent import Agent, ClusterQueues, LocalAgent
from scs.errors import BadParameter, NotFound, Unavailable
from scs.failover import Failover, FailoverService, Fence, StartGate, spread
from scs.replica import PeerView, Replicas, check_document, digest
from scs.srs_trust import MessageCodec
from scs.store import Store
from scs.testing import FakeControl
from tests.surfaces_support import FakeSupervisor
from tests.test_srs_hostile import BROKER, INTERVAL, SECRET, Bus

FAILOVER_AFTER = 5.0


def good_document(**change: Any) -> dict[str, Any]:
    """A valid copy of an instance, with ``change`` over it."""
    document = {
        "name": "w1",
        "app": "foo",
        "is_enabled": True,
        "max_concurrency": 1,
        "min_concurrency": 1,
        "broker": None,
        "arguments": [],
        "queues": [],
        "moved_from": None,
        "pid": 12,
    }
    document.update(change)
    return document


class Node:
    """One agent of the fake cluster, wired as scs.tap.makeService wires it."""

    def __init__(self, agent: Agent, keeper: FailoverService, gate: StartGate, supervisor: FakeSupervisor) -> None:
        self.agent = agent
        self.keeper = keeper
        self.gate = gate
        self.supervisor = supervisor

    @property
    def store(self) -> Store:
        return self.agent.store

    @property
    def names(self) -> list[str]:
        return self.agent.store.node_names()


class Cluster(Bus):
    """Agents with replicas, fence, start gate and failover on one fake
    network; ``control`` is the one Celery control every agent pings with
    (``control.up(node)``: that worker answers)."""

    def __init__(self, test: SynchronousTestCase, *ids: str, stores: dict[str, Store] | None = None) -> None:
        self.control = FakeControl()
        self.nodes: dict[str, Node] = {}
        self.stores = stores or {}
        super().__init__(test, *ids)
        self.clock.advance(3 * INTERVAL)

    def add(self, agent_id: str, secret: bytes | None = SECRET, **srs_options: Any) -> Agent:
        store = self.stores.get(agent_id) or Store.in_memory()
        self.stores[agent_id] = store
        agent: Any = None
        keeper: Any = None
        node = srs.SRS(
            agent_id,
            self.network.transport(),
            reactor=self.clock,
            heartbeat_interval=INTERVAL,
            rng=random.Random(agent_id),
            handler=lambda op, args: agent.handle_remote(op, args),
            on_connected=[lambda: agent.sync_apps_from_peers(), lambda: keeper.connected()],
            summary=lambda: agent.local.summary(),
            codec=MessageCodec("scs", secret, clock=self.clock.seconds),
            **srs_options,
        )
        node.log = Logger(namespace="srs." + agent_id, observer=self.events.append)
        supervisor = FakeSupervisor()
        gate = StartGate(store.list_nodes, self.clock, timeout=15.0)
        local = LocalAgent(
            store, agent_id, BROKER, supervisor, clock=self.clock, resolve_queue=ClusterQueues(store, node)
        )
        agent = Agent(local, node, random=random.Random(1), call_timeout=2.0, create_timeout=2.0)
        fence = Fence(agent.custody)

        def peers() -> list[PeerView]:
            return [PeerView(m.id, agent.peers.peer_alive(m.id), m.digest) for m in node.membership]

        replicas = Replicas(
            store,
            agent_id,
            peers,
            lambda peer: node.call(peer, "instance_export", {}, timeout=2.0),
            self.clock,
            on_synced=fence,
        )
        failover = Failover(agent.custody, self.control, self.clock, failover_after=FAILOVER_AFTER)
        keeper = FailoverService(replicas, fence, failover, gate, self.clock)
        node.startService()
        keeper.startService()
        self.test.addCleanup(lambda: node.running and node.stopService())
        self.test.addCleanup(lambda: keeper.running and keeper.stopService())
        self.agents[agent_id] = agent
        self.nodes[agent_id] = Node(agent, keeper, gate, supervisor)
        return agent

    def run(self, coroutine: Any, limit: float = 30.0) -> Any:
        d = defer.Deferred.fromCoroutine(coroutine)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        waited = 0.0
        while not outcome and waited < limit:
            self.clock.advance(0.05)
            waited += 0.05
        assert outcome, "not done in time"
        if hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return outcome[0]

    def advance(self, seconds: float, step: float = 0.1) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def create(self, agent_id: str, app: str, name: str, **settings: Any) -> None:
        self.run(self.agents[agent_id].local.instance_create(app, name, nowait=True, **settings))

    def kill(self, agent_id: str) -> None:
        """kill -9 of the agent: its connection and queue go at once."""
        node = self.nodes[agent_id]
        node.keeper.stopService()
        transport = node.agent.srs.transport
        node.agent.srs.stopService = lambda: None  # a dead process stops nothing
        transport.crash()
        # Nothing of it runs any more.
        node.agent.srs._connected = False
        for call in list(self.clock.getDelayedCalls()):
            if getattr(call.func, "__self__", None) in (node.agent.srs, transport):
                call.cancel()

    def where(self, name: str) -> list[str]:
        return sorted(a for a, n in self.nodes.items() if name in n.names and n.agent.srs.is_connected())


class ReplicaTests(SynchronousTestCase):
    def test_every_agent_holds_a_current_copy_of_every_peer(self) -> None:
        c = Cluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("foo"))
        c.create("agent2", "foo", "w1", max_concurrency=3, queues=["q1"])
        c.create("agent3", "foo", "w2")
        c.advance(INTERVAL + 1)
        for agent_id in ("agent1", "agent3"):
            copy = c.stores[agent_id].replicas.instances("agent2")["agent2"]
            self.assertEqual(
                [(d["name"], d["max_concurrency"], d["queues"][0]["name"]) for d in copy], [("w1", 3, "q1")]
            )
        # A change reaches the copies within a heartbeat.
        c.run(c.agents["agent2"].local.instance_disable("w1"))
        c.advance(INTERVAL + 1)
        self.assertFalse(c.stores["agent1"].replicas.instances("agent2")["agent2"][0]["is_enabled"])

    def test_a_copy_lost_or_damaged_is_repaired_by_the_next_heartbeat(self) -> None:
        """Anti-entropy: nothing depends on a message arriving once."""
        c = Cluster(self, "agent1", "agent2")
        c.create("agent2", "foo", "w1")
        c.advance(INTERVAL + 1)
        c.stores["agent1"].replicas.drop("agent2")  # as if every message about it had been lost
        self.assertEqual(c.stores["agent1"].replicas.instances("agent2"), {})
        c.advance(INTERVAL + 1)
        self.assertEqual([d["name"] for d in c.stores["agent1"].replicas.instances("agent2")["agent2"]], ["w1"])

    def test_hostile_documents_are_refused(self) -> None:
        good = good_document()
        self.assertEqual(check_document(good), good)
        for change in (
            {"name": "../etc"},
            {"name": "a/b"},
            {"arguments": ["--pidfile=/tmp/x"]},
            {"broker": "redis://x"},
            {"max_concurrency": 0},
            {"min_concurrency": 5},
            {"is_enabled": "yes"},
            {"pid": -1},
            {"pid": True},
            {"queues": [{"name": "amq.x"}]},
            {"moved_from": "a b"},
            {"extra": 1},
        ):
            with self.assertRaises(BadParameter, msg=str(change)):
                check_document({**good, **change})

    def test_digest_ignores_order(self) -> None:
        a = {"name": "a", "x": 1}
        b = {"name": "b", "x": 2}
        self.assertEqual(digest([a, b]), digest([b, a]))
        self.assertNotEqual(digest([a]), digest([a, b]))


class FailoverTests(SynchronousTestCase):
    def _three(self) -> Cluster:
        c = Cluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("foo"))
        for i, agent_id in enumerate(("agent1", "agent2", "agent3", "agent1", "agent2", "agent3")):
            c.create(agent_id, "foo", f"w{i}")
        c.run(c.agents["agent3"].local.instance_disable("w5"))
        c.advance(INTERVAL + 1)
        return c

    def test_instances_of_a_dead_machine_move_once_spread_over_the_survivors(self) -> None:
        c = self._three()
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 3)
        for name in ("w2", "w5"):
            self.assertEqual(len(c.where(name)), 1, (name, c.where(name)))
        owners = {name: c.where(name)[0] for name in ("w2", "w5")}
        self.assertEqual(set(owners.values()), {"agent1", "agent2"})  # spread
        # Same settings and desired state; disabled stays disabled.
        moved = c.stores[owners["w5"]].get_node("w5")
        self.assertFalse(moved.is_enabled)
        self.assertEqual(moved.moved_from, "agent3")
        self.assertTrue(c.stores[owners["w2"]].get_node("w2").is_enabled)
        # Nothing moves twice, however long it runs.
        c.advance(20)
        self.assertEqual(sum(len(n.names) for a, n in c.nodes.items() if a != "agent3"), 6)

    def test_nothing_moves_before_failover_after(self) -> None:
        c = self._three()
        c.kill("agent3")
        c.advance(FAILOVER_AFTER - 2)
        self.assertEqual(c.where("w2"), [])
        listed = c.run(c.agents["agent1"].instance_list_details("foo")).body
        orphans = {i["name"]: i for i in listed if i["state"] == "orphaned"}
        self.assertEqual(sorted(orphans), ["w2", "w5"])
        self.assertEqual(orphans["w2"]["agent"], "agent3")
        self.assertEqual(orphans["w2"]["pid"], 4242)

    def test_an_instance_whose_worker_still_answers_is_orphaned_not_moved(self) -> None:
        c = self._three()
        c.control.up("w2@agent3")
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 5)
        self.assertEqual(c.where("w2"), [])
        self.assertEqual(len(c.where("w5")), 1)  # disabled: no worker to ask
        rows = {row["id"]: row for row in c.agents["agent1"].members()}
        self.assertFalse(rows["agent3"]["alive"])
        self.assertEqual(rows["agent3"]["orphaned"], ["w2"])
        self.assertEqual(list(rows["agent3"]["moved"]), ["w5"])
        single = c.run(c.agents["agent2"].instance_operation("instance_get", "w2", "foo")).body
        self.assertEqual((single["state"], single["agent"]), ("orphaned", "agent3"))

    def test_an_agent_cut_off_from_the_broker_calls_no_peer_dead(self) -> None:
        """While the broker is down every peer looks dead from here; they are
        missing, not dead: the listing has this agent's instances only and
        names the others in its header, and nothing is listed orphaned."""
        c = self._three()
        agent1 = c.agents["agent1"]
        local = sorted(agent1.store.node_names())
        c.network.stop_broker()
        c.advance(1)
        reply = c.run(agent1.instance_list("foo"))
        self.assertEqual(sorted(reply.body), local)
        self.assertEqual(sorted(reply.missing), ["agent2", "agent3"])
        details = c.run(agent1.instance_list_details("foo")).body
        self.assertEqual(sorted(i["name"] for i in details), local)
        self.assertEqual(agent1.custody.orphans(), [])
        remote = next(n for n in c.stores["agent2"].node_names())
        with self.assertRaises(Unavailable):
            c.run(agent1.instance_operation("instance_get", remote, "foo"))
        # Back on the bus, and once the peers have answered the hello, a
        # peer that is really gone is judged again.
        c.network.start_broker()
        c.advance(INTERVAL)
        self.assertEqual(agent1.custody.orphans(), [])
        c.kill("agent3")
        c.advance(2)
        self.assertEqual(sorted(o["name"] for o in agent1.custody.orphans()), ["w2", "w5"])

    def test_two_survivors_deciding_at_once_create_each_instance_once(self) -> None:
        c = self._three()
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 0.5)
        # Both run the decision at the same moment, whoever is coordinator.
        first = defer.Deferred.fromCoroutine(c.nodes["agent1"].keeper.failover.fail_over("agent3"))
        second = defer.Deferred.fromCoroutine(c.nodes["agent2"].keeper.failover.fail_over("agent3"))
        c.advance(5)
        self.assertTrue(first.called and second.called)
        for name in ("w2", "w5"):
            self.assertEqual(len(c.where(name)), 1, (name, c.where(name)))

    def test_an_agent_coming_back_drops_what_moved_before_starting_workers(self) -> None:
        c = self._three()
        store3 = c.stores["agent3"]
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 3)
        self.assertEqual(len(c.where("w2")), 1)
        # agent3 restarts on its store: it still lists w2 and w5.
        self.assertEqual(sorted(store3.node_names()), ["w2", "w5"])
        del c.agents["agent3"]
        c.add("agent3")
        node = c.nodes["agent3"]
        self.assertFalse(node.gate.open)
        self.assertEqual(node.gate(), [])  # the supervisor is given nothing yet
        c.advance(3)
        self.assertTrue(node.gate.open)
        self.assertEqual(store3.node_names(), [])
        self.assertEqual(node.gate(), [])
        for name in ("w2", "w5"):
            self.assertEqual(len(c.where(name)), 1)

    def test_an_agent_back_during_the_failover_keeps_what_did_not_move(self) -> None:
        c = self._three()
        store3 = c.stores["agent3"]
        c.kill("agent3")
        c.advance(2)  # dead, but not for failover_after yet
        del c.agents["agent3"]
        c.add("agent3")
        c.advance(FAILOVER_AFTER + 5)
        self.assertEqual(sorted(store3.node_names()), ["w2", "w5"])
        self.assertEqual(c.where("w2"), ["agent3"])

    def test_a_partition_that_heals_keeps_the_moved_copy(self) -> None:
        """agent3 cut off (its queue gone for the others), its instances
        moved; when it is heard again, its copies go, the moved ones stay."""
        c = self._three()
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 3)
        target = c.where("w2")[0]
        del c.agents["agent3"]
        c.add("agent3")
        c.advance(3)
        self.assertEqual(c.where("w2"), [target])

    def test_two_copies_moved_by_a_split_decision_end_as_one(self) -> None:
        """Two deciders that did not see each other moved w2 to two agents:
        once both copies are seen, the one on the larger id goes."""
        c = self._three()
        document = c.stores["agent1"].replicas.instances("agent3")["agent3"]
        w2 = next(d for d in document if d["name"] == "w2")
        c.kill("agent3")
        for node in c.nodes.values():
            node.keeper.failover.stop()
        c.run(c.agents["agent1"].local.instance_adopt(w2, "agent3", wait=False))
        c.run(c.agents["agent2"].local.instance_adopt(w2, "agent3", wait=False))
        self.assertEqual(c.where("w2"), ["agent1", "agent2"])
        c.advance(INTERVAL + 2)
        self.assertEqual(c.where("w2"), ["agent1"])

    def test_failover_after_zero_never_moves(self) -> None:
        c = self._three()
        for node in c.nodes.values():
            node.keeper.failover.failover_after = 0
            node.keeper.failover.stop()
        c.kill("agent3")
        c.advance(40)
        self.assertEqual(c.where("w2"), [])

    def test_spread_is_a_function_of_its_inputs(self) -> None:
        names = [f"w{i}" for i in range(7)]
        a = spread("dead", {"b": 0, "a": 0, "c": 0}, names)
        self.assertEqual(a, spread("dead", {"a": 0, "b": 0, "c": 0}, list(reversed(names))))
        counts = [list(a.values()).count(agent) for agent in "abc"]
        self.assertEqual(sorted(counts), [2, 2, 3])
        # The least loaded first.
        self.assertEqual(set(spread("dead", {"a": 5, "b": 0}, ["x", "y"]).values()), {"b"})


class DrainTests(SynchronousTestCase):
    def test_drain_moves_every_instance_and_takes_no_placements(self) -> None:
        c = Cluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("foo"))
        for name in ("d1", "d2", "d3"):
            c.create("agent2", "foo", name)
        reply = c.run(c.agents["agent1"].drain("agent2"))
        self.assertEqual(reply.body["instances"], ["d1", "d2", "d3"])
        self.assertEqual(reply.body["failed"], {})
        self.assertEqual(c.nodes["agent2"].names, [])
        for name in ("d1", "d2", "d3"):
            (owner,) = c.where(name)
            self.assertIn(owner, ("agent1", "agent3"))
            self.assertEqual(c.stores[owner].get_node(name).moved_from, "agent2")
        c.advance(INTERVAL + 1)
        rows = {row["id"]: row for row in c.agents["agent3"].members()}
        self.assertTrue(rows["agent2"]["draining"])
        # No placement goes to a draining agent.
        for _ in range(10):
            c.run(c.agents["agent3"].instance_create("foo", None, nowait=True))
        self.assertEqual(c.nodes["agent2"].names, [])
        reply = c.run(c.agents["agent3"].drain("agent2", undrain=True))
        self.assertFalse(reply.body["draining"])
        self.assertFalse(c.agents["agent2"].local.draining)

    def test_the_fence_leaves_a_drain_s_handover_alone(self) -> None:
        """Regression (benchmark): the target's copy names the draining agent
        in moved_from at once, and the draining agent's fence stopped its
        worker before the replacement answered a ping."""
        from twisted.internet.task import deferLater

        c = Cluster(self, "agent1", "agent2")
        c.create("agent1", "foo", "d1")
        c.advance(INTERVAL + 1)
        slow = c.nodes["agent2"].supervisor
        slow.wait_ready = lambda name, timeout: deferLater(c.clock, 6.0, lambda: True)
        c.agents["agent1"].custody.create_timeout = 20.0  # the drain's wait for the replacement
        drain = defer.Deferred.fromCoroutine(c.agents["agent1"].drain("agent1"))
        c.advance(5)  # heartbeats, copies refreshed, fences run: the replacement is not ready yet
        self.assertFalse(drain.called)
        self.assertEqual(c.nodes["agent1"].names, ["d1"])
        c.advance(3)
        self.assertEqual(self.successResultOf(drain).body["instances"], ["d1"])
        self.assertEqual(c.nodes["agent1"].names, [])
        self.assertEqual(c.where("d1"), ["agent2"])

    def test_drain_of_an_unknown_agent_is_404(self) -> None:
        from scs.errors import NotFound

        c = Cluster(self, "agent1", "agent2")
        with self.assertRaises(NotFound):
            c.run(c.agents["agent1"].drain("nobody"))


def test_a_store_at_revision_0003_upgrades_and_keeps_its_instances(tmp_path) -> None:
    path = tmp_path / "store.sqlite"
    old = Store.open(path, revision="0003")
    with old.engine.begin() as connection:  # the models are the newest schema's: plain SQL
        connection.exec_driver_sql("INSERT INTO broker (id, url) VALUES (1, 'amqp://guest:guest@127.0.0.1:5672//')")
        connection.exec_driver_sql("INSERT INTO app (id, name, broker_id) VALUES (1, 'foo', 1)")
        connection.exec_driver_sql(
            "INSERT INTO node (id, name, app_id, max_concurrency, min_concurrency, is_enabled, created_at, arguments)"
            " VALUES (1, 'w1', 1, 3, 1, 1, 0.0, '[]')"
        )
    old.close()
    store = Store.open(path)
    spec = store.get_node("w1")
    assert (spec.app, spec.max_concurrency, spec.moved_from) == ("foo", 3, None)
    assert store.replicas.digests() == {}
    assert store.settings.get("draining") is None
    store.close()


class ForgetTests(SynchronousTestCase):
    def test_the_copy_of_a_peer_forgotten_long_ago_is_dropped(self) -> None:
        c = Cluster(self, "agent1", "agent2")
        c.create("agent2", "foo", "w1")
        c.advance(INTERVAL + 1)
        replicas = c.nodes["agent1"].keeper.replicas
        replicas.forget_after = 100.0
        c.kill("agent2")
        c.advance(3)
        c.agents["agent1"].srs.membership.members.pop("agent2")  # forgotten by the membership table
        c.advance(50)
        self.assertIn("agent2", c.stores["agent1"].replicas.digests())  # still listed for a while
        c.advance(60)
        self.assertNotIn("agent2", c.stores["agent1"].replicas.digests())


class DeletedAppTests(SynchronousTestCase):
    """The instances of a dead agent whose app was deleted meanwhile are
    not moved: no agent would take them (``instance_adopt`` refuses)."""

    def _cluster(self) -> tuple[Cluster, list[dict[str, Any]], list[str]]:
        events: list[dict[str, Any]] = []
        self.patch(failover, "log", Logger(namespace="scs.failover", observer=events.append))
        c = Cluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("foo"))
        c.create("agent3", "foo", "w1")
        c.create("agent3", "foo", "w2")
        c.advance(INTERVAL + 1)
        pinged: list[str] = []
        ping = c.control.ping

        def counting(url: str, nodes: list[str], timeout: float) -> Any:
            pinged.extend(nodes)
            return ping(url, nodes, timeout)

        c.control.ping = counting
        return c, events, pinged

    def test_copies_of_an_app_deleted_here_are_dropped_neither_pinged_nor_moved(self) -> None:
        c, events, pinged = self._cluster()
        c.kill("agent3")
        c.run(c.agents["agent1"].app_delete("foo"))
        c.advance(FAILOVER_AFTER + 10)
        self.assertEqual((c.where("w1"), c.where("w2")), ([], []))
        self.assertEqual(pinged, [])
        self.assertEqual(c.stores["agent1"].replicas.instances("agent3").get("agent3", []), [])
        said = sorted(e["instance"] for e in events if e.get("event") == "failover.app_deleted")
        self.assertEqual(said, ["w1", "w2"])  # once each
        self.assertEqual([e for e in events if e.get("event") == "failover.error"], [])

    def test_a_target_that_has_the_deletion_refuses_once_for_good(self) -> None:
        """The coordinator missed the deletion (no tombstone here); the
        target refuses the adoption ("was deleted"): the copy is dropped,
        said once, not tried again."""
        c, events, _pinged = self._cluster()
        c.kill("agent3")
        c.agents["agent2"].local.app_delete("foo")  # agent1 does not know
        c.agents["agent1"].local.set_draining(True)  # every move goes to agent2
        c.advance(FAILOVER_AFTER + 20)
        self.assertEqual((c.where("w1"), c.where("w2")), ([], []))
        self.assertEqual(c.stores["agent1"].replicas.instances("agent3").get("agent3", []), [])
        said = sorted(e["instance"] for e in events if e.get("event") == "failover.app_deleted")
        self.assertEqual(said, ["w1", "w2"])
        self.assertEqual([e for e in events if e.get("event") == "failover.error"], [])

    def test_another_refusal_is_tried_again(self) -> None:
        """Only "was deleted" is final: a target that cannot take it now
        (here: a NotFound of something else) is asked again later."""
        c, events, _pinged = self._cluster()
        custody = c.agents["agent1"].custody
        refused: list[str] = []

        async def refuse(target: str, document: dict[str, Any], moved_from: str) -> dict[str, Any]:
            refused.append(document["name"])
            raise NotFound(f"no app named {document['app']!r}", app=document["app"])

        custody.adopt_once = refuse
        c.kill("agent3")
        c.advance(FAILOVER_AFTER + 10)
        self.assertGreater(refused.count("w1"), 1)
        self.assertEqual(len(c.stores["agent1"].replicas.instances("agent3")["agent3"]), 2)
        self.assertEqual([e for e in events if e.get("event") == "failover.app_deleted"], [])
