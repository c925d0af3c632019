"""Operations on every instance of an app, wherever in the cluster it runs.

Enable, disable and restart an app's instances all at once, each agent its
own (a scatter of ``LocalAgent.app_enable`` ...); a rolling restart led by
the agent asked, one instance at a time through its owner (also how an
app's new settings reach its running workers, ``Agent.app_put``); and the
app's instance objects of every agent, a dead agent's not moved yet among
them (the autoscaler counts them, ``GET /<app>/?details`` lists them).
:class:`AppWide` does these for the cluster façade (``scs.agent.Agent``,
which keeps ``app_instances`` for the HTTP API).  It was part of the
façade and is its own class, built with this agent's ``LocalAgent``, its
``Peers``, its ``Custody`` (the orphans) and the façade's
``OperationLog``.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from scs.custody import Custody
from scs.errors import SCSError
from scs.local import LocalAgent
from scs.operation_log import OperationLog
from scs.peers import Peers
from scs.reply import Reply, as_deferred

# The façade's log lines, wherever its code now lives.
log = Logger(namespace="scs.agent")


class AppWide:
    """An app's instances across the cluster; see the module docstring."""

    def __init__(
        self,
        local: LocalAgent,
        peers: Peers,
        custody: Custody,
        logged: OperationLog,
        call_timeout: float,
    ) -> None:
        self.local = local
        self.peers = peers
        self.custody = custody
        self.logged = logged
        self.call_timeout = call_timeout

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    async def apply(self, app: str, operation: str, rolling: bool = False) -> Reply:
        """``enable``, ``disable`` or ``restart`` every instance of ``app`` in
        the cluster: ``{"instances": [names], "failed": {name: why}}``.

        A plain restart restarts them all at once, each agent its own.  A
        rolling one (:meth:`rolling_restart`) replaces one at a time."""
        if operation not in ("enable", "disable", "restart"):
            raise ValueError(operation)

        async def run() -> Reply:
            await self.peers.require_app(app)
            if operation == "restart" and rolling:
                return await self.rolling_restart(app)
            local = as_deferred(getattr(self.local, f"app_{operation}")(app))
            # An agent restarting its workers answers once they are ready.
            wait = self.local.stop_timeout + self.local.ready_timeout + self.call_timeout
            results, missing = await self.peers.gather(f"app_{operation}", {"app": app}, None, timeout=wait)
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
        return await self.logged(label, {"app": app}, run())

    async def rolling_restart(self, app: str) -> Reply:
        """Restart the app's enabled instances one at a time, cluster-wide,
        each only once the previous one's new worker answered a ping; so at
        every moment all but one of them can work.  A worker that does not
        come back stops the roll: it is ``failed`` and the rest ``skipped``."""
        details, missing = await self.peers.gather("instance_details", {"app": app}, self.local.instance_details(app))
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
                    body = await self.peers.srs.call(
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

    async def instance_objects(self, app: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
        """Every instance object of ``app`` in the cluster, one per name (a
        dead agent's not moved yet from our copy of them, ``orphaned``):
        (instances, agents missing).  Unlogged: the autoscaler asks every
        interval; ``Agent.instance_list_details`` is the logged API operation."""
        results, missing = await self.peers.gather("instance_details", {"app": app}, self.local.instance_details(app))
        seen: set[str] = set()
        instances = []
        for agent in sorted(results):
            for instance in sorted(results[agent], key=lambda i: i["name"]):
                if instance["name"] not in seen:
                    seen.add(instance["name"])
                    instances.append(instance)
        for orphan in sorted(self.custody.orphans(app), key=lambda i: i["name"]):
            if orphan["name"] not in seen:
                seen.add(orphan["name"])
                instances.append(orphan)
        return instances, missing
