"""The manhole of a real agent process over a real TCP connection, speaking
telnet (issue 5, acceptance 2).  Loopback only; every wait bounded; the
agent and its workers are stopped by pid."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agents import BIN, AgentProcess, free_port, kill_leftover_workers
from tests.telnet_support import TelnetClientSide, line


class TelnetConnection:
    """A blocking telnet client on a socket, every read bounded."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.client = TelnetClientSide()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: str, timeout: float = 10.0, start: int = 0) -> str:
        """Read until ``marker`` appears in the text after offset ``start``."""
        deadline = time.monotonic() + timeout
        while marker not in self.client.text[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout} s; got {self.client.text[-500:]!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"connection closed before {marker!r}: {self.client.text[-500:]!r}")
            reply = self.client.received(data)
            if reply:
                self.sock.sendall(reply)
        return self.client.text[start:]

    def login(self, user: str, password: str) -> None:
        self.read_until("Username: ")
        self.send(user.encode() + b"\r\n")
        self.read_until("Password: ")
        self.send(password.encode() + b"\r\n")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    passwd = tmp_path / "manhole.passwd"
    passwd.write_text("operator:letmein-0451\n")
    passwd.chmod(0o600)
    port = free_port()
    agent = AgentProcess(
        tmp_path / "agent",
        "manhole-agent",
        "--without-srs",
        "--interval",
        "1",
        "--manhole",
        f"tcp:{port}:interface=127.0.0.1",
        "--manhole-passwd",
        str(passwd),
    )
    agent.manhole_port = port  # type: ignore[attr-defined]
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)


def test_log_in_and_list_the_agents_instances(agent: AgentProcess) -> None:
    for name in ("mh-one", "mh-two"):
        status, body, _ = agent.request("PUT", f"/foo/instances/{name}/?nowait=1")
        assert status == 202, body
    log = agent.log_text()
    assert "manhole on tcp:" in log and "loopback only, password file" in log
    assert "HTTP on tcp:" in log and "loopback only, no token" in log
    telnet = TelnetConnection(agent.manhole_port)  # type: ignore[attr-defined]
    try:
        telnet.login("operator", "letmein-0451")
        telnet.read_until(">>> ")
        mark = len(telnet.client.text)
        telnet.send(line("sorted(s.name for s in store.list_nodes())"))
        assert "['mh-one', 'mh-two']" in telnet.read_until("['mh-one', 'mh-two']", start=mark)
        mark = len(telnet.client.text)
        telnet.send(line("agent.agent_id, type(supervisor).__name__, srs"))
        telnet.read_until("('manhole-agent', 'Supervisor', None)", start=mark)
    finally:
        telnet.close()


def test_a_wrong_password_is_refused(agent: AgentProcess) -> None:
    telnet = TelnetConnection(agent.manhole_port)  # type: ignore[attr-defined]
    try:
        telnet.login("operator", "letmein")
        text = telnet.read_until("Authentication failed")
        telnet.read_until("Username: ", start=text.index("Authentication failed"))
        assert ">>>" not in telnet.client.text
        # Keystrokes now go to the user name prompt, not to Python.
        telnet.send(b"store\r\n")
        telnet.read_until("Password: ", start=len(telnet.client.text) - 20)
        assert ">>>" not in telnet.client.text
    finally:
        telnet.close()


def test_the_agent_refuses_a_manhole_without_a_password_file(tmp_path: Path) -> None:
    argv = [
        str(BIN / "scs-agent"),
        f":{free_port()}",
        "-D",
        str(tmp_path / "d"),
        "--without-srs",
        "--manhole",
        f"tcp:{free_port()}:interface=127.0.0.1",
        "--manhole-passwd",
        str(tmp_path / "missing"),
    ]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode != 0
    assert b"--manhole-passwd" in done.stderr
