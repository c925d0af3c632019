"""Issue 12: the real ``scs`` console script against a two-agent cluster on
the real broker, the agents requiring a bearer token: create, list, scale,
log, roll and delete instances; and its errors (unknown instance, bad
parameter, conflict, agent down, wrong token)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agents import BIN, AgentProcess, free_port, pid_alive, wait_until
from tests.integration.celery_probe import ping
from tests.integration.test_cluster import HEARTBEAT, stop_all

SCS = str(BIN / "scs")
TOKEN = "cli-test-token-" + "x" * 24
APP = "clitest"


def bearer_get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class TokenAgent(AgentProcess):
    """An agent started with ``--auth-token-file``: ready once /ping/ answers
    with the token."""

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return bearer_get(self.url + "/ping/", TOKEN) == {"ok": "pong"}
        except OSError:
            return False


class Cluster:
    def __init__(self, agents: list[Any], token_file: Path) -> None:
        self.agents = agents
        self.token_file = token_file
        self.names: list[str] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SCS_URL", None)
        env.pop("SCS_TOKEN_FILE", None)
        env.update(SCS_URL=self.agents[0].url, SCS_TOKEN_FILE=str(self.token_file))
        env.update(extra)
        return env

    def scs(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``scs ARGS`` (an argv list, never a shell)."""
        return subprocess.run(
            [SCS, *args], env=self.env(**env), capture_output=True, text=True, timeout=timeout, check=False
        )

    def ok(self, *args: str, **env: str) -> str:
        result = self.scs(*args, **env)
        assert result.returncode == 0, f"scs {' '.join(args)}: {result.returncode}\n{result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scs-cli")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    agents = [
        TokenAgent(
            root / f"agent{i}", f"agent{i}", "--cluster", name, "--interval", "1", "--auth-token-file", str(token_file)
        )
        for i in (1, 2)
    ]
    try:
        for agent in agents:
            agent.start()
        ids = {a.agent_id for a in agents}
        for agent in agents:
            wait_until(
                lambda: all_alive_with_token(agent, ids, TOKEN),
                2 * HEARTBEAT + 5,
                what="membership",
            )
        yield Cluster(agents, token_file)
    finally:
        stop_all(agents)


def all_alive_with_token(agent: Any, ids: set[str], token: str) -> bool:
    return {m["id"] for m in bearer_get(agent.url + "/agents/", token) if m["alive"]} == ids


def instances_on_both_agents(cluster: Cluster) -> list[dict[str, Any]]:
    """Create instances (the first one waiting for its worker, the others
    with --nowait) until both agents own one; every one running."""
    if cluster.names:
        return cluster.json("ls", APP, "-l")
    created = cluster.json("add", APP, "wörker-0", "-q", "tasks", "--max", "2")
    assert created["state"] == "running", created
    owners = {created["agent"]}
    cluster.names.append(created["name"])
    for _ in range(12):
        if len(owners) == 2:
            break
        created = cluster.json("add", APP, "--nowait")
        cluster.names.append(created["name"])
        owners.add(created["agent"])
    assert owners == {"agent1", "agent2"}

    def all_running() -> list[dict[str, Any]] | None:
        listed = cluster.json("ls", APP, "-l")
        return listed if {i["state"] for i in listed} == {"running"} else None

    return wait_until(all_running, 60, interval=0.5, what="every instance running")


