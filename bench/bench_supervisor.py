"""Benchmark of the supervisor (issue 3), printed as one table.

Each row is measured side by side in the same run, alternating the two
sides so that machine noise hits both alike; figures are medians.

    instance ready      API PUT (waits for the first ping) until a ping by
                        Celery's own client answers, against starting the
                        very same ``celery worker`` argv by hand and pinging
                        it until it answers.
    crash recovery      kill -9 of the worker until it answers a ping again:
                        the agent against supervisord (autorestart=true)
                        running the same command.
    wake-up             one Supervisor.wake() with 1, 10, 20 running
                        instances on the real reactor: wall time and broker
                        round trips (Celery control calls).

Needs RabbitMQ on 127.0.0.1:5672, ``scs-agent`` and ``supervisord`` next to
this Python.  Usage:

    python bench/bench_supervisor.py [--repeat N] [--sizes 1,10,20]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import answering  # noqa: E402
from tests.integration.agents import BIN, BROKER, AgentProcess, pid_alive  # noqa: E402

HOST = socket.gethostname()
# The agent's id: its workers answer to <instance>@<agent id> (a worker copied
# from one of them by hand keeps that -n).
AGENT_ID = "bench"
CLIENT = Celery(broker=BROKER, set_as_current=False)
SETTLE = 10.5
HTTP_TIMEOUT = 60.0


def ping(node: str, timeout: float = 0.05) -> bool:
    return node in answering(CLIENT, [node], timeout)


def wait_ping(node: str, limit: float = 60.0) -> float:
    """Ping until ``node`` answers; the monotonic time it did."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ping(node):
            return time.monotonic()
    raise RuntimeError(f"{node} did not answer within {limit} s")


def recovery(pid: int, node: str) -> float:
    """kill -9 ``pid``; seconds until ``node`` answers a ping again."""
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.001)
    return wait_ping(node) - t0


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode() for a in raw.split(b"\0") if a]


