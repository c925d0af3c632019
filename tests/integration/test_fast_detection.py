"""Issue 11: a ``kill -9``'d agent is known dead within 1 s; no listing waits for it.

Three real agents (default 2 s heartbeats) in their own cluster on the real
broker.  The broker drops a killed agent's exclusive queue with its
connection: ring probes find that within a probe period (0.5 s), and a
listing's request to it comes back unroutable at once.  The measured
figures are printed (``pytest -s``) and kept in the test's properties.
"""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.agents import AgentProcess, wait_until
from tests.integration.test_cluster import HEARTBEAT, all_alive, start_cluster, stop_all

POLL = 0.05
DETECTION_LIMIT = 1.0
# The contract is 0.1 s; a loaded 2-core machine gets a margin (the real
# figures are reported).
LISTING_LIMIT = 0.5


def alive_in(agent: AgentProcess, member: str) -> bool:
    rows = agent.request("GET", "/agents/", timeout=5.0)[1]
    return next(r["alive"] for r in rows if r["id"] == member)


def seconds_until_dead(survivors: list[AgentProcess], member: str, since: float, limit: float) -> dict[str, float]:
    """Poll ``GET /agents/`` on each survivor every 50 ms; seconds from
    ``since`` until each lists ``member`` not alive (missing: not within limit)."""
    seen: dict[str, float] = {}
    while len(seen) < len(survivors) and time.monotonic() - since < limit + 1.0:
        for agent in survivors:
            if agent.agent_id not in seen and not alive_in(agent, member):
                seen[agent.agent_id] = time.monotonic() - since
        time.sleep(POLL)
    return seen


def timed_listing(agent: AgentProcess, app: str) -> tuple[float, int, str | None]:
    started = time.monotonic()
    status, _names, headers = agent.request("GET", f"/{app}/instances/", timeout=10.0)
    return time.monotonic() - started, status, headers.get("X-SCS-Missing-Agents")


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_killed_agent_is_known_dead_within_a_second_and_not_waited_for(
    tmp_path: Path, record_property: pytest.RecordProperty, signed: bool
) -> None:
    extra: tuple[str, ...] = ()
    if signed:  # probes and gone notices signed and sealed like the rest
        secret = tmp_path / "cluster.secret"
        secret.write_text(secrets.token_hex(16) + "\n")
        secret.chmod(0o600)
        extra = ("--cluster-secret-file", str(secret))
    agents = start_cluster(tmp_path, f"fast-{uuid.uuid4().hex[:8]}", 3, *extra)
    try:
        agent1, agent2, agent3 = agents
        survivors = [agent1, agent2]
        ids = {"agent1", "agent2", "agent3"}
        for agent in agents:
            wait_until(lambda agent=agent: all_alive(agent, ids), 2 * HEARTBEAT + 5, what="membership")
        assert agent1.request("PUT", "/fast/", {})[0] in (200, 201)
        wait_until(lambda: all(a.request("GET", "/fast/")[0] == 200 for a in agents), 10, what="app replicated")

        # 1. No traffic but the agents' own: both survivors know within 1 s.
        agent3.kill()
        killed_at = time.monotonic()
        took = seconds_until_dead(survivors, "agent3", killed_at, DETECTION_LIMIT)
        print(f"\nkill -9 detection (s): {took}")
        record_property("detection_seconds", took)
        assert set(took) == {"agent1", "agent2"}, took
        assert max(took.values()) <= DETECTION_LIMIT, took
        for agent in survivors:
            assert all_alive(agent, {"agent1", "agent2"})
        # Listings after detection do not ask it, nor name it (it held nothing).
        for agent in survivors:
            seconds, status, missing = timed_listing(agent, "fast")
            assert (status, missing) == (200, None)
            assert seconds < LISTING_LIMIT, seconds

        # 2. Restarted (a new run): alive again everywhere.
        agent3.start()
        for agent in agents:
            wait_until(lambda agent=agent: all_alive(agent, ids), 2 * HEARTBEAT + 5, what="agent3 back")

        # 3. A listing issued right after the kill, before any detection.
        agent3.kill()
        listings = [timed_listing(agent, "fast") for agent in survivors]
        print(f"listings right after kill -9 (s, status, missing): {listings}")
        record_property("listing_seconds", [seconds for seconds, _, _ in listings])
        for seconds, status, missing in listings:
            assert status == 200
            # Believed alive when asked: named missing; or already known dead.
            assert missing in ("agent3", None)
            assert seconds < LISTING_LIMIT, listings
        took = seconds_until_dead(survivors, "agent3", time.monotonic(), DETECTION_LIMIT)
        assert set(took) == {"agent1", "agent2"}, took
    finally:
        stop_all(agents)
