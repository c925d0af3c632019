"""The supervisor: makes this machine's Celery workers match the store.

One :class:`Supervisor` per agent: a reconciler.  It wakes every
``policy.interval`` seconds (and on demand through :meth:`Supervisor.wake`),
compares the desired instances with the workers it has, and tells each
worker's :class:`scs.lifecycle.WorkerLifecycle` what to do (start, stop,
replace, forget).  The lifecycles own processes, timers and waiters;
:mod:`scs.health` pings and probes; :mod:`scs.corrections` says which queue
and autoscale commands to send; :mod:`scs.leftovers` ends workers left
running by a crashed agent before anything is spawned.

All state lives in the reactor thread; the only blocking work (Celery
control) runs in a thread pool inside :mod:`scs.control`.  The states of a
worker (``WorkerStatus.state``) and their transitions are in
:mod:`scs.lifecycle`.
"""

from __future__ import annotations

import random as _random
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs import health, lifecycle
from scs.corrections import AddConsumer, Autoscale, CancelConsumer, Correction, corrections
from scs.errors import GatewayTimeout, NotFound, SCSError, Unavailable
from scs.health import Health
from scs.leftovers import Leftovers, ProcessTable
from scs.lifecycle import LIVE_STATES, WorkerLifecycle, WorkerState, fire, ready_waiter
from scs.policy import PING_TIMEOUTS, SupervisionPolicy
from scs.records import InstanceSpec, WorkerStatus
from scs.worker import UnsafeName, node_name
from scs.worker_log import rotate_instance_log

COUNTED_EVENTS = (
    lifecycle.COUNTED_EVENTS
    | health.COUNTED_EVENTS
    | frozenset(
        {
            "wake-up",
            "reconfigure",
            AddConsumer.event,
            CancelConsumer.event,
            Autoscale.event,
            "control.error",
        }
    )
)
"""The supervisor's ``event`` values that metrics count (a fixed set keeps
the label's cardinality bounded)."""

DEFAULT_POLICY = SupervisionPolicy()

NOT_READY_STATES = frozenset({WorkerState.STARTING, WorkerState.RESTARTING, WorkerState.STOPPING})
"""A worker in one of these is on its way up or down (see _may_reconfigure)."""


def _restart_key(spec: InstanceSpec) -> tuple[Any, ...]:
    """What the running worker took from its command line and can only change
    by a restart (its command line, environment, working directory and
    interpreter); queues and concurrency are changed live instead."""
    return (
        spec.broker,
        spec.celery_app,
        spec.arguments,
        spec.env,
        spec.workdir,
        spec.python,
        spec.task_events,
    )


