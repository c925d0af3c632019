"""Unit tests of scs.supervisor.Supervisor on a MemoryReactorClock with a
fake spawner, a fake Celery control and a fake process table.  Nothing
sleeps: time moves by clock.advance()."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs.errors import GatewayTimeout, NotFound, Unavailable
from scs.policy import SupervisionPolicy, backoff_delay
from scs.records import BrokerInfo, InstanceSpec, QueueBinding
from scs.supervisor import Supervisor
from scs.testing import FakeControl, FakeProcessTable, FakeSpawner

BROKER = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5672//")
URL = BROKER.url


def spec(name="w1", **kw):
    kw.setdefault("app", "foo")
    kw.setdefault("broker", BROKER)
    return InstanceSpec(name=name, **kw)


def tmpdir(tc) -> str:
    """A fresh directory under the system temp dir, removed after the test
    (trial's mktemp() would put it in the current directory under pytest)."""
    d = tempfile.mkdtemp(prefix="scs-test-")
    tc.addCleanup(shutil.rmtree, d, True)
    return d


class Harness:
    """A Supervisor wired to fakes; ``specs`` is what desired() returns."""

    def __init__(self, tc: SynchronousTestCase, specs=(), start=False, timed=False, **kw):
        self.tc = tc
        self.clock = MemoryReactorClock()
        self.spawner = FakeSpawner()
        # timed: a ping missing a node takes its timeout on the clock;
        # otherwise every control call answers at once.
        self.control = FakeControl(clock=self.clock if timed else None)
        self.table = FakeProcessTable()
        self.specs = list(specs)
        self.dir = tmpdir(tc)
        os.makedirs(self.dir, exist_ok=True)
        self.events: list[dict] = []
        self.rand = 0.0
        kw.setdefault("interval", 5.0)
        kw.setdefault("min_uptime", 10.0)
        self.sup = Supervisor(
            lambda: self.specs,
            self.dir,
            reactor=self.clock,
            control=self.control,
            spawner=self.spawner,
            process_table=self.table,
            policy=SupervisionPolicy(**kw),
            hostname="h",
            random=lambda: self.rand,
        )
        self.sup.log = Logger(observer=self.events.append)
        if start:
            self.sup.startService()

    def wake(self):
        d = self.sup.wake()
        self.tc.successResultOf(d)

    def up(self, name="w1", queues=None, max=1, min=1):
        """The worker of ``name`` is up and answers (as its argv would make it)."""
        s = next(s for s in self.specs if s.name == name)
        if queues is None:
            queues = ["dq." + name, *s.queue_names]
        return self.control.up(f"{name}@h", queues=queues, max=s.max_concurrency, min=s.min_concurrency)

    def running(self, name="w1"):
        """Wake, spawn, answer: the worker is running."""
        self.wake()
        self.up(name)
        self.clock.advance(self.sup.policy.probe_interval)
        self.tc.assertEqual(self.sup.status(name).state, "running")

    def proc(self):
        (p,) = self.spawner.alive
        return p

    def named(self, event_name):
        return [e for e in self.events if e.get("event") == event_name]


class SpawnTests(SynchronousTestCase):
    def test_wake_spawns_enabled_only(self) -> None:
        h = Harness(self, [spec("a"), spec("b", is_enabled=False)])
        h.wake()
        (p,) = h.spawner.processes
        self.assertIn("a@h", p.args)
        st = h.sup.status("a")
        self.assertEqual((st.state, st.pid, st.restarts), ("starting", p.pid, 0))
        self.assertEqual(h.sup.status("b").state, "stopped")
        self.assertEqual(h.sup.status("unknown").state, "stopped")
        self.assertEqual(len(h.named("node.restart")), 1)
        self.assertEqual(len(h.named("wake-up")), 1)

    def test_probe_marks_running_and_wait_ready(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        ready = h.sup.wait_ready("w1", 5.0)
        h.clock.advance(0.1)
        self.assertNoResult(ready)
        h.up()
        h.clock.advance(0.5)
        self.assertIs(self.successResultOf(ready), True)
        self.assertEqual(h.sup.status("w1").state, "running")
        self.assertEqual(len(h.named("successfully started")), 1)
        # Already running: at once.
        self.assertIs(self.successResultOf(h.sup.wait_ready("w1", 1.0)), True)

    def test_one_probe_per_broker_for_all_starting_workers(self) -> None:
        h = Harness(self, [spec("a"), spec("b"), spec("c")])
        h.wake()
        h.control.calls.clear()
        h.clock.advance(h.sup.policy.probe_interval)
        pings = [c for c in h.control.calls if c[0] == "ping"]
        self.assertEqual([c[2] for c in pings], [["a@h", "b@h", "c@h"]])
        h.up("b")
        h.control.calls.clear()
        h.clock.advance(h.sup.policy.probe_interval)
        self.assertEqual(h.sup.status("b").state, "running")
        h.control.calls.clear()
        h.clock.advance(h.sup.policy.probe_interval)
        # b answered: only the others are still probed.
        self.assertEqual([c[2] for c in h.control.calls if c[0] == "ping"], [["a@h", "c@h"]])
        h.up("a")
        h.up("c")
        h.clock.advance(h.sup.policy.probe_interval)
        h.control.calls.clear()
        h.clock.advance(1)
        self.assertEqual(h.control.count("ping"), 0)  # the loop ended
        self.assertEqual(h.sup._health.probes, {})

    def test_wait_ready_times_out(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        ready = h.sup.wait_ready("w1", 2.0)
        h.clock.advance(1.9)
        self.assertNoResult(ready)
        h.clock.advance(0.2)
        self.assertIs(self.successResultOf(ready), False)

    def test_wait_ready_cancelled_by_caller(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        ready = h.sup.wait_ready("w1", 2.0)
        ready.addTimeout(0.5, h.clock)
        h.clock.advance(0.6)
        self.failureResultOf(ready)
        h.up()
        h.clock.advance(3)  # firing the cancelled waiter must not raise
        self.assertEqual(h.sup.status("w1").state, "running")

    def test_spawn_failure_counts_as_young_death(self) -> None:
        h = Harness(self, [spec()], max_rapid_failures=3)
        h.spawner.fail = True
        h.wake()
        h.clock.advance(100)
        self.assertEqual(h.sup.status("w1").state, "failed")


class RestartPolicyTests(SynchronousTestCase):
    def test_restart_at_once_from_process_ended(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.clock.advance(60)
        h.proc().exit(code=1)
        # No clock advance, no wake-up: spawned from processEnded.
        self.assertEqual(len(h.spawner.processes), 2)
        self.assertEqual(h.sup.status("w1").restarts, 1)
        self.assertEqual(h.sup.status("w1").state, "starting")
        h.clock.advance(0.1)
        self.assertEqual(h.sup.status("w1").state, "running")
        self.assertEqual(len(h.named("successfully restarted")), 1)

    def test_young_deaths_back_off_doubling_with_jitter(self) -> None:
        h = Harness(self, [spec()], max_rapid_failures=10, backoff_base=1.0, backoff_cap=5.0, backoff_jitter=0.5)
        h.wake()
        # First young death: at once.
        h.proc().exit(code=1)
        self.assertEqual(len(h.spawner.processes), 2)
        # Then 1, 2, 4, 5 (cap), 5 seconds with random()=0 (no jitter) ...
        for expected in (1.0, 2.0, 4.0, 5.0, 5.0):
            n = len(h.spawner.processes)
            h.proc().exit(code=1)
            self.assertEqual(h.sup.status("w1").state, "restarting")
            h.clock.advance(expected - 0.01)
            self.assertEqual(len(h.spawner.processes), n, expected)
            h.clock.advance(0.02)
            self.assertEqual(len(h.spawner.processes), n + 1, expected)

    def test_jitter_bounds(self) -> None:
        h = Harness(self, [], backoff_base=1.0, backoff_cap=60.0, backoff_jitter=0.5)
        for failures, full in ((2, 1.0), (3, 2.0), (4, 4.0), (10, 60.0)):
            h.rand = 0.0
            self.assertEqual(backoff_delay(h.sup.policy, failures, h.rand), full)
            h.rand = 0.999999
            low = backoff_delay(h.sup.policy, failures, h.rand)
            self.assertGreaterEqual(low, full * 0.5)
            self.assertLess(low, full * 0.5 + 1e-3)
        self.assertEqual(backoff_delay(h.sup.policy, 1, h.rand), 0.0)

    def test_a_waiter_learns_at_the_first_backoff_that_it_keeps_dying(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        ready = h.sup.wait_ready("w1", 1000)
        h.proc().exit(code=1)  # once: restarted at once, still waiting
        self.assertNoResult(ready)
        h.proc().exit(code=1)  # twice: backing off
        self.assertIs(self.successResultOf(ready), False)
        self.assertEqual(h.sup.status("w1").state, "restarting")

    def test_backoff_waits_are_honoured_by_wake(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        h.proc().exit(code=1)
        h.proc().exit(code=1)  # now backing off 1 s
        h.wake()
        self.assertEqual(len(h.spawner.processes), 2)

    def test_failed_after_rapid_failures_until_reset(self) -> None:
        h = Harness(self, [spec()], max_rapid_failures=3)
        h.wake()
        ready = h.sup.wait_ready("w1", 1000)
        for _ in range(3):
            h.clock.advance(5)  # past any backoff
            h.proc().exit(code=1)
        self.assertEqual(h.sup.status("w1").state, "failed")
        self.assertEqual(h.sup.status("w1").restarts, 2)  # three spawns
        self.assertIs(self.successResultOf(ready), False)
        self.assertEqual(len(h.named("failed")), 1)
        n = len(h.spawner.processes)
        h.clock.advance(1000)
        h.wake()
        self.assertEqual(len(h.spawner.processes), n)
        self.assertIs(self.successResultOf(h.sup.wait_ready("w1", 1)), False)
        h.sup.reset("w1")
        self.assertEqual(h.sup.status("w1").state, "stopped")
        h.wake()
        self.assertEqual(len(h.spawner.processes), n + 1)

    def test_restart_clears_failed(self) -> None:
        h = Harness(self, [spec()], max_rapid_failures=2)
        h.wake()
        h.proc().exit(code=1)
        h.proc().exit(code=1)
        self.assertEqual(h.sup.status("w1").state, "failed")
        self.successResultOf(h.sup.restart("w1"))
        self.assertEqual(h.sup.status("w1").state, "starting")
        self.assertEqual(len(h.spawner.alive), 1)
        # The failure count starts again: one young death restarts at once.
        h.proc().exit(code=1)
        self.assertEqual(h.sup.status("w1").state, "starting")

    def test_long_life_resets_failure_count(self) -> None:
        h = Harness(self, [spec()], max_rapid_failures=3, min_uptime=10)
        h.wake()
        h.proc().exit(code=1)
        h.clock.advance(5)
        h.proc().exit(code=1)
        h.clock.advance(5)  # backoff over, spawned again
        h.clock.advance(10)  # lives long enough
        h.proc().exit(code=1)
        self.assertNotEqual(h.sup.status("w1").state, "failed")
        self.assertEqual(len(h.spawner.alive), 1)  # at once

    def test_forced_restart_of_running_worker(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        old = h.proc()
        d = h.sup.restart("w1")
        self.assertEqual(old.signals, ["TERM"])
        self.successResultOf(d)
        self.assertEqual(len(h.spawner.alive), 1)
        self.assertIsNot(h.proc(), old)
        self.assertEqual(h.sup.status("w1").restarts, 1)

    def test_restart_unknown(self) -> None:
        h = Harness(self, [])
        self.failureResultOf(h.sup.restart("nope"), NotFound)

    def test_restart_deleted(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.specs = []
        self.failureResultOf(h.sup.restart("w1"), NotFound)
        self.assertEqual(len(h.spawner.processes), 1)

    def test_restart_disabled_does_not_start(self) -> None:
        h = Harness(self, [spec(is_enabled=False)])
        self.successResultOf(h.sup.restart("w1"))
        self.assertEqual(h.spawner.processes, [])

    def test_restart_never_started(self) -> None:
        h = Harness(self, [spec()])
        self.successResultOf(h.sup.restart("w1"))
        self.assertEqual(len(h.spawner.alive), 1)
        self.assertEqual(h.sup.status("w1").state, "starting")

    def test_reconfiguration_restarts(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        old = h.proc()
        h.specs = [spec(arguments=("--without-gossip",))]
        h.wake()
        self.assertTrue(old.ended)
        new = h.proc()
        self.assertIn("--without-gossip", new.args)

    def _three_running(self) -> Harness:
        h = Harness(self, [spec("w1"), spec("w2"), spec("w3")])
        h.wake()
        for name in ("w1", "w2", "w3"):
            h.up(name)
        h.clock.advance(h.sup.policy.probe_interval)
        self.assertEqual({h.sup.status(n).state for n in ("w1", "w2", "w3")}, {"running"})
        return h

    def test_new_app_settings_roll_one_worker_at_a_time(self) -> None:
        """A settings change replaces the app's workers one by one: the next
        only once the previous one's replacement answered."""
        h = self._three_running()
        h.specs = [spec(n, arguments=("--without-gossip",)) for n in ("w1", "w2", "w3")]
        replaced: list[str] = []
        for _ in range(3):
            h.wake()
            new = [e["name"] for e in h.named("reconfigure") if e["name"] not in replaced]
            self.assertEqual(len(new), 1, new)  # one per wake-up, never two at once
            replaced += new
            h.wake()  # the replacement has not answered: nothing more is replaced
            self.assertEqual(len(h.named("reconfigure")), len(replaced))
            h.up(new[0])
            h.clock.advance(h.sup.policy.probe_interval)
            self.assertEqual(h.sup.status(new[0]).state, "running")
        self.assertEqual(sorted(replaced), ["w1", "w2", "w3"])
        self.assertTrue(all("--without-gossip" in p.args for p in h.spawner.alive))

    def test_a_held_app_is_left_to_the_rolling_restart(self) -> None:
        h = self._three_running()
        h.sup.hold_reconfigure("foo", 60.0)
        h.specs = [spec(n, arguments=("--without-gossip",)) for n in ("w1", "w2", "w3")]
        h.wake()
        self.assertEqual(h.named("reconfigure"), [])
        # A restart asked for meanwhile runs the new settings.
        self.successResultOf(h.sup.restart("w2"))
        self.assertEqual(sum("--without-gossip" in p.args for p in h.spawner.alive), 1)
        h.up("w2")
        h.clock.advance(h.sup.policy.probe_interval)
        # Once the hold ends, what is still outdated is replaced here.
        h.clock.advance(61.0)
        h.wake()
        self.assertEqual(len(h.named("reconfigure")), 1)


class PingTests(SynchronousTestCase):
    def pings(self, h):
        return [c[3] for c in h.control.calls if c[0] == "ping"]

    def test_one_batched_ping_per_broker(self) -> None:
        other = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5673//")
        h = Harness(self, [spec("a"), spec("b"), spec("c", broker=other)])
        h.wake()
        for n in "abc":
            h.up(n)
        h.clock.advance(0.1)
        h.control.calls.clear()
        h.wake()
        pings = [c for c in h.control.calls if c[0] == "ping"]
        self.assertEqual(
            sorted((c[1], tuple(c[2])) for c in pings), sorted([(URL, ("a@h", "b@h")), (other.url, ("c@h",))])
        )
        # One active_queues and one stats per broker too, whatever the count.
        self.assertEqual(h.control.count("active_queues"), 2)
        self.assertEqual(h.control.count("stats"), 2)

    def test_ping_timeouts_back_off(self) -> None:
        h = Harness(self, [spec("a"), spec("b")])
        h.wake()
        h.up("a")
        h.up("b")
        h.clock.advance(0.1)
        h.control.clock = h.clock
        h.control.nodes["b@h"]["responsive"] = False
        h.control.calls.clear()
        d = h.sup.wake()
        self.assertNoResult(d)
        h.clock.advance(0.1)
        h.clock.advance(0.5)
        h.clock.advance(0.9)
        self.successResultOf(d)
        pings = [c for c in h.control.calls if c[0] == "ping"]
        self.assertEqual([c[3] for c in pings], [0.1, 0.5, 0.9])
        # Only the silent node is pinged again.
        self.assertEqual([c[2] for c in pings], [["a@h", "b@h"], ["b@h"], ["b@h"]])
        self.assertEqual([e["timeout"] for e in h.named("pingWithTimeout")][-3:], [0.1, 0.5, 0.9])
        self.assertEqual(h.sup.status("b").state, "unresponsive")
        self.assertEqual(h.sup.status("a").state, "running")

    def test_answer_on_second_try(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.control.clock = h.clock
        h.control.nodes["w1@h"]["responsive"] = False
        h.control.calls.clear()
        d = h.sup.wake()
        h.clock.advance(0.1)  # the 0.1 s ping missed it; the 0.5 s one is out
        h.control.nodes["w1@h"]["responsive"] = True
        h.clock.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(self.pings(h), [0.1, 0.5])
        self.assertEqual(h.sup.status("w1").state, "running")

    def test_unresponsive_killed_after_several_wakes(self) -> None:
        h = Harness(self, [spec()], max_missed_pings=3)
        h.running()
        old = h.proc()
        h.control.nodes["w1@h"]["responsive"] = False
        for _ in range(2):
            d = h.sup.wake()
            h.clock.advance(2)
            self.successResultOf(d)
            self.assertEqual(h.sup.status("w1").state, "unresponsive")
            self.assertEqual(old.signals, [])
        d = h.sup.wake()
        h.clock.advance(2)
        self.successResultOf(d)
        self.assertEqual(old.signals, ["KILL"])
        self.assertTrue(old.ended)
        self.assertEqual(len(h.spawner.alive), 1)
        self.assertEqual(h.sup.status("w1").restarts, 1)
        self.assertEqual(len(h.named("unresponsive.kill")), 1)

    def test_missed_count_resets_on_answer(self) -> None:
        h = Harness(self, [spec()], max_missed_pings=2)
        h.running()
        old = h.proc()
        for responsive in (False, True, False, True):
            h.control.nodes["w1@h"]["responsive"] = responsive
            d = h.sup.wake()
            h.clock.advance(2)
            self.successResultOf(d)
        self.assertEqual(old.signals, [])

    def test_starting_worker_gets_start_timeout(self) -> None:
        h = Harness(self, [spec()], start_timeout=20, max_missed_pings=1)
        h.wake()
        first = h.proc()
        for _ in range(3):
            h.clock.advance(5)
            d = h.sup.wake()
            h.clock.advance(2)
            self.successResultOf(d)
        self.assertFalse(first.ended)
        self.assertEqual(h.sup.status("w1").state, "starting")
        h.clock.advance(5)
        d = h.sup.wake()
        h.clock.advance(2)
        self.successResultOf(d)
        self.assertTrue(first.ended)
        self.assertEqual(first.signals, ["KILL"])
        self.assertEqual(len(h.spawner.alive), 1)  # the first failure restarts at once

    def test_never_ready_workers_end_failed(self) -> None:
        h = Harness(self, [spec()], start_timeout=20, max_rapid_failures=2)
        h.wake()
        for _ in range(12):
            h.clock.advance(5)
            d = h.sup.wake()
            h.clock.advance(2)
            self.successResultOf(d)
        self.assertEqual(h.sup.status("w1").state, "failed")
        self.assertEqual(len(h.spawner.processes), 2)
        self.assertEqual(h.spawner.alive, [])


class BrokerOutageTests(SynchronousTestCase):
    def test_no_restart_during_outage_nor_grace(self) -> None:
        h = Harness(self, [spec()], max_missed_pings=1, wait_after_broker_revived=30)
        h.running()
        old = h.proc()
        # The broker goes: nothing answers, calls fail.
        h.control.broker_up = False
        for _ in range(5):
            d = h.sup.wake()
            h.clock.advance(5)
            self.successResultOf(d)
        self.assertEqual(old.signals, [])
        self.assertEqual(len(h.named("broker.down")), 1)
        # Back, but the worker has not reconnected yet.
        h.control.broker_up = True
        h.control.nodes["w1@h"]["responsive"] = False
        for _ in range(5):
            d = h.sup.wake()
            h.clock.advance(5)
            self.successResultOf(d)
        self.assertEqual(old.signals, [])
        self.assertEqual(len(h.named("broker.up")), 1)
        self.assertTrue(h.named("broker.grace"))
        # Grace over (30 s since it came back): now it is blamed.
        h.clock.advance(5.5)
        d = h.sup.wake()
        h.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(old.signals, ["KILL"])

    def test_worker_reconnecting_in_grace_is_fine(self) -> None:
        h = Harness(self, [spec()], max_missed_pings=1, wait_after_broker_revived=30)
        h.running()
        old = h.proc()
        h.control.broker_up = False
        d = h.sup.wake()
        h.clock.advance(5)
        h.control.broker_up = True
        d = h.sup.wake()
        h.clock.advance(5)
        self.successResultOf(d)
        h.clock.advance(60)
        d = h.sup.wake()
        h.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(old.signals, [])
        self.assertEqual(h.sup.status("w1").state, "running")

    def test_wake_survives_control_errors(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.control.broker_up = False
        d = h.sup.wake()
        h.clock.advance(5)
        self.assertIsNone(self.successResultOf(d))


class ReconcileTests(SynchronousTestCase):
    def test_queues_added_and_cancelled_never_private(self) -> None:
        queues = (QueueBinding("tasks", "tasks", "tasks"), QueueBinding("odd", "ex", "rk", "topic"))
        h = Harness(self, [spec(queues=queues)])
        h.wake()
        h.up(queues=["dq.w1", "tasks", "extra"])
        h.clock.advance(0.1)
        node = h.control.nodes["w1@h"]
        self.assertEqual(sorted(node["queues"]), ["dq.w1", "odd", "tasks"])
        adds = [c for c in h.control.calls if c[0] == "add_consumer"]
        self.assertEqual(adds, [("add_consumer", URL, "w1@h", "odd", "ex", "rk", "topic")])
        cancels = [c[3] for c in h.control.calls if c[0] == "cancel_consumer"]
        self.assertEqual(cancels, ["extra"])
        self.assertEqual([e["queue"] for e in h.named("node.consume_from")], ["odd"])
        self.assertEqual(
            h.named("node.consume_from")[0]["log_format"], "{{Supervisor}} {name} node.consume_from: {queue}"
        )

    def test_private_queue_never_cancelled_and_readded(self) -> None:
        h = Harness(self, [spec()])
        h.wake()
        h.up(queues=["celery"])  # dq.w1 is missing, an unknown queue is there
        h.clock.advance(0.1)
        self.assertEqual(h.control.nodes["w1@h"]["queues"], ["dq.w1"])
        h.control.nodes["w1@h"]["queues"] = ["dq.w1"]
        h.control.calls.clear()
        h.wake()
        self.assertEqual(h.control.count("cancel_consumer"), 0)

    def test_queue_change_applied_on_wake(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.specs = [spec(queues=(QueueBinding("tasks", "tasks", "tasks"),))]
        h.wake()
        self.assertEqual(h.control.nodes["w1@h"]["queues"], ["dq.w1", "tasks"])
        self.assertEqual(len(h.spawner.processes), 1)  # live, no restart
        h.specs = [spec()]
        h.wake()
        self.assertEqual(h.control.nodes["w1@h"]["queues"], ["dq.w1"])

    def test_autoscale(self) -> None:
        h = Harness(self, [spec(max_concurrency=4, min_concurrency=2)])
        h.wake()
        h.up()
        h.control.nodes["w1@h"]["autoscaler"].update(max=1, min=1)
        h.clock.advance(0.1)
        self.assertEqual([c[3:] for c in h.control.calls if c[0] == "autoscale"], [(4, 2)])
        h.wake()
        self.assertEqual(h.control.count("autoscale"), 1)
        self.assertEqual(h.named("node.autoscale")[0]["max"], 4)

    def test_reapplied_after_restart(self) -> None:
        h = Harness(self, [spec(queues=(QueueBinding("odd", "ex", "rk"),), max_concurrency=3)])
        h.wake()
        h.up(queues=["dq.w1"])
        h.clock.advance(0.1)
        self.assertEqual(h.control.count("add_consumer"), 1)
        h.clock.advance(60)
        h.proc().exit(code=1)
        # The new process comes up as its argv says, without 'odd'.
        h.up(queues=["dq.w1"])
        h.control.nodes["w1@h"]["autoscaler"].update(max=1, min=1)
        h.clock.advance(0.1)
        self.assertEqual(h.control.count("add_consumer"), 2)
        self.assertEqual(h.control.count("autoscale"), 1)
        self.assertIn("odd", h.control.nodes["w1@h"]["queues"])


class WakeTests(SynchronousTestCase):
    def test_wakes_never_overlap_and_coalesce(self) -> None:
        h = Harness(self, [spec()])
        h.running()
        h.control.paused = True
        first = h.sup.wake()
        second = h.sup.wake()
        third = h.sup.wake()
        self.assertEqual(len(h.named("wake-up")), 2)  # running() woke once
        while not first.called:
            h.control.release(keep_paused=True)
        # second and third share one wake-up, which now runs (held again).
        self.assertEqual(len(h.named("wake-up")), 3)
        self.assertNoResult(second)
        h.control.release()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(len(h.named("wake-up")), 3)

    def test_errors_are_logged_not_raised(self) -> None:
        h = Harness(self, [])

        def broken():
            raise RuntimeError("store is on fire")

        h.sup._desired = broken
        self.assertIsNone(self.successResultOf(h.sup.wake()))
        self.assertTrue([e for e in h.events if e.get("log_failure") is not None])
        self.flushLoggedErrors(RuntimeError)
        h.sup._desired = lambda: h.specs
        h.specs = [spec()]
        h.wake()
        self.assertEqual(len(h.spawner.processes), 1)

    def test_looping_call(self) -> None:
        h = Harness(self, [spec()], start=True, interval=5)
        self.assertEqual(len(h.named("wake-up")), 1)
        h.clock.advance(5)
        self.assertEqual(len(h.named("wake-up")), 2)
        d = h.sup.stopService()
        self.successResultOf(d)
        h.clock.advance(50)
        self.assertEqual(len(h.named("wake-up")), 2)

    def test_disable_and_delete_stop_the_worker(self) -> None:
        h = Harness(self, [spec("a"), spec("b")])
        h.wake()
        a, b = h.spawner.processes
        h.specs = [spec("a", is_enabled=False)]
        h.wake()
        self.assertTrue(a.ended and b.ended)
        self.assertEqual(a.signals, ["TERM"])
        self.assertEqual(h.sup.status("a").state, "stopped")
        self.assertEqual(h.sup.status("b").state, "stopped")
        self.assertNotIn("b", h.sup._lifecycles)
        # A stopped worker is not restarted by its exit.
        self.assertEqual(len(h.spawner.processes), 2)

    def test_wake_waits_for_stop_with_kill_escalation(self) -> None:
        h = Harness(self, [spec()], kill_timeout=10)
        h.wake()
        p = h.proc()
        h.spawner.ignore_term = True
        h.specs = []
        d = h.sup.wake()
        self.assertNoResult(d)
        self.assertEqual(h.sup.status("w1").state, "stopping")
        h.clock.advance(9.9)
        self.assertEqual(p.signals, ["TERM"])
        h.clock.advance(0.2)
        self.assertEqual(p.signals, ["TERM", "KILL"])
        self.successResultOf(d)


class StatsAndQueuesTests(SynchronousTestCase):
    def test_stats(self) -> None:
        h = Harness(self, [spec()])
        self.failureResultOf(h.sup.stats("w1"), NotFound)
        h.running()
        self.assertIn("autoscaler", self.successResultOf(h.sup.stats("w1")))
        h.control.nodes["w1@h"]["responsive"] = False
        self.failureResultOf(h.sup.stats("w1"), GatewayTimeout)
        h.control.broker_up = False
        self.failureResultOf(h.sup.stats("w1"), Unavailable)

    def test_active_queues(self) -> None:
        h = Harness(self, [spec(queues=(QueueBinding("t", "t", "t"),))])
        self.assertIsNone(self.successResultOf(h.sup.active_queues("w1")))
        h.running()
        self.assertEqual(self.successResultOf(h.sup.active_queues("w1")), ["dq.w1", "t"])
        h.control.broker_up = False
        self.assertIsNone(self.successResultOf(h.sup.active_queues("w1")))


class ServiceTests(SynchronousTestCase):
    def test_stop_service_waits_for_every_child(self) -> None:
        h = Harness(self, [spec("a"), spec("b")], start=True, kill_timeout=10)
        a, b = h.spawner.processes
        h.spawner.ignore_term = True
        d = h.sup.stopService()
        self.assertEqual((a.signals, b.signals), (["TERM"], ["TERM"]))
        b.exit(0)  # b honours TERM; a hangs
        self.assertNoResult(d)
        h.clock.advance(10)
        self.assertEqual(a.signals, ["TERM", "KILL"])
        self.successResultOf(d)
        self.assertEqual(h.spawner.alive, [])
        # Nothing is restarted by those exits, nor later.
        h.clock.advance(100)
        self.assertEqual(len(h.spawner.processes), 2)

    def test_stop_service_cancels_backoff(self) -> None:
        h = Harness(self, [spec()], start=True)
        h.proc().exit(1)
        h.proc().exit(1)  # backing off
        self.successResultOf(h.sup.stopService())
        h.clock.advance(100)
        self.assertEqual(h.spawner.alive, [])

    def test_stop_service_during_a_wake(self) -> None:
        h = Harness(self, [spec()], start=True)
        h.up()
        h.clock.advance(5)  # second wake-up, held in the control
        h.control.paused = True
        h.clock.advance(5)
        d = h.sup.stopService()
        self.assertNoResult(d)
        h.control.release()
        self.successResultOf(d)
        self.assertEqual(h.spawner.alive, [])

    def pidfile(self, h, name, pid):
        os.makedirs(os.path.join(h.dir, name), exist_ok=True)
        with open(os.path.join(h.dir, name, "worker.pid"), "w") as f:
            f.write(f"{pid}\n")

    def test_leftover_worker_replaced_before_spawn(self) -> None:
        h = Harness(self, [spec()], kill_timeout=3)
        self.pidfile(h, "w1", 4242)
        h.table.processes[4242] = ["/usr/bin/python3", "-m", "celery", "worker", "-n", "w1@h"]
        h.table.ignore_term.add(4242)
        h.sup.startService()
        self.assertEqual(h.table.killed, [(4242, 15)])
        self.assertEqual(h.spawner.processes, [])  # not while the old one lives
        d = h.sup.wake()
        h.clock.advance(2.9)
        self.assertEqual(h.spawner.processes, [])
        self.assertNoResult(d)
        h.clock.advance(0.2)
        self.assertEqual(h.table.killed, [(4242, 15), (4242, 9)])
        h.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(len(h.spawner.processes), 1)
        self.assertFalse(os.path.exists(os.path.join(h.dir, "w1", "worker.pid")))
        self.assertEqual(len(h.named("leftover")), 1)

    def test_leftover_honouring_term(self) -> None:
        h = Harness(self, [spec()])
        self.pidfile(h, "w1", 4242)
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "w1@h"]
        h.sup.startService()
        h.clock.advance(0.1)
        self.assertEqual(h.table.killed, [(4242, 15)])
        self.assertEqual(len(h.spawner.processes), 1)

    def test_pid_of_another_program_is_left_alone(self) -> None:
        h = Harness(self, [spec()])
        self.pidfile(h, "w1", 4242)
        h.table.processes[4242] = ["/usr/sbin/sshd"]
        self.pidfile(h, "w2", 4343)
        h.table.processes[4343] = ["python", "-m", "celery", "worker", "-n", "other@h"]
        self.pidfile(h, "w3", 4444)  # no such process
        h.sup.startService()
        self.assertEqual(h.table.killed, [])
        self.assertEqual(len(h.spawner.processes), 1)

    def test_leftover_without_pid_file_found_by_its_pidfile_argument(self) -> None:
        h = Harness(self, [spec()])
        mine = os.path.join(h.dir, "w1", "worker.pid")
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "w1@h", "--pidfile", mine]
        # Another agent's worker (another instance directory) is not ours.
        h.table.processes[4343] = [
            "python",
            "-m",
            "celery",
            "worker",
            "-n",
            "w1@h",
            "--pidfile",
            "/elsewhere/w1/worker.pid",
        ]
        h.sup.startService()
        self.assertEqual(h.table.killed, [(4242, 15)])
        self.assertEqual(len(h.spawner.processes), 1)

    def test_deleted_instance_leftover_also_ended(self) -> None:
        h = Harness(self, [])
        self.pidfile(h, "gone", 4242)
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "gone@h"]
        h.sup.startService()
        self.assertEqual(h.table.killed, [(4242, 15)])


HOSTILE = ["../A-escape", "", ".", "..", "a/b", "a\\b", "a\0b", "/abs", ".scs-store.sqlite"]


class PathSafetyTests(SynchronousTestCase):
    """Names that reach the supervisor (from the store, whatever the API or
    the cluster let in) never make files outside -D, and one bad instance
    does not stop the others."""

    def test_hostile_names_fail_alone_and_write_nothing(self) -> None:
        h = Harness(self, [spec("good1"), *(spec(n) for n in HOSTILE), spec("good2")])
        parent = os.path.dirname(h.dir)
        before = set(os.listdir(parent))
        ready = h.sup.wait_ready("../A-escape", 5.0)
        h.wake()
        spawned = sorted(a for p in h.spawner.processes for a in p.args if a.endswith("@h"))
        self.assertEqual(spawned, ["good1@h", "good2@h"])
        for name in HOSTILE:
            self.assertEqual(h.sup.status(name).state, "failed", name)
        self.assertIs(self.successResultOf(ready), False)
        refused = h.named("unsafe-path")
        self.assertEqual(sorted(e["name"] for e in refused), sorted(HOSTILE))
        self.assertTrue(all(e["log_level"].name == "error" for e in refused))
        self.assertEqual(sorted(os.listdir(h.dir)), ["good1", "good2"])
        self.assertEqual(set(os.listdir(parent)), before)
        # Later wake-ups neither retry nor log them again; the good ones run.
        h.up("good1")
        h.up("good2")
        h.clock.advance(h.sup.policy.probe_interval)
        h.wake()
        self.assertEqual(len(h.named("unsafe-path")), len(HOSTILE))
        self.assertEqual(h.sup.status("good1").state, "running")

    def test_forced_restart_of_a_hostile_name_is_refused_again(self) -> None:
        h = Harness(self, [spec("../A-escape")])
        h.wake()
        self.successResultOf(h.sup.restart("../A-escape"))
        self.assertEqual(h.sup.status("../A-escape").state, "failed")
        self.assertEqual(h.spawner.processes, [])
        self.assertEqual(len(h.named("unsafe-path")), 2)

    def test_symlinked_instance_directory_pointing_outside(self) -> None:
        outside = tmpdir(self)
        h = Harness(self, [spec("w1"), spec("w2")])
        os.symlink(outside, os.path.join(h.dir, "w1"))
        h.wake()
        self.assertEqual(h.sup.status("w1").state, "failed")
        self.assertEqual(h.sup.status("w2").state, "starting")
        (p,) = h.spawner.processes
        self.assertIn("w2@h", p.args)
        self.assertEqual(os.listdir(outside), [])
        (event,) = h.named("unsafe-path")
        self.assertIn("symbolic link", event["error"])

    def test_symlink_planted_between_argv_and_spawn(self) -> None:
        """Checked again where the log file is opened."""
        outside = tmpdir(self)
        h = Harness(self, [spec("w1")])
        real_spawn = h.spawner.spawnProcess

        def plant(*args, **kw):
            raise AssertionError("must not spawn")

        import scs.lifecycle as lifecycle_module

        original = lifecycle_module.build_argv

        def build_then_plant(*args, **kw):
            argv = original(*args, **kw)
            os.symlink(outside, os.path.join(h.dir, "w1"))
            return argv

        self.patch(lifecycle_module, "build_argv", build_then_plant)
        h.spawner.spawnProcess = plant
        h.wake()
        h.spawner.spawnProcess = real_spawn
        self.assertEqual(h.sup.status("w1").state, "failed")
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(len(h.named("unsafe-path")), 1)


class StoredArgumentsTests(SynchronousTestCase):
    """Arguments stored before the allow-list (or written into the store by
    hand) are checked again before a worker runs them."""

    def test_refused_stored_arguments_fail_that_instance_alone(self) -> None:
        h = Harness(
            self,
            [
                spec("good", arguments=("--without-gossip",)),
                spec("pickle", arguments=("accept_content=pickle",)),
                spec("detach", arguments=("-ED",)),
            ],
        )
        h.wake()
        spawned = sorted(a for p in h.spawner.processes for a in p.args if a.endswith("@h"))
        self.assertEqual(spawned, ["good@h"])
        self.assertEqual([h.sup.status(n).state for n in ("pickle", "detach")], ["failed", "failed"])
        refused = h.named("unsafe-spec")
        self.assertEqual(sorted(e["name"] for e in refused), ["detach", "pickle"])
        self.assertTrue(all("accept_content" in e["error"] or "-D" in e["error"] for e in refused))


class LeftoverPathTests(SynchronousTestCase):
    def pidfile(self, directory, pid):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "worker.pid"), "w") as f:
            f.write(f"{pid}\n")

    def test_scan_ignores_entries_that_are_not_instances(self) -> None:
        h = Harness(self, [])
        for stray in (".scs-store.sqlite", ".hidden", "has space", "-n"):
            self.pidfile(os.path.join(h.dir, stray), 4242)
        with open(os.path.join(h.dir, "plainfile"), "w") as f:
            f.write("4242\n")
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", ".hidden@h"]
        h.sup.startService()
        self.assertEqual(h.table.killed, [])

    def test_scan_does_not_follow_a_symlink_out_of_the_directory(self) -> None:
        outside = tmpdir(self)
        self.pidfile(outside, 4242)
        h = Harness(self, [])
        os.symlink(outside, os.path.join(h.dir, "w1"))
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "w1@h"]
        h.sup.startService()
        self.assertEqual(h.table.killed, [])
        self.assertTrue(os.path.exists(os.path.join(outside, "worker.pid")))

    def test_pidfile_argument_through_a_symlink_is_not_removed(self) -> None:
        """A process whose --pidfile names -D/w1/worker.pid, where w1 is a
        symlink out of -D: its pid file is never unlinked through it."""
        outside = tmpdir(self)
        self.pidfile(outside, 4242)
        h = Harness(self, [])
        os.symlink(outside, os.path.join(h.dir, "w1"))
        mine = os.path.join(h.dir, "w1", "worker.pid")
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "w1@h", "--pidfile", mine]
        h.sup.startService()
        self.assertEqual(h.table.killed, [])
        self.assertTrue(os.path.exists(os.path.join(outside, "worker.pid")))
        self.assertTrue(h.named("unsafe-path"))

    def test_real_instance_directories_are_still_scanned(self) -> None:
        h = Harness(self, [])
        self.pidfile(os.path.join(h.dir, "wörker-1"), 4242)
        h.table.processes[4242] = ["python", "-m", "celery", "worker", "-n", "wörker-1@h"]
        h.sup.startService()
        self.assertEqual(h.table.killed, [(4242, 15)])
