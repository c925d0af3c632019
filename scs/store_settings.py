"""The agent's own settings, in the store (``agent_setting``).

Kept apart from :class:`scs.store.Store`, whose tables are the desired
state of apps and instances: a setting is a flag of the agent itself
(``draining``), a key and a value, that no peer copies and no app depends on.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from scs.models import AgentSetting


class AgentSettings:
    """The agent's own key/value settings (``store.settings``), built by
    :class:`scs.store.Store` with its sessions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def get(self, key: str, default: str | None = None) -> str | None:
        with self._sessions.begin() as session:
            row = session.get(AgentSetting, key)
            return default if row is None else row.value

    def set(self, key: str, value: str | None) -> None:
        """Set ``key`` to ``value``; None removes it."""
        with self._sessions.begin() as session:
            row = session.get(AgentSetting, key)
            if value is None:
                if row is not None:
                    session.delete(row)
            elif row is None:
                session.add(AgentSetting(key=key, value=value))
            else:
                row.value = value
