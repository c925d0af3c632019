"""scs.lifecycle.WorkerLifecycle alone, on a Clock and the fake spawner: no
supervisor, no control, nothing sleeps."""

from __future__ import annotations

import json
import re
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from scs import lifecycle
from scs.lifecycle import (
    ANSWERED_STATES,
    LIVE_STATES,
    STOPPED_STATES,
    TRANSITIONS,
    IllegalTransition,
    WorkerLifecycle,
    WorkerState,
)
from scs.policy import SupervisionPolicy, backoff_delay
from scs.records import STATES, BrokerInfo, InstanceSpec
from scs.testing import FakeSpawner

BROKER = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5672//")
S = WorkerState


class Rig:
    """One lifecycle with a Clock, a FakeSpawner and recorded events."""

    def __init__(self, tc: SynchronousTestCase, name: str = "w1", **policy) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.events: list[dict] = []
        self.spawned: list[WorkerLifecycle] = []
        self.rand = 0.0
        directory = tempfile.mkdtemp(prefix="scs-test-")
        tc.addCleanup(shutil.rmtree, directory, True)
        self.policy = SupervisionPolicy(**policy)
        self.lc = WorkerLifecycle(
            InstanceSpec(name=name, app="foo", broker=BROKER),
            f"{name}@h",
            clock=self.clock,
            spawner=self.spawner,
            policy=self.policy,
            instance_dir=directory,
            hostname="h",
            log=Logger(observer=self.events.append),
            random=lambda: self.rand,
            on_spawned=self.spawned.append,
        )

    def proc(self):
        (p,) = self.spawner.alive
        return p

    def named(self, name):
        return [e for e in self.events if e.get("event") == name]

    def states(self):
        return [(e["old"], e["new"]) for e in self.named("worker.state")]


class StateTests(SynchronousTestCase):
    def test_values_are_the_api_strings(self) -> None:
        self.assertEqual(tuple(s.value for s in WorkerState), STATES)
        self.assertEqual(json.dumps({"state": S.RUNNING}), '{"state": "running"}')
        self.assertEqual(str(S.FAILED), "failed")
        self.assertEqual(f"{S.STOPPING}", "stopping")
        self.assertTrue(S.RUNNING == "running")

    def test_groupings(self) -> None:
        self.assertEqual(ANSWERED_STATES, {S.RUNNING, S.UNRESPONSIVE})
        self.assertEqual(LIVE_STATES, ANSWERED_STATES | {S.STARTING})
        self.assertEqual(STOPPED_STATES, {S.STOPPED, S.FAILED})

    def test_docstring_table_is_the_transition_table(self) -> None:
        rows = re.findall(r"^    (\w+) +(\w+) +\S", lifecycle.__doc__, re.MULTILINE)
        documented: dict = {}
        for old, new in rows:
            if old in STATES:
                documented.setdefault(S(old), set()).add(S(new))
        self.assertEqual(documented, {k: set(v) for k, v in TRANSITIONS.items()})

    def test_illegal_transition_raises(self) -> None:
        rig = Rig(self)
        with self.assertRaises(IllegalTransition):
            rig.lc._transition(S.RUNNING, "never answered a spawn it never had")
        self.assertIs(rig.lc.state, S.STOPPED)


class LifeTests(SynchronousTestCase):
    def test_start_answer_ready(self) -> None:
        rig = Rig(self)
        ready = rig.lc.wait_ready(5.0)
        rig.lc.start()
        self.assertIs(rig.lc.state, S.STARTING)
        self.assertEqual(rig.spawned, [rig.lc])
        self.assertEqual(rig.lc.pid, rig.proc().pid)
        self.assertNoResult(ready)
        self.assertIs(rig.lc.answered(), True)
        self.assertIs(self.successResultOf(ready), True)
        self.assertIs(rig.lc.answered(), False)  # not the first any more
        self.assertEqual(rig.states(), [("stopped", "starting"), ("starting", "running")])
        self.assertEqual(len(rig.named("successfully started")), 1)
        self.assertIs(self.successResultOf(rig.lc.wait_ready(1.0)), True)

    def test_wait_ready_times_out_on_the_clock(self) -> None:
        rig = Rig(self)
        rig.lc.start()
        ready = rig.lc.wait_ready(2.0)
        rig.clock.advance(1.9)
        self.assertNoResult(ready)
        rig.clock.advance(0.2)
        self.assertIs(self.successResultOf(ready), False)
        rig.lc.answered()  # firing a timed-out waiter is harmless

    def test_start_is_only_from_stopped(self) -> None:
        rig = Rig(self)
        rig.lc.start()
        rig.lc.start()
        self.assertEqual(len(rig.spawner.processes), 1)

    def test_unexpected_exits_restart_then_back_off_then_fail(self) -> None:
        rig = Rig(self, max_rapid_failures=4, backoff_base=1.0, backoff_jitter=0.5)
        rig.rand = 0.5
        ready = rig.lc.wait_ready(100)
        rig.lc.start()
        rig.proc().exit(code=1)  # first young death: at once
        self.assertIs(rig.lc.state, S.STARTING)
        self.assertEqual(len(rig.spawner.processes), 2)
        self.assertNoResult(ready)
        rig.proc().exit(code=1)  # second: backing off
        self.assertIs(rig.lc.state, S.RESTARTING)
        self.assertIs(self.successResultOf(ready), False)
        delay = backoff_delay(rig.policy, 2, 0.5)
        self.assertEqual(delay, 0.75)
        rig.clock.advance(delay - 0.01)
        self.assertEqual(len(rig.spawner.processes), 2)
        rig.clock.advance(0.02)
        self.assertEqual(len(rig.spawner.processes), 3)
        rig.clock.advance(100)
        rig.proc().exit(code=1)  # lived long: the count starts again, at once
        self.assertIs(rig.lc.state, S.STARTING)
        for _ in range(4):
            if rig.lc.state is S.RESTARTING:
                rig.clock.advance(100)  # the backoff ends; the new one dies at once
            rig.proc().exit(code=1)
        self.assertIs(rig.lc.state, S.FAILED)
        self.assertEqual(len(rig.named("failed")), 1)
        self.assertEqual(rig.lc.restarts, len(rig.spawner.processes) - 1)
        self.assertIs(self.successResultOf(rig.lc.wait_ready(1)), False)
        rig.lc.reset()
        self.assertIs(rig.lc.state, S.STOPPED)

    def test_stop_terms_then_kills_and_wins_over_replace(self) -> None:
        rig = Rig(self, kill_timeout=10)
        rig.lc.start()
        p = rig.proc()
        rig.spawner.ignore_term = True
        stopped = rig.lc.stop()
        replaced = rig.lc.replace()
        self.assertIs(rig.lc.state, S.STOPPING)
        self.assertEqual(p.signals, ["TERM"])
        rig.clock.advance(10)
        self.assertEqual(p.signals, ["TERM", "KILL"])
        self.successResultOf(stopped)
        self.successResultOf(replaced)
        self.assertIs(rig.lc.state, S.STOPPED)
        self.assertEqual(len(rig.spawner.processes), 1)
        self.assertEqual(len(rig.named("node.kill")), 1)

    def test_replace_spawns_at_once(self) -> None:
        rig = Rig(self)
        rig.lc.start()
        rig.lc.answered()
        old = rig.proc()
        self.successResultOf(rig.lc.replace())
        self.assertTrue(old.ended)
        self.assertIs(rig.lc.state, S.STARTING)
        self.assertEqual(rig.lc.restarts, 1)
        rig.lc.answered()
        self.assertEqual(len(rig.named("successfully restarted")), 1)

    def test_silent_running_worker_killed_after_max_missed_pings(self) -> None:
        rig = Rig(self, max_missed_pings=2)
        rig.lc.start()
        rig.lc.answered()
        old = rig.proc()
        rig.lc.missed_ping()
        self.assertIs(rig.lc.state, S.UNRESPONSIVE)
        rig.lc.answered()  # the count starts again
        rig.lc.missed_ping()
        self.assertEqual(old.signals, [])
        rig.lc.missed_ping()
        self.assertEqual(old.signals, ["KILL"])
        self.assertIs(rig.lc.state, S.STARTING)  # replaced at once
        self.assertEqual(rig.lc.restarts, 1)

    def test_starting_worker_killed_past_start_timeout_as_a_failure(self) -> None:
        rig = Rig(self, start_timeout=20, max_rapid_failures=2)
        rig.lc.start()
        self.assertFalse(rig.lc.due_for_ping(rig.clock.seconds()))
        rig.clock.advance(19)
        rig.lc.missed_ping()
        self.assertEqual(rig.proc().signals, [])
        rig.clock.advance(1)
        self.assertTrue(rig.lc.due_for_ping(rig.clock.seconds()))
        rig.lc.missed_ping()
        self.assertIs(rig.lc.state, S.STARTING)  # first failure: at once
        rig.clock.advance(20)
        rig.lc.missed_ping()
        self.assertIs(rig.lc.state, S.FAILED)
        self.assertEqual(rig.spawner.alive, [])

    def test_close_never_spawns_again(self) -> None:
        rig = Rig(self)
        rig.lc.start()
        rig.proc().exit(code=1)
        rig.proc().exit(code=1)  # backing off
        self.assertIs(rig.lc.state, S.RESTARTING)
        self.successResultOf(rig.lc.close())
        rig.clock.advance(1000)
        self.assertEqual(rig.spawner.alive, [])
        rig.lc.restart()
        self.assertEqual(rig.spawner.alive, [])

    def test_forced_restart_of_failed_and_of_stopped(self) -> None:
        rig = Rig(self, max_rapid_failures=1)
        rig.lc.start()
        rig.proc().exit(code=1)
        self.assertIs(rig.lc.state, S.FAILED)
        self.successResultOf(rig.lc.restart())
        self.assertIs(rig.lc.state, S.STARTING)
        self.assertEqual(len(rig.named("restart")), 1)

    def test_refused_spec_fails_at_once(self) -> None:
        rig = Rig(self, name="../escape")
        ready = rig.lc.wait_ready(5)
        rig.lc.start()
        self.assertIs(rig.lc.state, S.FAILED)
        self.assertIs(self.successResultOf(ready), False)
        self.assertEqual(rig.spawner.processes, [])
        self.assertEqual(len(rig.named("unsafe-path")), 1)

    def test_spawn_failure_is_a_young_death(self) -> None:
        rig = Rig(self, max_rapid_failures=2)
        rig.spawner.fail = True
        rig.lc.start()
        self.flushLoggedErrors(OSError)
        self.assertIs(rig.lc.state, S.FAILED)
