"""The admin page in headless Chromium against a real agent and real Celery
workers (issue 5, acceptance 1).

Debian's ``chromium`` driven by Playwright (never a downloaded browser).
Every step is checked on the page and on the real worker, through the
test's own Celery client, and photographed under ``test-output/``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agents import AgentProcess, kill_leftover_workers, pid_alive, wait_until, worker_pids
from tests.integration.celery_probe import active_queues, inspect, of_instance, ping

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "admin-browser"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium package (make test installs it)"
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path / "agent", "admin-browser", "--without-srs", "--interval", "1")
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        kill_leftover_workers(agent.directory)


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(java_script_enabled=False, viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            # Creating an instance waits for the worker's first ping.
            page.set_default_timeout(45_000)
            yield page
        finally:
            browser.close()


def shoot(page: Any, step: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{step}.png"), full_page=True)


def cell(row: Any, css_class: str) -> str:
    return row.locator(f"td.{css_class}").inner_text().strip()


def stats(name: str) -> dict[str, Any] | None:
    return of_instance(inspect(name).stats(), name)


def test_admin_page_drives_a_real_worker(agent: AgentProcess, page: Any) -> None:
    name = f"browser-{uuid.uuid4().hex[:8]}"
    queue = f"bq-{uuid.uuid4().hex[:6]}"
    page.goto(agent.url + "/admin/")
    assert page.title() == "SCS agent admin-browser"
    assert "No instances on this agent." in page.inner_text("#local")
    shoot(page, "0-empty")

    # Create (no JavaScript: a plain form POST and a 303 back to the page).
    page.fill("#create-app", "foo")
    page.fill("#create-name", name)
    page.fill("#create-max_concurrency", "1")
    page.fill("#create-min_concurrency", "1")
    with page.expect_navigation():
        page.click("#create-instance button[type=submit]")
    assert page.url.endswith("/admin/?done=create"), page.inner_text("body")[:2000]
    assert page.inner_text("#notice") == "Instance created."
    row = page.locator(f'tr[data-name="{name}"]')
    assert cell(row, "state") == "running"
    assert cell(row, "enabled") == "yes"
    pid = int(cell(row, "pid"))
    assert worker_pids(agent.directory)[name] == pid and pid_alive(pid)
    assert wait_until(lambda: ping(name), 20, what="the new worker to answer a ping")
    shoot(page, "1-created")

    # Add a queue.
    row.locator('form[data-action="consume"] input[name="queue"]').fill(queue)
    with page.expect_navigation():
        row.locator('form[data-action="consume"] button').click()
    assert page.inner_text("#notice") == "Queue added to the instance."
    row = page.locator(f'tr[data-name="{name}"]')
    assert row.locator("span.queue").all_inner_texts() == [queue]
    wait_until(
        lambda: queue in [q["name"] for q in active_queues(name) or ()],
        30,
        interval=0.5,
        what=f"the worker to consume from {queue}",
    )
    shoot(page, "2-queue-added")

    # Set autoscale.
    form = row.locator('form[data-action="autoscale"]')
    form.locator('input[name="max"]').fill("3")
    form.locator('input[name="min"]').fill("2")
    with page.expect_navigation():
        form.locator("button").click()
    assert page.inner_text("#notice") == "Autoscale set."
    row = page.locator(f'tr[data-name="{name}"]')
    assert cell(row, "concurrency") == "2–3"
    wait_until(
        lambda: (
            (stats(name) or {}).get("autoscaler", {}).get("max") == 3
            and (stats(name) or {}).get("autoscaler", {}).get("min") == 2
        ),
        30,
        interval=0.5,
        what="the worker's autoscaler to be 3,2",
    )
    shoot(page, "3-autoscaled")

    # Disable: the worker is shut down, the row stays.
    with page.expect_navigation():
        row.locator('form[data-action="disable"] button').click()
    assert page.inner_text("#notice") == "Instance disabled."
    row = page.locator(f'tr[data-name="{name}"]')
    assert cell(row, "enabled") == "no"
    assert row.locator('form[data-action="enable"]').count() == 1
    wait_until(lambda: not pid_alive(pid), 30, what=f"worker pid {pid} to exit")
    assert not ping(name)
    page.goto(agent.url + "/admin/")
    row = page.locator(f'tr[data-name="{name}"]')
    assert cell(row, "state") == "stopped"
    assert cell(row, "pid") == ""
    shoot(page, "4-disabled")

    # Delete.
    with page.expect_navigation():
        row.locator('form[data-action="delete"] button').click()
    assert page.inner_text("#notice") == "Instance deleted."
    assert page.locator(f'tr[data-name="{name}"]').count() == 0
    assert "No instances on this agent." in page.inner_text("#local")
    status, body, _ = agent.request("GET", f"/foo/instances/{name}/")
    assert status == 404, body
    assert not ping(name)
    shoot(page, "5-deleted")


def test_bad_input_and_forgery_in_the_browser(agent: AgentProcess, page: Any) -> None:
    page.goto(agent.url + "/admin/")
    page.fill("#create-app", "foo")
    page.fill("#create-name", "<script>alert(1)</script>")
    with page.expect_navigation():
        page.click("#create-instance button[type=submit]")
    error = page.inner_text("#error")
    assert "instance may only hold" in error
    assert "<script>alert(1)</script>" in error  # shown as text, not run
    assert page.locator("script").count() == 0
    shoot(page, "6-bad-input")

    # A page from another origin posting to the agent is refused: the
    # site-wide guard answers 403 before the admin page's own anti-forgery
    # check is reached (which the unit tests of the admin page cover).
    evil = page.context.new_page()
    evil.set_content(
        f'<form method="post" action="{agent.url}/admin/apps">'
        '<input name="name" value="evil"><input type="hidden" name="csrf" value="0"></form>'
    )
    with evil.expect_navigation() as navigation:
        evil.locator("input[name=name]").press("Enter")
    assert navigation.value.status == 403
    assert "request refused" in evil.inner_text("body")
    status, _, _ = agent.request("GET", "/evil/")
    assert status == 404
