"""The revisions and tombstones of apps and their autoscaling policies, in
the store (``scs.app_sync``).

Kept apart from :class:`scs.store.Store` because they are one job of their
own, with its own rules: a change's revision is the time in ms or one more
than any known for the name, never beyond what the peers accept
(:func:`revision_bound`); a deletion leaves a tombstone, at most
``MAX_TOMBSTONES`` of each kind, purged after a horizon.  The session-level
helpers (``*_in``) are what the store's own writers of apps and policies
call inside their transactions; :class:`Revisions` is the part of the store
the rest of the agent asks.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker
from twisted.logger import Logger

from scs.models import App, AppTombstone, AutoscalingPolicyRow, AutoscalingTombstone
from scs.records import now_ms
from scs.validation import MAX_REVISION_AHEAD_MS

# The store's log: the events keep the namespace they always had.
log = Logger(namespace="scs.store")

# What a revision or a tombstone is of (``scs.app_sync``): an app, or its
# autoscaling policy.
APP = "app"
POLICY = "autoscaling"
_TOMBSTONES: dict[str, Any] = {APP: AppTombstone, POLICY: AutoscalingTombstone}
# The store keeps at most this many tombstones of each kind: past it the
# oldest (lowest revision, then name) go, as a peer's state leaves them out.
MAX_TOMBSTONES = 2_000


def revision_bound() -> int:
    """The highest revision a peer accepts now (``check_revision``)."""
    return now_ms() + MAX_REVISION_AHEAD_MS


def _current_revision(session: Session, name: str, kind: str) -> int | None:
    """The revision of app ``name`` (``kind`` APP) or of its policy
    (POLICY) here; None when there is none."""
    if kind == POLICY:
        query = select(AutoscalingPolicyRow.revision).join(App, App.id == AutoscalingPolicyRow.app_id)
        return session.scalar(query.where(App.name == name))
    return session.scalar(select(App.revision).where(App.name == name))


def _known_revision(session: Session, name: str, kind: str = APP) -> int:
    """The highest revision known here for ``name`` of ``kind`` (the
    app's or policy's, or its tombstone's); -1 when none."""
    current = _current_revision(session, name, kind)
    tombstone = session.get(_TOMBSTONES[kind], name)
    return max(-1, -1 if current is None else current, -1 if tombstone is None else tombstone.revision)


def next_revision_in(session: Session, name: str, kind: str = APP) -> int:
    """``Revisions.next`` inside ``session``."""
    # Never beyond the bound the peers accept (a revision known here
    # beyond it is one the peers ignore, see ``LocalAgent._outdated``).
    return min(max(now_ms(), _known_revision(session, name, kind) + 1), revision_bound())


def drop_tombstone_in(session: Session, name: str, revision: int, kind: str = APP) -> None:
    """Forget the deletion of ``name`` if it is older than ``revision``."""
    tombstone = session.get(_TOMBSTONES[kind], name)
    if tombstone is not None and tombstone.revision < revision:
        session.delete(tombstone)


def put_tombstone_in(session: Session, name: str, revision: int, kind: str = APP) -> None:
    """``Revisions.put_tombstone`` inside ``session``."""
    model = _TOMBSTONES[kind]
    tombstone = session.get(model, name)
    if tombstone is None:
        session.add(model(name=name, revision=revision, deleted_at=time.time()))
        session.flush()
        _cap_tombstones(session, kind)
    elif tombstone.revision < revision:
        tombstone.revision, tombstone.deleted_at = revision, time.time()


def _cap_tombstones(session: Session, kind: str) -> None:
    """Keep at most ``MAX_TOMBSTONES`` of ``kind``: the oldest go."""
    model = _TOMBSTONES[kind]
    excess = session.scalar(select(func.count()).select_from(model)) - MAX_TOMBSTONES
    if excess > 0:
        oldest = session.scalars(select(model).order_by(model.revision, model.name).limit(excess))
        for row in list(oldest):
            session.delete(row)


class Revisions:
    """The revisions and tombstones of the apps and policies in a store.

    A part of :class:`scs.store.Store` (``store.revisions``), built with its
    engine and sessions, so that its writes count in ``Store.app_writes``
    like any other; apart because the rules of revisions are their own."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session]) -> None:
        self._engine = engine
        self._sessions = sessions

    def next(self, name: str, kind: str = APP) -> int:
        """The revision a change of ``name`` (its app, or its policy: see
        ``kind``) taken here gets: the time in ms, or one more than the
        highest revision known for it, a deletion's included."""
        with self._sessions.begin() as session:
            return next_revision_in(session, name, kind)

    def of(self, name: str, kind: str = APP) -> tuple[int | None, int | None]:
        """(the revision of app ``name``'s or its policy's, its tombstone's
        revision), None for either that is not here."""
        with self._sessions.begin() as session:
            tombstone = session.get(_TOMBSTONES[kind], name)
            return _current_revision(session, name, kind), None if tombstone is None else tombstone.revision

    def tombstones(self, kind: str = APP) -> dict[str, int]:
        """Deleted app (or policy: ``kind``) name -> revision of its deletion."""
        model = _TOMBSTONES[kind]
        with self._sessions.begin() as session:
            return {row.name: row.revision for row in session.scalars(select(model))}

    def put_tombstone(self, name: str, revision: int, kind: str = APP) -> None:
        """Remember that ``name`` was deleted at ``revision`` (the higher of
        two tombstones is kept)."""
        with self._sessions.begin() as session:
            put_tombstone_in(session, name, revision, kind)

    def purge_tombstones(self, before: int, kind: str = APP) -> list[str]:
        """Forget the deletions whose revision is older than ``before`` (ms)."""
        model = _TOMBSTONES[kind]
        with self._sessions.begin() as session:
            rows = list(session.scalars(select(model).where(model.revision < before)))
            for row in rows:
                session.delete(row)
            return sorted(row.name for row in rows)

    def clamp(self) -> None:
        """Bring every revision beyond the bound (``MAX_REVISION_AHEAD_MS``
        ahead of now: a clock that was ahead, a store edited or restored)
        down to it: such a revision would pin its app here, every peer
        refusing it and every later change being older."""
        tables = inspect(self._engine).get_table_names()
        if "autoscaling_tombstone" not in tables:
            return  # a schema older than the revisions (migration tests)
        bound = revision_bound()
        clamped = []
        with self._sessions.begin() as session:
            for model, what in (
                (App, APP),
                (AutoscalingPolicyRow, POLICY),
                (AppTombstone, "deleted app"),
                (AutoscalingTombstone, "deleted autoscaling"),
            ):
                for row in session.scalars(select(model).where(model.revision > bound)):
                    row.revision = bound
                    name = session.get(App, row.app_id).name if model is AutoscalingPolicyRow else row.name
                    clamped.append(f"{name} ({what})")
        if clamped:
            log.warn(
                "revisions beyond {hours} h ahead brought down to it: {items}",
                hours=MAX_REVISION_AHEAD_MS // 3_600_000,
                items=", ".join(sorted(clamped)),
                event="store.revision.clamped",
            )
