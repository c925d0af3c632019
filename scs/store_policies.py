"""The apps' autoscaling policies, in the store (``scs.autoscaling``).

Kept apart from :class:`scs.store.Store`: a policy is one optional row per
app with a revision and tombstones of its own (``scs.store_revisions``),
read by the autoscaler and copied between agents, and none of the store's
instances or queues depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scs.models import App, AutoscalingPolicyRow
from scs.records import AutoscalingPolicy
from scs.store_revisions import POLICY, drop_tombstone_in, next_revision_in, put_tombstone_in, revision_bound


class StoredPolicies:
    """Every app's autoscaling policy held here, with its revision.

    A part of :class:`scs.store.Store` (``store.policies``), built with its
    sessions and its lookup of an app by name (``NotFound`` when there is
    none), so that its writes count in ``Store.app_writes`` like any other."""

    def __init__(self, sessions: sessionmaker[Session], app: Callable[[Session, str], App]) -> None:
        self._sessions = sessions
        self._app = app

    def put(self, policy: AutoscalingPolicy, revision: int | None = None) -> tuple[AutoscalingPolicy, bool]:
        """Store an app's autoscaling policy (replacing its old one) at
        ``revision`` (None: a new one, see ``Revisions.next``); returns it
        and whether it is new.  The app must exist; an older tombstone of
        the policy goes."""
        with self._sessions.begin() as session:
            app = self._app(session, policy.app)
            if revision is None:
                revision = next_revision_in(session, policy.app, POLICY)
            row = session.get(AutoscalingPolicyRow, app.id)
            created = row is None
            if row is None:
                row = AutoscalingPolicyRow(app_id=app.id)
                session.add(row)
            row.queue = policy.queue
            row.min_instances = policy.min_instances
            row.max_instances = policy.max_instances
            row.messages_per_instance = policy.messages_per_instance
            row.scale_down_after = float(policy.scale_down_after)
            row.revision = revision
            drop_tombstone_in(session, policy.app, revision, POLICY)
            session.flush()
            return _policy_record(app.name, row), created

    def get(self, app: str) -> AutoscalingPolicy | None:
        with self._sessions.begin() as session:
            app_row = self._app(session, app)
            row = session.get(AutoscalingPolicyRow, app_row.id)
            return None if row is None else _policy_record(app_row.name, row)

    def list_all(self) -> list[AutoscalingPolicy]:
        return [policy for policy, _revision in self.with_revisions()]

    def with_revisions(self) -> list[tuple[AutoscalingPolicy, int]]:
        """Every policy here with its revision (``scs.app_sync``)."""
        with self._sessions.begin() as session:
            query = select(App.name, AutoscalingPolicyRow).join(App, App.id == AutoscalingPolicyRow.app_id)
            return [
                (_policy_record(name, row), row.revision or 0)
                for name, row in session.execute(query.order_by(App.name))
            ]

    def delete(self, app: str, revision: int | None = None) -> bool:
        """Drop an app's policy, leaving a tombstone at ``revision`` (None:
        a new one; a policy changed later than that is kept); whether it
        had one (nothing is stored when it had none)."""
        with self._sessions.begin() as session:
            query = select(AutoscalingPolicyRow).join(App, App.id == AutoscalingPolicyRow.app_id)
            row = session.scalar(query.where(App.name == app))
            if row is None or (revision is not None and revision < row.revision <= revision_bound()):
                return False
            if revision is None:
                revision = next_revision_in(session, app, POLICY)
            session.delete(row)
            put_tombstone_in(session, app, revision, POLICY)
            return True


def _policy_record(app: str, row: AutoscalingPolicyRow) -> AutoscalingPolicy:
    return AutoscalingPolicy(
        app=app,
        queue=row.queue,
        min_instances=row.min_instances,
        max_instances=row.max_instances,
        messages_per_instance=row.messages_per_instance,
        scale_down_after=float(row.scale_down_after),
    )
