"""The supervisor: makes this machine's Celery workers match the store.

One :class:`Supervisor` per agent.  It wakes every ``interval`` seconds (and
on demand through :meth:`Supervisor.wake`), starts, stops and restarts
worker processes, pings them in one batch per broker, and reconciles their
queues and autoscale range through Celery's remote control.  See DESIGN §6.

All state lives in the reactor thread; the only blocking work (Celery
control) runs in a thread pool inside :mod:`scs.control`.

States (``WorkerStatus.state``), per instance:

- ``starting``: spawned, not yet answered a ping.  Its broker's probe pings
  it every ``probe_interval`` until it answers or ``start_timeout`` passes
  (then it is killed and counted as a failed start).
- ``running``: answered since its last spawn.
- ``unresponsive``: answered before, silent in the last wake-up(s); killed
  and replaced after ``max_missed_pings`` silent wake-ups, but never while
  its broker is down or within ``wait_after_broker_revived`` of its return.
- ``restarting``: being replaced, or waiting out a crash-loop backoff.
- ``stopping``/``stopped``: disabled or deleted (TERM, KILL after
  ``kill_timeout``), or never started.
- ``failed``: died young ``max_rapid_failures`` times in a row; stays so
  until :meth:`Supervisor.reset` or :meth:`Supervisor.restart`.
"""

from __future__ import annotations

import os
import random
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.errors import GatewayTimeout, NotFound, SCSError, Unavailable
from scs.records import InstanceSpec, QueueBinding, WorkerStatus
from scs.worker import (
    PIDFILE,
    ProcessTable,
    UnsafeName,
    UnsafeSpec,
    WorkerProcess,
    build_argv,
    check_path_component,
    instance_path,
    is_worker_for,
    node_name,
    private_queue,
    spawn_worker,
)

PING_TIMEOUTS = (0.1, 0.5, 0.9)
"""A ping's timeouts backing off, as in the seed; only the nodes still silent
are pinged again."""


def _restart_key(spec: InstanceSpec) -> tuple[Any, ...]:
    """What the running worker took from its command line and can only change
    by a restart; queues and concurrency are changed live instead."""
    return (spec.broker.url, spec.celery_app, spec.arguments)


