"""This agent's copies of the peers' instances, in the store (``scs.replica``).

Kept apart from :class:`scs.store.Store`, whose tables are this agent's own
desired state: these tables only mirror what the peers hold, are written by
the replication and the failover alone, and are read through an in-memory
cache that no other table has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scs.models import ReplicaInstance, ReplicaOwner


class ReplicaCopies:
    """The copy of every peer's instances held here, with when each peer's
    was refreshed and its digest.

    A part of :class:`scs.store.Store` (``store.replicas``), built with its
    sessions; apart because these rows are the peers' state, not this
    agent's, and are cached."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        # Owner -> the decoded documents of our copy of its instances, read
        # once: listings, the failover check (every second) and the fence
        # read them far more often than heartbeats change them.  Kept by
        # the only two writers, put and drop.
        self._documents: dict[str, list[dict[str, Any]]] | None = None

    def synced_at(self) -> dict[str, float]:
        """Peer -> when the copy of its instances was last refreshed."""
        with self._sessions.begin() as session:
            return {row.owner: row.synced_at for row in session.scalars(select(ReplicaOwner))}

    def digests(self) -> dict[str, str]:
        """Peer -> digest of the copy of its instances held here."""
        with self._sessions.begin() as session:
            return {row.owner: row.digest for row in session.scalars(select(ReplicaOwner))}

    def put(self, owner: str, digest: str, documents: Sequence[Mapping[str, Any]], now: float) -> None:
        """Replace the copy of ``owner``'s instances (checked documents)."""
        documents = sorted((dict(d) for d in documents), key=lambda d: d["name"])
        with self._sessions.begin() as session:
            row = session.get(ReplicaOwner, owner)
            if row is None:
                row = ReplicaOwner(owner=owner)
                session.add(row)
            row.digest, row.synced_at = digest, now
            session.execute(ReplicaInstance.__table__.delete().where(ReplicaInstance.owner == owner))
            if documents:
                session.execute(
                    ReplicaInstance.__table__.insert(),
                    [{"owner": owner, "name": d["name"], "document": json.dumps(d)} for d in documents],
                )
        copies = self._copies()
        copies.pop(owner, None)
        if documents:
            copies[owner] = documents

    def instances(self, owner: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Owner -> the documents of its instances, by name.  The documents
        are shared with the cache: read them, never change them."""
        copies = self._copies()
        owners = sorted(copies) if owner is None else [owner] if owner in copies else []
        return {name: list(copies[name]) for name in owners}

    def _copies(self) -> dict[str, list[dict[str, Any]]]:
        if self._documents is None:
            query = select(ReplicaInstance).order_by(ReplicaInstance.owner, ReplicaInstance.name)
            copies: dict[str, list[dict[str, Any]]] = {}
            with self._sessions.begin() as session:
                for row in session.scalars(query):
                    copies.setdefault(row.owner, []).append(json.loads(row.document))
            self._documents = copies
        return self._documents

    def drop(self, owner: str, names: Sequence[str] | None = None) -> None:
        """Forget instances of ``owner`` (all of them when ``names`` is None);
        its digest no longer matches, so the next heartbeat re-syncs."""
        with self._sessions.begin() as session:
            if names is None:
                session.execute(ReplicaOwner.__table__.delete().where(ReplicaOwner.owner == owner))
                session.execute(ReplicaInstance.__table__.delete().where(ReplicaInstance.owner == owner))
            else:
                session.execute(
                    ReplicaInstance.__table__.delete().where(
                        ReplicaInstance.owner == owner, ReplicaInstance.name.in_(list(names))
                    )
                )
                row = session.get(ReplicaOwner, owner)
                if row is not None:
                    row.digest = ""
        copies = self._copies()
        dropped = None if names is None else set(names)
        kept = [] if dropped is None else [d for d in copies.get(owner, []) if d["name"] not in dropped]
        copies.pop(owner, None)
        if kept:
            copies[owner] = kept
