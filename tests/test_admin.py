"""The admin page (issue 5): listing, every form, anti-forgery tokens,
escaping, errors on the page.  Through StubTreq on the real site."""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from surfaces_support import BROKER, FakeSupervisor, Surfaces

from scs import validation as v
from scs.agent import Agent, LocalAgent
from scs.errors import BadParameter
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


def row(body: bytes | str, name: str, kind: str = "instance") -> str:
    """The table row of one local instance (or of one app)."""
    text = body.decode() if isinstance(body, bytes) else body
    opening = f'<tr id="instance-{name}"' if kind == "instance" else f'<tr class="app" data-name="{name}"'
    found = re.search(re.escape(opening) + ".*?</tr>", text, re.S)
    assert found, f"no row for {kind} {name}"
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
    "apps": {
        "name": "foo",
        "broker": BROKER,
        "celery_app": "proj:app",
        "arguments": "-E",
        "env": "A=1",
        "workdir": "default",
        "python": "default",
        "task_events": "true",
    },
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


# -- app settings for the workers: env, workdir, python, task_events ---------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    d = tmp_path / "work"
    d.mkdir(mode=0o755)
    return str(d)


def edit_value(row_html: str, app: str, field: str) -> str:
    """The value an app's edit form holds for a field, unescaped."""
    ident = f"edit-{app}-{field}"
    if field == "env":
        found = re.search(rf'<textarea [^>]*id="{ident}"[^>]*>(.*?)</textarea>', row_html, re.S)
    elif field == "task_events":
        select = re.search(rf'<select [^>]*id="{ident}".*?</select>', row_html, re.S)
        assert select, f"no {ident}"
        found = re.search(r'<option value="([a-z]*)" selected=""', select.group(0))
    else:
        found = re.search(rf'<input [^>]*value="([^"]*)" id="{ident}"', row_html)
    assert found, f"no {ident}"
    return html.unescape(found.group(1))


def error_of(response: Any) -> str:
    found = re.search(r'<div id="error".*?</div>', response.text, re.S)
    assert found, response.text[:3000]
    return html.unescape(found.group(0))


def test_apps_table_shows_the_settings_and_an_edit_form_holding_them(site: Surfaces, workdir: str) -> None:
    site.store.put_app(
        "foo", BROKER, env={"PYTHONPATH": "/srv/foo", "MODE": "a=b c"}, workdir=workdir, python=sys.executable
    )
    site.store.put_app("bar", BROKER, task_events=True)
    body = site.page().text
    foo, bar = row(body, "foo", "app"), row(body, "bar", "app")
    assert re.findall(r"<li><code>(.*?)</code></li>", cell(foo, "env")) == ["MODE=a=b c", "PYTHONPATH=/srv/foo"]
    assert cell(foo, "workdir") == f"<code>{workdir}</code>"
    assert cell(foo, "python") == f"<code>{sys.executable}</code>"
    assert cell(foo, "task-events") == "no"
    assert (cell(bar, "env"), cell(bar, "task-events")) == ("none", "yes")
    assert cell(bar, "workdir") == cell(bar, "python") == "default (the agent's)"
    # The edit form starts from the current values; closed until a refusal.
    assert edit_value(foo, "foo", "env") == "MODE=a=b c\nPYTHONPATH=/srv/foo"
    assert (edit_value(foo, "foo", "workdir"), edit_value(foo, "foo", "python")) == (workdir, sys.executable)
    assert (edit_value(foo, "foo", "task_events"), edit_value(bar, "bar", "task_events")) == ("false", "true")
    assert (edit_value(bar, "bar", "workdir"), edit_value(bar, "bar", "python")) == ("default", "default")
    assert "<details>" in foo and "<details open" not in body
    # How to write env is on the page.
    assert "<code>NAME=value</code> a line" in body and "<code>{}</code> removes them all" in body


