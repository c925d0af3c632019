"""Worker logs (issue 10): ``scs.worker_log``'s tail and rotation, the
supervisor rotating live workers' logs at its wake-ups, the command-line
options, and ``GET /<app>/instances/<name>/log/`` on one agent and through
another one on the in-memory bus.  Nothing sleeps; nothing touches the
global reactor."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import random
import shutil
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import srs
from scs.agent import Agent, ClusterQueues, LocalAgent
from scs.errors import BadParameter, NotFound, Unavailable
from scs.http.api import API
from scs.operation_args import check_operation
from scs.policy import SupervisionPolicy
from scs.srs_trust import MessageCodec
from scs.store import Store
from scs.testing import FakeAMQPNetwork
from scs.worker import UnsafeName
from scs.worker_log import (
    CUT_START,
    MAX_ANSWER_JSON_BYTES,
    MAX_LINE_BYTES,
    MAX_TAIL_BYTES,
    TRUNCATED,
    fit_answer,
    read_tail,
    rotate,
    rotate_instance_log,
    tail,
)
from tests.surfaces_support import FakeSupervisor
from tests.test_supervisor import Harness, spec
from tests.test_tap import parse

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
SECRET = b"0123456789abcdef-cluster-secret"
MiB = 1024 * 1024


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reference_tail(data: bytes, lines: int, max_line: int) -> list[str]:
    """What tail() must answer, computed the obvious way on the whole file."""
    if not data or lines <= 0:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    out = []
    for raw in data.split(b"\n"):
        kept = raw[:max_line]
        if len(raw) <= max_line and kept.endswith(b"\r"):
            kept = kept[:-1]
        out.append(kept.decode("utf-8", "replace") + (TRUNCATED if len(raw) > max_line else ""))
    return out[-lines:]


# -- tail -----------------------------------------------------------------------------


def test_tail_of_a_small_file_oldest_first(tmp_path: Path) -> None:
    path = write(tmp_path / "worker.log", b"one\ntwo\nthree\n")
    assert tail(str(path), 2) == ["two", "three"]
    assert tail(str(path), 100) == ["one", "two", "three"]
    assert tail(str(path), 1) == ["three"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", []),
        (b"\n", [""]),
        (b"a", ["a"]),
        (b"a\nb", ["a", "b"]),  # no newline at the end: the last line counts
        (b"a\n\nb\n", ["a", "", "b"]),  # blank lines are lines
        (b"a\r\nb\r\n", ["a", "b"]),  # CRLF
        (b"a\rb\n", ["a\rb"]),  # a lone CR is not a line end
        (b"ok \xff\xfe\n\xe2\x82\xac\n", ["ok \ufffd\ufffd", "\u20ac"]),  # not UTF-8 / UTF-8
    ],
)
def test_tail_line_endings_and_bytes(tmp_path: Path, data: bytes, expected: list[str]) -> None:
    assert tail(str(write(tmp_path / "worker.log", data)), 100) == expected


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail(str(tmp_path / "nothing.log"), 100) == []


def test_tail_agrees_with_reading_the_whole_file() -> None:
    """Random bytes (newlines, CRs, broken UTF-8), random block and line
    sizes: blocks boundaries anywhere, lines across many blocks."""
    rng = random.Random(10)
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    path = directory / f"scs-tail-{os.getpid()}.log"
    try:
        for _ in range(250):
            data = bytes(rng.choice(b"ab\n\n\r\xff\xe2\x82") for _ in range(rng.randrange(0, 300)))
            path.write_bytes(data)
            for _ in range(8):
                lines, block, max_line = rng.randrange(1, 50), rng.randrange(1, 40), rng.randrange(1, 60)
                got = tail(str(path), lines, block_size=block, max_line_bytes=max_line)
                assert got == reference_tail(data, lines, max_line), (data, lines, block, max_line)
    finally:
        path.unlink(missing_ok=True)


def test_long_lines_are_cut_with_a_marker(tmp_path: Path) -> None:
    long = b"x" * (3 * MAX_LINE_BYTES) + b"END"
    path = write(tmp_path / "worker.log", b"first\n" + long + b"\nlast\n")
    first, cut, last = tail(str(path), 3)
    assert (first, last) == ("first", "last")
    assert cut == "x" * MAX_LINE_BYTES + TRUNCATED


def test_a_line_cut_inside_a_utf8_character_is_still_text(tmp_path: Path) -> None:
    path = write(tmp_path / "worker.log", "\u20ac".encode() * MAX_LINE_BYTES + b"\n")
    (line,) = tail(str(path), 1)
    assert line.endswith(TRUNCATED) and len(line.encode()) < MAX_LINE_BYTES + 100


def test_tail_of_a_100_mb_file_reads_only_its_end(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    filler = b"".join(b"filler %d\n" % n for n in range(100_000))  # ~1 MB
    with open(path, "wb") as f:
        for _ in range(100 * MiB // len(filler) + 1):
            f.write(filler)
        f.write(b"".join(b"line %d\n" % n for n in range(20_000)))
    assert path.stat().st_size >= 100 * MiB
    tracemalloc.start()
    try:
        got = tail(str(path), 10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [f"line {n}" for n in range(10_000, 20_000)]
    # 10,000 short lines, from a 100 MB file.
    assert peak < 4 * MiB, peak
    assert tail(str(path), 5) == [f"line {n}" for n in range(19_995, 20_000)]


def test_bytes_kept_are_bounded_whatever_the_lines(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    line = b"y" * (MAX_LINE_BYTES - 10)
    with open(path, "wb") as f:
        for n in range(2_000):
            f.write(b"%06d" % n + line + b"\n")
    tracemalloc.start()
    try:
        got = tail(str(path), 10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(x) for x in got) <= MAX_TAIL_BYTES
    # The newest lines, in order, without a gap.
    numbers = [int(x[:6]) for x in got]
    assert numbers == list(range(2_000 - len(numbers), 2_000)) and len(numbers) > 200
    assert peak < 6 * MiB, peak


def test_one_enormous_line_is_not_read_whole(tmp_path: Path) -> None:
    """A sparse 200 MB file without a newline: at most MAX_SCAN_BYTES are
    read, and the answer is one marked piece of the line."""
    path = tmp_path / "worker.log"
    with open(path, "wb") as f:
        f.truncate(200 * MiB)
    tracemalloc.start()
    try:
        (line,) = tail(str(path), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert line.startswith(CUT_START) and line.endswith(TRUNCATED)
    assert len(line) < MAX_LINE_BYTES + 100
    assert peak < 2 * MiB, peak
    # Lines after it are answered; the enormous one is left out then.
    with open(path, "ab") as f:
        f.write(b"\nafter\n")
    assert tail(str(path), 5) == ["after"]


def test_a_symlink_or_fifo_is_refused_not_read(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"do not show\n")
    link = tmp_path / "worker.log"
    link.symlink_to(secret)
    with pytest.raises(Unavailable):
        tail(str(link), 10)
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(Unavailable):
        tail(str(fifo), 10)  # and does not block waiting for a writer


def test_read_tail_refuses_a_symlinked_log_by_name(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"do not show\n")
    (tmp_path / "d" / "w1").mkdir(parents=True)
    (tmp_path / "d" / "w1" / "worker.log").symlink_to(secret)
    with pytest.raises(UnsafeName):
        read_tail(str(tmp_path / "d"), "w1", 10)
    with pytest.raises(UnsafeName):
        read_tail(str(tmp_path / "d"), "../d/w1", 10)


def test_fit_answer_keeps_the_newest_lines_within_the_budget() -> None:
    lines = ["\x01" * 1000] * 1000  # 6 bytes of JSON per byte
    fitted = fit_answer(lines, budget=100_000)
    assert 0 < len(fitted) < len(lines)
    assert len(json.dumps(fitted)) <= 100_000
    assert fit_answer(["a", "b"], budget=5) == ["b"]
    assert fit_answer([], budget=5) == []


# -- rotation -------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_rotate_leaves_a_small_log_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "worker.log", b"x" * 100)
    assert rotate(str(path), 100, 3) is None
    assert rotate(str(tmp_path / "missing.log"), 1, 3) is None
    assert _files(tmp_path) == {"worker.log": b"x" * 100}


def test_rotate_shifts_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    for n in (1, 2, 3, 5, 6):  # 5 and 6: kept by an earlier, larger setting
        write(tmp_path / f"worker.log.{n}", b"old %d" % n)
    write(log, b"current" * 10)
    assert rotate(str(log), 10, 3) == 70
    assert _files(tmp_path) == {
        "worker.log.1": b"current" * 10,
        "worker.log.2": b"old 1",
        "worker.log.3": b"old 2",
    }
    # The next rotation finds no worker.log until the worker reopens it.
    assert rotate(str(log), 10, 3) is None


def test_rotate_with_no_backups_removes_the_log(tmp_path: Path) -> None:
    log = write(tmp_path / "worker.log", b"z" * 50)
    write(tmp_path / "worker.log.1", b"older")
    assert rotate(str(log), 10, 0) == 50
    assert _files(tmp_path) == {}


def test_rotate_never_follows_a_symlink(tmp_path: Path) -> None:
    target = write(tmp_path / "elsewhere", b"e" * 100)
    (tmp_path / "worker.log").symlink_to(target)
    assert rotate(str(tmp_path / "worker.log"), 10, 3) is None
    assert target.read_bytes() == b"e" * 100


def test_a_watched_file_handler_loses_nothing_across_rotations(tmp_path: Path) -> None:
    """Celery's handler (WatchedFileHandler) reopens worker.log after a
    rename; what it wrote before is in the backups."""
    path = tmp_path / "worker.log"
    handler = logging.handlers.WatchedFileHandler(str(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("scs-test-rotation")
    logger.addHandler(handler)
    try:
        for n in range(500):
            logger.warning("line %d", n)
            rotate(str(path), 200, 100)
    finally:
        handler.close()
    seen = [line for p in tmp_path.iterdir() for line in p.read_text().splitlines()]
    assert sorted(seen) == sorted(f"line {n}" for n in range(500))
    assert len(list(tmp_path.iterdir())) > 10  # it did rotate, many times


def test_rotate_instance_log_logs_an_event(tmp_path: Path) -> None:
    write(tmp_path / "w1" / "worker.log", b"q" * 300)
    events: list[dict[str, Any]] = []
    size = rotate_instance_log(str(tmp_path), "w1", 100, 2, Logger(observer=events.append))
    assert size == 300
    (event,) = [e for e in events if e.get("event") == "worker.log.rotated"]
    assert (event["name"], event["size"], event["backups"]) == ("w1", 300, 2)
    assert rotate_instance_log(str(tmp_path), "w1", 100, 2, Logger(observer=events.append)) is None
    with pytest.raises(UnsafeName):
        rotate_instance_log(str(tmp_path), "..", 100, 2)


# -- the supervisor rotates at its wake-ups -------------------------------------------


class SupervisorRotationTests(SynchronousTestCase):
    def test_live_workers_logs_rotate_at_wake_up(self) -> None:
        h = Harness(self, [spec("w1"), spec("w2", is_enabled=False)], worker_log_max_bytes=100, worker_log_backups=2)
        h.wake()
        log = Path(h.dir) / "w1" / "worker.log"
        self.assertTrue(log.exists())  # spawn_worker made it
        log.write_bytes(b"a" * 101)
        stopped = write(Path(h.dir) / "w2" / "worker.log", b"b" * 500)
        h.wake()
        self.assertEqual((Path(h.dir) / "w1" / "worker.log.1").read_bytes(), b"a" * 101)
        self.assertFalse(log.exists())
        # A stopped instance's log does not grow: it is left alone.
        self.assertEqual(stopped.read_bytes(), b"b" * 500)
        (event,) = h.named("worker.log.rotated")
        self.assertEqual((event["name"], event["size"]), ("w1", 101))

    def test_a_log_that_cannot_be_rotated_is_logged_and_the_others_go_on(self) -> None:
        h = Harness(self, [spec("w1"), spec("w2")], worker_log_max_bytes=10, worker_log_backups=1)
        h.wake()
        for name in ("w1", "w2"):
            (Path(h.dir) / name / "worker.log").write_bytes(b"c" * 20)
        (Path(h.dir) / "w1" / "worker.log.1").mkdir()  # os.replace onto a directory fails
        h.wake()
        (failed,) = h.named("worker.log.rotate-failed")
        self.assertEqual(failed["name"], "w1")
        self.assertTrue((Path(h.dir) / "w2" / "worker.log.1").exists())
        self.assertEqual([e["name"] for e in h.named("worker.log.rotated")], ["w2"])
        self.assertEqual(len(h.named("wake-up")), 2)

    def test_policy_defaults(self) -> None:
        policy = SupervisionPolicy()
        self.assertEqual((policy.worker_log_max_bytes, policy.worker_log_backups), (10 * MiB, 3))


# -- command line ---------------------------------------------------------------------


def test_options_defaults_and_values() -> None:
    options = parse("-i", "agent1")
    assert (options["worker-log-max-bytes"], options["worker-log-backups"]) == (10 * MiB, 3)
    options = parse("-i", "agent1", "--worker-log-max-bytes", "4096", "--worker-log-backups", "0")
    assert (options["worker-log-max-bytes"], options["worker-log-backups"]) == (4096, 0)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--worker-log-max-bytes", "0"),
        ("--worker-log-max-bytes", "-5"),
        ("--worker-log-max-bytes", "ten"),
        ("--worker-log-max-bytes", "1.5"),
        ("--worker-log-backups", "-1"),
        ("--worker-log-backups", "many"),
    ],
)
def test_bad_option_values_name_the_option(option: str, value: str) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError) as raised:
        parse("-i", "agent1", option, value)
    assert option in str(raised.value)


# -- peers' requests ------------------------------------------------------------------


def test_peers_instance_log_arguments_are_checked() -> None:
    assert check_operation("instance_log", {"name": "w1", "app": "foo", "lines": "5"}) == {
        "name": "w1",
        "app": "foo",
        "lines": 5,
    }
    assert check_operation("instance_log", {"name": "w1"}) == {"name": "w1"}
    for bad in (0, -1, 10_001, "x", True, None, 2.5, [], "1e3"):
        with pytest.raises(BadParameter) as raised:
            check_operation("instance_log", {"name": "w1", "lines": bad})
        assert raised.value.details["parameter"] == "lines"
    with pytest.raises(BadParameter):
        check_operation("instance_log", {"name": "w1", "path": "/etc/passwd"})
    with pytest.raises(BadParameter):
        check_operation("instance_log", {"name": "../w1"})


# -- the API on one agent -------------------------------------------------------------


class Site:
    """One agent (fake supervisor, in-memory store, a real instance
    directory) and its API through StubTreq."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = Store.in_memory()
        self.local = LocalAgent(self.store, "agent1", BROKER, FakeSupervisor(), instance_dir=str(directory))
        self.treq = StubTreq(API(Agent(self.local)).resource())

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        outcome: list[Any] = []
        d = self.treq.request(method, "http://127.0.0.1:8001" + path, **kwargs)
        d.addCallback(lambda r: self.treq.content(r).addCallback(lambda body: outcome.append((r.code, body))))
        d.addErrback(outcome.append)
        self.treq.flush()
        assert outcome and isinstance(outcome[0], tuple), outcome
        code, body = outcome[0]
        return code, json.loads(body)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "instances")
    assert s.request("PUT", "/foo/instances/w1/")[0] == 201
    return s