def test_status_shows_the_instances_of_both_agents(cluster: Cluster) -> None:
    instances = instances_on_both_agents(cluster)
    assert sorted(i["name"] for i in instances) == sorted(cluster.names)

    lines = cluster.ok("status").splitlines()
    assert lines[0].split() == ["APP", "NAME", "AGENT", "STATE", "PID", "RESTARTS", "QUEUES"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    for instance in instances:
        row = rows[instance["name"]]
        assert row[0] == APP
        assert row[2:5] == [instance["agent"], "running", str(instance["pid"])]
    assert {row[2] for row in rows.values()} == {"agent1", "agent2"}
    assert rows["wörker-0"][6] == "tasks"

    # The same from the other agent, as JSON.
    other = cluster.json("--url", cluster.agents[1].url, "status")
    assert {(i["name"], i["agent"]) for i in other} >= {(i["name"], i["agent"]) for i in instances}

    agents = cluster.ok("agents").splitlines()
    assert [line.split()[0] for line in agents[1:]] == ["agent1", "agent2"]
    assert all(line.split()[2] == "yes" for line in agents[1:])
    assert APP in cluster.ok("apps").splitlines()
    assert sorted(cluster.ok("ls", APP).splitlines()) == sorted(cluster.names)


def test_scale_queues_stats_and_log_of_a_remote_instance(cluster: Cluster) -> None:
    instances = instances_on_both_agents(cluster)
    # An instance owned by agent2, asked through agent1, by its name alone.
    remote = next(i for i in instances if i["agent"] == "agent2")["name"]
    assert cluster.json("scale", remote, "3", "1") == {"max": 3, "min": 1}
    assert cluster.ok("consume", remote, "extra") == f"{remote} consumes from extra\n"
    through_owner = cluster.json("--url", cluster.agents[1].url, "ls", APP, "-l")
    assert "extra" in next(i for i in through_owner if i["name"] == remote)["queues"]
    assert cluster.ok("cancel", f"{APP}/{remote}", "extra") == f"{remote} no longer consumes from extra\n"
    wait_until(
        lambda: (cluster.json("stats", remote).get("autoscaler") or {}).get("max") == 3,
        30,
        interval=0.5,
        what="the autoscale range applied",
    )
    log = wait_until(lambda: cluster.ok("log", remote, "-n", "5"), 30, interval=0.5, what="a worker log")
    assert 1 <= len(log.splitlines()) <= 5
    tail = cluster.json("log", remote, "-n", "3")
    assert tail["agent"] == "agent2" and tail["name"] == remote and len(tail["lines"]) <= 3


def test_rolling_restart_then_rm(cluster: Cluster) -> None:
    instances = instances_on_both_agents(cluster)
    before = {i["name"]: i["pid"] for i in instances}
    started = time.monotonic()
    result = cluster.scs("restart-app", APP, "--rolling")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no spinner when stderr is not a terminal
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "RESULT"]
    assert sorted(row[0] for row in rows[1:]) == sorted(before)
    assert {row[1] for row in rows[1:]} == {"restarted"}
    after = {i["name"]: i for i in cluster.json("status") if i["app"] == APP}
    for name, pid in before.items():
        assert after[name]["pid"] not in (None, pid)
        assert after[name]["state"] == "running"
    assert time.monotonic() - started < 90

    victim = cluster.names[-1]
    pid = after[victim]["pid"]
    removed = cluster.json("rm", victim)
    assert removed["name"] == victim and removed["pid"] is None
    wait_until(lambda: not pid_alive(pid), 30, what="the deleted instance's worker to exit")
    assert victim not in cluster.ok("ls", APP).splitlines()
    assert not ping(victim, timeout=0.5)
    cluster.names.remove(victim)


def test_unknown_instance_is_the_api_message_exit_1(cluster: Cluster) -> None:
    for argv in (["stats", "nope"], ["rm", "nope"], ["log", f"{APP}/nope"]):
        result = cluster.scs(*argv)
        assert result.returncode == 1, argv
        assert result.stdout == ""
        assert "no instance named 'nope'" in result.stderr
        assert "(HTTP 404)" in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_parameter_is_a_usage_error_exit_2(cluster: Cluster) -> None:
    result = cluster.scs("scale", "wörker-0", "0")
    assert result.returncode == 2
    assert "Invalid value for 'MAX'" in result.stderr
    result = cluster.scs("add", APP, "-q", "dq.private")
    assert result.returncode == 2
    assert "'-q' / '--queues'" in result.stderr
    # Only the agent knows that the name is taken with other settings.
    instances_on_both_agents(cluster)
    result = cluster.scs("add", APP, "wörker-0", "--max", "7")
    assert result.returncode == 1
    assert "(HTTP 409)" in result.stderr
    # ... and that a new maximum is below the instance's current minimum.
    assert cluster.json("scale", "wörker-0", "2", "2") == {"max": 2, "min": 2}
    result = cluster.scs("scale", "wörker-0", "1")
    assert result.returncode == 1
    assert result.stderr == "Error: min (2) would be greater than max (1) (HTTP 400) [parameter: max]\n"
    assert cluster.json("scale", "wörker-0", "2", "1") == {"max": 2, "min": 1}


def test_agent_down_is_one_clear_line_exit_1(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cluster.scs("status", SCS_URL=url)
    assert result.returncode == 1
    assert result.stderr == f"Error: cannot reach the agent at {url}: connection refused\n"


def test_wrong_or_missing_token_exit_1_naming_the_problem(cluster: Cluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-of-this-cluster\n")
    for env in ({"SCS_TOKEN_FILE": str(wrong)}, {"SCS_TOKEN_FILE": ""}):
        result = cluster.scs("apps", **env)
        assert result.returncode == 1, env
        assert "missing or wrong bearer token (HTTP 401)" in result.stderr
        assert "--token-file" in result.stderr
        assert TOKEN not in result.stderr + result.stdout
