"""Schemathesis against a live agent (real RabbitMQ): every operation of
GET /openapi.json, with generated valid and invalid requests.

Checked on every answer: no 5xx, a documented status, content type and body
(schemathesis' checks against the document the agent serves), and, on a
4xx, that the store did not change (a dump of every table of the agent's
SQLite file, read-only, before and after).

Workers stay cheap: the app "shop" that instances are created in has a
working directory that is removed once set, so that every worker of it is
refused at spawn (``failed`` at once, no process); creations are sent with
``nowait`` (a worker that cannot start would make them a 502 otherwise).
Requests that would create apps or instances elsewhere name the apps the
test knows ("spare" for app settings, "shop" for instances), so that no
generated name gets real workers.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scs.store import STORE_FILENAME
from tests.integration.agents import AgentProcess, wait_until

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Examples per operation, generation mode and choice of path parameters.
EXAMPLES = 22
MIN_REQUESTS = 3000
CREATIONS = {"/{app}/instances/", "/{app}/instances/{instance}/"}
MAX_FAILURES_SHOWN = 20


def store_dump(path: Path) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Every row of every table of the agent's store, read-only."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [
            (table, sorted(map(repr, connection.execute(f'SELECT * FROM "{table}"'))))  # noqa: S608 - our own names
            for table in sorted(tables)
        ]
    finally:
        connection.close()


def path_variants(path: str, method: str) -> list[dict[str, str]]:
    """The fixed path parameters each operation is run with (the rest are
    generated): generated names, and the apps and instance the test made."""
    if "{app}" not in path:
        return [{}]
    if path == "/{app}/":
        # Apps are created and changed under one known name only.
        return [{"app": "spare"}] if method in ("PUT", "POST", "DELETE") else [{}, {"app": "spare"}]
    if path in CREATIONS:
        return [{"app": "shop"}]
    if path == "/{app}/autoscaling/" and method != "GET":
        # A valid policy would make the agent add and remove instances in
        # the background: policies go to "spare", which has no queue.
        return [{"app": "spare"}]
    variants = [{}, {"app": "shop"}]
    if "{instance}" in path and method != "DELETE":
        variants.append({"app": "shop", "instance": "seed"})
    if "{queue}" in path and "{instance}" not in path and method != "DELETE":
        variants.append({"app": "shop", "queue": "orders"})
    return variants


def with_nowait(case: Any) -> None:
    """Instance creations answer at once (their workers cannot start)."""
    if isinstance(case.body, dict):
        case.body["nowait"] = True if case.media_type == "application/json" else "1"
    else:
        case.query = {**(case.query or {}), "nowait": "1"}


@pytest.fixture
def shop(agents: Callable[..., AgentProcess], tmp_path: Path) -> AgentProcess:
    # A cluster of its own on the real broker: no other test's agents answer.
    agent = agents("--cluster", f"schemathesis-{os.getpid()}")
    workdir = tmp_path / "shop-workdir"
    workdir.mkdir(mode=0o755)
    assert agent.request("PUT", "/shop/", {"workdir": str(workdir)})[0] == 201
    workdir.rmdir()
    # 503 until the agent has joined its cluster.
    wait_until(
        lambda: agent.request("PUT", "/shop/instances/seed/", {"nowait": True})[0] == 202,
        30,
        what="the agent to join its cluster",
    )
    assert agent.request("POST", "/shop/instances/seed/disable/")[0] == 200
    assert agent.request("PUT", "/shop/queues/orders/")[0] == 201
    assert agent.request("PUT", "/spare/")[0] == 201
    return agent


def test_schemathesis_against_a_live_agent(shop: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{shop.url}/openapi.json")
    store = shop.directory / STORE_FILENAME
    session = requests.Session()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    def run(operation: Any, mode: GenerationMode, fixed: dict[str, str]) -> None:
        creation = operation.path in CREATIONS

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: Any) -> None:
            if creation:
                with_nowait(case)
            before = store_dump(store)
            response = case.call(base_url=shop.url, session=session, timeout=60)
            statuses[response.status_code] += 1
            problems = []
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as e:  # noqa: BLE001 - collected, all reported at the end
                problems.append(str(e).strip().splitlines()[0:12])
            if 400 <= response.status_code < 500 and store_dump(store) != before:
                problems.append(["a 4xx answer, and the store changed"])
            if problems:
                failures.append(
                    f"{case.method} {case.formatted_path} ({mode.value}, {fixed}) -> {response.status_code} "
                    f"{response.text[:300]}\n    query={case.query!r} body={case.body!r}\n    "
                    + "\n    ".join(line for problem in problems for line in problem)
                )

        try:
            exercise()
        except Unsatisfiable:
            # Nothing to make invalid: an operation without parameters.
            assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be made"

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 40
    for operation in operations:
        for fixed in path_variants(operation.path, operation.method.upper()):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run(operation, mode, fixed)

    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    with capsys.disabled():
        print(
            f"\nschemathesis: {total} requests over {len(operations)} operations in {elapsed:.0f} s; "
            f"answers by status: {dict(sorted(statuses.items()))}; {len(failures)} failures"
        )
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:MAX_FAILURES_SHOWN])
    assert total >= MIN_REQUESTS
    assert not any(status >= 500 for status in statuses)
    # The agent is still well after all that.
    assert shop.request("GET", "/ping/")[:2] == (200, {"ok": "pong"})
