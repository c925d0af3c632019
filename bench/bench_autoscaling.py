"""Benchmark of queue-depth autoscaling against a fixed single instance (issue 13).

One real ``scs-agent`` (``--without-srs``: it decides alone, ``--interval
1``) on loopback and the RabbitMQ broker on 127.0.0.1:5672.  For each
``--rounds`` round, taking turns:

    fixed       one instance consuming the queue, no policy
    autoscaled  the policy min 1, max ``--max`` (4), ``--per`` (10) messages
                per instance, scale_down_after ``--down-after`` (3 s),
                starting from its one instance

a burst of ``--tasks`` (60) tasks that each sleep ``--task-seconds`` (0.5)
is published to the queue at once.  Every ``--sample`` seconds (0.2) the
sampler reads the app's instance objects (``GET /<app>/instances/
?details=1``) and the queue's depth (``GET /<app>/queues/<q>/``).

Figures per round:

- time until the queue is empty: from the publication to the first sample
  with no ready message;
- time until every task is done: each task writes a marker file named by its
  id (one line per run: a task run twice would show);
- worker-seconds: the sum over the samples of the running instances times
  the sample period, from the publication until every task is done, and
  until the app is back to its one resting instance (for the autoscaled
  round, the extra instances live on for ``scale_down_after`` and one
  interval per step after the queue is empty).

The table is printed and written to ``bench/RESULTS.md`` between the
markers of its section (``--no-write`` to skip).  The agent is stopped by
pid and every worker left is killed by its pid file, even on error.  Every
wait is bounded.

Usage (from the repository root; about 2 minutes with the defaults):

    .venv/bin/python bench/bench_autoscaling.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from bench.common import WORKER_ARGUMENTS, spread, stop_agents, table_head, write_results  # noqa: E402
from tests.integration.agents import BROKER, AgentProcess, wait_until  # noqa: E402

HERE = str(ROOT / "tests" / "integration")
SECTION = (
    "## Autoscaling by queue depth against a fixed instance (issue 13)\n\n"
    "`bench/bench_autoscaling.py`: a burst of half-second tasks on one app, once with one\n"
    "fixed instance and once with an autoscaling policy starting from one instance."
)


@dataclass
class Round:
    kind: str
    empty_after: float = 0.0
    done_after: float = 0.0
    rest_after: float = 0.0
    worker_seconds_done: float = 0.0
    worker_seconds_rest: float = 0.0
    peak: int = 0
    ran_twice: int = 0
    samples: list[tuple[float, int, int | None]] = field(default_factory=list)


def running(agent: AgentProcess, app: str) -> int:
    status, body, _ = agent.request("GET", f"/{app}/instances/?details=1")
    return sum(1 for i in body if i["state"] == "running") if status == 200 else 0


def depth(agent: AgentProcess, app: str, queue: str) -> int | None:
    status, body, _ = agent.request("GET", f"/{app}/queues/{queue}/")
    return body.get("messages") if status == 200 else None


def one_round(agent: AgentProcess, client: Celery, kind: str, args: argparse.Namespace, work: Path) -> Round:
    app, queue = f"bas{uuid.uuid4().hex[:8]}", f"basq-{uuid.uuid4().hex[:8]}"
    marks = work / app
    marks.mkdir()
    settings = {"celery_app": "celeryapp_for_tests", "env": {"PYTHONPATH": HERE}, "arguments": WORKER_ARGUMENTS}
    assert agent.request("PUT", f"/{app}/", settings)[0] == 201
    assert agent.request("PUT", f"/{app}/queues/{queue}/")[0] == 201
    if kind == "fixed":
        status, body, _ = agent.request("PUT", f"/{app}/instances/", {"queues": [queue]})
        assert status == 201, body
    else:
        policy = {
            "queue": queue,
            "min_instances": 1,
            "max_instances": args.max,
            "messages_per_instance": args.per,
            "scale_down_after": args.down_after,
        }
        status, body, _ = agent.request("PUT", f"/{app}/autoscaling/", policy)
        assert status == 201, body
    wait_until(lambda: running(agent, app) == 1, 60, what="the first instance running")
    result = Round(kind)
    started = time.monotonic()
    for _ in range(args.tasks):
        client.send_task("scs_tests.slow_mark", (str(marks), args.task_seconds), queue=queue)
    deadline = started + args.limit
    while time.monotonic() < deadline:
        now = time.monotonic() - started
        count, messages = running(agent, app), depth(agent, app, queue)
        result.samples.append((now, count, messages))
        result.peak = max(result.peak, count)
        if not result.empty_after and messages == 0:
            result.empty_after = now
        if not result.done_after and len(os.listdir(marks)) >= args.tasks:
            result.done_after = now
        if result.done_after and count <= 1:
            result.rest_after = now
            break
        time.sleep(max(0.0, args.sample - (time.monotonic() - started - now)))
    else:
        raise AssertionError(f"{kind}: not back to rest within {args.limit} s")
    # Worker-seconds: each sample's running count over the time to the next.
    for (t0, count, _), (t1, _c, _m) in zip(result.samples, result.samples[1:], strict=False):
        result.worker_seconds_rest += count * (t1 - t0)
        if t1 <= result.done_after:
            result.worker_seconds_done += count * (t1 - t0)
    result.ran_twice = sum(1 for f in marks.iterdir() if len(f.read_text().splitlines()) != 1)
    agent.request("DELETE", f"/{app}/")
    return result


def table(rounds: list[Round], args: argparse.Namespace) -> str:
    lines = table_head(
        "setup",
        "rounds",
        "queue empty after, s",
        "all tasks done after, s",
        "worker-s until done",
        "back to 1 instance after, s",
        "worker-s until back to 1",
        "peak instances",
        "tasks run twice",
        spaced=True,
    )
    for kind in ("fixed", "autoscaled"):
        rs = [r for r in rounds if r.kind == kind]
        label = "1 fixed instance" if kind == "fixed" else f"policy 1..{args.max}, {args.per}/instance"
        lines.append(
            f"| {label} | {len(rs)} | {spread([r.empty_after for r in rs])} | {spread([r.done_after for r in rs])} "
            f"| {spread([r.worker_seconds_done for r in rs])} | {spread([r.rest_after for r in rs])} "
            f"| {spread([r.worker_seconds_rest for r in rs])} | {max(r.peak for r in rs)} "
            f"| {sum(r.ran_twice for r in rs)} |"
        )
    fixed = statistics.median(r.done_after for r in rounds if r.kind == "fixed")
    scaled = statistics.median(r.done_after for r in rounds if r.kind == "autoscaled")
    ws_fixed = statistics.median(r.worker_seconds_rest for r in rounds if r.kind == "fixed")
    ws_scaled = statistics.median(r.worker_seconds_rest for r in rounds if r.kind == "autoscaled")
    lines += [
        "",
        f"- {args.tasks} tasks of {args.task_seconds:g} s: done {fixed / scaled:.1f} x sooner with the policy "
        f"({scaled:.1f} s against {fixed:.1f} s); {ws_scaled / ws_fixed:.2f} x the worker-seconds of the fixed "
        f"instance until back to rest ({ws_scaled:.1f} against {ws_fixed:.1f}; the extra instances stay "
        f"scale_down_after = {args.down_after:g} s and one interval per step after the queue is empty)",
        f"- sampled every {args.sample:g} s through the API (instances running, queue depth); "
        f"one agent, --interval 1, worker concurrency 1, Celery's default prefetch (4)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each setup")
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--task-seconds", type=float, default=0.5)
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--per", type=int, default=10)
    parser.add_argument("--down-after", type=float, default=3.0)
    parser.add_argument("--sample", type=float, default=0.2)
    parser.add_argument("--limit", type=float, default=120.0, help="bound of one round, seconds")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-autoscaling-"))
    agent = AgentProcess(work / "agent1", "bench-as", "--without-srs", "--interval", "1")
    client = Celery(broker=BROKER, set_as_current=False)
    rounds: list[Round] = []
    try:
        agent.start()
        for index in range(args.rounds):
            for kind in ("fixed", "autoscaled") if index % 2 == 0 else ("autoscaled", "fixed"):
                result = one_round(agent, client, kind, args, work)
                print(
                    f"{kind}: empty {result.empty_after:.2f} s, done {result.done_after:.2f} s, "
                    f"rest {result.rest_after:.2f} s, {result.worker_seconds_rest:.1f} worker-s, peak {result.peak}",
                    flush=True,
                )
                rounds.append(result)
    finally:
        stop_agents([agent])
        client.close()
    text = table(rounds, args)
    print(text)
    if not args.no_write:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        generated = f"Generated {stamp} by\n\n    .venv/bin/python bench/bench_autoscaling.py"
        write_results("bench_autoscaling.py", SECTION, f"\n{generated}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
