"""The real agent on an empty or damaged store: it stops at start with one
clear line and exit status 1 (never a silently empty store, never an agent
that answers /ping/ and fails every call), under ``scs-agent`` and under
``twistd -n scs-agent``; ``--reset-store`` starts fresh and keeps the old
file aside."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from scs.store import STORE_FILENAME, Store
from tests.integration.agents import BIN, BROKER, AgentProcess, free_port

COMMANDS = {
    "scs-agent": [str(BIN / "scs-agent")],
    "twistd": [str(BIN / "twistd"), "-n", "--pidfile=", "scs-agent"],
}


def run_agent(command: str, directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start an agent that is expected to stop by itself at start."""
    return subprocess.run(
        [*COMMANDS[command], f":{free_port()}", "-i", "agent1", "-D", str(directory), "--without-srs", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def damaged_store(directory: Path) -> Path:
    """A real store with rows, one page in the middle overwritten."""
    directory.mkdir(parents=True, exist_ok=True)
    store = Store.in_directory(directory)
    store.add_node("foo", "w0", BROKER)
    with store.engine.begin() as connection:
        for i in range(1, 300):
            connection.exec_driver_sql(
                "INSERT INTO node (name, app_id, max_concurrency, min_concurrency, is_enabled,"
                " created_at, arguments) VALUES (?, 1, 1, 1, 1, ?, '[\"--loglevel=INFO\"]')",
                (f"w{i}", float(i)),
            )
    store.close()
    path = directory / STORE_FILENAME
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA freelist_count").fetchone() == (0,)
    connection.close()
    middle = path.stat().st_size // 2 // 4096 * 4096
    with open(path, "r+b") as f:
        f.seek(middle)
        f.write(b"\xff" * 4096)
    return path


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, problem: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if str(path) in line]
    assert problem in line, output
    assert "--reset-store" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_empty_store_file_stops_the_agent(command: str, tmp_path: Path) -> None:
    directory = tmp_path / "agent1"
    directory.mkdir()
    path = directory / STORE_FILENAME
    path.write_bytes(b"")
    result = run_agent(command, directory)
    assert_refused(result, path, "is empty (0 bytes)")
    assert path.read_bytes() == b""  # left as it was


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_damaged_store_file_stops_the_agent(command: str, tmp_path: Path) -> None:
    path = damaged_store(tmp_path / "agent1")
    before = path.read_bytes()
    result = run_agent(command, path.parent)
    assert_refused(result, path, "is damaged")
    assert path.read_bytes() == before


def test_reset_store_starts_fresh_and_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "agent1"
    path = damaged_store(directory)
    before = path.read_bytes()
    agent = AgentProcess(directory, "agent1", "--without-srs", "--reset-store")
    try:
        agent.start()
        assert agent.request("GET", "/ping/")[:2] == (200, {"ok": "pong"})
        assert agent.request("GET", "/foo/")[0] == 404  # the old rows are not in it
        assert agent.request("PUT", "/foo/")[0] == 201  # the fresh store works
        (backup,) = directory.glob(STORE_FILENAME + ".*.bak")
        assert backup.read_bytes() == before
        assert str(backup) in agent.log_text()
    finally:
        agent.stop_cleanly()
    # The next start (without --reset-store) finds the new store sound.
    again = AgentProcess(directory, "agent1", "--without-srs", port=agent.port)
    try:
        again.start()
        assert again.request("GET", "/foo/")[0] == 200
    finally:
        again.stop()
