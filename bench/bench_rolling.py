"""Benchmark of a rolling restart against a restart of all at once (issue 10).

Real ``scs-agent`` processes (``--agents``, 2 by default, in a cluster of
their own) on loopback and the RabbitMQ broker on 127.0.0.1:5672 hold
``--instances`` running instances (5 by default) of one app, each created
synchronously (the create answers once the worker answered a ping).  Then,
for ``--rounds`` rounds, taking turns (rolling, all at once, rolling, ...):

    rolling       POST /<app>/restart?rolling=1: one instance at a time, the
                  next only once the replacement answered a ping
    all at once   POST /<app>/restart: every instance at the same time

While a restart runs, a sampler sends a Celery broadcast ping to the
instances' nodes (``node`` of the instance objects) every ``--interval``
seconds (0.1), each ping waiting at most ``--ping-timeout`` (0.5 s); pings
overlap, from a small pool of threads each with a Celery client of its
own, so that the sampling keeps its pace while a node is silent.  Each
sample is (send time, nodes that answered).

Per round: the request's wall time; the time until the restart is over,
that is the send time of the first sample in which every node answered,
sent after every old worker's pid (read from ``GET
/<app>/instances/?details=1`` before the request) is gone and every
instance shows a new pid; and the least number of nodes answering in the
samples sent between the request and that moment.

Against an agent without the app-wide route (a 404 or 405 from the router
on the first request), the benchmark falls back to the per-instance route ``POST
/<app>/instances/<name>/restart`` (which answers once the new worker is
spawned): one after the other, waiting for each new worker to answer a
ping, for the rolling restart; all of them in parallel threads for all at
once.  The table says which route each row used (``--route`` forces one).

The table is printed and written to ``bench/RESULTS.md`` between the
markers of its section (``--no-write`` to skip); the rest of the file is
kept.  Every agent started is stopped by pid (TERM, then KILL) and every
worker left is killed by its pid file, even on error.  Every wait is
bounded.

Usage (from the repository root; 2-3.5 minutes with the defaults on a 2-CPU VM):

    .venv/bin/python bench/bench_rolling.py [--rounds 4] [--instances 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    Run,
    Sampler,
    add_output_arguments,
    add_sampler_arguments,
    counts,
    covered,
    exit_on_sigterm,
    put_app,
    spread,
    stop_agents,
    table_head,
    wait_app_everywhere,
    wait_membership,
)
from tests.integration.agents import AgentProcess, pid_alive, wait_until  # noqa: E402

APP = "roll"
HTTP_TIMEOUT = 180.0
SECTION = "## Rolling restart against all at once (issue 10)"
MODES = ("rolling", "all at once")


# -- one round -----------------------------------------------------------


@dataclass
class Round:
    mode: str
    route: str
    request: float  # seconds, the restart request(s)
    over: float  # seconds until every node answered again with a new pid
    least: int  # least number of nodes answering in a sample meanwhile
    below_all: float  # seconds with fewer than all nodes answering
    below_one: float  # seconds with fewer than all but one answering
    samples: int
    silent: list[float] = field(default_factory=list)  # seconds each node did not answer
    failed: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="scs-bench-rolling-"))
        self.cluster = f"bench-{uuid.uuid4().hex[:10]}"
        self.started: list[AgentProcess] = []
        self.sampler: Sampler | None = None
        self.instances: dict[str, dict[str, Any]] = {}
        self.rounds: list[Round] = []
        self.notes: list[str] = []
        # Rolling by hand: (old worker ended and new one spawned, new one
        # answered a ping) seconds for each instance.
        self.steps: list[tuple[float, float]] = []
        # None: not known yet; True: POST /<app>/restart answered; False: fall back.
        self.app_route: bool | None = {"auto": None, "app": True, "instance": False}[args.route]

    @property
    def agent(self) -> AgentProcess:
        return self.started[0]

    def start(self) -> None:
        for i in range(1, self.args.agents + 1):
            agent = AgentProcess(self.root / f"agent{i}", f"agent{i}", "--cluster", self.cluster)
            self.started.append(agent)
            agent.start(timeout=60)
        wait_membership(self.started)

    def cleanup(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        stop_agents(self.started)

    def details(self) -> dict[str, dict[str, Any]]:
        status, body, _ = self.agent.request("GET", f"/{APP}/instances/?details=1", timeout=HTTP_TIMEOUT)
        assert status == 200, (status, body)
        return {i["name"]: i for i in body}

    def populate(self) -> None:
        put_app(self.agent, APP)
        wait_app_everywhere(self.started, APP)
        for _ in range(self.args.instances):
            status, body, _ = self.agent.request("PUT", f"/{APP}/instances/", timeout=HTTP_TIMEOUT)
            assert status == 201 and body["state"] == "running", (status, body)
        self.instances = self.details()
        assert len(self.instances) == self.args.instances, self.instances
        owners = Counter(instance["agent"] for instance in self.instances.values())
        self.notes.append(f"instances by owner: {counts(owners)}")

    @property
    def nodes(self) -> dict[str, str]:
        return {name: i["node"] for name, i in self.instances.items()}

    def all_answer(self, limit: float = 60.0) -> float:
        n = len(self.instances)
        assert self.sampler is not None
        return self.sampler.wait_sample(time.monotonic(), lambda a: len(a) == n, limit)[0]

    # -- the two ways of restarting, each by either route ----------------

    def post(self, path: str) -> tuple[int, Any]:
        status, body, _ = self.agent.request("POST", path, timeout=HTTP_TIMEOUT)
        return status, body

    def restart_app(self, rolling: bool) -> tuple[str, dict[str, Any]] | None:
        """The app-wide route; None when it does not exist (yet)."""
        status, body = self.post(f"/{APP}/restart" + ("?rolling=1" if rolling else ""))
        # No such route (yet): the router's own 404 names the path, or a 405.
        unrouted = status == 405 or (status == 404 and isinstance(body, dict) and "path" in body)
        if unrouted and self.app_route is None:
            self.notes.append(
                f"POST /{APP}/restart answered {status} ({body}): fell back to POST /{APP}/instances/<name>/restart"
            )
            return None
        assert status == 200, (status, body)
        path = f"POST /{APP}/restart" + ("?rolling=1" if rolling else "")
        if sorted(body.get("instances") or []) != sorted(self.instances):
            self.notes.append(f"{path} named {body.get('instances')}, not the {len(self.instances)} instances")
        return path, body.get("failed") or {}

    def restart_one(self, name: str) -> None:
        status, body = self.post(f"/{APP}/instances/{name}/restart")
        assert status == 200, (status, body)

    def restart_by_hand(self, rolling: bool) -> str:
        if rolling:
            assert self.sampler is not None
            for name, node in self.nodes.items():
                asked = time.monotonic()
                self.restart_one(name)
                spawned = time.monotonic()
                answered, _ = self.sampler.wait_sample(spawned, lambda a, node=node: node in a, 60)
                self.steps.append((spawned - asked, answered - spawned))
            return f"POST /{APP}/instances/<name>/restart, one after the other, each until it answers a ping"
        with concurrent.futures.ThreadPoolExecutor(len(self.instances)) as pool:
            for future in [pool.submit(self.restart_one, name) for name in self.instances]:
                future.result(HTTP_TIMEOUT)
        return f"POST /{APP}/instances/<name>/restart, all in parallel"

    def restart(self, rolling: bool) -> tuple[str, dict[str, Any]]:
        if self.app_route is not False:
            done = self.restart_app(rolling)
            if done is not None:
                self.app_route = True
                return done
            self.app_route = False
        return self.restart_by_hand(rolling), {}

    def one_round(self, mode: str) -> Round:
        assert self.sampler is not None
        n = len(self.instances)
        self.all_answer()
        time.sleep(self.args.settle)
        old = {name: i["pid"] for name, i in self.details().items()}
        assert all(old.values()), old
        start = time.monotonic()
        route, failed = self.restart(mode == "rolling")
        request = time.monotonic() - start

        # Every old worker gone (polled on /proc, fine-grained) and every
        # instance showing a new pid (polled on the API).
        def replaced() -> bool:
            if any(pid_alive(pid) for pid in old.values()):
                return False
            now = {name: i["pid"] for name, i in self.details().items()}
            return all(now.get(name) and now[name] != pid for name, pid in old.items())

        wait_until(replaced, 120, interval=0.02, what="every worker replaced")
        gone = time.monotonic()
        end, _ = self.sampler.wait_sample(gone, lambda a: len(a) == n, 120)
        samples = self.sampler.between(start, end)
        least = min(len(a) for _, a in samples)
        result = Round(
            mode=mode,
            route=route,
            request=request,
            over=end - start,
            least=least,
            below_all=covered(samples, end, lambda a: len(a) < n),
            below_one=covered(samples, end, lambda a: len(a) < n - 1),
            samples=len(samples),
            silent=[covered(samples, end, lambda a, node=node: node not in a) for node in self.nodes.values()],
            failed=failed,
        )
        self.instances = self.details()
        print(
            f"  {mode}: request {request:.2f} s, over after {result.over:.2f} s, "
            f"least {least}/{n} answering ({len(samples)} samples)",
            file=sys.stderr,
            flush=True,
        )
        return result

    def run(self) -> None:
        a = self.args
        print(f"root {self.root}, cluster {self.cluster}", file=sys.stderr, flush=True)
        self.start()
        t0 = time.monotonic()
        self.populate()
        print(f"  {a.instances} instances running in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        self.sampler = Sampler(list(self.nodes.values()), a.interval, a.ping_timeout).start()
        for r in range(a.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                self.rounds.append(self.one_round(mode))
        self.notes.append(f"{self.sampler.errors} pings failed outright (not counted as samples)")
        if self.steps:
            self.notes.append(
                "rolling by hand, per instance (medians of"
                f" {len(self.steps)}): {statistics.median(s[0] for s in self.steps):.2f} s from the request until"
                " the old worker exited and the new one was spawned (the route's answer),"
                f" {statistics.median(s[1] for s in self.steps):.2f} s more until the new one answered a ping"
            )

    # -- report ------------------------------------------------------------

    def table(self) -> str:
        n = self.args.instances
        lines = table_head(
            "mode",
            "route",
            "rounds",
            "request s median (min-max)",
            "done s median (min-max)",
            "least answering, per round",
            f"s with < {n} answering, median",
            f"s with < {n - 1} answering, median",
            "s each node was silent, median (max)",
            "target",
            "result",
        )
        for mode in MODES:
            rows = [r for r in self.rounds if r.mode == mode]
            if not rows:
                continue
            routes = sorted({r.route for r in rows})
            silent = [t for r in rows for t in r.silent]
            least = min(r.least for r in rows)
            if mode == "rolling":
                target = f"never below {n - 1} of {n}"
                result = "PASS" if least >= n - 1 else "FAIL"
            else:
                target = "shows the drop"
                result = f"drop to {least} of {n}" if least < n - 1 else f"no drop below {n - 1} (?)"
            lines.append(
                f"| {mode} | {'; '.join(routes)} | {len(rows)} | {spread([r.request for r in rows])}"
                f" | {spread([r.over for r in rows])} | {least} of {n} ({', '.join(str(r.least) for r in rows)})"
                f" | {statistics.median(r.below_all for r in rows):.2f}"
                f" | {statistics.median(r.below_one for r in rows):.2f}"
                f" | {statistics.median(silent):.2f} ({max(silent):.2f}) | {target} | {result} |"
            )
        rolling = [r.over for r in self.rounds if r.mode == "rolling"]
        at_once = [r.over for r in self.rounds if r.mode != "rolling"]
        if rolling and at_once:
            lines.append("")
            lines.append(
                f"- rolling takes {statistics.median(rolling) / statistics.median(at_once):.1f} x as long as"
                " all at once (medians of the time until every node answers with a new pid);"
                f" {statistics.median(rolling) / n:.2f} s per instance"
            )
        lines.append(
            "- request: the restart request(s); done: from the request until the first ping sample in which"
            " every node answered, sent after every old worker had exited and every instance showed a new pid;"
            " least answering: fewest nodes answering one ping sample in that span; silent: for each node,"
            " the time covered by samples it did not answer, in that span"
        )
        failed = [r.failed for r in self.rounds if r.failed]
        if failed:
            lines.append(f"- failed instances reported by the route: {failed}")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each mode, taking turns")
    parser.add_argument("--instances", type=int, default=5, help="instances of the app (>= 2)")
    parser.add_argument("--agents", type=int, default=2, help="agents in the cluster")
    add_sampler_arguments(parser)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of rest before each round")
    parser.add_argument(
        "--route",
        choices=("auto", "app", "instance"),
        default="auto",
        help="app: POST /<app>/restart; instance: per-instance restarts; auto: app, falling back on a 404/405",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.instances < 2 or args.rounds < 1 or args.agents < 1:
        parser.error("--instances must be at least 2, --rounds and --agents at least 1")

    exit_on_sigterm()
    bench = Bench(args)
    run = Run()

    def report() -> None:
        if not bench.rounds:
            return
        text = "\n".join(
            [
                *run.header("bench_rolling.py"),
                bench.table(),
                *(f"- {note}" for note in bench.notes),
                f"- {args.agents} agent(s), cluster {bench.cluster}; pings every {args.interval} s,"
                f" each waiting at most {args.ping_timeout} s; {run.load()}",
            ]
        )
        print(text)
        run.record("bench_rolling.py", SECTION, text, args.write)

    with run.guard(bench.root, bench.cleanup, report, keep=args.keep):
        bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
