"""Fleet operations (issue 10) on the fake cluster: app-wide enable, disable
and restart (all at once and rolling), ``nowait`` on write routes, empty
form fields, and the owner's log of what a peer asked of it."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from scs.local import default_binding
from scs.records import WorkerStatus
from tests.test_api import Client
from tests.test_srs_hostile import Bus

READY_AFTER = 1.0  # seconds a restarted fake worker takes to answer a ping


class World:
    """The workers of every agent of a fake cluster: which answer pings now,
    and the fewest that answered at any moment."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.up: set[str] = set()
        self.known: set[str] = set()
        self.fewest_up: int | None = None
        self.restarts: list[tuple[float, str]] = []
        self.never_ready: set[str] = set()

    def _note(self) -> None:
        count = len(self.up & self.known)
        self.fewest_up = count if self.fewest_up is None else min(self.fewest_up, count)


class WorldSupervisor:
    """A supervisor whose restarts take a worker down for READY_AFTER
    seconds (forever for ``world.never_ready``)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.enabled_resets: list[str] = []

    def wake(self) -> Deferred:
        return succeed(None)

    def status(self, name: str) -> WorkerStatus:
        if name in self.world.up:
            return WorkerStatus(state="running", pid=1000 + len(self.world.restarts), restarts=0)
        return WorkerStatus(state="starting", pid=None, restarts=0)

    def hold_reconfigure(self, app: str, seconds: float) -> None:
        self.held = getattr(self, "held", []) + [(app, seconds)]

    def reset(self, name: str) -> None:
        self.enabled_resets.append(name)

    def restart(self, name: str) -> Deferred:
        self.world.restarts.append((self.world.clock.seconds(), name))
        self.world.up.discard(name)
        self.world._note()
        if name not in self.world.never_ready:
            self.world.clock.callLater(READY_AFTER, self._ready, name)
        return succeed(None)

    def _ready(self, name: str) -> None:
        self.world.up.add(name)

    def wait_ready(self, name: str, timeout: float) -> Deferred:
        d: Deferred = Deferred()

        def check(deadline: float) -> None:
            if name in self.world.up:
                d.callback(True)
            elif self.world.clock.seconds() >= deadline:
                d.callback(False)
            else:
                self.world.clock.callLater(0.1, check, deadline)

        check(self.world.clock.seconds() + timeout)
        return d

    def active_queues(self, name: str) -> Deferred:
        return succeed([f"dq.{name}"])

    def stats(self, name: str) -> Deferred:
        return succeed({})


class FleetCluster(Bus):
    """Three agents on the fake network, five instances of ``foo`` spread
    over them, every worker answering."""

    PLACES = {"w1": "agent1", "w2": "agent2", "w3": "agent3", "w4": "agent1", "w5": "agent2"}

    def __init__(self, test: SynchronousTestCase) -> None:
        super().__init__(test, "agent1", "agent2", "agent3")
        self.world = World(self.clock)
        for agent in self.agents.values():
            agent.local.supervisor = WorldSupervisor(self.world)
            agent.local.ready_timeout = 5.0
        self.finish(self.agents["agent1"].app_put("foo"))
        for name, agent_id in self.PLACES.items():
            self.finish(self.agents[agent_id].local.instance_create("foo", name, nowait=True))
            self.world.up.add(name)
            self.world.known.add(name)

    def finish(self, coroutine: Any, limit: float = 120.0) -> Any:
        """Run ``coroutine`` on the clock until it is done (bounded)."""
        d = defer.Deferred.fromCoroutine(coroutine)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        waited = 0.0
        while not outcome and waited < limit:
            self.clock.advance(0.05)
            waited += 0.05
        assert outcome, f"not done within {limit} s of fake time"
        if isinstance(outcome[0], Exception) or hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return outcome[0]


class AppWideOperationTests(SynchronousTestCase):
    def test_rolling_restart_replaces_one_at_a_time_across_agents(self) -> None:
        c = FleetCluster(self)
        c.world.fewest_up = None
        reply = c.finish(c.agents["agent3"].app_instances("foo", "restart", rolling=True))
        self.assertEqual(reply.body, {"instances": ["w1", "w2", "w3", "w4", "w5"], "failed": {}, "skipped": []})
        self.assertEqual([name for _, name in c.world.restarts], ["w1", "w2", "w3", "w4", "w5"])
        # Never more than one down: each restart waited for the previous one.
        self.assertEqual(c.world.fewest_up, 4)
        times = [t for t, _ in c.world.restarts]
        self.assertTrue(all(b - a >= READY_AFTER for a, b in zip(times, times[1:], strict=False)))
        self.assertEqual(c.world.up, set(c.PLACES))

    def test_a_worker_that_does_not_come_back_stops_the_roll(self) -> None:
        c = FleetCluster(self)
        c.world.never_ready.add("w2")
        reply = c.finish(c.agents["agent1"].app_instances("foo", "restart", rolling=True))
        self.assertEqual(reply.body["instances"], ["w1"])
        self.assertEqual(list(reply.body["failed"]), ["w2"])
        self.assertIn("did not answer a ping", reply.body["failed"]["w2"])
        self.assertEqual(reply.body["skipped"], ["w3", "w4", "w5"])
        self.assertEqual([name for _, name in c.world.restarts], ["w1", "w2"])

    def test_restart_all_at_once_drops_every_worker_together(self) -> None:
        c = FleetCluster(self)
        c.world.fewest_up = None
        reply = c.finish(c.agents["agent2"].app_instances("foo", "restart"))
        self.assertEqual(reply.body, {"instances": ["w1", "w2", "w3", "w4", "w5"], "failed": {}})
        times = [t for t, _ in c.world.restarts]
        self.assertLess(max(times) - min(times), READY_AFTER)
        self.assertEqual(c.world.fewest_up, 0)
        self.assertEqual(c.world.up, set(c.PLACES))

    def test_all_at_once_reports_the_workers_that_did_not_come_back(self) -> None:
        c = FleetCluster(self)
        c.world.never_ready.update({"w3", "w4"})
        reply = c.finish(c.agents["agent2"].app_instances("foo", "restart"))
        self.assertEqual(sorted(reply.body["failed"]), ["w3", "w4"])

    def test_disable_and_enable_every_instance_of_the_cluster(self) -> None:
        c = FleetCluster(self)
        reply = c.finish(c.agents["agent1"].app_instances("foo", "disable"))
        self.assertEqual(reply.body["instances"], ["w1", "w2", "w3", "w4", "w5"])
        for name, agent_id in c.PLACES.items():
            self.assertFalse(c.agents[agent_id].store.get_node(name).is_enabled)
        # A rolling restart leaves disabled instances alone.
        reply = c.finish(c.agents["agent1"].app_instances("foo", "restart", rolling=True))
        self.assertEqual(reply.body["instances"], [])
        self.assertEqual(c.world.restarts, [])
        reply = c.finish(c.agents["agent3"].app_instances("foo", "enable"))
        self.assertEqual(reply.body["instances"], ["w1", "w2", "w3", "w4", "w5"])
        for name, agent_id in c.PLACES.items():
            self.assertTrue(c.agents[agent_id].store.get_node(name).is_enabled)
            self.assertIn(name, c.agents[agent_id].local.supervisor.enabled_resets)

    def test_new_app_settings_roll_through_the_cluster(self) -> None:
        """Changing an app's settings restarts its workers one at a time,
        cluster-wide, each agent's supervisor holding back meanwhile."""
        c = FleetCluster(self)
        c.world.fewest_up = None
        reply = c.finish(c.agents["agent2"].app_put("foo", arguments=["--without-gossip"]))
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body["arguments"], ["--without-gossip"])
        self.assertEqual(reply.body["restarted"]["instances"], ["w1", "w2", "w3", "w4", "w5"])
        self.assertEqual([name for _, name in c.world.restarts], ["w1", "w2", "w3", "w4", "w5"])
        self.assertEqual(c.world.fewest_up, 4)
        for agent in c.agents.values():
            self.assertEqual(agent.store.get_app("foo").arguments, ("--without-gossip",))
            self.assertEqual([app for app, _ in agent.local.supervisor.held], ["foo"])
        # The same settings again: nothing to restart.
        reply = c.finish(c.agents["agent3"].app_put("foo", arguments=["--without-gossip"]))
        self.assertNotIn("restarted", reply.body)
        self.assertEqual(len(c.world.restarts), 5)

    def test_other_apps_are_not_touched(self) -> None:
        c = FleetCluster(self)
        c.finish(c.agents["agent2"].local.instance_create("bar", "other", nowait=True))
        c.finish(c.agents["agent1"].app_instances("foo", "disable"))
        self.assertTrue(c.agents["agent2"].store.get_node("other").is_enabled)

    def test_peers_answer_listings_and_queue_operations(self) -> None:
        """Regression: the owner's log check choked on peer operations
        without an instance or queue name (queue_list)."""
        c = FleetCluster(self)
        c.finish(c.agents["agent2"].queue_declare("foo", default_binding("tasks")))
        reply = c.finish(c.agents["agent1"].queue_list("foo"))
        self.assertEqual((reply.body, reply.missing), (["tasks"], ()))
        reply = c.finish(c.agents["agent3"].queue_operation("queue_get", "foo", "tasks"))
        self.assertEqual(reply.body["name"], "tasks")

    def test_unknown_app_is_404(self) -> None:
        c = FleetCluster(self)
        from scs.errors import NotFound

        with self.assertRaises(NotFound):
            c.finish(c.agents["agent1"].app_instances("nope", "restart", rolling=True))

    def test_what_a_peer_changes_is_logged_on_the_owner(self) -> None:
        """The seed's ``--> Node...`` / ``<-- ok=`` lines appear on the agent
        that owns the instance, not only on the one asked."""
        c = FleetCluster(self)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        c.finish(c.agents["agent1"].instance_operation("instance_disable", "w3", "foo"))
        starts = [e for e in events if e.get("event") == "operation.start" and e["operation"].startswith("Node.")]
        self.assertEqual(
            sorted((e["request"].split(":")[0], e["operation"]) for e in starts),
            [("agent1", "Node.instance_disable"), ("agent3", "Node.instance_disable")],
        )
        done = [e for e in events if e.get("event") == "operation" and e["request"].startswith("agent3:")]
        self.assertEqual(done[0]["status"], 200)
        # Listings are not logged on every peer.
        events.clear()
        c.finish(c.agents["agent1"].instance_list("foo"))
        self.assertEqual(
            [e["request"].split(":")[0] for e in events if e.get("event") == "operation.start"], ["agent1"]
        )


