"""Running real agents for integration tests: as processes, by pid.

Every wait is bounded; every agent started is stopped (TERM, then KILL)
and waited for, and its workers with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote

BIN = Path(sys.executable).parent
BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class AgentProcess:
    """One ``scs-agent`` process on a free loopback port."""

    def __init__(
        self,
        directory: Path,
        agent_id: str = "agent1",
        *extra: str,
        port: int | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.agent_id = agent_id
        self.port = port or free_port()
        self.extra = list(extra)
        self.command = command or [str(BIN / "scs-agent")]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory.parent / f"{self.directory.name}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            *self.command,
            f":{self.port}",
            "-i",
            self.agent_id,
            "-D",
            str(self.directory),
            *self.extra,
        ]
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until(self._ready, timeout, what=f"agent {self.agent_id} to answer /ping/")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            return self.request("GET", "/ping/")[0] == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait; SIGKILL after ``timeout``.  Returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def stop_cleanly(self, timeout: float = 60.0) -> None:
        """SIGTERM and check the agent shut down in order.

        twistd stops the reactor (and every service) on SIGTERM, then ends
        by the same signal, so -SIGTERM is the status of a clean stop."""
        status = self.stop(timeout)
        assert status in (0, -signal.SIGTERM), f"agent exited with {status}"
        assert "Main loop terminated." in self.log_text()

    def kill(self) -> None:
        """kill -9 the agent alone (its workers stay, as after a crash)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any, Message]:
        data = None
        headers = {}
        if params is not None:
            data = json.dumps(params).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.url + quote(path, safe="/?=&%"), data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null"), response.headers
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, json.loads(body) if body else None, e.headers

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def worker_pids(directory: Path) -> dict[str, int]:
    """Instance name -> pid from the agent's per-instance pid files."""
    pids = {}
    for pidfile in Path(directory).glob("*/worker.pid"):
        try:
            pids[pidfile.parent.name] = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
    return pids


def kill_leftover_workers(directory: Path) -> None:
    """Last-resort cleanup: kill workers a failed test left behind."""
    for pid in worker_pids(directory).values():
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
