"""App settings ``env``, ``workdir``, ``python`` and ``task_events`` on a
real agent with real workers on the real broker, and Flower as the monitor
that ``task_events`` is for."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.integration.agents import BROKER, AgentProcess, free_port, kill_leftover_workers, wait_until

HERE = str(Path(__file__).resolve().parent)
APP = "celeryapp_for_tests"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "agent1", "agent1", "--without-srs", "--interval", "1")
    agent.start()
    yield agent
    agent.stop()
    kill_leftover_workers(agent.directory)


@pytest.fixture
def client() -> Iterator[Celery]:
    client = Celery(broker=BROKER, set_as_current=False)
    client.conf.result_backend = "rpc://"
    yield client
    client.close()


def unique(prefix: str) -> str:
    """Names of their own: other tests' workers share the broker."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def run_task(
    client: Celery, instance: str, name: str = "scs_tests.env_and_cwd", args: tuple[Any, ...] = ()
) -> tuple[str, Any]:
    """Send ``name`` to the instance's private queue; its id and result."""
    result = client.send_task(name, args, queue=f"dq.{instance}")
    return result.id, result.get(timeout=30)


def test_a_task_sees_the_apps_env_and_workdir(agent: AgentProcess, client: Celery, tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir(mode=0o755)
    app, name = unique("settings"), unique("w")
    first, second = unique("hello-"), unique("changed-")
    settings = {
        "celery_app": APP,
        # The app finds its module through its own PYTHONPATH.
        "env": {"SCS_TEST_VAR": first, "PYTHONPATH": HERE},
        "workdir": str(workdir),
        "python": sys.executable,  # the agent's, given explicitly
    }
    status, body, _ = agent.request("PUT", f"/{app}/", settings)
    assert status == 201, body
    assert body["env"] == settings["env"] and body["python"] == sys.executable
    status, instance, _ = agent.request("PUT", f"/{app}/instances/{name}/")
    assert status == 201, instance
    assert instance["state"] == "running", instance
    assert run_task(client, name)[1] == [first, str(workdir)]

    # Changing a setting restarts the app's workers, which then see it.
    old_pid = instance["pid"]
    settings["env"] = {"SCS_TEST_VAR": second, "PYTHONPATH": HERE}
    assert agent.request("PUT", f"/{app}/", {"env": settings["env"]})[0] == 200

    def replaced() -> bool:
        current = agent.request("GET", f"/{app}/instances/{name}/")[1]
        return current["pid"] not in (None, old_pid) and current["state"] == "running"

    wait_until(replaced, 60, what="the worker to be replaced with the new env")
    assert run_task(client, name)[1] == [second, str(workdir)]
    # The log names the variables, never their values.
    log = agent.log_text()
    assert first not in log and second not in log


def test_bad_python_and_workdir_are_refused_and_nothing_changes(agent: AgentProcess, tmp_path: Path) -> None:
    app = unique("settings")
    assert agent.request("PUT", f"/{app}/", {"celery_app": APP})[0] == 201
    before = agent.request("GET", f"/{app}/")[1]
    not_executable = tmp_path / "python"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    for parameter, value in (
        ("python", str(not_executable)),
        ("python", str(tmp_path / "missing")),
        ("workdir", str(tmp_path / "missing")),
        ("workdir", "relative"),
        ("env", {"LD_PRELOAD": str(tmp_path / "x.so")}),
    ):
        status, body, _ = agent.request("PUT", f"/{app}/", {"celery_app": "other", parameter: value})
        assert status == 400, body
        assert body["parameter"] == parameter
    assert agent.request("GET", f"/{app}/")[1] == before


class Flower:
    """Flower on a free loopback port, reading the broker's events; its API
    behind basic auth of a password made for this run."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.auth = "scs:" + secrets.token_hex(8)
        self.log_path = directory / f"flower-{self.port}.log"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-b",
            BROKER,
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
            f"--basic_auth={self.auth}",
            # Flower would otherwise turn events on in every worker itself
            # (enable_events), and the test would prove nothing.
            "--enable_events=False",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        request.add_header("Authorization", "Basic " + base64.b64encode(self.auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"flower exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            self.get("/api/tasks")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[Flower]:
    monitor = Flower(tmp_path)
    try:
        wait_until(monitor.answers, 30, what="flower to answer")
        yield monitor
    finally:
        monitor.stop()


def test_flower_lists_the_tasks_of_an_app_with_task_events(agent: AgentProcess, client: Celery, flower: Flower) -> None:
    quiet_app, events_app = unique("quiet"), unique("events")
    quiet, loud = unique("q"), unique("e")
    common = {"celery_app": APP, "env": {"PYTHONPATH": HERE}}
    assert agent.request("PUT", f"/{quiet_app}/", common)[0] == 201
    status, body, _ = agent.request("PUT", f"/{events_app}/", {**common, "task_events": True})
    assert status == 201 and body["task_events"] is True, body
    for app, name in ((quiet_app, quiet), (events_app, loud)):
        status, instance, _ = agent.request("PUT", f"/{app}/instances/{name}/")
        assert status == 201 and instance["state"] == "running", instance

    # The quiet worker's task first: had it sent events, Flower would have
    # read them before the other worker's, which run later.
    quiet_id, _ = run_task(client, quiet, "scs_tests.add", (2, 3))
    loud_id, _ = run_task(client, loud)

    def listed() -> Any:
        tasks = flower.get("/api/tasks")
        return tasks if tasks.get(loud_id, {}).get("state") == "SUCCESS" else None

    tasks = wait_until(listed, 30, what="flower to list the task as succeeded")
    assert tasks[loud_id]["worker"].startswith(f"{loud}@")
    assert quiet_id not in tasks
