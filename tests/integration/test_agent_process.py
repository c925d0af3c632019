"""The agent as operators start it: console script, twistd plugin, restart
with the same instance directory, and a non-editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.integration.agents import BIN, AgentProcess

REPO = Path(__file__).resolve().parents[2]


def test_twistd_help_lists_the_plugin() -> None:
    out = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "scs-agent" in out


@pytest.mark.parametrize("command", ["scs-agent", "twistd"])
def test_bad_option_exits_non_zero_with_usage(command: str) -> None:
    argv = [str(BIN / command)] + (["-n", "scs-agent"] if command == "twistd" else [])
    result = subprocess.run([*argv, "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no-such-option" in result.stderr + result.stdout


def test_console_script_serves_the_api_and_keeps_state_across_restart(agents, tmp_path) -> None:
    agent = agents("--without-srs", "--interval", "1")
    assert agent.request("GET", "/ping/")[:2] == (200, {"ok": "pong"})
    assert agent.request("PUT", "/foo/", {"celery_app": "proj:app"})[0] == 201
    status, body, _ = agent.request("PUT", "/foo/instances/w1?nowait=1", {"max_concurrency": 2})
    assert status == 202
    assert agent.request("PUT", "/foo/queues/tasks", {"exchange": "ex"})[0] == 201
    assert agent.request("PUT", "/foo/instances/w1/queues/tasks")[0] == 201
    assert agent.request("POST", "/foo/instances/w1/disable")[0] == 200
    agent.stop_cleanly()

    again = AgentProcess(agent.directory, "agent1", "--without-srs", port=agent.port)
    try:
        again.start()
        assert again.request("GET", "/foo/")[1]["celery_app"] == "proj:app"
        status, instance, _ = again.request("GET", "/foo/instances/w1")
        assert status == 200
        assert instance["queues"] == ["tasks"]
        assert instance["max_concurrency"] == 2
        assert instance["is_enabled"] is False
        assert again.request("GET", "/foo/queues/tasks")[1]["exchange"] == "ex"
    finally:
        again.stop()


def test_twistd_plugin_serves_the_api(agents) -> None:
    agent = agents("--without-srs", command=[str(BIN / "twistd"), "-n", "--pidfile=", "scs-agent"])
    assert agent.request("GET", "/ping/")[:2] == (200, {"ok": "pong"})
    assert agent.request("GET", "/agents/")[1][0]["id"] == "agent1"


def test_plugin_is_found_from_a_normal_install(tmp_path: Path) -> None:
    """A regular (non-editable) install puts the plugin where twistd looks."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # Dependencies come from the test's own environment (no network), but
    # not its editable install of this project: a path line in a .pth file
    # does not process the .pth files of the directory it adds.
    ours = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    Path(site, "deps-from-test-env.pth").write_text(ours + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(REPO)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import scs, twisted.plugins.scs_plugin as p, sys;"
        "from twisted.scripts.twistd import run;"
        "print(scs.__file__);"
        "sys.argv=['twistd','--help']; run()"
    )
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert str(REPO) not in result.stdout.splitlines()[0], "imported the checkout, not the install"
    assert "scs-agent" in result.stdout
