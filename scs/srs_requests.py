"""Requests this agent is waiting on: calls to one agent, scatters to all.

Each is keyed by its correlation id and bounded by a timer on the injected
clock.  A reply is taken only from the agent a call was sent to, and only
once per agent for a scatter; what does not match is refused (the caller
counts it).  No I/O here: ``scs.srs.SRS`` sends and receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from scs.errors import GatewayTimeout, SCSError, Unavailable


@attr.s(auto_attribs=True)
class PendingCall:
    deferred: Deferred
    agent_id: str
    op: str
    timer: Any


@attr.s(auto_attribs=True)
class PendingScatter:
    deferred: Deferred
    op: str
    expected: set[str]
    timer: Any
    results: dict[str, Any] = attr.Factory(dict)
    # Peers not waited for (suspects), reported missing unless they answer.
    skipped: list[str] = attr.Factory(list)


# Called when a scatter ends: (op, agents that were waited for and did not
# answer, every agent reported missing).
ScatterEnded = Callable[[str, set[str], list[str]], None]


class PendingRequests:
    def __init__(self, clock: IReactorTime, scatter_ended: ScatterEnded) -> None:
        self._clock = clock
        self._scatter_ended = scatter_ended
        self._calls: dict[str, PendingCall] = {}
        self._scatters: dict[str, PendingScatter] = {}

    def call(self, correlation_id: str, agent_id: str, op: str, timeout: float) -> Deferred:
        d = Deferred(lambda _: self._forget(self._calls, correlation_id))
        timer = self._clock.callLater(timeout, self._call_timed_out, correlation_id)
        self._calls[correlation_id] = PendingCall(d, agent_id, op, timer)
        return d

    def scatter(self, correlation_id: str, op: str, expected: set[str], skipped: list[str], timeout: float) -> Deferred:
        """Fires ``({agent: result or SCSError}, missing)``; see ``SRS.scatter``."""
        d = Deferred(lambda _: self._forget(self._scatters, correlation_id))
        timer = self._clock.callLater(timeout, self.finish_scatter, correlation_id)
        self._scatters[correlation_id] = PendingScatter(d, op, expected, timer, skipped=skipped)
        return d

    def take_call(self, correlation_id: str) -> PendingCall | None:
        """The pending call, no longer pending (its timer cancelled)."""
        pending = self._calls.pop(correlation_id, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def fail_call(self, correlation_id: str, error: SCSError) -> None:
        pending = self.take_call(correlation_id)
        if pending is not None:
            pending.deferred.errback(error)

    def reply(self, sender: str, correlation_id: str, outcome: Any) -> bool:
        """Hand a reply to what waits for it; False when nothing does."""
        call = self._calls.get(correlation_id)
        if call is not None and call.agent_id == sender:
            self.take_call(correlation_id)
            if isinstance(outcome, SCSError):
                call.deferred.errback(outcome)
            else:
                call.deferred.callback(outcome)
            return True
        scatter = self._scatters.get(correlation_id)
        if scatter is not None and sender not in scatter.results:
            scatter.results[sender] = outcome
            if scatter.expected <= scatter.results.keys():
                self.finish_scatter(correlation_id)
            return True
        return False

    def finish_scatter(self, correlation_id: str) -> None:
        pending = self._forget(self._scatters, correlation_id)
        if pending is None:
            return
        silent = pending.expected - pending.results.keys()
        missing = sorted(silent | (set(pending.skipped) - pending.results.keys()))
        self._scatter_ended(pending.op, silent, missing)
        pending.deferred.callback((pending.results, missing))

    def fail_all(self, why: str) -> None:
        """Calls fail with Unavailable; scatters end with what they have."""
        for correlation_id in list(self._calls):
            self.fail_call(correlation_id, Unavailable(why, agent=self._calls[correlation_id].agent_id))
        for correlation_id in list(self._scatters):
            self.finish_scatter(correlation_id)

    def _call_timed_out(self, correlation_id: str) -> None:
        pending = self._calls.pop(correlation_id, None)
        if pending is not None:
            pending.deferred.errback(
                GatewayTimeout(f"agent {pending.agent_id} did not answer {pending.op} in time", agent=pending.agent_id)
            )

    @staticmethod
    def _forget(table: dict[str, Any], correlation_id: str) -> Any:
        pending = table.pop(correlation_id, None)
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending
