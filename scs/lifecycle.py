"""The lifecycle of one instance's worker: its process, its backoff and kill
timers, and whoever waits for it to be ready or to exit.

The supervisor decides *what* should happen to each instance and says so
through a few verbs (:meth:`WorkerLifecycle.start`, ``stop``, ``replace``,
``restart``, ``reset``, ``close``) and reports what it observed
(``answered``, ``missed_ping``); the lifecycle decides *how*, and only
:meth:`WorkerLifecycle._transition` writes its state, along this table
(staying in a state is always allowed)::

    from          to            when
    stopped       starting      spawned
    stopped       failed        its spec is refused (unsafe name, arguments,
                                a workdir or python missing on this machine)
    starting      running       it answered a ping
    starting      restarting    it exited, or is being ended to be replaced
                                (start_timeout passed, forced restart)
    starting      stopping      disabled, deleted or the agent stops
    starting      failed        its spec is refused at spawn (a symlink)
    running       unresponsive  alive but silent in a wake-up
    running       restarting    it exited, or is being replaced
    running       stopping      disabled, deleted or the agent stops
    unresponsive  running       it answered again
    unresponsive  restarting    it exited, or killed after max_missed_pings
    unresponsive  stopping      disabled, deleted or the agent stops
    restarting    starting      spawned again (at once, or after a backoff)
    restarting    stopping      disabled or deleted while being replaced
    restarting    stopped       reset (enabled again) during a backoff
    restarting    failed        died young max_rapid_failures times in a row,
                                or its spec is refused
    stopping      stopped       it exited
    failed        stopped       reset or stopped

``stopping`` wins: a worker being stopped is never replaced.  Once
:meth:`WorkerLifecycle.close` is called (the agent stops) nothing is
spawned again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.policy import SupervisionPolicy, backoff_delay
from scs.records import InstanceSpec, WorkerStatus
from scs.worker import (
    UnsafeName,
    UnsafeSpec,
    WorkerProcess,
    build_argv,
    spawn_worker,
    worker_directory,
    worker_env,
)


class WorkerState(str, enum.Enum):  # noqa: UP042 - a str Enum: JSON and dict keys see the strings
    """``WorkerStatus.state``: the strings of the API and the admin page."""

    STARTING = "starting"
    RUNNING = "running"
    UNRESPONSIVE = "unresponsive"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


S = WorkerState

TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.RESTARTING, S.STOPPING, S.FAILED}),
    S.RUNNING: frozenset({S.UNRESPONSIVE, S.RESTARTING, S.STOPPING}),
    S.UNRESPONSIVE: frozenset({S.RUNNING, S.RESTARTING, S.STOPPING}),
    S.RESTARTING: frozenset({S.STARTING, S.STOPPING, S.STOPPED, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FAILED: frozenset({S.STOPPED}),
}
"""Allowed changes of state (the table of the module's docstring)."""

LIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.UNRESPONSIVE})
"""It has a process and the supervisor means to keep it."""

ANSWERED_STATES = frozenset({S.RUNNING, S.UNRESPONSIVE})
"""Live and answered a ping since its spawn: ready."""

STOPPED_STATES = frozenset({S.STOPPED, S.FAILED})
"""No process and nothing scheduled: only a verb changes that."""

COUNTED_EVENTS = frozenset(
    {
        "node.restart",
        "successfully started",
        "successfully restarted",
        "unresponsive",
        "unresponsive.kill",
        "failed",
        "backoff",
    }
)
"""The ``event`` values this module logs that metrics count."""


class IllegalTransition(RuntimeError):
    """A change of state the table does not allow: a bug, never input."""


def fire(d: Deferred[Any], value: Any) -> None:
    """Callback unless a caller already cancelled it (e.g. addTimeout)."""
    if not d.called:
        d.callback(value)


def ready_waiter(clock: Any, timeout: float) -> Deferred[bool]:
    """A Deferred for "ready?" that answers False after ``timeout``."""
    d: Deferred[bool] = Deferred()
    d.addTimeout(timeout, clock, onTimeoutCancel=lambda result, timeout: False)
    return d


