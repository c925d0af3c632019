"""Issue 13 on the fake cluster and a Clock: queue-depth autoscaling of an
app's instances.  The policy (stored, replicated, checked at every door),
the decisions (target, clamping, scale-down only after ``scale_down_after``,
one step per interval, never a busy worker), only the coordinator deciding,
a takeover when it dies, the API, the admin page, the metrics and ``scs``."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from scs import validation as v
from scs.agent import Agent, LocalAgent
from scs.autoscaling import Autoscaler, target_for
from scs.errors import BadParameter
from scs.metrics import AgentMetrics
from scs.operation_args import check_operation
from scs.records import AutoscalingPolicy
from scs.store import Store
from scs.testing import FakeControl
from tests.test_failover import Cluster
from tests.test_srs_hostile import BROKER

STEP = 1.0  # the autoscaler's interval in these tests
APP = "foo"
QUEUE = "work"
POLICY = {"queue": QUEUE, "min_instances": 1, "max_instances": 4, "messages_per_instance": 10, "scale_down_after": 5}


class ScalingCluster(Cluster):
    """The failover tests' cluster with an autoscaler on every agent, all
    asking the one FakeControl (``control.broker_queues`` is the broker)."""

    def __init__(self, test: SynchronousTestCase, *ids: str) -> None:
        self.scalers: dict[str, Autoscaler] = {}
        super().__init__(test, *ids)

    def add(self, agent_id: str, *args: Any, **kwargs: Any) -> Agent:
        agent = super().add(agent_id, *args, **kwargs)
        scaler = Autoscaler(agent, self.control, self.clock, interval=STEP)
        scaler.startService()
        self.test.addCleanup(lambda: scaler.running and scaler.stopService())
        self.scalers[agent_id] = scaler
        return agent

    def kill(self, agent_id: str) -> None:
        super().kill(agent_id)
        self.scalers[agent_id].stopService()  # a dead process decides nothing

    def depth(self, messages: int, consumers: int = 0) -> None:
        self.control.broker_queues[QUEUE] = {"messages": messages, "consumers": consumers}

    def instances(self, alive_only: bool = True) -> dict[str, str]:
        """Instance -> agent, for the agents that still run."""
        found = {}
        for agent_id, node in self.nodes.items():
            if alive_only and not node.agent.srs.is_connected():
                continue
            for name in node.names:
                found[name] = agent_id
        return found

    def workers_up(self, busy: tuple[str, ...] = ()) -> None:
        """Every instance's worker answers; those in ``busy`` run a task."""
        for name, agent_id in self.instances().items():
            node = f"{name}@{agent_id}"
            if node not in self.control.nodes:
                self.control.up(node)
            self.control.nodes[node]["active"] = ["task-1"] if name in busy else []

    def set_policy(self, through: str = "agent1", **changes: Any) -> Any:
        return self.run(self.agents[through].autoscaling_put(APP, v.check_policy_fields({**POLICY, **changes})))


@pytest.fixture
def events() -> Any:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("event", "")).startswith("autoscale."):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def decisions(events: list[dict[str, Any]], kind: str = "autoscale.decision") -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


# -- the target ------------------------------------------------------------------


def test_target_is_ceil_of_messages_per_instance_within_the_bounds() -> None:
    policy = AutoscalingPolicy(APP, QUEUE, min_instances=1, max_instances=4, messages_per_instance=10)
    assert [target_for(policy, m) for m in (0, 1, 10, 11, 20, 21, 39, 40, 41, 60, 10**6, -5)] == [
        1,
        1,
        1,
        2,
        2,
        3,
        4,
        4,
        4,
        4,
        4,
        1,
    ]
    assert target_for(AutoscalingPolicy(APP, QUEUE, 3, 3, 1), 0) == 3


# -- decisions on the fake cluster ------------------------------------------------------


