"""Issue 3 through the API of a real agent: real workers on the real broker."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.agents import (
    AgentProcess,
    kill_leftover_workers,
    pid_alive,
    wait_until,
    worker_pids,
)
from tests.integration.celery_probe import (
    active_queues,
    broadcast_ping_replies,
    inspect,
    of_instance,
    ping,
)
from tests.integration.rabbitmq_node import PrivateRabbitMQ, available


@pytest.fixture
def agent(tmp_path: Path):
    agent = AgentProcess(tmp_path / "agent1", "agent1", "--without-srs", "--interval", "1")
    agent.start()
    yield agent
    agent.stop()
    kill_leftover_workers(agent.directory)


def test_create_answers_once_the_worker_answers_a_ping(agent: AgentProcess) -> None:
    status, body, _ = agent.request("PUT", "/foo/instances/")
    assert status == 201, body
    assert body["state"] == "running"
    assert ping(body["name"])  # at once: creation waited for it
    assert body["pid"] == worker_pids(agent.directory)[body["name"]]
    log = agent.log_text()
    assert "Node.add" in log and "wake-up" in log


def test_create_whose_worker_cannot_start_answers_an_error(agent: AgentProcess) -> None:
    assert agent.request("PUT", "/broken/", {"celery_app": "no_such_module_for_scs_tests"})[0] == 201
    started = time.monotonic()
    status, body, _ = agent.request("PUT", "/broken/instances/w1/")
    assert status == 502, body
    assert "cannot start" in body["error"]
    assert body["instance"]["state"] in ("restarting", "failed")
    # well before the 15 s readiness bound: it learnt at the first backoff
    assert time.monotonic() - started < 12
    # kept, so that it can be fixed and restarted
    assert agent.request("GET", "/broken/instances/w1/")[0] == 200


def test_consume_cancel_autoscale_disable_enable_delete(agent: AgentProcess) -> None:
    status, body, _ = agent.request("PUT", "/foo/instances/w1", {"max_concurrency": 2})
    assert status == 201, body
    assert agent.request("PUT", "/foo/instances/w1/queues/tasks")[0] == 201
    wait_until(lambda: "tasks" in {q["name"] for q in active_queues("w1") or []}, 30, what="consume")
    queues = agent.request("GET", "/foo/instances/w1/queues")[1]
    assert "tasks" in queues["queues"]
    assert "tasks" in queues["active"] and "dq.w1" in queues["active"]
    assert agent.request("DELETE", "/foo/instances/w1/queues/tasks")[0] == 200
    wait_until(lambda: "tasks" not in {q["name"] for q in active_queues("w1") or []}, 30, what="cancel")
    assert "dq.w1" in {q["name"] for q in active_queues("w1") or []}

    assert agent.request("POST", "/foo/instances/w1/autoscale", {"max": 4, "min": 2})[0] == 200

    def autoscaler() -> dict:
        stats = inspect("w1").stats() or {}
        return (of_instance(stats, "w1") or {}).get("autoscaler", {})

    wait_until(lambda: (autoscaler().get("max"), autoscaler().get("min")) == (4, 2), 30, what="autoscale")
    assert agent.request("GET", "/foo/instances/w1/stats")[1]["autoscaler"]["max"] == 4

    pid = agent.request("GET", "/foo/instances/w1")[1]["pid"]
    assert agent.request("POST", "/foo/instances/w1/disable")[0] == 200
    wait_until(lambda: not pid_alive(pid), 30, what="disable to stop the worker")
    assert agent.request("GET", "/foo/instances/w1")[1]["state"] == "stopped"
    assert agent.request("POST", "/foo/instances/w1/enable")[0] == 200
    wait_until(lambda: ping("w1"), 30, what="enable to start the worker")
    pid = agent.request("GET", "/foo/instances/w1")[1]["pid"]
    assert agent.request("DELETE", "/foo/instances/w1")[0] == 200
    wait_until(lambda: not pid_alive(pid), 30, what="delete to stop the worker")
    assert not ping("w1")


def test_agent_crash_then_restart_keeps_one_worker_per_name(tmp_path: Path) -> None:
    directory = tmp_path / "agent1"
    first = AgentProcess(directory, "agent1", "--without-srs", "--interval", "1").start()
    try:
        names = [first.request("PUT", f"/foo/instances/crash-{i}")[1]["name"] for i in range(3)]
        for name in names:
            assert ping(name)
        first.kill()  # kill -9: the workers are left running
        second = AgentProcess(directory, "agent1", "--without-srs", "--interval", "1", port=first.port).start()
        try:
            for name in names:
                wait_until(
                    lambda: second.request("GET", f"/foo/instances/{name}")[1]["state"] == "running",
                    60,
                    what=f"{name} to run again",
                )
            replies = Counter(broadcast_ping_replies(timeout=2.0))
            for name in names:
                assert replies[f"{name}@agent1"] == 1, replies  # <instance>@<agent id>
        finally:
            second.stop()
    finally:
        first.stop()
        kill_leftover_workers(directory)


def test_sigterm_stops_workers_then_the_agent(agent: AgentProcess) -> None:
    for i in range(2):
        assert agent.request("PUT", f"/foo/instances/term-{i}")[0] == 201
    pids = worker_pids(agent.directory)
    assert len(pids) == 2 and all(pid_alive(p) for p in pids.values())
    agent.stop_cleanly()
    assert not any(pid_alive(p) for p in pids.values())


@pytest.mark.skipif(not available(), reason="needs rabbitmq-server installed and root")
def test_broker_outage_restarts_nothing(tmp_path: Path) -> None:
    broker = PrivateRabbitMQ(tmp_path / "rabbit")
    broker.start()
    agent = AgentProcess(tmp_path / "agent1", "agent1", "--without-srs", "--interval", "1", "-b", broker.url)
    try:
        agent.start()
        names = []
        for i in range(2):
            status, body, _ = agent.request("PUT", f"/foo/instances/outage-{i}")
            assert status == 201 and body["state"] == "running", body
            names.append(body["name"])
        before = {n: agent.request("GET", f"/foo/instances/{n}")[1] for n in names}
        dump_before = [agent.request("GET", f"/foo/instances/{n}")[1]["queues"] for n in names]

        broker.stop()
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 20:
            # The API and the store keep working while the broker is gone.
            assert agent.request("GET", "/foo/instances/", timeout=10)[0] == 200
            time.sleep(1)
        broker.start()
        # Grace period: workers reconnect by themselves.
        for name in names:
            wait_until(lambda: ping(name, broker=broker.url), 90, what=f"{name} after outage")
        after = {n: agent.request("GET", f"/foo/instances/{n}")[1] for n in names}
        for name in names:
            assert after[name]["pid"] == before[name]["pid"], "a worker was restarted"
            assert after[name]["restarts"] == before[name]["restarts"]
        assert [after[n]["queues"] for n in names] == dump_before
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)
        broker.destroy()


def test_ctrl_c_to_the_terminal_stops_the_agent_in_order(agent: AgentProcess) -> None:
    """SIGINT to the agent's whole process group, as a terminal's Ctrl-C: the
    workers do not get it directly (they run in sessions of their own), so
    none dies early and is restarted; the agent stops them and exits."""
    for i in range(2):
        assert agent.request("PUT", f"/foo/instances/ctrl-c-{i}")[0] == 201
    pids = worker_pids(agent.directory)
    assert len(pids) == 2
    for pid in pids.values():
        assert os.getsid(pid) == pid
    os.killpg(agent.pid, signal.SIGINT)
    assert agent.process is not None
    agent.process.wait(60)
    assert not any(pid_alive(p) for p in pids.values())
    log = agent.log_text()
    after = log[log.index("Received SIGINT") :]
    assert "node.restart" not in after
    assert "Main loop terminated." in after
