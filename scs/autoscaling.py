"""Queue-depth autoscaling of an app's instances (DESIGN §9.5).

An app may have a policy ``{queue, min_instances, max_instances,
messages_per_instance, scale_down_after}`` (``PUT /<app>/autoscaling/``,
kept by every agent like the app itself).  :class:`Autoscaler` runs on
every agent and acts on one: the coordinator, the live agent with the
smallest id (``scs.placement``), the same one that decides failovers.
Every ``interval`` it looks at each policy:

- the depth: the queue's *ready* messages, from one passive declare on the
  app's broker (``CeleryControl.queue_stats``).  Messages a worker holds
  (running, or prefetched and not acknowledged) are not counted: they
  already have a worker, and counting them would keep busy instances
  alive for nothing once the queue is empty;
- the instances: the app's enabled instances that consume the queue, on
  every agent (one scatter; a dead agent's instances, from this agent's
  copy of them, count too: their workers may well be running);
- the target: ``ceil(messages / messages_per_instance)`` within
  ``[min_instances, max_instances]``.

Fewer instances than the target: the missing ones are created at once,
through the normal placement (a random live agent that is not draining),
consuming the policy's queue, with the concurrency and arguments of an
existing instance of the policy if there is one.  More: once the target
has stayed below the count for ``scale_down_after`` seconds, one instance
is removed per interval: one whose worker is not running, else one whose
worker answers that it runs no task (Celery's ``inspect().active()``),
deleted through the normal route, so its worker gets a warm shutdown
(TERM: it takes no new message, finishes what it runs; the messages it had
prefetched go back to the queue when its connection closes).  No instance
that runs a task is chosen; if every worker is busy, no step is taken.

The time the depth went low is kept by the deciding agent alone: when
another agent takes over (the decider died or left), it starts its own
clock, so a scale-down may come up to ``scale_down_after`` later than it
would have.  A takeover happens within one interval of the old decider
being known dead (within about a second for a killed agent).  If an agent
of the cluster does not answer the listing, no decision is taken that
round: its instances could not be counted.

Every decision is logged (``event="autoscale.decision"``, with the depth,
the consumers, the count and the target that caused it) and counted
(``scs_autoscale_decisions_total{app,direction}``); each change of an app's
target is logged as ``autoscale.target`` (``scs_autoscale_target{app}``).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.errors import SCSError
from scs.records import AutoscalingPolicy

log = Logger(namespace="scs.autoscaling")

# How long the broker has to tell a queue's depth, and the workers to say
# which tasks they run.
DEPTH_TIMEOUT = 2.0
ACTIVE_TIMEOUT = 1.0

UP, DOWN, HOLD = "up", "down", "hold"


def target_for(policy: AutoscalingPolicy, messages: int) -> int:
    """The instances ``messages`` ready messages call for, within the policy's bounds."""
    wanted = math.ceil(max(0, messages) / policy.messages_per_instance)
    return max(policy.min_instances, min(policy.max_instances, wanted))


def _error_text(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:200]