def test_api_answers_the_last_lines(site: Site) -> None:
    assert site.request("GET", "/foo/instances/w1/log/") == (200, {"name": "w1", "agent": "agent1", "lines": []})
    write(site.directory / "w1" / "worker.log", b"".join(b"line %d\n" % n for n in range(250)))
    status, body = site.request("GET", "/foo/instances/w1/log/")
    assert status == 200
    assert body["lines"] == [f"line {n}" for n in range(150, 250)]  # 100 by default
    assert site.request("GET", "/foo/instances/w1/log?lines=5")[1]["lines"] == [f"line {n}" for n in range(245, 250)]
    assert site.request("GET", "/foo/instances/w1/log/?lines=")[1]["lines"][0] == "line 150"  # empty: not given
    assert len(site.request("GET", "/foo/instances/w1/log/?lines=10000")[1]["lines"]) == 250
    status, body = site.request("GET", "/foo/instances/w1/log/", json={"lines": 2})
    assert (status, body["lines"]) == (200, ["line 248", "line 249"])


def test_api_unknown_instance_or_app_is_404(site: Site) -> None:
    assert site.request("GET", "/foo/instances/nobody/log/")[0] == 404
    assert site.request("GET", "/bar/instances/w1/log/")[0] == 404


@pytest.mark.parametrize(
    "query",
    ["lines=0", "lines=-1", "lines=10001", "lines=abc", "lines=1.5", "lines=1e3", "lines=%20", "lines=5&lines=6"],
)
def test_api_bad_lines_is_a_400_naming_lines(site: Site, query: str) -> None:
    before = site.store.dump()
    status, body = site.request("GET", f"/foo/instances/w1/log/?{query}")
    assert status == 400 and body["parameter"] == "lines", body
    assert site.store.dump() == before


