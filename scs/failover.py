"""No instance is lost with its machine (DESIGN §9.3).

:class:`Failover` runs on every agent and acts on one: the coordinator, the
live agent with the smallest id (``scs.placement``).  Once a peer has been
dead ``failover_after`` seconds, each of its instances in this agent's copy
(``scs.replica``) whose worker no longer answers a ping is re-created, same
name and settings and desired state, on a live agent.  The move is made
once for the cluster:

- only the coordinator decides, and it handles one dead agent at a time;
- an instance a live agent already has (moved before, by any decider) is
  not moved again: every agent's copy of its peers says who has what;
- the target of each instance is a function of the dead agent, the live
  agents and the instance names (round robin over the live agents, from
  an offset of the dead agent's id), so two agents deciding at the same
  moment from the same view send each instance to the same agent, where
  creating what exists is a no-op.

An instance whose worker still answers (the agent died, its machine did
not) stays: it is listed ``orphaned`` and its agent, back, takes it again.

:class:`Fence` is the other side: an agent that comes back (or a partition
that heals) drops every instance a live peer now has with ``moved_from``
naming it: the moved copy wins.  At start, the supervisor is given no
instance until this agent's copies of its peers are current and fenced
(:class:`StartGate`), so a moved instance never gets a second worker here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from scs.custody import Custody
from scs.errors import NotFound, SCSError
from scs.peers import Peers
from scs.store import Store
from scs.worker import node_name

log = Logger(namespace="scs.failover")

DEFAULT_FAILOVER_AFTER = 30.0
CHECK_INTERVAL = 1.0
PING_TIMEOUT = 2.0
SILENT_ROUNDS = 2
# Instances moved at the same time by one failover.
MOVES_AT_ONCE = 8


def spread(dead: str, load: dict[str, int], names: list[str]) -> dict[str, str]:
    """Instance -> target: each instance, in name order, to the live agent
    holding fewest (``load``: live agent -> instances it holds), ties broken
    by an order fixed by ``dead``.  The same inputs give the same answer,
    whichever agent computes it."""
    agents = sorted(load)
    start = int(hashlib.sha256(dead.encode("utf-8")).hexdigest(), 16) % len(agents)
    rank = {agent: (i - start) % len(agents) for i, agent in enumerate(agents)}
    load = dict(load)
    targets = {}
    for name in sorted(names):
        target = min(agents, key=lambda agent: (load[agent], rank[agent]))
        targets[name] = target
        load[target] += 1
    return targets


class Failover:
    """See the module docstring.  ``custody`` is this agent's
    ``scs.custody.Custody`` (who has what, and the moves), ``control`` the
    Celery control that pings."""

    def __init__(
        self,
        custody: Custody,
        control: Any,
        clock: Any,
        failover_after: float = DEFAULT_FAILOVER_AFTER,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.custody = custody
        self.control = control
        self.clock = clock
        self.failover_after = failover_after
        self.check_interval = check_interval
        self._loop: LoopingCall | None = None
        self._running: Deferred | None = None
        # Instance -> failovers in a row in which its worker did not answer.
        self._silent: dict[str, int] = {}
        # Instance -> where we moved it (until the copies show it there).
        self._recent: dict[str, str] = {}
        # (dead agent, instance) said to be orphaned (said once).
        self._orphans_logged: set[tuple[str, str]] = set()

    @property
    def store(self) -> Store:
        return self.custody.store

    @property
    def srs(self) -> Any:
        return self.custody.srs

    @property
    def agent_id(self) -> str:
        return self.custody.agent_id

    @property
    def peers(self) -> Peers:
        return self.custody.peers

    def start(self) -> None:
        if self.failover_after <= 0 or self.srs is None:
            return
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.check_interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def tick(self) -> Deferred | None:
        """One look at the dead; a failover in progress is not overlapped."""
        # Cut off, or just back before the peers answered our hello, every
        # peer looks dead: none is judged so (as for the orphaned listing).
        if self._running is not None or not self.srs.sees_the_cluster():
            return None
        if self.custody.placement.coordinator() != self.agent_id:
            return None
        due = self.due()
        if not due:
            return None
        self._running = Deferred.fromCoroutine(self._fail_over_all(due))
        self._running.addErrback(lambda f: log.failure("failover failed", f))
        self._running.addBoth(self._done)
        return self._running

    def _done(self, _: object) -> None:
        self._running = None

    def due(self) -> dict[str, bool]:
        """Dead peers with instances in our copy -> whether they have been
        dead ``failover_after`` seconds.  Their workers are pinged from the
        first, so that by then they have missed their pings."""
        now = self.clock.seconds()
        due = {}
        for owner, documents in self.store.replicas.instances().items():
            member = self.srs.membership.get(owner)
            if member is None or not documents or owner == self.agent_id:
                continue
            if self.peers.peer_alive(owner) or member.dead_since is None:
                continue
            due[owner] = now - member.dead_since >= self.failover_after
        return dict(sorted(due.items()))

    async def _fail_over_all(self, owners: dict[str, bool]) -> None:
        for owner, move in owners.items():
            await self.fail_over(owner, move=move)

    def held_by_live_agents(self) -> dict[str, str]:
        """Instance -> the live agent that has it (here, or in our copies,
        or moved there by us lately: a copy lags a heartbeat behind)."""
        held = {name: self.agent_id for name in self.store.node_names()}
        for owner, documents in self.store.replicas.instances().items():
            if owner != self.agent_id and self.peers.peer_alive(owner):
                for document in documents:
                    held.setdefault(document["name"], owner)
        for name, target in list(self._recent.items()):
            if name in held or not self.peers.peer_alive(target):
                del self._recent[name]  # the copies show it now (or its agent died)
            else:
                held[name] = target
        return held

    async def fail_over(self, dead: str, move: bool = True) -> dict[str, str]:
        """Move the instances of ``dead`` whose workers are silent (with
        ``move`` false, only ping them); returns instance -> new owner for
        those moved now."""
        documents = self._of_live_apps(dead, self.store.replicas.instances(dead).get(dead, []))
        held = self.held_by_live_agents()
        already = [d["name"] for d in documents if d["name"] in held]
        if already:
            # Moved before (by us or an earlier coordinator): only our copy is behind.
            self.store.replicas.drop(dead, already)
        candidates = [d for d in documents if d["name"] not in held]
        # A worker must miss two pings in a row (a loaded machine may answer
        # one late): a live worker moved would run twice.  Those pinged since
        # the agent died and silent twice already are not asked again.
        to_ping = [
            d for d in candidates if d["is_enabled"] and not (move and self._silent.get(d["name"], 0) >= SILENT_ROUNDS)
        ]
        answering = await self._answering(dead, to_ping)
        for document in to_ping:
            name = document["name"]
            self._silent[name] = 0 if name in answering else self._silent.get(name, 0) + 1
        to_move = [
            d
            for d in candidates
            if not d["is_enabled"] or (d["name"] not in answering and self._silent.get(d["name"], 0) >= SILENT_ROUNDS)
        ]
        if not move:
            return {}
        for document in candidates:
            if document["name"] in answering and (dead, document["name"]) not in self._orphans_logged:
                self._orphans_logged.add((dead, document["name"]))
                log.info(
                    "failover: {instance} of dead agent {dead} still answers: left orphaned",
                    instance=document["name"],
                    dead=dead,
                    event="failover.orphaned",
                )
        live = [a for a in self.custody.placement.live_agents() if a != dead and not self.peers.is_draining(a)]
        if not to_move or not live:
            return {}
        # Our copies of the others may be a heartbeat behind: ask them.
        owners = await self.custody.owners_of([d["name"] for d in to_move])
        if owners is None:
            return {}  # an agent did not answer: next time
        if owners:
            self.store.replicas.drop(dead, sorted(owners))
            to_move = [d for d in to_move if d["name"] not in owners]
        load = dict.fromkeys(live, 0)
        for holder in held.values():
            if holder in load:
                load[holder] += 1
        targets = spread(dead, load, [d["name"] for d in to_move])
        moved: dict[str, str] = {}
        # Several at once (each name has its own lock on the coordinator),
        # a few at a time so that a large move does not flood the bus.
        semaphore = DeferredSemaphore(MOVES_AT_ONCE)
        moves = [
            semaphore.run(lambda d=document: Deferred.fromCoroutine(self._move(dead, d, targets[d["name"]], moved)))
            for document in sorted(to_move, key=lambda d: d["name"])
        ]
        await DeferredList(moves, consumeErrors=True)
        return moved

    async def _move(self, dead: str, document: dict[str, Any], target: str, moved: dict[str, str]) -> None:
        name = document["name"]
        try:
            outcome = await self.custody.adopt_once(target, document, moved_from=dead)
        except SCSError as e:
            if _app_was_deleted(e, document["app"]):
                # The target has the app's tombstone (we missed the deletion):
                # no agent will take it, ever.  Final for this copy.
                self.store.replicas.drop(dead, [name])
                self._silent.pop(name, None)
                _log_deleted(dead, document, target)
                return
            log.warn(
                "failover of {instance} from {dead} to {target} failed: {error} (tried again later)",
                instance=name,
                dead=dead,
                target=target,
                error=e.message,
                event="failover.error",
            )
            return
        self.store.replicas.drop(dead, [name])
        self._silent.pop(name, None)
        if not outcome["moved"]:
            return  # moved already, by another decision
        self._recent[name] = target
        moved[name] = target
        log.info(
            "failover: {instance} of dead agent {dead} (dead {cause}) now on {target}",
            instance=name,
            dead=dead,
            target=target,
            cause=getattr(self.srs.membership.get(dead), "dead_cause", ""),
            enabled=document["is_enabled"],
            event="failover.moved",
        )

    def _of_live_apps(self, dead: str, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``documents`` but those of apps deleted here (a tombstone): no
        agent would adopt them (``instance_adopt`` refuses), so they are
        dropped from our copy of ``dead``, neither pinged nor moved."""
        deleted = [d for d in documents if self.custody.app_deleted(d["app"])]
        if not deleted:
            return documents
        self.store.replicas.drop(dead, [d["name"] for d in deleted])
        for document in deleted:
            self._silent.pop(document["name"], None)
            _log_deleted(dead, document, None)
        return [d for d in documents if d not in deleted]

    async def _answering(self, dead: str, documents: list[dict[str, Any]]) -> set[str]:
        """The instances among ``documents`` whose worker (``name@dead``)
        answers a ping, one ping per broker."""
        by_broker: dict[str, list[str]] = {}
        for document in documents:
            url = document["broker"] or self._app_broker(document["app"])
            if url is not None:
                by_broker.setdefault(url, []).append(node_name(document["name"], dead))
        answering: set[str] = set()
        results = await DeferredList(
            [self.control.ping(url, nodes, PING_TIMEOUT) for url, nodes in sorted(by_broker.items())],
            consumeErrors=True,
        )
        for ok, nodes in results:
            if ok:
                answering |= {node.split("@", 1)[0] for node in nodes}
            else:
                # A broker we cannot ask: we cannot tell them dead; leave them.
                return {d["name"] for d in documents}
        return answering

    def _app_broker(self, app: str) -> str | None:
        try:
            return self.store.get_app(app).broker.url
        except SCSError:
            return None


