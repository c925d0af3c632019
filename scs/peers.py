"""What the cluster façade's parts ask of the peers, in one place.

The façade (``scs.agent.Agent``) and the parts split out of it
(``scs.custody``, ``scs.autoscaling_policies``, ``scs.app_wide``) all need
the same few things from SRS: whether the cluster can be reached, which
peers a listing could not ask, a listing run on every live agent, and whether a peer is alive or
draining.  :class:`Peers` answers them from this agent's ``LocalAgent`` and
its SRS (``None``: an agent alone), so that each part is built with it
rather than with the whole façade.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from scs.errors import NotFound
from scs.local import LocalAgent

log = Logger(namespace="scs.peers")

# What an agent of the version before app convergence refuses as an unknown
# argument of the changes it is sent (``app_put``, ``app_delete``,
# ``autoscaling_put``, ``autoscaling_delete``).
NEW_ARGUMENTS = ("revision",)


class Peers:
    """This agent's view of its peers and its listings across them; see
    the module docstring."""

    def __init__(self, local: LocalAgent, srs: Any = None) -> None:
        self.local = local
        self.srs = srs

    @property
    def agent_id(self) -> str:
        return self.local.agent_id

    def clustered(self) -> bool:
        return self.srs is not None and self.srs.is_connected()

    def missing(self) -> tuple[str, ...]:
        """Live peers we could not reach because SRS is down."""
        if self.srs is None or self.srs.is_connected():
            return ()
        return tuple(m["id"] for m in self.srs.members() if m["id"] != self.agent_id)

    async def gather(
        self, operation: str, arguments: dict[str, Any], local_result: Any, timeout: float | None = None
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Run a listing on every live agent: ({agent: result}, missing)."""
        results: dict[str, Any] = {self.agent_id: local_result}
        if self.srs is None:
            return results, ()
        if not self.srs.is_connected():
            return results, self.missing()
        if timeout is None:
            answers, missing = await self.srs.scatter(operation, arguments)
        else:
            answers, missing = await self.srs.scatter(operation, arguments, timeout=timeout)
        for agent, answer in answers.items():
            if not isinstance(answer, Exception):
                results[agent] = answer
        return results, tuple(sorted(missing))

    def understands_revisions(self, agent_id: str) -> bool:
        """Whether a peer takes the revisions of app and policy changes:
        its heartbeat carries an apps digest (``scs.app_sync``).  An agent
        of the version before has neither (a rolling upgrade)."""
        member = self.srs.membership.get(agent_id) if self.srs is not None else None
        return bool(getattr(member, "apps_digest", ""))

    def arguments_for(self, agent_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments of a change that ``agent_id`` understands: the
        one place that says so.  An older agent gets them without a
        revision (it takes the change as its own, new one)."""
        if self.understands_revisions(agent_id):
            return arguments
        return {k: v for k, v in arguments.items() if k not in NEW_ARGUMENTS}

    async def scatter_change(
        self, operation: str, arguments: dict[str, Any], timeout: float
    ) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Send a change to every live peer, each with the arguments it
        understands: ({agent: answer}, missing).  A peer that answered with
        an error did not take the change: it is logged and named in
        ``missing`` (the caller's reply says so), its answer left out."""
        answers, missing = await self.srs.scatter(
            operation, arguments, timeout=timeout, arguments_for=lambda agent: self.arguments_for(agent, arguments)
        )
        taken = {}
        refused = []
        for agent, answer in answers.items():
            if isinstance(answer, Exception):
                refused.append(agent)
                _change_refused(agent, operation, arguments, answer)
            else:
                taken[agent] = answer
        return taken, tuple(sorted({*missing, *refused}))

    def broadcast_change(self, operation: str, arguments: dict[str, Any]) -> None:
        """Fire and forget a change to every agent; an older agent (which
        refuses the broadcast's new arguments) is sent its own, not awaited."""
        self.srs.broadcast(operation, arguments)
        if not self.srs.is_connected():
            return  # dropped (SRS says so); the app sync brings it later
        for agent in self.srs.live_agents():
            if agent != self.agent_id and not self.understands_revisions(agent):
                sent = self.srs.call(agent, operation, self.arguments_for(agent, arguments))
                sent.addErrback(lambda f, agent=agent: _change_refused(agent, operation, arguments, f.value))

    async def require_app(self, app: str) -> None:
        """NotFound unless ``app`` is known here or to a peer that answers."""
        if self.local.store.has_app(app):
            return
        if self.clustered():
            answers, _missing = await self.srs.scatter("app_get", {"app": app})
            if any(isinstance(answer, dict) for answer in answers.values()):
                return
        raise NotFound(f"no app named {app!r}", app=app)

    def peer_alive(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is believed alive (this agent always is)."""
        if agent_id == self.agent_id:
            return True
        return self.clustered() and agent_id in self.srs.live_agents()

    def is_draining(self, agent_id: str) -> bool:
        if agent_id == self.agent_id:
            return self.local.draining
        member = self.srs.membership.get(agent_id) if self.srs is not None else None
        return bool(getattr(member, "draining", False))


def _change_refused(agent: str, operation: str, arguments: dict[str, Any], error: BaseException) -> None:
    """A peer did not take a change (``scatter_change``, ``broadcast_change``)."""
    log.warn(
        "{agent} did not take {operation} of {app}: {error}",
        agent=agent,
        operation=operation,
        app=arguments.get("app"),
        error=getattr(error, "message", type(error).__name__),
        event="peers.change.refused",
    )
