"""Issue 13 on real agents, real workers, the real broker and a slow real
task: a burst of 60 half-second tasks on an app with the policy min 1,
max 4, 10 messages per instance.  The instances reach 4 within 3
intervals; the deciding agent is killed mid-way (its workers stay, as
after an agent crash) and the other agent goes on deciding; every task's
result arrives, each task ran once; once the queue is empty and
``scale_down_after`` has passed, the app is back to 1 instance."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.integration.agents import BROKER, AgentProcess, kill_leftover_workers, wait_until
from tests.integration.test_cluster import HEARTBEAT, all_alive

HERE = str(Path(__file__).resolve().parent)
INTERVAL = 1.0
TASKS = 60
TASK_SECONDS = 0.5
SCALE_DOWN_AFTER = 3.0
FAILOVER_AFTER = 2.0
WORKER_ARGUMENTS = "--without-mingle --without-gossip --without-heartbeat"


def start(root: Path, cluster: str, agent_id: str) -> AgentProcess:
    return AgentProcess(
        root / agent_id,
        agent_id,
        "--cluster",
        cluster,
        "--interval",
        str(INTERVAL),
        "--failover-after",
        str(FAILOVER_AFTER),
    ).start()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    cluster = f"as-{uuid.uuid4().hex[:8]}"
    agents: dict[str, AgentProcess] = {}
    try:
        for agent_id in ("agent1", "agent2"):
            agents[agent_id] = start(tmp_path, cluster, agent_id)
        for agent in agents.values():
            wait_until(lambda: all_alive(agent, set(agents)), 2 * HEARTBEAT + 3, what="membership")
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        for agent in agents.values():
            kill_leftover_workers(agent.directory)


@pytest.fixture
def client() -> Iterator[Celery]:
    client = Celery(broker=BROKER, set_as_current=False)
    client.conf.result_backend = "rpc://"
    yield client
    client.close()


def instances(agent: AgentProcess, app: str) -> list[dict[str, Any]]:
    status, body, _ = agent.request("GET", f"/{app}/instances/?details=1")
    assert status == 200, body
    return body


def metric(agent: AgentProcess, prefix: str) -> float:
    import urllib.request

    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_burst_scales_out_and_back_across_a_decider_crash(
    two: dict[str, AgentProcess], client: Celery, tmp_path: Path
) -> None:
    agent1, agent2 = two["agent1"], two["agent2"]
    app, queue = f"as{uuid.uuid4().hex[:8]}", f"asq-{uuid.uuid4().hex[:8]}"
    marks = tmp_path / "marks"
    marks.mkdir()
    settings = {"celery_app": "celeryapp_for_tests", "env": {"PYTHONPATH": HERE}, "arguments": WORKER_ARGUMENTS}
    assert agent1.request("PUT", f"/{app}/", settings)[0] == 201
    assert agent1.request("PUT", f"/{app}/queues/{queue}/")[0] == 201
    # Bad policies first: a 400 naming the field, nothing stored.
    for bad, field in (
        ({"queue": queue, "min_instances": 5, "max_instances": 4}, "min_instances"),
        ({"queue": queue, "max_instances": 0}, "max_instances"),
        ({"queue": queue, "max_instances": 4, "messages_per_instance": -1}, "messages_per_instance"),
        ({"queue": "no-such-queue-anywhere", "max_instances": 4}, "queue"),
    ):
        status, body, _ = agent2.request("PUT", f"/{app}/autoscaling/", bad)
        assert (status, body.get("parameter")) == (400, field), body
    assert agent1.request("GET", f"/{app}/autoscaling/")[0] == 404
    policy = {
        "queue": queue,
        "min_instances": 1,
        "max_instances": 4,
        "messages_per_instance": 10,
        "scale_down_after": SCALE_DOWN_AFTER,
    }
    status, body, _ = agent2.request("PUT", f"/{app}/autoscaling/", policy)
    assert status == 201, body
    # Replicated: each agent answers it from its own store.
    for agent in (agent1, agent2):
        assert {k: agent.request("GET", f"/{app}/autoscaling/")[1][k] for k in policy} == policy

    # The minimum comes first, from the decider (agent1: the smallest id).
    wait_until(
        lambda: [i["state"] for i in instances(agent2, app)] == ["running"], 30, what="the first instance running"
    )

    started = time.monotonic()
    results = [client.send_task("scs_tests.slow_mark", (str(marks), TASK_SECONDS), queue=queue) for _ in range(TASKS)]
    published = time.monotonic()
    wait_until(lambda: len(instances(agent2, app)) == 4, 3 * INTERVAL + 1, interval=0.05, what="4 instances")
    reached = time.monotonic() - published
    assert reached <= 3 * INTERVAL, reached
    decision = agent2.request("GET", f"/{app}/autoscaling/")[1]["decision"]
    assert decision["agent"] == "agent1" and decision["target"] == 4, decision
    assert metric(agent1, 'scs_autoscale_decisions_total{app="' + app + '",direction="up"}') >= 1

    # The decider dies mid-way (kill -9; its workers stay, as after a crash).
    agent1.kill()
    wait_until(lambda: all_alive(agent2, {"agent2"}), 10, what="agent2 to see agent1 dead")
    wait_until(
        lambda: (agent2.request("GET", f"/{app}/autoscaling/")[1]["decision"] or {}).get("agent") == "agent2",
        3 * INTERVAL + 2,
        what="agent2 to decide",
    )

    # Every task's result arrives, and each task ran exactly once.
    ids = {r.id for r in results}
    wait_until(lambda: len(os.listdir(marks)) >= TASKS, 90, interval=0.5, what="every task to run")
    assert {r.get(timeout=30) for r in results} == ids
    assert set(os.listdir(marks)) == ids
    runs = {name: (marks / name).read_text().splitlines() for name in ids}
    assert all(len(lines) == 1 for lines in runs.values()), {k: v for k, v in runs.items() if len(v) != 1}
    spread = {line.split("@", 1)[0] for lines in runs.values() for line in lines}
    assert len(spread) >= 2, spread  # more than the one instance did the work
    busy_for = time.monotonic() - started

    # The machine of agent1 is lost too, now that its workers are idle: the
    # failover brings its instances to agent2, which scales the app back.
    kill_leftover_workers(agent1.directory)
    wait_until(lambda: [i["agent"] for i in instances(agent2, app)] == ["agent2"], 60, interval=0.5, what="back to 1")
    settled = time.monotonic() - started
    time.sleep(3 * INTERVAL)
    assert len(instances(agent2, app)) == 1  # and it stays there
    assert metric(agent2, 'scs_autoscale_decisions_total{app="' + app + '",direction="down"}') >= 1
    assert metric(agent2, 'scs_autoscale_target{app="' + app + '"}') == 1
    decision = agent2.request("GET", f"/{app}/autoscaling/")[1]["decision"]
    assert (decision["agent"], decision["instances"], decision["target"], decision["messages"]) == (
        "agent2",
        1,
        1,
        0,
    ), decision
    print(
        f"4 instances after {reached:.2f} s; all {TASKS} tasks done after {busy_for:.1f} s; "
        f"back to 1 after {settled:.1f} s"
    )
