"""Issue 11 on real agents and workers: a lost machine's instances come
back elsewhere, once; a dead agent whose workers live is left alone and
takes them back; an agent back after a failover drops what moved; drain
moves instances without a capacity drop."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from scs.failover import spread
from scs.tap import START_GATE_TIMEOUT
from tests.integration.agents import AgentProcess, kill_leftover_workers, pid_alive, wait_until, worker_pids
from tests.integration.celery_probe import broadcast_ping_replies, celery_client, ping
from tests.integration.test_cluster import HEARTBEAT, all_alive

FAILOVER_AFTER = 3.0
APP = "fo"


def start(root: Path, cluster: str, agent_id: str, port: int | None = None) -> AgentProcess:
    return AgentProcess(
        root / agent_id,
        agent_id,
        "--cluster",
        cluster,
        "--interval",
        "1",
        "--failover-after",
        str(FAILOVER_AFTER),
        port=port,
    ).start()


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[dict[str, AgentProcess], str, Path]]:
    """agent3 first, with two instances (one disabled), then agent1 and
    agent2, and four more instances spread by placement."""
    cluster = f"fo-{uuid.uuid4().hex[:8]}"
    agents: dict[str, AgentProcess] = {}
    try:
        agents["agent3"] = start(tmp_path, cluster, "agent3")
        wait_until(lambda: all_alive(agents["agent3"], {"agent3"}), 10, what="agent3 connected")
        for name in ("a3-1", "a3-2", "a3-off"):
            status, body, _ = agents["agent3"].request("PUT", f"/{APP}/instances/{name}/")
            assert status == 201, body
        assert agents["agent3"].request("POST", f"/{APP}/instances/a3-off/disable")[0] == 200
        agents["agent1"] = start(tmp_path, cluster, "agent1")
        agents["agent2"] = start(tmp_path, cluster, "agent2")
        for agent in agents.values():
            wait_until(lambda: all_alive(agent, set(agents)), 2 * HEARTBEAT + 2, what="membership")
        for i in range(3):
            status, body, _ = agents["agent1"].request("PUT", f"/{APP}/instances/x-{i}/")
            assert status == 201, body
        # Every agent's copy of agent3 is current (one heartbeat).
        time.sleep(HEARTBEAT + 1)
        yield agents, cluster, tmp_path
    finally:
        for agent in agents.values():
            agent.stop()
            kill_leftover_workers(agent.directory)


def kill_workers(directory: Path) -> None:
    """kill -9 every worker of an agent (each runs in its own session)."""
    for pid in worker_pids(directory).values():
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def details(agent: AgentProcess) -> dict[str, dict]:
    status, body, _ = agent.request("GET", f"/{APP}/instances/?details=1")
    assert status == 200, body
    return {instance["name"]: instance for instance in body}


def workers_per_instance(names: set[str], timeout: float = 2.0) -> Counter:
    """Workers answering a broadcast ping, by instance, for ``names`` only:
    the shared broker also carries the workers of other tests (or of
    leftover processes), whose names are not this cluster's business."""
    counts = Counter(node.split("@", 1)[0] for node in broadcast_ping_replies(timeout=timeout))
    return Counter({name: count for name, count in counts.items() if name in names})


def moved_off(agent: AgentProcess, names: list[str], dead: str = "agent3") -> bool:
    """Whether every one of ``names`` is owned by a live agent in ``agent``'s
    listing (a failover moves a dead agent's instances concurrently: one of
    them moved says nothing of the others)."""
    listing = details(agent)
    return all(listing.get(n, {}).get("agent") not in (None, dead) for n in names)


def test_a_lost_machine_s_instances_come_back_once_spread_over_survivors(three) -> None:
    agents, _cluster, _root = three
    dead = agents["agent3"]
    before = details(dead)
    names = set(before)
    held = sorted(n for n, i in before.items() if i["agent"] == "agent3")
    # Placement put x-0..x-2 at random, on agent3 too: every instance agent3
    # held comes back (all of them, not just a3-*: the moves run at once and
    # finish in any order), the enabled ones answering.
    assert {"a3-1", "a3-2", "a3-off"} <= set(held), before
    enabled = [n for n in held if before[n]["is_enabled"]]
    # The survivors' loads before the kill decide where the moved instances
    # go (the least loaded first).
    load = Counter({"agent1": 0, "agent2": 0})
    load.update(i["agent"] for i in before.values() if i["agent"] != "agent3")
    dead.kill()
    kill_workers(dead.directory)
    killed_at = time.monotonic()
    survivors = [agents["agent1"], agents["agent2"]]

    wait_until(lambda: moved_off(survivors[0], held), FAILOVER_AFTER + 10, what="agent3's instances owned by survivors")
    for name in enabled:
        wait_until(lambda: ping(name), max(1.0, FAILOVER_AFTER + 10 - (time.monotonic() - killed_at)), what=name)
    took = time.monotonic() - killed_at
    assert took <= FAILOVER_AFTER + 10, took
    listing = details(survivors[1])
    owners = {n: listing[n]["agent"] for n in held}
    assert owners == spread("agent3", dict(load), held), (load, listing)  # spread over the survivors
    final = Counter(load)
    final.update(owners.values())
    assert max(final.values()) - min(final.values()) <= max(1, abs(load["agent1"] - load["agent2"]) - len(held))
    assert listing["a3-off"]["is_enabled"] is False  # disabled moves as disabled
    assert listing["a3-1"]["node"] == f"a3-1@{listing['a3-1']['agent']}"
    # Exactly once: one worker per instance, and each instance on one agent.
    time.sleep(2)
    counts = workers_per_instance(names)
    assert all(count == 1 for count in counts.values()), counts
    assert {"a3-1", "a3-2", "x-0", "x-1", "x-2"} <= set(counts)
    for survivor in survivors:
        names_listed = [i["name"] for i in survivor.request("GET", f"/{APP}/instances/?details=1")[1]]
        assert sorted(names_listed) == sorted(set(names_listed)), names_listed

    # /agents/ on agent1 names what moved from its copies of the others,
    # which lag a heartbeat behind the moves.
    def agent3_row() -> dict:
        rows = {row["id"]: row for row in survivors[0].request("GET", "/agents/")[1]}
        return rows["agent3"]

    wait_until(
        lambda: sorted(agent3_row().get("moved", ())) == held, 2 * HEARTBEAT + 2, what="/agents/ to name what moved"
    )
    assert agent3_row()["alive"] is False


