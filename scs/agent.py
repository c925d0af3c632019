"""The façade the API, the admin page and the manhole call.

``Agent`` answers every operation for the whole cluster: it runs it here
(``LocalAgent``) when this agent owns the instance or queue, sends it to the
owner over SRS when another agent does, places new instances at random among
live agents, and merges cluster-wide listings.  Without SRS it is the local
agent alone.

Operations take validated values and return ``Reply`` objects: a JSON-able
body, the HTTP status and the agents that did not answer a listing.
"""

from __future__ import annotations

import random as _random
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.logger import Logger

from scs.errors import (
    BadParameter,
    Conflict,
    GatewayTimeout,
    NotFound,
    SCSError,
    Unavailable,
    WorkerFailed,
)
from scs.records import AppRecord, BrokerInfo, InstanceSpec, QueueBinding, WorkerStatus
from scs.records import UNSET
from scs.store import Store
from scs.operation_args import OPERATIONS, check_operation
from scs.validation import check_concurrency_range, check_name, only

log = Logger(namespace="scs.agent")

# How long instance creation waits for the new worker's first ping.
DEFAULT_READY_TIMEOUT = 15.0
# How long a DELETE waits for the supervisor to stop the worker.
DEFAULT_STOP_TIMEOUT = 20.0


@attrs.frozen
class Reply:
    body: Any
    status: int = 200
    missing: tuple[str, ...] = ()


def instance_json(spec: InstanceSpec, status: WorkerStatus, agent_id: str) -> dict[str, Any]:
    """The instance object of DESIGN §5 (the seed's fields first)."""
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
    ) -> None:
        self.store = store
        self.agent_id = agent_id
        self.default_broker = default_broker
        self.supervisor = supervisor
        # Bounds the waits for the supervisor; by default the supervisor's own.
        self.clock = clock if clock is not None else getattr(supervisor, "clock", None)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        # Resolves a queue name to a declaration anywhere in the cluster;
        # the cluster façade replaces it.
        self.resolve_queue: Callable[[str, str], Deferred] = self._resolve_queue_here

    # -- helpers ---------------------------------------------------------

    def status(self, name: str) -> WorkerStatus:
        if self.supervisor is None:
            return WorkerStatus(state="stopped")
        return self.supervisor.status(name)

    def _json(self, spec: InstanceSpec) -> dict[str, Any]:
        return instance_json(spec, self.status(spec.name), self.agent_id)

    def _changed(self) -> Deferred:
        """Tell the supervisor that desired state changed; fires when it acted."""
        if self.supervisor is None:
            return Deferred.fromCoroutine(_nothing())
        return self.supervisor.wake()

    def _resolve_queue_here(self, app: str, queue: str) -> Deferred:
        binding = self.store.find_queue(app, queue)
        return Deferred.fromCoroutine(_value(binding))

    def instances(self) -> list[tuple[InstanceSpec, WorkerStatus]]:
        """This agent's instances with their workers' status (metrics)."""
        return [(spec, self.status(spec.name)) for spec in self.store.list_nodes()]

    def app_records(self) -> list[AppRecord]:
        return self.store.list_apps()

    def queue_records(self, app: str) -> list[QueueBinding]:
        return self.store.list_queues(app)

    def summary(self) -> dict[str, Any]:
        # Sent with every SRS heartbeat: a count query, not the records.
        return {"instances": self.store.count_nodes()}

    # -- apps ------------------------------------------------------------

    def app_put(
        self,
        app: str,
        broker: str | None = None,
        celery_app: Any = UNSET,
        arguments: list[str] | None = None,
    ) -> dict[str, Any]:
        record, created = self.store.put_app(
            app, self.default_broker, broker=broker, celery_app=celery_app, arguments=arguments
        )
        if not created:
            # The workers of this app must run with its new settings.
            self._changed()
        return {"app": record.to_json(), "created": created}

    def app_get(self, app: str) -> dict[str, Any]:
        return self.store.get_app(app).to_json()

    def app_export(self) -> list[dict[str, Any]]:
        """Every app with its real broker URL, for a peer copying them.

        Only peers of the same cluster on the same broker can ask for this;
        the API never shows it.
        """
        return [
            {
                "app": a.name,
                "broker": a.broker.url,
                "celery_app": a.celery_app,
                "arguments": list(a.arguments),
            }
            for a in self.store.list_apps()
        ]

    def app_delete(self, app: str) -> dict[str, Any]:
        """Delete an app here.  Its workers are stopped by the supervisor's
        next wake-up, not awaited: an app may have many, and every agent of
        the cluster answers this at once."""
        try:
            names = self.store.delete_app(app)
        except NotFound:
            return {"deleted": False, "instances": []}
        self._changed()
        return {"deleted": True, "instances": names}

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
            bindings.append(await self.resolve_queue(app, queue) or _default_binding(queue))
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
        body = instance_json(spec, self.status(name), self.agent_id)
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
        binding = await self.resolve_queue(spec.app, queue) or _default_binding(queue)
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

    # -- queues ----------------------------------------------------------

    def queue_declare(self, app: str, binding: dict[str, Any]) -> dict[str, Any]:
        record, created = self.store.declare_queue(
            app, QueueBinding(**binding), self.default_broker
        )
        return {"queue": queue_json(record), "created": created}

    def queue_get(self, app: str, name: str) -> dict[str, Any]:
        return queue_json(self.store.get_queue(app, name))

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


