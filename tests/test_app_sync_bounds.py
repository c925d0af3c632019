"""What bounds app convergence (``scs.app_sync``) against old, edited or
hostile data: conflicts of versions without a revision, revisions beyond
the bound in a store, caps and budgets of tombstones, one warning per
state, no fetch that changes nothing, and the app state cached until a
write to the apps (``Store.app_writes``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from scs import app_sync, records, store_revisions
from scs.app_sync import LOWEST, AppSync, check_item
from scs.errors import BadParameter
from scs.local import LocalAgent
from scs.records import AutoscalingPolicy, QueueBinding
from scs.store import Store
from scs.store_revisions import POLICY, revision_bound
from tests.test_app_convergence import DAY_MS, AppCluster
from tests.test_redteam_app_sync import ENV_SECRET, PASSWORD, SECRET_BROKER, count_calls
from tests.test_srs_hostile import BROKER, INTERVAL

POLICY_FIELDS = {
    "queue": "q",
    "min_instances": 1,
    "max_instances": 2,
    "messages_per_instance": 5,
    "scale_down_after": 5,
}


@pytest.fixture
def store() -> Any:
    s = Store.in_memory()
    yield s
    s.close()


def _events(test: Any, module: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    test.patch(module, "log", Logger(namespace=module.__name__, observer=events.append))
    return events


# -- the write counter: every writer of the app state changes it ----------------

WRITERS: dict[str, Callable[[Store], Any]] = {
    "put_app (new)": lambda s: s.put_app("new", BROKER),
    "put_app (changed)": lambda s: s.put_app("foo", BROKER, env={"B": "2"}),
    "put_app (revision)": lambda s: s.put_app("foo", BROKER, revision=records.now_ms() + 5000),
    "put_app (broker)": lambda s: s.put_app("foo", BROKER, broker="amqp://u:p@10.0.0.9:5672/other"),
    "ensure_app (implicit)": lambda s: s.ensure_app("implicit", BROKER),
    "add_node (implicit app)": lambda s: s.add_node("implicit", "i1", BROKER),
    "declare_queue (implicit app)": lambda s: s.declare_queue("implicit", QueueBinding("q", "q", "q"), BROKER),
    "delete_app": lambda s: s.delete_app("foo"),
    "put_policy": lambda s: s.policies.put(AutoscalingPolicy("foo", **POLICY_FIELDS)),
    "put_policy (changed)": lambda s: s.policies.put(AutoscalingPolicy("bar", **{**POLICY_FIELDS, "max_instances": 3})),
    "delete_policy": lambda s: s.policies.delete("bar"),
    "put_tombstone": lambda s: s.revisions.put_tombstone("gone", records.now_ms()),
    "put_tombstone (higher)": lambda s: s.revisions.put_tombstone("old", records.now_ms()),
    "put_tombstone (policy)": lambda s: s.revisions.put_tombstone("gone", records.now_ms(), POLICY),
    "purge_tombstones": lambda s: s.revisions.purge_tombstones(records.now_ms()),
    "purge_tombstones (policy)": lambda s: s.revisions.purge_tombstones(records.now_ms(), POLICY),
    "a session of its own": lambda s: _in_a_session(s),
    "plain SQL on the engine": lambda s: _plain_sql(s),
}


def _in_a_session(s: Store) -> None:
    from scs.models import App

    with s.transaction() as session:
        session.query(App).filter(App.name == "foo").one().celery_app = "proj.celery"


def _plain_sql(s: Store) -> None:
    with s.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE app SET env = '{\"C\": \"3\"}' WHERE name = 'foo'")


def _seeded(s: Store) -> LocalAgent:
    s.put_app("foo", BROKER, env={"A": "1"})
    s.put_app("bar", BROKER)
    s.policies.put(AutoscalingPolicy("bar", **POLICY_FIELDS))
    s.revisions.put_tombstone("old", 5)
    s.revisions.put_tombstone("old", 5, POLICY)
    return LocalAgent(s, "agent1", BROKER)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_of_the_app_state_changes_the_digest_at_once(store: Store, writer: str) -> None:
    local = _seeded(store)
    before, digest = store.app_writes, local.apps_digest()
    WRITERS[writer](store)
    assert store.app_writes != before
    # Read again, the state is what the store holds now.
    fresh = LocalAgent(store, "agent1", BROKER)
    fresh._writes = lambda: None  # never cached
    assert local.app_state() == fresh.app_state()
    assert local.apps_digest() == fresh.apps_digest() != digest


def test_writes_to_instances_and_settings_keep_the_cached_state(store: Store) -> None:
    local = _seeded(store)
    store.add_node("foo", "f1", BROKER)
    local.apps_digest()
    reads: list[int] = []
    list_apps = store.list_apps
    store.list_apps = lambda: reads.append(1) or list_apps()  # type: ignore[method-assign]
    store.add_node("foo", "f2", BROKER)
    store.set_enabled("f2", False)
    store.delete_node("f1")
    store.settings.set("draining", "1")
    store.replicas.put("agent2", "d" * 32, [], 1.0)
    for _ in range(5):
        local.apps_digest()
        local.app_state()
        local.app_names()
        local.instance_export()
    assert reads == []


def test_a_store_in_place_of_another_is_read_again(store: Store) -> None:
    local = _seeded(store)
    digest = local.apps_digest()
    other = Store.in_memory()
    try:
        local.store = other
        assert local.app_state() == []
        assert local.apps_digest() != digest
    finally:
        other.close()


# -- revisions beyond the bound (finding 2) -------------------------------------


def test_revisions_beyond_the_bound_are_clamped_when_the_store_opens(tmp_path: Any) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        s = Store.in_directory(tmp_path)
        s.put_app("foo", BROKER)
        s.policies.put(AutoscalingPolicy("foo", **POLICY_FIELDS))
        far = records.now_ms() + 2 * DAY_MS
        with s.engine.begin() as connection:
            connection.exec_driver_sql(f"UPDATE app SET revision = {far}")
            connection.exec_driver_sql(f"UPDATE autoscaling_policy SET revision = {far}")
        s.revisions.put_tombstone("gone", far)
        s.revisions.put_tombstone("gone", far, POLICY)
        s.close()
        s = Store.in_directory(tmp_path)
        try:
            bound = revision_bound()
            assert records.now_ms() < s.get_app("foo").revision <= bound
            assert s.policies.with_revisions()[0][1] <= bound
            assert s.revisions.tombstones()["gone"] <= bound
            assert s.revisions.tombstones(POLICY)["gone"] <= bound
        finally:
            s.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
    clamped = [e for e in events if e.get("event") == "store.revision.clamped"]
    assert len(clamped) == 1
    assert "foo" in clamped[0]["items"] and "gone" in clamped[0]["items"]


def test_no_revision_is_given_beyond_the_bound(store: Store) -> None:
    store.put_app("foo", BROKER)
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE app SET revision = {records.now_ms() + 2 * DAY_MS}")
    assert store.revisions.next("foo") <= revision_bound()
    store.put_app("foo", BROKER, env={"A": "2"})
    assert store.get_app("foo").revision <= revision_bound()
    store.delete_app("foo")
    assert store.revisions.tombstones()["foo"] <= revision_bound()


def test_an_own_item_beyond_the_bound_loses_to_any_peer_version(store: Store) -> None:
    local = LocalAgent(store, "agent1", BROKER)
    local.app_put("foo", env={"A": "1"})
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE app SET revision = {records.now_ms() + 2 * DAY_MS}")
    sync = AppSync(local, peers=None)
    assert sync.ours()["foo"] == LOWEST
    item = {**local.app_item("foo"), "env": {"A": "peer"}, "revision": 5}
    assert sync.merge("agent2", [item]) == ["foo"]
    assert store.get_app("foo").env == (("A", "peer"),)


def test_a_stored_revision_beyond_the_bound_does_not_make_changes_stale(store: Store) -> None:
    local = LocalAgent(store, "agent1", BROKER)
    local.app_put("foo")
    local.autoscaling_put("foo", **POLICY_FIELDS)
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE app SET revision = {records.now_ms() + 2 * DAY_MS}")
        connection.exec_driver_sql(f"UPDATE autoscaling_policy SET revision = {records.now_ms() + 2 * DAY_MS}")
    now = records.now_ms()
    assert "stale" not in local.autoscaling_put("foo", **{**POLICY_FIELDS, "max_instances": 7}, revision=now)
    assert "stale" not in local.app_put("foo", env={"A": "2"}, revision=now)
    assert local.app_delete("foo", revision=now + 1)["deleted"]


# -- items and states -------------------------------------------------------------


def test_a_policy_item_without_every_field_is_refused() -> None:
    item = {"kind": POLICY, "app": "foo", "revision": 5, **POLICY_FIELDS}
    check_item(item)
    for field in ("app", *POLICY_FIELDS):
        with pytest.raises(BadParameter):
            check_item({k: v for k, v in item.items() if k != field})


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = Store.in_memory()
        self.addCleanup(self.store.close)
        self.local = LocalAgent(self.store, "agent1", BROKER)
        self.local.app_put("foo", env={"A": "1"})
        self.sync = AppSync(self.local, peers=None)
        self.events = _events(self, app_sync)

    def test_the_oldest_tombstones_beyond_the_cap_are_left_out_not_the_state(self) -> None:
        self.patch(app_sync, "MAX_TOMBSTONES", 3)
        now = records.now_ms()
        state = [{"app": f"t{i}", "revision": now - i, "deleted": True} for i in range(5)]
        state.append({**self.local.app_item("foo"), "env": {"A": "2"}, "revision": now + 1000})
        theirs = self.sync.checked("agent2", state)
        self.assertEqual(sorted(theirs), ["foo", "t0", "t1", "t2"])
        refused = [e for e in self.events if e.get("event") == "srs.copy.refused"]
        self.assertEqual([e["refused"] for e in refused], [2])

    def test_a_state_longer_than_any_agents_is_refused_whole(self) -> None:
        self.patch(app_sync, "MAX_STATE", 3)
        now = records.now_ms()
        state = [{"app": f"t{i}", "revision": now, "deleted": True} for i in range(4)]
        self.assertEqual(self.sync.merge("agent2", state), [])
        self.assertEqual(self.store.revisions.tombstones(), {})

    def test_tombstones_of_unknown_names_are_taken_a_budget_per_merge(self) -> None:
        self.patch(app_sync, "TOMBSTONE_BUDGET", 3)
        now = records.now_ms()
        state = [{"app": f"t{i}", "revision": now - i, "deleted": True} for i in range(5)]
        state.append({"app": "foo", "revision": now + 1000, "deleted": True})  # known here: not counted
        changed, complete = self.sync._merge("agent2", state)
        self.assertFalse(complete)
        self.assertEqual(sorted(changed), ["foo", "t0", "t1", "t2"])  # the newest first
        changed, complete = self.sync._merge("agent2", state)
        self.assertTrue(complete)
        self.assertEqual(sorted(changed), ["t3", "t4"])

    def test_one_warning_per_state_with_the_count_and_the_first_error(self) -> None:
        item = {**self.local.app_item("foo"), "revision": 1}
        bad = [{**item, "app": f"a{i}", "env": {"LD_PRELOAD": ENV_SECRET}} for i in range(50)]
        self.sync.merge("agent2", [*bad, {"app": "b", "revision": 1}])
        refused = [e for e in self.events if e.get("event") == "srs.copy.refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["refused"], 51)
        self.assertEqual(refused[0]["agent"], "agent2")
        self.assertIn("LD_PRELOAD", refused[0]["error"])
        self.assertNotIn(ENV_SECRET, repr(refused[0]))


def test_the_store_keeps_the_newest_tombstones_of_each_kind(store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_revisions, "MAX_TOMBSTONES", 3)
    for i in range(5):
        store.revisions.put_tombstone(f"t{i}", 100 + i)
        store.revisions.put_tombstone(f"p{i}", 200 - i, POLICY)
    assert store.revisions.tombstones() == {"t2": 102, "t3": 103, "t4": 104}
    assert store.revisions.tombstones(POLICY) == {"p0": 200, "p1": 199, "p2": 198}
    store.put_app("t5", BROKER)
    store.delete_app("t5")
    assert sorted(store.revisions.tombstones()) == ["t3", "t4", "t5"]


# -- conflicts at revision 0 (finding 1) -----------------------------------------------


class ConflictTests(SynchronousTestCase):
    def cluster(self, *settings: dict[str, Any]) -> AppCluster:
        stores = {}
        for i, env in enumerate(settings, 1):
            stores[f"agent{i}"] = s = Store.in_memory()
            self.addCleanup(s.close)
            s.put_app("foo", SECRET_BROKER, env=env, revision=0)
            s.policies.put(AutoscalingPolicy("foo", **{**POLICY_FIELDS, "max_instances": i}), 0)
        return AppCluster(self, *stores, stores=stores)

    def test_versions_without_a_revision_that_differ_are_left_and_logged_once_per_peer(self) -> None:
        events = _events(self, app_sync)
        c = self.cluster({"TOKEN": ENV_SECRET + "1"}, {"TOKEN": ENV_SECRET + "2"}, {"TOKEN": ENV_SECRET + "3"})
        calls = count_calls(c, "app_state")
        c.advance(30 * INTERVAL)
        for i, agent_id in enumerate(c.agents, 1):
            self.assertEqual(c.stores[agent_id].get_app("foo").env, (("TOKEN", ENV_SECRET + str(i)),))
            self.assertEqual(c.stores[agent_id].policies.get("foo").max_instances, i)
        conflicts = [e for e in events if e.get("event") == "app.conflict"]
        # Once per kind, agent and peer (each agent logs its 2 peers).
        self.assertEqual(len(conflicts), 2 * 3 * 2, [(e["kind"], e["agent"]) for e in conflicts])
        self.assertEqual({(e["kind"], e["app"]) for e in conflicts}, {("app", "foo"), (POLICY, "foo")})
        self.assertFalse([e for e in conflicts if ENV_SECRET in repr(e) or PASSWORD in repr(e)])
        self.assertLessEqual(len(calls), 3 * 2 * 2, calls)  # not fetched again for it

    def test_the_operators_put_settles_a_conflict(self) -> None:
        c = self.cluster({"MODE": "new"}, {"MODE": "old"})
        c.advance(3 * INTERVAL)
        c.agents["agent1"].local.app_put("foo", env={"MODE": "new"}, revision=records.now_ms())
        c.agents["agent1"].local.autoscaling_put("foo", **POLICY_FIELDS, revision=records.now_ms())
        c.advance(3 * INTERVAL)
        for agent_id in c.agents:
            self.assertEqual(c.stores[agent_id].get_app("foo").env, (("MODE", "new"),))
            self.assertEqual(c.stores[agent_id].policies.get("foo").max_instances, POLICY_FIELDS["max_instances"])
        digests = {agent.local.apps_digest() for agent in c.agents.values()}
        self.assertEqual(len(digests), 1)

    def test_the_same_version_without_a_revision_is_no_conflict(self) -> None:
        events = _events(self, app_sync)
        c = self.cluster({"MODE": "same"}, {"MODE": "same"})
        c.advance(3 * INTERVAL)
        self.assertEqual([e for e in events if e.get("event") == "app.conflict" and e["kind"] == "app"], [])


# -- fetches that change nothing (finding 7) ---------------------------------------


class SettledTests(SynchronousTestCase):
    """A peer whose state does not converge here (every item refused):
    fetched once per pair of digests, and again after ``RECHECK_AFTER``."""

    def setUp(self) -> None:
        self.c = c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("foo"))
        c.advance(INTERVAL)
        peer = c.agents["agent2"]
        summary = peer.local.summary
        self.digest = "f" * 32
        peer.local.summary = lambda: {**summary(), "apps": self.digest}
        handler = peer.srs.handler
        far = records.now_ms() + 2 * DAY_MS
        peer.srs.handler = lambda op, args: (
            [{"app": "foo", "broker": BROKER, "revision": far}] if op == "app_state" else handler(op, args)
        )
        self.calls = count_calls(c, "app_state")

    def fetched(self) -> int:
        return len([1 for caller, _peer in self.calls if caller == "agent1"])

    def test_not_fetched_again_while_both_digests_stay(self) -> None:
        self.c.advance(60)
        self.assertEqual(self.fetched(), 1)

    def test_fetched_again_once_the_peers_digest_changes(self) -> None:
        self.c.advance(20)
        self.digest = "e" * 32
        self.c.advance(3 * INTERVAL)
        self.assertEqual(self.fetched(), 2)

    def test_fetched_again_once_our_digest_changes(self) -> None:
        self.c.advance(20)
        self.c.agents["agent1"].local.app_put("bar")
        self.c.advance(3 * INTERVAL)
        self.assertEqual(self.fetched(), 2)

    def test_fetched_again_after_a_while(self) -> None:
        self.c.advance(app_sync.RECHECK_AFTER + 10)
        self.assertEqual(self.fetched(), 2)