class Supervisor(Service):
    """Reconciles desired instances (``desired()``) with worker processes.

    Everything external is injected: ``reactor`` (the clock), ``spawner``
    (an ``IReactorProcess``), ``control`` (a :class:`scs.control.CeleryControl`
    or a fake with its interface; closed when the service stops),
    ``process_table`` (finding leftover workers) and ``random`` (jitter).
    """

    def __init__(
        self,
        desired: Callable[[], Sequence[InstanceSpec]],
        instance_dir: str,
        *,
        reactor: Any,
        control: Any,
        spawner: Any,
        process_table: ProcessTable,
        policy: SupervisionPolicy = DEFAULT_POLICY,
        hostname: str | None = None,
        random: Callable[[], float] = _random.random,
        mingle: bool = False,
    ) -> None:
        self._reactor = reactor
        self._spawner = spawner
        self._control = control
        self._desired = desired
        self.instance_dir = instance_dir
        self.policy = policy
        self.hostname = hostname or socket.gethostname()
        self._random = random
        self.mingle = mingle
        self._log = Logger(namespace="scs.supervisor", source=self)
        self._health = Health(reactor, control, policy, self._log, self._starting, self._configure)
        self._leftovers = Leftovers(instance_dir, process_table, reactor, policy, self._log)
        self._lifecycles: dict[str, WorkerLifecycle] = {}
        # Deleted instances whose lifecycle goes once its worker has exited.
        self._forgetting: set[str] = set()
        # wait_ready() for an instance with no lifecycle yet.
        self._early_waiters: dict[str, list[Deferred[bool]]] = {}
        # Wake-up serialisation: waiters of the running wake-up, and of the
        # one queued behind it (None when nothing is queued).
        self._current: list[Deferred[None]] | None = None
        self._wake_started = 0.0
        self._next: list[Deferred[None]] | None = None
        self._loop: LoopingCall | None = None
        self._adopted = True
        self._adopt_waiters: list[Deferred[None]] = []
        self._shutting_down = False
        # app -> until when its reconfiguration is left to a rolling restart.
        self._held: dict[str, float] = {}

    @property
    def log(self) -> Logger:
        return self._log

    @log.setter
    def log(self, logger: Logger) -> None:
        """Tests observe the events of the supervisor and of its parts."""
        self._log = self._health.log = self._leftovers.log = logger
        for lc in self._lifecycles.values():
            lc.log = logger

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
        lc = self._lifecycles.get(name)
        return lc.status() if lc is not None else WorkerStatus(state=WorkerState.STOPPED.value)

    def restart(self, name: str) -> Deferred[None]:
        """Forced restart: clears 'failed' and the backoff, ends the running
        worker (TERM, then KILL) and spawns a new one.  Fires once the new
        worker is spawned (use :meth:`wait_ready` for it to answer)."""
        return ensureDeferred(self._restart(name))

    def reset(self, name: str) -> None:
        """Forget failures and backoff (the API enabled the instance)."""
        lc = self._lifecycles.get(name)
        if lc is not None:
            lc.reset()

    def wait_ready(self, name: str, timeout: float) -> Deferred[bool]:
        """True once the worker answered a ping since its last spawn; False
        on timeout or when it is failed."""
        lc = self._lifecycles.get(name)
        if lc is not None:
            return lc.wait_ready(timeout)
        d = ready_waiter(self._reactor, timeout)
        waiters = [w for w in self._early_waiters.get(name, []) if not w.called]
        self._early_waiters[name] = [*waiters, d]
        return d

    def stats(self, name: str) -> Deferred[dict[str, Any]]:
        """The worker's Celery ``stats()``; NotFound if it is not running,
        Unavailable if the broker is, GatewayTimeout if it does not answer."""
        lc = self._lifecycles.get(name)
        if lc is None or not lc.has_process:
            return fail(NotFound(f"instance {name!r} has no running worker", name=name))
        node = lc.node

        def pick(replies: dict[str, dict[str, Any]]) -> dict[str, Any]:
            if node not in replies:
                raise GatewayTimeout(f"worker {node} did not answer", name=name)
            return replies[node]

        def translate(f: Failure) -> Failure:
            if not f.check(SCSError):
                return Failure(Unavailable(f"stats failed: {f.getErrorMessage()}", name=name))
            return f

        d = self._control.stats(lc.spec.broker.url, [node], self.policy.control_timeout)
        d.addCallback(pick)
        d.addErrback(translate)
        return d

    def active_queues(self, name: str) -> Deferred[list[str] | None]:
        """Queue names the worker consumes now; None if it cannot say."""
        lc = self._lifecycles.get(name)
        if lc is None or not lc.has_process:
            return succeed(None)
        node = lc.node
        d = self._control.active_queues(lc.spec.broker.url, [node], self.policy.control_timeout)
        d.addCallbacks(lambda replies: replies.get(node), lambda f: None)
        return d

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._shutting_down = False
        self._health.start()
        for lc in self._lifecycles.values():
            lc.reopen()
        self._adopted = False
        self._warm_up()
        d = ensureDeferred(self._leftovers.end_all())
        d.addErrback(lambda f: self.log.failure("adopting leftover workers", f))
        d.addBoth(self._adoption_done)

    def _warm_up(self) -> None:
        """Build each broker's control app and connection now, in the
        background: the first call otherwise spends ~0.35 s (imports,
        connection, reply queue) competing for the CPU with the workers
        being started."""
        try:
            urls = {s.broker.url for s in self._desired()}
        except Exception:  # noqa: BLE001 - warming is an optimisation; the wake-up reports errors
            self.log.failure("{{Supervisor}} reading desired instances")
            return
        for url in sorted(urls):
            self._control.warm(url).addErrback(lambda f: None)

    def _adoption_done(self, _: object) -> None:
        self._adopted = True
        waiters, self._adopt_waiters = self._adopt_waiters, []
        for w in waiters:
            fire(w, None)
        if self._shutting_down:
            return
        self._loop = LoopingCall(self.wake)
        self._loop.clock = self._reactor
        self._loop.start(self.policy.interval, now=True).addErrback(
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
        self._health.stop()
        await self._close_all()
        # A wake-up or an adoption in flight may still hold processes.
        await self._when_adopted()
        if self._current is not None:
            d: Deferred[None] = Deferred()
            self._current.append(d)
            await d
        await self._close_all()
        early, self._early_waiters = self._early_waiters, {}
        for waiters in early.values():
            for d in waiters:
                fire(d, False)
        self._control.close()

    async def _close_all(self) -> None:
        await DeferredList([lc.close() for lc in list(self._lifecycles.values())], consumeErrors=True)

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
        d.addErrback(lambda f: self.log.failure("{{Supervisor}} wake-up failed", f))
        d.addBoth(self._wake_done)

    def _wake_done(self, _: object) -> None:
        self.log.debug(
            "{{Supervisor}} wake-up done in {duration:.3f} s",
            duration=self._reactor.seconds() - self._wake_started,
            event="wake-up.done",
        )
        waiters, self._current = self._current or [], None
        if self._next is not None:
            nxt, self._next = self._next, None
            self._start_wake(nxt)
        for d in waiters:
            fire(d, None)

    async def _reconcile(self) -> None:
        await self._when_adopted()
        self.log.info("{{Supervisor}} wake-up", event="wake-up")
        if self._shutting_down:
            return
        specs = {s.name: s for s in self._desired()}
        stops = self._stop_undesired(specs)
        self._start_desired(specs)
        self._rotate_logs()
        checks = [ensureDeferred(self._health.check(url, lcs)) for url, lcs in self._due_for_ping().items()]
        for ok, value in await DeferredList(stops + checks, consumeErrors=True):
            if not ok:
                self.log.failure("{{Supervisor}} wake-up step failed", value)

    def _rotate_logs(self) -> None:
        """Rotate the worker.log of every worker with a process, by size
        (``policy.worker_log_max_bytes``, ``policy.worker_log_backups``).
        A log that cannot be rotated is logged and left for the next
        wake-up; the others are not affected."""
        for name, lc in list(self._lifecycles.items()):
            if not lc.has_process:
                continue
            try:
                rotate_instance_log(
                    self.instance_dir,
                    name,
                    self.policy.worker_log_max_bytes,
                    self.policy.worker_log_backups,
                    self.log,
                )
            except (OSError, UnsafeName) as e:
                self.log.warn(
                    "{{Supervisor}} {name} worker.log not rotated: {error}",
                    name=name,
                    error=str(e),
                    event="worker.log.rotate-failed",
                )

    def _stop_undesired(self, specs: dict[str, InstanceSpec]) -> list[Deferred[Any]]:
        """Stop the workers of disabled and deleted instances; the deleted
        ones are forgotten once their worker has exited."""
        stops: list[Deferred[Any]] = []
        for name, lc in list(self._lifecycles.items()):
            spec = specs.get(name)
            if spec is not None and spec.is_enabled:
                continue
            if spec is None:
                self._forgetting.add(name)
            d = lc.stop()
            d.addCallback(self._forget, lc)
            stops.append(d)
        return stops

    def _forget(self, _: object, lc: WorkerLifecycle) -> None:
        name = lc.name
        if name in self._forgetting and self._lifecycles.get(name) is lc and lc.state is WorkerState.STOPPED:
            del self._lifecycles[name]
            self._forgetting.discard(name)

    def _start_desired(self, specs: dict[str, InstanceSpec]) -> None:
        """Start the enabled instances' workers; replace those whose command
        line changed (broker, celery_app or arguments: only a new process
        picks them up); start again a failed one whose settings changed
        since it failed (the operator mended its app: a workdir that was
        missing, a wrong celery_app), once per change."""
        for spec in specs.values():
            if not spec.is_enabled:
                continue
            lc = self._lifecycle(spec)
            if lc.state in LIVE_STATES and lc.spawned_spec is not None:
                if _restart_key(lc.spawned_spec) != _restart_key(spec) and self._may_reconfigure(spec.app, lc):
                    self.log.info(
                        "{{Supervisor}} {name} configuration changed, restarting", name=spec.name, event="reconfigure"
                    )
                    lc.replace()
                continue
            if lc.failed_with is not None and _restart_key(lc.failed_with) != _restart_key(spec):
                self.log.info(
                    "{{Supervisor}} {name} failed, and its configuration changed since: starting it again",
                    name=spec.name,
                    event="reconfigure.failed",
                )
                lc.reset()
            lc.start()

    def hold_reconfigure(self, app: str, seconds: float) -> None:
        """Leave the workers of ``app`` whose settings changed as they are
        for ``seconds``: an agent is restarting them one by one across the
        cluster (a rolling restart).  Whatever is still outdated after that
        is replaced here, one worker of the app at a time."""
        self._held[app] = self._reactor.seconds() + seconds

    def _may_reconfigure(self, app: str, lc: WorkerLifecycle) -> bool:
        """Replace ``lc`` for new settings now?  Not while the app is held,
        nor while another worker of the app here is not ready yet: a
        settings change rolls through the app's workers, it does not stop
        them all at once."""
        if self._held.get(app, 0.0) > self._reactor.seconds():
            return False
        self._held.pop(app, None)
        return not any(
            other is not lc and other.spec.app == app and other.state in NOT_READY_STATES
            for other in self._lifecycles.values()
        )

    def _lifecycle(self, spec: InstanceSpec) -> WorkerLifecycle:
        """The lifecycle of ``spec``'s instance (made on first sight), now
        running ``spec`` at its next spawn."""
        self._forgetting.discard(spec.name)
        lc = self._lifecycles.get(spec.name)
        if lc is None:
            lc = self._lifecycles[spec.name] = WorkerLifecycle(
                spec,
                node_name(spec.name, self.hostname),
                clock=self._reactor,
                spawner=self._spawner,
                policy=self.policy,
                instance_dir=self.instance_dir,
                hostname=self.hostname,
                log=self.log,
                random=self._random,
                on_spawned=lambda lc: self._health.probe(lc.spec.broker.url),
                mingle=self.mingle,
            )
            for d in self._early_waiters.pop(spec.name, []):
                lc.add_ready_waiter(d)
        lc.spec = spec
        return lc

    def _due_for_ping(self) -> dict[str, list[WorkerLifecycle]]:
        """The wake-up's ping, by broker: workers that answered before, and
        starting ones past start_timeout (until then the probe pings them)."""
        now = self._reactor.seconds()
        by_broker: dict[str, list[WorkerLifecycle]] = {}
        for lc in self._lifecycles.values():
            if lc.due_for_ping(now):
                by_broker.setdefault(lc.spec.broker.url, []).append(lc)
        return by_broker

    def _starting(self, url: str) -> list[WorkerLifecycle]:
        return [
            lc for lc in self._lifecycles.values() if lc.spec.broker.url == url and lc.state is WorkerState.STARTING
        ]

    async def _restart(self, name: str) -> None:
        spec = next((s for s in self._desired() if s.name == name), None)
        if spec is None:  # deleted (its worker, if any, is being stopped)
            raise NotFound(f"no instance {name!r}", name=name)
        lc = self._lifecycle(spec)
        if not spec.is_enabled or self._shutting_down:
            lc.reset()
            return
        await lc.restart()

    # -- queues and autoscale -----------------------------------------------------

    async def _configure(self, url: str, lcs: Sequence[WorkerLifecycle]) -> None:
        """Queues and autoscale: compare with the spec, send the differences.
        One active_queues and one stats round trip for all of ``lcs``."""
        nodes = [lc.node for lc in lcs]
        timeout = self.policy.control_timeout
        (q_ok, queues), (s_ok, stats) = await DeferredList(
            [self._control.active_queues(url, nodes, timeout), self._control.stats(url, nodes, timeout)],
            consumeErrors=True,
        )
        sends = []
        for lc in lcs:
            reported = queues.get(lc.node) if q_ok else None
            scaler = (stats[lc.node].get("autoscaler") or {}) if s_ok and lc.node in stats else None
            sends += [self._send(url, lc, c) for c in corrections(lc.spec, reported, scaler)]
        if sends:
            for ok, value in await DeferredList(sends, consumeErrors=True):
                if not ok:
                    self.log.warn(
                        "{{Supervisor}} control command failed: {error}",
                        error=value.getErrorMessage(),
                        event="control.error",
                    )

    def _send(self, url: str, lc: WorkerLifecycle, c: Correction) -> Deferred[str]:
        timeout = self.policy.control_timeout
        if isinstance(c, AddConsumer):
            self.log.info(
                "{{Supervisor}} {name} node.consume_from: {queue}", name=lc.name, queue=c.queue, event=c.event
            )
            return self._control.add_consumer(
                url,
                lc.node,
                c.queue,
                exchange=c.exchange,
                routing_key=c.routing_key,
                exchange_type=c.exchange_type,
                timeout=timeout,
            )
        if isinstance(c, CancelConsumer):
            self.log.info(
                "{{Supervisor}} {name} node.cancel_consume_from: {queue}", name=lc.name, queue=c.queue, event=c.event
            )
            return self._control.cancel_consumer(url, lc.node, c.queue, timeout=timeout)
        self.log.info(
            "{{Supervisor}} {name} node.autoscale: max={max} min={min}",
            name=lc.name,
            max=c.max,
            min=c.min,
            event=c.event,
        )
        return self._control.autoscale(url, lc.node, c.max, c.min, timeout=timeout)


__all__ = ["COUNTED_EVENTS", "PING_TIMEOUTS", "SupervisionPolicy", "Supervisor"]
