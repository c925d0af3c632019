"""Which agent has an instance, and moving instances between agents.

An instance lives on one agent.  When that agent dies its instances are
moved (``scs.failover`` decides when), and when it is drained it hands
them over itself; meanwhile the others list them from their copy of its
documents (``scs.replica``).  :class:`Custody` is this agent's part in
that: the dead agents' instances not moved yet (``orphaned``) and where
the moved ones went, who has a name now, the one-at-a-time adoption on the
coordinator, and the drain.  It was the cluster façade's (``scs.agent``)
and is its own class so that the failover, the fence and the façade use
one object built with what it needs: this agent's ``LocalAgent``, its
``Peers``, the ``Placement`` (coordinator, name locks, live agents) and
the façade's timeouts.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from scs.errors import NotFound, SCSError, Unavailable
from scs.local import LocalAgent
from scs.peers import Peers
from scs.placement import Placement
from scs.records import BrokerInfo
from scs.reply import Reply
from scs.store import Store

# The façade's log lines, wherever its code now lives.
log = Logger(namespace="scs.agent")


class Custody:
    """Instances across agents: orphans, owners, adoption and drain; see
    the module docstring."""

    def __init__(
        self,
        local: LocalAgent,
        peers: Peers,
        placement: Placement,
        call_timeout: float,
        create_timeout: float,
    ) -> None:
        self.local = local
        self.peers = peers
        self.placement = placement
        self.call_timeout = call_timeout
        self.create_timeout = create_timeout
        # Instances a drain sent to each agent (its heartbeat lags behind).
        self._placed: dict[str, int] = {}
        # Instances this agent's drain is moving: kept until the replacement answers.
        self.handing_over: set[str] = set()

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    @property
    def store(self) -> Store:
        return self.local.store

    @property
    def srs(self) -> Any:
        return self.peers.srs

    # -- the dead agents' instances ------------------------------------------

    def may_hold(self, agent_id: str, name: str) -> bool:
        """Whether an agent we cannot ask may have instance ``name``: its
        copy here says, if we have one."""
        if agent_id not in self.store.replicas.digests():
            return True
        documents = self.store.replicas.instances(agent_id).get(agent_id, [])
        return any(document["name"] == name for document in documents)

    def orphans(self, app: str | None = None) -> list[dict[str, Any]]:
        """Instances of dead agents not moved yet, as instance objects with
        ``state: "orphaned"`` (from this agent's copy of them).  None while
        this agent is cut off from the cluster: then its peers are missing,
        not dead, and a listing names them in its missing-agents header."""
        if self.srs is None or not self.srs.sees_the_cluster():
            return []
        found = []
        for owner, documents in self.store.replicas.instances().items():
            if self.peers.peer_alive(owner):
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

    def whereabouts(self, dead: str) -> dict[str, Any]:
        """What a dead agent held: ``orphaned`` (not moved: our copy of
        them) and ``moved`` (instance -> the live agent that took it)."""
        moved = {spec.name: self.agent_id for spec in self.store.list_nodes() if spec.moved_from == dead}
        orphaned = []
        for owner, documents in self.store.replicas.instances().items():
            for document in documents:
                if owner == dead:
                    orphaned.append(document["name"])
                elif document["moved_from"] == dead and self.peers.peer_alive(owner):
                    moved.setdefault(document["name"], owner)
        orphaned = sorted(set(orphaned) - set(moved))
        return {"orphaned": orphaned, "moved": dict(sorted(moved.items()))}

    # -- moving an instance ----------------------------------------------------

    def app_deleted(self, app: str) -> bool:
        """Whether ``app`` was deleted here (a tombstone, the app not made
        again since): its instances are not to be adopted anywhere."""
        return not self.store.has_app(app) and self.store.revisions.of(app)[1] is not None

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
        if not self.peers.clustered():
            return owners
        answers, missing = await self.srs.scatter("instances_owned", {"names": names})
        if missing:
            return None
        for agent in sorted(answers):
            if isinstance(answers[agent], list):
                for name in answers[agent]:
                    owners.setdefault(name, agent)
        return owners

    async def adopt_on(self, target: str, document: dict[str, Any], *, moved_from: str, wait: bool) -> dict[str, Any]:
        """Have ``target`` take over an instance (a failover or a drain)."""
        if target == self.agent_id:
            return await self.local.instance_adopt(document, moved_from, wait)
        arguments = {"document": document, "moved_from": moved_from, "wait": wait}
        timeout = self.create_timeout if wait else self.call_timeout
        return await self.srs.call(target, "instance_adopt", arguments, timeout=timeout)

    # -- drain -------------------------------------------------------------------

    async def drain(self, agent_id: str, undrain: bool = False) -> Reply:
        """Drain (or undrain) ``agent_id``: here, or by asking it; the
        façade logs it as ``Agent.drain`` (``Agent.undrain``)."""
        if agent_id == self.agent_id:
            if undrain:
                return Reply(self.local_undrain())
            return Reply(await self.local_drain())
        if not self.peers.peer_alive(agent_id):
            if self.srs is not None and self.srs.membership.get(agent_id) is not None:
                raise Unavailable(f"agent {agent_id!r} is not alive", agent=agent_id)
            raise NotFound(f"no agent {agent_id!r} in the cluster", agent=agent_id)
        operation = "agent_undrain" if undrain else "agent_drain"
        timeout = self.call_timeout + (0 if undrain else 60 * self.create_timeout)
        return Reply(await self.srs.call(agent_id, operation, {}, timeout=timeout))

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
            targets = [a for a in self.placement.live_agents() if a != self.agent_id and not self.peers.is_draining(a)]
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