def test_a_dead_agent_whose_workers_answer_is_left_alone_and_takes_them_back(three) -> None:
    agents, cluster, root = three
    dead = agents["agent3"]
    before = details(agents["agent1"])
    dead.kill()  # the agent alone: its workers keep answering
    time.sleep(FAILOVER_AFTER + 4)
    listing = details(agents["agent1"])
    for name in ("a3-1", "a3-2"):
        assert listing[name]["agent"] == "agent3", listing[name]
        assert listing[name]["state"] == "orphaned"
        assert listing[name]["pid"] == before[name]["pid"]
    assert ping("a3-1") and ping("a3-2")
    # agent3 back: it replaces its workers, never two at once.
    counts: list[Counter] = []
    done = threading.Event()

    names = set(before)  # the workers of other tests on the shared broker are not counted

    def sample() -> None:
        client = celery_client()
        while not done.is_set():
            replies = client.control.ping(timeout=0.5) or []
            nodes = (node.split("@", 1)[0] for reply in replies for node in reply)
            counts.append(Counter(name for name in nodes if name in names))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        agents["agent3"] = start(root, cluster, "agent3", port=dead.port)
        wait_until(
            lambda: all(details(agents["agent3"])[n]["state"] == "running" for n in ("a3-1", "a3-2")),
            60,
            what="agent3's workers running again",
        )
    finally:
        done.set()
        sampler.join(10)
    assert counts and all(max(c.values(), default=0) <= 1 for c in counts), counts
    assert details(agents["agent2"])["a3-1"]["agent"] == "agent3"


def test_an_agent_back_after_a_failover_drops_what_moved(three) -> None:
    agents, cluster, root = three
    dead = agents["agent3"]
    before = details(dead)
    names = set(before)
    held = sorted(n for n, i in before.items() if i["agent"] == "agent3")
    dead.kill()
    kill_workers(dead.directory)
    # Back once the failover is over: every instance it held has moved (the
    # moves run at once and finish in any order; one not moved yet when it
    # comes back is still its own, rightly).
    wait_until(lambda: moved_off(agents["agent1"], held), FAILOVER_AFTER + 10, what="failover")
    agents["agent3"] = start(root, cluster, "agent3", port=dead.port)
    wait_until(lambda: agents["agent3"].request("GET", f"/{APP}/instances/")[0] == 200, 10, what="agent3 answers")

    def own_count() -> int:
        status, body, _ = agents["agent3"].request("GET", "/agents/")
        assert status == 200, body
        return next(r for r in body if r["id"] == "agent3")["instances"]

    # It drops them once its copies of its peers are current (the start
    # gate waits START_GATE_TIMEOUT at most for that, then starts workers).
    wait_until(lambda: own_count() == 0, START_GATE_TIMEOUT, what="agent3 to drop what moved")
    own = [n for n, i in details(agents["agent3"]).items() if i["agent"] == "agent3"]
    assert own == [], own
    for name in ("a3-1", "a3-2"):
        wait_until(lambda: ping(name), 60, what=f"{name} running on its new owner")
    counts = workers_per_instance(names)
    assert all(count == 1 for count in counts.values()), counts
    assert counts["a3-1"] == counts["a3-2"] == 1
    # No worker of agent3 runs: its pid files name no live process.
    assert not [pid for pid in worker_pids(agents["agent3"].directory).values() if pid_alive(pid)]


def test_drain_moves_without_a_capacity_drop_and_undrain_restores(three) -> None:
    agents, _cluster, _root = three
    source = agents["agent3"]
    owned = sorted(n for n, i in details(source).items() if i["agent"] == "agent3")
    enabled = [n for n, i in details(source).items() if i["agent"] == "agent3" and i["is_enabled"]]
    assert enabled
    fewest: list[int] = []
    done = threading.Event()

    def sample() -> None:
        client = celery_client()
        while not done.is_set():
            replies = client.control.ping(timeout=1.0) or []
            names = {node.split("@", 1)[0] for reply in replies for node in reply}
            fewest.append(len(names & set(enabled)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status, body, _ = agents["agent1"].request("POST", "/agents/agent3/drain", timeout=120)
    finally:
        done.set()
        sampler.join(10)
    assert status == 200, body
    assert sorted(body["instances"]) == owned
    assert body["failed"] == {}
    assert min(fewest) == len(enabled), fewest  # never fewer workers than before
    listing = details(agents["agent2"])
    assert all(listing[n]["agent"] in ("agent1", "agent2") for n in body["instances"])
    wait_until(
        lambda: next(r for r in agents["agent2"].request("GET", "/agents/")[1] if r["id"] == "agent3")["draining"],
        HEARTBEAT + 2,
        what="/agents/ shows draining",
    )
    for _ in range(4):
        status, created, _ = agents["agent2"].request("PUT", f"/{APP}/instances/?nowait=1")
        assert status == 202 and created["agent"] != "agent3", created
    status, body, _ = agents["agent2"].request("POST", "/agents/agent3/undrain")
    assert (status, body["draining"]) == (200, False)