def test_put_app_sets_each_setting(site: Surfaces, workdir: str) -> None:
    # A browser sends a textarea's lines with CRLF; blank lines are skipped.
    fields = {"name": "foo", "env": "A=1\r\n\r\nB = x=y \r\n", "workdir": workdir, "task_events": "true"}
    response = site.submit("apps", fields)
    assert (response.code, response.header("location")) == (303, "/admin/?done=app")
    app = site.store.get_app("foo")
    assert (dict(app.env), app.workdir, app.python, app.task_events) == ({"A": "1", "B": " x=y "}, workdir, None, True)
    # The edit form sends them all; empty fields leave a setting as it is.
    assert site.submit("apps", {"name": "foo", "python": sys.executable, "env": "", "workdir": ""}).code == 303
    app = site.store.get_app("foo")
    assert (dict(app.env), app.workdir, app.python, app.task_events) == (
        {"A": "1", "B": " x=y "},
        workdir,
        sys.executable,
        True,
    )
    fields = {"name": "foo", "env": "C=3", "workdir": "default", "python": "default", "task_events": "false"}
    assert site.submit("apps", fields).code == 303
    app = site.store.get_app("foo")
    assert (dict(app.env), app.workdir, app.python, app.task_events) == ({"C": "3"}, None, None, False)
    # A JSON object works too, as the API takes it; {} clears.
    assert site.submit("apps", {"name": "foo", "env": '{"D": "4"}'}).code == 303
    assert dict(site.store.get_app("foo").env) == {"D": "4"}
    assert site.submit("apps", {"name": "foo", "env": "{}"}).code == 303
    assert site.store.get_app("foo").env == ()
    # Blanks only are nothing, as an empty field is.
    site.submit("apps", {"name": "foo", "env": "E=5"})
    assert site.submit("apps", {"name": "foo", "env": " \r\n "}).code == 303
    assert dict(site.store.get_app("foo").env) == {"E": "5"}


def test_the_edit_form_sends_paths_back_unchanged_without_a_check_here(site: Surfaces, tmp_path: Path) -> None:
    """An app's workdir may exist only where its workers run: its edit form
    on another agent's page sends it back as it is, and saving the env must
    not be refused for it.  A path that changes is checked as always."""
    elsewhere = tmp_path / "on-another-machine"
    elsewhere.mkdir()
    assert site.submit("apps", {"name": "foo", "workdir": str(elsewhere)}).code == 303
    elsewhere.rmdir()  # as seen from this machine
    fields = {"name": "foo", "env": "A=1", "workdir": str(elsewhere), "python": "default", "task_events": "false"}
    assert site.submit("apps", fields).code == 303
    app = site.store.get_app("foo")
    assert (dict(app.env), app.workdir) == ({"A": "1"}, str(elsewhere))
    before = site.store.dump()
    response = site.submit("apps", {**fields, "workdir": str(tmp_path / "missing")})
    assert response.code == 400
    assert site.store.dump() == before


def test_a_settings_change_restarts_through_the_agent_as_the_api_does(site: Surfaces) -> None:
    site.submit("apps", {"name": "foo"})
    create(site)
    wakes = site.supervisor.wakes
    assert site.submit("apps", {"name": "foo", "task_events": "true"}).code == 303
    assert site.supervisor.wakes > wakes


def _world_writable(tmp_path: Path) -> str:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    return str(d)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workdir": "WORLD_WRITABLE"}, "is writable by every user"),
        ({"workdir": "relative/dir"}, "workdir must be an absolute path"),
        ({"workdir": "/no/such/dir/for/scs"}, "cannot be used on this agent"),
        ({"python": "/no/such/python"}, "cannot be used on this agent"),
        ({"env": "A=1\nLD_PRELOAD=/tmp/x.so"}, "LD_PRELOAD may not be set for workers"),
        ({"env": "PYTHONSTARTUP=/tmp/x.py"}, "PYTHONSTARTUP may not be set for workers"),
        ({"env": "BASH_ENV=/tmp/x"}, "BASH_ENV may not be set"),
        ({"env": "PYTHONPATH=WORLD_WRITABLE"}, "writable by every user"),
        ({"env": "1A=x"}, "variable name '1A' must be ASCII letters"),
        ({"env": "A=bell\x07"}, "the value of A must be printable"),
        ({"env": "A=1\njust words"}, "env: line 2 is not NAME=value"),
        ({"env": "A=1\nA=2"}, "env: 'A' is given twice"),
        ({"env": '{"A": 1}'}, "the value of A must be a string"),
        ({"task_events": "maybe"}, "task_events must be true or false"),
    ],
)
def test_bad_settings_are_refused_on_the_page_and_nothing_is_stored(
    site: Surfaces, tmp_path: Path, workdir: str, fields: dict[str, str], message: str
) -> None:
    shared = _world_writable(tmp_path)
    fields = {k: val.replace("WORLD_WRITABLE", shared) for k, val in fields.items()}
    assert site.submit("apps", {"name": "foo", "env": "KEEP=1", "workdir": workdir}).code == 303
    before = site.store.dump()
    for app in ("foo", "bar"):  # an existing app and a new one
        # Good settings alongside the bad one: none of them is stored.
        response = site.submit("apps", {"name": app, "celery_app": "other:app", "task_events": "true", **fields})
        assert response.code == 400
        assert response.header("content-type") == "text/html; charset=utf-8"
        assert message in error_of(response)
        assert "Traceback" not in response.text
        assert site.store.dump() == before
    # The existing app's form opens again with what was sent, to correct it.
    response = site.submit("apps", {"name": "foo", **fields})
    row_html = row(response.text, "foo", "app")
    assert "<details open" in row_html
    for name, value in fields.items():
        if name != "task_events":  # a menu: what it cannot offer shows in the error box only
            assert edit_value(row_html, "foo", name) == value


