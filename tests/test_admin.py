"""The admin page (issue 5): listing, every form, anti-forgery tokens,
escaping, errors on the page.  Through StubTreq on the real site."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import pytest
from surfaces_support import BROKER, FakeSupervisor, Surfaces

from scs.agent import Agent, LocalAgent
from scs.records import WorkerStatus
from scs.store import Store

PAYLOAD = "<script>alert(1)</script>"


@pytest.fixture
def site() -> Surfaces:
    return Surfaces()


def create(site: Surfaces, name: str = "w1", **fields: str) -> None:
    form = {"app": "foo", "name": name, "max_concurrency": "2", "min_concurrency": "1"}
    form.update(fields)
    response = site.submit("instances", form)
    assert response.code == 303, response.text
    assert response.header("location") == "/admin/?done=create"


def row(body: bytes, name: str) -> str:
    """The table row of one local instance."""
    found = re.search(rf'<tr id="instance-{re.escape(name)}".*?</tr>', body.decode(), re.S)
    assert found, f"no row for {name}"
    return found.group(0)


def cell(row_html: str, css_class: str) -> str:
    found = re.search(rf'<td class="{css_class}[^"]*">(.*?)</td>', row_html, re.S)
    assert found, f"no {css_class} cell"
    return found.group(1)


# -- the page -----------------------------------------------------------------


def test_page_is_html_with_protective_headers(site: Surfaces) -> None:
    response = site.page()
    assert response.code == 200
    assert response.header("content-type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.header("content-security-policy")
    assert response.header("x-frame-options") == "DENY"
    assert response.header("x-content-type-options") == "nosniff"
    assert response.body.startswith(b"<!DOCTYPE html>")
    assert "SCS agent <code>agent1</code>" in response.text
    cookie = response.header("set-cookie")
    assert "scs_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_page_lists_instances_with_state_pid_restarts_queues_concurrency(site: Surfaces) -> None:
    create(site, "w1", queues="tasks,mail", max_concurrency="4", min_concurrency="2")
    site.supervisor.states["w1"] = WorkerStatus(state="unresponsive", pid=777, restarts=3)
    html = row(site.page().body, "w1")
    assert cell(html, "state") == "unresponsive"
    assert cell(html, "pid") == "777"
    assert cell(html, "restarts") == "3"
    assert cell(html, "concurrency") == "2–4"
    assert cell(html, "enabled") == "yes"
    assert re.findall(r'<span class="queue">(.*?)</span>', html) == ["tasks", "mail"]


def test_every_instance_row_has_its_forms(site: Surfaces) -> None:
    create(site)
    actions = re.findall(r'data-action="([a-z]+)"', row(site.page().body, "w1"))
    assert sorted(set(actions)) == ["autoscale", "consume", "delete", "disable", "restart"]
    site.submit("instance/disable", {"app": "foo", "name": "w1"})
    actions = re.findall(r'data-action="([a-z]+)"', row(site.page().body, "w1"))
    assert "enable" in actions and "disable" not in actions


def test_every_form_carries_the_anti_forgery_token(site: Surfaces) -> None:
    create(site)
    site.submit("queues", {"app": "foo", "name": "tasks"})
    body = site.page().text
    forms = re.findall(r"<form .*?</form>", body, re.S)
    assert len(forms) >= 9
    token = site.csrf()
    for form in forms:
        assert f'name="csrf" value="{token}"' in form, form[:200]


def test_other_agents_instances_are_shown_read_only() -> None:
    class ClusterAgent(Agent):
        async def instance_details(self) -> Any:
            local = self.local.instance_details()
            theirs = [
                {
                    "name": "far-away",
                    "app": "foo",
                    "state": "running",
                    "is_enabled": True,
                    "pid": 99,
                    "restarts": 1,
                    "min_concurrency": 1,
                    "max_concurrency": 3,
                    "queues": ["q1"],
                }
            ]
            return {"agent1": local, "agent2": theirs}, ("agent3",)

    agent = ClusterAgent(LocalAgent(Store.in_memory(), "agent1", BROKER, FakeSupervisor()))
    site = Surfaces(agent=agent)
    body = site.page().text
    others = re.search(r'<section id="others">.*?</section>', body, re.S).group(0)
    assert "far-away" in others and "agent2" in others and "q1" in others and "1–3" in others
    assert "<form" not in others
    assert "These agents did not answer: agent3" in others
    assert 'id="instance-far-away"' not in body


def test_a_failing_cluster_listing_still_shows_this_agent() -> None:
    class Broken(Agent):
        async def instance_details(self) -> Any:
            raise RuntimeError("SRS exploded")

    agent = Broken(LocalAgent(Store.in_memory(), "agent1", BROKER, FakeSupervisor()))
    site = Surfaces(agent=agent)
    create(site)
    response = site.page()
    assert response.code == 200
    assert 'id="instance-w1"' in response.text
    assert "SRS exploded" not in response.text


def test_notice_after_redirect_comes_from_a_fixed_list(site: Surfaces) -> None:
    assert 'id="notice"' in site.request("GET", "/admin/?done=create").text
    response = site.request("GET", "/admin/?done=" + quote(PAYLOAD))
    assert 'id="notice"' not in response.text
    assert "alert(1)" not in response.text


def test_unknown_page_and_wrong_method(site: Surfaces) -> None:
    response = site.request("GET", "/admin/nothing-here")
    assert response.code == 404
    assert "No such page." in response.text
    response = site.request("GET", "/admin/instances")
    assert response.code == 405
    assert response.header("allow") == "POST"


# -- the forms ------------------------------------------------------------------


def test_create_instance(site: Surfaces) -> None:
    create(site, "w1", queues="tasks", arguments="--without-heartbeat", broker="amqp://u:p@h:5673/v")
    spec = site.store.get_node("w1")
    assert (spec.app, spec.max_concurrency, spec.min_concurrency) == ("foo", 2, 1)
    assert spec.queue_names == ("tasks",)
    assert spec.node_arguments == ("--without-heartbeat",)
    assert (spec.broker.userid, spec.broker.hostname, spec.broker.port) == ("u", "h", 5673)
    assert site.supervisor.wakes >= 1
    page = site.page().text
    assert 'id="notice"' not in page  # the notice is on the redirect target only
    assert "p@h" not in page and "u@h:5673/v" in page  # the password is never shown


def test_create_with_a_random_name(site: Surfaces) -> None:
    response = site.submit("instances", {"app": "foo", "name": "", "max_concurrency": "1", "min_concurrency": "1"})
    assert response.code == 303
    assert len(site.store.list_nodes()) == 1


def test_delete_enable_disable_restart(site: Surfaces) -> None:
    create(site)
    assert site.submit("instance/disable", {"app": "foo", "name": "w1"}).code == 303
    assert site.store.get_node("w1").is_enabled is False
    assert site.submit("instance/enable", {"app": "foo", "name": "w1"}).code == 303
    assert site.store.get_node("w1").is_enabled is True
    assert site.submit("instance/restart", {"app": "foo", "name": "w1"}).code == 303
    assert site.supervisor.restarted == ["w1"]
    response = site.submit("instance/delete", {"app": "foo", "name": "w1"})
    assert (response.code, response.header("location")) == (303, "/admin/?done=delete")
    assert site.store.list_nodes() == []
    assert "No instances on this agent." in site.page().text


def test_autoscale(site: Surfaces) -> None:
    create(site)
    assert site.submit("instance/autoscale", {"app": "foo", "name": "w1", "max": "8", "min": "3"}).code == 303
    spec = site.store.get_node("w1")
    assert (spec.max_concurrency, spec.min_concurrency) == (8, 3)
    assert cell(row(site.page().body, "w1"), "concurrency") == "3–8"


def test_add_and_remove_queue(site: Surfaces) -> None:
    create(site)
    assert site.submit("instance/consume", {"app": "foo", "name": "w1", "queue": "tasks"}).code == 303
    assert site.store.get_node("w1").queue_names == ("tasks",)
    assert site.submit("instance/cancel", {"app": "foo", "name": "w1", "queue": "tasks"}).code == 303
    assert site.store.get_node("w1").queue_names == ()


def test_declare_and_delete_queue(site: Surfaces) -> None:
    fields = {
        "app": "foo",
        "name": "tasks",
        "exchange": "ex",
        "routing_key": "rk.*",
        "exchange_type": "topic",
        "options": '{"durable": true}',
    }
    assert site.submit("queues", fields).code == 303
    binding = site.store.get_queue("foo", "tasks")
    assert (binding.exchange, binding.routing_key, binding.exchange_type) == ("ex", "rk.*", "topic")
    assert binding.options == {"durable": True}
    assert 'data-name="tasks"' in site.page().text
    assert site.submit("queues/delete", {"app": "foo", "name": "tasks"}).code == 303
    assert site.store.find_queue("foo", "tasks") is None


def test_put_app(site: Surfaces) -> None:
    fields = {"name": "foo", "broker": "amqp://a:b@rabbit:5672//", "celery_app": "proj.celery:app", "arguments": "-E"}
    assert site.submit("apps", fields).code == 303
    app = site.store.get_app("foo")
    assert (app.broker.hostname, app.celery_app, app.arguments) == ("rabbit", "proj.celery:app", ("-E",))


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "fields", "message"),
    [
        ("instances", {"app": "foo", "name": "w 1"}, "instance may only hold"),
        ("instances", {"app": "foo", "max_concurrency": "1", "min_concurrency": "5"}, "is greater than"),
        ("instances", {"app": "admin"}, "the path is taken"),
        ("instances", {"app": "foo", "arguments": "--pidfile=/x"}, "cannot be overridden"),
        ("instance/autoscale", {"app": "foo", "name": "w1", "max": "many"}, "max must be an integer"),
        ("instance/autoscale", {"app": "foo", "name": "w1", "max": "", "min": ""}, "give max, min or both"),
        ("instance/delete", {"app": "foo", "name": "nope"}, "no instance named"),
        ("instance/explode", {"app": "foo", "name": "w1"}, "unknown action"),
        ("queues", {"app": "foo", "name": "q", "options": "[1]"}, "options must be a JSON object"),
        ("apps", {"name": "foo", "broker": "http://x"}, "must start with amqp://"),
        ("instances", {"app": "foo", "extra": "x"}, "unknown parameter: extra"),
    ],
)
def test_bad_input_shows_the_error_on_the_page_and_changes_nothing(
    site: Surfaces, action: str, fields: dict[str, str], message: str
) -> None:
    create(site)
    before = site.store.dump()
    response = site.submit(action, fields)
    assert 400 <= response.code < 500
    assert response.header("content-type") == "text/html; charset=utf-8"
    error = re.search(r'<div id="error".*?</div>', response.text, re.S)
    assert error and message in error.group(0).replace("&#x27;", "'"), response.text[:3000]
    assert "Traceback" not in response.text
    assert site.store.dump() == before


def test_a_failed_create_keeps_what_was_typed(site: Surfaces) -> None:
    response = site.submit("instances", {"app": "foo", "name": "w1", "max_concurrency": "x", "queues": "a,b"})
    assert response.code == 400
    assert 'id="create-queues" value="a,b"' in response.text or 'value="a,b" id="create-queues"' in response.text


def test_conflicting_create_is_shown_as_an_error(site: Surfaces) -> None:
    create(site)
    response = site.submit("instances", {"app": "foo", "name": "w1", "max_concurrency": "9", "min_concurrency": "1"})
    assert response.code == 409
    assert "exists with other settings" in response.text


# -- cross-site request forgery ------------------------------------------------------


def test_a_form_without_the_token_is_refused_and_changes_nothing(site: Surfaces) -> None:
    create(site)
    before = site.store.dump()
    for action, fields in [
        ("instances", {"app": "foo", "name": "w2"}),
        ("instance/delete", {"app": "foo", "name": "w1"}),
        ("instance/disable", {"app": "foo", "name": "w1"}),
        ("instance/autoscale", {"app": "foo", "name": "w1", "max": "5"}),
        ("instance/consume", {"app": "foo", "name": "w1", "queue": "q"}),
        ("queues", {"app": "foo", "name": "q"}),
        ("apps", {"name": "bar"}),
    ]:
        response = site.submit(action, fields, csrf=False)
        assert response.code == 403, action
        assert "anti-forgery token" in response.text
    assert site.store.dump() == before


def test_a_wrong_or_borrowed_token_is_refused(site: Surfaces) -> None:
    token = site.csrf()
    before = site.store.dump()
    wrong = ("0" if token[0] != "0" else "1") + token[1:]
    assert site.submit("apps", {"name": "bar"}, csrf=wrong).code == 403
    # A token is bound to the browser's cookie: another browser's is no good.
    other = Surfaces(agent=site.agent)
    other.transport, other.client = site.transport, site.client
    other.csrf()
    assert other.cookies["scs_csrf"] != site.cookies["scs_csrf"]
    assert other.submit("apps", {"name": "bar"}, csrf=token).code == 403
    # Nor is a token sent without any cookie.
    site.cookies.clear()
    assert site.submit("apps", {"name": "bar"}, csrf=token).code == 403
    assert site.store.dump() == before


def test_a_form_posted_from_another_site_is_refused(site: Surfaces) -> None:
    before = site.store.dump()
    response = site.submit("apps", {"name": "bar"}, headers={"Origin": "http://evil.example"})
    assert response.code == 403
    assert site.store.dump() == before
    response = site.submit("apps", {"name": "bar"}, headers={"Origin": "http://127.0.0.1:8001"})
    assert response.code == 303


# -- escaping ------------------------------------------------------------------------------

FORMS = {
    "apps": {"name": "foo", "broker": BROKER, "celery_app": "proj:app", "arguments": "-E"},
    "instances": {
        "app": "foo",
        "name": "w2",
        "max_concurrency": "1",
        "min_concurrency": "1",
        "queues": "q1",
        "broker": BROKER,
        "arguments": "-E",
    },
    "instance/delete": {"app": "foo", "name": "w1"},
    "instance/enable": {"app": "foo", "name": "w1"},
    "instance/disable": {"app": "foo", "name": "w1"},
    "instance/restart": {"app": "foo", "name": "w1"},
    "instance/autoscale": {"app": "foo", "name": "w1", "max": "2", "min": "1"},
    "instance/consume": {"app": "foo", "name": "w1", "queue": "q2"},
    "instance/cancel": {"app": "foo", "name": "w1", "queue": "q2"},
    "queues": {
        "app": "foo",
        "name": "q3",
        "exchange": "ex",
        "routing_key": "rk",
        "exchange_type": "direct",
        "options": "{}",
    },
    "queues/delete": {"app": "foo", "name": "q3"},
}


@pytest.mark.parametrize(("action", "field"), [(action, field) for action, fields in FORMS.items() for field in fields])
def test_script_through_every_form_field_comes_back_escaped(site: Surfaces, action: str, field: str) -> None:
    create(site)
    fields = dict(FORMS[action])
    fields[field] = PAYLOAD
    response = site.submit(action, fields)
    if response.code == 303:
        # Accepted (free text such as worker arguments): it shows on the page.
        response = site.page()
    assert re.search(r"<script", response.text, re.I) is None, response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text


def test_user_supplied_values_that_are_stored_are_shown_escaped(site: Surfaces) -> None:
    site.submit("apps", {"name": "foo", "broker": "amqp://%3Cb%3Ex:pw@h//"})
    create(site, "w1", broker="amqp://%3Ci%3E:pw@h//")
    # The forms refuse worker arguments with markup now (an allow-list of
    # options), but a store written before the allow-list may hold them.
    site.store.put_app("foo", BROKER, arguments=[PAYLOAD])
    site.store.add_node("foo", "w2", BROKER, arguments=["--x=" + PAYLOAD.replace(" ", "")])
    body = site.page().text
    assert re.search(r"<script|<b>|<i>", body, re.I) is None
    assert "&lt;b&gt;x@h:5672" in body and "&lt;i&gt;@h:5672" in body
    assert "--x=&lt;script&gt;" in body


def test_the_login_token_is_never_echoed() -> None:
    site = Surfaces(token="the-right-token-0123456789")
    response = site.submit("login", {"token": PAYLOAD})
    assert response.code == 401
    assert "alert(1)" not in response.text
