"""The agent as the README has a new user start it: a port already in use
is one line and exit status 1; Ctrl-C (and SIGTERM) is a clean stop and
exit status 0, under ``scs-agent`` and under ``make run`` in a terminal;
building the project prints no warning of its own making."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.agents import (
    BIN,
    AgentProcess,
    free_port,
    kill_leftover_workers,
    pid_alive,
    wait_until,
    worker_pids,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "scs-agent"), *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_a_busy_http_port_is_one_line_and_exit_status_1(busy_port: int, tmp_path: Path) -> None:
    result = run_agent(f":{busy_port}", "-i", "x", "-D", str(tmp_path / "x"))
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert lines == [
        f"scs-agent: cannot listen on 127.0.0.1:{busy_port}: address already in use (another agent or program holds it)"
    ], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_busy_manhole_port_is_one_line_and_exit_status_1(busy_port: int, tmp_path: Path) -> None:
    passwd = tmp_path / "manhole.passwd"
    passwd.write_text("operator:secret\n")
    passwd.chmod(0o600)
    result = run_agent(
        f":{free_port()}",
        "-i",
        "x",
        "-D",
        str(tmp_path / "x"),
        "--without-srs",
        "--manhole",
        f"tcp:{busy_port}:interface=127.0.0.1",
        "--manhole-passwd",
        str(passwd),
    )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_is_a_clean_stop_and_exit_status_0(signum: int, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", "sig-agent").start()
    try:
        # Sent to the process group, as a terminal's Ctrl-C is.
        os.killpg(agent.pid, signum)
        assert agent.process is not None
        assert agent.process.wait(60) == 0
        assert "Main loop terminated." in agent.log_text()
    finally:
        agent.stop()


def test_ctrl_c_stops_the_workers_and_exits_0(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", "ctrl-c-agent", "--without-srs").start()
    try:
        assert agent.request("PUT", "/foo/instances/ctrl-c-worker/")[0] == 201
        pids = worker_pids(agent.directory)
        assert list(pids) == ["ctrl-c-worker"]
        os.killpg(agent.pid, signal.SIGINT)
        assert agent.process is not None
        assert agent.process.wait(60) == 0
        assert not pid_alive(pids["ctrl-c-worker"])
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)


def session_pids(session: int) -> list[int]:
    """The processes of a session, from /proc (a process group of its own
    does not take a process out of its session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            pids.append(int(stat.parent.name))
    return pids


def test_ctrl_c_on_make_run_in_a_terminal_exits_0(tmp_path: Path) -> None:
    """``make run`` in a terminal, then Ctrl-C typed on it: make exits 0."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    if BIN != REPO / ".venv" / "bin":
        pytest.skip(f"make run uses {REPO / '.venv'}, and these tests run from {BIN.parent}")
    # make -q: whether the virtualenv is up to date; otherwise make run
    # would reinstall it first, which is not this test's business.
    stale = subprocess.run([make, "-q", ".venv/bin/.installed"], cwd=REPO, timeout=60, check=False).returncode
    if stale:
        pytest.skip("the virtualenv is older than setup.py or constraints.txt: make run would reinstall it first")
    port = free_port()
    directory = tmp_path / "agent"
    args = f":{port} -i make-run-agent -D {directory} --without-srs"
    # Not a sub-make of the make that may run these tests (make test).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    pid, master = pty.fork()
    if pid == 0:  # the child, in a session whose controlling terminal is the pty
        try:
            os.chdir(REPO)
            os.execvpe(make, [make, "--no-print-directory", "run", f"ARGS={args}"], env)
        finally:
            os._exit(127)
    output: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every process of the terminal has closed it
                return
            if not chunk:
                return
            output.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = None
    try:

        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"GET /ping/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    return b"pong" in s.recv(4096)
            except OSError:
                return False

        wait_until(pong, 60, what="the agent of make run to answer /ping/")
        os.write(master, b"\x03")  # Ctrl-C, typed on the terminal
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            else:
                time.sleep(0.1)
    finally:
        if status is None:
            for leftover in session_pids(pid):
                os.kill(leftover, signal.SIGKILL)
            os.waitpid(pid, 0)
        reader.join(10)
        os.close(master)
        kill_leftover_workers(directory)
    text = b"".join(output).decode(errors="replace")
    assert status is not None, f"make run still running 60 s after Ctrl-C:\n{text[-3000:]}"
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert "Main loop terminated." in text
    assert "make: ***" not in text  # make's "Interrupt" or "Error N"


# One build hook per process, as pip calls them.
SETUPTOOLS_WARNINGS = """
import json, sys, warnings
from setuptools import build_meta

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    built = getattr(build_meta, sys.argv[1])(sys.argv[2])
found = [
    f"{w.category.__name__}: {w.message}"
    for w in caught
    if "setuptools" in w.filename or "distutils" in w.filename or w.category.__module__.startswith("setuptools")
]
print("RESULT " + json.dumps({"built": built, "warnings": found}))
"""


def build(hook: str, source: Path, directory: Path) -> str:
    """Runs a setuptools build hook on ``source``; the file it built."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS")}
    result = subprocess.run(
        [sys.executable, "-c", SETUPTOOLS_WARNINGS, hook, str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=source,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    report = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert report["warnings"] == [], "\n\n".join(report["warnings"])
    # distutils' own "warning: ..." lines (e.g. package data not found).
    assert [line for line in result.stdout.splitlines() if line.lower().startswith("warning")] == []
    return report["built"]


def test_building_the_project_prints_no_setuptools_warning(tmp_path: Path) -> None:
    """The build backend's output (which ``pip install -q`` hides) has no
    warning about this project's configuration, for the editable install
    ``make`` does and for a regular wheel."""
    check = subprocess.run([sys.executable, "-c", "import setuptools"], capture_output=True, timeout=60)
    if check.returncode:
        pytest.skip("no setuptools in the test environment to build with")
    # A copy of what the build reads: the build leaves build/ and
    # scs_agent.egg-info/ where it runs.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.rst"):
        shutil.copy(REPO / name, source / name)
    for name in ("scs", "twisted"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    # The default editable mode puts the checkout on sys.path, where
    # twistd's plugin search finds twisted/plugins/scs_plugin.py.
    with zipfile.ZipFile(tmp_path / build("build_editable", source, tmp_path)) as editable:
        pth = [name for name in editable.namelist() if name.endswith(".pth")]
        assert [editable.read(name).decode().strip() for name in pth] == [str(source)]
    with zipfile.ZipFile(tmp_path / build("build_wheel", source, tmp_path)) as wheel:
        names = set(wheel.namelist())
    assert {
        "twisted/plugins/scs_plugin.py",
        "scs/http/templates/admin.xml",
        "scs/migrations/env.py",
        "scs/migrations/script.py.mako",
        "scs/migrations/versions/0001_initial.py",
    } <= names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
