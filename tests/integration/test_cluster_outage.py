"""Issue 4, acceptance 7: the cluster through a RabbitMQ restart.

Runs on a private RabbitMQ node, never the shared one."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.integration.agents import AgentProcess, kill_leftover_workers, wait_until
from tests.integration.rabbitmq_node import PrivateRabbitMQ, available

HEARTBEAT = 2.0


@pytest.mark.skipif(not available(), reason="needs rabbitmq-server installed and root")
def test_agents_reconnect_after_a_broker_restart(tmp_path: Path) -> None:
    broker = PrivateRabbitMQ(tmp_path)
    broker.start()
    cluster = f"outage-{uuid.uuid4().hex[:8]}"
    agents = [
        AgentProcess(
            tmp_path / f"agent{i}",
            f"agent{i}",
            "--cluster",
            cluster,
            "-b",
            broker.url,
            "--interval",
            "1",
        )
        for i in (1, 2, 3)
    ]
    ids = {"agent1", "agent2", "agent3"}

    def alive(agent: AgentProcess) -> set[str]:
        return {m["id"] for m in agent.request("GET", "/agents/")[1] if m["alive"]}

    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_until(lambda: alive(agent) == ids, 2 * HEARTBEAT + 5, what="membership")
        # One instance per agent: listings have something from each.
        for agent in agents:
            status, body, _ = agent.request("PUT", f"/foo/instances/{agent.agent_id}-w", {"nowait": True})
            assert status in (201, 202), body
        names = {f"{a.agent_id}-w" for a in agents}
        owners = {n: agents[0].request("GET", f"/foo/instances/{n}")[1]["agent"] for n in names}

        broker.stop()
        agent1 = agents[0]
        # (this agent itself shows not alive while it is cut off from the cluster)
        wait_until(lambda: alive(agent1) <= {"agent1"}, 10, what="peers to be unreachable")
        # Local operations keep working; listings answer with local results
        # and name the agents they could not ask.
        started = time.monotonic()
        status, listed, headers = agent1.request("GET", "/foo/instances/")
        assert time.monotonic() - started < 5
        assert status == 200
        assert set(listed) == {n for n, owner in owners.items() if owner == "agent1"}
        assert set(headers["X-SCS-Missing-Agents"].split(",")) == {"agent2", "agent3"}
        local_names = [n for n, owner in owners.items() if owner == "agent1"]
        for name in local_names:
            assert agent1.request("POST", f"/foo/instances/{name}/autoscale", {"max": 2})[0] == 200
        assert agent1.request("PUT", "/foo/queues/during-outage")[0] == 201

        broker.start()
        for agent in agents:
            wait_until(lambda: alive(agent) == ids, 60, what="the cluster to be whole again")
        for agent in agents:
            status, listed, headers = agent.request("GET", "/foo/instances/")
            assert sorted(listed) == sorted(names)
            assert "X-SCS-Missing-Agents" not in headers
        assert "during-outage" in agents[2].request("GET", "/foo/queues/")[1]
    finally:
        for agent in agents:
            agent.stop()
            kill_leftover_workers(agent.directory)
        broker.destroy()