def test_the_page_refuses_what_the_api_refuses_with_the_same_message(site: Surfaces, tmp_path: Path) -> None:
    shared = _world_writable(tmp_path)
    for fields, check in [
        ({"workdir": shared}, lambda: v.check_workdir(shared)),
        ({"python": shared}, lambda: v.check_python(shared)),
        ({"env": "LD_PRELOAD=/x.so"}, lambda: v.check_env({"LD_PRELOAD": "/x.so"}, on_this_machine=True)),
        ({"env": "ALLOWED_NOT=1\nPYTHONWARNINGS=x"}, lambda: v.check_env({"PYTHONWARNINGS": "x"})),
    ]:
        with pytest.raises(BadParameter) as refused:
            check()
        response = site.submit("apps", {"name": "foo", **fields})
        assert response.code == 400
        assert refused.value.message in error_of(response)
    assert site.store.list_apps() == []


def test_env_values_and_paths_come_back_escaped(site: Surfaces, tmp_path: Path) -> None:
    hostile = tmp_path / "<i>w\"'&"
    hostile.mkdir(mode=0o755)
    # Through the form: an env value and a path may hold markup.
    fields = {"name": "foo", "env": f"X={PAYLOAD}\nY=</textarea>{PAYLOAD}", "workdir": str(hostile)}
    assert site.submit("apps", fields).code == 303
    # And what a store may hold without the checks (an older agent, a peer's copy).
    site.store.put_app("bar", BROKER, env={"Z": '"><script>x</script>'}, workdir="/<b>", python="/<u>/python")
    body = site.page().text
    assert re.search(r"<script|<i>|<b>|<u>", body, re.I) is None, body
    assert body.count("</textarea>") == body.count("<textarea ")
    foo = row(body, "foo", "app")
    assert "X=&lt;script&gt;alert(1)&lt;/script&gt;" in cell(foo, "env")
    assert edit_value(foo, "foo", "env") == f"X={PAYLOAD}\nY=</textarea>{PAYLOAD}"
    assert edit_value(foo, "foo", "workdir") == str(hostile)
    assert "/&lt;i&gt;w\"'&amp;</code>" in cell(foo, "workdir")
    bar = row(body, "bar", "app")
    assert edit_value(bar, "bar", "env") == 'Z="><script>x</script>'
    assert (edit_value(bar, "bar", "workdir"), edit_value(bar, "bar", "python")) == ("/<b>", "/<u>/python")
    # A refused form shows what was sent, escaped, in the error box and the form.
    response = site.submit("apps", {"name": "foo", "env": f"LD_PRELOAD={PAYLOAD}", "python": PAYLOAD})
    assert response.code == 400
    assert re.search(r"<script", response.text, re.I) is None
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text


def test_settings_forms_need_the_token_and_this_site(site: Surfaces, workdir: str) -> None:
    site.submit("apps", {"name": "foo", "env": "A=1"})
    body = site.page().text
    edit = re.search(r'<form [^>]*class="edit-app".*?</form>', body, re.S)
    assert edit and f'name="csrf" value="{site.csrf()}"' in edit.group(0)
    before = site.store.dump()
    fields = {"name": "foo", "env": "B=2", "workdir": workdir, "python": sys.executable, "task_events": "true"}
    response = site.submit("apps", fields, csrf=False)
    assert response.code == 403 and "anti-forgery token" in response.text
    assert site.submit("apps", fields, headers={"Origin": "http://evil.example"}).code == 403
    assert site.submit("apps", fields, headers={"Sec-Fetch-Site": "cross-site"}).code == 403
    assert site.store.dump() == before
