"""What the benchmark harnesses share.

- ``Run``: one run of a benchmark (when it started, the load then), its
  command line and load average for the report, ``Run.guard``: clean up,
  report and keep or remove the data directory, even on error, and
  ``Run.record``: the figures to RESULTS.md unless the run failed;
  ``exit_on_sigterm`` turns a TERM into that same clean exit.
- ``write_results``: a benchmark's figures between its markers in
  ``bench/RESULTS.md``, the rest of the file kept.
- The common options: ``add_sampler_arguments`` (``--interval``,
  ``--ping-timeout``), ``add_output_arguments`` (``--no-write``, ``--keep``).
- Agents (``tests.integration.agents.AgentProcess``): ``stop_agents`` by
  pid and their workers by pid file, ``wait_membership``, ``put_app`` and
  ``wait_app_everywhere`` with the cheap workers' ``WORKER_ARGUMENTS``.
- Celery pings: ``Pinger`` (blocking, for the set-up) and ``Sampler``
  (overlapping broadcasts at a steady pace, kept as samples), ``covered``
  (time a condition held over the samples).
- The report: ``table_head``, ``spread``, ``percentile``, ``counts``.

The harnesses are run as scripts (``.venv/bin/python bench/bench_x.py``)
and put the repository root on ``sys.path`` before importing this module as
``bench.common``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from celery import Celery

from tests.integration.agents import BROKER, AgentProcess, kill_leftover_workers, wait_until

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Cheap workers: the benchmarks are about when they answer, not about what they do.
WORKER_ARGUMENTS = "--without-mingle --without-gossip --without-heartbeat"


# -- one run ---------------------------------------------------------------


def exit_on_sigterm() -> None:
    """A TERM exits through the ``finally`` blocks (agents stopped, workers
    killed) as an interrupt would."""

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


class Run:
    """One run of a benchmark: when it started and the load average then."""

    def __init__(self) -> None:
        self.started = datetime.datetime.now(datetime.UTC)
        self.wall_start = time.monotonic()
        self.load_before = os.getloadavg()[0]
        self.failed = False

    def header(self, script: str) -> list[str]:
        """The report's first lines: when, how long, and the command."""
        return [
            f"Run of {self.started:%Y-%m-%d %H:%M} UTC, {time.monotonic() - self.wall_start:.0f} s in all:",
            "",
            "    " + " ".join([f".venv/bin/python bench/{script}", *sys.argv[1:]]),
            "",
        ]

    def load(self, cpus_note: str = "") -> str:
        return (
            f"1-min load average {self.load_before:.2f} at start, {os.getloadavg()[0]:.2f} at the end"
            f" ({os.cpu_count()} CPUs{cpus_note})"
        )

    def record(self, script: str, section: str, text: str, write: bool = True) -> None:
        """``write_results`` unless not to ``write`` or the run failed."""
        if write and not self.failed:
            write_results(script, section, text)
            print(f"written to {RESULTS}", file=sys.stderr)

    @contextlib.contextmanager
    def guard(
        self,
        root: Path,
        cleanup: Callable[[], None],
        report: Callable[[], None] | None = None,
        keep: bool | Callable[[], bool] = False,
    ) -> Iterator[Run]:
        """Run the body; then, even on error, ``cleanup()`` (stop the agents),
        ``report()`` (``self.failed`` tells whether the body raised), and
        remove ``root`` unless the body failed or ``keep`` (or ``keep()``)."""
        try:
            yield self
        except BaseException:
            self.failed = True
            raise
        finally:
            cleanup()
            if report is not None:
                report()
            if self.failed or (keep() if callable(keep) else keep):
                print(f"data and agent logs kept in {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``Sampler``'s pace: ``--interval`` and ``--ping-timeout``."""
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between two pings sent")
    parser.add_argument("--ping-timeout", type=float, default=0.5, help="seconds a ping waits for answers")


def add_output_arguments(parser: argparse.ArgumentParser, write: bool = True) -> None:
    """``--no-write`` (when the benchmark writes RESULTS.md) and ``--keep``."""
    if write:
        parser.add_argument("--no-write", dest="write", action="store_false", help="do not update bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")


def write_results(script: str, section: str, text: str) -> None:
    """Put ``text`` between the markers of ``script``'s figures in
    RESULTS.md; add ``section`` (its heading, and any text before the
    figures) and the markers at the end when they are not there."""
    begin = f"<!-- {script}: begin of generated figures -->"
    end = f"<!-- {script}: end of generated figures -->"
    block = f"{begin}\n{text}\n{end}"
    content = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        content = head + block + tail
    else:
        content = content.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    RESULTS.write_text(content)


# -- agents ----------------------------------------------------------------


def stop_agents(agents: Iterable[AgentProcess], *, at_once: bool = False, timeout: float = 60.0) -> None:
    """Stop every agent by pid (TERM, then KILL after ``timeout``), one after
    the other or ``at_once`` (none of them outlives the others long enough
    to fail over a peer's instances), then kill every worker left by its
    pid file.  An agent that cannot be stopped is reported, not raised."""
    agents = list(agents)
    errors: list[str] = []

    def stop(agent: AgentProcess) -> None:
        try:
            agent.stop(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            errors.append(f"could not stop agent {agent.agent_id} (pid {agent.pid}): {e}")

    if at_once:
        threads = [threading.Thread(target=stop, args=(a,)) for a in agents if a.process is not None]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 30)
    else:
        for agent in agents:
            stop(agent)
    for directory in dict.fromkeys(a.directory for a in agents):
        kill_leftover_workers(directory)
    for error in errors:
        print(error, file=sys.stderr)


def alive_ids(agent: AgentProcess) -> set[str]:
    """The agents ``agent`` lists alive in ``GET /agents/``."""
    status, rows, _ = agent.request("GET", "/agents/")
    assert status == 200, (status, rows)
    return {row["id"] for row in rows if row["alive"]}


def wait_membership(agents: list[AgentProcess], limit: float = 30.0, interval: float = 0.1) -> None:
    """Wait until every one of ``agents`` sees exactly ``agents`` alive."""
    ids = {a.agent_id for a in agents}
    for agent in agents:
        wait_until(lambda a=agent: alive_ids(a) == ids, limit, interval=interval, what=f"{sorted(ids)} alive")


def put_app(agent: AgentProcess, app: str, timeout: float = 30.0) -> None:
    """Create (or update) ``app`` with the cheap workers' arguments."""
    status, body, _ = agent.request("PUT", f"/{app}/", {"arguments": WORKER_ARGUMENTS}, timeout=timeout)
    assert status in (200, 201), (status, body)


def wait_app_everywhere(agents: list[AgentProcess], app: str, limit: float = 15.0) -> None:
    """The app reaches every agent by broadcast; wait until it did."""
    wait_until(
        lambda: all(a.request("GET", f"/{app}/")[0] == 200 for a in agents),
        limit,
        what=f"app {app} on every agent",
    )


# -- Celery pings ----------------------------------------------------------


def instance_of(node: str) -> str:
    """``<instance>@<agent>`` -> ``<instance>``."""
    return node.split("@", 1)[0]


def answering(client: Celery, nodes: list[str] | None, timeout: float) -> set[str]:
    """The node names answering one broadcast ping (to ``nodes``, or to every
    worker on the broker with None).  With a destination, the broadcast
    returns as soon as every node answered, else after the timeout."""
    replies = client.control.ping(destination=nodes, timeout=timeout) or []
    return {node for reply in replies for node in reply}


class Pinger:
    """Blocking Celery pings for the set-up (not timed)."""

    def __init__(self) -> None:
        self.client = Celery(broker=BROKER, set_as_current=False)

    def close(self) -> None:
        self.client.close()

    def answering(self, nodes: list[str], timeout: float = 1.0) -> set[str]:
        return answering(self.client, list(nodes), timeout)

    def wait_all(self, nodes: list[str], limit: float = 120.0) -> None:
        wait_until(lambda: set(nodes) <= self.answering(nodes), limit, interval=0.2, what=f"{len(nodes)} workers")

    def workers_per_instance(self, names: set[str], timeout: float = 2.0) -> Counter:
        """Workers answering a broadcast ping, per instance of ``names``."""
        return Counter(
            instance_of(node) for node in answering(self.client, None, timeout) if instance_of(node) in names
        )


Sample = tuple[float, frozenset[str]]


class Sampler:
    """Broadcast pings to ``nodes`` every ``interval`` seconds, overlapping,
    each from a thread with its own Celery client; keeps (send time,
    answering nodes) for every ping."""

    def __init__(self, nodes: list[str], interval: float, timeout: float) -> None:
        self.nodes = list(nodes)
        self.interval = interval
        self.timeout = timeout
        self.samples: list[Sample] = []
        self.errors = 0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._local = threading.local()
        self._clients: list[Celery] = []
        threads = int(timeout / interval) + 2
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sampler")
        self._ticker = threading.Thread(target=self._tick, name="sampler-ticker", daemon=True)

    def start(self) -> Sampler:
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._ticker.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients:
            client.close()

    def _client(self) -> Celery:
        client = getattr(self._local, "client", None)
        if client is None:
            client = Celery(broker=BROKER, set_as_current=False)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _tick(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._ping)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _ping(self) -> None:
        if self._stop.is_set():
            return
        client = self._client()
        sent = time.monotonic()
        try:
            answered = frozenset(answering(client, self.nodes, self.timeout)) & frozenset(self.nodes)
        except Exception:  # noqa: BLE001 - a lost sample, counted
            with self._lock:
                self.errors += 1
            return
        with self._lock:
            self.samples.append((sent, answered))
            self._lock.notify_all()

    def between(self, start: float, end: float) -> list[Sample]:
        with self._lock:
            return sorted(s for s in self.samples if start <= s[0] <= end)

    def wait_sample(self, after: float, predicate: Any, limit: float) -> Sample:
        """The first sample sent at or after ``after`` for which
        ``predicate(answered)`` holds (waits at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        with self._lock:
            while True:
                found = sorted(s for s in self.samples if s[0] >= after and predicate(s[1]))
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching sample within {limit} s")
                self._lock.wait(min(left, 0.5))


def covered(samples: list[Sample], end: float, predicate: Any) -> float:
    """Seconds covered by the samples for which ``predicate(answered)``
    holds (each sample stands until the next one is sent)."""
    total = 0.0
    for i, (sent, answered) in enumerate(samples):
        until = samples[i + 1][0] if i + 1 < len(samples) else end
        if predicate(answered):
            total += until - sent
    return total


# -- the report ------------------------------------------------------------


def table_head(*columns: str, spaced: bool = False) -> list[str]:
    """A Markdown table's heading and separator lines (``| --- |`` cells
    when ``spaced``, else ``|---|``)."""
    separator = "| " + " | ".join("---" for _ in columns) + " |" if spaced else "|" + "---|" * len(columns)
    return ["| " + " | ".join(columns) + " |", separator]


def spread(values: list[float]) -> str:
    """``median (min-max)``, two decimals."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the 198th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def counts(counter: Mapping[str, int]) -> str:
    """``a=1, b=2`` by key, ``-`` when empty."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"
