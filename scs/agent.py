"""The façade the API, the admin page and the manhole call.

``Agent`` answers every operation for the whole cluster: it runs it here
(``scs.local.LocalAgent``) when this agent owns the instance or queue, sends
it to the owner over SRS when another agent does, creates instances through
``scs.placement``, and merges cluster-wide listings.  Without SRS it is the
local agent alone.

Operations take validated values and return ``Reply`` objects: a JSON-able
body, the HTTP status and the agents that did not answer a listing.
"""

from __future__ import annotations

import random as _random
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from scs.errors import BadParameter, NotFound, SCSError, Unavailable
from scs.local import (  # noqa: F401 - re-exported: the surfaces build agents from here
    DEFAULT_READY_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    LocalAgent,
    instance_json,
    queue_json,
)
from scs.operation_args import OPERATIONS, check_operation
from scs.placement import Placement
from scs.records import UNSET, BrokerInfo, QueueBinding
from scs.reply import Reply
from scs.store import Store
from scs.validation import DEFAULT_POLICY, check_policy

log = Logger(namespace="scs.agent")

# The LocalAgent methods a peer may run here through SRS, each with its
# checked arguments (scs.operation_args).
REMOTE_OPERATIONS = OPERATIONS

# The operations that change something, with the name their log lines use
# on the agent that runs them for a peer.
LOGGED_REMOTE_OPERATIONS = {
    "app_put": "App.put",
    "app_delete": "App.delete",
    "app_enable": "App.enable",
    "app_disable": "App.disable",
    "app_restart": "App.restart",
    "instance_create": "Node.add",
    "instance_delete": "Node.instance_delete",
    "instance_enable": "Node.instance_enable",
    "instance_disable": "Node.instance_disable",
    "instance_restart": "Node.instance_restart",
    "instance_restart_ready": "Node.instance_restart",
    "instance_adopt": "Node.adopt",
    "autoscale_set": "Node.autoscale_set",
    "consume": "Node.consume",
    "cancel": "Node.cancel",
    "queue_declare": "Queue.add",
    "queue_delete": "Queue.queue_delete",
    "queue_purge": "Queue.queue_purge",
    "autoscaling_put": "App.autoscaling_put",
    "autoscaling_delete": "App.autoscaling_delete",
}


