"""/metrics and the access token on a real agent process with real Celery
workers (issue 5, acceptances 3 and 4): counters move when a worker is
created, killed and restarted; without the token nothing gets through."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.agents import AgentProcess, kill_leftover_workers, pid_alive, wait_until

TOKEN = "integration-token-" + uuid.uuid4().hex


def call(agent: AgentProcess, method: str, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(agent.url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(agent: AgentProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = call(agent, "GET", "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class TokenAgent(AgentProcess):
    """An agent whose readiness probe carries the token."""

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return call(self, "GET", "/ping/")[0] == 200
        except OSError:
            return False


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    agent = TokenAgent(
        tmp_path / "agent", "surfaces-agent", "--without-srs", "--interval", "1", "--auth-token-file", str(token_file)
    )
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)


def test_without_the_token_nothing_gets_through(agent: AgentProcess) -> None:
    assert "need the token of" in agent.log_text()
    name = f"tok-{uuid.uuid4().hex[:8]}"
    for token in (None, "wrong", TOKEN + "x"):
        for method, path in [
            ("PUT", f"/foo/instances/{name}/"),
            ("POST", "/foo/queues/q1/"),
            ("PUT", "/bar/"),
            ("GET", "/foo/instances/"),
            ("GET", "/metrics"),
        ]:
            status, body = call(agent, method, path, token)
            assert status == 401, (method, path, token)
            assert json.loads(body) == {"error": "missing or wrong bearer token"}
    # Nothing was created: no instance, no queue, no app.
    status, body = call(agent, "GET", "/foo/instances/")
    assert (status, json.loads(body)) == (200, [])
    assert call(agent, "GET", "/foo/queues/q1/")[0] == 404
    assert call(agent, "GET", "/bar/")[0] == 404
    assert call(agent, "GET", "/admin/", token=None)[0] == 401
    assert call(agent, "GET", "/admin/")[0] == 200


def test_counters_move_when_a_worker_is_created_killed_and_restarted(agent: AgentProcess) -> None:
    name = f"met-{uuid.uuid4().hex[:8]}"
    start = scrape(agent)
    assert value(start, "scs_instances", state="running") == 0

    status, body = call(agent, "PUT", f"/foo/instances/{name}/")
    assert status == 201, body
    instance: dict[str, Any] = json.loads(body)
    assert instance["state"] == "running"
    created = scrape(agent)
    assert value(created, "scs_instances", state="running") == 1
    assert value(created, "scs_worker_starts_total") == 1
    assert value(created, "scs_operations_total", operation="Node.add", status="201") == 1
    assert value(created, "scs_http_requests_total", route="instance_create_named", method="PUT", status="201") == 1
    assert value(created, "scs_supervisor_wakeup_seconds_count") >= 1
    assert value(created, "scs_worker_ping_seconds_count") >= 1

    # Killed: the supervisor notices the exit and starts a new worker.
    os.kill(instance["pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(instance["pid"]), 10, what="the killed worker to die")
    killed = wait_until(
        lambda: (
            (s := scrape(agent))
            and value(s, "scs_instance_restarts_total", app="foo", instance=name) == 1
            and value(s, "scs_instances", state="running") == 1
            and s
        ),
        30,
        interval=0.25,
        what="the restart to show in /metrics",
    )
    assert value(killed, "scs_worker_exits_total", how="signal") == 1
    assert value(killed, "scs_worker_starts_total") == 2
    assert value(killed, "scs_supervisor_events_total", event="successfully restarted") == 1

    # Restarted through the API.
    assert call(agent, "POST", f"/foo/instances/{name}/restart")[0] == 200
    restarted = wait_until(
        lambda: (s := scrape(agent)) and value(s, "scs_instance_restarts_total", app="foo", instance=name) == 2 and s,
        30,
        interval=0.25,
        what="the API restart to show in /metrics",
    )
    assert value(restarted, "scs_worker_starts_total") == 3

    assert call(agent, "DELETE", f"/foo/instances/{name}/")[0] == 200
    deleted = scrape(agent)
    assert sum(value(deleted, "scs_instances", state=state) for state in ("running", "starting")) == 0
    assert (
        value(deleted, "scs_worker_exits_total", how="signal") + value(deleted, "scs_worker_exits_total", how="code")
        == 3
    )
