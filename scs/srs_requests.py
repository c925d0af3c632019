"""Requests this agent is waiting on: calls to one agent, scatters to all.

Each is keyed by its correlation id and bounded by a timer on the injected
clock.  A reply is taken only from the agent a call was sent to, and for a
scatter only from an agent it was sent to, once each; what does not match
is refused (the caller counts it).  A scatter's request goes to each agent
by its own key, mandatory: one the broker returns (no queue: the agent is
gone) is ``unreachable`` and not waited for.  The broker may still route
one to a queue it is about to drop (the agent was killed a moment ago): so
a scatter that still waits after ``CHECK_AFTER`` hands its silent peers to
``check_silent`` (which probes them, mandatory), again at doubling delays,
and a peer found ``gone`` is not waited for by any scatter.  No I/O here:
``scs.srs.SRS`` sends and receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from scs.errors import GatewayTimeout, SCSError, Unavailable

# A scatter still waiting this long after it was sent checks its silent
# peers' queues (then after 2x, 4x...): answers on a loopback broker take a
# few ms, a killed agent's queue is gone within a few more.
CHECK_AFTER = 0.05


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
    # Peers the request could not reach (returned, or not sent): missing.
    unreachable: set[str] = attr.Factory(set)
    # The next check of the silent peers' queues, and the delay after it.
    check: Any = None
    check_delay: float = CHECK_AFTER

    def silent(self) -> list[str]:
        return sorted(self.expected - self.results.keys() - self.unreachable)

    def asked(self, agent_id: str) -> bool:
        return agent_id in self.expected or agent_id in self.skipped

    def complete(self) -> bool:
        return self.expected <= self.results.keys() | self.unreachable


# Called when a scatter ends: (op, agents that were waited for and did not
# answer, every agent reported missing).
ScatterEnded = Callable[[str, set[str], list[str]], None]


class PendingRequests:
    def __init__(
        self,
        clock: IReactorTime,
        scatter_ended: ScatterEnded,
        check_silent: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._clock = clock
        self._scatter_ended = scatter_ended
        self._check_silent = check_silent
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
        scatter = self._scatters[correlation_id] = PendingScatter(d, op, expected, timer, skipped=skipped)
        if self._check_silent is not None and CHECK_AFTER < timeout:
            scatter.check = self._clock.callLater(CHECK_AFTER, self._check, correlation_id)
        return d

    def _check(self, correlation_id: str) -> None:
        scatter = self._scatters.get(correlation_id)
        if scatter is None or self._check_silent is None:
            return
        scatter.check_delay *= 2
        scatter.check = self._clock.callLater(scatter.check_delay, self._check, correlation_id)
        self._check_silent(scatter.silent())

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
        if scatter is not None and scatter.asked(sender) and sender not in scatter.results:
            scatter.results[sender] = outcome
            if scatter.complete():
                self.finish_scatter(correlation_id)
            return True
        return False

    def unreachable(self, correlation_id: str, agent_id: str) -> None:
        """A scatter's request did not reach ``agent_id``: stop waiting for it."""
        scatter = self._scatters.get(correlation_id)
        if scatter is None or not scatter.asked(agent_id) or agent_id in scatter.results:
            return
        scatter.unreachable.add(agent_id)
        if scatter.complete():
            self.finish_scatter(correlation_id)

    def gone(self, agent_id: str) -> None:
        """``agent_id`` is known gone: no scatter waits for it any more."""
        for correlation_id in list(self._scatters):
            self.unreachable(correlation_id, agent_id)

    def finish_scatter(self, correlation_id: str) -> None:
        pending = self._forget(self._scatters, correlation_id)
        if pending is None:
            return
        silent = pending.expected - pending.results.keys() - pending.unreachable
        missing = sorted(silent | ((pending.unreachable | set(pending.skipped)) - pending.results.keys()))
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
        if pending is not None:
            for timer in (pending.timer, getattr(pending, "check", None)):
                if timer is not None and timer.active():
                    timer.cancel()
        return pending
