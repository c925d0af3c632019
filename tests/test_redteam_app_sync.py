"""A red-team pass over app convergence (``scs.app_sync``): revisions,
tombstones, the apps digest in heartbeats and the merge of a peer's
``app_state``, attacked as (1) a broker user of an unsigned cluster, (2) a
compromised or buggy peer of a signed one, (3) an operator changing the same
app through two agents, (4) a store edited on disk or carried over from an
older version.

Tests that pass document properties that hold.  A finding is written as
``xfail(strict=True)``: the scenario that breaks the property, failing now;
it loses the marker when the product is fixed.  Everything runs on the fake
network and a ``Clock`` (``tests.test_app_convergence.AppCluster``).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from scs import app_sync, failover, records
from scs.app_sync import MAX_ITEMS
from scs.errors import BadParameter, NotFound
from scs.replica import MIN_FETCH_INTERVAL
from scs.store import Store
from scs.validation import MAX_REVISION_AHEAD_MS
from tests.test_app_convergence import DAY_MS, AppCluster, three
from tests.test_failover import FAILOVER_AFTER, good_document
from tests.test_srs_hostile import BROKER, INTERVAL

PASSWORD = "s3cr3t-Broker-Pw"
ENV_SECRET = "tok-ENV-VALUE-9f8e7d"
SECRET_BROKER = f"amqp://app:{PASSWORD}@10.0.0.7:5672/prod"


def digests(c: AppCluster) -> dict[str, str]:
    return {agent_id: agent.local.apps_digest() for agent_id, agent in c.agents.items()}


def count_calls(c: AppCluster, operation: str) -> list[tuple[str, str]]:
    """Every ``srs.call`` of ``operation`` made by an agent of ``c``:
    (caller, callee)."""
    calls: list[tuple[str, str]] = []
    for agent_id, agent in c.agents.items():
        call = agent.srs.call

        def counting(peer: str, op: str, *args: Any, _call: Any = call, _me: str = agent_id, **kwargs: Any) -> Any:
            if op == operation:
                calls.append((_me, peer))
            return _call(peer, op, *args, **kwargs)

        agent.srs.call = counting
    return calls


class Events:
    """Every log event of the global publisher while the test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def leaking(self, *secrets: str) -> list[str]:
        found = []
        for event in self.events:
            fields = {k: v for k, v in event.items() if not k.startswith("log_")}
            text = formatEvent(event) + " " + repr(fields)
            found.extend(text for secret in secrets if secret in text)
        return found


# -- findings -------------------------------------------------------------------


class FindingTests(SynchronousTestCase):
    def test_an_upgrade_does_not_push_stale_settings_over_newer_ones(self) -> None:
        stores = {"agent1": Store.in_memory(), "agent2": Store.in_memory()}
        for store in stores.values():
            self.addCleanup(store.close)
        # As the migration leaves them: both at revision 0.  The operator's
        # last change (MODE=new) reached agent1; agent2 was down then.
        stores["agent1"].put_app("foo", BROKER, env={"MODE": "new"}, revision=0)
        stores["agent2"].put_app("foo", BROKER, env={"MODE": "old"}, revision=0)
        c = AppCluster(self, "agent1", "agent2", stores=stores)
        c.advance(3 * INTERVAL)
        # No order is known between the two: nothing may be overwritten
        # silently, least of all the operator's last change.
        self.assertEqual(c.stores["agent1"].get_app("foo").env, (("MODE", "new"),))

    def test_a_revision_beyond_the_bound_in_a_store_does_not_pin_the_app(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", env={"MODE": "old"}))
        c.advance(INTERVAL)
        # agent1 ran with its clock two days ahead (or its store was edited).
        ahead = records.now_ms() + 2 * DAY_MS
        c.stores["agent1"].put_app("foo", BROKER, revision=ahead)
        reply = c.run(c.agents["agent2"].app_put("foo", env={"MODE": "fixed"}))
        self.assertEqual(reply.status, 200)
        c.advance(5 * INTERVAL)
        self.assertEqual(c.stores["agent1"].get_app("foo").env, (("MODE", "fixed"),))
        self.assertEqual(len(set(digests(c).values())), 1, digests(c))

    def test_many_deletions_in_a_day_do_not_stop_convergence(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", env={"MODE": "old"}))
        c.advance(INTERVAL)
        revision = records.now_ms()
        for store in c.stores.values():
            for i in range(MAX_ITEMS):
                store.revisions.put_tombstone(f"ci-run-{i}", revision)  # test apps made and deleted today
        # A change agent1 missed (it was cut off): agent2 has it.
        c.agents["agent2"].local.app_put("foo", env={"MODE": "new"})
        c.advance(3 * INTERVAL)
        self.assertEqual(c.stores["agent1"].get_app("foo").env, (("MODE", "new"),))

    def test_a_peer_cannot_grow_our_tombstones_without_bound(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        sync = c.agents["agent1"].app_sync
        revision = records.now_ms()
        for round_ in range(3):
            state = [{"app": f"junk{round_}-{i}", "revision": revision, "deleted": True} for i in range(MAX_ITEMS)]
            sync.merge("agent2", state)
        self.assertLessEqual(len(c.stores["agent1"].revisions.tombstones()), MAX_ITEMS)

    def test_an_older_peer_gets_the_deletion_or_is_reported(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("bar"))
        c.advance(INTERVAL)
        old = c.agents["agent2"]
        handler = old.srs.handler

        def older(operation: str, arguments: dict[str, Any]) -> Any:
            if operation == "app_state":
                raise BadParameter(f"unknown operation {operation}", parameter="operation")
            if "revision" in arguments:
                raise BadParameter("unknown parameter revision", parameter="revision")
            return handler(operation, arguments)

        old.srs.handler = older
        c.nodes["agent2"].app_sync_service.stopService()  # it has no app sync
        summary = old.local.summary
        old.local.summary = lambda: {k: v for k, v in summary().items() if k != "apps"}
        c.advance(2 * INTERVAL)
        reply = c.run(c.agents["agent1"].app_delete("bar"))
        c.advance(3 * INTERVAL)
        self.assertTrue("agent2" in reply.missing or not c.stores["agent2"].has_app("bar"), reply.missing)

    def test_a_deleted_apps_instances_are_not_failed_over_again_and_again(self) -> None:
        events: list[dict[str, Any]] = []
        self.patch(failover, "log", Logger(namespace="scs.failover", observer=events.append))
        c = three(self)
        c.kill("agent3")
        c.run(c.agents["agent1"].app_delete("bar"))
        c.advance(FAILOVER_AFTER + 60)
        errors = [e for e in events if e.get("event") == "failover.error" and e.get("instance") == "b3"]
        self.assertLessEqual(len(errors), 1, len(errors))
        for agent_id in ("agent1", "agent2"):
            self.assertFalse(c.stores[agent_id].has_app("bar"))

    def test_a_state_that_changes_nothing_is_not_fetched_again_and_again(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.advance(INTERVAL)
        # agent2 holds an item agent1 refuses (a far revision, an argument
        # refused since): the digests differ, and stay so.
        c.stores["agent2"].put_app("foo", BROKER, revision=records.now_ms() + 2 * DAY_MS)
        calls = count_calls(c, "app_state")
        c.advance(60)
        fetched = [peer for caller, peer in calls if caller == "agent1"]
        self.assertLessEqual(len(fetched), 3, len(fetched))

    def test_a_hostile_state_is_not_a_log_flood(self) -> None:
        events: list[dict[str, Any]] = []
        self.patch(app_sync, "log", Logger(namespace="scs.app_sync", observer=events.append))
        c = AppCluster(self, "agent1", "agent2")
        bad = [{"app": f"a{i}", "env": {"LD_PRELOAD": "/x.so"}, "revision": 1} for i in range(MAX_ITEMS)]
        c.agents["agent1"].app_sync.merge("agent2", bad)
        refused = [e for e in events if e.get("event") == "srs.copy.refused"]
        self.assertLessEqual(len(refused), 10, len(refused))

    def test_a_partial_item_at_our_revision_is_not_merged_again_and_again(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", env={"A": "1"}))
        sync = c.agents["agent1"].app_sync
        revision = c.stores["agent1"].get_app("foo").revision
        partial = [{"app": "foo", "revision": revision}]
        sync.merge("agent2", partial)
        self.assertEqual(sync.merge("agent2", partial), [])

    def test_a_steady_cluster_does_not_reread_its_apps_twice_a_second(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.advance(3 * INTERVAL)
        local = c.agents["agent1"].local
        reads: list[int] = []
        list_apps = local.store.list_apps
        local.store.list_apps = lambda: reads.append(1) or list_apps()
        c.advance(10)
        self.assertLessEqual(len(reads), 2, len(reads))


# -- attacks that are defended ----------------------------------------------------


class DefendedTests(SynchronousTestCase):
    def test_a_deletion_far_ahead_does_not_pin_a_name(self) -> None:
        """A broker user of an unsigned cluster deletes an app at the bound
        (a day ahead): the operator makes it again through the API, one
        more than the tombstone, and every agent takes it."""
        c = three(self)
        far = records.now_ms() + MAX_REVISION_AHEAD_MS - 1000
        for agent in c.agents.values():
            self.successResultOf(agent.handle_remote("app_delete", {"app": "foo", "revision": far}))
        c.advance(INTERVAL)
        reply = c.run(c.agents["agent2"].app_put("foo", env={"MODE": "again"}))
        self.assertEqual(reply.status, 201)
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertEqual(c.stores[agent_id].get_app("foo").env, (("MODE", "again"),))
            self.assertGreater(c.stores[agent_id].get_app("foo").revision, far)
        self.assertEqual(len(set(digests(c).values())), 1)

    def test_settings_far_ahead_do_not_pin_an_app(self) -> None:
        """A hostile change a day ahead spreads (the bus is trusted), but the
        operator's next change, through any agent, wins over it."""
        c = three(self)
        far = records.now_ms() + MAX_REVISION_AHEAD_MS - 1000
        self.successResultOf(
            c.agents["agent3"].handle_remote("app_put", {"app": "foo", "env": {"MODE": "evil"}, "revision": far})
        )
        c.advance(3 * INTERVAL)
        self.assertEqual(c.stores["agent1"].get_app("foo").env, (("MODE", "evil"),))
        c.run(c.agents["agent1"].app_put("foo", env={"MODE": "fixed"}))
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertEqual(c.stores[agent_id].get_app("foo").env, (("MODE", "fixed"),))

    def test_revisions_beyond_the_bound_are_refused_over_srs(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        before = c.stores["agent2"].dump()
        too_far = records.now_ms() + MAX_REVISION_AHEAD_MS + 60_000
        for operation, arguments in (
            ("app_put", {"app": "foo", "env": {"A": "x"}, "revision": too_far}),
            ("app_delete", {"app": "foo", "revision": too_far}),
        ):
            self.failureResultOf(c.agents["agent2"].handle_remote(operation, arguments), BadParameter)
        self.assertEqual(c.stores["agent2"].dump(), before)

    def test_a_stale_roll_holds_no_workers(self) -> None:
        """``roll`` with an old revision (a replayed or late scatter) does not
        hold the app's workers from their reconfiguration."""
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", env={"A": "1"}))
        c.advance(INTERVAL)
        supervisor = c.nodes["agent2"].supervisor
        supervisor.held = []
        answer = self.successResultOf(
            c.agents["agent2"].handle_remote("app_put", {"app": "foo", "env": {"A": "0"}, "revision": 1, "roll": True})
        )
        self.assertTrue(answer["stale"])
        self.assertEqual(supervisor.held, [])
        self.assertEqual(c.stores["agent2"].get_app("foo").env, (("A", "1"),))

    def test_roll_never_comes_through_a_state(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.advance(INTERVAL)
        supervisor = c.nodes["agent1"].supervisor
        supervisor.held = []
        item = {**c.agents["agent2"].local.app_item("foo"), "env": {"B": "2"}, "revision": records.now_ms() + 5000}
        self.assertEqual(c.agents["agent1"].app_sync.merge("agent2", [{**item, "roll": True}]), [])
        self.assertEqual(c.agents["agent1"].app_sync.merge("agent2", [item]), ["foo"])
        self.assertEqual(supervisor.held, [])

    def test_no_secret_reaches_the_logs(self) -> None:
        """Broker passwords and env values through merges, refusals, stale
        changes and API changes: none in any log line."""
        events = Events(self)
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", broker=SECRET_BROKER, env={"TOKEN": ENV_SECRET}))
        c.advance(3 * INTERVAL)
        sync = c.agents["agent2"].app_sync
        now = records.now_ms()
        hostile = [
            {"app": "a1", "broker": SECRET_BROKER, "env": {"TOKEN": ENV_SECRET}, "revision": now + 2 * DAY_MS},
            {"app": "a2", "broker": f"amqp://u:{PASSWORD}@ho st/", "revision": now},
            {"app": "a3", "broker": f"amqp://u:{PASSWORD}?@host/", "revision": now},
            {"app": "a4", "broker": f"amqp://u:{PASSWORD}#@host/", "revision": now},
            {"app": "a5", "broker": f"amqp://u:[{PASSWORD}]@host/", "revision": now},
            {"app": "a6", "broker": f"http://u:{PASSWORD}@host/", "revision": now},
            {"app": "a7", "env": {"TOKEN": ENV_SECRET + "\n"}, "revision": now},
            {"app": "a8", "env": {"LD_PRELOAD": ENV_SECRET}, "revision": now},
            {"app": "foo", "broker": SECRET_BROKER, "env": {"TOKEN": ENV_SECRET}, "revision": 1},
        ]
        sync.merge("agent1", hostile)
        c.agents["agent2"].local.app_put("foo", env={"TOKEN": ENV_SECRET}, revision=1)  # stale
        c.run(c.agents["agent1"].app_delete("foo"))
        c.advance(3 * INTERVAL)
        self.assertEqual(events.leaking(PASSWORD, ENV_SECRET), [])
        self.assertTrue(events.named("srs.copy.refused"))

    def test_an_instance_of_a_deleted_app_is_not_adopted(self) -> None:
        c = three(self)
        c.run(c.agents["agent1"].app_delete("bar"))
        c.advance(INTERVAL)
        document = good_document(name="b9", app="bar", pid=None)
        before = c.stores["agent2"].dump()
        self.failureResultOf(
            c.agents["agent2"].handle_remote("instance_adopt", {"document": document, "moved_from": "agent3"}),
            NotFound,
        )
        self.assertEqual(c.stores["agent2"].dump(), before)
        self.assertFalse(c.stores["agent2"].has_app("bar"))

    def test_a_refused_item_leaves_the_rest_of_the_state_alone(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo", env={"A": "1"}))
        sync = c.agents["agent1"].app_sync
        now = records.now_ms()
        changed = sync.merge(
            "agent2",
            [
                {"app": "foo", "env": {"LD_PRELOAD": "/x.so"}, "revision": now + 5000},
                {"app": "baz", "revision": now + 5000, "deleted": True},
            ],
        )
        self.assertEqual(changed, ["baz"])
        self.assertEqual(c.stores["agent1"].get_app("foo").env, (("A", "1"),))

    def test_a_late_state_from_before_a_delete_does_not_bring_the_app_back(self) -> None:
        """A merge racing a scatter: the peer's state fetched before the
        deletion arrives after it."""
        c = three(self)
        before = c.agents["agent2"].local.app_state()
        c.run(c.agents["agent1"].app_delete("bar"))
        self.assertEqual(c.agents["agent1"].app_sync.merge("agent2", before), [])
        self.assertFalse(c.stores["agent1"].has_app("bar"))
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertFalse(c.stores[agent_id].has_app("bar"))

    def test_a_late_scatter_does_not_undo_a_newer_merge(self) -> None:
        """An operator's two changes through two agents: the older scatter
        arriving last is stale everywhere."""
        c = three(self)
        c.run(c.agents["agent1"].app_put("foo", env={"MODE": "first"}))
        first = c.agents["agent1"].local.app_item("foo")
        c.run(c.agents["agent2"].app_put("foo", env={"MODE": "second"}))
        for agent in c.agents.values():
            answer = self.successResultOf(agent.handle_remote("app_put", {**first, "roll": True}))
            self.assertTrue(answer["stale"])
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertEqual(c.stores[agent_id].get_app("foo").env, (("MODE", "second"),))

    def test_concurrent_changes_at_the_same_revision_converge(self) -> None:
        c = three(self)
        revision = max(c.stores[a].get_app("foo").revision for a in c.agents) + 1
        one = {**c.agents["agent1"].local.app_item("foo"), "env": {"MODE": "one"}, "revision": revision}
        two = {**one, "env": {"MODE": "two"}}
        # Each scatter reaches the agents in another order.
        for agent_id, order in (("agent1", (one, two)), ("agent2", (two, one)), ("agent3", (one,))):
            for item in order:
                self.successResultOf(c.agents[agent_id].handle_remote("app_put", item))
        c.advance(4 * INTERVAL)
        self.assertEqual(len(set(digests(c).values())), 1, digests(c))

    def test_the_digest_ignores_spelling_order_and_defaults(self) -> None:
        """The same settings spelt otherwise (broker URL, env order, default
        paths as None or "default") give the same digest."""
        stores = [Store.in_memory(), Store.in_memory()]
        for store in stores:
            self.addCleanup(store.close)
        from scs.local import LocalAgent

        a, b = (LocalAgent(store, f"agent{i}", BROKER) for i, store in enumerate(stores))
        a.app_put("foo", broker="amqp://guest:guest@127.0.0.1//", env={"A": "1", "B": "2"}, revision=5)
        b.app_put(
            "foo",
            broker="AMQP://guest:guest@127.0.0.1:5672/",
            env={"B": "2", "A": "1"},
            workdir=None,
            python=None,
            revision=5,
        )
        self.assertEqual(a.apps_digest(), b.apps_digest())

    def test_digest_flapping_costs_at_most_one_fetch_per_interval(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        flapping = c.agents["agent2"]
        summary = flapping.local.summary
        counter = iter(range(10**6))
        flapping.local.summary = lambda: {**summary(), "apps": f"{next(counter):032x}"}
        calls = count_calls(c, "app_state")
        c.advance(60)
        fetched = [peer for caller, peer in calls if caller == "agent1"]
        self.assertLessEqual(len(fetched), 60 / MIN_FETCH_INTERVAL + 1)

    def test_a_tombstone_never_comes_back_once_purged_by_a_late_copy(self) -> None:
        """A peer's deletion older than the horizon is not taken (it would be
        purged at once and differ again)."""
        c = AppCluster(self, "agent1", "agent2")
        old = records.now_ms() - DAY_MS - 60_000
        self.assertEqual(
            c.agents["agent1"].app_sync.merge("agent2", [{"app": "x", "revision": old, "deleted": True}]), []
        )
        self.assertEqual(c.stores["agent1"].revisions.tombstones(), {})
