"""Apps converge across agents (scs.app_sync): revisions, tombstones and
anti-entropy, on the fake network and a Clock.  An agent that was down or
cut off when an app changed gets the change within a heartbeat or two of
coming back; the highest revision wins; what a peer sends is checked."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import app_sync, records
from scs.app_sync import MAX_ITEMS, AppSync, Version, app_sync_service, check_item
from scs.errors import BadParameter
from scs.local import LocalAgent
from scs.membership import Membership
from scs.operation_args import check_operation
from scs.store import Store
from scs.validation import MAX_REVISION_AHEAD_MS
from tests.test_failover import FAILOVER_AFTER, Cluster
from tests.test_srs_hostile import BROKER, INTERVAL

OTHER_BROKER = "amqp://u:p@10.0.0.9:5672/other"
DAY_MS = 24 * 3600 * 1000


class AppCluster(Cluster):
    """The failover test cluster, with each agent's app sync running as
    ``scs.tap.makeService`` runs it."""

    def add(self, agent_id: str, *args: Any, **kwargs: Any) -> Any:
        agent = super().add(agent_id, *args, **kwargs)
        service = app_sync_service(agent.app_sync, self.clock)
        service.startService()
        self.test.addCleanup(lambda: service.running and service.stopService())
        self.nodes[agent_id].app_sync_service = service
        return agent

    def kill(self, agent_id: str) -> None:
        self.nodes[agent_id].app_sync_service.stopService()
        super().kill(agent_id)

    def restart(self, agent_id: str) -> Any:
        """The agent started again on its store."""
        del self.agents[agent_id]
        return self.add(agent_id)

    def apps(self, agent_id: str) -> dict[str, dict[str, Any]]:
        return {item["app"]: item for item in self.agents[agent_id].local.app_state()}

    def app_list(self, agent_id: str) -> list[str]:
        return self.run(self.agents[agent_id].app_list()).body


def three(test: SynchronousTestCase) -> AppCluster:
    c = AppCluster(test, "agent1", "agent2", "agent3")
    c.run(c.agents["agent1"].app_put("foo", env={"MODE": "old"}))
    c.run(c.agents["agent1"].app_put("bar"))
    c.create("agent3", "foo", "f3")
    c.create("agent3", "bar", "b3")
    c.create("agent1", "bar", "b1")
    c.advance(INTERVAL + 1)
    return c


class ConvergenceTests(SynchronousTestCase):
    def assertConverged(self, c: AppCluster) -> None:
        digests = {agent_id: agent.local.apps_digest() for agent_id, agent in c.agents.items()}
        self.assertEqual(len(set(digests.values())), 1, digests)

    def test_settings_changed_while_an_agent_was_down_reach_it(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.advance(2)
        reply = c.run(c.agents["agent1"].app_put("foo", env={"MODE": "new"}, broker=OTHER_BROKER))
        self.assertEqual(reply.status, 200)
        self.assertEqual(c.stores["agent3"].get_app("foo").env, (("MODE", "old"),))  # missed it
        agent3 = c.restart("agent3")
        c.advance(2 * INTERVAL)
        app = agent3.local.app_get("foo")
        self.assertEqual(app["env"], {"MODE": "new"})
        self.assertEqual(app["broker"]["hostname"], "10.0.0.9")
        # Its instance runs with the new settings (the supervisor was told).
        spec = c.stores["agent3"].get_node("f3")
        self.assertEqual((spec.env, spec.broker.hostname), ((("MODE", "new"),), "10.0.0.9"))
        self.assertEqual(
            {a: c.apps(a)["foo"]["revision"] for a in c.agents},
            {a: c.apps("agent1")["foo"]["revision"] for a in c.agents},
        )
        self.assertConverged(c)

    def test_settings_changed_while_an_agent_was_down_reach_it_from_the_peers_side(self) -> None:
        """The peers fetch too: agent3 back without its own connect merge
        (the callback failed) still gets the change from the digests."""
        c = three(self)
        c.kill("agent3")
        c.run(c.agents["agent2"].app_put("foo", env={"MODE": "new"}))
        agent3 = c.restart("agent3")
        agent3.sync_apps_from_peers = lambda: None
        agent3.srs.on_connected[0] = lambda: None
        c.advance(2 * INTERVAL)
        self.assertEqual(agent3.local.app_get("foo")["env"], {"MODE": "new"})
        self.assertConverged(c)

    def test_an_app_deleted_while_an_agent_was_down_is_deleted_there(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.advance(2)
        reply = c.run(c.agents["agent1"].app_delete("bar"))
        self.assertEqual(reply.body["instances"], ["b1"])
        self.assertTrue(c.stores["agent3"].has_app("bar"))  # missed it
        c.advance(FAILOVER_AFTER + 3)  # the failover does not give it back either
        for agent_id in ("agent1", "agent2"):
            self.assertNotIn("bar", c.app_list(agent_id))
            self.assertFalse(c.stores[agent_id].has_app("bar"))
        agent3 = c.restart("agent3")
        c.advance(2 * INTERVAL)
        self.assertFalse(c.stores["agent3"].has_app("bar"))
        self.assertEqual(c.stores["agent3"].node_names("bar"), [])
        self.assertNotIn("b3", c.stores["agent3"].node_names())
        for agent_id in c.agents:
            self.assertEqual(c.app_list(agent_id), ["foo"])
        self.assertIn("bar", c.stores["agent3"].revisions.tombstones())
        self.assertGreater(c.nodes["agent3"].supervisor.wakes, 0)
        del agent3
        self.assertConverged(c)

    def test_a_change_made_while_cut_off_reaches_the_others(self) -> None:
        c = three(self)
        transport = c.agents["agent1"].srs.transport
        transport.stopService()  # agent1 alone loses the broker
        c.advance(INTERVAL)
        self.assertFalse(c.agents["agent1"].srs.is_connected())
        reply = c.run(c.agents["agent1"].app_put("foo", env={"MODE": "offline"}))
        self.assertEqual(reply.status, 200)
        c.run(c.agents["agent1"].app_delete("bar"))
        self.assertEqual(c.stores["agent2"].get_app("foo").env, (("MODE", "old"),))
        transport.startService()
        c.advance(2 * INTERVAL)
        for agent_id in ("agent2", "agent3"):
            self.assertEqual(c.agents[agent_id].local.app_get("foo")["env"], {"MODE": "offline"})
            self.assertFalse(c.stores[agent_id].has_app("bar"))
        self.assertNotIn("b3", c.stores["agent3"].node_names())
        self.assertConverged(c)

    def test_a_change_made_while_the_broker_was_down_reaches_the_others(self) -> None:
        c = three(self)
        c.network.stop_broker()
        c.advance(INTERVAL)
        c.run(c.agents["agent2"].app_put("foo", task_events=True))
        c.network.start_broker()
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertTrue(c.agents[agent_id].local.app_get("foo")["task_events"])
        self.assertConverged(c)

    def test_a_re_created_app_wins_over_the_old_tombstone(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.run(c.agents["agent1"].app_delete("foo"))
        tombstone = c.stores["agent1"].revisions.tombstones()["foo"]
        c.run(c.agents["agent2"].app_put("foo", env={"MODE": "again"}))
        c.advance(1)
        for agent_id in ("agent1", "agent2"):
            self.assertEqual(c.stores[agent_id].revisions.tombstones(), {})
            self.assertGreater(c.stores[agent_id].get_app("foo").revision, tombstone)
        agent3 = c.restart("agent3")
        c.advance(2 * INTERVAL)
        self.assertEqual(agent3.local.app_get("foo")["env"], {"MODE": "again"})
        self.assertEqual(c.stores["agent3"].revisions.tombstones(), {})
        # A late copy of the old deletion changes nothing.
        changed = agent3.app_sync.merge("agent9", [{"app": "foo", "revision": tombstone, "deleted": True}])
        self.assertEqual(changed, [])
        self.assertTrue(c.stores["agent3"].has_app("foo"))
        self.assertConverged(c)

    def test_an_instance_created_for_a_deleted_name_makes_the_app_anew(self) -> None:
        c = three(self)
        c.run(c.agents["agent1"].app_delete("bar"))
        c.advance(INTERVAL)
        c.create("agent2", "bar", "b2")
        c.advance(2 * INTERVAL)
        self.assertEqual(c.stores["agent2"].node_names("bar"), ["b2"])
        for agent_id in c.agents:
            self.assertIn("bar", c.app_list(agent_id))
        self.assertConverged(c)

    def test_a_steady_cluster_fetches_nothing(self) -> None:
        c = three(self)
        calls: list[str] = []
        for agent in c.agents.values():
            call = agent.srs.call

            def counting(peer: str, op: str, *args: Any, _call: Any = call, **kwargs: Any) -> Any:
                calls.append(op)
                return _call(peer, op, *args, **kwargs)

            agent.srs.call = counting
        c.advance(5 * INTERVAL)
        self.assertNotIn("app_state", calls)


class RevisionTests(SynchronousTestCase):
    def local(self) -> LocalAgent:
        store = Store.in_memory()
        self.addCleanup(store.close)
        return LocalAgent(store, "agent1", BROKER)

    def test_a_change_older_than_ours_is_ignored(self) -> None:
        local = self.local()
        local.app_put("foo", env={"A": "new"}, revision=200)
        answer = local.app_put("foo", env={"A": "old"}, revision=100)
        self.assertTrue(answer["stale"])
        self.assertEqual(local.app_get("foo")["env"], {"A": "new"})
        # A deletion older than the app leaves it; one as recent wins.
        self.assertFalse(local.app_delete("foo", revision=150)["deleted"])
        self.assertTrue(local.store.has_app("foo"))
        self.assertTrue(local.app_delete("foo", revision=200)["deleted"])
        self.assertEqual(local.store.revisions.tombstones(), {"foo": 200})
        self.assertTrue(local.app_put("foo", revision=200)["stale"])
        self.assertFalse(local.store.has_app("foo"))

    def test_revisions_grow_and_an_unchanged_put_keeps_its_revision(self) -> None:
        local = self.local()
        local.app_put("foo")
        first = local.store.get_app("foo").revision
        self.assertGreaterEqual(first, records.now_ms() - 60_000)
        local.app_put("foo")
        self.assertEqual(local.store.get_app("foo").revision, first)
        local.app_put("foo", env={"A": "1"})
        second = local.store.get_app("foo").revision
        self.assertGreater(second, first)
        local.app_delete("foo")
        self.assertGreater(local.store.revisions.tombstones()["foo"], second)
        # A revision far ahead (within the bound) still orders the next ones.
        local.app_put("foo", revision=records.now_ms() + 3_600_000)
        ahead = local.store.get_app("foo").revision
        local.app_put("foo", env={"B": "2"})
        self.assertEqual(local.store.get_app("foo").revision, ahead + 1)

    def test_old_tombstones_are_purged_and_not_taken_from_peers(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        agent = c.agents["agent1"]
        old = records.now_ms() - DAY_MS - 1000
        agent.store.revisions.put_tombstone("gone", old)
        agent.store.revisions.put_tombstone("recent", records.now_ms())
        c.advance(1)
        self.assertEqual(sorted(agent.store.revisions.tombstones()), ["recent"])
        self.assertEqual(agent.app_sync.merge("agent2", [{"app": "gone", "revision": old, "deleted": True}]), [])
        self.assertNotIn("gone", agent.store.revisions.tombstones())

    def test_ties_are_broken_the_same_way_everywhere(self) -> None:
        a = Version(5, False, '{"app":"foo","env":{"A":"1"}}')
        b = Version(5, False, '{"app":"foo","env":{"A":"2"}}')
        gone = Version(5, True, "")
        self.assertGreater(b, a)
        self.assertGreater(gone, b)
        self.assertGreater(Version(6, False, ""), gone)

    def test_equal_revisions_with_other_settings_converge(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.agents["agent1"].local.app_put("foo", env={"A": "1"}, revision=7)
        c.agents["agent2"].local.app_put("foo", env={"A": "2"}, revision=7)
        c.advance(3 * INTERVAL)
        envs = {a: agent.local.app_get("foo")["env"] for a, agent in c.agents.items()}
        self.assertEqual(envs, {"agent1": {"A": "2"}, "agent2": {"A": "2"}})


class HostileCopyTests(SynchronousTestCase):
    """A peer's copy is a door: refused, logged, nothing stored."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(app_sync, "log", Logger(namespace="scs.app_sync", observer=self.events.append))
        self.c = AppCluster(self, "agent1", "agent2")
        self.agent = self.c.agents["agent1"]
        self.agent.local.app_put("foo", env={"A": "1"})

    def refused(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "srs.copy.refused"]

    def assertNothingStored(self, answer: Any) -> None:
        before = self.agent.store.dump()
        self.assertEqual(self.agent.app_sync.merge("agent2", answer), [])
        self.assertEqual(self.agent.store.dump(), before)
        self.assertTrue(self.refused())

    def test_revisions_out_of_bounds_are_refused(self) -> None:
        ahead = records.now_ms() + MAX_REVISION_AHEAD_MS + 60_000
        for revision in (ahead, 2**70, -1, "9", 1.5, True, None, [1]):
            self.events.clear()
            with self.subTest(revision=revision):
                self.assertNothingStored([{"app": "foo", "broker": BROKER, "revision": revision}])
                self.assertNothingStored([{"app": "foo", "revision": revision, "deleted": True}])

    def test_bad_settings_are_refused(self) -> None:
        revision = records.now_ms() + 1000
        for item in (
            {"app": "foo", "env": {"LD_PRELOAD": "/x.so"}, "revision": revision},
            {"app": "foo", "broker": "http://x/", "revision": revision},
            {"app": "foo", "arguments": ["accept_content=pickle"], "revision": revision},
            {"app": "foo", "workdir": "relative", "revision": revision},
            {"app": "../x", "revision": revision},
            {"app": "foo", "revision": revision, "roll": True},
            {"app": "foo", "revision": revision, "evil": 1},
            {"app": "foo", "revision": revision, "deleted": False},
            {"app": "foo", "deleted": True},
            "foo",
        ):
            self.events.clear()
            with self.subTest(item=item):
                self.assertNothingStored([item])

    def test_an_oversized_or_ambiguous_export_is_refused_whole(self) -> None:
        revision = records.now_ms() + 1000
        many = [{"app": f"a{i}", "revision": revision} for i in range(MAX_ITEMS + 1)]
        self.assertNothingStored(many)
        twice = [{"app": "foo", "revision": revision}, {"app": "foo", "revision": revision, "deleted": True}]
        self.assertNothingStored(twice)
        self.assertNothingStored({"apps": []})

    def test_a_peer_serving_hostile_state_changes_nothing_here(self) -> None:
        peer = self.c.agents["agent2"]
        peer.srs.handler = lambda op, args: [
            {"app": "foo", "env": {"A": "evil"}, "revision": records.now_ms() + 2 * DAY_MS}
        ]
        self.c.advance(3 * INTERVAL)
        self.assertEqual(self.agent.local.app_get("foo")["env"], {"A": "1"})
        self.assertTrue(self.refused())

    def test_a_hostile_revision_over_srs_is_refused(self) -> None:
        with self.assertRaises(BadParameter):
            check_operation("app_put", {"app": "foo", "revision": records.now_ms() + 2 * DAY_MS})
        with self.assertRaises(BadParameter):
            check_operation("app_delete", {"app": "foo", "revision": -5})
        with self.assertRaises(BadParameter):
            check_item({"app": "foo", "revision": 1, "deleted": "yes"})

    def test_the_apps_digest_in_heartbeats_is_checked(self) -> None:
        table = Membership(2.0)
        for value, kept in (("a" * 32, "a" * 32), ("x" * 65, ""), (5, ""), ("\n", ""), (None, "")):
            member = table.heartbeat("peer", "i", {"url": "", "interval": 2, "summary": {"apps": value}}, 1.0)
            self.assertEqual(member.apps_digest, kept)


class SyncUnitTests(SynchronousTestCase):
    def test_without_a_cluster_nothing_is_fetched(self) -> None:
        store = Store.in_memory()
        self.addCleanup(store.close)
        local = LocalAgent(store, "agent1", BROKER)

        class Alone:
            srs = None

            def clustered(self) -> bool:
                return False

        sync = AppSync(local, Alone())
        self.assertEqual(sync.stale(), [])
        self.successResultOf(sync.sync())
