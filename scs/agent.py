"""The façade the API, the admin page and the manhole call.

``Agent`` answers every operation for the whole cluster: it runs it here
(``scs.local.LocalAgent``) when this agent owns the instance or queue, sends
it to the owner over SRS when another agent does, creates instances through
``scs.placement``, and merges cluster-wide listings.  Without SRS it is the
local agent alone.

It builds its parts, each in a module of its own: ``scs.peers`` (listings
across the live agents), ``scs.operation_log`` (every operation's two log
lines), ``scs.custody`` (instances across agents: orphans, adoption,
drain), ``scs.autoscaling_policies`` and ``scs.app_wide``.  Of what they
answer it keeps the names the surfaces, the manhole and the peers call
(``drain``, ``app_instances``, ``autoscaling_*``), as one-line calls.

Operations take validated values and return ``Reply`` objects: a JSON-able
body, the HTTP status and the agents that did not answer a listing.
"""

from __future__ import annotations

import random as _random
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from scs.app_sync import AppSync
from scs.app_wide import AppWide
from scs.autoscaling_policies import AutoscalingPolicies
from scs.custody import Custody
from scs.errors import NotFound, Unavailable
from scs.local import (  # noqa: F401 - re-exported: the surfaces build agents from here
    DEFAULT_READY_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    LocalAgent,
    instance_json,
    queue_json,
)
from scs.membership import DEFAULT_FORGET_AFTER
from scs.operation_args import OPERATIONS, check_operation
from scs.operation_log import OperationLog
from scs.peers import Peers
from scs.placement import Placement
from scs.records import UNSET, BrokerInfo, QueueBinding
from scs.reply import Reply, as_deferred
from scs.store import Store

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
        forget_dead_after: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        self.local = local
        self.srs = srs
        self.url = url
        self.random = random or _random.Random()
        self.call_timeout = call_timeout
        self.create_timeout = create_timeout or local.ready_timeout + 5.0
        # The parts it answers with (each module says why it is apart).
        self.peers = Peers(local, srs)
        self._logged = OperationLog(local.agent_id)
        self.placement = Placement(local, srs, self.random, call_timeout, self.create_timeout)
        self.custody = Custody(local, self.peers, self.placement, call_timeout, self.create_timeout)
        self.placement.draining = self.peers.is_draining
        self.placement.may_hold = self.custody.may_hold
        self.policies = AutoscalingPolicies(local, self.peers, self.placement, self._logged, call_timeout)
        self.app_wide = AppWide(local, self.peers, self.custody, self._logged, call_timeout)
        self.app_sync = AppSync(local, self.peers, call_timeout, forget_after=forget_dead_after)

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    @property
    def store(self) -> Store:
        return self.local.store

    @property
    def supervisor(self) -> Any:
        return self.local.supervisor

    # -- peers -------------------------------------------------------------

    def handle_remote(self, operation: str, arguments: dict[str, Any]) -> Deferred:
        """Run an operation a peer sent us (SRS handler), once its arguments
        passed the API's own validators."""

        def run() -> Deferred:
            if operation == "instance_create_named":
                return Deferred.fromCoroutine(self.placement.create_named_for_peer(arguments))
            clean = check_operation(operation, arguments)
            if operation == "instance_adopt_once":
                return Deferred.fromCoroutine(
                    self.custody.adopt_once(clean["target"], clean["document"], clean["moved_from"])
                )
            if operation == "agent_drain":
                return Deferred.fromCoroutine(self.drain(self.agent_id)).addCallback(lambda reply: reply.body)
            if operation == "agent_undrain":
                return Deferred.fromCoroutine(self.drain(self.agent_id, undrain=True)).addCallback(
                    lambda reply: reply.body
                )
            ours = self._ours(operation, clean)
            result = as_deferred(getattr(self.local, operation)(**clean))
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

    async def _on_owner(self, name: str, operation: str, arguments: dict[str, Any]) -> Reply:
        """Run an instance operation where the instance lives.  When the
        owner cannot be asked the answer is 503, not 404: the instance may
        well exist on an agent we cannot reach."""
        if self.local.instance_owned(name) or self.srs is None:
            body = await as_deferred(getattr(self.local, operation)(**arguments))
            return Reply(body, missing=self.peers.missing())
        if not self.srs.is_connected():
            raise Unavailable(
                f"instance {name!r} is not on this agent, and the cluster cannot be reached",
                instance=name,
                missing_agents=list(self.peers.missing()),
            )
        answers, missing = await self.srs.scatter(operation, arguments, timeout=self.call_timeout)
        answer = _owners_answer(answers)
        if answer is not None:
            return Reply(answer, missing=tuple(missing))
        # The instance may have been created here while we asked.
        if self.local.instance_owned(name):
            body = await as_deferred(getattr(self.local, operation)(**arguments))
            return Reply(body)
        # An agent that holds instances and cannot be asked may have it.
        missing = sorted({*missing, *(a for a in self.srs.absent_holders() if self.custody.may_hold(a, name))})
        if operation == "instance_get":
            orphan = next((o for o in self.custody.orphans() if o["name"] == name), None)
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
                row["draining"] = self.peers.is_draining(row["id"])
                if not row["alive"]:
                    row.update(self.custody.whereabouts(row["id"]))
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
            # This agent gives a change its revision; every agent stores the
            # whole settings with it (scs.app_sync).
            result = self.local.app_put(**arguments_json, roll=True)
            item = self.local.app_item(app)
            changed = result["changed"]
            missing: tuple[str, ...] = self.peers.missing()
            if self.peers.clustered() and not result["created"]:
                # Apps live on every agent.  Each must have the new settings
                # before the rolling restart below reaches its workers.
                answers, missing = await self.peers.scatter_change(
                    "app_put", {**item, "roll": True}, timeout=self.call_timeout
                )
                changed = changed or any(isinstance(a, dict) and a.get("changed") for a in answers.values())
            elif self.srs is not None:
                self.peers.broadcast_change("app_put", item)
            body = result["app"]
            if changed:
                # New settings reach running workers by a rolling restart.
                rolled = await self.app_wide.rolling_restart(app)
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
                if not self.peers.clustered():
                    raise
            answers, missing = await self.srs.scatter("app_get", {"app": app})
            for answer in answers.values():
                if isinstance(answer, dict):
                    return Reply(answer, missing=tuple(missing))
            raise NotFound(f"no app named {app!r}", app=app)

        return await self._logged("App.get", {"app": app}, run())

    async def app_delete(self, app: str) -> Reply:
        async def run() -> Reply:
            # Every agent keeps a tombstone at this revision (scs.app_sync).
            revision = self.store.revisions.next(app)
            local = self.local.app_delete(app, revision=revision)
            deleted = local["deleted"]
            instances = list(local["instances"])
            missing: tuple[str, ...] = self.peers.missing()
            if self.peers.clustered():
                answers, missing = await self.peers.scatter_change(
                    "app_delete", {"app": app, "revision": revision}, timeout=self.call_timeout
                )
                for answer in answers.values():
                    if isinstance(answer, dict):
                        deleted = deleted or answer["deleted"]
                        instances.extend(answer["instances"])
            if not deleted:
                raise NotFound(f"no app named {app!r}", app=app)
            return Reply({"ok": "ok", "app": app, "instances": sorted(instances)}, missing=missing)

        return await self._logged("App.delete", {"app": app}, run())

    async def sync_apps_from_peers(self) -> None:
        """Merge the apps and autoscaling policies of the cluster here (an
        agent that connects): what is newer there, changes and deletions,
        wins (scs.app_sync)."""
        if not self.peers.clustered():
            return
        await self.app_sync.pull_all()

    # -- autoscaling policies (scs.autoscaling_policies), named for the surfaces --

    async def autoscaling_put(self, app: str, fields: dict[str, Any]) -> Reply:
        return await self.policies.put(app, fields)

    async def autoscaling_get(self, app: str) -> Reply:
        return await self.policies.get(app)

    async def autoscaling_delete(self, app: str) -> Reply:
        return await self.policies.delete(app)

    async def autoscaling_decision(self, app: str) -> dict[str, Any] | None:
        return await self.policies.decision(app)

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
            results, missing = await self.peers.gather("instance_list", {"app": app}, self.local.instance_list(app))
            names: list[str] = []
            seen = set()
            for agent in sorted(results):
                for name in results[agent]:
                    if name not in seen:
                        seen.add(name)
                        names.append(name)
            names += sorted({o["name"] for o in self.custody.orphans(app)} - seen)
            return Reply(names, missing=missing)

        return await self._logged("Node.list", {"app": app}, run())

    async def app_list(self) -> Reply:
        """The names of the apps known to the cluster."""

        async def run() -> Reply:
            results, missing = await self.peers.gather("app_names", {}, self.local.app_names())
            return Reply(sorted({name for names in results.values() for name in names}), missing=missing)

        return await self._logged("App.list", {}, run())

    async def instance_list_details(self, app: str) -> Reply:
        """Every instance object of ``app`` on every agent, in one scatter."""

        async def run() -> Reply:
            instances, missing = await self.app_wide.instance_objects(app)
            return Reply(instances, missing=missing)

        return await self._logged("Node.list", {"app": app, "details": True}, run())

    async def instance_details(self) -> tuple[dict[str, list[dict[str, Any]]], tuple[str, ...]]:
        """Every instance of every agent, by agent (for the admin page)."""
        return await self.peers.gather("instance_details", {}, self.local.instance_details())

    async def instance_operation(self, operation: str, name: str, app: str | None = None, **extra: Any) -> Reply:
        arguments = {"name": name, "app": app, **extra}
        return await self._logged(f"Node.{operation}", arguments, self._on_owner(name, operation, arguments))

    # -- drain (scs.custody) and app-wide operations (scs.app_wide), named for the surfaces --

    async def drain(self, agent_id: str, undrain: bool = False) -> Reply:
        """``POST /agents/<id>/drain`` (or ``undrain``), run by that agent."""
        label = "Agent.undrain" if undrain else "Agent.drain"
        return await self._logged(label, {"agent": agent_id}, self.custody.drain(agent_id, undrain))

    async def app_instances(self, app: str, operation: str, rolling: bool = False) -> Reply:
        return await self.app_wide.apply(app, operation, rolling)

    async def queue_declare(self, app: str, binding: QueueBinding) -> Reply:
        async def run() -> Reply:
            # A queue lives on the agent it was declared on; re-declaring it
            # updates that one rather than making a second.
            if self.store.find_queue(app, binding.name) is None and self.peers.clustered():
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
            results, missing = await self.peers.gather("queue_list", {"app": app}, self.local.queue_list(app))
            names = sorted({name for result in results.values() for name in result})
            return Reply(names, missing=missing)

        return await self._logged("Queue.list", {"app": app}, run())

    async def queue_operation(self, operation: str, app: str, name: str) -> Reply:
        arguments = {"app": app, "name": name}

        async def run() -> Reply:
            if self.store.find_queue(app, name) is not None or not self.peers.clustered():
                return Reply(await as_deferred(getattr(self.local, operation)(**arguments)))
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
