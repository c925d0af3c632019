"""Benchmark of the cluster façade (issue 4), printed as one table.

Rows, all measured in one run against real ``scs-agent`` processes on
loopback and the RabbitMQ broker on 127.0.0.1:5672:

    list, 1 agent        GET /foo/instances/ on one agent run --without-srs
    list, 3 agents       the same through a cluster of 3 agents (rotating
                         over them), then of 5 agents
    place, 5 agents      PUT /place/instances/?nowait=1 on the 5-agent cluster
    list, kill window    listings between the kill -9 of one agent and its
                         detection (informative: they wait out the scatter)
    list, 1 dead         listings through the 4 survivors once every one of
                         them shows the killed agent not alive
    experiment           (unless --no-experiment) the 5-agent listing again,
                         every agent restarted with TCP_NODELAY set on its
                         AMQP socket by a start-up patch (scs is untouched):
                         how much of the cluster's cost is Nagle's algorithm
                         meeting delayed ACKs on txAMQP's small frames

Every agent holds ``--per-agent`` instances of the app ``foo`` (20 by
default), exactly: each agent is first started alone (``--without-srs``) on
its own directory, creates them with ``?nowait=1`` and disables each one at
once (``POST .../disable``), then stops; the cluster agents restart on the
same directories.  So the listings cover 20 instances per agent without
100 live ``celery worker`` processes on this machine.  Placement creates
instances of a second app ``place`` and disables each one right after (not
timed) for the same reason.  The workers are cheap anyway: both apps pass
``--without-mingle --without-gossip --without-heartbeat``.

Targets: on 5 agents, listing p50 <= 3 x the single agent's p50; after the
dead agent is detected, listing p50 < 2 x the healthy 5-agent p50, no
listing near the 2 s scatter timeout, and no missing-agents header.

Every agent started is stopped by pid (TERM, then KILL) and every worker
left is killed by its pid file, even on error.  Each run uses its own
``--cluster`` name, so it never mixes with other agents on the broker.

Usage (from the repository root):

    python bench/bench_cluster.py [--requests 200] [--place 100] [--per-agent 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Run,
    add_output_arguments,
    counts,
    exit_on_sigterm,
    percentile,
    put_app,
    stop_agents,
    table_head,
    wait_app_everywhere,
    wait_membership,
)
from tests.integration.agents import AgentProcess, pid_alive, wait_until, worker_pids  # noqa: E402

MISSING_HEADER = "X-SCS-Missing-Agents"
SCATTER_TIMEOUT = 2.0  # scs.srs.SRS.scatter's default
HEARTBEAT = 2.0  # scs.srs.SRS's default heartbeat period
HTTP_TIMEOUT = 15.0

# The experiment row: the agent with TCP_NODELAY on its AMQP socket, patched
# at start (``python -c SHIM :PORT -i ID ...``); the shipped code is untouched.
NODELAY_SHIM = """
import sys
from txamqp.protocol import AMQClient
_made = AMQClient.connectionMade
def connectionMade(self):
    self.transport.setTcpNoDelay(True)
    return _made(self)