def _app_was_deleted(error: SCSError, app: str) -> bool:
    """Whether an adoption was refused because ``app`` was deleted on the
    target (``LocalAgent.instance_adopt``: NotFound "app ... was deleted")."""
    return isinstance(error, NotFound) and error.details.get("app") == app and error.message.endswith("was deleted")


def _log_deleted(dead: str, document: dict[str, Any], target: str | None) -> None:
    """Said once per copy: the copy is dropped with it."""
    log.info(
        "failover: {instance} of dead agent {dead} not moved: its app {app} was deleted",
        instance=document["name"],
        dead=dead,
        app=document["app"],
        target=target,
        event="failover.app_deleted",
    )


class Fence:
    """Drops what this agent has and a live peer has too, when the peer's
    copy is the one to keep: a copy moved away from us always wins (we were
    gone while it moved); of two copies both moved from a dead agent (two
    deciders in a split cluster), the one on the agent with the smaller id
    wins."""

    def __init__(self, custody: Custody) -> None:
        self.custody = custody

    def __call__(self, _synced_agent: str | None = None) -> list[str]:
        local = self.custody.local
        mine = {spec.name: spec for spec in local.store.list_nodes()}
        losing = set()
        for owner, documents in local.store.replicas.instances().items():
            if owner == local.agent_id or not self.custody.peers.peer_alive(owner):
                continue
            for document in documents:
                spec = mine.get(document["name"])
                if spec is None or spec.moved_from == owner or spec.name in self.custody.handing_over:
                    # Ours came from that peer: our copy of its document is
                    # older than the move (it comes back at its next digest).
                    continue
                if document["moved_from"] == local.agent_id:
                    losing.add(spec.name)
                elif document["moved_from"] is not None and document["moved_from"] == spec.moved_from:
                    # Both moved from the same agent (two deciders): the smaller id keeps it.
                    if owner < local.agent_id:
                        losing.add(spec.name)
        dropped = local.drop_moved(sorted(losing))
        for name in dropped:
            log.info(
                "{instance} runs on another agent (moved while this one was away): dropped here, its worker stopped",
                instance=name,
                event="fence.dropped",
            )
        return dropped


