"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.agents import AgentProcess, kill_leftover_workers


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """``agents(*args, **kwargs)`` starts an agent ``agent1`` in a directory
    of its own; every agent started is stopped, and its workers killed."""
    started: list[AgentProcess] = []

    def start(*args: str, **kwargs) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"agent{len(started)}", "agent1", *args, **kwargs)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.stop()
        kill_leftover_workers(agent.directory)