def wait_gone(pid: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def ready_row(agent: AgentProcess, app: str, repeat: int, work: Path) -> tuple[float, float]:
    """Median seconds to a first answer: (agent PUT, same argv by hand)."""
    agent_times, hand_times = [], []
    for _ in range(repeat):
        name = f"rd{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        status, body, _ = agent.request("PUT", f"/{app}/instances/{name}/", timeout=HTTP_TIMEOUT)
        assert status == 201, (status, body)
        t1 = wait_ping(f"{name}@{AGENT_ID}")
        agent_times.append(t1 - t0)
        argv = cmdline(body["pid"])
        agent.request("DELETE", f"/{app}/instances/{name}/", timeout=HTTP_TIMEOUT)
        wait_gone(body["pid"])

        # The same command line, by hand, under another node name and files.
        hname = f"hd{uuid.uuid4().hex[:8]}"
        hdir = work / hname
        hdir.mkdir()
        argv = [a.replace(name, hname).replace(str(agent.directory), str(work)) for a in argv]
        log = open(hdir / "out.log", "ab")
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        t1 = wait_ping(f"{hname}@{AGENT_ID}")
        hand_times.append(t1 - t0)
        p.terminate()
        p.wait(30)
        log.close()
    return statistics.median(agent_times), statistics.median(hand_times)


def reference_argv(name: str, *extra: str) -> list[str]:
    """A ``celery worker`` started without the agent, as the references are:
    the node name, private queue and autoscale the agent would give it."""
    return [
        sys.executable, "-m", "celery", "-b", BROKER, "worker",
        "-n", f"{name}@{HOST}", "-Q", f"dq.{name}", "--autoscale=1,1", *extra,
    ]  # fmt: skip


def by_hand_defaults(repeat: int, work: Path) -> float:
    """Reference: plain ``celery worker`` with Celery's defaults (mingle on)."""
    times = []
    for _ in range(repeat):
        name = f"hm{uuid.uuid4().hex[:8]}"
        argv = reference_argv(name, "--logfile", str(work / f"{name}.log"))
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(wait_ping(f"{name}@{HOST}") - t0)
        p.terminate()
        p.wait(30)
    return statistics.median(times)


def crash_agent(agent: AgentProcess, app: str, repeat: int) -> float:
    name = f"cr{uuid.uuid4().hex[:8]}"
    status, body, _ = agent.request("PUT", f"/{app}/instances/{name}/", timeout=HTTP_TIMEOUT)
    assert status == 201, (status, body)
    pidfile = agent.directory / name / "worker.pid"
    times = []
    for _ in range(repeat):
        wait_ping(f"{name}@{AGENT_ID}")
        pid = read_pid(pidfile)
        assert pid is not None
        # Past the supervisor's min_uptime (10 s): a worker killed younger
        # counts as a crash loop and is restarted with a backoff.
        time.sleep(SETTLE)
        times.append(recovery(pid, f"{name}@{AGENT_ID}"))
    agent.request("DELETE", f"/{app}/instances/{name}/", timeout=HTTP_TIMEOUT)
    return statistics.median(times)


def crash_supervisord(repeat: int, work: Path, argv_like: list[str]) -> float:
    name = f"sd{uuid.uuid4().hex[:8]}"
    d = work / name
    d.mkdir()
    argv = [a if not a.startswith("--pidfile") else a for a in argv_like]
    argv = [a.replace("NAME", name).replace("DIR", str(d)) for a in argv]
    conf = d / "supervisord.conf"
    conf.write_text(
        "[supervisord]\n"
        f"nodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n"
        f"[unix_http_server]\nfile={d}/supervisor.sock\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[program:{name}]\ncommand={shlex.join(argv)}\nautorestart=true\nstartsecs=0\n"
        f"stopwaitsecs=10\nredirect_stderr=true\nstdout_logfile={d}/worker.out\n"
    )
    sd = subprocess.Popen(
        [str(BIN / "supervisord"), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    times = []
    try:
        for _ in range(repeat):
            wait_ping(f"{name}@{HOST}")
            time.sleep(SETTLE)
            pid = read_pid(d / "worker.pid")
            assert pid is not None
            times.append(recovery(pid, f"{name}@{HOST}"))
    finally:
        sd.send_signal(signal.SIGTERM)
        sd.wait(60)
    return statistics.median(times)


def wake_rows(sizes: list[int], work: Path) -> list[tuple[int, float, float]]:
    """(instances, median wake-up seconds, broker round trips per wake-up),
    with the Supervisor in this process on the real reactor."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from scs.control import CeleryControl
    from scs.leftovers import ProcessTable
    from scs.records import BrokerInfo, InstanceSpec
    from scs.supervisor import SupervisionPolicy, Supervisor

    class Counting(CeleryControl):
        """Counts every Celery control call: each is one broker round trip
        (a publish and the replies it waits for)."""

        calls = 0

        def _run(self, broker_url: str, f: Any) -> Any:
            Counting.calls += 1
            return super()._run(broker_url, f)

        def broker_alive(self, broker_url: str, timeout: float = 1.0) -> Any:
            Counting.calls += 1
            return super().broker_alive(broker_url, timeout)

    rows: list[tuple[int, float, float]] = []
    broker = BrokerInfo.from_url(BROKER)

    async def run() -> None:
        for n in sizes:
            specs = [InstanceSpec(name=f"wk{uuid.uuid4().hex[:6]}", app="bench", broker=broker) for _ in range(n)]
            sup = Supervisor(
                lambda specs=specs: specs,
                str(work / f"wake{n}"),
                reactor=reactor,
                policy=SupervisionPolicy(interval=3600.0),
                control=Counting(reactor),
                spawner=reactor,
                process_table=ProcessTable(),
            )
            sup.startService()
            try:
                for s in specs:
                    if not await sup.wait_ready(s.name, 120):
                        raise RuntimeError(f"{s.name} not ready")
                await sup.wake()  # settle queues/autoscale once
                walls, trips = [], []
                for _ in range(5):
                    before = Counting.calls
                    t0 = time.monotonic()
                    await sup.wake()
                    walls.append(time.monotonic() - t0)
                    trips.append(Counting.calls - before)
                rows.append((n, statistics.median(walls), statistics.median(trips)))
            finally:
                await sup.stopService()

    def main() -> None:
        d = ensureDeferred(run())
        d.addErrback(lambda f: (f.printTraceback(), None)[1])
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.run()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default="1,10,20")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]

    work = Path(tempfile.mkdtemp(prefix="scs-bench-"))
    rows: list[tuple[str, str, str, str, str]] = []

    class Progress(list):  # type: ignore[type-arg]
        """Rows are also printed as they come, in case a later one fails."""

        def append(self, row: Any) -> None:
            print("# " + " | ".join(row), file=sys.stderr, flush=True)
            super().append(row)

    rows = Progress()
    # The agent's data directory: <work>/agent, its log next to it.
    agent = AgentProcess(work / "agent", AGENT_ID, "--without-srs", "--interval", "5").start()
    try:
        assert agent.request("PUT", "/bench/")[0] == 201
        assert agent.request("PUT", "/benchng/", {"arguments": ["--without-gossip"]})[0] == 201
        for app, what in (
            ("bench", "instance ready (agent default: --without-mingle)"),
            ("benchng", "instance ready, --without-mingle --without-gossip"),
        ):
            a, h = ready_row(agent, app, args.repeat, work)
            rows.append((what, f"{a:.3f} s", f"{h:.3f} s by hand", f"{a / h:.2f}", "<= 1.10"))
        m = by_hand_defaults(args.repeat, work)
        rows.append(("  reference: by hand, Celery defaults (mingle, gossip)", "", f"{m:.3f} s", "", ""))
        c = crash_agent(agent, "bench", min(args.repeat, 3))
    finally:
        agent.stop()
    argv = reference_argv("NAME", "--pidfile", "DIR/worker.pid", "--logfile", "DIR/worker.log", "--without-mingle")
    s = crash_supervisord(min(args.repeat, 3), work, argv)
    rows.append(
        ("crash recovery (kill -9 until it answers)", f"{c:.3f} s", f"{s:.3f} s supervisord", f"{c / s:.2f}", "<= 1.0")
    )
    for n, wall, trips in wake_rows(sizes, work):
        rows.append(
            (
                f"one wake-up, {n} instance(s)",
                f"{wall * 1000:.1f} ms",
                f"{trips:g} round trips",
                "",
                "< 1 s; trips constant",
            )
        )

    header = ("measurement", "agent", "reference", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    line = "+".join("-" * (w + 2) for w in widths)
    print(line)
    print("|".join(f" {h:<{w}} " for h, w in zip(header, widths, strict=True)))
    print(line)
    for r in rows:
        print("|".join(f" {c:<{w}} " for c, w in zip(r, widths, strict=True)))
    print(line)
    print(f"repeat={args.repeat} (medians); host {HOST}; {os.cpu_count()} CPUs")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