class StartGate:
    """What the supervisor is told to run: nothing until this agent's
    copies of its live peers are current and fenced (or ``timeout``
    seconds have passed: a cluster that cannot be reached must not keep
    local workers down), then the store's instances."""

    def __init__(self, desired: Callable[[], list[Any]], clock: Any, timeout: float) -> None:
        self._desired = desired
        self.clock = clock
        self.open = False
        self._timer = clock.callLater(timeout, self._time_out)
        self.on_open: list[Callable[[], Any]] = []

    def __call__(self) -> list[Any]:
        return self._desired() if self.open else []

    def release(self) -> None:
        if self.open:
            return
        self.open = True
        if self._timer.active():
            self._timer.cancel()
        for callback in self.on_open:
            callback()

    def _time_out(self) -> None:
        if not self.open:
            log.warn(
                "the cluster could not be asked which instances moved: starting the workers anyway",
                event="fence.timeout",
            )
            self.release()


class FailoverService(Service):
    """The cluster's keeping of instances, on one agent: the copies of the
    peers' instances refreshed every ``sync_interval`` (their heartbeats
    carry the digests), the fence after each refresh, the failover check
    every second, and the start gate opened once connected and fenced."""

    def __init__(
        self,
        replicas: Any,
        fence: Fence,
        failover: Failover,
        gate: StartGate | None,
        clock: Any,
        sync_interval: float = 0.5,
    ) -> None:
        self.replicas = replicas
        self.fence = fence
        self.failover = failover
        self.gate = gate
        self.clock = clock
        self.sync_interval = sync_interval
        self._sync_loop: LoopingCall | None = None
        self._connected_once = False

    def startService(self) -> None:
        super().startService()
        self._sync_loop = LoopingCall(self._sync)
        self._sync_loop.clock = self.clock
        self._sync_loop.start(self.sync_interval, now=False)
        self.failover.start()

    def stopService(self) -> None:
        super().stopService()
        if self._sync_loop is not None and self._sync_loop.running:
            self._sync_loop.stop()
        self.failover.stop()

    def _sync(self) -> Deferred:
        return Deferred.fromCoroutine(self._sync_then_open())

    async def _sync_then_open(self) -> None:
        await self.replicas.sync()
        if self.gate is not None and not self.gate.open and self._connected_once and self.replicas.synced():
            self.fence()
            self.gate.release()

    async def connected(self) -> None:
        """SRS is connected and has heard its peers: bring the copies up to
        date, drop what moved away, then let the supervisor start."""
        self._connected_once = True
        await self._sync_then_open()
        self.fence()
