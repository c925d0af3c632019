"""Where a new instance goes, and deciding a name once for the cluster.

An unnamed instance gets a fresh random name and goes to a random live
agent (another is tried when one does not answer), or to agent ``on`` (the
admin page creates on its own agent).  A named instance that exists stays
where it is.  Whether it exists is decided by one agent of the cluster, the
*coordinator* (the live agent with the smallest id, the same for every
agent that sees the same members), one name at a time: the same name
created through several agents at once is one instance, and the others get
200 (same settings) or 409.  While this agent cannot reach the cluster, a
named create that is not already here is refused (503): another agent may
own it.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from scs.errors import BadParameter, Conflict, GatewayTimeout, SCSError, Unavailable
from scs.local import LocalAgent
from scs.operation_args import check_operation
from scs.reply import Reply
from scs.validation import check_name, only

log = Logger(namespace="scs.agent")


class Placement:
    """Creates instances for the cluster façade; see the module docstring."""

    def __init__(
        self,
        local: LocalAgent,
        srs: Any,
        random: _random.Random,
        call_timeout: float,
        create_timeout: float,
    ) -> None:
        self.local = local
        self.srs = srs
        self.random = random
        self.call_timeout = call_timeout
        self.create_timeout = create_timeout
        # Named creations this agent is deciding, as the coordinator.
        self._name_locks: dict[str, DeferredLock] = {}
        # Set by the façade: agents that take no placements (draining), and
        # whether an agent we cannot ask may hold an instance (its replica
        # says; without one, it may).
        self.draining: Callable[[str], bool] = lambda agent: False
        self.may_hold: Callable[[str, str], bool] = lambda agent, name: True

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    def _clustered(self) -> bool:
        return self.srs is not None and self.srs.is_connected()

    async def create(self, arguments: dict[str, Any], on: str | None) -> Reply:
        name = arguments.get("name")
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
        coordinator = self.coordinator()
        if coordinator == self.agent_id:
            return await self.create_named(arguments, on)
        result = await self.srs.call(
            coordinator,
            "instance_create_named",
            {"arguments": arguments, "on": on},
            timeout=self.create_timeout + self.call_timeout,
        )
        return Reply(result["instance"], status=result["status"])

    async def create_named_for_peer(self, request: Any) -> dict[str, Any]:
        """``instance_create_named`` from a peer that sees us as coordinator."""
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

    def coordinator(self) -> str:
        """The agent that decides named creations and failovers: the first
        live one by id, the same for every agent that sees the same members."""
        return min(self.live_agents())

    async def create_named(self, arguments: dict[str, Any], on: str | None) -> Reply:
        """On the coordinator: create a named instance unless it exists
        somewhere, one decision per name at a time."""
        name = arguments["name"]
        lock = self.name_lock(name)
        await lock.acquire()
        try:
            owner = await self._owner_of(name)
            if owner is None:
                return await self._place(arguments, on)
            if on is not None and owner != on:
                raise Conflict(f"instance {name!r} exists on agent {owner!r}", instance=name, agent=owner)
            return await self._create_on(owner, arguments)
        finally:
            self.release_name_lock(name, lock)

    def name_lock(self, name: str) -> DeferredLock:
        """The coordinator's lock of one name: one decision at a time."""
        return self._name_locks.setdefault(name, DeferredLock())

    def release_name_lock(self, name: str, lock: DeferredLock) -> None:
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
        # An agent that holds instances and cannot be asked (dead, stopped)
        # may have this one: creating it elsewhere could make a copy.
        missing = sorted({*missing, *(a for a in self.srs.absent_holders() if self.may_hold(a, name))})
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
        candidates = [agent for agent in self.live_agents() if not self.draining(agent)]
        if not candidates:
            raise Unavailable("every live agent is draining: no agent takes new instances")
        self.random.shuffle(candidates)
        # Another agent is tried when one did not get the request; after a
        # timeout only for a fresh random name: a named instance may still be
        # being created where the request went.
        retry_on = (Unavailable,) if arguments.get("name") is not None else (GatewayTimeout, Unavailable)
        last_error: SCSError | None = None
        for agent in candidates:
            try:
                return await self._create_on(agent, arguments)
            except retry_on as e:
                log.warn("placement on {agent} failed: {error}", agent=agent, error=e.message)
                last_error = e
        raise last_error or Unavailable("no live agent to place the instance on")

    def live_agents(self) -> list[str]:
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
            result = await self.srs.call(agent, "instance_create", arguments, timeout=self.create_timeout)
        if not result["created"]:
            status = 200
        elif arguments.get("nowait"):
            status = 202
        else:
            status = 201
        return Reply(result["instance"], status=status)
