"""The Supervisor on the real reactor against real ``celery worker``
processes and the real RabbitMQ at 127.0.0.1:5672.

Checks go through Celery's own client (ping, inspect, send_task), run in a
thread so that the reactor, and with it the supervisor, keeps running.  Every
wait is bounded; every worker process seen is killed by pid in cleanup.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from scs.control import CeleryControl
from scs.leftovers import ProcessTable, is_worker_for
from scs.records import BrokerInfo, InstanceSpec, QueueBinding
from scs.supervisor import SupervisionPolicy, Supervisor
from scs.worker import build_argv

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
BROKER = BrokerInfo.from_url(BROKER_URL)
HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = ProcessTable()


def _broker_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (the worker's pool)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    return TABLE.cmdline(pid) is not None


def tmpdir(tc) -> str:
    """A fresh directory under the system temp dir, removed after the test
    (trial's mktemp() would put it in the current directory under pytest)."""
    d = tempfile.mkdtemp(prefix="scs-test-")
    tc.addCleanup(shutil.rmtree, d, True)
    return d


class _WorkerTestCase(TestCase):
    """Set-up, clean-up and helpers; the tests are in the subclasses."""

    timeout = 90

    def setUp(self) -> None:
        if not _broker_reachable():
            raise SkipTest("no RabbitMQ on 127.0.0.1:5672")
        self.dir = tmpdir(self)
        os.makedirs(self.dir, exist_ok=True)
        # A node name of its own per test run: nothing else answers for it.
        self.hostname = f"scs-it-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = f"it{uuid.uuid4().hex[:6]}"
        self.specs: list[InstanceSpec] = []
        self.events: list[dict[str, Any]] = []
        self.pids: set[int] = set()
        self.client = Celery(broker=BROKER_URL, set_as_current=False)
        self.client.conf.result_backend = "rpc://"
        # Workers inherit the agent's environment: that is how they find
        # the tiny app module.
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = HERE + (os.pathsep + old if old else "")
        self.addCleanup(self._restore_env, old)
        self.addCleanup(self._kill_leftovers)
        self.sup: Supervisor | None = None

    def _restore_env(self, old: str | None) -> None:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old

    def _kill_leftovers(self) -> None:
        """By pid: every worker (and pool child) this test saw or left a pid file for."""
        for name in os.listdir(self.dir):
            pid = TABLE.read_pidfile(os.path.join(self.dir, name, "worker.pid"))
            if pid is not None and is_worker_for(TABLE.cmdline(pid), name):
                self.pids.add(pid)
        for pid in list(self.pids):
            for child in children_of(pid):
                TABLE.kill(child, signal.SIGKILL)
            TABLE.kill(pid, signal.SIGKILL)
        self.client.close()

    # -- helpers -------------------------------------------------------------

    def spec(self, suffix: str = "w", **kw: Any) -> InstanceSpec:
        kw.setdefault("app", "it")
        kw.setdefault("broker", BROKER)
        return InstanceSpec(name=f"{self.prefix}{suffix}", **kw)

    def node(self, spec: InstanceSpec) -> str:
        return f"{spec.name}@{self.hostname}"

    def supervisor(self, **kw: Any) -> Supervisor:
        kw.setdefault("interval", 0.5)
        kw.setdefault("kill_timeout", 5.0)
        kw.setdefault("wait_after_broker_revived", 2.0)
        kw.setdefault("min_uptime", 3.0)
        kw.setdefault("backoff_base", 0.2)
        kw.setdefault("max_missed_pings", 2)
        sup = Supervisor(
            lambda: self.specs,
            self.dir,
            hostname=self.hostname,
            policy=SupervisionPolicy(**kw),
            reactor=reactor,
            control=CeleryControl(reactor),
            spawner=reactor,
            process_table=TABLE,
        )
        sup.log = Logger(observer=self.events.append)
        self.sup = sup
        self.addCleanup(self._stop)
        return sup

    async def _stop(self) -> None:
        if self.sup is not None and self.sup.running:
            self.remember()
            await self.sup.stopService()

    def remember(self) -> None:
        if self.sup is None:
            return
        for s in self.specs:
            pid = self.sup.status(s.name).pid
            if pid:
                self.pids.add(pid)

    async def until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.remember()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout} s: {what}")
            await deferLater(reactor, 0.05, lambda: None)

    def in_thread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        return deferToThread(f, *args, **kw)

    async def client_ping(self, spec: InstanceSpec, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Celery's own ping, to every node (no destination): all replies."""
        node = self.node(spec)

        def call() -> list[dict[str, Any]]:
            replies = self.client.control.ping(destination=[node], timeout=timeout)
            return [r for r in replies or () if node in r]

        return await self.in_thread(call)

    async def inspect(self, spec: InstanceSpec, method: str) -> Any:
        node = self.node(spec)

        def call() -> Any:
            i = self.client.control.inspect(destination=[node], timeout=2.0)
            return (getattr(i, method)() or {}).get(node)

        return await self.in_thread(call)

    async def ready(self, spec: InstanceSpec, timeout: float = 20.0) -> int:
        assert self.sup is not None
        ok = await self.sup.wait_ready(spec.name, timeout)
        self.assertTrue(ok, f"{spec.name} never answered; state {self.sup.status(spec.name)}")
        self.remember()
        pid = self.sup.status(spec.name).pid
        assert pid is not None
        return pid


class WorkerIntegrationTests(_WorkerTestCase):
    async def test_start_answers_celery_ping(self) -> None:
        s = self.spec()
        self.specs = [s]
        sup = self.supervisor()
        t0 = time.monotonic()
        sup.startService()
        pid = await self.ready(s)
        elapsed = time.monotonic() - t0
        replies = await self.client_ping(s)
        self.assertEqual(len(replies), 1)
        st = sup.status(s.name)
        self.assertEqual((st.state, st.restarts), ("running", 0))
        self.assertEqual(TABLE.read_pidfile(os.path.join(self.dir, s.name, "worker.pid")), pid)
        with open(os.path.join(self.dir, s.name, "worker.log"), encoding="utf-8") as f:
            self.assertIn(self.node(s), f.read())
        self.assertTrue([e for e in self.events if e.get("event") == "successfully started"])
        self.assertLess(elapsed, 10.0)

    async def test_non_ascii_instance_name(self) -> None:
        s = self.spec("-wörker-ü")
        self.specs = [s]
        sup = self.supervisor(interval=30.0)
        sup.startService()
        pid = await self.ready(s)
        self.assertEqual(len(await self.client_ping(s)), 1)
        self.assertEqual(TABLE.read_pidfile(os.path.join(self.dir, s.name, "worker.pid")), pid)
        self.assertIn(f"dq.{s.name}", await sup.active_queues(s.name))

    async def test_kill9_is_restarted_at_once(self) -> None:
        s = self.spec()
        self.specs = [s]
        sup = self.supervisor(interval=30.0)  # no wake-up can help: processEnded must
        sup.startService()
        old = await self.ready(s)
        os.kill(old, signal.SIGKILL)
        await self.until(lambda: sup.status(s.name).pid not in (None, old), 5, "a new pid")
        new = await self.ready(s)
        self.assertNotEqual(new, old)
        self.assertEqual(len(await self.client_ping(s)), 1)
        self.assertEqual(sup.status(s.name).restarts, 1)
        self.assertTrue([e for e in self.events if e.get("event") == "successfully restarted"])

    async def test_sigstop_is_replaced(self) -> None:
        s = self.spec()
        self.specs = [s]
        sup = self.supervisor(interval=0.5, max_missed_pings=2)
        sup.startService()
        old = await self.ready(s)
        os.kill(old, signal.SIGSTOP)
        self.addCleanup(TABLE.kill, old, signal.SIGKILL)
        await self.until(lambda: sup.status(s.name).pid not in (None, old), 15, "replacement")
        await self.ready(s)
        self.assertEqual(len(await self.client_ping(s)), 1)
        self.assertFalse(alive(old))
        self.assertTrue([e for e in self.events if e.get("event") == "unresponsive.kill"])

    async def test_bad_celery_app_backs_off_then_fails(self) -> None:
        s = self.spec(celery_app="no_such_module_for_scs_tests")
        self.specs = [s]
        sup = self.supervisor(max_rapid_failures=3, backoff_base=0.2)
        sup.startService()
        await self.until(lambda: sup.status(s.name).state == "failed", 40, "failed state")
        # Three spawns, two restarts: the third death was not restarted.
        self.assertEqual(sup.status(s.name).restarts, 2)
        self.assertTrue([e for e in self.events if e.get("event") == "backoff"])
        # It stays failed across wake-ups.
        await deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(sup.status(s.name).state, "failed")
        self.assertEqual(sup.status(s.name).restarts, 2)
        # A forced restart tries again.
        await sup.restart(s.name)
        self.assertIn(sup.status(s.name).state, ("starting", "restarting", "failed"))
        await self.until(lambda: sup.status(s.name).restarts >= 3, 10, "a new attempt")
        with open(os.path.join(self.dir, s.name, "worker.log"), encoding="utf-8") as f:
            self.assertIn("no_such_module_for_scs_tests", f.read())

    async def test_queues_and_autoscale_follow_the_spec(self) -> None:
        tasks = f"{self.prefix}-tasks"
        s = self.spec(queues=(QueueBinding(tasks, tasks, tasks),), max_concurrency=2, min_concurrency=1)
        self.specs = [s]
        sup = self.supervisor(interval=30.0)
        sup.startService()
        await self.ready(s)
        queues = {q["name"] for q in await self.inspect(s, "active_queues")}
        self.assertEqual(queues, {f"dq.{s.name}", tasks})
        self.assertEqual(sorted(await sup.active_queues(s.name)), sorted([f"dq.{s.name}", tasks]))
        # New spec: another queue on its own exchange/routing key, new range.
        other = f"{self.prefix}-t2"
        s2 = self.spec(
            queues=(QueueBinding(other, f"{other}-ex", f"{other}-rk", "direct"),),
            max_concurrency=3,
            min_concurrency=2,
        )
        self.specs = [s2]
        await sup.wake()
        # The worker answers add_consumer before it runs it (Celery defers
        # the change to its event loop): poll for the result.
        want = {f"dq.{s.name}", other}
        by_name: dict[str, Any] = {}
        deadline = time.monotonic() + 5
        while set(by_name) != want and time.monotonic() < deadline:
            by_name = {q["name"]: q for q in await self.inspect(s, "active_queues")}
        self.assertEqual(set(by_name), want)
        self.assertEqual(by_name[other]["exchange"]["name"], f"{other}-ex")
        self.assertEqual(by_name[other]["routing_key"], f"{other}-rk")
        stats = await self.inspect(s, "stats")
        self.assertEqual((stats["autoscaler"]["max"], stats["autoscaler"]["min"]), (3, 2))
        self.assertEqual(sorted(await sup.active_queues(s.name)), sorted([f"dq.{s.name}", other]))
        self.assertEqual((await sup.stats(s.name))["autoscaler"]["max"], 3)
        self.assertEqual(sup.status(s.name).restarts, 0)  # all of it live

    async def test_send_task_runs_on_the_worker(self) -> None:
        q = f"{self.prefix}-work"
        s = self.spec(celery_app="celeryapp_for_tests", queues=(QueueBinding(q, q, q),))
        self.specs = [s]
        sup = self.supervisor(interval=30.0)
        sup.startService()
        await self.ready(s)

        def call() -> Any:
            result = self.client.send_task("scs_tests.hostname", queue=q)
            return result.get(timeout=15)

        self.assertEqual(await self.in_thread(call), self.node(s))

        def add() -> Any:
            return self.client.send_task("scs_tests.add", (2, 3), queue=q).get(timeout=15)

        self.assertEqual(await self.in_thread(add), 5)

    async def test_stop_service_leaves_no_process(self) -> None:
        a, b = self.spec("a", max_concurrency=2, min_concurrency=2), self.spec("b")
        self.specs = [a, b]
        sup = self.supervisor()
        sup.startService()
        pids = [await self.ready(a), await self.ready(b)]
        everything = pids + [c for p in pids for c in children_of(p)]
        self.assertGreater(len(everything), 2)  # pool children included
        await sup.stopService()
        for pid in everything:
            self.assertFalse(alive(pid), f"pid {pid} still alive")
        self.assertEqual(sup.status(a.name).state, "stopped")

    async def test_disable_and_delete_stop_workers(self) -> None:
        a, b = self.spec("a"), self.spec("b")
        self.specs = [a, b]
        sup = self.supervisor(interval=30.0)
        sup.startService()
        pa, pb = await self.ready(a), await self.ready(b)
        self.specs = [self.spec("a", is_enabled=False)]
        await sup.wake()
        self.assertFalse(alive(pa))
        self.assertFalse(alive(pb))
        self.assertEqual(await self.client_ping(a), [])

    async def test_leftover_worker_is_replaced(self) -> None:
        """After an agent crash: the old worker (found by its pid file) is
        ended before a new one starts; exactly one node answers."""
        s = self.spec()
        self.specs = [s]
        os.makedirs(os.path.join(self.dir, s.name))
        argv = build_argv(s, self.dir, self.hostname)
        log = open(os.path.join(self.dir, s.name, "worker.log"), "ab")
        self.addCleanup(log.close)
        old = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.pids.add(old.pid)
        self.addCleanup(old.wait, 10)
        await self.until(
            lambda: TABLE.read_pidfile(os.path.join(self.dir, s.name, "worker.pid")) == old.pid,
            15,
            "the hand-started worker's pid file",
        )
        sup = self.supervisor(interval=30.0)
        sup.startService()
        new = await self.ready(s)
        self.assertNotEqual(new, old.pid)
        self.assertIsNotNone(old.poll())  # ended (and reaped here, its parent)
        # A ping without destination: every node that answers, once each.

        def broadcast() -> list[dict[str, Any]]:
            return self.client.control.ping(timeout=1.0) or []

        replies = [r for r in await self.in_thread(broadcast) if self.node(s) in r]
        self.assertEqual(len(replies), 1)
        self.assertTrue([e for e in self.events if e.get("event") == "leftover"])


class BrokerOutageTests(_WorkerTestCase):
    """A private RabbitMQ node (never the shared one) is stopped and started
    again under a running worker."""

    timeout = 240

    async def test_no_restart_during_outage_or_grace(self) -> None:
        try:
            from tests.integration.rabbitmq_node import PrivateRabbitMQ, available
        except ImportError as e:
            raise SkipTest(f"private RabbitMQ helper not importable: {e}") from None
        if not available():
            raise SkipTest("needs rabbitmq-server installed and root")
        base = tmpdir(self)
        os.chmod(base, 0o755)  # the rabbitmq user must reach its data dir
        broker = PrivateRabbitMQ(Path(base) / "rabbit")
        await self.in_thread(broker.start)
        self.addCleanup(broker.stop)
        info = BrokerInfo.from_url(broker.url)
        s = self.spec(broker=info)
        self.specs = [s]
        grace = 15.0
        sup = self.supervisor(interval=0.5, max_missed_pings=2, wait_after_broker_revived=grace)
        sup.startService()
        pid = await self.ready(s)

        await self.in_thread(broker.stop)
        down_at = time.monotonic()
        await self.until(lambda: [e for e in self.events if e.get("event") == "broker.down"], 10, "broker.down")
        # Well past max_missed_pings wake-ups without the broker.
        await deferLater(reactor, 5.0, lambda: None)
        self.assertEqual(sup.status(s.name).pid, pid)
        await self.in_thread(broker.start)
        up_at = time.monotonic()

        def answers() -> bool:
            node = f"{s.name}@{self.hostname}"
            client = Celery(broker=broker.url, set_as_current=False)
            try:
                return bool(client.control.ping(destination=[node], timeout=0.5))
            except Exception:  # noqa: BLE001 - any failure to ping is "not answering"
                return False
            finally:
                client.close()

        ok = False
        deadline = time.monotonic() + 60
        while not ok and time.monotonic() < deadline:
            ok = await self.in_thread(answers)
        self.assertTrue(ok, "the worker never answered after the broker came back")
        self.assertEqual(sup.status(s.name).pid, pid)
        self.assertEqual(sup.status(s.name).restarts, 0)
        self.assertFalse([e for e in self.events if e.get("event") == "unresponsive.kill"])
        await self.until(lambda: [e for e in self.events if e.get("event") == "broker.up"], 10, "broker.up")
        # Once the worker answers again the supervisor sees it running.
        await self.until(lambda: sup.status(s.name).state == "running", 10, "running again")
        self.assertEqual(sup.status(s.name).pid, pid)
        print(f"outage {up_at - down_at:.1f} s; answered again {time.monotonic() - up_at:.1f} s after")


class ControlIntegrationTests(_WorkerTestCase):
    """scs.control.CeleryControl against the real broker."""

    async def test_concurrent_calls_do_not_exhaust_the_pool(self) -> None:
        # Every control call holds two pooled connections; with Celery's
        # default pool limit (10) ten threads deadlock for good.
        from twisted.internet.defer import gatherResults

        from scs.control import CeleryControl

        control = CeleryControl(reactor)
        self.addCleanup(control.close)
        t0 = time.monotonic()
        calls = [control.ping(BROKER.url, [f"nobody-{i}@{self.hostname}"], 0.05) for i in range(40)]
        d = gatherResults(calls)
        d.addTimeout(30, reactor)
        results = await d
        self.assertEqual(results, [set()] * 40)
        self.assertLess(time.monotonic() - t0, 30)

    async def test_broker_alive(self) -> None:
        from scs.control import CeleryControl

        control = CeleryControl(reactor)
        self.addCleanup(control.close)
        self.assertIs(await control.broker_alive(BROKER.url, 2.0), True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            dead = f"amqp://guest:guest@127.0.0.1:{port}//"
            self.assertIs(await control.broker_alive(dead, 1.0), False)