def _loggable(arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` fit for a log line: a broker URL masked, the values of
    environment variables left out (they may hold secrets)."""
    shown = dict(arguments)
    if isinstance(shown.get("broker"), str):
        shown["broker"] = BrokerInfo.from_url(shown["broker"]).to_json(masked=True)
    if isinstance(shown.get("env"), dict):
        shown["env"] = sorted(shown["env"])
    if isinstance(shown.get("document"), dict):
        # An instance moved here (instance_adopt): its own broker, masked.
        shown["document"] = _loggable(shown["document"])
    return shown


async def _as_reply(result: Deferred) -> Reply:
    return Reply(await result)


# The fields of a queue object that are its declaration (QueueBinding).
_BINDING_FIELDS = ("name", "exchange", "routing_key", "exchange_type", "options")


def _env_names_only(body: Any) -> Any:
    """An app object as the log shows it: its ``env`` by names alone (the
    values may be credentials; the API answers them, the log does not)."""
    if isinstance(body, dict) and isinstance(body.get("env"), dict):
        return {**body, "env": sorted(body["env"])}
    return body


def _log_body(body: Any) -> Any:
    """An answer as its ``<--`` log line shows it: env values left out, a
    worker log's lines counted rather than copied into the agent's log."""
    body = _env_names_only(body)
    if isinstance(body, dict) and isinstance(body.get("app"), dict):
        body = {**body, "app": _env_names_only(body["app"])}  # a peer's app_put answer
    if isinstance(body, dict) and isinstance(body.get("lines"), list):
        return {**body, "lines": f"<{len(body['lines'])} lines>"}
    return body


class ClusterQueues:
    """Finds a queue's declaration here, else on any agent of the cluster
    (a queue lives on the agent it was declared on)."""

    def __init__(self, store: Store, srs: Any) -> None:
        self.store = store
        self.srs = srs

    def __call__(self, app: str, queue: str) -> Deferred:
        return Deferred.fromCoroutine(self._find(app, queue))

    async def _find(self, app: str, queue: str) -> QueueBinding | None:
        binding = self.store.find_queue(app, queue)
        if binding is not None or not self.srs.is_connected():
            return binding
        answers, _missing = await self.srs.scatter("queue_get", {"app": app, "name": queue})
        for agent in sorted(answers):
            answer = answers[agent]
            if isinstance(answer, dict):
                # The declaration alone: the answer adds the broker's figures.
                return QueueBinding(**{k: answer[k] for k in _BINDING_FIELDS if k in answer})
        return None


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
        # Instances a drain sent to each agent (its heartbeat lags behind).
        self._placed: dict[str, int] = {}
        # Instances this agent's drain is moving: kept until the replacement answers.
        self.handing_over: set[str] = set()
        self.placement = Placement(local, srs, self.random, call_timeout, self.create_timeout)
        self.placement.draining = self.is_draining
        self.placement.may_hold = self.may_hold

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    @property
    def store(self) -> Store:
        return self.local.store

    @property
    def supervisor(self) -> Any:
        return self.local.supervisor

    # -- the operation log ---------------------------------------------------

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
            body=_log_body(reply.body),
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
                return Deferred.fromCoroutine(self.placement.create_named_for_peer(arguments))
            clean = check_operation(operation, arguments)
            if operation == "instance_adopt_once":
                return Deferred.fromCoroutine(self.adopt_once(clean["target"], clean["document"], clean["moved_from"]))
            if operation == "agent_drain":
                return Deferred.fromCoroutine(self.drain(self.agent_id)).addCallback(lambda reply: reply.body)
            if operation == "agent_undrain":
                return Deferred.fromCoroutine(self.drain(self.agent_id, undrain=True)).addCallback(
                    lambda reply: reply.body
                )
            ours = self._ours(operation, clean)
            result = _as_deferred(getattr(self.local, operation)(**clean))
            if operation not in LOGGED_REMOTE_OPERATIONS:
                return result
            if not ours:
                return result  # a scatter looking for the owner: not ours
            # What a peer asks us to change is logged here too, so that the
            # owner's log tells the instance's story (--> Node.add(...) ...).
            label = LOGGED_REMOTE_OPERATIONS[operation]
            logged = Deferred.fromCoroutine(self._logged(label, _loggable(clean), _as_reply(result)))
            return logged.addCallback(lambda reply: reply.body)

        return maybeDeferred(run)

    def _ours(self, operation: str, arguments: dict[str, Any]) -> bool:
        """Whether a peer's request is about something this agent has
        (scatters ask every agent for an instance or queue's owner)."""
        if operation.startswith("queue_") and "name" in arguments:
            return self.store.find_queue(arguments["app"], arguments["name"]) is not None
        if "name" in arguments and operation != "instance_create":
            return self.local.instance_owned(arguments["name"])
        return True

    def _clustered(self) -> bool:
        return self.srs is not None and self.srs.is_connected()

    def _peers_missing(self) -> tuple[str, ...]:
        """Live peers we could not reach because SRS is down."""
        if self.srs is None or self.srs.is_connected():
            return ()
        return tuple(m["id"] for m in self.srs.members() if m["id"] != self.agent_id)

    async def _gather(
        self, operation: str, arguments: dict[str, Any], local_result: Any, timeout: float | None = None
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Run a listing on every live agent: ({agent: result}, missing)."""
        results: dict[str, Any] = {self.agent_id: local_result}
        if self.srs is None:
            return results, ()
        if not self.srs.is_connected():
            return results, self._peers_missing()
        if timeout is None:
            answers, missing = await self.srs.scatter(operation, arguments)
        else:
            answers, missing = await self.srs.scatter(operation, arguments, timeout=timeout)
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
        # An agent that holds instances and cannot be asked may have it.
        missing = sorted({*missing, *(a for a in self.srs.absent_holders() if self.may_hold(a, name))})
        if operation == "instance_get":
            orphan = next((o for o in self.orphans() if o["name"] == name), None)
            if orphan is not None:
                return Reply(orphan, missing=tuple(missing))
        if missing:
            raise Unavailable(
                f"no agent that answered has instance {name!r}; no answer from {', '.join(sorted(missing))}",
                instance=name,
                missing_agents=sorted(missing),
            )
        raise NotFound(f"no instance named {name!r}", instance=name)

    # -- operations --------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        if self.srs is not None:
            rows = self.srs.members()
            for row in rows:
                row["draining"] = self.is_draining(row["id"])
                if not row["alive"]:
                    row.update(self._whereabouts(row["id"]))
            return rows
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
        env: dict[str, str] | None = None,
        workdir: Any = UNSET,
        python: Any = UNSET,
        task_events: bool | None = None,
    ) -> Reply:
        arguments_json: dict[str, Any] = {"app": app}
        if broker is not None:
            arguments_json["broker"] = broker
        if celery_app is not UNSET:
            arguments_json["celery_app"] = celery_app
        if arguments is not None:
            arguments_json["arguments"] = list(arguments)
        # Left out: unchanged; workdir/python None: back to the agent's own.
        if env is not None:
            arguments_json["env"] = dict(env)
        if workdir is not UNSET:
            arguments_json["workdir"] = workdir
        if python is not UNSET:
            arguments_json["python"] = python
        if task_events is not None:
            arguments_json["task_events"] = task_events

        async def run() -> Reply:
            result = self.local.app_put(**arguments_json, roll=True)
            changed = result["changed"]
            missing: tuple[str, ...] = self._peers_missing()
            if self._clustered() and not result["created"]:
                # Apps live on every agent.  Each must have the new settings
                # before the rolling restart below reaches its workers.
                answers, missing_list = await self.srs.scatter(
                    "app_put", {**arguments_json, "roll": True}, timeout=self.call_timeout
                )
                missing = tuple(missing_list)
                changed = changed or any(isinstance(a, dict) and a.get("changed") for a in answers.values())
            elif self.srs is not None:
                self.srs.broadcast("app_put", arguments_json)
            body = result["app"]
            if changed:
                # New settings reach running workers by a rolling restart.
                rolled = await self._rolling_restart(app)
                body = {**body, "restarted": rolled.body}
            return Reply(body, status=201 if result["created"] else 200, missing=missing)

        logged = dict(arguments_json)
        if broker is not None:
            logged["broker"] = BrokerInfo.from_url(broker).to_json(masked=True)
        if env is not None:
            # The names alone: values may be credentials.
            logged["env"] = sorted(env)
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
                answers, missing_list = await self.srs.scatter("app_delete", {"app": app}, timeout=self.call_timeout)
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
        for clean in await self._copied_from_peers("app_export", "app_put", "an app"):
            if not self.store.has_app(clean["app"]):
                self.local.app_put(**clean)
        await self.sync_policies_from_peers()

    async def _copied_from_peers(self, export: str, operation: str, what: str) -> list[dict[str, Any]]:
        """What every peer answers to ``export``, each item checked as the
        arguments of ``operation`` (a peer's copy is a door too); the items
        refused are logged and left out."""
        answers, _missing = await self.srs.scatter(export, {})
        copied = []
        for agent in sorted(answers):
            answer = answers[agent]
            if not isinstance(answer, list):
                continue
            for item in answer:
                try:
                    copied.append(check_operation(operation, item))
                except SCSError as e:
                    log.warn(
                        "refused {what} copied from {agent}: {error}",
                        what=what,
                        agent=agent,
                        error=e.message,
                        event="srs.copy.refused",
                        operation=operation,
                    )
        return copied

    # -- autoscaling policies (scs.autoscaling) ---------------------------------

    async def sync_policies_from_peers(self) -> None:
        """Copy the peers' autoscaling policies of the apps that have none
        here (an agent that joins later, or was away when one was set)."""
        for clean in await self._copied_from_peers("autoscaling_export", "autoscaling_put", "a policy"):
            if self.store.has_app(clean["app"]) and self.store.get_policy(clean["app"]) is None:
                self.local.autoscaling_put(**clean)

    async def autoscaling_put(self, app: str, fields: dict[str, Any]) -> Reply:
        """``PUT /<app>/autoscaling/``: the ``fields`` given (each checked
        by ``check_policy_fields``) over the stored policy, or over the
        defaults for a first one; the whole checked, its queue known; then
        stored here and on every live agent."""

        async def run() -> Reply:
            await self._require_app(app)
            current = self.store.get_policy(app) if self.store.has_app(app) else None
            base = current.to_json() if current is not None else dict(DEFAULT_POLICY)
            base.pop("app", None)
            policy = check_policy({**base, **fields}, given=fields)
            await self._require_queue(app, policy["queue"])
            created = current is None
            if self.store.has_app(app):
                created = self.local.autoscaling_put(app, **policy)["created"]
            missing: tuple[str, ...] = self._peers_missing()
            if self._clustered():
                _answers, missing_list = await self.srs.scatter(
                    "autoscaling_put", {"app": app, **policy}, timeout=self.call_timeout
                )
                missing = tuple(missing_list)
            body = {"app": app, **policy}
            return Reply(body, status=201 if created else 200, missing=missing)

        return await self._logged("App.autoscaling_put", {"app": app, **fields}, run())

    async def _require_queue(self, app: str, queue: str) -> None:
        """An autoscaling policy's queue must be known: declared for the
        app (here or on a peer), consumed by one of its instances here, or
        on its broker.  BadParameter naming ``queue`` otherwise."""
        if await self.local.resolve_queue(app, queue) is not None:
            return
        if any(queue in spec.queue_names for spec in self.store.list_nodes(app)):
            return
        control = self.local.control
        if control is not None and self.store.has_app(app):
            try:
                stats = await control.queue_stats(self.store.get_app(app).broker.url, queue, self.local.queue_timeout)
            except Exception as e:  # noqa: BLE001 - any broker failure: we cannot tell
                raise Unavailable(
                    f"cannot tell whether queue {queue!r} exists: the broker did not answer", queue=queue
                ) from e
            if stats is not None:
                return
        raise BadParameter(
            f"unknown queue {queue!r}: not declared for app {app!r}, consumed by none of its instances, "
            "nor on its broker",
            parameter="queue",
        )

    async def autoscaling_get(self, app: str) -> Reply:
        """The policy with ``decision``: the last decision of the agent
        that decides (null when there is none yet, or it cannot be asked)."""

        async def run() -> Reply:
            await self._require_app(app)
            missing: tuple[str, ...] = ()
            try:
                body = self.local.autoscaling_get(app)
            except NotFound:
                if not self._clustered():
                    raise
                answers, missing_list = await self.srs.scatter("autoscaling_get", {"app": app})
                missing = tuple(missing_list)
                found = [answers[a] for a in sorted(answers) if isinstance(answers[a], dict)]
                if not found:
                    raise
                body = found[0]
            body["decision"] = await self.autoscaling_decision(app)
            return Reply(body, missing=missing)

        return await self._logged("App.autoscaling_get", {"app": app}, run())

    async def autoscaling_decision(self, app: str) -> dict[str, Any] | None:
        """The last decision about ``app`` of the agent that decides."""
        decider = self.placement.coordinator()
        if decider == self.agent_id:
            return self.local.autoscaling_status(app)
        try:
            return await self.srs.call(decider, "autoscaling_status", {"app": app}, timeout=self.call_timeout)
        except Exception:  # noqa: BLE001 - the decision is shown when it can be had
            return None

    async def autoscaling_delete(self, app: str) -> Reply:
        async def run() -> Reply:
            deleted = self.local.autoscaling_delete(app)["deleted"]
            missing: tuple[str, ...] = self._peers_missing()
            if self._clustered():
                answers, missing_list = await self.srs.scatter(
                    "autoscaling_delete", {"app": app}, timeout=self.call_timeout
                )
                missing = tuple(missing_list)
                deleted = deleted or any(isinstance(a, dict) and a.get("deleted") for a in answers.values())
            if not deleted:
                await self._require_app(app)
                raise NotFound(f"app {app!r} has no autoscaling policy", app=app)
            return Reply({"ok": "ok", "app": app}, missing=missing)

        return await self._logged("App.autoscaling_delete", {"app": app}, run())

    async def app_instance_objects(self, app: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
        """Every instance object of ``app`` in the cluster, one per name (a
        dead agent's not moved yet from our copy of them, ``orphaned``):
        (instances, agents missing).  Unlogged: the autoscaler asks every
        interval; ``instance_list_details`` is the logged API operation."""
        results, missing = await self._gather("instance_details", {"app": app}, self.local.instance_details(app))
        seen: set[str] = set()
        instances = []
        for agent in sorted(results):
            for instance in sorted(results[agent], key=lambda i: i["name"]):
                if instance["name"] not in seen:
                    seen.add(instance["name"])
                    instances.append(instance)
        for orphan in sorted(self.orphans(app), key=lambda i: i["name"]):
            if orphan["name"] not in seen:
                seen.add(orphan["name"])
                instances.append(orphan)
        return instances, missing

    async def instance_create(
        self, app: str, name: str | None = None, *, on: str | None = None, **settings: Any
    ) -> Reply:
        """Create an instance; where it goes is ``scs.placement``'s to say."""
        arguments = {"app": app, "name": name, **settings}
        log_arguments = dict(arguments)
        if settings.get("broker") is not None:
            log_arguments["broker"] = BrokerInfo.from_url(settings["broker"]).to_json(masked=True)
        return await self._logged("Node.add", log_arguments, self.placement.create(arguments, on))

    async def instance_list(self, app: str) -> Reply:
        async def run() -> Reply:
            results, missing = await self._gather("instance_list", {"app": app}, self.local.instance_list(app))
            names: list[str] = []
            seen = set()
            for agent in sorted(results):
                for name in results[agent]:
                    if name not in seen:
                        seen.add(name)
                        names.append(name)
            names += sorted({o["name"] for o in self.orphans(app)} - seen)
            return Reply(names, missing=missing)

        return await self._logged("Node.list", {"app": app}, run())

    async def app_list(self) -> Reply:
        """The names of the apps known to the cluster."""

        async def run() -> Reply:
            results, missing = await self._gather("app_names", {}, self.local.app_names())
            return Reply(sorted({name for names in results.values() for name in names}), missing=missing)

        return await self._logged("App.list", {}, run())

    async def instance_list_details(self, app: str) -> Reply:
        """Every instance object of ``app`` on every agent, in one scatter."""

        async def run() -> Reply:
            instances, missing = await self.app_instance_objects(app)
            return Reply(instances, missing=missing)

        return await self._logged("Node.list", {"app": app, "details": True}, run())

    async def instance_details(self) -> tuple[dict[str, list[dict[str, Any]]], tuple[str, ...]]:
        """Every instance of every agent, by agent (for the admin page)."""
        return await self._gather("instance_details", {}, self.local.instance_details())

    async def instance_operation(self, operation: str, name: str, app: str | None = None, **extra: Any) -> Reply:
        arguments = {"name": name, "app": app, **extra}
        return await self._logged(f"Node.{operation}", arguments, self._on_owner(name, operation, arguments))

    # -- failover and drain (scs.failover) ------------------------------------

    def may_hold(self, agent_id: str, name: str) -> bool:
        """Whether an agent we cannot ask may have instance ``name``: its
        copy here says, if we have one."""
        if agent_id not in self.store.replica_digests():
            return True
        documents = self.store.replica_instances(agent_id).get(agent_id, [])
        return any(document["name"] == name for document in documents)

    def orphans(self, app: str | None = None) -> list[dict[str, Any]]:
        """Instances of dead agents not moved yet, as instance objects with
        ``state: "orphaned"`` (from this agent's copy of them).  None while
        this agent is cut off from the cluster: then its peers are missing,
        not dead, and a listing names them in its missing-agents header."""
        if self.srs is None or not self.srs.sees_the_cluster():
            return []
        found = []
        for owner, documents in self.store.replica_instances().items():
            if self.peer_alive(owner):
                continue
            for document in documents:
                if app is None or document["app"] == app:
                    found.append(self._orphan_json(owner, document))
        return found

    def _orphan_json(self, owner: str, document: dict[str, Any]) -> dict[str, Any]:
        try:
            app_broker = self.store.get_app(document["app"]).broker
        except SCSError:
            app_broker = BrokerInfo.from_url(self.local.default_broker)
        broker = BrokerInfo.from_url(document["broker"]) if document["broker"] else app_broker
        return {
            "name": document["name"],
            "is_enabled": document["is_enabled"],
            "queues": [queue["name"] for queue in document["queues"]],
            "broker": broker.to_json(masked=True),
            "max_concurrency": document["max_concurrency"],
            "min_concurrency": document["min_concurrency"],
            "app": document["app"],
            "agent": owner,
            "state": "orphaned",
            "pid": document["pid"],
            "restarts": 0,
            "arguments": list(document["arguments"]),
            "node": f"{document['name']}@{owner}",
        }

    def _whereabouts(self, dead: str) -> dict[str, Any]:
        """What a dead agent held: ``orphaned`` (not moved: our copy of
        them) and ``moved`` (instance -> the live agent that took it)."""
        moved = {spec.name: self.agent_id for spec in self.store.list_nodes() if spec.moved_from == dead}
        orphaned = []
        for owner, documents in self.store.replica_instances().items():
            for document in documents:
                if owner == dead:
                    orphaned.append(document["name"])
                elif document["moved_from"] == dead and self.peer_alive(owner):
                    moved.setdefault(document["name"], owner)
        orphaned = sorted(set(orphaned) - set(moved))
        return {"orphaned": orphaned, "moved": dict(sorted(moved.items()))}

    async def adopt_once(self, target: str, document: dict[str, Any], moved_from: str) -> dict[str, Any]:
        """Have ``target`` take over an instance of a dead agent unless a
        live agent has it already; decided on the coordinator, one name at
        a time, so that two agents failing over at once move it once.
        Answers ``{"moved": bool, "owner": agent}``."""
        coordinator = self.placement.coordinator()
        if coordinator != self.agent_id:
            arguments = {"target": target, "document": document, "moved_from": moved_from}
            return await self.srs.call(coordinator, "instance_adopt_once", arguments, timeout=2 * self.call_timeout)
        name = document["name"]
        lock = self.placement.name_lock(name)
        await lock.acquire()
        try:
            owners = await self.owners_of([name])
            if owners is None:
                raise Unavailable(f"cannot tell whether instance {name!r} was moved already", instance=name)
            if name in owners:
                return {"moved": False, "owner": owners[name]}
            await self.adopt_on(target, document, moved_from=moved_from, wait=False)
            return {"moved": True, "owner": target}
        finally:
            self.placement.release_name_lock(name, lock)

    async def owners_of(self, names: list[str]) -> dict[str, str] | None:
        """Instance -> the live agent that has it, asking every live agent
        (copies may lag); None when one of them did not answer."""
        owners = {name: self.agent_id for name in self.local.instances_owned(names)}
        if not self._clustered():
            return owners
        answers, missing = await self.srs.scatter("instances_owned", {"names": names})
        if missing:
            return None
        for agent in sorted(answers):
            if isinstance(answers[agent], list):
                for name in answers[agent]:
                    owners.setdefault(name, agent)
        return owners

    def peer_alive(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is believed alive (this agent always is)."""
        if agent_id == self.agent_id:
            return True
        return self._clustered() and agent_id in self.srs.live_agents()

    def is_draining(self, agent_id: str) -> bool:
        if agent_id == self.agent_id:
            return self.local.draining
        member = self.srs.membership.get(agent_id) if self.srs is not None else None
        return bool(getattr(member, "draining", False))

    async def adopt_on(self, target: str, document: dict[str, Any], *, moved_from: str, wait: bool) -> dict[str, Any]:
        """Have ``target`` take over an instance (a failover or a drain)."""
        if target == self.agent_id:
            return await self.local.instance_adopt(document, moved_from, wait)
        arguments = {"document": document, "moved_from": moved_from, "wait": wait}
        timeout = self.create_timeout if wait else self.call_timeout
        return await self.srs.call(target, "instance_adopt", arguments, timeout=timeout)

    async def drain(self, agent_id: str, undrain: bool = False) -> Reply:
        """``POST /agents/<id>/drain`` (or ``undrain``), run by that agent."""

        async def run() -> Reply:
            if agent_id == self.agent_id:
                if undrain:
                    return Reply(self.local_undrain())
                return Reply(await self.local_drain())
            if not self.peer_alive(agent_id):
                if self.srs is not None and self.srs.membership.get(agent_id) is not None:
                    raise Unavailable(f"agent {agent_id!r} is not alive", agent=agent_id)
                raise NotFound(f"no agent {agent_id!r} in the cluster", agent=agent_id)
            operation = "agent_undrain" if undrain else "agent_drain"
            timeout = self.call_timeout + (0 if undrain else 60 * self.create_timeout)
            return Reply(await self.srs.call(agent_id, operation, {}, timeout=timeout))

        return await self._logged("Agent.undrain" if undrain else "Agent.drain", {"agent": agent_id}, run())

    def local_undrain(self) -> dict[str, Any]:
        self.local.set_draining(False)
        log.info("undrained: this agent takes placements again", agent=self.agent_id, event="drain.off")
        return {"agent": self.agent_id, "draining": False, "instances": [], "failed": {}}

    async def local_drain(self) -> dict[str, Any]:
        """Move every instance of this agent elsewhere, one at a time, each
        replacement answering a ping before the old worker stops: no
        capacity drop.  This agent takes no placements meanwhile and after."""
        self.local.set_draining(True)
        log.info("draining: this agent takes no placements", agent=self.agent_id, event="drain.on")
        moved: list[str] = []
        failed: dict[str, str] = {}
        for document in sorted(self.local.instance_export(), key=lambda d: d["name"]):
            name = document["name"]
            targets = [a for a in self.placement.live_agents() if a != self.agent_id and not self.is_draining(a)]
            if not targets:
                failed[name] = "no live agent that is not draining to move it to"
                continue
            target = min(targets, key=lambda a: (self._instance_count(a), a))
            # The fence must not stop the worker here before the replacement
            # answers (the target's copy names us in moved_from at once).
            self.handing_over.add(name)
            try:
                answer = await self.adopt_on(target, document, moved_from=self.agent_id, wait=True)
            except SCSError as e:
                failed[name] = e.message
                self.handing_over.discard(name)
                continue
            if document["is_enabled"] and not answer.get("ready"):
                failed[name] = f"its replacement on {target} did not answer a ping; the worker here stays"
                self.handing_over.discard(name)
                continue
            # The replacement answers: now the old worker may stop.  Its dq.
            # queue stays, the replacement consumes it.
            self.local.drop_moved([name])
            self.handing_over.discard(name)
            moved.append(name)
            self._placed[target] = self._placed.get(target, 0) + 1
            log.info(
                "drained {instance} to {target}", instance=name, target=target, agent=self.agent_id, event="drain.moved"
            )
        self._placed.clear()
        return {"agent": self.agent_id, "draining": True, "instances": moved, "failed": failed}

    def _instance_count(self, agent_id: str) -> int:
        member = self.srs.membership.get(agent_id) if self.srs is not None else None
        return getattr(member, "instances", 0) + self._placed.get(agent_id, 0)

    # -- every instance of an app ---------------------------------------------

    async def app_instances(self, app: str, operation: str, rolling: bool = False) -> Reply:
        """``enable``, ``disable`` or ``restart`` every instance of ``app`` in
        the cluster: ``{"instances": [names], "failed": {name: why}}``.

        A plain restart restarts them all at once, each agent its own.  A
        rolling one (:meth:`_rolling_restart`) replaces one at a time."""
        if operation not in ("enable", "disable", "restart"):
            raise ValueError(operation)

        async def run() -> Reply:
            await self._require_app(app)
            if operation == "restart" and rolling:
                return await self._rolling_restart(app)
            local = _as_deferred(getattr(self.local, f"app_{operation}")(app))
            # An agent restarting its workers answers once they are ready.
            wait = self.local.stop_timeout + self.local.ready_timeout + self.call_timeout
            results, missing = await self._gather(f"app_{operation}", {"app": app}, None, timeout=wait)
            results[self.agent_id] = await local
            instances: list[str] = []
            failed: dict[str, str] = {}
            for agent in sorted(results):
                answer = results[agent]
                if isinstance(answer, dict):
                    instances += answer.get("instances", [])
                    failed.update(answer.get("failed", {}))
            return Reply({"instances": sorted(set(instances)), "failed": failed}, missing=missing)

        label = f"App.{operation}" + (" rolling" if rolling else "")
        return await self._logged(label, {"app": app}, run())

    async def _require_app(self, app: str) -> None:
        if self.store.has_app(app):
            return
        if self._clustered():
            answers, _missing = await self.srs.scatter("app_get", {"app": app})
            if any(isinstance(answer, dict) for answer in answers.values()):
                return
        raise NotFound(f"no app named {app!r}", app=app)

    async def _rolling_restart(self, app: str) -> Reply:
        """Restart the app's enabled instances one at a time, cluster-wide,
        each only once the previous one's new worker answered a ping; so at
        every moment all but one of them can work.  A worker that does not
        come back stops the roll: it is ``failed`` and the rest ``skipped``."""
        details, missing = await self._gather("instance_details", {"app": app}, self.local.instance_details(app))
        owners: dict[str, str] = {}
        for agent in sorted(details):
            for instance in details[agent]:
                if instance["is_enabled"]:
                    owners.setdefault(instance["name"], agent)
        restarted: list[str] = []
        failed: dict[str, str] = {}
        skipped: list[str] = []
        step_timeout = self.local.stop_timeout + self.local.ready_timeout + self.call_timeout
        for index, name in enumerate(sorted(owners), start=1):
            if failed:
                skipped.append(name)
                continue
            agent = owners[name]
            try:
                if agent == self.agent_id:
                    body = await self.local.instance_restart_ready(name, app)
                else:
                    body = await self.srs.call(
                        agent, "instance_restart_ready", {"name": name, "app": app}, timeout=step_timeout
                    )
            except SCSError as e:
                failed[name] = e.message
            else:
                if body.get("ready"):
                    restarted.append(name)
                else:
                    failed[name] = (
                        f"its new worker did not answer a ping within {self.local.ready_timeout:g} s "
                        f"(state {body.get('state')})"
                    )
            log.info(
                "rolling restart of {app}: {name} on {agent} ({index}/{total}) {outcome}",
                app=app,
                name=name,
                agent=agent,
                index=index,
                total=len(owners),
                outcome="failed: " + failed[name] if name in failed else "ready",
                event="app.rolling_restart.step",
            )
        body = {"instances": restarted, "failed": failed, "skipped": skipped}
        return Reply(body, missing=missing)

    async def queue_declare(self, app: str, binding: QueueBinding) -> Reply:
        async def run() -> Reply:
            # A queue lives on the agent it was declared on; re-declaring it
            # updates that one rather than making a second.
            if self.store.find_queue(app, binding.name) is None and self._clustered():
                answers, _missing = await self.srs.scatter("queue_get", {"app": app, "name": binding.name})
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
            results, missing = await self._gather("queue_list", {"app": app}, self.local.queue_list(app))
            names = sorted({name for result in results.values() for name in result})
            return Reply(names, missing=missing)

        return await self._logged("Queue.list", {"app": app}, run())

    async def queue_operation(self, operation: str, app: str, name: str) -> Reply:
        arguments = {"app": app, "name": name}

        async def run() -> Reply:
            if self.store.find_queue(app, name) is not None or not self._clustered():
                return Reply(await _as_deferred(getattr(self.local, operation)(**arguments)))
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
    return succeed(result)
