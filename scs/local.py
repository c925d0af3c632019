"""Operations on this agent's own store and supervisor: ``LocalAgent``.

Every public method takes and returns JSON-able values, so that SRS can run
it for a peer by name (``scs.operation_args`` checks the arguments first);
the cluster façade (``scs.agent.Agent``) calls it for what this agent owns.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from scs.app_sync import state_digest
from scs.errors import BadParameter, NotFound, Unavailable, WorkerFailed
from scs.records import UNSET, AppRecord, AutoscalingPolicy, InstanceSpec, QueueBinding, WorkerStatus
from scs.replica import digest as replica_digest, instance_document
from scs.store import Store
from scs.store_revisions import APP, POLICY, revision_bound
from scs.validation import check_concurrency_range, check_lines
from scs.worker import node_name, private_queue
from scs.worker_log import DEFAULT_LINES as DEFAULT_LOG_LINES, read_tail

log = Logger(namespace="scs.agent")

# (app, queue) -> Deferred firing with its QueueBinding, or None.
QueueResolver = Callable[[str, str], Deferred]

# How long instance creation waits for the new worker's first ping.
DEFAULT_READY_TIMEOUT = 15.0
# How long the supervisor leaves an app's outdated workers to the agent
# rolling them (LocalAgent.app_put(roll=True)) before replacing them itself.
ROLL_HOLD = 600.0
# How long a DELETE waits for the supervisor to stop the worker.
DEFAULT_STOP_TIMEOUT = 20.0
# How long a queue's figures, purge or deletion waits for the broker.
DEFAULT_QUEUE_TIMEOUT = 2.0


def instance_json(spec: InstanceSpec, status: WorkerStatus, agent_id: str, node: str) -> dict[str, Any]:
    """The instance object the API answers (the first prototype's fields
    first); ``node`` is the Celery node name its worker answers to."""
    return {
        "name": spec.name,
        "is_enabled": spec.is_enabled,
        "queues": list(spec.queue_names),
        "broker": spec.broker.to_json(masked=True),
        "max_concurrency": spec.max_concurrency,
        "min_concurrency": spec.min_concurrency,
        "app": spec.app,
        "agent": agent_id,
        "state": status.state,
        "pid": status.pid,
        "restarts": status.restarts,
        "arguments": list(spec.node_arguments),
        "node": node,
    }


def queue_json(binding: QueueBinding) -> dict[str, Any]:
    return binding.to_json()


class LocalAgent:
    """Operations on this agent's own store and supervisor.

    Every public method takes and returns JSON-able values, so that SRS can
    run it for a peer by name (see ``REMOTE_OPERATIONS``).
    """

    def __init__(
        self,
        store: Store,
        agent_id: str,
        default_broker: str,
        supervisor: Any = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        clock: Any = None,
        resolve_queue: QueueResolver | None = None,
        instance_dir: str | None = None,
        control: Any = None,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        # Asks the broker about queues (scs.control.CeleryControl); without
        # it a queue's figures are null and a purge is 503.
        self.control = control
        self.queue_timeout = queue_timeout
        # Where the workers' files are (worker.log): by default the supervisor's.
        self.instance_dir = instance_dir if instance_dir is not None else getattr(supervisor, "instance_dir", None)
        self.store = store
        self.agent_id = agent_id
        self.default_broker = default_broker
        self.supervisor = supervisor
        # Bounds the waits for the supervisor; by default the supervisor's own.
        self.clock = clock if clock is not None else getattr(supervisor, "clock", None)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        # Finds a queue's declaration: here alone, or anywhere in the
        # cluster (``scs.agent.ClusterQueues``).
        self.resolve_queue: QueueResolver = resolve_queue or self._resolve_queue_here
        # App -> the last autoscaling decision, while this agent is the one
        # that decides (written by scs.autoscaling.Autoscaler).
        self.autoscaling_decisions: dict[str, dict[str, Any]] = {}
        # The apps, app state and its digest as of ``_writes()``: every
        # heartbeat and sync tick reads them, a change is rare.
        self._apps_cache: tuple[int, list[AppRecord]] | None = None
        self._state_cache: tuple[int, list[dict[str, Any]], str] | None = None

    # -- helpers ---------------------------------------------------------

    def status(self, name: str) -> WorkerStatus:
        if self.supervisor is None:
            return WorkerStatus(state="stopped")
        return self.supervisor.status(name)

    def _json(self, spec: InstanceSpec) -> dict[str, Any]:
        return instance_json(spec, self.status(spec.name), self.agent_id, self.node_name(spec.name))

    def _changed(self) -> Deferred:
        """Tell the supervisor that desired state changed; fires when it acted."""
        if self.supervisor is None:
            return succeed(None)
        return self.supervisor.wake()

    def _resolve_queue_here(self, app: str, queue: str) -> Deferred:
        return succeed(self.store.find_queue(app, queue))

    def node_name(self, name: str) -> str:
        """The Celery node name the worker of instance ``name`` answers to."""
        return node_name(name, getattr(self.supervisor, "hostname", None) or self.agent_id)

    def _apps(self) -> list[AppRecord]:
        """Every app here, read again only after a write to them."""
        writes = self._writes()
        if writes is None or self._apps_cache is None or self._apps_cache[0] != writes:
            self._apps_cache = (writes, self.store.list_apps())
        return list(self._apps_cache[1])

    def _writes(self) -> int | None:
        """What the cached apps are valid for: ``Store.app_writes`` (unique
        across stores: a store put in place of another is read again);
        None: a store without it, never cached."""
        return getattr(self.store, "app_writes", None)

    def app_names(self) -> list[str]:
        return [app.name for app in self._apps()]

    def instances(self) -> list[tuple[InstanceSpec, WorkerStatus]]:
        """This agent's instances with their workers' status (metrics)."""
        return [(spec, self.status(spec.name)) for spec in self.store.list_nodes()]

    def app_records(self) -> list[AppRecord]:
        return self._apps()

    def queue_records(self, app: str) -> list[QueueBinding]:
        return self.store.list_queues(app)

    def summary(self) -> dict[str, Any]:
        """Sent with every SRS heartbeat: how many instances, the digest of
        their documents (peers re-fetch their copy when it changes),
        whether this agent is draining (it takes no placements) and the
        digest of its apps (``scs.app_sync``)."""
        documents = self.instance_export()
        return {
            "instances": len(documents),
            "digest": replica_digest(documents),
            "draining": self.draining,
            "apps": self.apps_digest(),
        }

    # -- failover and drain (scs.replica, scs.failover) ----------------------

    @property
    def draining(self) -> bool:
        return self.store.settings.get("draining") == "1"

    def set_draining(self, draining: bool) -> None:
        self.store.settings.set("draining", "1" if draining else None)

    def instance_export(self) -> list[dict[str, Any]]:
        """The documents of this agent's instances, for the peers' copies."""
        app_brokers = {app.name: app.broker.url for app in self._apps()}
        return [
            instance_document(spec, app_brokers.get(spec.app), self.status(spec.name))
            for spec in self.store.list_nodes()
        ]

    async def instance_adopt(self, document: dict[str, Any], moved_from: str, wait: bool = True) -> dict[str, Any]:
        """Take over an instance of another agent (a failover or a drain):
        same name and settings, the same desired state, its ``moved_from``
        noted so that the agent it came from drops its own copy.  ``wait``:
        answer once its worker answered a ping (bounded), with ``ready``.
        An instance of an app deleted meanwhile is not taken (that would
        give the app back)."""
        if not self.store.has_app(document["app"]) and self.store.revisions.of(document["app"])[1] is not None:
            raise NotFound(f"app {document['app']!r} was deleted", app=document["app"])
        bindings = [QueueBinding(**binding) for binding in document["queues"]]
        spec, created = self.store.add_node(
            document["app"],
            document["name"],
            self.default_broker,
            max_concurrency=document["max_concurrency"],
            min_concurrency=document["min_concurrency"],
            broker=document["broker"],
            arguments=document["arguments"],
            queues=bindings,
            is_enabled=document["is_enabled"],
            moved_from=moved_from,
        )
        started = self._changed()
        ready = False
        if self.supervisor is not None and spec.is_enabled and wait:
            await started
            ready = await self.supervisor.wait_ready(spec.name, self.ready_timeout)
        body = self._json(self.store.get_node(spec.name))
        body["ready"] = ready
        body["created"] = created
        return body

    def instances_owned(self, names: list[str]) -> list[str]:
        """Which of ``names`` this agent has."""
        return [name for name in names if self.store.has_node(name)]

    def drop_moved(self, names: list[str]) -> list[str]:
        """Forget instances that another agent now runs (they were moved
        while this agent was away): out of the store, their workers stopped
        at the supervisor's next wake-up.  Their ``dq.`` queue stays: the
        moved copy consumes it."""
        dropped = []
        for name in names:
            if self.store.has_node(name):
                self.store.delete_node(name)
                dropped.append(name)
        if dropped:
            self._changed()
        return dropped

    # -- apps ------------------------------------------------------------

    def app_put(
        self,
        app: str,
        broker: str | None = None,
        celery_app: Any = UNSET,
        arguments: list[str] | None = None,
        env: dict[str, str] | None = None,
        workdir: Any = UNSET,
        python: Any = UNSET,
        task_events: bool | None = None,
        roll: bool = False,
        revision: int | None = None,
    ) -> dict[str, Any]:
        """Create or update an app.  ``roll``: an agent restarts the app's
        workers one at a time for the new settings (a rolling restart), so
        the supervisor leaves them be meanwhile (``hold_reconfigure``).
        ``revision``: the change's, from the agent that took it (None: a new
        one); a change older than what is here is ignored (``stale``)."""
        if revision is not None and self._outdated(app, revision):
            log.info(
                "app {app}: a change at revision {revision} is older than ours, ignored",
                app=app,
                revision=revision,
                event="app.stale",
            )
            current = self.store.get_app(app).to_json() if self.store.has_app(app) else None
            return {"app": current, "created": False, "changed": False, "stale": True}
        before = self.store.get_app(app) if self.store.has_app(app) else None
        if roll and before is not None and self.supervisor is not None:
            self.supervisor.hold_reconfigure(app, ROLL_HOLD)
        record, created = self.store.put_app(
            app,
            self.default_broker,
            broker=broker,
            celery_app=celery_app,
            arguments=arguments,
            env=env,
            workdir=workdir,
            python=python,
            task_events=task_events,
            revision=revision,
        )
        if not created:
            # The workers of this app must run with its new settings.
            self._changed()
        changed = before is not None and before != record and bool(self.store.node_names(app))
        return {"app": record.to_json(), "created": created, "changed": changed}

    def app_get(self, app: str) -> dict[str, Any]:
        return self.store.get_app(app).to_json()

    def _outdated(self, app: str, revision: int, kind: str = APP) -> bool:
        """Whether a change of ``app`` (or of its policy: ``kind``) at
        ``revision`` is older than what is here (a higher revision, a
        deletion as high).  A revision stored here beyond the bound the
        peers accept is ignored: it would pin the app here."""
        app_revision, deleted_at = self.store.revisions.of(app, kind)
        bound = revision_bound()
        return (app_revision is not None and revision < app_revision <= bound) or (
            deleted_at is not None and revision <= deleted_at <= bound
        )

    def app_export(self) -> list[dict[str, Any]]:
        """Every app with its real broker URL, for a peer copying them (the
        agents before ``app_state`` ask for this).

        Only peers of the same cluster on the same broker can ask for this;
        the API never shows it.
        """
        return [_app_item(a) for a in self._apps()]

    def app_item(self, app: str) -> dict[str, Any]:
        """One app's whole settings with its revision, for the peers."""
        record = self.store.get_app(app)
        return {**_app_item(record), "revision": record.revision}

    def app_state(self) -> list[dict[str, Any]]:
        """Every app with its revision, and every deleted app's name with
        the revision of its deletion; then the same of the autoscaling
        policies (marked ``"kind": "autoscaling"``); for a peer merging them
        (``scs.app_sync``).  Read again only after a write to them
        (``Store.app_writes``)."""
        return [dict(item) for item in self._state()[0]]

    def _state(self) -> tuple[list[dict[str, Any]], str]:
        writes = self._writes()
        if writes is None or self._state_cache is None or self._state_cache[0] != writes:
            state = self._read_state()
            self._state_cache = (writes, state, state_digest(state))
        return self._state_cache[1], self._state_cache[2]

    def _read_state(self) -> list[dict[str, Any]]:
        apps = [{**_app_item(a), "revision": a.revision} for a in self._apps()]
        deleted = [
            {"app": name, "revision": revision, "deleted": True}
            for name, revision in sorted(self.store.revisions.tombstones().items())
        ]
        policies = [
            {"kind": POLICY, **policy.to_json(), "revision": revision}
            for policy, revision in self.store.policies.with_revisions()
        ]
        policies_deleted = [
            {"kind": POLICY, "app": name, "revision": revision, "deleted": True}
            for name, revision in sorted(self.store.revisions.tombstones(POLICY).items())
        ]
        return apps + deleted + policies + policies_deleted

    def apps_digest(self) -> str:
        return self._state()[1]

    def app_delete(self, app: str, revision: int | None = None) -> dict[str, Any]:
        """Delete an app here, leaving a tombstone at ``revision`` (None: a
        new one; an app changed later than that is kept).  Its workers are
        stopped by the supervisor's next wake-up, not awaited: an app may
        have many, and every agent of the cluster answers this at once."""
        specs = self.store.list_nodes(app)
        app_revision = self.store.revisions.of(app)[0]
        if app_revision is None or (revision is not None and revision < app_revision <= revision_bound()):
            return {"deleted": False, "instances": []}
        try:
            names = self.store.delete_app(app, revision)
        except NotFound:
            return {"deleted": False, "instances": []}
        stopped = self._changed()

        def delete_queues(_: object) -> Deferred:
            # Once their workers have stopped, as for one instance's delete.
            deletes = [Deferred.fromCoroutine(self._delete_private_queue(spec)) for spec in specs]
            return DeferredList(deletes, consumeErrors=True)

        stopped.addCallback(delete_queues)
        stopped.addErrback(lambda f: log.failure("deleting the private queues of app {app}", f, app=app))
        return {"deleted": True, "instances": names}

    # -- autoscaling policies (scs.autoscaling) ----------------------------------

    def autoscaling_put(
        self,
        app: str,
        queue: str,
        min_instances: int,
        max_instances: int,
        messages_per_instance: int,
        scale_down_after: float,
        revision: int | None = None,
    ) -> dict[str, Any]:
        """Store an app's whole (checked) policy here.  ``revision``: the
        change's, from the agent that took it (None: a new one); a change
        older than what is here is ignored (``stale``), as for apps."""
        if revision is not None and self._outdated(app, revision, POLICY):
            log.info(
                "autoscaling policy of {app}: a change at revision {revision} is older than ours, ignored",
                app=app,
                revision=revision,
                event="autoscaling.stale",
            )
            current = self.store.policies.get(app) if self.store.has_app(app) else None
            return {"policy": None if current is None else current.to_json(), "created": False, "stale": True}
        policy, created = self.store.policies.put(
            AutoscalingPolicy(app, queue, min_instances, max_instances, messages_per_instance, scale_down_after),
            revision,
        )
        return {"policy": policy.to_json(), "created": created}

    def autoscaling_get(self, app: str) -> dict[str, Any]:
        policy = self.store.policies.get(app)
        if policy is None:
            raise NotFound(f"app {app!r} has no autoscaling policy", app=app)
        return policy.to_json()

    def autoscaling_delete(self, app: str, revision: int | None = None) -> dict[str, Any]:
        """Delete an app's policy here, leaving a tombstone at ``revision``
        (None: a new one; a policy changed later than that is kept)."""
        return {"deleted": self.store.policies.delete(app, revision)}

    def autoscaling_export(self) -> list[dict[str, Any]]:
        """Every policy here, for a peer copying them (the agents before
        ``app_state`` carried the policies ask for this)."""
        return [policy.to_json() for policy in self.store.policies.list_all()]

    def autoscaling_status(self, app: str) -> dict[str, Any] | None:
        """The last decision about ``app``, if this agent decides."""
        decision = self.autoscaling_decisions.get(app)
        return None if decision is None else dict(decision)

    # -- instances ---------------------------------------------------------

    def instance_owned(self, name: str) -> bool:
        return self.store.has_node(name)

    async def instance_create(
        self,
        app: str,
        name: str | None = None,
        max_concurrency: int = 1,
        min_concurrency: int = 1,
        queues: list[str] | None = None,
        broker: str | None = None,
        arguments: list[str] | None = None,
        nowait: bool = False,
    ) -> dict[str, Any]:
        check_concurrency_range(max_concurrency, min_concurrency)
        if name is None:
            name = str(uuid.uuid4())
        bindings = []
        for queue in queues or ():
            bindings.append(await self.resolve_queue(app, queue) or default_binding(queue))
        spec, created = self.store.add_node(
            app,
            name,
            self.default_broker,
            max_concurrency=max_concurrency,
            min_concurrency=min_concurrency,
            broker=broker,
            arguments=arguments or (),
            queues=bindings,
        )
        for binding in bindings:
            if binding.name not in spec.queue_names:
                spec = self.store.add_consumption(name, binding)
        started = self._changed()
        if not nowait and self.supervisor is not None:
            await started
            ready = await self.supervisor.wait_ready(name, self.ready_timeout)
            if not ready and self.status(name).state in ("restarting", "failed"):
                # Kept, so that it can be fixed and restarted; but not a 201.
                raise WorkerFailed(
                    f"instance {name!r} was created but its worker cannot start: it exits "
                    "before answering (see its worker.log); fix the app and restart it",
                    instance=self._json(self.store.get_node(name)),
                )
        return {"instance": self._json(self.store.get_node(name)), "created": created}

    def instance_list(self, app: str | None = None) -> list[str]:
        return self.store.node_names(app)

    def instance_details(self, app: str | None = None) -> list[dict[str, Any]]:
        return [self._json(spec) for spec in self.store.list_nodes(app)]

    def instance_get(self, name: str, app: str | None = None) -> dict[str, Any]:
        return self._json(self.store.get_node(name, app))

    async def instance_delete(self, name: str, app: str | None = None) -> dict[str, Any]:
        spec = self.store.delete_node(name, app)
        await self._settle()
        await self._delete_private_queue(spec)
        body = instance_json(spec, self.status(name), self.agent_id, self.node_name(name))
        body["is_enabled"] = False
        return body

    async def instance_enable(self, name: str, app: str | None = None) -> dict[str, Any]:
        self.store.set_enabled(name, True, app)
        if self.supervisor is not None:
            self.supervisor.reset(name)
        await self._changed()
        return self.instance_get(name, app)

    async def instance_disable(self, name: str, app: str | None = None) -> dict[str, Any]:
        self.store.set_enabled(name, False, app)
        await self._settle()
        return self.instance_get(name, app)

    async def instance_restart(self, name: str, app: str | None = None) -> dict[str, Any]:
        self.store.get_node(name, app)
        if self.supervisor is not None:
            await self.supervisor.restart(name)
        return self.instance_get(name, app)

    async def instance_restart_ready(self, name: str, app: str | None = None) -> dict[str, Any]:
        """Restart and wait (bounded by ``ready_timeout``) for the new worker
        to answer a ping: one step of a rolling restart.  The instance
        object has ``ready`` added: False when it did not answer in time."""
        body = await self.instance_restart(name, app)
        ready = False
        if self.supervisor is not None and body["is_enabled"]:
            ready = await self.supervisor.wait_ready(name, self.ready_timeout)
        body = self.instance_get(name, app)
        body["ready"] = ready
        return body

    # -- every instance of an app on this agent --------------------------------

    def _app_specs(self, app: str) -> list[InstanceSpec]:
        return sorted(self.store.list_nodes(app), key=lambda spec: spec.name)

    async def app_enable(self, app: str) -> dict[str, Any]:
        """Enable every instance of ``app`` here; fires once the supervisor acted."""
        names = [spec.name for spec in self._app_specs(app)]
        for name in names:
            self.store.set_enabled(name, True, app)
            if self.supervisor is not None:
                self.supervisor.reset(name)
        await self._changed()
        return {"instances": names, "failed": {}}

    async def app_disable(self, app: str) -> dict[str, Any]:
        """Disable every instance of ``app`` here; waits (bounded) for the stops."""
        names = [spec.name for spec in self._app_specs(app)]
        for name in names:
            self.store.set_enabled(name, False, app)
        await self._settle()
        return {"instances": names, "failed": {}}

    async def app_restart(self, app: str) -> dict[str, Any]:
        """Restart every enabled instance of ``app`` here at once, then wait
        (bounded by ``ready_timeout``) for each to answer a ping; those that
        do not are ``failed``."""
        names = [spec.name for spec in self._app_specs(app) if spec.is_enabled]
        if self.supervisor is None:
            return {"instances": names, "failed": {}}
        await DeferredList([self.supervisor.restart(name) for name in names], consumeErrors=True)
        results = await DeferredList(
            [self.supervisor.wait_ready(name, self.ready_timeout) for name in names], consumeErrors=True
        )
        failed = {
            name: f"did not answer a ping within {self.ready_timeout:g} s of its restart"
            for name, (ok, ready) in zip(names, results, strict=True)
            if not (ok and ready)
        }
        return {"instances": names, "failed": failed}

    def autoscale_get(self, name: str, app: str | None = None) -> dict[str, Any]:
        spec = self.store.get_node(name, app)
        return {"max": spec.max_concurrency, "min": spec.min_concurrency}

    async def autoscale_set(
        self,
        name: str,
        app: str | None = None,
        max: int | None = None,
        min: int | None = None,
    ) -> dict[str, Any]:
        current = self.store.get_node(name, app)
        new_max = current.max_concurrency if max is None else max
        new_min = current.min_concurrency if min is None else min
        if new_min > new_max:
            # Either alone keeps the other: name the one that was given.
            raise BadParameter(
                f"min ({new_min}) would be greater than max ({new_max})", parameter="max" if min is None else "min"
            )
        spec = self.store.set_autoscale(name, max, min, app)
        self._changed()
        return {"max": spec.max_concurrency, "min": spec.min_concurrency}

    async def queues_of(self, name: str, app: str | None = None) -> dict[str, Any]:
        spec = self.store.get_node(name, app)
        active = None
        if self.supervisor is not None and self.status(name).state == "running":
            active = await self.supervisor.active_queues(name)
        return {
            "queues": list(spec.queue_names),
            "declared": [b.to_json() for b in spec.queues],
            "active": active,
        }

    async def consume(self, name: str, queue: str, app: str | None = None) -> dict[str, Any]:
        spec = self.store.get_node(name, app)
        binding = await self.resolve_queue(spec.app, queue) or default_binding(queue)
        self.store.add_consumption(name, binding, app)
        log.info("{instance}: node.consume_from: {queue}", instance=name, queue=queue)
        self._changed()
        return {"ok": "ok"}

    async def cancel(self, name: str, queue: str, app: str | None = None) -> dict[str, Any]:
        self.store.remove_consumption(name, queue, app)
        log.info("{instance}: node.cancel_consume: {queue}", instance=name, queue=queue)
        self._changed()
        return {"ok": "ok"}

    async def stats(self, name: str, app: str | None = None) -> dict[str, Any]:
        self.store.get_node(name, app)
        if self.supervisor is None:
            raise Unavailable("this agent runs no supervisor", instance=name)
        return await self.supervisor.stats(name)

    def instance_log(self, name: str, app: str | None = None, lines: int = DEFAULT_LOG_LINES) -> dict[str, Any]:
        """The last ``lines`` lines of the worker's worker.log (none when it
        has not written one yet).  Read here, in the reactor thread: the
        read is bounded (``scs.worker_log``), a few MiB at most."""
        spec = self.store.get_node(name, app)
        found = [] if self.instance_dir is None else read_tail(self.instance_dir, spec.name, check_lines(lines))
        return {"name": spec.name, "agent": self.agent_id, "lines": found}

    # -- queues ----------------------------------------------------------

    def queue_declare(self, app: str, binding: dict[str, Any]) -> dict[str, Any]:
        record, created = self.store.declare_queue(app, QueueBinding(**binding), self.default_broker)
        return {"queue": queue_json(record), "created": created}

    async def queue_get(self, app: str, name: str) -> dict[str, Any]:
        """The declaration with the broker's ``messages`` and ``consumers``
        (both null when the broker cannot say: unreachable, slow, or the
        queue not on it yet)."""
        body = queue_json(self.store.get_queue(app, name))
        body.update(messages=None, consumers=None)
        if self.control is None:
            return body
        try:
            stats = await self._on_broker(
                self.control.queue_stats(self.store.get_app(app).broker.url, name, self.queue_timeout)
            )
        except Exception as e:  # noqa: BLE001 - figures are best effort: null, never a 500
            log.info(
                "queue {queue} of {app}: no figures from the broker: {error}",
                app=app,
                queue=name,
                error=_error_text(e),
                event="queue.figures.unavailable",
            )
            return body
        if stats is not None:
            body.update(messages=stats["messages"], consumers=stats["consumers"])
        return body

    async def queue_purge(self, app: str, name: str) -> dict[str, Any]:
        """Drop the ready messages of a declared queue on the app's broker."""
        self.store.get_queue(app, name)
        if self.control is None:
            raise Unavailable("this agent cannot ask the broker", queue=name)
        try:
            purged = await self._on_broker(
                self.control.queue_purge(self.store.get_app(app).broker.url, name, self.queue_timeout)
            )
        except Exception as e:  # noqa: BLE001 - any broker failure is a 503 naming the queue
            raise Unavailable(f"the broker could not purge the queue: {_error_text(e)}", queue=name) from e
        # None: not on the broker (no worker or publisher declared it yet).
        purged = purged or 0
        log.info(
            "queue {queue} of {app} purged: {purged} messages",
            app=app,
            queue=name,
            purged=purged,
            event="queue.purged",
        )
        return {"purged": purged}

    def _on_broker(self, d: Deferred) -> Deferred:
        """Bound a broker call on this agent's clock (the call bounds its
        own socket waits as well)."""
        if self.clock is not None:
            d.addTimeout(self.queue_timeout, self.clock)
        return d

    async def _delete_private_queue(self, spec: InstanceSpec) -> None:
        """Delete a deleted instance's ``dq.<name>`` from its broker; a
        broker that cannot be asked is logged, never an error."""
        if self.control is None:
            return
        queue = private_queue(spec.name)
        try:
            dropped = await self._on_broker(self.control.queue_delete(spec.broker.url, queue, self.queue_timeout))
        except Exception as e:  # noqa: BLE001 - the instance is deleted whatever the broker says
            log.warn(
                "{instance}: could not delete its queue {queue}: {error}",
                instance=spec.name,
                queue=queue,
                error=_error_text(e),
                event="instance.queue.delete_failed",
            )
            return
        log.info(
            "{instance}: deleted its queue {queue}, {messages} messages dropped",
            instance=spec.name,
            queue=queue,
            messages=dropped or 0,
            existed=dropped is not None,
            event="instance.queue.deleted",
        )

    def queue_list(self, app: str) -> list[str]:
        return self.store.queue_names(app)

    def queue_delete(self, app: str, name: str) -> dict[str, Any]:
        return queue_json(self.store.delete_queue(app, name))

    async def _settle(self) -> None:
        """Wait (bounded) for the supervisor to act on a stop or delete."""
        if self.supervisor is None:
            return
        done = self._changed()
        if self.clock is not None:
            done.addTimeout(self.stop_timeout, self.clock)
        try:
            await done
        except Exception as e:  # noqa: BLE001 - a slow stop is logged, not fatal
            log.warn("supervisor did not settle in time: {error}", error=repr(e))


def _app_item(app: AppRecord) -> dict[str, Any]:
    """An app's settings with its real broker URL (never for the API)."""
    return {
        "app": app.name,
        "broker": app.broker.url,
        "celery_app": app.celery_app,
        "arguments": list(app.arguments),
        "env": dict(app.env),
        "workdir": app.workdir,
        "python": app.python,
        "task_events": app.task_events,
    }


def default_binding(queue: str) -> QueueBinding:
    """What ``-Q queue`` declares: exchange and routing key named as the queue."""
    return QueueBinding(name=queue, exchange=queue, routing_key=queue)


def _error_text(error: BaseException) -> str:
    """A broker failure for a log line or an answer: short, and never a URL
    (the control layer's messages hold none)."""
    return (str(error) or type(error).__name__)[:200]
