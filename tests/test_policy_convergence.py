"""Autoscaling policies converge across agents as apps do (scs.app_sync):
revisions, tombstones and the same digest, fetch and merge, on the fake
network and a Clock.  An agent that was down or cut off when a policy
changed or was deleted gets the change within a heartbeat or two of coming
back, and decides with it when it is the coordinator; what a peer sends is
checked as the API's input is."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from scs import records, validation as v
from scs.app_sync import MAX_ITEMS
from scs.errors import BadParameter
from scs.local import LocalAgent
from scs.operation_args import check_operation
from scs.store import Store
from scs.store_revisions import POLICY
from scs.validation import MAX_REVISION_AHEAD_MS
from tests import test_app_convergence as apps
from tests.test_app_convergence import DAY_MS, AppCluster
from tests.test_autoscaling import APP, POLICY as FIELDS, QUEUE, STEP, ScalingCluster
from tests.test_srs_hostile import BROKER, INTERVAL


class PolicyCluster(AppCluster, ScalingCluster):
    """Agents with their app sync and their autoscaler running."""

    def policy(self, agent_id: str) -> dict[str, Any] | None:
        policy = self.stores[agent_id].policies.get(APP) if self.stores[agent_id].has_app(APP) else None
        return None if policy is None else policy.to_json()

    def policy_items(self, agent_id: str) -> list[dict[str, Any]]:
        return [item for item in self.agents[agent_id].local.app_state() if item.get("kind") == POLICY]


def three(test: SynchronousTestCase) -> PolicyCluster:
    c = PolicyCluster(test, "agent1", "agent2", "agent3")
    c.run(c.agents["agent1"].app_put(APP))
    c.run(c.agents["agent1"].queue_declare(APP, v.queue_binding(QUEUE, {})))
    c.depth(0)
    c.set_policy()
    c.advance(INTERVAL + 1)
    return c


class PolicyConvergenceTests(SynchronousTestCase):
    def assertConverged(self, c: PolicyCluster) -> None:
        live = [a for a, node in c.nodes.items() if node.agent.srs.is_connected()]
        digests = {agent_id: c.agents[agent_id].local.apps_digest() for agent_id in live}
        self.assertEqual(len(set(digests.values())), 1, digests)
        items = {agent_id: c.policy_items(agent_id) for agent_id in live}
        self.assertEqual(len({repr(i) for i in items.values()}), 1, items)

    def test_a_policy_changed_while_an_agent_was_down_reaches_it_and_it_decides_with_it(self) -> None:
        c = three(self)
        self.assertEqual(c.policy("agent3")["max_instances"], 4)
        c.kill("agent3")
        c.advance(2)
        reply = c.run(c.agents["agent1"].autoscaling_put(APP, {"max_instances": 2, "messages_per_instance": 20}))
        self.assertEqual(reply.status, 200)
        self.assertNotIn("revision", reply.body)  # the HTTP contract is unchanged
        self.assertEqual(c.policy("agent3")["max_instances"], 4)  # missed it
        agent3 = c.restart("agent3")
        c.advance(2 * INTERVAL)
        self.assertEqual(c.policy("agent3"), c.policy("agent1"))
        self.assertEqual((c.policy("agent3")["max_instances"], c.policy("agent3")["messages_per_instance"]), (2, 20))
        revisions = {a: c.stores[a].revisions.of(APP, POLICY)[0] for a in c.agents}
        self.assertEqual(len(set(revisions.values())), 1, revisions)
        self.assertConverged(c)
        self.assertNotIn("revision", c.run(agent3.autoscaling_get(APP)).body)
        # agent3 alone: it is the coordinator, and decides with the new policy.
        c.kill("agent1")
        c.kill("agent2")
        c.depth(1000)
        c.advance(4 * STEP)
        self.assertTrue(c.scalers["agent3"].deciding)
        decision = c.scalers["agent3"].decisions[APP]
        self.assertEqual((decision["agent"], decision["target"]), ("agent3", 2))  # not 4, the old maximum

    def test_a_policy_changed_while_an_agent_was_down_reaches_it_from_the_peers_side(self) -> None:
        """Without its own connect merge, the digests bring it all the same."""
        c = three(self)
        c.kill("agent3")
        c.set_policy(through="agent2", min_instances=2, max_instances=3)
        agent3 = c.restart("agent3")
        agent3.sync_apps_from_peers = lambda: None
        agent3.srs.on_connected[0] = lambda: None
        c.advance(2 * INTERVAL)
        self.assertEqual((c.policy("agent3")["min_instances"], c.policy("agent3")["max_instances"]), (2, 3))
        self.assertConverged(c)

    def test_a_policy_deleted_while_an_agent_was_down_is_deleted_there(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.advance(2)
        reply = c.run(c.agents["agent1"].autoscaling_delete(APP))
        self.assertEqual(reply.body, {"ok": "ok", "app": APP})
        self.assertIsNotNone(c.policy("agent3"))  # missed it
        agent3 = c.restart("agent3")
        c.advance(2 * INTERVAL)
        for agent_id in c.agents:
            self.assertIsNone(c.policy(agent_id))
            self.assertIn(APP, c.stores[agent_id].revisions.tombstones(POLICY))
        self.assertConverged(c)
        # agent3 alone decides nothing for the app any more.
        c.kill("agent1")
        c.kill("agent2")
        c.depth(1000)
        c.advance(4 * STEP)
        self.assertTrue(c.scalers["agent3"].deciding)
        self.assertNotIn(APP, c.scalers["agent3"].decisions)
        del agent3

    def test_a_policy_changed_on_a_cut_off_agent_reaches_the_others(self) -> None:
        c = three(self)
        transport = c.agents["agent1"].srs.transport
        transport.stopService()  # agent1 alone loses the broker
        c.advance(INTERVAL)
        self.assertFalse(c.agents["agent1"].srs.is_connected())
        c.set_policy(max_instances=3, scale_down_after=30)
        self.assertEqual(c.policy("agent2")["max_instances"], 4)
        transport.startService()
        c.advance(2 * INTERVAL)
        for agent_id in c.agents:
            self.assertEqual((c.policy(agent_id)["max_instances"], c.policy(agent_id)["scale_down_after"]), (3, 30.0))
        self.assertConverged(c)

    def test_a_policy_deleted_on_a_cut_off_agent_is_deleted_everywhere(self) -> None:
        c = three(self)
        transport = c.agents["agent2"].srs.transport
        transport.stopService()
        c.advance(INTERVAL)
        c.run(c.agents["agent2"].autoscaling_delete(APP))
        self.assertIsNotNone(c.policy("agent1"))
        transport.startService()
        c.advance(2 * INTERVAL)
        for agent_id in c.agents:
            self.assertIsNone(c.policy(agent_id))
        self.assertConverged(c)

    def test_an_app_that_arrives_by_the_merge_brings_its_policy(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.run(c.agents["agent1"].app_put("baz"))
        c.run(c.agents["agent1"].queue_declare("baz", v.queue_binding("jobs", {})))
        c.run(c.agents["agent1"].autoscaling_put("baz", v.check_policy_fields({**FIELDS, "queue": "jobs"})))
        agent3 = c.restart("agent3")
        # One merge of a peer's state takes the app and its policy at once.
        changed = agent3.app_sync.merge("agent1", c.agents["agent1"].local.app_state())
        self.assertEqual(changed, ["baz", "autoscaling:baz"])
        self.assertEqual(c.stores["agent3"].policies.get("baz").queue, "jobs")
        c.advance(2 * INTERVAL)
        self.assertConverged(c)

    def test_a_deleted_apps_old_policy_does_not_come_back_with_a_new_app(self) -> None:
        c = three(self)
        c.kill("agent3")
        c.run(c.agents["agent1"].app_delete(APP))
        c.run(c.agents["agent1"].app_put(APP))  # the name again, without a policy
        self.assertIsNotNone(c.policy("agent3"))  # its old copy
        c.restart("agent3")
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertTrue(c.stores[agent_id].has_app(APP))
            self.assertIsNone(c.policy(agent_id))
        self.assertConverged(c)

    def test_the_highest_revision_wins_and_ties_converge(self) -> None:
        c = PolicyCluster(self, "agent1", "agent2")
        for agent in c.agents.values():
            agent.local.app_put(APP, revision=1)
        c.agents["agent1"].local.autoscaling_put(APP, **{**FIELDS, "max_instances": 2}, revision=7)
        c.agents["agent2"].local.autoscaling_put(APP, **{**FIELDS, "max_instances": 3}, revision=7)
        c.advance(3 * INTERVAL)
        self.assertEqual({a: c.policy(a)["max_instances"] for a in c.agents}, {"agent1": 3, "agent2": 3})
        c.agents["agent1"].local.autoscaling_put(APP, **{**FIELDS, "max_instances": 1}, revision=8)
        c.advance(3 * INTERVAL)
        self.assertEqual({a: c.policy(a)["max_instances"] for a in c.agents}, {"agent1": 1, "agent2": 1})


class PolicyRevisionTests(SynchronousTestCase):
    def local(self) -> LocalAgent:
        store = Store.in_memory()
        self.addCleanup(store.close)
        local = LocalAgent(store, "agent1", BROKER)
        local.app_put(APP)
        return local

    def test_a_change_older_than_ours_is_ignored(self) -> None:
        local = self.local()
        local.autoscaling_put(APP, **{**FIELDS, "max_instances": 3}, revision=200)
        answer = local.autoscaling_put(APP, **FIELDS, revision=100)
        self.assertTrue(answer["stale"])
        self.assertEqual(local.autoscaling_get(APP)["max_instances"], 3)
        # A deletion older than the policy leaves it; one as recent wins.
        self.assertFalse(local.autoscaling_delete(APP, revision=150)["deleted"])
        self.assertTrue(local.autoscaling_delete(APP, revision=200)["deleted"])
        self.assertEqual(local.store.revisions.tombstones(POLICY), {APP: 200})
        self.assertTrue(local.autoscaling_put(APP, **FIELDS, revision=200)["stale"])
        self.assertIsNone(local.store.policies.get(APP))

    def test_revisions_grow_past_the_deletions(self) -> None:
        local = self.local()
        local.autoscaling_put(APP, **FIELDS)
        first = local.store.revisions.of(APP, POLICY)[0]
        self.assertGreaterEqual(first, records.now_ms() - 60_000)
        local.autoscaling_delete(APP)
        deleted = local.store.revisions.tombstones(POLICY)[APP]
        self.assertGreater(deleted, first)
        ahead = records.now_ms() + 3_600_000
        # Deleting what is not here stores nothing (an API 404 changes nothing).
        self.assertFalse(local.autoscaling_delete(APP, revision=ahead)["deleted"])
        self.assertEqual(local.store.revisions.tombstones(POLICY), {APP: deleted})
        local.store.revisions.put_tombstone(APP, ahead, POLICY)  # a peer's later deletion, merged
        self.assertEqual(local.store.revisions.next(APP, POLICY), ahead + 1)
        local.autoscaling_put(APP, **FIELDS)
        self.assertEqual(local.store.revisions.of(APP, POLICY), (ahead + 1, None))

    def test_old_policy_tombstones_are_purged(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        agent = c.agents["agent1"]
        old = records.now_ms() - DAY_MS - 1000
        agent.store.revisions.put_tombstone("gone", old, POLICY)
        agent.store.revisions.put_tombstone("recent", records.now_ms(), POLICY)
        c.advance(1)
        self.assertEqual(sorted(agent.store.revisions.tombstones(POLICY)), ["recent"])
        stale = [{"kind": POLICY, "app": "gone", "revision": old, "deleted": True}]
        self.assertEqual(agent.app_sync.merge("agent2", stale), [])
        self.assertNotIn("gone", agent.store.revisions.tombstones(POLICY))


class HostilePolicyCopyTests(SynchronousTestCase):
    """A peer's policy is a door: refused, logged, nothing stored."""

    # The apps' hostile-copy tests' cluster and assertions, their tests not.
    refused = apps.HostileCopyTests.refused
    assertNothingStored = apps.HostileCopyTests.assertNothingStored

    def setUp(self) -> None:
        apps.HostileCopyTests.setUp(self)
        self.agent.local.autoscaling_put(APP, **FIELDS, revision=5)

    def item(self, **changes: Any) -> dict[str, Any]:
        return {"kind": POLICY, "app": APP, **FIELDS, "revision": records.now_ms() + 1000, **changes}

    def test_bad_fields_are_refused(self) -> None:
        for item in (
            self.item(min_instances=3, max_instances=2),
            self.item(min_instances=0),
            self.item(max_instances=10**9),
            self.item(messages_per_instance="many"),
            self.item(scale_down_after=-1),
            self.item(queue="../x"),
            self.item(queue=None),
            self.item(app="../x"),
            self.item(evil=1),
            self.item(roll=True),
            self.item(deleted=False),
            self.item(kind="policy"),
            self.item(kind=None),
            self.item(kind="app"),
            {"kind": POLICY, "app": APP, "queue": QUEUE, "revision": records.now_ms()},
            {"kind": POLICY, "app": APP, "deleted": True},
        ):
            self.events.clear()
            with self.subTest(item=item):
                self.assertNothingStored([item])

    def test_revisions_out_of_bounds_are_refused(self) -> None:
        ahead = records.now_ms() + MAX_REVISION_AHEAD_MS + 60_000
        for revision in (ahead, 2**70, -1, "9", 1.5, True, None, [1]):
            self.events.clear()
            with self.subTest(revision=revision):
                self.assertNothingStored([self.item(revision=revision)])
                self.assertNothingStored([{"kind": POLICY, "app": APP, "revision": revision, "deleted": True}])

    def test_an_oversized_or_ambiguous_state_is_refused_whole(self) -> None:
        revision = records.now_ms() + 1000
        many = [self.item(app=f"a{i}", revision=revision) for i in range(MAX_ITEMS + 1)]
        self.assertNothingStored(many)
        twice = [self.item(), {"kind": POLICY, "app": APP, "revision": revision, "deleted": True}]
        self.assertNothingStored(twice)

    def test_a_policy_of_an_app_not_here_is_not_stored(self) -> None:
        before = self.agent.store.dump()
        self.assertEqual(self.agent.app_sync.merge("agent2", [self.item(app="other")]), [])
        self.assertEqual(self.agent.store.dump(), before)

    def test_a_peer_serving_a_hostile_policy_changes_nothing_here(self) -> None:
        self.c.agents["agent2"].srs.handler = lambda op, args: [
            self.item(max_instances=1000, revision=records.now_ms() + 2 * DAY_MS)
        ]
        self.c.advance(3 * INTERVAL)
        self.assertEqual(self.agent.local.autoscaling_get(APP)["max_instances"], FIELDS["max_instances"])
        self.assertTrue(self.refused())

    def test_hostile_revisions_over_srs_are_refused(self) -> None:
        with self.assertRaises(BadParameter):
            check_operation("autoscaling_put", {"app": APP, **FIELDS, "revision": records.now_ms() + 2 * DAY_MS})
        with self.assertRaises(BadParameter):
            check_operation("autoscaling_delete", {"app": APP, "revision": -5})
        with self.assertRaises(BadParameter):
            check_operation("autoscaling_put", {"app": APP, **FIELDS, "min_instances": 5, "revision": 1})
        clean = check_operation("autoscaling_put", {"app": APP, **FIELDS, "revision": 9})
        self.assertEqual(clean["revision"], 9)
