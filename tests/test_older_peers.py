"""A rolling upgrade: the agents of the version before app convergence
(``scs.app_sync``) refuse the ``revision`` of app and policy changes (an
unknown parameter) and advertise no apps digest.  They are sent the
arguments they understand (``Peers.arguments_for``), and a peer that
refuses a change anyway is named in the reply's missing agents and logged,
on the fake network and a Clock."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import peers, validation as v
from scs.errors import BadParameter, Unavailable
from tests.test_app_convergence import AppCluster
from tests.test_autoscaling import POLICY as FIELDS
from tests.test_srs_hostile import INTERVAL


def older(c: AppCluster, agent_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Make ``agent_id`` an agent of the version before: no ``app_state``,
    no ``revision`` argument, no app sync, no apps digest in its heartbeat.
    Returns the requests it ran."""
    agent = c.agents[agent_id]
    handler = agent.srs.handler
    ran: list[tuple[str, dict[str, Any]]] = []

    def old(operation: str, arguments: dict[str, Any]) -> Any:
        if operation == "app_state":
            raise BadParameter(f"unknown operation {operation}", parameter="operation")
        if "revision" in arguments:
            raise BadParameter("unknown parameter revision", parameter="revision")
        ran.append((operation, arguments))
        return handler(operation, arguments)

    agent.srs.handler = old
    c.nodes[agent_id].app_sync_service.stopService()
    summary = agent.local.summary
    agent.local.summary = lambda: {k: w for k, w in summary().items() if k != "apps"}
    c.advance(2 * INTERVAL)
    return ran


class OlderPeerTests(SynchronousTestCase):
    def test_an_older_peer_gets_changes_and_deletions_without_a_revision(self) -> None:
        c = AppCluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("bar"))
        c.advance(INTERVAL)
        ran = older(c, "agent2")
        reply = c.run(c.agents["agent1"].app_put("bar", env={"MODE": "new"}))
        self.assertEqual(reply.missing, ())
        self.assertEqual(c.stores["agent2"].get_app("bar").env, (("MODE", "new"),))
        # A current peer gets the change with its revision.
        revision = c.stores["agent1"].get_app("bar").revision
        self.assertEqual(c.stores["agent3"].get_app("bar").revision, revision)
        reply = c.run(c.agents["agent1"].app_delete("bar"))
        self.assertEqual(reply.missing, ())
        self.assertFalse(c.stores["agent2"].has_app("bar"))
        self.assertEqual([op for op, _ in ran if op.startswith("app_")], ["app_put", "app_delete"])
        self.assertTrue(all("revision" not in arguments for _, arguments in ran))

    def test_an_app_created_reaches_an_older_peer(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        older(c, "agent2")
        reply = c.run(c.agents["agent1"].app_put("baz", env={"A": "1"}))
        self.assertEqual(reply.status, 201)
        c.advance(1)
        self.assertEqual(c.stores["agent2"].get_app("baz").env, (("A", "1"),))

    def test_an_older_peer_gets_policy_changes_and_deletions(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        c.run(c.agents["agent1"].app_put("baz"))
        c.run(c.agents["agent1"].queue_declare("baz", v.queue_binding("jobs", {})))
        c.advance(INTERVAL)
        older(c, "agent2")
        fields = v.check_policy_fields({**FIELDS, "queue": "jobs", "max_instances": 3})
        reply = c.run(c.agents["agent1"].autoscaling_put("baz", fields))
        self.assertEqual(reply.missing, ())
        self.assertEqual(c.stores["agent2"].policies.get("baz").max_instances, 3)
        reply = c.run(c.agents["agent1"].autoscaling_delete("baz"))
        self.assertEqual(reply.missing, ())
        self.assertIsNone(c.stores["agent2"].policies.get("baz"))

    def test_a_peer_that_refuses_a_change_is_missing_and_logged(self) -> None:
        events: list[dict[str, Any]] = []
        self.patch(peers, "log", Logger(namespace="scs.peers", observer=events.append))
        c = AppCluster(self, "agent1", "agent2", "agent3")
        c.run(c.agents["agent1"].app_put("bar"))
        c.advance(INTERVAL)
        handler = c.agents["agent2"].srs.handler

        def refusing(operation: str, arguments: dict[str, Any]) -> Any:
            if operation in ("app_put", "app_delete"):
                raise Unavailable("busy")
            return handler(operation, arguments)

        c.agents["agent2"].srs.handler = refusing
        reply = c.run(c.agents["agent1"].app_put("bar", env={"MODE": "new"}))
        self.assertEqual(reply.missing, ("agent2",))
        reply = c.run(c.agents["agent1"].app_delete("bar"))
        self.assertEqual(reply.missing, ("agent2",))
        refused = [(e["agent"], e["operation"]) for e in events if e.get("event") == "peers.change.refused"]
        self.assertEqual(refused, [("agent2", "app_put"), ("agent2", "app_delete")])

    def test_the_arguments_a_peer_understands_come_from_its_heartbeat(self) -> None:
        c = AppCluster(self, "agent1", "agent2")
        arguments = {"app": "bar", "revision": 5}
        agent_peers = c.agents["agent1"].peers
        self.assertEqual(agent_peers.arguments_for("agent2", arguments), arguments)
        older(c, "agent2")
        self.assertEqual(agent_peers.arguments_for("agent2", arguments), {"app": "bar"})
        self.assertEqual(agent_peers.arguments_for("unknown", arguments), {"app": "bar"})
