"""Worker logs (issue 10) for real: rotation racing a process that logs as
fast as it can, and ``GET .../log/`` and rotation on real agents with real
Celery workers on the real broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from scs.worker_log import rotate
from tests.integration.agents import AgentProcess, kill_leftover_workers, pid_alive, wait_until
from tests.integration.celery_probe import ping

HEARTBEAT = 2.0  # SRS's default heartbeat period

# Logs numbered lines through the handler Celery's workers use
# (celery.app.log: logging.handlers.WatchedFileHandler), as fast as it can.
WRITER = """
import logging, logging.handlers, sys
handler = logging.handlers.WatchedFileHandler(sys.argv[1], encoding="utf-8")
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("scs-test-writer")
log.propagate = False
log.setLevel(logging.INFO)
log.addHandler(handler)
for n in range(int(sys.argv[2])):
    log.info("line %d", n)
"""


def test_rotation_loses_no_line_of_a_busy_writer(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    total, backups = 40_000, 1_000
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(total)])
    rotations = 0
    try:
        deadline = time.monotonic() + 120
        while writer.poll() is None:
            assert time.monotonic() < deadline, "the writer did not finish in 120 s"
            if rotate(str(path), 4096, backups) is not None:
                rotations += 1
            time.sleep(0.0005)  # leave the writer most of a CPU
        assert writer.returncode == 0
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(10)
    # The race was run: many rotations while lines were being written.
    assert rotations >= 20, rotations
    assert rotations < backups  # so no backup was dropped
    seen: list[int] = []
    for log in tmp_path.iterdir():
        for line in log.read_text(encoding="utf-8").splitlines():
            match = re.fullmatch(r"line (\d+)", line)
            assert match, f"a broken line in {log.name}: {line!r}"
            seen.append(int(match.group(1)))
    assert len(seen) == total
    assert sorted(seen) == list(range(total))


def _all_alive(agent: AgentProcess, ids: set[str]) -> bool:
    members = agent.request("GET", "/agents/")[1]
    return {m["id"] for m in members if m["alive"]} == ids


@pytest.fixture
def two_agents(tmp_path: Path):
    """Two agents of a cluster of their own that rotate worker logs past 4 KiB."""
    cluster = f"logs-{uuid.uuid4().hex[:8]}"
    options = ("--cluster", cluster, "--interval", "1", "--worker-log-max-bytes", "4096", "--worker-log-backups", "2")
    agents = [AgentProcess(tmp_path / f"agent{i}", f"agent{i}", *options) for i in (1, 2)]
    try:
        for agent in agents:
            agent.start()
        ids = {a.agent_id for a in agents}
        for agent in agents:
            wait_until(lambda: _all_alive(agent, ids), 2 * HEARTBEAT + 5, what="membership")
        yield agents
    finally:
        for agent in agents:
            agent.stop()
            kill_leftover_workers(agent.directory)


def _create(agents: list[AgentProcess], app: str, loglevel: str) -> tuple[str, AgentProcess, AgentProcess, dict]:
    """An app whose workers log at ``loglevel`` and one instance of it:
    (name, owner, the other agent, the instance)."""
    status, body, _ = agents[0].request("PUT", f"/{app}/", {"arguments": ["-l", loglevel]})
    assert status in (200, 201), body
    for agent in agents:
        wait_until(lambda: agent.request("GET", f"/{app}/")[0] == 200, 10, what=f"{app} on {agent.agent_id}")
    name = f"{app}-{uuid.uuid4().hex[:6]}"
    status, instance, _ = agents[0].request("PUT", f"/{app}/instances/{name}/")
    assert status == 201 and instance["state"] == "running", instance
    owner = next(a for a in agents if a.agent_id == instance["agent"])
    other = next(a for a in agents if a is not owner)
    return name, owner, other, instance


def test_log_through_another_agent_and_rotation_on_real_workers(two_agents: list[AgentProcess]) -> None:
    # A quiet worker (INFO): its startup lines, through the agent that does not own it.
    quiet, owner, other, _ = _create(two_agents, "quiet", "info")

    def quiet_log() -> dict | None:
        status, body, _ = other.request("GET", f"/quiet/instances/{quiet}/log/?lines=5")
        assert status == 200, body
        return body if any("ready." in line for line in body["lines"]) else None

    body = wait_until(quiet_log, 30, interval=0.5, what="the worker's 'ready.' line")
    assert body["name"] == quiet and body["agent"] == owner.agent_id
    assert 1 <= len(body["lines"]) <= 5 and all(isinstance(line, str) for line in body["lines"])
    assert any(f"{quiet}@" in line and "ready." in line for line in body["lines"])
    status, body, _ = other.request("GET", f"/quiet/instances/{quiet}/log/?lines=0")
    assert status == 400 and body["parameter"] == "lines"

    # A chatty worker (DEBUG: a line per ping, stats...): rotated past 4 KiB.
    chatty, owner, other, instance = _create(two_agents, "chatty", "debug")
    directory = owner.directory / chatty
    wait_until(lambda: (directory / "worker.log.1").exists(), 30, interval=0.2, what="a first rotation")
    # A second rotation: the worker wrote more than 4 KiB into the new
    # worker.log it reopened, not into the renamed one.
    wait_until(lambda: (directory / "worker.log.2").exists(), 60, interval=0.2, what="a second rotation")
    assert not (directory / "worker.log.3").exists()  # two backups kept

    def chatty_log() -> list[str] | None:
        status, body, _ = other.request("GET", f"/chatty/instances/{chatty}/log/?lines=5")
        assert status == 200 and body["agent"] == owner.agent_id, body
        lines = body["lines"]
        return lines if len(lines) == 5 and any("pidbox received method" in line for line in lines) else None

    wait_until(chatty_log, 30, interval=0.5, what="the new worker.log's lines")
    # The same worker all along: it answers, was never restarted.
    assert ping(chatty)
    now = owner.request("GET", f"/chatty/instances/{chatty}/")[1]
    assert (now["state"], now["pid"], now["restarts"]) == ("running", instance["pid"], 0)
    assert pid_alive(instance["pid"])
