"""Who is alive: batched pings of the workers of one broker, the start probe
of new workers, and whether a silent worker is to blame or its broker.

Every call here is per broker, never per worker: a Celery control call holds
a thread and two pooled broker connections, so one ping names every node of
that broker at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from scs.lifecycle import WorkerLifecycle
from scs.policy import SupervisionPolicy

COUNTED_EVENTS = frozenset({"broker.down", "broker.up", "ping.error"})
"""The ``event`` values this module logs that metrics count."""

Configure = Callable[[str, Sequence[WorkerLifecycle]], Deferred[None]]


class Health:
    """Pings on behalf of the supervisor and tells each lifecycle what it saw.

    ``starting(url)`` lists the lifecycles of that broker still starting;
    ``configure(url, lifecycles)`` corrects the queues and autoscale of
    workers that answered."""

    def __init__(
        self,
        clock: Any,
        control: Any,
        policy: SupervisionPolicy,
        log: Logger,
        starting: Callable[[str], list[WorkerLifecycle]],
        configure: Configure,
    ) -> None:
        self.clock = clock
        self.control = control
        self.policy = policy
        self.log = log
        self._starting = starting
        self._configure = configure
        # Broker URL -> when it was last seen down / came back.
        self._down: dict[str, float] = {}
        self._revived: dict[str, float] = {}
        # Broker URL -> its probe loop's next tick (None while a ping is out).
        self.probes: dict[str, IDelayedCall | None] = {}
        self._stopped = False

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        """No more probing (the agent stops)."""
        self._stopped = True
        for url, call in list(self.probes.items()):
            if call is not None and call.active():
                call.cancel()
                del self.probes[url]

    # -- a wake-up's check ----------------------------------------------------

    async def check(self, url: str, lifecycles: Sequence[WorkerLifecycle]) -> None:
        """One batched ping (backing off) for every worker of this broker,
        then the queues and autoscale of those that answered."""
        by_node = {lc.node: lc for lc in lifecycles}
        missing = set(by_node)
        broker_error = None
        for timeout in self.policy.ping_timeouts:
            self.log.info(
                "pingWithTimeout: {timeout}",
                timeout=timeout,
                broker=url,
                nodes=sorted(missing),
                event="pingWithTimeout",
            )
            sent = self.clock.seconds()
            try:
                answered = await self.control.ping(url, sorted(missing), timeout)
            except Exception as e:  # noqa: BLE001 - whatever failed, _silent asks the broker
                broker_error = e
                break
            if missing <= answered:
                self._round_trip(url, sent)
            for node in answered & missing:
                by_node[node].answered()
            missing -= answered
            if not missing:
                break
        up = [lc for node, lc in by_node.items() if node not in missing and lc.has_process]
        if missing or broker_error is not None:
            await self._silent(url, [by_node[n] for n in missing], broker_error)
        else:
            self._seen_up(url)
        if up:
            await self._configure(url, up)

    async def _silent(self, url: str, silent: list[WorkerLifecycle], error: Exception | None) -> None:
        """Some workers did not answer: blame them only if the broker is up
        and has been up for ``wait_after_broker_revived`` seconds."""
        alive = await self.control.broker_alive(url, self.policy.control_timeout)
        now = self.clock.seconds()
        if not alive:
            if url not in self._down:
                self.log.warn("{{Supervisor}} broker {broker} is down", broker=url, event="broker.down")
            self._down[url] = now
            self._revived.pop(url, None)
            return
        self._seen_up(url)
        revived = self._revived.get(url)
        if revived is not None and now - revived < self.policy.wait_after_broker_revived:
            self.log.info(
                "{{Supervisor}} broker {broker} revived {ago:.1f}s ago: not blaming silent workers",
                broker=url,
                ago=now - revived,
                event="broker.grace",
            )
            return
        if error is not None:
            # The broker accepts connections but the ping itself failed:
            # that says nothing about the workers.
            self.log.warn(
                "{{Supervisor}} ping via {broker} failed: {error}", broker=url, error=str(error), event="ping.error"
            )
            return
        for lc in silent:
            lc.missed_ping()

    def _seen_up(self, url: str) -> None:
        if url in self._down:
            del self._down[url]
            self._revived[url] = self.clock.seconds()
            self.log.info("{{Supervisor}} broker {broker} is back", broker=url, event="broker.up")

    def _round_trip(self, url: str, sent: float) -> None:
        """A ping every node answered: a round trip, not a waited-out timeout."""
        self.log.debug("ping answered in {rtt:.3f} s", rtt=self.clock.seconds() - sent, broker=url, event="ping.done")

    # -- the start probe --------------------------------------------------------

    def probe(self, url: str) -> None:
        """Make sure this broker has a probe loop: it pings every starting
        worker of the broker in one call every probe_interval until each
        answers or reaches start_timeout, so that readiness (and re-applying
        queues/autoscale after a restart) does not wait for the next
        wake-up."""
        if url not in self.probes:
            self.probes[url] = self.clock.callLater(self.policy.probe_interval, self._tick, url)

    def _tick(self, url: str) -> None:
        self.probes[url] = None  # running; no second loop for this broker
        now = self.clock.seconds()
        starting = {lc.node: lc for lc in self._starting(url) if now - lc.spawned_at < self.policy.start_timeout}
        if not starting or self._stopped:
            # Past start_timeout the wake-up's check takes over.
            del self.probes[url]
            return

        def got(answered: set[str]) -> None:
            if set(starting) <= answered:
                self._round_trip(url, now)
            ready = [starting[node] for node in sorted(answered & set(starting)) if starting[node].answered()]
            if ready:
                ensureDeferred(self._configure(url, ready)).addErrback(
                    lambda f: self.log.failure("{{Supervisor}} configuring new workers", f)
                )

        def again(_: object) -> None:
            if self._stopped:
                self.probes.pop(url, None)
            else:
                self.probes[url] = self.clock.callLater(self.policy.probe_interval, self._tick, url)

        d = self.control.ping(url, sorted(starting), self.policy.probe_timeout)
        d.addCallbacks(got, lambda f: None)
        d.addErrback(lambda f: self.log.failure("{{Supervisor}} probe", f))
        d.addBoth(again)


__all__ = ["COUNTED_EVENTS", "Health"]