class WorkerLifecycle:
    """One instance's worker (see the module docstring for its states).

    ``spec`` is what the next spawn runs (the supervisor updates it);
    ``on_spawned`` is told of each new process (the supervisor probes it).
    """

    def __init__(
        self,
        spec: InstanceSpec,
        node: str,
        *,
        clock: Any,
        spawner: Any,
        policy: SupervisionPolicy,
        instance_dir: str,
        hostname: str,
        log: Logger,
        random: Callable[[], float],
        on_spawned: Callable[[WorkerLifecycle], None] = lambda lifecycle: None,
        mingle: bool = False,
    ) -> None:
        self.spec = spec
        self.node = node
        self.clock = clock
        self.spawner = spawner
        self.policy = policy
        self.instance_dir = instance_dir
        self.hostname = hostname
        self.log = log
        self.random = random
        self.on_spawned = on_spawned
        self.mingle = mingle
        self.state = S.STOPPED
        self.restarts = 0
        self.spawned_spec: InstanceSpec | None = None
        # The spec it was running or refused when it became ``failed``: the
        # supervisor tries again once the instance's settings differ.
        self.failed_with: InstanceSpec | None = None
        self.spawned_at = 0.0
        self._process: WorkerProcess | None = None
        self._spawns = 0
        self._missed = 0
        self._rapid_failures = 0
        # Ending a worker that never answered: its exit is a failed start.
        self._failure_on_exit = False
        self._closed = False
        self._backoff: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self._ready_waiters: list[Deferred[bool]] = []
        self._exit_waiters: list[Deferred[None]] = []

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def has_process(self) -> bool:
        return self._process is not None

    def status(self) -> WorkerStatus:
        return WorkerStatus(state=self.state.value, pid=self.pid, restarts=self.restarts)

    def _transition(self, new: WorkerState, why: str) -> None:
        """The one writer of ``state``."""
        old = self.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{self.name}: {old.value} -> {new.value} ({why})")
        self.state = new
        self.failed_with = self.spec if new is S.FAILED else None
        self.log.debug(
            "{{Supervisor}} {name}: {old} -> {new} ({why})",
            name=self.name,
            old=old.value,
            new=new.value,
            why=why,
            event="worker.state",
        )

    # -- verbs ----------------------------------------------------------------

    def start(self) -> None:
        """Spawn it if it is ``stopped`` (not failed, backing off or live)."""
        if self.state is S.STOPPED:
            self._spawn()

    def stop(self) -> Deferred[None]:
        """Stay down: TERM (KILL after kill_timeout); fires once it exited."""
        self._cancel_backoff()
        self._rapid_failures = 0
        self._fire_ready(False)
        if self._process is None:
            self._transition(S.STOPPED, "stopped")
            return succeed(None)
        return self._end(S.STOPPING, "stop")

    def replace(self) -> Deferred[None]:
        """End it (TERM, then KILL) and spawn a new one at once; fires once
        the old one exited."""
        self._failure_on_exit = False
        return self._end(S.RESTARTING, "replace")

    def restart(self) -> Deferred[None]:
        """Forced restart: forget failures and backoff, replace the process
        or spawn one; fires once the new one is spawned."""
        self.reset()
        if self._closed:
            return succeed(None)
        self.log.info("{{Supervisor}} {name} forced restart", name=self.name, event="restart")
        if self._process is not None:
            return self.replace()
        if self.state is S.STOPPED:
            self.restarts += 1
            self._spawn()
        return succeed(None)

    def reset(self) -> None:
        """Forget failures and backoff (the instance was enabled again)."""
        self._rapid_failures = 0
        self._cancel_backoff()
        if self.state in (S.FAILED, S.RESTARTING) and self._process is None:
            self._transition(S.STOPPED, "reset")

    def close(self) -> Deferred[None]:
        """The agent stops: end the process, never spawn again."""
        self._closed = True
        self._cancel_backoff()
        self._fire_ready(False)
        return self._end(S.STOPPING, "stop")

    def reopen(self) -> None:
        """The agent starts again after :meth:`close`."""
        self._closed = False

    def answered(self) -> bool:
        """It answered a ping; True if that was its first since its spawn."""
        if self.state not in LIVE_STATES:
            return False
        first = self.state is S.STARTING
        self._missed = 0
        self._transition(S.RUNNING, "answered")
        if first:
            restarted = self._spawns > 1
            # The seed's words for both: starting a node is its node.restart.
            # The event tells a first start from a restart apart.
            self.log.info(
                "{{Supervisor}} {name} successfully restarted (pid {pid})",
                name=self.name,
                pid=self.pid,
                event="successfully restarted" if restarted else "successfully started",
            )
        self._fire_ready(True)
        return first

    def missed_ping(self) -> None:
        """Silent in a wake-up (its broker up and settled): a starting worker
        is killed past start_timeout, a running one after max_missed_pings."""
        if self.state is S.STARTING:
            if self.clock.seconds() - self.spawned_at >= self.policy.start_timeout:
                self.log.warn(
                    "{{Supervisor}} {name} did not answer within {timeout}s of its start",
                    name=self.name,
                    timeout=self.policy.start_timeout,
                    event="unresponsive.kill",
                )
                self._failure_on_exit = True
                self._end(S.RESTARTING, "unready", "KILL")
            return
        if self.state not in ANSWERED_STATES:
            return
        self._missed += 1
        self._transition(S.UNRESPONSIVE, "missed a ping")
        self.log.warn(
            "{{Supervisor}} {name} did not answer ({missed}/{max})",
            name=self.name,
            missed=self._missed,
            max=self.policy.max_missed_pings,
            event="unresponsive",
        )
        if self._missed >= self.policy.max_missed_pings:
            # A hung worker cannot do a warm shutdown; KILL at once.
            self.log.warn(
                "{{Supervisor}} {name} unresponsive, killing pid {pid}",
                name=self.name,
                pid=self.pid,
                event="unresponsive.kill",
            )
            self._failure_on_exit = False
            self._end(S.RESTARTING, "replace", "KILL")

    def due_for_ping(self, now: float) -> bool:
        """Pinged by a wake-up: answered before, or starting for longer than
        start_timeout (until then the start probe pings it)."""
        if self.state in ANSWERED_STATES:
            return True
        return self.state is S.STARTING and now - self.spawned_at >= self.policy.start_timeout

    def wait_ready(self, timeout: float) -> Deferred[bool]:
        """True once it answered since its last spawn; False on timeout or
        when it fails, backs off, or is stopped."""
        if self.state in ANSWERED_STATES:
            return succeed(True)
        if self.state is S.FAILED:
            return succeed(False)
        d = ready_waiter(self.clock, timeout)
        self.add_ready_waiter(d)
        return d

    def add_ready_waiter(self, d: Deferred[bool]) -> None:
        self._ready_waiters = [w for w in self._ready_waiters if not w.called]
        self._ready_waiters.append(d)

    # -- process --------------------------------------------------------------

    def _spawn(self) -> None:
        self._cancel_backoff()
        if self._closed or self._process is not None:
            return
        spec = self.spec
        try:
            argv = build_argv(spec, self.instance_dir, self.hostname, mingle=self.mingle)
            # The app's env, workdir and python: a workdir or python missing
            # on this machine fails this instance alone (SettingUnavailable).
            env = worker_env(spec)
            path = worker_directory(spec)
        except UnsafeSpec as e:
            self._refuse(e)
            return
        self.log.info("{{Supervisor}} {name} node.restart", name=spec.name, event="node.restart")
        proto = WorkerProcess(spec.name, self._ended)
        self._process = proto
        self._missed = 0
        self._failure_on_exit = False
        self.spawned_at = self.clock.seconds()
        self.spawned_spec = spec
        self._spawns += 1
        self._transition(S.STARTING, "spawned")
        try:
            spawn_worker(self.spawner, proto, argv, self.instance_dir, spec.name, env=env, path=path)
        except UnsafeName as e:  # a symlink planted since build_argv looked
            self._process = None
            self._refuse(e)
            return
        except Exception:  # noqa: BLE001 - any spawn failure is a failed start
            self.log.failure("{{Supervisor}} {name} could not be spawned", name=spec.name)
            self._process = None
            self._transition(S.RESTARTING, "spawn failed")
            self._died(young=True)
            return
        self.on_spawned(self)

    def _refuse(self, error: UnsafeSpec) -> None:
        """A spec the supervisor will not run (a name whose files would not
        stay inside the instance directory, a symlink there redirecting
        them, stored arguments outside the allow-list, an app's workdir or
        python that this machine lacks): ``failed`` at once, no retries.
        The event names the refused ``parameter``."""
        self._rapid_failures = 0
        self._transition(S.FAILED, "refused")
        self.log.error(
            "{{Supervisor}} {name!r} not started: {error}",
            name=self.name,
            app=self.spec.app,
            error=error.message,
            parameter=error.details.get("parameter"),
            event=error.event,
        )
        self._fire_ready(False)

    def _ended(self, proto: WorkerProcess, reason: Failure) -> None:
        if proto is not self._process:
            return
        self._process = None
        self._cancel_kill()
        waiters, self._exit_waiters = self._exit_waiters, []
        if self._closed or self.state is S.STOPPING:
            self._transition(S.STOPPED, "exited")
        elif self.state is S.RESTARTING and not self._failure_on_exit:
            self.restarts += 1
            self._rapid_failures = 0
            self._spawn()
        else:
            # Unexpected, or never answered within start_timeout (say, a
            # broker that refuses its credentials): that is a failed start,
            # so it backs off and can end failed instead of looping forever.
            young = self._failure_on_exit or self.clock.seconds() - self.spawned_at < self.policy.min_uptime
            self._transition(S.RESTARTING, "exited")
            self._died(young)
        for d in waiters:
            fire(d, None)

    def _died(self, young: bool) -> None:
        """An unexpected exit: restart at once, or back off if it keeps dying young."""
        self._rapid_failures = self._rapid_failures + 1 if young else 0
        if self._rapid_failures >= self.policy.max_rapid_failures:
            self._transition(S.FAILED, "rapid failures")
            self.log.error(
                "{{Supervisor}} {name} failed: died {count} times within {uptime}s of starting",
                name=self.name,
                count=self._rapid_failures,
                uptime=self.policy.min_uptime,
                event="failed",
            )
            self._fire_ready(False)
            return
        # Counted when decided, so that status() shows it during a backoff.
        self.restarts += 1
        delay = backoff_delay(self.policy, self._rapid_failures, self.random())
        if delay <= 0:
            self._spawn()
            return
        self.log.warn(
            "{{Supervisor}} {name} died young ({count} in a row), restarting in {delay:.2f}s",
            name=self.name,
            count=self._rapid_failures,
            delay=delay,
            event="backoff",
        )
        self._backoff = self.clock.callLater(delay, self._spawn)
        # Whoever waits for it to be ready (a create) learns now that it
        # keeps dying, not at the end of its wait.
        self._fire_ready(False)

    def _end(self, target: WorkerState, why: str, sig: str = "TERM") -> Deferred[None]:
        """Signal the process (``sig``; after TERM, KILL after kill_timeout)
        and move to ``target`` unless it is already stopping; fires when it
        has exited."""
        proto = self._process
        if proto is None:
            return succeed(None)
        if self.state is not S.STOPPING:
            self._transition(target, why)
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        if sig == "KILL":
            self._cancel_kill()
            proto.signal("KILL")
        elif self._kill_call is None:
            self.log.info(
                "{{Supervisor}} {name} stopping pid {pid} ({intent})",
                name=self.name,
                pid=proto.pid,
                intent="stop" if self.state is S.STOPPING else "replace",
                event="node.stop",
            )
            proto.signal(sig)
            self._kill_call = self.clock.callLater(self.policy.kill_timeout, self._kill, proto)
        return d

    def _kill(self, proto: WorkerProcess) -> None:
        self._kill_call = None
        if self._process is proto:
            self.log.warn(
                "{{Supervisor}} {name} pid {pid} ignored TERM for {timeout}s: KILL",
                name=self.name,
                pid=proto.pid,
                timeout=self.policy.kill_timeout,
                event="node.kill",
            )
            proto.signal("KILL")

    def _cancel_kill(self) -> None:
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None

    def _cancel_backoff(self) -> None:
        if self._backoff is not None and self._backoff.active():
            self._backoff.cancel()
        self._backoff = None

    def _fire_ready(self, value: bool) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            fire(d, value)


__all__ = [
    "ANSWERED_STATES",
    "COUNTED_EVENTS",
    "LIVE_STATES",
    "STOPPED_STATES",
    "TRANSITIONS",
    "IllegalTransition",
    "WorkerLifecycle",
    "WorkerState",
]