@pytest.mark.parametrize("value", [0, -3, 10_001, True, None, 1.5, "", [5], {"n": 5}])
def test_api_bad_lines_in_json_is_a_400_naming_lines(site: Site, value: Any) -> None:
    status, body = site.request("GET", "/foo/instances/w1/log/", json={"lines": value})
    assert status == 400 and body["parameter"] == "lines", (value, body)


def test_api_unknown_parameter_and_method(site: Site) -> None:
    status, body = site.request("GET", "/foo/instances/w1/log/?line=5")
    assert status == 400 and body["parameter"] == "line"
    assert site.request("POST", "/foo/instances/w1/log/")[0] == 405
    assert site.request("DELETE", "/foo/instances/w1/log/")[0] == 405


def test_api_symlinked_log_is_refused(site: Site, tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"do not show\n")
    (site.directory / "w1").mkdir(parents=True, exist_ok=True)
    (site.directory / "w1" / "worker.log").symlink_to(secret)
    status, body = site.request("GET", "/foo/instances/w1/log/")
    assert status == 400 and "do not show" not in json.dumps(body)


# -- through another agent on the bus -------------------------------------------------


class Bus:
    """Agents wired as makeService wires them, on the in-memory network;
    each with an instance directory of its own."""

    def __init__(self, tc: SynchronousTestCase, root: Path, *ids: str, secret: bytes | None = SECRET) -> None:
        self.tc = tc
        self.clock = Clock()
        self.clock.advance(1_000_000)  # wall-clock-like timestamps
        self.network = FakeAMQPNetwork(self.clock)
        self.agents: dict[str, Agent] = {}
        for agent_id in ids:
            self.add(agent_id, root / agent_id, secret)
        self.clock.advance(0)

    def add(self, agent_id: str, directory: Path, secret: bytes | None) -> None:
        store = Store.in_memory()
        self.tc.addCleanup(store.close)
        agent: Any = None
        node = srs.SRS(
            agent_id,
            self.network.transport(),
            reactor=self.clock,
            heartbeat_interval=2.0,
            rng=random.Random(agent_id),
            handler=lambda op, args: agent.handle_remote(op, args),
            summary=lambda: agent.local.summary(),
            codec=MessageCodec("scs", secret, clock=self.clock.seconds),
        )
        local = LocalAgent(
            store,
            agent_id,
            BROKER,
            FakeSupervisor(),
            clock=self.clock,
            resolve_queue=ClusterQueues(store, node),
            instance_dir=str(directory),
        )
        agent = Agent(local, node, random=random.Random(1), call_timeout=2.0, create_timeout=2.0)
        node.startService()
        self.tc.addCleanup(lambda: node.running and node.stopService())
        self.agents[agent_id] = agent

    def get(self, agent_id: str, path: str) -> tuple[int, Any]:
        treq = StubTreq(API(self.agents[agent_id]).resource())
        outcome: list[Any] = []
        d = treq.request("GET", "http://127.0.0.1:8001" + path)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda body: outcome.append((r.code, body))))
        d.addErrback(outcome.append)
        for _ in range(50):
            treq.flush()
            self.clock.advance(0.05)
            if outcome:
                break
        assert outcome and isinstance(outcome[0], tuple), outcome
        code, body = outcome[0]
        return code, json.loads(body)