# The LocalAgent methods a peer may run here through SRS, each with its
# checked arguments (scs.operation_args).
REMOTE_OPERATIONS = OPERATIONS


async def _nothing() -> None:
    return None


async def _value(value: Any) -> Any:
    return value


def _default_binding(queue: str) -> QueueBinding:
    return QueueBinding(name=queue, exchange=queue, routing_key=queue)


class Agent:
    """Answers for the cluster; see the module docstring."""

    def __init__(
        self,
        local: LocalAgent,
        srs: Any = None,
        *,
        url: str = "",
        random: _random.Random | None = None,
        call_timeout: float = 10.0,
        create_timeout: float | None = None,
    ) -> None:
        self.local = local
        self.srs = srs
        self.url = url
        self.random = random or _random.Random()
        self.call_timeout = call_timeout
        self.create_timeout = create_timeout or local.ready_timeout + 5.0
        self._calls = 0
        # Named creations this agent is deciding, as the coordinator.
        self._name_locks: dict[str, DeferredLock] = {}
        if srs is not None:
            srs.handler = self.handle_remote
            local.resolve_queue = self._resolve_queue_anywhere

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    @property
    def store(self) -> Store:
        return self.local.store

    @property
    def supervisor(self) -> Any:
        return self.local.supervisor

    # -- the operation log of DESIGN §8 ----------------------------------

    async def _logged(self, operation: str, arguments: dict[str, Any], run: Any) -> Reply:
        """Run an operation between its two log lines, ``-->`` with the
        arguments and ``<--`` with the outcome; the second is the one
        ``event="operation"`` (with ``operation`` and ``status``) that
        metrics count."""
        self._calls += 1
        request = f"{self.agent_id}:{self._calls}"
        log.info(
            "{{{request}}} --> {operation}({arguments})",
            request=request,
            operation=operation,
            arguments=arguments,
            event="operation.start",
        )
        try:
            reply = await run
        except SCSError as e:
            log.info(
                "{{{request}}} <-- error={error}",
                request=request,
                operation=operation,
                error=e.to_json(),
                status=e.status,
                event="operation",
            )
            raise
        log.info(
            "{{{request}}} <-- ok={body}",
            request=request,
            operation=operation,
            body=reply.body,
            status=reply.status,
            event="operation",
        )
        return reply

    # -- peers -------------------------------------------------------------

    def handle_remote(self, operation: str, arguments: dict[str, Any]) -> Deferred:
        """Run an operation a peer sent us (SRS handler), once its arguments
        passed the API's own validators."""

        def run() -> Deferred:
            if operation == "instance_create_named":
                return Deferred.fromCoroutine(self._create_named_for_peer(arguments))
            clean = check_operation(operation, arguments)
            return _as_deferred(getattr(self.local, operation)(**clean))

        return maybeDeferred(run)

    async def _create_named_for_peer(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise BadParameter("operation arguments must be an object")
        only(request, ("arguments", "on"))
        arguments = check_operation("instance_create", request.get("arguments"))
        if arguments.get("name") is None:
            raise BadParameter("missing parameter name", parameter="name")
        on = request.get("on")
        if on is not None:
            on = check_name(on, "agent")
        reply = await self.create_named(arguments, on)
        return {"instance": reply.body, "status": reply.status}

    def _clustered(self) -> bool:
        return self.srs is not None and self.srs.is_connected()

    def _peers_missing(self) -> tuple[str, ...]:
        """Live peers we could not reach because SRS is down."""
        if self.srs is None or self.srs.is_connected():
            return ()
        return tuple(m["id"] for m in self.srs.members() if m["id"] != self.agent_id)

    async def _gather(
        self, operation: str, arguments: dict[str, Any], local_result: Any
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Run a listing on every live agent: ({agent: result}, missing)."""
        results: dict[str, Any] = {self.agent_id: local_result}
        if self.srs is None:
            return results, ()
        if not self.srs.is_connected():
            return results, self._peers_missing()
        answers, missing = await self.srs.scatter(operation, arguments)
        for agent, answer in answers.items():
            if not isinstance(answer, Exception):
                results[agent] = answer
        return results, tuple(sorted(missing))

    async def _on_owner(self, name: str, operation: str, arguments: dict[str, Any]) -> Reply:
        """Run an instance operation where the instance lives.  When the
        owner cannot be asked the answer is 503, not 404: the instance may
        well exist on an agent we cannot reach."""
        if self.local.instance_owned(name) or self.srs is None:
            body = await _as_deferred(getattr(self.local, operation)(**arguments))
            return Reply(body, missing=self._peers_missing())
        if not self.srs.is_connected():
            raise Unavailable(
                f"instance {name!r} is not on this agent, and the cluster cannot be reached",
                instance=name,
                missing_agents=list(self._peers_missing()),
            )
        answers, missing = await self.srs.scatter(operation, arguments, timeout=self.call_timeout)
        answer = _owners_answer(answers)
        if answer is not None:
            return Reply(answer, missing=tuple(missing))
        # The instance may have been created here while we asked.
        if self.local.instance_owned(name):
            body = await _as_deferred(getattr(self.local, operation)(**arguments))
            return Reply(body)
        if missing:
            raise Unavailable(
                f"no agent that answered has instance {name!r}; no answer from {', '.join(sorted(missing))}",
                instance=name,
                missing_agents=sorted(missing),
            )
        raise NotFound(f"no instance named {name!r}", instance=name)

    async def _resolve_queue_anywhere(self, app: str, queue: str) -> QueueBinding | None:
        binding = self.store.find_queue(app, queue)
        if binding is not None or not self._clustered():
            return binding
        answers, _missing = await self.srs.scatter("queue_get", {"app": app, "name": queue})
        for agent in sorted(answers):
            answer = answers[agent]
            if isinstance(answer, dict):
                return QueueBinding(**answer)
        return None

    # -- operations --------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        if self.srs is not None:
            return self.srs.members()
        return [
            {
                "id": self.agent_id,
                "url": self.url,
                "alive": True,
                "last_seen": None,
                "instances": self.store.count_nodes(),
            }
        ]

    async def app_put(
        self,
        app: str,
        broker: str | None = None,
        celery_app: Any = UNSET,
        arguments: list[str] | None = None,
    ) -> Reply:
        arguments_json: dict[str, Any] = {"app": app}
        if broker is not None:
            arguments_json["broker"] = broker
        if celery_app is not UNSET:
            arguments_json["celery_app"] = celery_app
        if arguments is not None:
            arguments_json["arguments"] = list(arguments)

        async def run() -> Reply:
            result = self.local.app_put(**arguments_json)
            if self.srs is not None:
                # Apps live on every agent (DESIGN §7).
                self.srs.broadcast("app_put", arguments_json)
            return Reply(result["app"], status=201 if result["created"] else 200)

        logged = dict(arguments_json)
        if broker is not None:
            logged["broker"] = BrokerInfo.from_url(broker).to_json(masked=True)
        return await self._logged("App.put", logged, run())

    async def app_get(self, app: str) -> Reply:
        async def run() -> Reply:
            try:
                return Reply(self.local.app_get(app))
            except NotFound:
                if not self._clustered():
                    raise
            answers, missing = await self.srs.scatter("app_get", {"app": app})
            for answer in answers.values():
                if isinstance(answer, dict):
                    return Reply(answer, missing=tuple(missing))
            raise NotFound(f"no app named {app!r}", app=app)

        return await self._logged("App.get", {"app": app}, run())

    async def app_delete(self, app: str) -> Reply:
        async def run() -> Reply:
            local = self.local.app_delete(app)
            deleted = local["deleted"]
            instances = list(local["instances"])
            missing: tuple[str, ...] = self._peers_missing()
            if self._clustered():
                answers, missing_list = await self.srs.scatter(
                    "app_delete", {"app": app}, timeout=self.call_timeout
                )
                missing = tuple(missing_list)
                for answer in answers.values():
                    if isinstance(answer, dict):
                        deleted = deleted or answer["deleted"]
                        instances.extend(answer["instances"])
            if not deleted:
                raise NotFound(f"no app named {app!r}", app=app)
            return Reply({"ok": "ok", "app": app, "instances": sorted(instances)}, missing=missing)

        return await self._logged("App.delete", {"app": app}, run())

    async def sync_apps_from_peers(self) -> None:
        """Copy the apps of the cluster here (an agent that joins later)."""
        if not self._clustered():
            return
        answers, _missing = await self.srs.scatter("app_export", {})
        for agent in sorted(answers):
            answer = answers[agent]
            if not isinstance(answer, list):
                continue
            for app in answer:
                try:
                    clean = check_operation("app_put", app)
                except SCSError as e:
                    log.warn(
                        "refused an app copied from {agent}: {error}",
                        agent=agent,
                        error=e.message,
                        event="srs.app.refused",
                    )
                    continue
                if not self.store.has_app(clean["app"]):
                    self.local.app_put(**clean)

    async def instance_create(
        self, app: str, name: str | None = None, *, on: str | None = None, **settings: Any
    ) -> Reply:
        """Create an instance on a random live agent, or on agent ``on``
        (the admin page creates on its own agent).  A named instance that
        exists already stays where it is; whether it exists is decided by
        one agent of the cluster (``_coordinator``), one name at a time, so
        that the same name created through two agents at once is one
        instance."""
        arguments = {"app": app, "name": name, **settings}
        log_arguments = dict(arguments)
        if settings.get("broker") is not None:
            log_arguments["broker"] = BrokerInfo.from_url(settings["broker"]).to_json(masked=True)

        async def run() -> Reply:
            if name is None:
                # A fresh random name: nothing to decide.
                return await self._place(arguments, on)
            if self.local.instance_owned(name):
                return await self._create_on(self.agent_id, arguments)
            if self.srs is None:
                return await self._place(arguments, on)
            if not self.srs.is_connected():
                # Another agent may own it: creating here could make a copy.
                raise Unavailable(
                    f"cannot tell whether instance {name!r} exists: not connected to the cluster",
                    instance=name,
                )
            coordinator = self._coordinator()
            if coordinator == self.agent_id:
                return await self.create_named(arguments, on)
            result = await self.srs.call(
                coordinator,
                "instance_create_named",
                {"arguments": arguments, "on": on},
                timeout=self.create_timeout + self.call_timeout,
            )
            return Reply(result["instance"], status=result["status"])

        return await self._logged("Node.add", log_arguments, run())

    def _coordinator(self) -> str:
        """The agent that decides named creations: the first live one by id,
        the same for every agent that sees the same members."""
        return min(self._live_agents())

    async def create_named(self, arguments: dict[str, Any], on: str | None) -> Reply:
        """On the coordinator: create a named instance unless it exists
        somewhere, one decision per name at a time."""
        name = arguments["name"]
        lock = self._name_locks.setdefault(name, DeferredLock())
        await lock.acquire()
        try:
            owner = await self._owner_of(name)
            if owner is None:
                return await self._place(arguments, on)
            if on is not None and owner != on:
                raise Conflict(f"instance {name!r} exists on agent {owner!r}", instance=name, agent=owner)
            return await self._create_on(owner, arguments)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._name_locks.pop(name, None)

    async def _owner_of(self, name: str) -> str | None:
        """The agent that has instance ``name``; Unavailable when an agent
        that might have it did not answer."""
        if self.local.instance_owned(name):
            return self.agent_id
        if not self._clustered():
            return None
        answers, missing = await self.srs.scatter("instance_owned", {"name": name})
        owners = sorted(a for a, owned in answers.items() if owned is True)
        if owners:
            return owners[0]
        if missing:
            raise Unavailable(
                f"cannot tell whether instance {name!r} exists: no answer from {', '.join(missing)}",
                instance=name,
                missing_agents=sorted(missing),
            )
        return None

    async def _place(self, arguments: dict[str, Any], on: str | None) -> Reply:
        if on is not None:
            return await self._create_on(on, arguments)
        candidates = self._live_agents()
        self.random.shuffle(candidates)
        last_error: SCSError | None = None
        for agent in candidates:
            try:
                return await self._create_on(agent, arguments)
            except (GatewayTimeout, Unavailable) as e:
                log.warn("placement on {agent} failed: {error}", agent=agent, error=e.message)
                last_error = e
        raise last_error or Unavailable("no live agent to place the instance on")

    def _live_agents(self) -> list[str]:
        if not self._clustered():
            return [self.agent_id]
        live = list(self.srs.live_agents())
        if self.agent_id not in live:
            live.append(self.agent_id)
        return sorted(live)

    async def _create_on(self, agent: str, arguments: dict[str, Any]) -> Reply:
        if agent == self.agent_id:
            result = await self.local.instance_create(**arguments)
        else:
            result = await self.srs.call(
                agent, "instance_create", arguments, timeout=self.create_timeout
            )
        if not result["created"]:
            status = 200
        elif arguments.get("nowait"):
            status = 202
        else:
            status = 201
        return Reply(result["instance"], status=status)

    async def instance_list(self, app: str) -> Reply:
        async def run() -> Reply:
            results, missing = await self._gather(
                "instance_list", {"app": app}, self.local.instance_list(app)
            )
            names: list[str] = []
            seen = set()
            for agent in sorted(results):
                for name in results[agent]:
                    if name not in seen:
                        seen.add(name)
                        names.append(name)
            return Reply(names, missing=missing)

        return await self._logged("Node.list", {"app": app}, run())

    async def instance_details(self) -> tuple[dict[str, list[dict[str, Any]]], tuple[str, ...]]:
        """Every instance of every agent, by agent (for the admin page)."""
        return await self._gather("instance_details", {}, self.local.instance_details())

    async def instance_operation(
        self, operation: str, name: str, app: str | None = None, **extra: Any
    ) -> Reply:
        arguments = {"name": name, "app": app, **extra}
        return await self._logged(
            f"Node.{operation}", arguments, self._on_owner(name, operation, arguments)
        )

    async def queue_declare(self, app: str, binding: QueueBinding) -> Reply:
        async def run() -> Reply:
            # A queue lives on the agent it was declared on; re-declaring it
            # updates that one rather than making a second.
            if self.store.find_queue(app, binding.name) is None and self._clustered():
                answers, _missing = await self.srs.scatter(
                    "queue_get", {"app": app, "name": binding.name}
                )
                owners = sorted(a for a, v in answers.items() if isinstance(v, dict))
                if owners:
                    result = await self.srs.call(
                        owners[0],
                        "queue_declare",
                        {"app": app, "binding": binding.to_json()},
                        timeout=self.call_timeout,
                    )
                    return Reply(result["queue"], status=201)
            result = self.local.queue_declare(app, binding.to_json())
            return Reply(result["queue"], status=201)

        return await self._logged("Queue.add", {"app": app, **binding.to_json()}, run())

    async def queue_list(self, app: str) -> Reply:
        async def run() -> Reply:
            results, missing = await self._gather(
                "queue_list", {"app": app}, self.local.queue_list(app)
            )
            names = sorted({name for result in results.values() for name in result})
            return Reply(names, missing=missing)

        return await self._logged("Queue.list", {"app": app}, run())

    async def queue_operation(self, operation: str, app: str, name: str) -> Reply:
        arguments = {"app": app, "name": name}

        async def run() -> Reply:
            if self.store.find_queue(app, name) is not None or not self._clustered():
                return Reply(getattr(self.local, operation)(**arguments))
            answers, missing = await self.srs.scatter(operation, arguments)
            answer = _owners_answer(answers)
            if answer is not None:
                return Reply(answer, missing=tuple(missing))
            raise NotFound(f"no queue named {name!r} in app {app!r}", queue=name)

        return await self._logged(f"Queue.{operation}", arguments, run())


def _owners_answer(answers: dict[str, Any]) -> Any:
    """Of a scatter's answers about one instance or queue, the owner's: the
    first (by agent id) that is not NotFound.  Another agent's error is
    raised; None when every agent that answered does not have it."""
    for agent in sorted(answers):
        answer = answers[agent]
        if isinstance(answer, NotFound):
            continue
        if isinstance(answer, Exception):
            raise answer
        return answer
    return None


def _as_deferred(result: Any) -> Deferred:
    if isinstance(result, Deferred):
        return result
    if hasattr(result, "__await__") and hasattr(result, "send"):
        return Deferred.fromCoroutine(result)
    return Deferred.fromCoroutine(_value(result))