# -- through the API, one agent ------------------------------------------------


@pytest.fixture
def client() -> Client:
    from tests.test_api import RecordingSupervisor

    return Client(RecordingSupervisor())


def test_app_wide_routes(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1/")
    client.request("PUT", "/foo/instances/w2/")
    status, body, _ = client.request("POST", "/foo/restart/", params={"rolling": "1"})
    assert (status, body) == (200, {"instances": ["w1", "w2"], "failed": {}, "skipped": []})
    assert client.supervisor.restarts == ["w1", "w2"]
    status, body, _ = client.request("POST", "/foo/disable")
    assert (status, body) == (200, {"instances": ["w1", "w2"], "failed": {}})
    assert client.request("GET", "/foo/instances/w1/")[1]["is_enabled"] is False
    assert client.request("PUT", "/foo/enable/")[:2] == (200, {"instances": ["w1", "w2"], "failed": {}})
    assert client.request("POST", "/foo/restart")[:2] == (200, {"instances": ["w1", "w2"], "failed": {}})


@pytest.mark.parametrize(
    "path, params, parameter",
    [
        ("/foo/restart/", {"rolling": "maybe"}, "rolling"),
        ("/foo/restart/", {"bogus": "1"}, "bogus"),
        ("/foo/restart/", {"bogus": ""}, "bogus"),
        ("/foo/enable/", {"rolling": "1"}, "rolling"),
        ("/foo/disable/", {"nowait": "perhaps"}, "nowait"),
        ("/%20bad/restart/", {}, "app"),
    ],
)
def test_app_wide_routes_refuse_bad_input(client: Client, path: str, params: dict, parameter: str) -> None:
    client.request("PUT", "/foo/instances/w1/")
    before = client.store.dump()
    status, body, _ = client.request("POST", path, params=params)
    assert status == 400, body
    assert body["parameter"] == parameter
    assert client.store.dump() == before
    assert client.supervisor.restarts == []


def test_app_wide_route_of_an_unknown_app_is_404(client: Client) -> None:
    assert client.request("POST", "/nope/restart/", params={"rolling": "1"})[0] == 404


def test_nowait_answers_202_on_write_routes(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1/")
    for method, path in [
        ("POST", "/foo/restart/"),
        ("POST", "/foo/instances/w1/restart/"),
        ("POST", "/foo/instances/w1/disable/"),
        ("PUT", "/foo/queues/tasks/"),
        ("PUT", "/foo/instances/w1/queues/tasks/"),
        ("POST", "/foo/instances/w1/autoscale/?max=2"),
        ("PUT", "/foo/"),
        ("DELETE", "/foo/instances/w1/"),
    ]:
        separator = "&" if "?" in path else "?"
        status, _, _ = client.request(method, f"{path}{separator}nowait=1")
        assert status == 202, (method, path)
    assert not client.store.has_node("w1")


def test_nowait_still_refuses_bad_input_first(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1/")
    before = client.store.dump()
    status, body, _ = client.request("POST", "/foo/instances/w1/autoscale/?max=0&nowait=1")
    assert status == 400 and body["parameter"] == "max"
    status, body, _ = client.request("DELETE", "/foo/instances/nope/?nowait=1")
    assert status == 404
    assert client.store.dump() == before


def test_nowait_answers_before_a_slow_operation_ends(client: Client) -> None:
    """The answer does not wait for the restart: 202 while it runs."""
    pending: Deferred = Deferred()
    client.supervisor.restart = lambda name: pending
    client.request("PUT", "/foo/instances/w1/")
    status, body, _ = client.request("POST", "/foo/instances/w1/restart/", params={"nowait": "1"})
    assert (status, body) == (202, {"accepted": True})
    pending.callback(None)


def test_empty_form_fields_mean_not_given(client: Client) -> None:
    status, body, _ = client.request("PUT", "/foo/instances/w1/", data={"max_concurrency": "", "min_concurrency": ""})
    assert status == 201
    assert (body["max_concurrency"], body["min_concurrency"]) == (1, 1)
    status, body, _ = client.request("PUT", "/foo/instances/w2/?queues=&broker=&arguments=&max_concurrency=3")
    assert status == 201, body
    assert (body["queues"], body["max_concurrency"]) == ([], 3)
    # An app update with empty fields leaves the settings as they were.
    client.request("PUT", "/bar/", data={"celery_app": "proj", "arguments": "-O fair"})
    status, body, _ = client.request("POST", "/bar/", data={"celery_app": "", "arguments": "", "broker": ""})
    assert status == 200
    assert (body["celery_app"], body["arguments"]) == ("proj", ["-O", "fair"])
    # An unknown parameter is named even when empty.
    status, body, _ = client.request("PUT", "/foo/instances/w3/", params={"bogus": ""})
    assert (status, body["parameter"]) == (400, "bogus")
    # A JSON body says what it means: "" there is a bad value.
    status, body, _ = client.request("PUT", "/foo/instances/w3/", json={"max_concurrency": ""})
    assert (status, body["parameter"]) == (400, "max_concurrency")


def test_a_bare_flag_is_true_and_an_empty_one_not_given(client: Client) -> None:
    status, _, _ = client.request("PUT", "/foo/instances/w1/?nowait")
    assert status == 202
    status, _, _ = client.request("PUT", "/foo/instances/w2/?nowait=")
    assert status == 201
    status, body, _ = client.request("GET", "/foo/instances/?details")
    assert status == 200 and isinstance(body[0], dict)


def test_autoscale_takes_max_or_min_alone(client: Client) -> None:
    client.request("PUT", "/foo/instances/w1/", params={"max_concurrency": "4", "min_concurrency": "2"})
    assert client.request("POST", "/foo/instances/w1/autoscale/", data={"max": "6", "min": ""})[1] == {
        "max": 6,
        "min": 2,
    }
    assert client.request("POST", "/foo/instances/w1/autoscale/", data={"min": "3"})[1] == {"max": 6, "min": 3}
    status, body, _ = client.request("POST", "/foo/instances/w1/autoscale/", data={"min": "7"})
    assert (status, body["parameter"]) == (400, "min")
    status, body, _ = client.request("POST", "/foo/instances/w1/autoscale/", data={"max": "2"})
    assert (status, body["parameter"]) == (400, "max")
    status, body, _ = client.request("POST", "/foo/instances/w1/autoscale/", data={"min": "", "max": ""})
    assert status == 400 and body["parameter"] == "max"
    assert client.request("GET", "/foo/instances/w1/autoscale/")[1] == {"max": 6, "min": 3}
