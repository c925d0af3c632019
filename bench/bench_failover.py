"""Benchmark of failover, drain and kill -9 detection (issue 11).

Real ``scs-agent`` processes on loopback and the RabbitMQ broker on
127.0.0.1:5672, each scenario in a cluster of its own (``--cluster
bench-<random>``), every agent with ``--failover-after`` (5 s by default)
and otherwise the agent's defaults.  The app ``fo`` gets
``--without-mingle --without-gossip --without-heartbeat`` (cheap workers,
as in bench_cluster.py).  Three scenarios:

    failover   for each number of agents N in ``--agents`` (3,5) and of
               instances M in ``--instances`` (5,20), ``--rounds`` times:
               the victim (agentN, not the coordinator) is started alone
               and given ceil(M/N) named instances, then the others join
               and M - ceil(M/N) more are placed at random (some may land
               on the victim too); once every worker answered a ping and
               a heartbeat (2 s) has carried the replicas, the victim is
               killed with kill -9 and so is each of its workers (by
               process group, from the pid files).  Measured from the
               kill: when each survivor's ``GET /agents/`` first shows the
               victim not alive; when ``GET /fo/instances/?details=1`` on
               a survivor first shows every instance the victim held
               owned by a survivor; when every one of them answers a
               Celery ping from a survivor (a sampler, below); meanwhile
               ``GET /ping/`` on every survivor every 0.1 s (the slowest
               is reported: a busy agent, told from a slow scatter) and
               any details listing over 1 s.  Then, a heartbeat later:
               the workers answering a broadcast ping, per instance
               (exactly one each); the listing on every survivor (each
               name once); the ``failover.moved`` log lines per instance
               in the agents' logs (exactly one each).
    drain      ``--drain-rounds`` (2) times, 3 agents; the source
               (agent3) is started alone with ``--drain-instances`` (10)
               instances, then the two others join; ``POST
               /agents/agent3/drain`` is sent to agent1 and timed while
               the sampler counts how many of the instances answer (goal:
               never fewer than all of them); each instance's silences
               are listed, and the instances that agent3's fence dropped
               (its ``fence.dropped`` log lines) rather than the drain.
    listing    3 agents and 4 instances (2 on agent3); ``--listing-rounds``
               (5) times: kill -9 agent3 alone (its workers live on),
               at once ``GET /fo/instances/`` on one survivor and, 50 ms
               after the kill, on the other (each from its own thread);
               then the time until both survivors list agent3 dead; then
               agent3 is started again (same directory and port) and the
               next round waits until it is back everywhere.  Goal: a
               listing right after a kill -9 answers within 100 ms.

The sampler (``bench.common.Sampler``, as in bench_rolling.py) sends a
Celery broadcast ping every ``--interval`` seconds (0.1) to the node names
an instance may have
(``<instance>@<agent>`` for each agent it may be on), each ping waiting at
most ``--ping-timeout`` (0.5 s); pings overlap, from a small pool of
threads with a Celery client each.  A sample is (send time, nodes that
answered); an instance answers in a sample when one of its nodes does.  A
worker that answers later than the timeout counts as silent, so the
figures can only err against the product.

The tables are printed and written to ``bench/RESULTS.md`` between the
markers of this benchmark's section (``--no-write`` to skip); the rest of
the file is kept.  Every agent started is stopped by pid (TERM, then
KILL, all of a cluster at once) and every worker left is killed by its pid
file, even on error.  Every wait is bounded; a failover that does not
finish in time is reported as such, with the agents' failover log lines,
and the data directory is kept.

Usage (from the repository root; about 6-8 minutes with the defaults on a
2-CPU VM):

    .venv/bin/python bench/bench_failover.py [--agents 3,5] [--instances 5,20]
        [--failover-after 5] [--rounds 1] [--drain-rounds 2] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Pinger,
    Run,
    Sampler,
    add_output_arguments,
    add_sampler_arguments,
    counts,
    covered,
    exit_on_sigterm,
    instance_of,
    put_app,
    stop_agents,
    table_head,
    wait_app_everywhere,
    wait_membership,
)
from tests.integration.agents import AgentProcess, pid_alive, wait_until, worker_pids  # noqa: E402

APP = "fo"
HEARTBEAT = 2.0  # scs.srs.SRS's default heartbeat period
HTTP_TIMEOUT = 30.0
LISTING_GOAL = 0.100  # seconds: a listing right after a kill -9
SLOW_LISTING = 1.0  # seconds: a details listing this slow is noted
MISSING_HEADER = "X-SCS-Missing-Agents"
SECTION = "## Failover, drain and detection (issue 11)"
# The agents' log lines this benchmark quotes as evidence.
EVIDENCE = re.compile(r"failover|fence|drain|SRS member|orphan", re.IGNORECASE)


def kill_workers(directory: Path) -> list[int]:
    """kill -9 every worker of an agent, by process group (each worker
    runs in a session of its own); the pids killed."""
    killed = []
    for pid in worker_pids(directory).values():
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def agent_row(agent: AgentProcess, member: str) -> dict[str, Any]:
    status, rows, _ = agent.request("GET", "/agents/", timeout=HTTP_TIMEOUT)
    assert status == 200, (status, rows)
    return next((row for row in rows if row["id"] == member), {})


def details(agent: AgentProcess) -> list[dict[str, Any]]:
    status, body, _ = agent.request("GET", f"/{APP}/instances/?details=1", timeout=HTTP_TIMEOUT)
    assert status == 200, (status, body)
    return body


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


class Watch(threading.Thread):
    """Call ``probe`` every ``interval`` seconds until it answers true or
    ``limit`` seconds after ``since``; ``at`` is when (the answer's
    arrival, seconds after ``since``), ``calls`` each call's (start after
    ``since``, duration)."""

    def __init__(self, what: str, probe: Callable[[], bool], since: float, limit: float, interval: float) -> None:
        super().__init__(name=f"watch-{what}", daemon=True)
        self.what = what
        self.probe = probe
        self.since = since
        self.limit = limit
        self.interval = interval
        self.at: float | None = None
        self.calls: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and time.monotonic() - self.since < self.limit:
            started = time.monotonic()
            try:
                ok = self.probe()
            except Exception as e:  # noqa: BLE001 - recorded; the watch goes on
                self.errors.append(repr(e))
                ok = False
            done = time.monotonic()
            self.calls.append((started - self.since, done - started))
            if ok:
                self.at = done - self.since
                return
            self.halt.wait(max(0.0, self.interval - (done - started)))

    def finish(self) -> float | None:
        self.join(self.limit + HTTP_TIMEOUT)
        self.halt.set()
        return self.at


class Cluster:
    """The agents of one scenario: one ``--cluster`` name, one directory."""

    def __init__(self, root: Path, failover_after: float) -> None:
        self.root = root
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        self.failover_after = failover_after
        self.agents: dict[str, AgentProcess] = {}

    def make(self, agent_id: str) -> AgentProcess:
        agent = AgentProcess(
            self.root / agent_id,
            agent_id,
            "--cluster",
            self.name,
            "--failover-after",
            f"{self.failover_after:g}",
        )
        self.agents[agent_id] = agent
        return agent

    def start(self, *ids: str) -> list[AgentProcess]:
        """Start agents in parallel; wait until every started agent sees
        every other one alive."""
        agents = [self.make(agent_id) for agent_id in ids]
        errors: list[BaseException] = []

        def start(agent: AgentProcess) -> None:
            try:
                agent.start(timeout=60)
            except BaseException as e:  # noqa: BLE001 - raised below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(a,)) for a in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        if errors:
            raise errors[0]
        self.wait_membership()
        return agents

    def running(self) -> list[AgentProcess]:
        return [a for a in self.agents.values() if a.process is not None and a.process.poll() is None]

    def wait_membership(self) -> None:
        wait_membership(self.running(), 2 * HEARTBEAT + 10)

    def stop(self) -> None:
        """TERM every agent at once, then kill what is left."""
        stop_agents(self.agents.values(), at_once=True)

    def evidence(self, since_marker: dict[str, int] | None = None) -> list[str]:
        """The agents' log lines about failover, fences, drains and
        membership (from ``since_marker``: agent -> byte offset)."""
        lines = []
        for agent_id, agent in sorted(self.agents.items()):
            try:
                text = agent.log_path.read_bytes()[(since_marker or {}).get(agent_id, 0) :].decode(errors="replace")
            except OSError:
                continue
            lines += [f"{agent_id}: {line.strip()}" for line in text.splitlines() if EVIDENCE.search(line)]
        return lines

    def log_offsets(self) -> dict[str, int]:
        return {i: (a.log_path.stat().st_size if a.log_path.exists() else 0) for i, a in self.agents.items()}


# -- scenario 1: failover ------------------------------------------------------


@dataclass
class FailoverRun:
    agents: int
    instances: int
    victim: str
    held: list[str]
    dead: dict[str, float | None]  # survivor -> seconds until it listed the victim dead
    owned: float | None  # seconds until the details listing showed every held instance on a survivor
    answered: float | None  # seconds until every held instance answered a ping
    per_instance: dict[str, float | None]  # instance -> seconds until it first answered
    first_details: float | None  # duration of the first details listing after the kill
    details_max: float | None  # longest details listing while waiting
    moves_logged: Counter = field(default_factory=Counter)
    workers_after: Counter = field(default_factory=Counter)
    twice_in_a_sample: list[str] = field(default_factory=list)
    targets: Counter = field(default_factory=Counter)
    moved_row: dict[str, str] = field(default_factory=dict)
    # Details listings slower than SLOW_LISTING: (sent after the kill, seconds, missing-agents header).
    slow_details: list[tuple[float, float, str | None]] = field(default_factory=list)
    after: Counter = field(default_factory=Counter)  # instances per agent once it is over
    # Survivor -> its slowest GET /ping/ until all answered: (sent after the kill, seconds).
    slow_pings: dict[str, tuple[float, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)


# -- scenario 2: drain ---------------------------------------------------------


@dataclass
class DrainRun:
    instances: int
    request: float
    status: int
    moved: list[str]
    failed: dict[str, Any]
    least: int
    samples: int
    both_answering: float  # seconds with some instance answering from two agents
    below_all: float  # seconds with fewer than all instances answering
    silences: dict[str, list[tuple[float, float]]]  # instance -> (from, to) seconds after the request
    old_gone: float | None  # seconds after the answer until no source worker answers
    targets: Counter
    fenced: list[str] = field(default_factory=list)  # dropped by the source's fence (fence.dropped lines)
    problems: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)


# -- scenario 3: listings right after kill -9 -------------------------------------


@dataclass
class Listing:
    round: int
    delay: float  # seconds after the kill it was meant to be sent
    sent: float  # seconds after the kill it was sent
    survivor: str
    seconds: float
    status: int
    names: int
    missing: str | None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="scs-bench-failover-"))
        self.clusters: list[Cluster] = []
        self.failovers: list[FailoverRun] = []
        self.drains: list[DrainRun] = []
        self.listings: list[Listing] = []
        self.baseline: list[Listing] = []
        self.detections: list[dict[str, float | None]] = []
        self.notes: list[str] = []
        self.keep = False

    def cluster(self, what: str) -> Cluster:
        cluster = Cluster(self.root / what, self.args.failover_after)
        self.clusters.append(cluster)
        return cluster

    def cleanup(self) -> None:
        for cluster in self.clusters:
            cluster.stop()

    def log(self, text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    def done(self, run: FailoverRun | DrainRun, summary: str) -> None:
        """Log a scenario's run, its problems, and keep the data if any."""
        self.log(summary + (f"; PROBLEMS: {run.problems}" if run.problems else ""))
        if run.problems:
            self.keep = True

    # -- set-up helpers --------------------------------------------------------

    def create_named(self, agent: AgentProcess, names: list[str]) -> None:
        for name in names:
            status, body, _ = agent.request("PUT", f"/{APP}/instances/{name}/?nowait=1", timeout=HTTP_TIMEOUT)
            assert status == 202, (status, body)

    def create_placed(self, agents: list[AgentProcess], count: int) -> list[str]:
        names = []
        for i in range(count):
            agent = agents[i % len(agents)]
            status, body, _ = agent.request("PUT", f"/{APP}/instances/?nowait=1", timeout=HTTP_TIMEOUT)
            assert status == 202, (status, body)
            names.append(body["name"])
        return names

    def wait_running(self, agent: AgentProcess, names: set[str], pinger: Pinger) -> dict[str, dict[str, Any]]:
        """Every instance of ``names`` listed and its worker answering."""

        def listed() -> dict[str, dict[str, Any]] | None:
            found = {i["name"]: i for i in details(agent) if i["name"] in names}
            return found if set(found) == names and all(i["node"] for i in found.values()) else None

        found = wait_until(listed, 30, interval=0.2, what="every instance listed")
        pinger.wait_all([i["node"] for i in found.values()])
        return wait_until(listed, 10, what="every instance listed")

    # -- scenario 1 ----------------------------------------------------------------

    def failover(self, n: int, m: int, round_no: int) -> FailoverRun:
        a = self.args
        cluster = self.cluster(f"failover-{n}x{m}-{round_no}")
        victim_id = f"agent{n}"
        survivor_ids = [f"agent{i}" for i in range(1, n)]
        prefix = f"v{uuid.uuid4().hex[:4]}"
        first = [f"{prefix}-{i}" for i in range(1, math.ceil(m / n) + 1)]
        pinger = Pinger()
        try:
            (victim,) = cluster.start(victim_id)
            put_app(victim, APP)
            self.create_named(victim, first)
            survivors = cluster.start(*survivor_ids)
            wait_app_everywhere(cluster.running(), APP)
            placed = self.create_placed(survivors, m - len(first))
            everything = self.wait_running(survivors[0], set(first) | set(placed), pinger)
            time.sleep(HEARTBEAT + 1)  # every agent's copy of the victim is current
            everything = {i["name"]: i for i in details(survivors[0]) if i["name"] in everything}
            held = sorted(name for name, i in everything.items() if i["agent"] == victim_id)
            self.log(f"failover {n} agents, {m} instances: {len(held)} on {victim_id}, killing it")
            candidates = [f"{name}@{s}" for name in held for s in survivor_ids]
            sampler = Sampler(candidates, a.interval, a.ping_timeout).start()
            offsets = cluster.log_offsets()
            limit = a.failover_after + 60.0
            time.sleep(0.5)  # the sampler's threads are up and connected
            # -- the kill --
            killed_at = time.monotonic()
            victim.kill()
            kill_workers(victim.directory)
            dead_watches = {
                s.agent_id: Watch(
                    f"dead-{s.agent_id}",
                    lambda s=s: not agent_row(s, victim_id).get("alive", True),
                    killed_at,
                    limit,
                    0.05,
                )
                for s in survivors
            }

            slow: list[tuple[float, float, str | None]] = []

            def owned_by_survivors() -> bool:
                sent = time.monotonic()
                status, body, headers = survivors[0].request(
                    "GET", f"/{APP}/instances/?details=1", timeout=HTTP_TIMEOUT
                )
                took = time.monotonic() - sent
                if took > SLOW_LISTING:
                    slow.append((sent - killed_at, took, headers.get(MISSING_HEADER)))
                assert status == 200, (status, body)
                listing = {i["name"]: i for i in body}
                return all(listing.get(name, {}).get("agent") in survivor_ids for name in held)

            owned_watch = Watch("owned", owned_by_survivors, killed_at, limit, 0.1)
            # GET /ping/ on every survivor meanwhile: tells a busy agent from a slow scatter.
            ping_stop = threading.Event()
            ping_watches = {
                s.agent_id: Watch(
                    f"ping-{s.agent_id}",
                    lambda s=s: ping_stop.is_set() or s.request("GET", "/ping/", timeout=HTTP_TIMEOUT)[0] == 0,
                    killed_at,
                    limit,
                    0.1,
                )
                for s in survivors
            }
            for watch in [*dead_watches.values(), owned_watch, *ping_watches.values()]:
                watch.start()
            try:
                answered_at, _ = sampler.wait_sample(
                    killed_at, lambda nodes: set(held) <= {instance_of(x) for x in nodes}, limit
                )
                answered: float | None = answered_at - killed_at
            except AssertionError:
                answered = None
            dead = {agent_id: watch.finish() for agent_id, watch in dead_watches.items()}
            owned = owned_watch.finish()
            ping_stop.set()
            for watch in ping_watches.values():
                watch.finish()
            samples = sampler.between(killed_at, time.monotonic())
            sampler.stop()
            per_instance: dict[str, float | None] = {}
            twice = set()
            for name in held:
                per_instance[name] = next(
                    (sent - killed_at for sent, nodes in samples if any(instance_of(x) == name for x in nodes)), None
                )
            for _, nodes in samples:
                counts = Counter(instance_of(x) for x in nodes)
                twice |= {name for name, c in counts.items() if c > 1}
            # A heartbeat later: exactly one worker and one listing entry per instance.
            time.sleep(HEARTBEAT + 0.5)
            names = set(everything)
            run = FailoverRun(
                agents=n,
                instances=m,
                victim=victim_id,
                held=held,
                dead=dead,
                owned=owned,
                answered=answered,
                per_instance=per_instance,
                first_details=owned_watch.calls[0][1] if owned_watch.calls else None,
                details_max=max((d for _, d in owned_watch.calls), default=None),
                twice_in_a_sample=sorted(twice),
                slow_details=slow,
                slow_pings={
                    agent_id: max(watch.calls, key=lambda call: call[1])
                    for agent_id, watch in ping_watches.items()
                    if watch.calls
                },
            )
            run.workers_after = pinger.workers_per_instance(names)
            for survivor in survivors:
                listing = [i for i in details(survivor) if i["name"] in names]
                repeated = sorted(n for n, c in Counter(i["name"] for i in listing).items() if c > 1)
                if repeated:
                    run.problems.append(f"{survivor.agent_id} lists {repeated} more than once")
                if {i["name"] for i in listing} != names:
                    run.problems.append(f"{survivor.agent_id} lists {len(listing)} of the {len(names)} instances")
                for i in listing:
                    if i["name"] in held and i["agent"] not in survivor_ids:
                        run.problems.append(f"{survivor.agent_id} lists {i['name']} on {i['agent']} ({i['state']})")
                    if survivor is survivors[0]:
                        run.after[i["agent"]] += 1
                        if i["name"] in held:
                            run.targets[i["agent"]] += 1
            run.moved_row = agent_row(survivors[0], victim_id).get("moved") or {}
            run.evidence = cluster.evidence(offsets)
            for name in held:
                run.moves_logged[name] = sum(
                    1 for line in run.evidence if f"failover: {name} of dead agent {victim_id}" in line
                )
            if answered is None:
                silent = [name for name, t in per_instance.items() if t is None]
                run.problems.append(f"{silent} did not answer within {limit:.0f} s of the kill")
            extra = sorted(name for name, c in run.workers_after.items() if c > 1)
            if extra:
                run.problems.append(f"more than one worker answers for {extra}: {dict(run.workers_after)}")
            lost = sorted(names - set(run.workers_after))
            if lost:
                run.problems.append(f"no worker answers for {lost}")
            if any(c != 1 for c in run.moves_logged.values()):
                run.problems.append(f"failover.moved lines per instance: {dict(run.moves_logged)}")
            if sorted(run.moved_row) != held:
                run.problems.append(f"/agents/ row of {victim_id}: moved {run.moved_row}, held {held}")
            if run.twice_in_a_sample:
                run.problems.append(f"{run.twice_in_a_sample} answered from two agents in one sample")
            self.done(
                run,
                f"  seen dead {fmt(min((t for t in dead.values() if t is not None), default=None))} s,"
                f" owned {fmt(owned)} s, all answering {fmt(answered)} s",
            )
            return run
        finally:
            pinger.close()
            cluster.stop()

    # -- scenario 2 ----------------------------------------------------------------

    def drain(self, round_no: int) -> DrainRun:
        a = self.args
        cluster = self.cluster(f"drain-{round_no}")
        pinger = Pinger()
        prefix = f"d{uuid.uuid4().hex[:4]}"
        names = [f"{prefix}-{i}" for i in range(1, a.drain_instances + 1)]
        ids = ["agent1", "agent2", "agent3"]
        try:
            (source,) = cluster.start("agent3")
            put_app(source, APP)
            self.create_named(source, names)
            self.wait_running(source, set(names), pinger)
            agent1, _agent2 = cluster.start("agent1", "agent2")
            wait_app_everywhere(cluster.running(), APP)
            time.sleep(HEARTBEAT + 1)  # instance counts in every membership table
            self.log(f"drain: {len(names)} instances on agent3, draining")
            sampler = Sampler([f"{n}@{x}" for n in names for x in ids], a.interval, a.ping_timeout).start()
            offsets = cluster.log_offsets()
            time.sleep(1.0)
            start = time.monotonic()
            status, body, _ = agent1.request("POST", "/agents/agent3/drain", timeout=600)
            request = time.monotonic() - start
            end = time.monotonic()
            old = [f"{n}@agent3" for n in names]
            try:
                gone_at, _ = sampler.wait_sample(end, lambda nodes: not set(old) & nodes, 60)
                old_gone: float | None = gone_at - end
            except AssertionError:
                old_gone = None
            samples = sampler.between(start, end)
            sampler.stop()
            counted = [len({instance_of(x) for x in nodes}) for _, nodes in samples]

            def doubled(nodes: frozenset[str]) -> bool:
                return max(Counter(instance_of(x) for x in nodes).values(), default=0) > 1

            both = covered(samples, end, doubled)
            below = covered(samples, end, lambda nodes: len({instance_of(x) for x in nodes}) < len(names))
            # Each instance's silences: (from, to) after the request, from the samples it missed.
            silences: dict[str, list[tuple[float, float]]] = {}
            for name in names:
                spans: list[tuple[float, float]] = []
                for i, (sent, nodes) in enumerate(samples):
                    if any(instance_of(x) == name for x in nodes):
                        continue
                    until = samples[i + 1][0] if i + 1 < len(samples) else end
                    if spans and abs(spans[-1][1] - (sent - start)) < 1e-9:
                        spans[-1] = (spans[-1][0], until - start)
                    else:
                        spans.append((sent - start, until - start))
                if spans:
                    silences[name] = spans
            run = DrainRun(
                instances=len(names),
                request=request,
                status=status,
                moved=sorted((body or {}).get("instances") or []),
                failed=(body or {}).get("failed") or {},
                least=min(counted, default=0),
                samples=len(samples),
                both_answering=both,
                below_all=below,
                silences=silences,
                old_gone=old_gone,
                targets=Counter(i["agent"] for i in details(agent1) if i["name"] in names),
            )
            if status != 200:
                run.problems.append(f"drain answered {status}: {body}")
            if run.moved != sorted(names):
                run.problems.append(f"drain moved {run.moved}, not the {len(names)} instances")
            if run.failed:
                run.problems.append(f"drain failed for {run.failed}")
            if run.least < len(names):
                run.problems.append(f"only {run.least} of {len(names)} answered in some sample")
            if "agent3" in run.targets:
                run.problems.append(f"instances still on agent3 after the drain: {dict(run.targets)}")
            run.evidence = cluster.evidence(offsets)
            run.fenced = sorted(
                name for name in names if any(f"{name} runs on another agent" in line for line in run.evidence)
            )
            summary = f"  drain {request:.2f} s, least {run.least}/{len(names)} answering ({len(samples)} samples)"
            self.done(run, summary)
            return run
        finally:
            pinger.close()
            cluster.stop()

    # -- scenario 3 ----------------------------------------------------------------

    def timed_listing(self, agent: AgentProcess, round_no: int, delay: float, killed_at: float) -> Listing:
        time.sleep(max(0.0, killed_at + delay - time.monotonic()))
        sent = time.monotonic()
        status, body, headers = agent.request("GET", f"/{APP}/instances/", timeout=HTTP_TIMEOUT)
        seconds = time.monotonic() - sent
        return Listing(
            round=round_no,
            delay=delay,
            sent=sent - killed_at,
            survivor=agent.agent_id,
            seconds=seconds,
            status=status,
            names=len(body) if isinstance(body, list) else -1,
            missing=headers.get(MISSING_HEADER),
        )

    def listing(self) -> None:
        a = self.args
        cluster = self.cluster("listing")
        pinger = Pinger()
        prefix = f"l{uuid.uuid4().hex[:4]}"
        try:
            (victim,) = cluster.start("agent3")
            put_app(victim, APP)
            on_victim = [f"{prefix}-1", f"{prefix}-2"]
            self.create_named(victim, on_victim)
            survivors = cluster.start("agent1", "agent2")
            wait_app_everywhere(cluster.running(), APP)
            placed = self.create_placed(survivors, 2)
            names = set(on_victim) | set(placed)
            self.wait_running(survivors[0], names, pinger)
            time.sleep(HEARTBEAT + 1)
            self.log(f"listing: {len(names)} instances, {a.listing_rounds} kills of agent3")
            # Healthy listings first, for comparison (same agents, same load).
            for i in range(a.listing_rounds * 2):
                self.baseline.append(self.timed_listing(survivors[i % 2], 0, 0.0, time.monotonic()))
            pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="listing")
            for r in range(1, a.listing_rounds + 1):
                first, second = survivors if r % 2 else survivors[::-1]
                assert victim.process is not None
                killed_at = time.monotonic()
                victim.process.kill()  # kill -9, reaped below
                futures = [
                    pool.submit(self.timed_listing, first, r, 0.0, killed_at),
                    pool.submit(self.timed_listing, second, r, 0.05, killed_at),
                ]
                victim.process.wait(10)
                watches = {
                    s.agent_id: Watch(
                        f"dead-{s.agent_id}",
                        lambda s=s: not agent_row(s, "agent3").get("alive", True),
                        killed_at,
                        4 * HEARTBEAT,
                        0.05,
                    )
                    for s in survivors
                }
                for watch in watches.values():
                    watch.start()
                found = [future.result(HTTP_TIMEOUT + 5) for future in futures]
                self.listings += sorted(found, key=lambda x: x.delay)
                self.detections.append({agent_id: watch.finish() for agent_id, watch in watches.items()})
                for listing in found:
                    if listing.status != 200 or listing.names != len(names):
                        self.notes.append(
                            f"listing round {r} on {listing.survivor}: status {listing.status},"
                            f" {listing.names} of {len(names)} names"
                        )
                self.log(
                    f"  round {r}: "
                    + ", ".join(f"{x.survivor} +{x.sent * 1000:.0f} ms: {x.seconds * 1000:.0f} ms" for x in found)
                    + f"; seen dead {self.detections[-1]}"
                )
                # agent3 back (same directory and port), and its workers taken back.
                victim.start(timeout=60)
                cluster.wait_membership()
                wait_until(
                    lambda: all(
                        i["agent"] == "agent3" and i["state"] == "running"
                        for i in details(victim)
                        if i["name"] in on_victim
                    ),
                    60,
                    interval=0.2,
                    what="agent3's instances running again",
                )
                time.sleep(1.0)
            pool.shutdown()
        finally:
            pinger.close()
            cluster.stop()

    def run(self) -> None:
        a = self.args
        print(f"root {self.root}", file=sys.stderr, flush=True)
        if "failover" in a.scenarios:
            for n in a.agents:
                for m in a.instances:
                    for r in range(1, a.rounds + 1):
                        self.failovers.append(self.failover(n, m, r))
        if "drain" in a.scenarios:
            for r in range(1, a.drain_rounds + 1):
                self.drains.append(self.drain(r))
        if "listing" in a.scenarios:
            self.listing()

    # -- report --------------------------------------------------------------------

    def table(self) -> str:
        a = self.args
        lines: list[str] = []
        if self.failovers:
            lines += [
                f"Failover (`--failover-after {a.failover_after:g}`), seconds from the kill -9 of the victim"
                " and its workers:",
                "",
                *table_head(
                    "agents",
                    "instances",
                    "on victim",
                    "seen dead: first survivor (last)",
                    "owned by survivors",
                    "all answering a ping",
                    "each answering, median (max)",
                    "all answering - failover-after",
                    "details listings after the kill: first, longest ms",
                    "moved to",
                    "instances per agent after",
                    "result",
                ),
            ]
            for r in self.failovers:
                dead = [t for t in r.dead.values() if t is not None]
                seen = f"{fmt(min(dead) if dead else None)} ({fmt(max(dead) if len(dead) == len(r.dead) else None)})"
                each = [t for t in r.per_instance.values() if t is not None]
                each_text = f"{statistics.median(each):.2f} ({max(each):.2f})" if each else "-"
                over = None if r.answered is None else r.answered - a.failover_after
                result = "moved once, all answer" if not r.problems else "FAIL: " + "; ".join(r.problems)
                lines.append(
                    f"| {r.agents} | {r.instances} | {len(r.held)} | {seen} | {fmt(r.owned)} | {fmt(r.answered)}"
                    f" | {each_text} | {fmt(over)} | {fmt(r.first_details, 1000, 0)}, {fmt(r.details_max, 1000, 0)}"
                    f" | {counts(r.targets)} | {counts(r.after)} | {result} |"
                )
            lines.append("")
            for r in self.failovers:
                for sent, took, missing in r.slow_details:
                    lines.append(
                        f"- {r.agents} agents x {r.instances}: a details listing on agent1 sent {sent:.2f} s after"
                        f" the kill took {took:.2f} s (missing-agents header: {missing or 'none'})"
                    )
                pings = ", ".join(
                    f"{agent_id} {took * 1000:.0f} ms (sent at {sent:.2f} s)"
                    for agent_id, (sent, took) in sorted(r.slow_pings.items())
                )
                lines.append(f"- {r.agents} agents x {r.instances}: slowest `GET /ping/` of each survivor: {pings}")
        if self.drains:
            lines += [
                "",
                "Drain (3 agents, `POST /agents/agent3/drain` sent to agent1), seconds:",
                "",
                *table_head(
                    "instances",
                    "request",
                    "per instance",
                    "least answering in a sample",
                    "time with fewer answering",
                    "instances silent in some sample (longest silence)",
                    "dropped by agent3's fence (fence.dropped), not by the drain",
                    "time with an instance answering from two agents",
                    "old workers silent after the answer",
                    "moved to",
                    "failed",
                    "target",
                    "result",
                ),
            ]
            for r in self.drains:
                longest = max((b - f for spans in r.silences.values() for f, b in spans), default=0.0)
                result = "PASS" if not r.problems else "FAIL: " + "; ".join(r.problems)
                lines.append(
                    f"| {r.instances} | {r.request:.2f} | {r.request / r.instances:.2f} | {r.least} of {r.instances}"
                    f" ({r.samples} samples) | {r.below_all:.2f} | {len(r.silences)} ({longest:.2f})"
                    f" | {len(r.fenced)} of {r.instances} | {r.both_answering:.2f} | {fmt(r.old_gone)}"
                    f" | {counts(r.targets)} | {len(r.failed)} | never below {r.instances} of {r.instances}"
                    f" | {result} |"
                )
            for number, r in enumerate(self.drains, 1):
                for name, spans in sorted(r.silences.items()):
                    fenced = " (dropped by agent3's fence)" if name in r.fenced else ""
                    lines.append(
                        f"- drain {number}: {name}{fenced} silent "
                        + ", ".join(f"{f:.2f}-{b:.2f} s" for f, b in spans)
                        + " after the request"
                    )
        if self.listings:
            lines += [
                "",
                f"First listing after a kill -9 (3 agents, 4 instances, 2 of them on agent3;"
                f" {len(self.detections)} rounds), `GET /{APP}/instances/` on a survivor:",
                "",
                *table_head(
                    "listing", "n", "p50 ms", "max ms", "each, ms", "missing-agents header", "target", "result"
                ),
            ]
            rows_by_label = [
                ("healthy, before the kills (for comparison)", self.baseline, False),
                ("sent right after the kill", [x for x in self.listings if x.delay == 0.0], True),
                ("sent 50 ms after the kill", [x for x in self.listings if x.delay > 0.0], True),
            ]
            for label, rows, judged in rows_by_label:
                if not rows:
                    continue
                times = [x.seconds for x in rows]
                missing = Counter(x.missing or "none" for x in rows)
                ok = max(times) <= LISTING_GOAL and all(x.status == 200 for x in rows)
                lines.append(
                    f"| {label} | {len(rows)} | {statistics.median(times) * 1000:.0f} | {max(times) * 1000:.0f}"
                    f" | {', '.join(f'{t * 1000:.0f}' for t in times)}"
                    f" | {', '.join(f'{k}: {v}' for k, v in sorted(missing.items()))}"
                    + (f" | <= {LISTING_GOAL * 1000:.0f} ms | {'PASS' if ok else 'FAIL'} |" if judged else " | | |")
                )
            seen = [t for d in self.detections for t in d.values() if t is not None]
            unseen = sum(1 for d in self.detections for t in d.values() if t is None)
            if seen:
                lines.append(
                    f"| detection: `GET /agents/` shows agent3 dead (each survivor) | {len(seen)}"
                    f" | {statistics.median(seen) * 1000:.0f} | {max(seen) * 1000:.0f}"
                    f" | {', '.join(f'{t * 1000:.0f}' for t in seen)} | | <= 1000 ms"
                    f" | {'PASS' if max(seen) <= 1.0 and not unseen else 'FAIL'} |"
                )
            late = [x.sent - x.delay for x in self.listings]
            lines.append(
                f"- listings were sent {max(late) * 1000:.0f} ms late at most (thread start); the second one"
                " from its own thread, whatever the first one's time"
            )
        return "\n".join(lines)

    def evidence(self) -> list[str]:
        """Log lines quoted for the runs that showed a problem."""
        out = []
        for r in self.failovers:
            if r.problems:
                out.append(f"failover {r.agents} agents x {r.instances} instances, agents' log lines:")
                out += [f"    {line}" for line in r.evidence[:80]]
        for d in self.drains:
            if d.problems:
                out.append("drain, agents' log lines:")
                out += [f"    {line}" for line in d.evidence[:80]]
        return out


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("an empty list")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int_list, default=[3, 5], help="cluster sizes for the failover (>= 2)")
    parser.add_argument("--instances", type=int_list, default=[5, 20], help="instances for the failover")
    parser.add_argument("--failover-after", type=float, default=5.0, help="the agents' --failover-after, seconds")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each failover case")
    parser.add_argument("--drain-rounds", type=int, default=2, help="runs of the drain")
    parser.add_argument("--drain-instances", type=int, default=10, help="instances on the drained agent")
    parser.add_argument("--listing-rounds", type=int, default=5, help="kill -9s of the listing scenario")
    add_sampler_arguments(parser)
    parser.add_argument(
        "--scenarios",
        type=lambda s: [x for x in s.split(",") if x],
        default=["failover", "drain", "listing"],
        help="comma-separated among failover, drain, listing",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    if min(args.agents) < 2 or min(args.instances) < 1 or args.rounds < 1 or args.failover_after <= 0:
        parser.error("--agents must be at least 2, --instances and --rounds at least 1, --failover-after > 0")
    if args.drain_instances < 1 or args.listing_rounds < 1 or args.drain_rounds < 1:
        parser.error("--drain-instances, --drain-rounds and --listing-rounds must be at least 1")
    unknown = set(args.scenarios) - {"failover", "drain", "listing"}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")

    exit_on_sigterm()
    bench = Bench(args)
    run = Run()

    def report() -> None:
        if not (bench.failovers or bench.drains or bench.listings):
            return
        text = "\n".join(
            [
                *run.header("bench_failover.py"),
                bench.table(),
                "",
                *(f"- {note}" for note in bench.notes),
                f"- pings every {args.interval} s, each waiting at most {args.ping_timeout} s; {run.load()}",
            ]
        )
        print(text)
        evidence = bench.evidence()
        if evidence:
            print("\n".join(evidence), file=sys.stderr)
        run.record("bench_failover.py", SECTION, text, args.write)

    with run.guard(bench.root, bench.cleanup, report, keep=lambda: args.keep or bench.keep):
        bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
