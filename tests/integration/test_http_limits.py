"""HTTP limits on a real agent process (issue "Trust on the bus", item 8):
thousands of idle connections neither lock operators out nor starve the
supervisor of file descriptors; an oversized head gets a JSON 431; idle
and silent connections are closed on time; a duplicated endpoint keyword
is refused at start.

Everything runs on loopback; every wait is bounded; the agent is stopped by
pid and its workers cleaned up.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.agents import BIN, AgentProcess, free_port

WANTED_IDLE = 20_000
# Descriptors the test process keeps for itself (pytest, logs, the client
# requests) beyond the idle sockets.
TEST_FD_RESERVE = 300
CAP = 1000  # the agent's default --max-connections


def _raise_own_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# A second process holding its share of the idle sockets, so that together
# they reach WANTED_IDLE whatever one process may open: it connects, prints
# how many it holds, and closes them all when its stdin closes.
_HOLDER = """
import sys, time
from tests.integration.test_http_limits import _open_idle, _raise_own_fd_limit
_raise_own_fd_limit()
sockets, established = _open_idle(int(sys.argv[1]), int(sys.argv[2]), time.monotonic() + 60)
print(len(sockets), established, flush=True)
sys.stdin.read()
"""


def _hold_idle_elsewhere(port: int, count: int) -> tuple[subprocess.Popen, int, int]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    held, established = (int(n) for n in holder.stdout.readline().split())
    return holder, held, established


def _open_idle(port: int, count: int, deadline: float) -> tuple[list[socket.socket], int]:
    """``count`` non-blocking connects to the agent, sending nothing; and
    how many completed the handshake before ``deadline``."""
    sockets: list[socket.socket] = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        code = s.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            s.close()
            if code in (errno.EADDRNOTAVAIL, errno.EAGAIN):
                break  # out of ephemeral ports: use what we have
            raise OSError(code, os.strerror(code))
        sockets.append(s)
    pending = set(sockets)
    with selectors.DefaultSelector() as selector:
        for s in sockets:
            selector.register(s, selectors.EVENT_WRITE)
        established = 0
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                s = key.fileobj
                selector.unregister(s)
                pending.discard(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    established += 1
    return sockets, established


def _timed_ping(agent: AgentProcess, timeout: float) -> float:
    began = time.monotonic()
    status, body, _ = agent.request("GET", "/ping/", timeout=timeout)
    assert (status, body) == (200, {"ok": "pong"})
    return time.monotonic() - began


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_thousands_of_idle_connections_neither_lock_out_nor_starve(agents) -> None:
    hard = _raise_own_fd_limit()
    count = min(WANTED_IDLE // 2, hard - TEST_FD_RESERVE)
    if count < 3 * CAP:
        pytest.skip(
            f"this process may open only {hard} files (hard RLIMIT_NOFILE): too few idle "
            f"sockets to fill the agent's {CAP}-connection cap several times"
        )
    # Long head and idle timeouts: only the connection cap protects the agent.
    agent = agents("--without-srs", "--interval", "1", "--http-header-timeout", "300", "--http-idle-timeout", "300")
    baseline = _timed_ping(agent, 10)
    sockets: list[socket.socket] = []
    holder = None
    try:
        began = time.monotonic()
        holder, held, held_established = _hold_idle_elsewhere(agent.port, WANTED_IDLE - count)
        sockets, established = _open_idle(agent.port, count, deadline=time.monotonic() + 60)
        opened_in = time.monotonic() - began
        established += held_established
        # While they are open: the agent still answers, quickly...
        latencies = [_timed_ping(agent, 10) for _ in range(5)]
        # ...holds no more than its cap of them...
        agent_fds = _fd_count(agent.pid)
        assert agent_fds < CAP + 200, agent_fds
        # ...and can still spawn a worker (pipes, log and pid files).
        status, body, _ = agent.request("PUT", "/foo/instances/", timeout=60)
        assert status == 201, body
        assert body["state"] == "running", body
        assert _timed_ping(agent, 10) < 5
        print(
            f"\n{len(sockets) + held} idle sockets opened in {opened_in:.1f} s "
            f"({established} completed the handshake); agent fds {agent_fds}; "
            f"/ping/ {baseline * 1000:.1f} ms before, "
            f"{min(latencies) * 1000:.1f}-{max(latencies) * 1000:.1f} ms under them; "
            f"worker {body['name']} running (pid {body['pid']})"
        )
        assert len(sockets) + held >= min(WANTED_IDLE, 3 * CAP), (len(sockets), held)
        assert max(latencies) < 5, latencies
        assert "connection cap" in agent.log_text()
    finally:
        for s in sockets:
            s.close()
        if holder is not None:
            holder.stdin.close()
            holder.wait(30)
    assert _timed_ping(agent, 10) < 5


def _recv_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_a_20kb_header_gets_a_json_431(agents) -> None:
    agent = agents("--without-srs")
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20 * 1024 + b"\r\n\r\n")
        answer = _recv_all(s, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"Content-Type: application/json" in head
    assert "16384" in json.loads(body)["error"]
    assert _timed_ping(agent, 10) < 5


def test_idle_and_silent_connections_are_closed_on_time(agents) -> None:
    agent = agents("--without-srs", "--http-idle-timeout", "1", "--http-header-timeout", "2")
    with (
        socket.create_connection(("127.0.0.1", agent.port), timeout=10) as kept,
        socket.create_connection(("127.0.0.1", agent.port), timeout=10) as silent,
    ):
        kept.sendall(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(10)
        first = kept.recv(65536)
        assert b" 200 " in first and b"pong" in first
        began = time.monotonic()
        rest = _recv_all(kept, 10)  # returns at EOF
        closed_after = time.monotonic() - began
        assert rest == b""
        assert 0.5 < closed_after < 5, closed_after
        assert _recv_all(silent, 10) == b""  # closed by the 2 s head deadline
        assert time.monotonic() - began < 6


def test_a_duplicated_endpoint_keyword_is_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [
            str(BIN / "scs-agent"),
            "--http",
            f"tcp:{port}:interface=127.0.0.1:interface=0.0.0.0",
            "-i",
            "agent1",
            "-D",
            str(tmp_path / "agent1"),
            "--without-srs",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert "interface= twice" in result.stderr
    # Nothing was bound.
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))


def test_hosts_and_origins_on_a_real_agent(agents) -> None:
    agent = agents("--without-srs", "--allowed-host", "scs.example.test")

    def send(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
            s.sendall(request)
            return _recv_all(s, 10)

    assert b" 200 " in send(b"GET /ping/ HTTP/1.0\r\nHost: scs.example.test\r\n\r\n")
    rebound = send(b"GET /ping/ HTTP/1.0\r\nHost: attacker.example\r\n\r\n")
    assert rebound.startswith(b"HTTP/1.0 400 ") and b'"error"' in rebound
    cross = send(
        b"PUT /foo/ HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nOrigin: http://attacker.example\r\n"
        b"Content-Length: 0\r\n\r\n" % agent.port
    )
    assert cross.startswith(b"HTTP/1.0 403 ") and b'"error"' in cross
    assert agent.request("GET", "/foo/")[0] == 404  # the refused PUT changed nothing
    redirect = send(b"GET /admin HTTP/1.0\r\nHost: scs.example.test\r\n\r\n")
    assert b"\r\nLocation: /admin/\r\n" in redirect