AMQClient.connectionMade = connectionMade
from scs.tap import main
sys.exit(main())
"""


class Client:
    """One keep-alive HTTP connection to an agent; times each request."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.agent.port, timeout=HTTP_TIMEOUT)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any, dict[str, str], float]:
        """(status, JSON body, headers, seconds); one retry on a stale connection."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            connection = self._connect()
            try:
                start = time.perf_counter()
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                raw = response.read()
                elapsed = time.perf_counter() - start
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return (
                response.status,
                json.loads(raw) if raw else None,
                {k.lower(): v for k, v in response.getheaders()},
                elapsed,
            )
        raise AssertionError("unreachable")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="scs-bench-cluster-"))
        self.cluster = f"bench-{uuid.uuid4().hex[:10]}"
        self.started: list[AgentProcess] = []
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    # -- processes -------------------------------------------------------

    def directory(self, i: int) -> Path:
        return self.root / f"agent{i}"

    def start(self, i: int, *extra: str, command: list[str] | None = None) -> AgentProcess:
        agent = AgentProcess(self.directory(i), f"agent{i}", *extra, command=command)
        self.started.append(agent)
        agent.start(timeout=60)
        return agent

    def start_member(self, i: int, cluster: str | None = None, **kw: Any) -> AgentProcess:
        return self.start(i, "--cluster", cluster or self.cluster, **kw)

    def cleanup(self) -> None:
        stop_agents(self.started, timeout=30)

    def wait_no_live_workers(self, i: int, limit: float = 120.0) -> None:
        wait_until(
            lambda: not any(pid_alive(p) for p in worker_pids(self.directory(i)).values()),
            limit,
            interval=0.2,
            what=f"agent{i}'s workers to stop",
        )

    # -- phases ----------------------------------------------------------

    def populate(self, i: int) -> None:
        """``per_agent`` disabled instances of foo in agent i's store."""
        agent = self.start(i, "--without-srs")
        client = Client(agent)
        try:
            put_app(agent, "foo")
            for _ in range(self.args.per_agent):
                status, body, _, _ = client.request("PUT", "/foo/instances/?nowait=1")
                assert status == 202, (status, body)
                name = body["name"]
                status, body, _, _ = client.request("POST", f"/foo/instances/{name}/disable")
                assert status == 200 and body["is_enabled"] is False, (status, body)
            self.wait_no_live_workers(i)
        finally:
            client.close()
            agent.stop()

    def listings(
        self, agents: list[AgentProcess], expected: int, count: int, warmup: int = 10
    ) -> tuple[list[float], int, float]:
        """``count`` timed listings rotating over ``agents``: (seconds, how
        many had the missing-agents header, CPU ms per listing of all agents)."""
        clients = [Client(a) for a in agents]
        times: list[float] = []
        flagged = 0
        cpu_before = 0.0
        try:
            for n in range(warmup + count):
                if n == warmup:
                    cpu_before = sum(cpu_seconds(a.pid) for a in agents)
                client = clients[n % len(clients)]
                status, body, headers, elapsed = client.request("GET", "/foo/instances/")
                assert status == 200, (status, body)
                assert len(body) == expected, (len(body), expected, client.agent.agent_id)
                if n >= warmup:
                    times.append(elapsed)
                    flagged += MISSING_HEADER.lower() in headers
            cpu = (sum(cpu_seconds(a.pid) for a in agents) - cpu_before) / count * 1000
        finally:
            for client in clients:
                client.close()
        return times, flagged, cpu

    def row(self, what: str, agents: int, times: list[float], **extra: Any) -> dict[str, Any]:
        row = {
            "what": what,
            "agents": agents,
            "n": len(times),
            "p50": statistics.median(times) * 1000 if times else float("nan"),
            "p99": percentile(times, 99) * 1000 if times else float("nan"),
            "max": max(times) * 1000 if times else float("nan"),
            "target": "",
            "result": "",
            **extra,
        }
        self.rows.append(row)
        print(
            f"  {what}: n={row['n']} p50={row['p50']:.1f} ms p99={row['p99']:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
        return row

    def placements(self, agents: list[AgentProcess]) -> list[float]:
        by_id = {a.agent_id: a for a in agents}
        clients = [Client(a) for a in agents]
        owners_clients = {a.agent_id: Client(a) for a in agents}
        times: list[float] = []
        owners: Counter[str] = Counter()
        try:
            put_app(agents[0], "place")
            wait_app_everywhere(agents, "place")
            for n in range(self.args.place):
                client = clients[n % len(clients)]
                status, body, _, elapsed = client.request("PUT", "/place/instances/?nowait=1")
                assert status == 202, (status, body)
                times.append(elapsed)
                owner = body["agent"]
                owners[owner] += 1
                assert owner in by_id, owner
                # Not timed: keep the machine from running a worker per placement.
                status, body, _, _ = owners_clients[owner].request("POST", f"/place/instances/{body['name']}/disable")
                assert status == 200, (status, body)
        finally:
            for client in clients + list(owners_clients.values()):
                client.close()
        self.notes.append(f"placements by owner: {counts(owners)}")
        return times

    def kill_window(self, survivors: list[AgentProcess], victim: str) -> tuple[list[float], float, int]:
        """Listings from the kill until every survivor shows ``victim`` dead:
        (seconds, time to detection, how many named a missing agent)."""
        clients = [Client(a) for a in survivors]
        times: list[float] = []
        flagged = 0
        start = time.monotonic()
        deadline = start + 10 * HEARTBEAT
        try:
            n = 0
            while True:
                client = clients[n % len(clients)]
                n += 1
                _, _, headers, elapsed = client.request("GET", "/foo/instances/")
                times.append(elapsed)
                flagged += MISSING_HEADER.lower() in headers
                dead_everywhere = all(
                    not next(m for m in c.request("GET", "/agents/")[1] if m["id"] == victim)["alive"] for c in clients
                )
                if dead_everywhere:
                    return times, time.monotonic() - start, flagged
                if time.monotonic() > deadline:
                    raise AssertionError(f"{victim} not detected dead after {deadline - start:.0f} s")
        finally:
            for client in clients:
                client.close()

    def run(self) -> None:
        a = self.args
        print(f"root {self.root}, cluster {self.cluster}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        for i in range(1, a.agents + 1):
            self.populate(i)
        print(f"  populated {a.agents} x {a.per_agent} in {time.monotonic() - t0:.0f} s", file=sys.stderr)

        single = self.start(1, "--without-srs")
        times, _, cpu = self.listings([single], a.per_agent, a.requests)
        single.stop()
        base = self.row("GET /foo/instances/", 1, times, listed=a.per_agent, how="one agent, --without-srs", cpu=cpu)

        members = [self.start_member(i) for i in range(1, 4)]
        wait_membership(members, 30, interval=0.05)
        times, flagged, cpu = self.listings(members, 3 * a.per_agent, a.requests)
        self.row(
            "GET /foo/instances/",
            3,
            times,
            listed=3 * a.per_agent,
            how="cluster, rotating over the agents",
            flagged=flagged,
            cpu=cpu,
        )

        members += [self.start_member(i) for i in range(4, a.agents + 1)]
        wait_membership(members, 30, interval=0.05)
        times, flagged, cpu = self.listings(members, a.agents * a.per_agent, a.requests)
        healthy = self.row(
            "GET /foo/instances/",
            a.agents,
            times,
            listed=a.agents * a.per_agent,
            how="cluster, rotating over the agents",
            flagged=flagged,
            cpu=cpu,
        )
        healthy["target"] = f"p50 <= 3 x single = {3 * base['p50']:.1f} ms"
        healthy["result"] = "PASS" if healthy["p50"] <= 3 * base["p50"] else "FAIL"

        times = self.placements(members)
        self.row(
            "PUT /place/instances/?nowait=1",
            a.agents,
            times,
            listed=None,
            how="random placement, rotating over the agents",
        )

        victim, survivors = members[-1], members[:-1]
        victim.kill()
        window, detected, flagged = self.kill_window(survivors, victim.agent_id)
        self.notes.append(f"{victim.agent_id} kill -9 -> seen dead by all survivors in {detected:.1f} s")
        self.row(
            "GET /foo/instances/",
            len(survivors),
            window,
            listed=a.agents * a.per_agent,
            how=f"between kill -9 of {victim.agent_id} and its detection (info)",
            flagged=flagged,
        )
        # The victim's instances stay listed, orphaned (from the survivors'
        # copies), until the failover moves them: the count does not change.
        times, flagged, cpu = self.listings(survivors, a.agents * a.per_agent, a.requests)
        dead = self.row(
            "GET /foo/instances/",
            len(survivors),
            times,
            listed=a.agents * a.per_agent,
            how=f"after {victim.agent_id} detected dead (its instances orphaned)",
            flagged=flagged,
            cpu=cpu,
        )
        ok = dead["p50"] < 2 * healthy["p50"] and dead["max"] < SCATTER_TIMEOUT * 1000 / 2 and flagged == 0
        dead["target"] = f"p50 < 2 x healthy = {2 * healthy['p50']:.1f} ms, max < 1 s, no missing"
        dead["result"] = "PASS" if ok else "FAIL"

        if a.experiment:
            for agent in members:
                agent.stop()
            shim = [sys.executable, "-c", NODELAY_SHIM]
            members = [self.start_member(i, f"{self.cluster}-nodelay", command=shim) for i in range(1, a.agents + 1)]
            wait_membership(members, 30, interval=0.05)
            times, flagged, cpu = self.listings(members, a.agents * a.per_agent, a.requests)
            row = self.row(
                "GET /foo/instances/",
                a.agents,
                times,
                listed=a.agents * a.per_agent,
                how=f"experiment: the {a.agents} agents restarted with TCP_NODELAY on their AMQP socket",
                flagged=flagged,
                cpu=cpu,
            )
            row["target"] = f"p50 <= 3 x single = {3 * base['p50']:.1f} ms"
            row["result"] = "(pass)" if row["p50"] <= 3 * base["p50"] else "(fail)"

    def table(self) -> str:
        lines = table_head(
            "request",
            "agents",
            "instances listed",
            "how",
            "n",
            "p50 ms",
            "p99 ms",
            "max ms",
            "agents' CPU ms/req",
            "target",
            "result",
        )
        for r in self.rows:
            listed = "" if r.get("listed") is None else str(r["listed"])
            how = r["how"]
            cpu = "" if r.get("cpu") is None else f"{r['cpu']:.1f}"
            if r.get("flagged"):
                how += f" ({r['flagged']} with missing-agents header)"
            lines.append(
                f"| {r['what']} | {r['agents']} | {listed} | {how} | {r['n']} | "
                f"{r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {cpu} | {r['target']} | {r['result']} |"
            )
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed listings per row")
    parser.add_argument("--place", type=int, default=100, help="timed placements")
    parser.add_argument("--per-agent", type=int, default=20, help="instances of foo per agent")
    parser.add_argument("--agents", type=int, default=5, help="size of the big cluster (>= 4)")
    parser.add_argument(
        "--no-experiment",
        dest="experiment",
        action="store_false",
        help="skip the last row (agents patched with TCP_NODELAY)",
    )
    add_output_arguments(parser, write=False)
    args = parser.parse_args()
    if args.agents < 4:
        parser.error("--agents must be at least 4")

    exit_on_sigterm()
    bench = Bench(args)
    run = Run()

    def report() -> None:
        if bench.rows:
            print(bench.table())
            for note in bench.notes:
                print(f"- {note}")
            print(f"- cluster {bench.cluster}; {run.load()}")

    with run.guard(bench.root, bench.cleanup, report, keep=args.keep):
        bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
