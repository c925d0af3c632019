"""Apps converge across agents: revisions, tombstones and anti-entropy.

Apps live on every agent (DESIGN §7).  A change is stored everywhere by a
scatter at the time it is made; an agent that is down or cut off from the
broker then misses it.  So every app carries a *revision* (milliseconds of
the clock of the agent that took the change, or one more than the highest
revision that agent knew for the name), every agent of the scatter stores
the same one, and a deleted app leaves a *tombstone* (its name and the
revision of the deletion).

Anti-entropy, as for the copies of the instances (``scs.replica``): every
heartbeat carries the digest of this agent's apps and tombstones
(``LocalAgent.summary``, "apps"); a live peer whose digest differs is asked
for its state (``app_state``), at most once per ``MIN_FETCH_INTERVAL``, and
it is merged here; it is not asked again while neither digest changes (or
for ``RECHECK_AFTER``): that would change nothing.  For each name the
highest version wins: a higher revision; at the same revision a tombstone
over an app, and of two apps the one whose settings' canonical JSON is
larger.  Two different versions both at revision 0 (never given one: as
the upgrade to revisions left them) are a conflict: no order is known
between them, so neither is taken (``app.conflict``, logged once per name
and peer) until the operator sets the app again.  Both sides of a difference
fetch, so the cluster converges whichever holds the newer data.  An app
that wins is stored with ``LocalAgent.app_put`` (its workers are then
replaced for the new settings, one at a time per app, by the supervisor);
a tombstone that wins deletes the app here with ``LocalAgent.app_delete``
(its instances too).

A peer's state is a door like any other: every item passes the checks of
the operation it stands for (``check_operation``: ``app_put``, or
``app_delete`` for a tombstone, every setting present), the revision
included (never more than a day ahead of this agent's clock); an item
refused is left out, with one log line per state (``srs.copy.refused``:
how many, the first error).  Of each kind at most ``MAX_ITEMS`` apps (or
policies) and the newest ``MAX_TOMBSTONES`` tombstones are taken, the rest
left out; of the tombstones of names unknown here at most
``TOMBSTONE_BUDGET`` per merge (the rest at the next ones); a state longer
than ``MAX_STATE`` or naming an app twice is refused whole.  An own item
that fails these checks (a revision beyond the bound: a clock that was
ahead, a store edited) loses to any peer's version; the store brings such
revisions down to the bound when it opens.

Autoscaling policies converge the same way, in the same state and digest:
each carries a revision given as an app's (``Revisions.next``), a
deletion of the policy (or of its app with one) leaves a policy tombstone,
and ``app_state`` lists them after the apps as items with ``"kind":
"autoscaling"``, checked as ``autoscaling_put`` or ``autoscaling_delete``.
The apps of a state are merged first, then the policies: a policy is kept
only with its app, and an app that arrives brings its policy in the same
round.

The store keeps at most ``MAX_TOMBSTONES`` tombstones of each kind (the
oldest go).  Tombstones older than ``forget_after`` (``--forget-dead-after``, by their
revision's time, which is the same on every agent) are purged, and a peer's
tombstone that old is not taken: an agent away longer than that may give a
deleted app back.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from scs.errors import BadParameter, SCSError
from scs.membership import DEFAULT_FORGET_AFTER
from scs.operation_args import check_operation
from scs.records import now_ms
from scs.replica import MAX_DOCUMENTS, MIN_FETCH_INTERVAL, sorted_digest
from scs.store_revisions import APP, MAX_TOMBSTONES, POLICY
from scs.validation import POLICY_FIELDS

log = Logger(namespace="scs.app_sync")

# A peer's state is merged with at most this many apps, and as many
# policies; those beyond are left out.
MAX_ITEMS = MAX_DOCUMENTS
# ... and at most MAX_TOMBSTONES tombstones of each (the store keeps no
# more): the oldest beyond are left out.  A longer state than both is no
# agent's and is refused whole.
MAX_STATE = (MAX_ITEMS + MAX_TOMBSTONES) * 2
# At most this many tombstones of names unknown here are taken from a peer
# per merge (the rest at the next ones): a peer cannot make this agent
# store or work on more at once.
TOMBSTONE_BUDGET = 200
# A peer whose state was merged is fetched again only when its digest or
# ours changed, or after this many seconds (time changes what is accepted:
# a revision too far ahead, a tombstone too old).
RECHECK_AFTER = 600.0
# An app's settings, as ``app_state`` and ``app_export`` give them.
SETTINGS = ("app", "broker", "celery_app", "arguments", "env", "workdir", "python", "task_events")


@attrs.frozen
class Kind:
    """What an item of an ``app_state`` is of: ``name`` (its ``kind``; an
    app's item has none) is the prefix of the operations it stands for
    (``<name>_put``, and ``<name>_delete`` for a tombstone); ``settings``
    are compared at equal revisions."""

    name: str
    settings: tuple[str, ...]


APP_KIND = Kind(APP, SETTINGS)
POLICY_KIND = Kind(POLICY, ("app", *POLICY_FIELDS))
# Merged in this order: an app that arrives takes its policy in the same round.
KINDS = (APP_KIND, POLICY_KIND)
_KIND_BY_NAME = {kind.name: kind for kind in KINDS}


def state_digest(items: list[dict[str, Any]]) -> str:
    """The digest of an ``app_state``: the same items in any order give
    the same digest."""
    return sorted_digest(items, key=lambda item: (item.get("kind", APP), item["app"], bool(item.get("deleted"))))


@attrs.frozen(order=True)
class Version:
    """What decides between two versions of one app name: the higher
    revision, then a tombstone over an app, then the larger settings."""

    revision: int
    deleted: bool
    settings: str


def check_item(item: Any) -> tuple[Version, dict[str, Any]]:
    """A peer's app, policy or tombstone checked as the operation it stands
    for: its version and the clean arguments (``app_put``'s or
    ``autoscaling_put``'s, ``*_delete``'s for a tombstone); BadParameter
    otherwise."""
    return check_kind_item(item)[1:]


# Below any version a peer can send: an own item that fails the checks
# (a revision beyond the bound, settings refused since) loses to any peer's.
LOWEST = Version(-1, False, "")


def check_kind_item(item: Any) -> tuple[Kind, Version, dict[str, Any]]:
    """``check_item``, with the kind of the item.  An app or a policy has
    every setting of its kind (a partial item is refused: its missing
    settings would compare as other values)."""
    if not isinstance(item, dict):
        raise BadParameter("an app must be an object", parameter="app")
    kind = APP_KIND
    if "kind" in item:
        # An app's item has no kind; any other kind is named.
        named = _KIND_BY_NAME.get(item["kind"]) if isinstance(item["kind"], str) else None
        if named is None or named is APP_KIND:
            raise BadParameter("unknown kind of item", parameter="kind")
        kind = named
    arguments = {k: v for k, v in item.items() if k not in ("kind", "deleted")}
    if "deleted" in item:
        if item["deleted"] is not True or "revision" not in item:
            raise BadParameter("a deleted item is {app, revision, deleted: true}", parameter="deleted")
        clean = check_operation(f"{kind.name}_delete", arguments)
        return kind, Version(clean["revision"], True, ""), clean
    if "roll" in item:
        raise BadParameter("unknown parameter roll", parameter="roll")
    missing = [key for key in kind.settings if key not in item]
    if missing:
        raise BadParameter(f"an item must have every setting, {missing[0]} is missing", parameter=missing[0])
    clean = check_operation(f"{kind.name}_put", arguments)
    clean.setdefault("revision", 0)
    return kind, Version(clean["revision"], False, _canonical(kind, clean)), clean


def _canonical(kind: Kind, clean: dict[str, Any]) -> str:
    return json.dumps({k: clean.get(k) for k in kind.settings}, sort_keys=True, separators=(",", ":"))


class AppSync:
    """This agent's apps kept in step with its peers'; see the module
    docstring.  ``local`` is this agent's ``LocalAgent``, ``peers`` its
    ``scs.peers.Peers``."""

    def __init__(
        self, local: Any, peers: Any, call_timeout: float = 10.0, forget_after: float = DEFAULT_FORGET_AFTER
    ) -> None:
        self.local = local
        self.peers = peers
        self.call_timeout = call_timeout
        self.forget_after = forget_after
        self._fetching: set[str] = set()
        self._fetched_at: dict[str, float] = {}
        # Peer -> (its digest, ours, when) after a merge of its state that
        # left nothing for later: not fetched again while both stay.
        self._settled: dict[str, tuple[str, str, float]] = {}
        # (kind, name, peer) of the conflicts already logged.
        self._conflicts: set[tuple[str, str, str]] = set()

    def _seconds(self) -> float:
        clock = self.local.clock
        return clock.seconds() if clock is not None else time.monotonic()

    def _horizon(self) -> int:
        """Tombstones with an older revision are forgotten."""
        return now_ms() - int(self.forget_after * 1000)

    def stale(self) -> list[str]:
        """Live peers whose heartbeat's apps digest differs from ours."""
        return list(self._stale_digests())

    def _stale_digests(self) -> dict[str, str]:
        """``stale``, with each peer's digest."""
        srs = self.peers.srs
        if srs is None:
            return {}
        ours = self.local.apps_digest()
        return {
            member.id: member.apps_digest
            for member in srs.membership
            if member.id != self.local.agent_id
            and member.apps_digest
            and member.apps_digest != ours
            and self.peers.peer_alive(member.id)
        }

    def sync(self) -> Deferred:
        """Purge old tombstones; fetch and merge the state of every stale
        peer (one request per peer at a time, at most one per interval)."""
        for kind in KINDS:
            purged = self.local.store.revisions.purge_tombstones(self._horizon(), kind.name)
            if purged:
                log.info(
                    "forgot the deletion of {apps} ({kind})", apps=purged, kind=kind.name, event="app.tombstone.purged"
                )
        now = self._seconds()
        stale = self._stale_digests()
        ours = self.local.apps_digest()
        self._settled = {agent: v for agent, v in self._settled.items() if agent in stale}
        due = [
            (agent, digest)
            for agent, digest in stale.items()
            if agent not in self._fetching
            and now - self._fetched_at.get(agent, -MIN_FETCH_INTERVAL) >= MIN_FETCH_INTERVAL
            and not self._is_settled(agent, digest, ours, now)
        ]
        return DeferredList([Deferred.fromCoroutine(self._fetch(*due_one)) for due_one in due], consumeErrors=True)

    def _is_settled(self, agent: str, digest: str, ours: str, now: float) -> bool:
        """Whether ``agent``'s state at ``digest`` was merged into ours at
        ``ours`` already (recently): fetching it again would change nothing."""
        settled = self._settled.get(agent)
        return settled is not None and settled[:2] == (digest, ours) and now - settled[2] < RECHECK_AFTER

    async def _fetch(self, agent: str, digest: str | None = None) -> None:
        self._fetching.add(agent)
        self._fetched_at[agent] = self._seconds()
        try:
            answer = await self.peers.srs.call(agent, "app_state", {}, timeout=self.call_timeout)
        except SCSError as e:
            log.info("apps of {agent} not fetched: {error}", agent=agent, error=e.message, event="app.sync.failed")
            return
        finally:
            self._fetching.discard(agent)
        _changed, complete = self._merge(agent, answer)
        if complete and digest is not None:
            self._settled[agent] = (digest, self.local.apps_digest(), self._seconds())

    async def pull_all(self) -> None:
        """Merge the state of every live peer (an agent that connects)."""
        if not self.peers.clustered():
            return
        answers, _missing = await self.peers.srs.scatter("app_state", {}, timeout=self.call_timeout)
        for agent in sorted(answers):
            if not isinstance(answers[agent], Exception):
                self.merge(agent, answers[agent])

    def checked(self, agent: str, answer: Any) -> dict[str, tuple[Version, dict[str, Any]]]:
        """A peer's apps, checked: name -> (version, clean arguments); see
        ``checked_kinds``."""
        return self.checked_kinds(agent, answer)[APP]

    def checked_kinds(self, agent: str, answer: Any) -> dict[str, dict[str, tuple[Version, dict[str, Any]]]]:
        """A peer's state, checked: kind -> name -> (version, clean
        arguments).  Items refused are left out, and so are the items of a
        kind beyond ``MAX_ITEMS`` and its oldest tombstones beyond
        ``MAX_TOMBSTONES``, with one log line for the whole state (the
        count and the first error); a state that is not a list, longer
        than ``MAX_STATE`` or naming an app twice in a kind is refused whole
        (BadParameter)."""
        if not isinstance(answer, list) or len(answer) > MAX_STATE:
            raise BadParameter(f"an app state must be a list of at most {MAX_STATE} items", parameter="apps")
        live: dict[str, dict[str, tuple[Version, dict[str, Any]]]] = {kind.name: {} for kind in KINDS}
        deleted: dict[str, dict[str, tuple[Version, dict[str, Any]]]] = {kind.name: {} for kind in KINDS}
        refused: list[str] = []
        named: set[tuple[str, str]] = set()
        for item in answer:
            if isinstance(item, dict) and isinstance(item.get("app"), str) and isinstance(item.get("kind", APP), str):
                # Before the checks: an item refused names its app too.
                key = (item.get("kind", APP), item["app"])
                if key in named:
                    raise BadParameter("an app state names an app twice", parameter="apps")
                named.add(key)
            try:
                kind, version, clean = check_kind_item(item)
            except SCSError as e:
                refused.append(e.message)
                continue
            name = clean["app"]
            if name in live[kind.name] or name in deleted[kind.name]:
                raise BadParameter("an app state names an app twice", parameter="apps")
            if version.deleted:
                deleted[kind.name][name] = (version, clean)
            elif len(live[kind.name]) < MAX_ITEMS:
                live[kind.name][name] = (version, clean)
            else:
                refused.append(f"more than {MAX_ITEMS} items of a kind")
        for kind_name, tombstones in deleted.items():
            if len(tombstones) > MAX_TOMBSTONES:
                newest = sorted(tombstones, key=lambda name: (tombstones[name][0].revision, name))[-MAX_TOMBSTONES:]
                refused.extend([f"more than {MAX_TOMBSTONES} tombstones of a kind"] * (len(tombstones) - len(newest)))
                deleted[kind_name] = {name: tombstones[name] for name in newest}
            live[kind_name].update(deleted[kind_name])
        if refused:
            _refused(agent, refused[0], len(refused))
        return live

    def ours(self, kind: str = APP) -> dict[str, Version]:
        """This agent's versions of ``kind``, computed as a peer's are."""
        versions = {}
        for item in self.local.app_state():
            if item.get("kind", APP) != kind:
                continue
            try:
                versions[item["app"]] = check_item(item)[0]
            except SCSError:
                # Not what a peer would accept (a revision beyond the bound,
                # settings refused since): any valid version of a peer wins.
                versions[item["app"]] = LOWEST
        return versions

    def merge(self, agent: str, answer: Any) -> list[str]:
        """Take from a peer's state what is newer than ours; the names
        changed here (a policy's as ``autoscaling:<app>``)."""
        return self._merge(agent, answer)[0]

    def _merge(self, agent: str, answer: Any) -> tuple[list[str], bool]:
        """``merge``, and whether it is complete: False when tombstones
        were left for a later merge (``TOMBSTONE_BUDGET``)."""
        try:
            theirs = self.checked_kinds(agent, answer)
        except SCSError as e:
            _refused(agent, e.message)
            return [], True
        horizon = self._horizon()
        changed = []
        complete = True
        for kind in KINDS:
            # Ours again for each kind: the apps merged may have taken
            # their policies with them.
            ours = self.ours(kind.name)
            unknown = sorted(
                (
                    (-version.revision, name)
                    for name, (version, _clean) in theirs[kind.name].items()
                    if version.deleted and version.revision >= horizon and name not in ours
                ),
            )
            if len(unknown) > TOMBSTONE_BUDGET:
                complete = False
            later = {name for _revision, name in unknown[TOMBSTONE_BUDGET:]}
            for name in sorted(theirs[kind.name]):
                version, clean = theirs[kind.name][name]
                if version.deleted and version.revision < horizon:
                    continue  # a deletion forgotten here already
                if name in later:
                    continue  # beyond this round's budget
                if name in ours and self._conflict(kind, name, agent, version, ours[name]):
                    continue
                if name in ours and not version > ours[name]:
                    continue
                if not self._apply(kind, name, version, clean):
                    continue
                changed.append(name if kind is APP_KIND else f"{kind.name}:{name}")
                log.info(
                    "{what_of} {app} {what} as {agent} has it (revision {revision})",
                    what_of="app" if kind is APP_KIND else "autoscaling policy of",
                    app=name,
                    what="deleted" if version.deleted else "updated",
                    agent=agent,
                    revision=version.revision,
                    kind=kind.name,
                    event="app.merged",
                )
        return changed, complete

    def _conflict(self, kind: Kind, name: str, agent: str, theirs: Version, ours: Version) -> bool:
        """Whether a peer's version and ours are a conflict: both at
        revision 0 (never given one: as the upgrade to revisions left them)
        and different.  No order is known between them, so neither is
        merged (the operator's PUT settles it with a real revision); logged
        once per name and peer, naming no setting."""
        key = (kind.name, name, agent)
        if not (theirs.revision == 0 and ours.revision == 0 and theirs != ours):
            self._conflicts.discard(key)
            return False
        if key not in self._conflicts:
            self._conflicts.add(key)
            log.warn(
                "{what_of} {app} differs on {agent}, neither with a revision (as before the upgrade to "
                "revisions): none taken; set it again through the API (PUT) to settle it",
                what_of="app" if kind is APP_KIND else "autoscaling policy of",
                app=name,
                agent=agent,
                kind=kind.name,
                event="app.conflict",
            )
        return True

    def _apply(self, kind: Kind, name: str, version: Version, clean: dict[str, Any]) -> bool:
        """Store a peer's newer item here; whether it was."""
        local = self.local
        if kind is APP_KIND:
            if not version.deleted:
                local.app_put(**clean)
            elif not local.app_delete(name, revision=version.revision)["deleted"]:
                local.store.revisions.put_tombstone(name, version.revision)
            return True
        if version.deleted:
            if not local.autoscaling_delete(name, revision=version.revision)["deleted"]:
                local.store.revisions.put_tombstone(name, version.revision, POLICY)
            return True
        if not local.store.has_app(name):
            return False  # a policy is kept with its app only
        local.autoscaling_put(**clean)
        return True


def _refused(agent: str, error: str, refused: int = 1) -> None:
    """One line per state: how many of its items were refused, the first
    error."""
    log.warn(
        "refused {refused} item(s) of the apps copied from {agent}; the first: {error}",
        agent=agent,
        error=error,
        refused=refused,
        event="srs.copy.refused",
        operation="app_state",
    )


def app_sync_service(app_sync: AppSync, clock: Any, interval: float = 0.5) -> TimerService:
    """A service running ``app_sync.sync`` every ``interval`` seconds (the
    digests come with the heartbeats; a steady cluster costs a comparison);
    a failed round is logged, the next one runs."""

    def sync() -> Deferred:
        return maybeDeferred(app_sync.sync).addErrback(lambda f: log.failure("app sync failed", f))

    service = TimerService(interval, sync)
    service.clock = clock
    return service