class Decisions(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if str(event.get("event", "")).startswith("autoscale."):
                cluster = getattr(self, "c", None)
                self.seen.append({**event, "at": None if cluster is None else cluster.clock.seconds()})

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.c = ScalingCluster(self, "agent1", "agent2")
        self.c.run(self.c.agents["agent1"].app_put(APP))
        self.c.run(self.c.agents["agent1"].queue_declare(APP, v.queue_binding(QUEUE, {})))
        self.c.depth(0)

    def decisions(self, agent: str | None = None) -> list[dict[str, Any]]:
        return [e for e in decisions(self.seen) if agent is None or e["agent"] == agent]

    def test_the_policy_is_stored_on_every_agent_and_the_minimum_is_created(self) -> None:
        c = self.c
        reply = c.set_policy()
        self.assertEqual(reply.status, 201)
        self.assertEqual(reply.body, {"app": APP, **POLICY, "scale_down_after": 5.0})
        for agent_id in ("agent1", "agent2"):
            self.assertEqual(c.stores[agent_id].policies.get(APP).max_instances, 4)
        c.advance(STEP + 0.1)
        self.assertEqual(len(c.instances()), 1)
        (instance,) = [spec for store in c.stores.values() for spec in store.list_nodes(APP)]
        self.assertEqual(instance.queue_names, (QUEUE,))
        (up,) = self.decisions()
        self.assertEqual((up["direction"], up["instances"], up["target"], up["messages"]), ("up", 0, 1, 0))

    def test_a_burst_reaches_the_target_in_one_interval_clamped_to_max(self) -> None:
        c = self.c
        c.set_policy()
        c.advance(STEP + 0.1)
        c.depth(60, consumers=1)
        c.advance(STEP)
        self.assertEqual(len(c.instances()), 4)  # ceil(60 / 10) = 6, clamped to 4
        up = self.decisions()[-1]
        self.assertEqual(
            {k: up[k] for k in ("direction", "instances", "target", "messages", "consumers", "agent")},
            {"direction": "up", "instances": 1, "target": 4, "messages": 60, "consumers": 1, "agent": "agent1"},
        )
        self.assertEqual(len(up["changed"]), 3)
        # More messages: still 4.
        c.depth(10_000)
        c.advance(3 * STEP)
        self.assertEqual(len(c.instances()), 4)
        # Placement spreads them over both agents (random, seeded here).
        self.assertEqual(set(c.instances().values()), {"agent1", "agent2"})
        # A medium depth keeps what is there (no scale-down while not low).
        c.depth(35)
        c.advance(20 * STEP)
        self.assertEqual(len(c.instances()), 4)

    def test_scale_down_waits_scale_down_after_then_one_step_per_interval(self) -> None:
        c = self.c
        c.set_policy()
        c.depth(60)
        c.advance(2 * STEP + 0.1)
        self.assertEqual(len(c.instances()), 4)
        c.workers_up()
        c.depth(0)
        counts = []
        for _ in range(12):
            c.advance(STEP)
            counts.append(len(c.instances()))
        # Low from the first look; 5 s later one step per interval, down to min.
        self.assertEqual(counts, [4, 4, 4, 4, 4, 3, 2, 1, 1, 1, 1, 1])
        downs = [d for d in self.decisions() if d["direction"] == "down"]
        self.assertEqual(
            [(d["instances"], d["target"], d["messages"]) for d in downs], [(4, 1, 0), (3, 1, 0), (2, 1, 0)]
        )

    def test_a_rise_resets_the_low_timer(self) -> None:
        c = self.c
        c.set_policy()
        c.depth(60)
        c.advance(2 * STEP + 0.1)
        c.workers_up()
        c.depth(0)
        c.advance(4 * STEP)
        c.depth(40)  # target 4 again: not low
        c.advance(STEP)
        c.depth(0)
        c.advance(4 * STEP)
        self.assertEqual(len(c.instances()), 4)  # the 5 s start again
        c.advance(2 * STEP)
        self.assertEqual(len(c.instances()), 3)

    def test_a_busy_worker_is_never_chosen(self) -> None:
        c = self.c
        c.set_policy(scale_down_after=0)
        c.depth(60)
        c.advance(2 * STEP + 0.1)
        names = sorted(c.instances())
        idle = names[2]
        c.workers_up(busy=tuple(n for n in names if n != idle))
        c.depth(0)
        c.advance(STEP)
        self.assertNotIn(idle, c.instances())
        self.assertEqual(len(c.instances()), 3)
        # Every worker busy: no step, and the decision says why.
        c.advance(3 * STEP)
        self.assertEqual(len(c.instances()), 3)
        status = c.run(c.agents["agent2"].autoscaling_get(APP)).body["decision"]
        self.assertEqual((status["direction"], status["agent"]), ("hold", "agent1"))
        self.assertIn("every worker runs a task", status["reason"])
        # Workers that do not answer are not idle either.
        c.control.nodes.clear()
        c.advance(3 * STEP)
        self.assertEqual(len(c.instances()), 3)
        # Once they are done, the steps go on.
        c.workers_up()
        c.advance(3 * STEP)
        self.assertEqual(len(c.instances()), 1)

    def test_only_the_coordinator_decides(self) -> None:
        c = self.c
        c.set_policy(through="agent2")
        c.depth(60)
        c.advance(5 * STEP)
        c.workers_up()
        c.depth(0)
        c.advance(10 * STEP)
        self.assertTrue(self.decisions())
        self.assertEqual({d["agent"] for d in self.decisions()}, {"agent1"})
        self.assertTrue(c.scalers["agent1"].deciding)
        self.assertFalse(c.scalers["agent2"].deciding)
        # One broker round trip per policy and interval, from the decider alone.
        c.control.calls.clear()
        c.advance(3 * STEP)
        self.assertEqual(c.control.count("queue_stats"), 3)

    def test_another_agent_takes_over_within_an_interval_when_the_decider_dies(self) -> None:
        c = self.c
        c.set_policy()
        c.depth(60)
        c.advance(2 * STEP + 0.1)
        self.assertEqual(len(c.instances()), 4)
        on_agent1 = sorted(n for n, a in c.instances().items() if a == "agent1")
        on_agent2 = sorted(n for n, a in c.instances().items() if a == "agent2")
        self.assertTrue(on_agent1 and on_agent2)  # the seeded placement used both
        c.workers_up()
        c.advance(3 * STEP)  # agent2's copy of agent1's instances is current
        c.depth(0)
        killed = c.clock.seconds()
        c.kill("agent1")
        # Known dead within about a second; agent2 decides from its next interval.
        c.advance(2 * STEP + 0.1)
        leaders = [(e["agent"], e["at"]) for e in self.seen if e["event"] == "autoscale.leader"]
        self.assertEqual([agent for agent, _ in leaders], ["agent1", "agent2"])
        taken_over = leaders[-1][1]
        self.assertLessEqual(taken_over - killed, 2 * STEP)
        self.assertTrue(c.scalers["agent2"].deciding)
        # The dead agent's instances are counted (their workers may still
        # run) but cannot be removed: agent2 removes its own, one per interval.
        c.advance(12 * STEP)
        downs = [d for d in self.decisions("agent2") if d["direction"] == "down"]
        self.assertEqual(len(downs), len(on_agent2))
        self.assertEqual(downs[0]["instances"], 4)
        self.assertEqual(sorted(c.instances()), [])
        self.assertEqual(c.scalers["agent2"].decisions[APP]["instances"], len(on_agent1))
        # Its low timer started afresh when it took over: the first step
        # came scale_down_after (5 s) later, not before.
        self.assertGreaterEqual(downs[0]["at"] - taken_over, 5 - 0.1)

    def test_a_new_agent_copies_the_policies(self) -> None:
        c = self.c
        c.set_policy()
        c.add("agent3")
        c.settle()
        c.advance(3 * STEP)
        self.assertEqual(
            c.stores["agent3"].policies.get(APP).to_json(), {"app": APP, **POLICY, "scale_down_after": 5.0}
        )

    def test_delete_stops_the_scaling_and_keeps_the_instances(self) -> None:
        c = self.c
        c.set_policy()
        c.depth(60)
        c.advance(2 * STEP + 0.1)
        reply = c.run(c.agents["agent2"].autoscaling_delete(APP))
        self.assertEqual(reply.body, {"ok": "ok", "app": APP})
        for store in c.stores.values():
            self.assertIsNone(store.policies.get(APP))
        c.workers_up()
        c.depth(0)
        c.advance(20 * STEP)
        self.assertEqual(len(c.instances()), 4)
        self.assertIn("autoscale.forgotten", {e["event"] for e in self.seen})

    def test_no_depth_no_decision(self) -> None:
        c = self.c
        c.set_policy()
        c.control.broker_up = False
        c.advance(3 * STEP)
        self.assertEqual(c.instances(), {})
        self.assertIn("autoscale.no_depth", {e["event"] for e in self.seen})
        c.control.broker_up = True
        c.advance(STEP)
        self.assertEqual(len(c.instances()), 1)


# -- bad policies: a 400 naming the field, nothing stored ---------------------------------


def single_agent(control: FakeControl | None = None) -> tuple[Agent, Store]:
    store = Store.in_memory()
    local = LocalAgent(store, "agent1", BROKER, control=control or FakeControl())
    agent = Agent(local)
    return agent, store


BAD_POLICIES: list[tuple[dict[str, Any], str]] = [
    ({**POLICY, "min_instances": 5, "max_instances": 4}, "min_instances"),
    ({**POLICY, "max_instances": 0}, "max_instances"),
    ({**POLICY, "max_instances": -2}, "max_instances"),
    ({**POLICY, "min_instances": 0}, "min_instances"),
    ({**POLICY, "min_instances": -1}, "min_instances"),
    ({**POLICY, "messages_per_instance": 0}, "messages_per_instance"),
    ({**POLICY, "messages_per_instance": -10}, "messages_per_instance"),
    ({**POLICY, "messages_per_instance": "ten"}, "messages_per_instance"),
    ({**POLICY, "scale_down_after": -1}, "scale_down_after"),
    ({**POLICY, "scale_down_after": "NaN"}, "scale_down_after"),
    ({**POLICY, "scale_down_after": True}, "scale_down_after"),
    ({**POLICY, "max_instances": 10**6}, "max_instances"),
    ({**POLICY, "queue": "unknown-queue"}, "queue"),
    ({**POLICY, "queue": "dq.w1"}, "queue"),
    ({**POLICY, "queue": "a b"}, "queue"),
    ({k: val for k, val in POLICY.items() if k != "queue"}, "queue"),
    ({k: val for k, val in POLICY.items() if k != "max_instances"}, "max_instances"),
    ({**POLICY, "colour": "red"}, "colour"),
]


class API(SynchronousTestCase):
    def setUp(self) -> None:
        from tests.test_api_bad_input import Harness

        self.h = Harness()  # app1 with queue q1, a policy on it, instance w1

    def test_bad_policies_are_400_naming_the_field_and_change_nothing(self) -> None:
        # A first policy: every field is checked, and the required ones asked for.
        self.assertEqual(self.h.request("DELETE", "/app1/autoscaling/").status, 200)
        for body, field in BAD_POLICIES:
            if body.get("queue") == QUEUE:
                body = {**body, "queue": "q1"}  # the harness's declared queue
            before = self.h.dump()
            for method in ("PUT", "POST"):
                response = self.h.json_request(method, "/app1/autoscaling/", body)
                self.assertEqual(response.status, 400, (body, response))
                self.assertEqual(response.json().get("parameter"), field, (body, response.json()))
                self.assertEqual(self.h.dump(), before, body)
        # The good one is stored.
        response = self.h.json_request("PUT", "/app1/autoscaling/", {**POLICY, "queue": "q1"})
        self.assertEqual(response.status, 201, response)

    def test_form_fields_name_the_bad_one_too(self) -> None:
        before = self.h.dump()
        response = self.h.request("PUT", "/app1/autoscaling/?min_instances=9")  # above the stored max 4
        self.assertEqual((response.status, response.json()["parameter"]), (400, "min_instances"))
        response = self.h.request("PUT", "/app1/autoscaling/?max_instances=0")
        self.assertEqual((response.status, response.json()["parameter"]), (400, "max_instances"))
        self.assertEqual(self.h.dump(), before)

    def test_put_get_delete(self) -> None:
        h = self.h
        response = h.json_request("PUT", "/app1/autoscaling/", {"max_instances": 6, "scale_down_after": "2.5"})
        self.assertEqual(response.status, 200)
        self.assertEqual(
            response.json(),
            {
                "app": "app1",
                "queue": "q1",
                "min_instances": 1,
                "max_instances": 6,
                "messages_per_instance": 10,
                "scale_down_after": 2.5,
            },
        )
        got = h.request("GET", "/app1/autoscaling/").json()
        self.assertEqual(got["max_instances"], 6)
        self.assertIsNone(got["decision"])
        self.assertEqual(h.request("DELETE", "/app1/autoscaling/").json(), {"ok": "ok", "app": "app1"})
        self.assertEqual(h.request("GET", "/app1/autoscaling/").status, 404)
        self.assertEqual(h.request("DELETE", "/app1/autoscaling/").status, 404)
        self.assertEqual(h.request("GET", "/nosuchapp/autoscaling/").status, 404)
        self.assertEqual(h.request("PUT", "/nosuchapp/autoscaling/?queue=q1&max_instances=2").status, 404)
        # A queue on the broker alone is known.
        h.api.agent.local.control.broker_queues["celery"] = {"messages": 0, "consumers": 1}
        response = h.request("PUT", "/app1/autoscaling/?queue=celery&max_instances=3")
        self.assertEqual(response.status, 201)
        # Deleting the app deletes its policy.
        h.request("DELETE", "/app1/")
        self.assertEqual(h.dump()["autoscaling_policy"], [])

    def test_a_broker_that_cannot_say_is_503(self) -> None:
        self.h.api.agent.local.control.broker_up = False
        before = self.h.dump()
        response = self.h.request("PUT", "/app1/autoscaling/?queue=elsewhere")
        self.assertEqual(response.status, 503)
        self.assertEqual(self.h.dump(), before)


def test_peers_requests_pass_the_same_checks() -> None:
    clean = check_operation("autoscaling_put", {"app": APP, **POLICY})
    assert clean == {"app": APP, **POLICY, "scale_down_after": 5.0}
    for body, field in BAD_POLICIES:
        if field == "queue" and body.get("queue") == "unknown-queue":
            continue  # whether a queue exists is the API's question, asked once
        with pytest.raises(BadParameter) as caught:
            check_operation("autoscaling_put", {"app": APP, **body})
        assert caught.value.details.get("parameter") == field, body


# -- metrics, admin page, scs ------------------------------------------------------------


def test_metrics_count_decisions_and_show_the_target() -> None:
    metrics = AgentMetrics()
    observe = metrics.observer
    observe({"event": "autoscale.target", "app": APP, "target": 4})
    observe({"event": "autoscale.decision", "app": APP, "direction": "up"})
    observe({"event": "autoscale.decision", "app": APP, "direction": "down"})
    observe({"event": "autoscale.decision", "app": APP, "direction": "down"})
    text = metrics.render().decode()
    assert 'scs_autoscale_decisions_total{app="foo",direction="up"} 1.0' in text
    assert 'scs_autoscale_decisions_total{app="foo",direction="down"} 2.0' in text
    assert 'scs_autoscale_target{app="foo"} 4.0' in text
    observe({"event": "autoscale.forgotten", "app": APP})
    assert 'scs_autoscale_target{app="foo"}' not in metrics.render().decode()


def test_admin_page_shows_and_sets_the_policy() -> None:
    from tests.surfaces_support import Surfaces

    s = Surfaces()
    s.store.put_app("app1", BROKER)
    s.store.declare_queue("app1", v.queue_binding("q1", {}), BROKER)
    page = s.page()
    assert "No autoscaling policies." in page.text
    response = s.submit(
        "autoscaling",
        {
            "app": "app1",
            "queue": "q1",
            "min_instances": "",
            "max_instances": "3",
            "messages_per_instance": "",
            "scale_down_after": "9",
        },
    )
    assert response.code == 303, response.text
    policy = s.store.policies.get("app1")
    assert (policy.queue, policy.min_instances, policy.max_instances, policy.scale_down_after) == ("q1", 1, 3, 9.0)
    page = s.page()
    assert 'data-app="app1"' in page.text and "no decision yet" in page.text
    # A bad one shows the error and stores nothing.
    response = s.submit("autoscaling", {"app": "app1", "min_instances": "5"})
    assert response.code == 400 and "min_instances" in response.text
    assert s.store.policies.get("app1").min_instances == 1
    response = s.submit("autoscaling/delete", {"app": "app1"})
    assert response.code == 303
    assert s.store.policies.get("app1") is None


def test_scs_autoscaling_command() -> None:
    from scs.cli import cli

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeClient:
        def autoscaling(self, app: str) -> dict[str, Any]:
            calls.append(("get", {"app": app}))
            return {
                "app": app,
                **POLICY,
                "decision": {
                    "agent": "agent1",
                    "direction": "hold",
                    "messages": 3,
                    "instances": 1,
                    "target": 1,
                    "reason": "",
                },
            }

        def set_autoscaling(self, app: str, **fields: Any) -> dict[str, Any]:
            calls.append(("set", {"app": app, **fields}))
            return {"app": app, **POLICY}

        def delete_autoscaling(self, app: str) -> dict[str, Any]:
            calls.append(("delete", {"app": app}))
            return {"ok": "ok", "app": app}

    import scs.cli as cli_module

    original = cli_module.Session.client
    cli_module.Session.client = lambda self: FakeClient()  # type: ignore[method-assign]
    try:
        runner = CliRunner()
        result = runner.invoke(cli, ["autoscaling", APP])
        assert result.exit_code == 0, result.output
        assert "target 1" in result.output
        result = runner.invoke(
            cli, ["autoscaling", APP, "-q", QUEUE, "--min", "1", "--max", "4", "--per", "10", "--down-after", "5"]
        )
        assert result.exit_code == 0, result.output
        assert calls[-1] == (
            "set",
            {
                "app": APP,
                "queue": QUEUE,
                "min_instances": 1,
                "max_instances": 4,
                "messages_per_instance": 10,
                "scale_down_after": 5.0,
            },
        )
        result = runner.invoke(cli, ["autoscaling", APP, "--delete"])
        assert result.exit_code == 0 and calls[-1] == ("delete", {"app": APP})
        # Usage errors send nothing.
        before = len(calls)
        for argv in (
            ["--max", "0"],
            ["--min", "5", "--max", "2"],
            ["--per", "0"],
            ["--down-after", "-1"],
            ["--delete", "--max", "3"],
            ["-q", "dq.x"],
        ):
            result = runner.invoke(cli, ["autoscaling", APP, *argv])
            assert result.exit_code == 2, (argv, result.output)
        assert len(calls) == before
    finally:
        cli_module.Session.client = original  # type: ignore[method-assign]
