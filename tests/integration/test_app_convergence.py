"""Apps converge on the real broker (scs.app_sync): an agent stopped while
an app changed and another was deleted has both within a few heartbeats of
starting again."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.integration.agents import AgentProcess, kill_leftover_workers, wait_until

HEARTBEAT = 2.0  # SRS's default heartbeat period


def alive(agent: AgentProcess) -> set[str]:
    return {m["id"] for m in agent.request("GET", "/agents/")[1] if m["alive"]}


def test_an_agent_back_from_a_stop_gets_the_changes_it_missed(tmp_path: Path) -> None:
    cluster = f"apps-{uuid.uuid4().hex[:8]}"
    agents = [
        AgentProcess(tmp_path / f"agent{i}", f"agent{i}", "--cluster", cluster, "--interval", "1") for i in (1, 2, 3)
    ]
    agent1, _agent2, agent3 = agents
    ids = {"agent1", "agent2", "agent3"}
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_until(lambda: alive(agent) == ids, 2 * HEARTBEAT + 5, what="membership")
        assert agent1.request("PUT", "/foo/", {"env": {"MODE": "old"}})[0] == 201
        assert agent1.request("PUT", "/bar/")[0] == 201
        for agent in agents:
            wait_until(lambda: agent.request("GET", "/foo/")[1]["env"] == {"MODE": "old"}, 10, what="foo everywhere")
            wait_until(lambda: "bar" in agent.request("GET", "/")[1], 10, what="bar everywhere")

        agent3.stop()
        wait_until(lambda: "agent3" not in alive(agent1), 3 * HEARTBEAT + 5, what="agent3 to be dead")
        status, body, _ = agent1.request("PUT", "/foo/", {"env": {"MODE": "new"}})
        assert status == 200, body
        assert agent1.request("DELETE", "/bar/")[0] == 200

        agent3.start()
        # Within a few heartbeats of its return, whichever side fetches.
        wait_until(
            lambda: agent3.request("GET", "/foo/")[1]["env"] == {"MODE": "new"},
            3 * HEARTBEAT + 10,
            what="agent3 to have foo's new env",
        )
        for agent in agents:
            wait_until(lambda: agent.request("GET", "/")[1] == ["foo"], 3 * HEARTBEAT + 10, what="bar gone")
            assert agent.request("GET", "/bar/")[0] == 404
        assert "app bar deleted as" in agent3.log_text()  # agent3 merged the deletion itself
    finally:
        for agent in agents:
            agent.stop()
            kill_leftover_workers(agent.directory)