@attrs.define(eq=False)
class _Worker:
    """Everything the supervisor knows about one instance's worker."""

    spec: InstanceSpec
    node: str
    state: str = "stopped"
    process: WorkerProcess | None = None
    restarts: int = 0
    spawns: int = 0
    spawned_at: float = 0.0
    spawned_key: tuple[Any, ...] | None = None
    # Answered a ping since its last spawn.
    answered: bool = False
    # Consecutive wake-ups in which it was alive but silent.
    missed: int = 0
    # Consecutive deaths before min_uptime; reset by a long enough life.
    rapid_failures: int = 0
    backoff: IDelayedCall | None = None
    kill_call: IDelayedCall | None = None
    # Why we are ending its process: "stop" (stay down), "replace" (start a
    # new one at once) or "unready" (never answered: counts as a failure).
    intent: str | None = None
    deleted: bool = False
    exit_waiters: list[Deferred[None]] = attrs.Factory(list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor(Service):
    """Reconciles desired instances (``desired()``) with worker processes.

    Everything external is injected: ``reactor`` (clock and spawner by
    default), ``spawner`` (an ``IReactorProcess``), ``control`` (a
    :class:`scs.control.CeleryControl` or a fake with its interface),
    ``process_table`` (finding leftover workers) and ``random`` (jitter).
    """

    log = Logger()

    def __init__(
        self,
        desired: Callable[[], Sequence[InstanceSpec]],
        instance_dir: str,
        *,
        interval: float = 5.0,
        reactor: Any = None,
        control: Any = None,
        hostname: str | None = None,
        kill_timeout: float = 10.0,
        wait_after_broker_revived: float = 30.0,
        spawner: Any = None,
        process_table: ProcessTable | None = None,
        random: Callable[[], float] = random.random,
        ping_timeouts: Sequence[float] = PING_TIMEOUTS,
        max_missed_pings: int = 3,
        start_timeout: float = 60.0,
        min_uptime: float = 10.0,
        max_rapid_failures: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        backoff_jitter: float = 0.5,
        probe_interval: float = 0.02,
        probe_timeout: float = 0.05,
        control_timeout: float = 1.0,
        mingle: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._spawner = spawner if spawner is not None else reactor
        self._own_control = control is None
        if control is None:
            from scs.control import CeleryControl

            control = CeleryControl(reactor=reactor)
        self._control = control
        self._desired = desired
        self.instance_dir = instance_dir
        self.interval = interval
        self.hostname = hostname or socket.gethostname()
        self.kill_timeout = kill_timeout
        self.wait_after_broker_revived = wait_after_broker_revived
        self._table = process_table or ProcessTable()
        self._random = random
        self.ping_timeouts = tuple(ping_timeouts)
        self.max_missed_pings = max_missed_pings
        self.start_timeout = start_timeout
        self.min_uptime = min_uptime
        self.max_rapid_failures = max_rapid_failures
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.backoff_jitter = backoff_jitter
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.control_timeout = control_timeout
        self.mingle = mingle

        self._workers: dict[str, _Worker] = {}
        self._ready_waiters: dict[str, list[Deferred[bool]]] = {}
        # Broker URL -> when it was last seen down / came back.
        self._broker_down: dict[str, float] = {}
        self._broker_revived: dict[str, float] = {}
        # Wake-up serialisation: waiters of the running wake-up, and of the
        # one queued behind it (None when nothing is queued).
        self._current: list[Deferred[None]] | None = None
        self._wake_started = 0.0
        self._next: list[Deferred[None]] | None = None
        self._loop: LoopingCall | None = None
        self._adopted = True
        self._adopt_waiters: list[Deferred[None]] = []
        self._shutting_down = False
        # Broker URL -> its probe loop's next tick (None while a ping is out).
        self._probes: dict[str, IDelayedCall | None] = {}

    # -- public API ---------------------------------------------------------

    @property
    def clock(self) -> Any:
        """The reactor (clock) this supervisor runs on, for callers that
        bound their waits on it."""
        return self._reactor

    def wake(self) -> Deferred[None]:
        """Reconcile now.  Wake-ups never overlap: one asked for while another
        runs is run once right after it, shared by everyone who asked."""
        d: Deferred[None] = Deferred()
        if self._current is None:
            self._start_wake([d])
        else:
            if self._next is None:
                self._next = []
            self._next.append(d)
        return d

    def status(self, name: str) -> WorkerStatus:
        w = self._workers.get(name)
        if w is None:
            return WorkerStatus(state="stopped")
        return WorkerStatus(state=w.state, pid=w.pid, restarts=w.restarts)

    def restart(self, name: str) -> Deferred[None]:
        """Forced restart: clears 'failed' and the backoff, ends the running
        worker (TERM, then KILL) and spawns a new one.  Fires once the new
        worker is spawned (use :meth:`wait_ready` for it to answer)."""
        return ensureDeferred(self._restart(name))

    def reset(self, name: str) -> None:
        """Forget failures and backoff (the API enabled the instance)."""
        w = self._workers.get(name)
        if w is None:
            return
        w.rapid_failures = 0
        self._cancel_backoff(w)
        if w.state in ("failed", "restarting") and w.process is None:
            w.state = "stopped"

    def wait_ready(self, name: str, timeout: float) -> Deferred[bool]:
        """True once the worker answered a ping since its last spawn; False
        on timeout or when it is failed."""
        w = self._workers.get(name)
        if w is not None and w.process is not None and w.answered:
            return succeed(True)
        if w is not None and w.state == "failed":
            return succeed(False)
        d: Deferred[bool] = Deferred()
        waiters = self._ready_waiters.setdefault(name, [])
        waiters.append(d)

        def expire() -> None:
            if d in waiters:
                waiters.remove(d)
                _fire(d, False)

        call = self._reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def stats(self, name: str) -> Deferred[dict[str, Any]]:
        """The worker's Celery ``stats()``; NotFound if it is not running,
        Unavailable if the broker is, GatewayTimeout if it does not answer."""
        w = self._workers.get(name)
        if w is None or w.process is None:
            return _fail(NotFound(f"instance {name!r} has no running worker", name=name))
        url, node = w.spec.broker.url, w.node

        def pick(replies: dict[str, dict[str, Any]]) -> dict[str, Any]:
            if node not in replies:
                raise GatewayTimeout(f"worker {node} did not answer", name=name)
            return replies[node]

        def translate(f: Failure) -> Failure:
            if not f.check(SCSError):
                return Failure(Unavailable(f"stats failed: {f.getErrorMessage()}", name=name))
            return f

        d = self._control.stats(url, [node], self.control_timeout)
        d.addCallback(pick)
        d.addErrback(translate)
        return d

    def active_queues(self, name: str) -> Deferred[list[str] | None]:
        """Queue names the worker consumes now; None if it cannot say."""
        w = self._workers.get(name)
        if w is None or w.process is None:
            return succeed(None)
        node = w.node
        d = self._control.active_queues(w.spec.broker.url, [node], self.control_timeout)
        d.addCallbacks(lambda replies: replies.get(node), lambda f: None)
        return d

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._shutting_down = False
        self._adopted = False
        self._warm_up()
        d = ensureDeferred(self._adopt_leftovers())
        d.addErrback(lambda f: self.log.failure("adopting leftover workers", f))
        d.addBoth(self._adoption_done)

    def _warm_up(self) -> None:
        """Build each broker's control app and connection now, in the
        background: the first call otherwise spends ~0.35 s (imports,
        connection, reply queue) competing for the CPU with the workers
        being started."""
        warm = getattr(self._control, "warm", None)
        if warm is None:
            return
        try:
            urls = {s.broker.url for s in self._desired()}
        except Exception:
            self.log.failure("[Supervisor] reading desired instances")
            return
        for url in sorted(urls):
            warm(url).addErrback(lambda f: None)

    def _adoption_done(self, _: object) -> None:
        self._adopted = True
        waiters, self._adopt_waiters = self._adopt_waiters, []
        for w in waiters:
            _fire(w, None)
        if self._shutting_down:
            return
        self._loop = LoopingCall(self.wake)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("supervisor loop died", f)
        )

    def stopService(self) -> Deferred[None]:
        """Warm shutdown of every worker; fires once every child has exited."""
        super().stopService()
        self._shutting_down = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        for w in self._workers.values():
            self._cancel_backoff(w)
        for url, call in list(self._probes.items()):
            if call is not None and call.active():
                call.cancel()
                del self._probes[url]
        await self._end_all()
        # A wake-up or an adoption in flight may still hold processes.
        await self._when_adopted()
        if self._current is not None:
            d: Deferred[None] = Deferred()
            self._current.append(d)
            await d
        await self._end_all()
        for name in list(self._ready_waiters):
            self._fire_ready(name, False)
        if self._own_control:
            self._control.close()

    async def _end_all(self) -> None:
        ends = [self._end(w, "stop") for w in list(self._workers.values()) if w.process is not None]
        if ends:
            await DeferredList(ends, consumeErrors=True)

    def _when_adopted(self) -> Deferred[None]:
        if self._adopted:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._adopt_waiters.append(d)
        return d

    # -- wake-up --------------------------------------------------------------

    def _start_wake(self, waiters: list[Deferred[None]]) -> None:
        self._current = waiters
        self._wake_started = self._reactor.seconds()
        d = ensureDeferred(self._reconcile())
        # Errors end here: a failing wake-up must never stop the LoopingCall.
        d.addErrback(lambda f: self.log.failure("[Supervisor] wake-up failed", f))
        d.addBoth(self._wake_done)

    def _wake_done(self, _: object) -> None:
        self.log.debug(
            "[Supervisor] wake-up done in {duration:.3f} s",
            duration=self._reactor.seconds() - self._wake_started,
            scs_event="wake-up.done",
        )
        waiters, self._current = self._current or [], None
        if self._next is not None:
            nxt, self._next = self._next, None
            self._start_wake(nxt)
        for d in waiters:
            _fire(d, None)

    async def _reconcile(self) -> None:
        await self._when_adopted()
        self.log.info("[Supervisor] wake-up", scs_event="wake-up")
        if self._shutting_down:
            return
        specs = {s.name: s for s in self._desired()}
        stops = []
        for name, w in list(self._workers.items()):
            spec = specs.get(name)
            if spec is None or not spec.is_enabled:
                w.deleted = spec is None
                stops.append(self._stop(w))
        for spec in specs.values():
            if not spec.is_enabled:
                continue
            w = self._workers.get(spec.name)
            if w is None:
                w = self._workers[spec.name] = _Worker(
                    spec=spec, node=node_name(spec.name, self.hostname)
                )
            w.spec = spec
            w.deleted = False
            if w.process is None:
                if w.state != "failed" and w.backoff is None and w.intent is None:
                    self._spawn(w)
            elif w.intent is None and w.spawned_key != _restart_key(spec):
                # Broker, celery_app or arguments changed: only a new process
                # picks them up.
                self.log.info(
                    "[Supervisor] {name} configuration changed, restarting",
                    name=spec.name,
                    scs_event="reconfigure",
                )
                self._end(w, "replace")
        by_broker: dict[str, list[_Worker]] = {}
        now = self._reactor.seconds()
        for w in self._workers.values():
            if w.process is None or w.intent is not None:
                continue
            # A starting worker is pinged by its own probe until
            # start_timeout; the batch would only wait out its timeouts.
            if w.answered or now - w.spawned_at >= self.start_timeout:
                by_broker.setdefault(w.spec.broker.url, []).append(w)
        checks = [ensureDeferred(self._check_broker(url, ws)) for url, ws in by_broker.items()]
        results = await DeferredList(stops + checks, consumeErrors=True)
        for ok, value in results:
            if not ok:
                self.log.failure("[Supervisor] wake-up step failed", value)

    async def _check_broker(self, url: str, workers: list[_Worker]) -> None:
        """One batched ping (backing off) for every worker on this broker,
        then queue/autoscale reconciliation of those that answered."""
        by_node = {w.node: w for w in workers}
        missing = set(by_node)
        broker_error = None
        for timeout in self.ping_timeouts:
            self.log.info(
                "pingWithTimeout: {timeout}",
                timeout=timeout,
                broker=url,
                nodes=sorted(missing),
                scs_event="pingWithTimeout",
            )
            sent = self._reactor.seconds()
            try:
                answered = await self._control.ping(url, sorted(missing), timeout)
            except Exception as e:
                broker_error = e
                break
            if missing <= answered:
                self._log_round_trip(url, sent)
            for node in answered & missing:
                self._answered(by_node[node])
            missing -= answered
            if not missing:
                break
        up = [by_node[n] for n in by_node if n not in missing and by_node[n].process is not None]
        if missing or broker_error is not None:
            await self._silent(url, [by_node[n] for n in missing], broker_error)
        else:
            self._broker_seen_up(url)
        if up:
            await self._configure(url, up)

    async def _silent(self, url: str, silent: list[_Worker], error: Exception | None) -> None:
        """Some workers did not answer: blame them only if the broker is up
        and has been up for ``wait_after_broker_revived`` seconds."""
        alive = await self._control.broker_alive(url, self.control_timeout)
        now = self._reactor.seconds()
        if not alive:
            if url not in self._broker_down:
                self.log.warn(
                    "[Supervisor] broker {broker} is down", broker=url, scs_event="broker.down"
                )
            self._broker_down[url] = now
            self._broker_revived.pop(url, None)
            return
        self._broker_seen_up(url)
        revived = self._broker_revived.get(url)
        if revived is not None and now - revived < self.wait_after_broker_revived:
            self.log.info(
                "[Supervisor] broker {broker} revived {ago:.1f}s ago: not blaming silent workers",
                broker=url,
                ago=now - revived,
                scs_event="broker.grace",
            )
            return
        if error is not None:
            # The broker accepts connections but the ping itself failed:
            # that says nothing about the workers.
            self.log.warn(
                "[Supervisor] ping via {broker} failed: {error}",
                broker=url,
                error=str(error),
                scs_event="ping.error",
            )
            return
        for w in silent:
            if w.process is None or w.intent is not None:
                continue
            if not w.answered:
                # Still starting: give it start_timeout from its spawn.
                if now - w.spawned_at >= self.start_timeout:
                    self.log.warn(
                        "[Supervisor] {name} did not answer within {timeout}s of its start",
                        name=w.name,
                        timeout=self.start_timeout,
                        scs_event="unresponsive.kill",
                    )
                    self._end(w, "unready", "KILL")
                continue
            w.missed += 1
            w.state = "unresponsive"
            self.log.warn(
                "[Supervisor] {name} did not answer ({missed}/{max})",
                name=w.name,
                missed=w.missed,
                max=self.max_missed_pings,
                scs_event="unresponsive",
            )
            if w.missed >= self.max_missed_pings:
                # A hung worker cannot do a warm shutdown; KILL at once.
                self.log.warn(
                    "[Supervisor] {name} unresponsive, killing pid {pid}",
                    name=w.name,
                    pid=w.pid,
                    scs_event="unresponsive.kill",
                )
                self._end(w, "replace", "KILL")

    def _broker_seen_up(self, url: str) -> None:
        if url in self._broker_down:
            del self._broker_down[url]
            self._broker_revived[url] = self._reactor.seconds()
            self.log.info(
                "[Supervisor] broker {broker} is back", broker=url, scs_event="broker.up"
            )

    async def _configure(self, url: str, workers: list[_Worker]) -> None:
        """Queues and autoscale: compare with the spec, send the differences.
        One active_queues and one stats round trip for all of ``workers``."""
        nodes = [w.node for w in workers]
        results = await DeferredList(
            [
                self._control.active_queues(url, nodes, self.control_timeout),
                self._control.stats(url, nodes, self.control_timeout),
            ],
            consumeErrors=True,
        )
        (q_ok, queues), (s_ok, stats) = results
        commands = []
        for w in workers:
            spec = w.spec
            if q_ok and w.node in queues:
                have = set(queues[w.node])
                want = {private_queue(spec.name)} | set(spec.queue_names)
                dq = private_queue(spec.name)
                # The private queue too: if the worker lost it, it comes back.
                for q in (QueueBinding(dq, dq, dq), *spec.queues):
                    if q.name not in have:
                        self.log.info(
                            "node.consume_from: {queue}",
                            name=spec.name,
                            queue=q.name,
                            scs_event="node.consume_from",
                        )
                        commands.append(
                            self._control.add_consumer(
                                url,
                                w.node,
                                q.name,
                                exchange=q.exchange or q.name,
                                routing_key=q.routing_key or q.name,
                                exchange_type=q.exchange_type,
                                timeout=self.control_timeout,
                            )
                        )
                for q in sorted(have - want):
                    if q == private_queue(spec.name):
                        continue
                    self.log.info(
                        "node.cancel_consume_from: {queue}",
                        name=spec.name,
                        queue=q,
                        scs_event="node.cancel_consume_from",
                    )
                    commands.append(
                        self._control.cancel_consumer(url, w.node, q, timeout=self.control_timeout)
                    )
            if s_ok and w.node in stats:
                scaler = stats[w.node].get("autoscaler") or {}
                want_scale = (spec.max_concurrency, spec.min_concurrency)
                if (scaler.get("max"), scaler.get("min")) != want_scale:
                    self.log.info(
                        "node.autoscale: max={max} min={min}",
                        name=spec.name,
                        max=want_scale[0],
                        min=want_scale[1],
                        scs_event="node.autoscale",
                    )
                    commands.append(
                        self._control.autoscale(
                            url, w.node, want_scale[0], want_scale[1], timeout=self.control_timeout
                        )
                    )
        if commands:
            for ok, value in await DeferredList(commands, consumeErrors=True):
                if not ok:
                    self.log.warn(
                        "[Supervisor] control command failed: {error}",
                        error=value.getErrorMessage(),
                        scs_event="control.error",
                    )

    # -- processes -------------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        self._cancel_backoff(w)
        if self._shutting_down or w.process is not None:
            return
        spec = w.spec
        try:
            argv = build_argv(spec, self.instance_dir, self.hostname, mingle=self.mingle)
        except UnsafeSpec as e:
            self._refuse(w, e)
            return
        self.log.info(
            "[Supervisor] {name} node.restart", name=spec.name, scs_event="node.restart"
        )
        proto = WorkerProcess(spec.name, self._process_ended)
        w.process = proto
        w.state = "starting"
        w.answered = False
        w.missed = 0
        w.intent = None
        w.spawned_at = self._reactor.seconds()
        w.spawned_key = _restart_key(spec)
        w.spawns += 1
        try:
            spawn_worker(self._spawner, proto, argv, self.instance_dir, spec.name)
        except UnsafeName as e:  # a symlink planted since build_argv looked
            w.process = None
            self._refuse(w, e)
            return
        except Exception:
            self.log.failure("[Supervisor] {name} could not be spawned", name=spec.name)
            w.process = None
            self._died(w, young=True)
            return
        self._probe(w)

    def _refuse(self, w: _Worker, error: UnsafeSpec) -> None:
        """A spec the supervisor will not run (a name whose files would not
        stay inside the instance directory, a symlink there redirecting
        them, stored arguments outside the allow-list): that instance is
        ``failed`` at once, no retries; the others are not affected."""
        w.state = "failed"
        w.rapid_failures = 0
        self.log.error(
            "[Supervisor] {name!r} not started: {error}",
            name=w.name,
            error=error.message,
            scs_event=error.event,
        )
        self._fire_ready(w.name, False)

    def _probe(self, w: _Worker) -> None:
        """Make sure the broker of a starting worker has a probe loop: it
        pings every starting worker on that broker in one call every
        probe_interval until each answers or reaches start_timeout, so that
        readiness (and re-applying queues/autoscale after a restart) does
        not wait for the next wake-up.  One loop per broker, not per worker:
        each control call holds a thread and broker connections."""
        url = w.spec.broker.url
        if url not in self._probes:
            self._probes[url] = self._reactor.callLater(self.probe_interval, self._probe_tick, url)

    def _probe_tick(self, url: str) -> None:
        self._probes[url] = None  # running; no second loop for this broker
        now = self._reactor.seconds()
        starting = {
            w.node: w
            for w in self._workers.values()
            if w.spec.broker.url == url
            and w.process is not None
            and not w.answered
            and w.intent is None
            and now - w.spawned_at < self.start_timeout
        }
        if not starting or self._shutting_down:
            # Past start_timeout the wake-up's unresponsive check takes over.
            del self._probes[url]
            return

        sent = self._reactor.seconds()

        def got(answered: set[str]) -> None:
            if set(starting) <= answered:
                self._log_round_trip(url, sent)
            ready = []
            for node in sorted(answered):
                w = starting.get(node)
                if w is not None and w.process is not None and not w.answered and w.intent is None:
                    self._answered(w)
                    ready.append(w)
            if ready:
                ensureDeferred(self._configure(url, ready)).addErrback(
                    lambda f: self.log.failure("[Supervisor] configuring new workers", f)
                )

        def again(_: object) -> None:
            if self._shutting_down:
                self._probes.pop(url, None)
            else:
                self._probes[url] = self._reactor.callLater(
                    self.probe_interval, self._probe_tick, url
                )

        d = self._control.ping(url, sorted(starting), self.probe_timeout)
        d.addCallbacks(got, lambda f: None)
        d.addErrback(lambda f: self.log.failure("[Supervisor] probe", f))
        d.addBoth(again)

    def _log_round_trip(self, url: str, sent: float) -> None:
        """A ping every node answered: a round trip, not a waited-out timeout."""
        self.log.debug(
            "ping answered in {rtt:.3f} s",
            rtt=self._reactor.seconds() - sent,
            broker=url,
            scs_event="ping.done",
        )

    def _answered(self, w: _Worker) -> None:
        if w.process is None or w.intent is not None:
            return
        first = not w.answered
        w.answered = True
        w.missed = 0
        w.state = "running"
        if first:
            if w.spawns > 1:
                self.log.info(
                    "[Supervisor] {name} successfully restarted",
                    name=w.name,
                    pid=w.pid,
                    scs_event="successfully restarted",
                )
            else:
                self.log.info(
                    "[Supervisor] {name} successfully started",
                    name=w.name,
                    pid=w.pid,
                    scs_event="successfully started",
                )
        self._fire_ready(w.name, True)

    def _fire_ready(self, name: str, value: bool) -> None:
        for d in self._ready_waiters.pop(name, []):
            _fire(d, value)

    def _process_ended(self, proto: WorkerProcess, reason: Failure) -> None:
        w = self._workers.get(proto.name)
        if w is None or w.process is not proto:
            return
        w.process = None
        if w.kill_call is not None and w.kill_call.active():
            w.kill_call.cancel()
        w.kill_call = None
        intent, w.intent = w.intent, None
        waiters, w.exit_waiters = w.exit_waiters, []
        if intent == "stop" or self._shutting_down:
            w.state = "stopped"
            if w.deleted:
                del self._workers[w.name]
        elif intent == "replace":
            w.restarts += 1
            w.rapid_failures = 0
            self._spawn(w)
        elif intent == "unready":
            # Never answered within start_timeout (say, a broker that refuses
            # its credentials): a failed start, so it backs off and can end
            # 'failed' instead of being replaced forever.
            self._died(w, young=True)
        else:
            uptime = self._reactor.seconds() - w.spawned_at
            self._died(w, young=uptime < self.min_uptime)
        for d in waiters:
            _fire(d, None)

    def _died(self, w: _Worker, young: bool) -> None:
        """An unexpected exit: restart at once, or back off if it keeps dying young."""
        w.rapid_failures = w.rapid_failures + 1 if young else 0
        if w.rapid_failures >= self.max_rapid_failures:
            w.state = "failed"
            self.log.error(
                "[Supervisor] {name} failed: died {count} times within {uptime}s of starting",
                name=w.name,
                count=w.rapid_failures,
                uptime=self.min_uptime,
                scs_event="failed",
            )
            self._fire_ready(w.name, False)
            return
        # Counted when decided, so that status() shows it during a backoff.
        w.restarts += 1
        delay = self.backoff_delay(w.rapid_failures)
        if delay <= 0:
            self._spawn(w)
            return
        w.state = "restarting"
        self.log.warn(
            "[Supervisor] {name} died young ({count} in a row), restarting in {delay:.2f}s",
            name=w.name,
            count=w.rapid_failures,
            delay=delay,
            scs_event="backoff",
        )
        w.backoff = self._reactor.callLater(delay, self._spawn, w)
        # Whoever waits for it to be ready (a create) learns now that it
        # keeps dying, not at the end of its wait.
        self._fire_ready(w.name, False)

    def backoff_delay(self, failures: int) -> float:
        """Delay before the next spawn after ``failures`` young deaths in a
        row.  The first restarts at once (one crash may be bad luck); then
        base, 2*base, 4*base… capped at backoff_cap, each scaled by a random
        factor in [1 - jitter, 1] so that instances crashing together do not
        restart in lockstep."""
        if failures <= 1:
            return 0.0
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (failures - 2))
        return delay * (1.0 - self.backoff_jitter * self._random())

    def _cancel_backoff(self, w: _Worker) -> None:
        if w.backoff is not None and w.backoff.active():
            w.backoff.cancel()
        w.backoff = None

    def _end(self, w: _Worker, intent: str, sig: str = "TERM") -> Deferred[None]:
        """End ``w``'s process (``sig``, then KILL after kill_timeout); fires
        when it has exited.  ``intent`` says what processEnded does next."""
        proto = w.process
        if proto is None:
            return succeed(None)
        if w.intent != "stop":  # "stop" wins over "replace"
            w.intent = intent
        w.state = "stopping" if w.intent == "stop" else "restarting"
        d: Deferred[None] = Deferred()
        w.exit_waiters.append(d)
        if sig == "KILL":
            if w.kill_call is not None and w.kill_call.active():
                w.kill_call.cancel()
            w.kill_call = None
            proto.signal("KILL")
        elif w.kill_call is None:
            self.log.info(
                "[Supervisor] {name} stopping pid {pid} ({intent})",
                name=w.name,
                pid=proto.pid,
                intent=w.intent,
                scs_event="node.stop",
            )
            proto.signal(sig)
            w.kill_call = self._reactor.callLater(self.kill_timeout, self._kill, w, proto)
        return d

    def _kill(self, w: _Worker, proto: WorkerProcess) -> None:
        w.kill_call = None
        if w.process is proto:
            self.log.warn(
                "[Supervisor] {name} pid {pid} ignored TERM for {timeout}s: KILL",
                name=w.name,
                pid=proto.pid,
                timeout=self.kill_timeout,
                scs_event="node.kill",
            )
            proto.signal("KILL")

    def _stop(self, w: _Worker) -> Deferred[None]:
        self._cancel_backoff(w)
        w.rapid_failures = 0
        self._fire_ready(w.name, False)
        if w.process is None:
            w.state = "stopped"
            if w.deleted:
                del self._workers[w.name]
            return succeed(None)
        return self._end(w, "stop")

    async def _restart(self, name: str) -> None:
        w = self._workers.get(name)
        spec = next((s for s in self._desired() if s.name == name), None)
        if spec is None:  # deleted (its worker, if any, is being stopped)
            raise NotFound(f"no instance {name!r}", name=name)
        if w is None:
            w = self._workers[name] = _Worker(spec=spec, node=node_name(name, self.hostname))
        w.spec = spec
        self.reset(name)
        if not spec.is_enabled or self._shutting_down:
            return
        self.log.info("[Supervisor] {name} forced restart", name=name, scs_event="restart")
        if w.process is not None:
            await self._end(w, "replace")
        elif w.intent is None:
            w.restarts += 1
            self._spawn(w)

    # -- leftovers of a previous agent run --------------------------------------

    async def _adopt_leftovers(self) -> None:
        """Find workers a crashed agent left running and end them before
        anything is spawned: two workers under one node name would split the
        node's replies and tasks.  They are found by their pid files and, in
        case a pid file was lost, by a process whose ``--pidfile`` argument
        points into this instance directory."""
        found: dict[int, tuple[str, str]] = {}
        for name in self._instance_subdirectories():
            path = self._leftover_pidfile(name)
            if path is None:
                continue
            pid = self._table.read_pidfile(path)
            if pid is not None and is_worker_for(self._table.cmdline(pid), name):
                found[pid] = (name, path)
        base = os.path.abspath(self.instance_dir)
        for pid in self._table.pids():
            if pid in found:
                continue
            cmd = self._table.cmdline(pid) or []
            for i, arg in enumerate(cmd[:-1]):
                if arg == "--pidfile":
                    path = os.path.abspath(cmd[i + 1])
                    name = os.path.basename(os.path.dirname(path))
                    if (
                        os.path.dirname(os.path.dirname(path)) == base
                        and os.path.basename(path) == PIDFILE
                        and is_worker_for(cmd, name)
                    ):
                        # The pid file is removed later: only through a
                        # path that stays inside the instance directory.
                        safe = self._leftover_pidfile(name)
                        if safe is not None:
                            found[pid] = (name, safe)
                    break
        ends = [
            ensureDeferred(self._end_leftover(name, pid, path))
            for pid, (name, path) in sorted(found.items())
        ]
        if ends:
            await DeferredList(ends, consumeErrors=True)

    def _instance_subdirectories(self) -> list[str]:
        """Names of the real subdirectories of the instance directory that
        are valid instance names: the store file, its backups, stray files
        and symlinks (which could lead out of it) are not instances."""
        try:
            with os.scandir(self.instance_dir) as entries:
                return sorted(
                    e.name
                    for e in entries
                    if e.is_dir(follow_symlinks=False) and _is_instance_name(e.name)
                )
        except OSError:
            return []

    def _leftover_pidfile(self, name: str) -> str | None:
        """The pid file of instance ``name``, or None (logged) if its path
        would not stay inside the instance directory."""
        try:
            return instance_path(self.instance_dir, name, PIDFILE)
        except UnsafeName as e:
            self.log.warn(
                "[Supervisor] leftover scan skips {name!r}: {error}",
                name=name,
                error=e.message,
                scs_event="unsafe-path",
            )
            return None

    async def _end_leftover(self, name: str, pid: int, pidfile: str) -> None:
        self.log.warn(
            "[Supervisor] {name}: worker pid {pid} left from a previous run, replacing it",
            name=name,
            pid=pid,
            scs_event="leftover",
        )
        # Not our child: no processEnded, so poll the process table.
        for sig, patience in ((signal.SIGTERM, self.kill_timeout), (signal.SIGKILL, 10.0)):
            self._table.kill(pid, sig)
            deadline = self._reactor.seconds() + patience
            while self._reactor.seconds() < deadline:
                if not is_worker_for(self._table.cmdline(pid), name):
                    self._remove_pidfile(pidfile, pid)
                    self.log.info(
                        "[Supervisor] {name}: leftover pid {pid} is gone",
                        name=name,
                        pid=pid,
                        scs_event="leftover.gone",
                    )
                    return
                await _sleep(self._reactor, 0.05)
        self.log.error(
            "[Supervisor] {name}: leftover pid {pid} survived KILL",
            name=name,
            pid=pid,
            scs_event="leftover.stuck",
        )

    def _remove_pidfile(self, path: str, pid: int) -> None:
        # Only if it still names the process we ended.
        if self._table.read_pidfile(path) == pid:
            try:
                os.unlink(path)
            except OSError:
                pass


def _is_instance_name(name: str) -> bool:
    try:
        check_path_component(name)
    except UnsafeName:
        return False
    return True


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _fire(d: Deferred[Any], value: Any) -> None:
    """Callback unless a caller already cancelled it (e.g. addTimeout)."""
    if not d.called:
        d.callback(value)


def _fail(e: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(e))
    return d


__all__ = ["Supervisor", "PING_TIMEOUTS"]