class ThroughAnotherAgentTests(SynchronousTestCase):
    def _bus(self, secret: bytes | None) -> tuple[Bus, Path]:
        # trial's mktemp() would write under the current directory with pytest.
        root = Path(tempfile.mkdtemp(prefix="scs-test-")).resolve()
        self.addCleanup(shutil.rmtree, root, True)
        bus = Bus(self, root, "agent1", "agent2", secret=secret)
        owner = bus.agents["agent1"].local
        self.successResultOf(defer.Deferred.fromCoroutine(owner.instance_create("foo", "w1", nowait=True)))
        return bus, root / "agent1" / "w1" / "worker.log"

    def test_the_owner_answers_through_any_agent(self) -> None:
        bus, log = self._bus(SECRET)
        write(log, b"".join(b"celery line %d\n" % n for n in range(30)))
        status, body = bus.get("agent2", "/foo/instances/w1/log/?lines=5")
        self.assertEqual(status, 200, body)
        self.assertEqual(body, {"name": "w1", "agent": "agent1", "lines": [f"celery line {n}" for n in range(25, 30)]})
        self.assertEqual(bus.get("agent2", "/foo/instances/nobody/log/")[0], 404)
        status, body = bus.get("agent2", "/foo/instances/w1/log/?lines=0")
        self.assertEqual((status, body["parameter"]), (400, "lines"))

    def test_a_peer_asking_for_bad_lines_is_refused_by_the_owner(self) -> None:
        bus, log = self._bus(SECRET)
        write(log, b"x\n")
        d = bus.agents["agent2"].srs.call("agent1", "instance_log", {"name": "w1", "lines": 10**9})
        bus.clock.advance(0)
        failure = self.failureResultOf(d, BadParameter)
        self.assertEqual(failure.value.details.get("parameter"), "lines")
        d = bus.agents["agent2"].srs.call("agent1", "instance_log", {"name": "nobody"})
        bus.clock.advance(0)
        self.failureResultOf(d, NotFound)

    def _worst_case(self, secret: bytes | None) -> None:
        """Lines that cost the most once escaped (control bytes, quotes,
        backslashes, undecodable bytes) still fit one bus message."""
        bus, log = self._bus(secret)
        line = (b'\x01"\\\xff' * (MAX_LINE_BYTES // 4))[: MAX_LINE_BYTES - 1]
        write(log, (line + b"\n") * 2_000)
        status, body = bus.get("agent2", "/foo/instances/w1/log/?lines=10000")
        self.assertEqual(status, 200, body)
        self.assertGreater(len(body["lines"]), 10)
        self.assertLessEqual(len(json.dumps(body["lines"])), MAX_ANSWER_JSON_BYTES)
        self.assertEqual(body["lines"][-1], line.decode("utf-8", "replace"))

    def test_worst_case_answer_fits_a_sealed_message(self) -> None:
        self._worst_case(SECRET)

    def test_worst_case_answer_fits_an_unsigned_message(self) -> None:
        self._worst_case(None)