class Autoscaler(Service):
    """See the module docstring.  ``agent`` is the cluster façade
    (``scs.agent.Agent``), ``control`` the Celery control
    (``scs.control.CeleryControl``)."""

    def __init__(
        self,
        agent: Any,
        control: Any,
        clock: Any,
        interval: float,
        depth_timeout: float = DEPTH_TIMEOUT,
        active_timeout: float = ACTIVE_TIMEOUT,
    ) -> None:
        self.agent = agent
        self.control = control
        self.clock = clock
        self.interval = interval
        self.depth_timeout = depth_timeout
        self.active_timeout = active_timeout
        self._loop: LoopingCall | None = None
        self._running: Deferred | None = None
        self.deciding = False
        # App -> when its target went (and stayed) below its instance count.
        self._low_since: dict[str, float] = {}
        # App -> its last target (logged when it changes).
        self._targets: dict[str, int] = {}

    @property
    def decisions(self) -> dict[str, dict[str, Any]]:
        """App -> the last decision, answered by ``GET /<app>/autoscaling/``."""
        return self.agent.local.autoscaling_decisions

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def is_decider(self) -> bool:
        """Whether this agent decides: the coordinator of a connected
        cluster, or an agent without one."""
        srs = self.agent.srs
        if srs is None:
            return True
        if not srs.is_connected():
            return False
        return self.agent.placement.coordinator() == self.agent.agent_id

    def tick(self) -> Deferred | None:
        """One look at every policy; never two at once."""
        if self._running is not None:
            return None
        self._take_role(self.is_decider())
        if not self.deciding:
            return None
        policies = self.agent.store.policies.list_all()
        self._forget((set(self._targets) | set(self.decisions)) - {p.app for p in policies})
        if not policies:
            return None
        self._running = Deferred.fromCoroutine(self._check_all(policies))
        self._running.addErrback(lambda f: log.failure("autoscaling failed", f))
        self._running.addBoth(self._done)
        return self._running

    def _done(self, _: object) -> None:
        self._running = None

    def _take_role(self, deciding: bool) -> None:
        if deciding == self.deciding:
            return
        self.deciding = deciding
        if deciding:
            log.info(
                "autoscaling: this agent ({agent}) now decides for the cluster",
                agent=self.agent.agent_id,
                event="autoscale.leader",
            )
            return
        log.info(
            "autoscaling: this agent ({agent}) no longer decides",
            agent=self.agent.agent_id,
            event="autoscale.resigned",
        )
        self._forget(set(self._targets) | set(self.decisions))

    def _forget(self, apps: set[str]) -> None:
        for app in sorted(apps):
            self._low_since.pop(app, None)
            self.decisions.pop(app, None)
            if self._targets.pop(app, None) is not None:
                log.info("autoscaling of {app}: no target here any more", app=app, event="autoscale.forgotten")

    async def _check_all(self, policies: list[AutoscalingPolicy]) -> None:
        for policy in policies:
            try:
                await self.check(policy)
            except Exception:  # noqa: BLE001 - one app's trouble must not stop the others
                log.failure("autoscaling of {app} failed", app=policy.app)

    def _bounded(self, d: Deferred, timeout: float) -> Deferred:
        d.addTimeout(timeout, self.clock)
        return d

    async def check(self, policy: AutoscalingPolicy) -> dict[str, Any] | None:
        """Look at one policy and act; the decision (None: no depth)."""
        app = policy.app
        try:
            broker = self.agent.store.get_app(app).broker.url
            stats = await self._bounded(
                self.control.queue_stats(broker, policy.queue, self.depth_timeout), self.depth_timeout
            )
        except Exception as e:  # noqa: BLE001 - no depth, no decision
            log.warn(
                "autoscaling of {app}: no depth of queue {queue} from the broker ({error}): no decision",
                app=app,
                queue=policy.queue,
                error=_error_text(e),
                event="autoscale.no_depth",
            )
            return None
        # A queue not on the broker yet has no messages.
        messages = 0 if stats is None else int(stats["messages"])
        consumers = 0 if stats is None else int(stats["consumers"])
        instances, missing = await self.agent.app_wide.instance_objects(app)
        counted = [i for i in instances if i["is_enabled"] and policy.queue in i["queues"]]
        current = len(counted)
        target = target_for(policy, messages)
        now = self.clock.seconds()
        decision: dict[str, Any] = {
            "agent": self.agent.agent_id,
            "at": now,
            "queue": policy.queue,
            "messages": messages,
            "consumers": consumers,
            "instances": current,
            "target": target,
            "direction": HOLD,
            "changed": [],
            "reason": "",
            "low_since": None,
        }
        self._note_target(app, target, messages, current)
        if missing:
            self._low_since.pop(app, None)
            decision["reason"] = f"no answer from {', '.join(missing)}: their instances cannot be counted"
        elif target > current:
            self._low_since.pop(app, None)
            created = await self._scale_up(policy, counted, target - current)
            if created:
                decision.update(direction=UP, changed=created)
            else:
                decision["reason"] = "no instance could be created"
        elif target < current:
            low_since = self._low_since.setdefault(app, now)
            decision["low_since"] = low_since
            # A tick may run a little late or early: a twentieth of an
            # interval is not worth another interval's wait.
            if now - low_since < policy.scale_down_after - self.interval / 20:
                decision["reason"] = f"low for {now - low_since:.1f} of {policy.scale_down_after:g} s"
            else:
                removed = await self._scale_down_one(policy, counted)
                if removed is not None:
                    decision.update(direction=DOWN, changed=[removed])
                else:
                    decision["reason"] = "every worker runs a task: none removed"
        else:
            self._low_since.pop(app, None)
        self.decisions[app] = decision
        if decision["direction"] != HOLD:
            after = current + len(decision["changed"]) * (1 if decision["direction"] == UP else -1)
            log.info(
                "autoscaling of {app}: {direction} from {instances} to {after} instances "
                "(queue {queue}: {messages} messages ready, {consumers} consumers; target {target}): {changed}",
                app=app,
                direction=decision["direction"],
                instances=current,
                after=after,
                queue=policy.queue,
                messages=messages,
                consumers=consumers,
                target=target,
                changed=decision["changed"],
                agent=self.agent.agent_id,
                event="autoscale.decision",
            )
        return decision

    def _note_target(self, app: str, target: int, messages: int, current: int) -> None:
        if self._targets.get(app) == target:
            return
        self._targets[app] = target
        log.info(
            "autoscaling of {app}: target {target} instances ({messages} messages ready, {instances} instances)",
            app=app,
            target=target,
            messages=messages,
            instances=current,
            event="autoscale.target",
        )

    async def _scale_up(self, policy: AutoscalingPolicy, counted: list[dict[str, Any]], count: int) -> list[str]:
        """Create ``count`` instances consuming the policy's queue; their names."""
        settings: dict[str, Any] = {"queues": [policy.queue], "nowait": True}
        if counted:
            template = counted[0]
            settings.update(
                max_concurrency=template["max_concurrency"],
                min_concurrency=template["min_concurrency"],
                arguments=list(template.get("arguments") or ()),
            )
        # All at once: a burst should not wait for one placement after another.
        attempts = [
            Deferred.fromCoroutine(self.agent.instance_create(policy.app, None, **settings)) for _ in range(count)
        ]
        created: list[str] = []
        for ok, outcome in await DeferredList(attempts, consumeErrors=True):
            if ok:
                created.append(outcome.body["name"])
                continue
            error = outcome.value
            log.warn(
                "autoscaling of {app}: an instance could not be created: {error}",
                app=policy.app,
                error=error.message if isinstance(error, SCSError) else _error_text(error),
                event="autoscale.error",
            )
        return created

    async def _scale_down_one(self, policy: AutoscalingPolicy, counted: list[dict[str, Any]]) -> str | None:
        """Delete one instance that runs no task; its name, or None."""
        candidates = [i for i in counted if i["state"] != "orphaned" and self.agent.peers.peer_alive(i["agent"])]
        per_agent: dict[str, int] = {}
        for instance in counted:
            per_agent[instance["agent"]] = per_agent.get(instance["agent"], 0) + 1

        def order(instance: dict[str, Any]) -> tuple[int, str]:
            # From the agent that has most of them first: keep them spread.
            return (-per_agent[instance["agent"]], instance["name"])

        # A worker that is not running (starting, restarting, failed,
        # stopped) runs no task; an unresponsive one may: never chosen.
        idle = sorted(
            (i for i in candidates if i["state"] in ("starting", "restarting", "failed", "stopped")), key=order
        )
        running = [i for i in candidates if i["state"] == "running"]
        if not idle and running:
            broker = self.agent.store.get_app(policy.app).broker.url
            nodes = [i["node"] for i in running]
            try:
                active = await self._bounded(
                    self.control.active(broker, nodes, self.active_timeout), self.active_timeout + 1.0
                )
            except Exception as e:  # noqa: BLE001 - cannot tell who is idle: no step
                log.warn(
                    "autoscaling of {app}: the workers could not be asked what they run ({error})",
                    app=policy.app,
                    error=_error_text(e),
                    event="autoscale.error",
                )
                active = {}
            idle = sorted((i for i in running if active.get(i["node"]) == []), key=order)
        if not idle:
            return None
        name = idle[0]["name"]
        # Not awaited: the delete waits for the worker's warm shutdown (its
        # running tasks), which must not hold the decisions of every policy.
        # The owner forgets the instance at once, so the next round does not
        # count it.
        deleting = Deferred.fromCoroutine(self.agent.instance_operation("instance_delete", name, policy.app))
        deleting.addErrback(self._delete_failed, policy.app, name)
        return name

    @staticmethod
    def _delete_failed(failure: Failure, app: str, name: str) -> None:
        error = failure.value.message if failure.check(SCSError) else failure.getErrorMessage()
        log.warn(
            "autoscaling of {app}: {instance} could not be deleted: {error}",
            app=app,
            instance=name,
            error=error,
            event="autoscale.error",
        )
