"""Issue 4: three agents on the real RabbitMQ act as one cluster."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.agents import (
    AgentProcess,
    kill_leftover_workers,
    pid_alive,
    wait_until,
    worker_pids,
)
from tests.integration.celery_probe import active_queues, ping

HEARTBEAT = 2.0  # SRS's default heartbeat period


def start_cluster(root: Path, cluster: str, count: int, *extra: str) -> list[AgentProcess]:
    agents = [
        AgentProcess(root / f"agent{i}", f"agent{i}", "--cluster", cluster, "--interval", "1", *extra)
        for i in range(1, count + 1)
    ]
    for agent in agents:
        agent.start()
    return agents


def stop_all(agents: list[AgentProcess]) -> None:
    for agent in agents:
        agent.stop()
        kill_leftover_workers(agent.directory)


def all_alive(agent: AgentProcess, ids: set[str]) -> bool:
    members = agent.request("GET", "/agents/")[1]
    return {m["id"] for m in members if m["alive"]} == ids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    agents = start_cluster(root, f"test-{uuid.uuid4().hex[:8]}", 3)
    try:
        ids = {a.agent_id for a in agents}
        for agent in agents:
            wait_until(lambda: all_alive(agent, ids), 2 * HEARTBEAT + 2, what="membership")
        yield agents
    finally:
        stop_all(agents)


def owner_of(agents: list[AgentProcess], name: str) -> AgentProcess:
    body = agents[0].request("GET", f"/foo/instances/{quote(name)}/")[1]
    return next(a for a in agents if a.agent_id == body["agent"])


def test_members_see_each_other(cluster: list[AgentProcess]) -> None:
    for agent in cluster:
        members = agent.request("GET", "/agents/")[1]
        assert [m["id"] for m in members] == ["agent1", "agent2", "agent3"]
        assert all(m["alive"] for m in members)
        assert all(m["url"].startswith("http://127.0.0.1:") for m in members)


def test_thirty_creations_spread_and_listed_everywhere(cluster: list[AgentProcess]) -> None:
    names = []
    for _ in range(30):
        status, body, _ = cluster[0].request("PUT", "/spread/instances/?nowait=1")
        assert status == 202, body
        names.append(body["name"])
    owners = {cluster[0].request("GET", f"/spread/instances/{n}")[1]["agent"] for n in names}
    assert len(owners) >= 2
    for agent in cluster:
        listed = agent.request("GET", "/spread/instances/")[1]
        assert sorted(listed) == sorted(names)
        assert len(listed) == len(set(listed))
    # Each worker runs on its owner: its pid file is in the owner's directory.
    for agent in cluster:
        mine = set(agent.request("GET", "/spread/instances/")[1]) & set(
            n for n in names if cluster[0].request("GET", f"/spread/instances/{n}")[1]["agent"] == agent.agent_id
        )
        wait_until(lambda: mine <= set(worker_pids(agent.directory)), 240, what="workers to start")
    assert cluster[1].request("DELETE", "/spread/")[0] == 200
    for agent in cluster:
        assert agent.request("GET", "/spread/instances/")[1] == []


def test_operations_through_a_non_owner(cluster: list[AgentProcess]) -> None:
    status, body, _ = cluster[0].request("PUT", "/foo/instances/remote-1")
    assert status == 201, body
    owner = next(a for a in cluster if a.agent_id == body["agent"])
    other = next(a for a in cluster if a is not owner)
    assert body["state"] == "running"
    assert ping("remote-1")

    assert other.request("GET", "/foo/instances/remote-1")[1]["agent"] == owner.agent_id
    assert other.request("PUT", "/foo/instances/remote-1/queues/extra")[0] == 201
    wait_until(
        lambda: "extra" in {q["name"] for q in active_queues("remote-1") or []},
        30,
        what="consume through a non-owner",
    )
    assert other.request("DELETE", "/foo/instances/remote-1/queues/extra")[0] == 200
    wait_until(
        lambda: "extra" not in {q["name"] for q in active_queues("remote-1") or []},
        30,
        what="cancel through a non-owner",
    )
    assert other.request("POST", "/foo/instances/remote-1/autoscale", {"max": 3, "min": 1})[1] == {
        "max": 3,
        "min": 1,
    }
    wait_until(
        lambda: (other.request("GET", "/foo/instances/remote-1/stats")[1] or {}).get("autoscaler", {}).get("max") == 3,
        30,
        what="autoscale through a non-owner",
    )
    pid = other.request("GET", "/foo/instances/remote-1")[1]["pid"]
    assert other.request("POST", "/foo/instances/remote-1/restart")[0] == 200
    wait_until(
        lambda: other.request("GET", "/foo/instances/remote-1")[1]["pid"] not in (None, pid),
        30,
        what="restart through a non-owner",
    )
    assert other.request("POST", "/foo/instances/remote-1/disable")[1]["is_enabled"] is False
    wait_until(lambda: not ping("remote-1"), 30, what="disable through a non-owner")
    assert other.request("POST", "/foo/instances/remote-1/enable")[1]["is_enabled"] is True
    wait_until(lambda: ping("remote-1"), 30, what="enable through a non-owner")
    last_pid = other.request("GET", "/foo/instances/remote-1")[1]["pid"]
    assert other.request("DELETE", "/foo/instances/remote-1")[0] == 200
    wait_until(lambda: not pid_alive(last_pid), 30, what="delete through a non-owner")
    assert cluster[0].request("GET", "/foo/instances/remote-1")[0] == 404


def test_queue_declared_on_one_agent_used_on_another(cluster: list[AgentProcess]) -> None:
    agent1, agent2, agent3 = cluster
    assert (
        agent2.request(
            "PUT", "/foo/queues/images", {"exchange": "media", "routing_key": "img.*", "exchange_type": "topic"}
        )[0]
        == 201
    )
    assert "images" in agent1.request("GET", "/foo/queues/")[1]
    assert agent1.request("GET", "/foo/queues/images")[1]["exchange"] == "media"
    # An instance on agent3, created there by name, told through agent1.
    status, body, _ = agent3.request("PUT", "/foo/instances/consumer-3?nowait=1")
    owner = owner_of(cluster, "consumer-3")
    assert owner.agent_id == body["agent"]
    assert agent1.request("PUT", "/foo/instances/consumer-3/queues/images")[0] == 201

    def declared() -> dict | None:
        for queue in active_queues("consumer-3") or []:
            if queue["name"] == "images":
                return queue
        return None

    queue = wait_until(declared, 45, what="consumer-3 to consume images")
    assert queue["exchange"]["name"] == "media"
    assert queue["routing_key"] == "img.*"
    assert agent1.request("DELETE", "/foo/instances/consumer-3")[0] == 200
    assert agent1.request("DELETE", "/foo/queues/images")[0] == 200
    assert agent2.request("GET", "/foo/queues/images")[0] == 404


def test_apps_are_replicated_also_to_a_later_agent(cluster: list[AgentProcess], tmp_path: Path) -> None:
    assert cluster[1].request("PUT", "/replicated/", {"celery_app": "proj.tasks:app"})[0] == 201
    for agent in cluster:
        wait_until(lambda: agent.request("GET", "/replicated/")[0] == 200, 10, what="app replication")
    cluster_name = cluster[0].extra[1]
    late = AgentProcess(tmp_path / "agent4", "agent4", "--cluster", cluster_name)
    try:
        late.start()
        wait_until(lambda: late.request("GET", "/replicated/")[0] == 200, 4 * HEARTBEAT, what="late copy")
        # Its own store has it, not just a forwarded answer.
        members = {m["id"] for m in late.request("GET", "/agents/")[1]}
        assert members >= {"agent1", "agent2", "agent3", "agent4"}
    finally:
        late.stop()
        kill_leftover_workers(late.directory)


def test_unicode_instance_through_every_agent(cluster: list[AgentProcess]) -> None:
    name = "wörker-ü1"
    path = f"/foo/instances/{quote(name)}/"
    body = None
    for _ in range(10):  # until placement picks another agent than agent1
        status, body, _ = cluster[0].request("PUT", path + "?nowait=1")
        assert status in (201, 202), body
        if body["agent"] != "agent1":
            break
        cluster[0].request("DELETE", path)
    assert body is not None and body["agent"] != "agent1"
    for agent in cluster:
        assert agent.request("GET", path)[1]["name"] == name
        assert name in agent.request("GET", "/foo/instances/")[1]
    assert cluster[2].request("DELETE", path)[0] == 200
    for agent in cluster:
        assert agent.request("GET", path)[0] == 404


def test_killed_agent_is_missing_then_dead(tmp_path: Path) -> None:
    agents = start_cluster(tmp_path, f"kill-{uuid.uuid4().hex[:8]}", 3)
    try:
        agent1, agent2, agent3 = agents
        ids = {"agent1", "agent2", "agent3"}
        wait_until(lambda: all_alive(agent1, ids), 2 * HEARTBEAT + 2, what="membership")
        agent3.request("PUT", "/foo/instances/on-3?nowait=1")
        agent3.kill()
        started = time.monotonic()
        status, names, headers = agent1.request("GET", "/foo/instances/")
        took = time.monotonic() - started
        assert status == 200
        # Named missing while believed alive; or already known dead (its
        # queue went with it: ring probes find that within a second).
        assert headers.get("X-SCS-Missing-Agents") in ("agent3", None)
        # Its queue is gone: the broker returns the request, nobody waits.
        assert took < 1.0
        started = time.monotonic()
        status, _, headers = agent1.request("GET", "/foo/instances/")
        assert time.monotonic() - started < 1.0
        assert headers.get("X-SCS-Missing-Agents") in ("agent3", None)
        wait_until(lambda: all_alive(agent1, {"agent1", "agent2"}), 3 * HEARTBEAT + 2, what="agent3 dead")
        started = time.monotonic()
        status, _, headers = agent1.request("GET", "/foo/instances/")
        assert time.monotonic() - started < 1.0
        assert "X-SCS-Missing-Agents" not in headers
        owners = set()
        for _ in range(8):
            owners.add(agent1.request("PUT", "/foo/instances/?nowait=1")[1]["agent"])
        assert owners <= {"agent1", "agent2"}
    finally:
        for pid in worker_pids(agents[2].directory).values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop_all(agents)
