"""The cluster's operations on autoscaling policies.

A policy (``scs.autoscaling``) is kept by every agent, like its app:
``PUT``, ``GET`` and ``DELETE /<app>/autoscaling/`` act here and on every
live agent, the change with a revision given here, and a deletion leaves a
tombstone; an agent that missed a change (down, or cut off) gets it as it
gets the apps' (``scs.app_sync``: the policies are in ``app_state``).
:class:`AutoscalingPolicies` answers those operations for the cluster
façade (``scs.agent.Agent``, which keeps their names for the HTTP API and
the admin page).  It was part of the façade and is its own class so that
the façade stays the router it is; it is built with this agent's
``LocalAgent``, its ``Peers``, the ``Placement`` (which agent decides) and
the façade's ``OperationLog``.
"""

from __future__ import annotations

from typing import Any

from scs.errors import BadParameter, NotFound, Unavailable
from scs.local import LocalAgent
from scs.operation_log import OperationLog
from scs.peers import Peers
from scs.placement import Placement
from scs.reply import Reply
from scs.store import Store
from scs.store_revisions import POLICY
from scs.validation import DEFAULT_POLICY, check_policy


class AutoscalingPolicies:
    """Autoscaling policies across the cluster; see the module docstring."""

    def __init__(
        self,
        local: LocalAgent,
        peers: Peers,
        placement: Placement,
        logged: OperationLog,
        call_timeout: float,
    ) -> None:
        self.local = local
        self.peers = peers
        self.placement = placement
        self.logged = logged
        self.call_timeout = call_timeout

    @property
    def store(self) -> Store:
        return self.local.store

    async def put(self, app: str, fields: dict[str, Any]) -> Reply:
        """``PUT /<app>/autoscaling/``: the ``fields`` given (each checked
        by ``check_policy_fields``) over the stored policy, or over the
        defaults for a first one; the whole checked, its queue known; then
        stored here and on every live agent."""

        async def run() -> Reply:
            await self.peers.require_app(app)
            current = self.store.policies.get(app) if self.store.has_app(app) else None
            base = current.to_json() if current is not None else dict(DEFAULT_POLICY)
            base.pop("app", None)
            policy = check_policy({**base, **fields}, given=fields)
            await self._require_queue(app, policy["queue"])
            # This agent gives the change its revision; every agent stores
            # the policy with it (scs.app_sync).
            revision = self.store.revisions.next(app, POLICY)
            created = current is None
            if self.store.has_app(app):
                created = self.local.autoscaling_put(app, **policy, revision=revision)["created"]
            missing: tuple[str, ...] = self.peers.missing()
            if self.peers.clustered():
                _answers, missing = await self.peers.scatter_change(
                    "autoscaling_put", {"app": app, **policy, "revision": revision}, timeout=self.call_timeout
                )
            body = {"app": app, **policy}
            return Reply(body, status=201 if created else 200, missing=missing)

        return await self.logged("App.autoscaling_put", {"app": app, **fields}, run())

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

    async def get(self, app: str) -> Reply:
        """The policy with ``decision``: the last decision of the agent
        that decides (null when there is none yet, or it cannot be asked)."""

        async def run() -> Reply:
            await self.peers.require_app(app)
            missing: tuple[str, ...] = ()
            try:
                body = self.local.autoscaling_get(app)
            except NotFound:
                if not self.peers.clustered():
                    raise
                answers, missing_list = await self.peers.srs.scatter("autoscaling_get", {"app": app})
                missing = tuple(missing_list)
                found = [answers[a] for a in sorted(answers) if isinstance(answers[a], dict)]
                if not found:
                    raise
                body = found[0]
            body["decision"] = await self.decision(app)
            return Reply(body, missing=missing)

        return await self.logged("App.autoscaling_get", {"app": app}, run())

    async def decision(self, app: str) -> dict[str, Any] | None:
        """The last decision about ``app`` of the agent that decides."""
        decider = self.placement.coordinator()
        if decider == self.local.agent_id:
            return self.local.autoscaling_status(app)
        try:
            return await self.peers.srs.call(decider, "autoscaling_status", {"app": app}, timeout=self.call_timeout)
        except Exception:  # noqa: BLE001 - the decision is shown when it can be had
            return None

    async def delete(self, app: str) -> Reply:
        async def run() -> Reply:
            # Every agent keeps a tombstone at this revision (scs.app_sync).
            revision = self.store.revisions.next(app, POLICY)
            deleted = self.local.autoscaling_delete(app, revision=revision)["deleted"]
            missing: tuple[str, ...] = self.peers.missing()
            if self.peers.clustered():
                answers, missing = await self.peers.scatter_change(
                    "autoscaling_delete", {"app": app, "revision": revision}, timeout=self.call_timeout
                )
                deleted = deleted or any(isinstance(a, dict) and a.get("deleted") for a in answers.values())
            if not deleted:
                await self.peers.require_app(app)
                raise NotFound(f"app {app!r} has no autoscaling policy", app=app)
            return Reply({"ok": "ok", "app": app}, missing=missing)

        return await self.logged("App.autoscaling_delete", {"app": app}, run())
