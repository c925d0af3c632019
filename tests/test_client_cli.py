"""Issue 12: the ``scs`` command line and ``scs.client.Client``, against a
recorded fake agent (``httpx.MockTransport``): requests sent, tables and
JSON printed, exit statuses, error messages; bad input is a usage error
(exit 2) naming the argument, with nothing sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

import scs.cli
from scs.cli import cli
from scs.client import AgentUnreachable, APIError, Client, TokenFileError, read_token_file

TOKEN = "s3cret-token-of-the-cluster"


def instance(name: str, app: str = "foo", agent: str = "agent1", **extra: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "is_enabled": True,
        "queues": ["tasks"],
        "broker": {"hostname": "127.0.0.1", "port": 5672, "userid": "guest", "password": "********"},
        "max_concurrency": 2,
        "min_concurrency": 1,
        "app": app,
        "agent": agent,
        "state": "running",
        "pid": 1234,
        "restarts": 0,
        "arguments": [],
        "node": f"{name}@host",
    }
    body.update(extra)
    return body


class FakeAgent:
    """Answers ``(method, path)`` from a table; records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response] | httpx.Response] = {}

    def on(self, method: str, path: str, body: Any = None, status: int = 200, **headers: str) -> None:
        self.routes[(method, path)] = httpx.Response(status, json=body, headers=headers)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.raw_path.decode("ascii").split("?")[0]))
        if answer is None:
            return httpx.Response(404, json={"error": "no such resource"})
        return answer(request) if callable(answer) else answer

    @property
    def sent(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.raw_path.decode("ascii")) for r in self.requests]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content or b"null")


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeAgent:
    fake = FakeAgent()

    def client(*args: Any, **kwargs: Any) -> Client:
        return Client(*args, transport=httpx.MockTransport(fake.handler), **kwargs)

    monkeypatch.setattr(scs.cli, "Client", client)
    monkeypatch.delenv("SCS_URL", raising=False)
    monkeypatch.delenv("SCS_TOKEN_FILE", raising=False)
    return fake


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, prog_name="scs")


# -- usage errors: exit 2, the argument named, nothing sent -------------------

USAGE_ERRORS = [
    (["scale", "w1", "0"], "'MAX'"),
    (["scale", "w1", "2", "3"], "'MIN'"),
    (["scale", "w1", "many"], "'MAX'"),
    (["scale", "w1"], "'MAX'"),
    (["add"], "'APP'"),
    (["add", "foo", "--max", "0"], "'--max'"),
    (["add", "foo", "--max", "2", "--min", "3"], "'--min'"),
    (["add", "foo", "-q", "dq.private"], "'-q' / '--queues'"),
    (["add", "foo", "-q", "a,,b"], "'-q' / '--queues'"),
    (["add", "ping"], "'APP'"),
    (["add", "foo", "bad name"], "'[NAME]'"),
    (["add", "foo", "--colour"], "--colour"),
    (["ls", "a b"], "'[APP]'"),
    (["rm", "a/b/c"], "'NAME'"),
    (["rm", ""], "'NAME'"),
    (["stats", "w1;rm"], "'NAME'"),
    (["log", "w1", "-n", "0"], "'-n' / '--lines'"),
    (["log", "w1", "-n", "10001"], "'-n' / '--lines'"),
    (["consume", "w1", "amq.gen"], "'QUEUE'"),
    (["restart-app"], "'APP'"),
    (["declare-queue", "foo", "tasks", "--type", "round"], "'--type'"),
    (["declare-queue", "foo", "tasks", "--routing-key", "a b"], "'--routing-key'"),
    (["delete-queue", "foo", "dq.w1"], "'QUEUE'"),
    (["--url", "ftp://somewhere", "apps"], "'--url'"),
    (["--url", "http://127.0.0.1:99999", "apps"], "'--url'"),
    (["--timeout", "0", "apps"], "'--timeout'"),
    (["--token-file", "/nonexistent/token", "apps"], "'--token-file'"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize(("argv", "named"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_name_the_argument_and_send_nothing(agent: FakeAgent, argv: list[str], named: str) -> None:
    result = run(*argv)
    assert result.exit_code == 2, result.output
    assert named in result.stderr
    assert "Usage: scs" in result.stderr
    assert result.stdout == ""
    assert agent.sent == []


def test_an_empty_token_file_is_a_usage_error(agent: FakeAgent, tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = run("apps", env={"SCS_TOKEN_FILE": str(empty)})
    assert result.exit_code == 2
    assert "is empty" in result.stderr
    assert agent.sent == []


def test_every_subcommand_has_help(agent: FakeAgent) -> None:
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        result = run(name, "--help")
        assert result.exit_code == 0, name
        assert f"Usage: scs {name}" in result.stdout
    assert agent.sent == []


def test_shell_completion_of_apps_and_instances(agent: FakeAgent) -> None:
    two_agents(agent)

    def complete(words: str, cword: int) -> str:
        env = {"_SCS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return run(env=env).stdout

    assert complete("scs ls f", 2) == "plain,foo\n"
    assert complete("scs restart w", 2) == "plain,w1\nplain,w2\n"
    assert complete("scs restart-", 1) == "plain,restart-app\n"


def test_shell_completion_stays_quiet_without_an_agent(agent: FakeAgent) -> None:
    env = {"_SCS_COMPLETE": "bash_complete", "COMP_WORDS": "scs ls ", "COMP_CWORD": "2"}
    result = run(env=env)
    assert (result.exit_code, result.stdout.strip(), result.stderr) == (0, "", "")


# -- what is sent ----------------------------------------------------------


def test_add_sends_the_settings_and_prints_the_instance(agent: FakeAgent) -> None:
    agent.on("PUT", "/foo/instances/w1/", instance("w1", queues=["tasks", "other"]), 201)
    result = run("add", "foo", "w1", "-q", "tasks,other", "--max", "3", "--min", "1")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("PUT", "/foo/instances/w1/")]
    assert agent.body() == {"queues": "tasks,other", "max_concurrency": 3, "min_concurrency": 1}
    header, row = result.stdout.splitlines()
    assert header.split() == ["APP", "NAME", "AGENT", "STATE", "PID", "RESTARTS", "QUEUES", "ENABLED", "MAX", "MIN"]
    assert row.split() == ["foo", "w1", "agent1", "running", "1234", "0", "tasks,other", "yes", "2", "1"]


def test_add_without_name_and_nowait(agent: FakeAgent) -> None:
    agent.on("PUT", "/foo/instances/", instance("random-1", state="starting", pid=None), 202)
    result = run("add", "foo", "--nowait", "--json")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("PUT", "/foo/instances/")]
    assert agent.body() == {"nowait": True}
    assert json.loads(result.stdout)["name"] == "random-1"


def test_rm_deletes_by_name_or_app_and_name(agent: FakeAgent) -> None:
    agent.on("DELETE", "/instances/w1/", instance("w1", state="stopped", pid=None))
    agent.on("DELETE", "/foo/instances/w1/", instance("w1", state="stopped", pid=None))
    assert run("rm", "w1").exit_code == 0
    assert run("rm", "foo/w1").exit_code == 0
    assert agent.sent == [("DELETE", "/instances/w1/"), ("DELETE", "/foo/instances/w1/")]


def test_a_name_alone_is_looked_up_for_its_app(agent: FakeAgent) -> None:
    agent.on("GET", "/instances/w1/", instance("w1", app="bar"))
    agent.on("GET", "/bar/instances/w1/stats/", {"pool": {"max-concurrency": 2}, "pid": 99})
    result = run("stats", "w1")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("GET", "/instances/w1/"), ("GET", "/bar/instances/w1/stats/")]
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["KEY", "VALUE"],
        ["pid", "99"],
        ["pool.max-concurrency", "2"],
    ]


def test_app_slash_name_skips_the_lookup(agent: FakeAgent) -> None:
    agent.on("POST", "/foo/instances/w1/autoscale/", {"max": 4, "min": 2})
    result = run("scale", "foo/w1", "4", "2")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("POST", "/foo/instances/w1/autoscale/")]
    assert agent.body() == {"max": 4, "min": 2}
    assert result.stdout.splitlines()[1].split() == ["w1", "4", "2"]


def test_scale_without_min_keeps_it(agent: FakeAgent) -> None:
    agent.on("POST", "/foo/instances/w1/autoscale/", {"max": 4, "min": 1})
    assert run("scale", "foo/w1", "4").exit_code == 0
    assert agent.body() == {"max": 4}


@pytest.mark.parametrize("operation", ["enable", "disable", "restart"])
def test_instance_operations(agent: FakeAgent, operation: str) -> None:
    agent.on("POST", f"/foo/instances/w1/{operation}/", instance("w1"))
    result = run(operation, "foo/w1")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("POST", f"/foo/instances/w1/{operation}/")]


def test_consume_and_cancel(agent: FakeAgent) -> None:
    agent.on("PUT", "/foo/instances/w1/queues/tasks/", {"ok": "ok"}, 201)
    agent.on("DELETE", "/foo/instances/w1/queues/tasks/", {"ok": "ok"})
    assert run("consume", "foo/w1", "tasks").stdout == "w1 consumes from tasks\n"
    assert run("cancel", "foo/w1", "tasks").stdout == "w1 no longer consumes from tasks\n"
    assert agent.sent == [("PUT", "/foo/instances/w1/queues/tasks/"), ("DELETE", "/foo/instances/w1/queues/tasks/")]


def test_log_prints_the_lines(agent: FakeAgent) -> None:
    agent.on("GET", "/foo/instances/w1/log/", {"name": "w1", "agent": "agent1", "lines": ["one", "[two]"]})
    result = run("log", "foo/w1", "-n", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "one\n[two]\n"
    assert agent.sent == [("GET", "/foo/instances/w1/log/?lines=2")]


def test_non_ascii_names_are_escaped_in_the_path(agent: FakeAgent) -> None:
    agent.on("GET", "/f%C3%B6%C3%B6/instances/w%C3%B6rker/log/", {"name": "wörker", "agent": "a", "lines": ["ü"]})
    result = run("log", "föö/wörker")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "ü\n"


def test_restart_app_rolling(agent: FakeAgent) -> None:
    agent.on("POST", "/foo/restart/", {"instances": ["w1", "w2"], "failed": {}, "skipped": []})
    result = run("restart-app", "foo", "--rolling")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("POST", "/foo/restart/?rolling=1")]
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAME", "RESULT"],
        ["w1", "restarted"],
        ["w2", "restarted"],
    ]


def test_restart_app_with_a_failure_exits_1(agent: FakeAgent) -> None:
    agent.on("POST", "/foo/restart/", {"instances": ["w1"], "failed": {"w2": "no ping in 15 s"}, "skipped": ["w3"]})
    result = run("restart-app", "foo", "--rolling")
    assert result.exit_code == 1
    assert "w2" in result.stdout and "failed: no ping in 15 s" in result.stdout and "skipped" in result.stdout
    assert "1 instance(s) of foo failed to restart: w2" in result.stderr


def two_agents(agent: FakeAgent) -> None:
    agent.on("GET", "/", ["foo", "bar"])
    agent.on("GET", "/foo/instances/", [instance("w2", agent="agent2", state="starting"), instance("w1")])
    agent.on("GET", "/bar/instances/", [instance("b1", app="bar", agent="agent2", pid=None, state="stopped")])


def test_status_lists_every_app_and_agent(agent: FakeAgent) -> None:
    two_agents(agent)
    result = run("status")
    assert result.exit_code == 0, result.stderr
    assert agent.sent == [("GET", "/"), ("GET", "/bar/instances/?details=1"), ("GET", "/foo/instances/?details=1")]
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["APP", "NAME", "AGENT", "STATE", "PID", "RESTARTS", "QUEUES"],
        ["bar", "b1", "agent2", "stopped", "-", "0", "tasks"],
        ["foo", "w1", "agent1", "running", "1234", "0", "tasks"],
        ["foo", "w2", "agent2", "starting", "1234", "0", "tasks"],
    ]


@pytest.mark.parametrize("argv", [["--json", "status"], ["status", "--json"]])
def test_json_before_or_after_the_command(agent: FakeAgent, argv: list[str]) -> None:
    two_agents(agent)
    result = run(*argv)
    assert result.exit_code == 0, result.stderr
    assert [(i["app"], i["name"]) for i in json.loads(result.stdout)] == [("bar", "b1"), ("foo", "w1"), ("foo", "w2")]


def test_ls_names_and_long(agent: FakeAgent) -> None:
    agent.on("GET", "/foo/instances/", ["w2", "w1"])
    assert run("ls", "foo").stdout == "w1\nw2\n"
    assert json.loads(run("ls", "foo", "--json").stdout) == ["w1", "w2"]
    two_agents(agent)
    result = run("ls", "-l")
    assert [line.split()[:4] for line in result.stdout.splitlines()] == [
        ["APP", "NAME", "AGENT", "STATE"],
        ["bar", "b1", "agent2", "stopped"],
        ["foo", "w1", "agent1", "running"],
        ["foo", "w2", "agent2", "starting"],
    ]


def test_agents_and_apps(agent: FakeAgent) -> None:
    agent.on(
        "GET",
        "/agents/",
        [
            {"id": "agent1", "url": "http://127.0.0.1:8001/", "alive": True, "last_seen": None, "instances": 2},
            {"id": "agent2", "url": "http://127.0.0.1:8002/", "alive": False, "last_seen": None, "instances": 0},
        ],
    )
    agent.on("GET", "/", ["foo", "bar"])
    lines = [line.split() for line in run("agents").stdout.splitlines()]
    assert lines[0] == ["ID", "URL", "ALIVE", "LAST", "SEEN", "INSTANCES", "TOKEN"]
    assert lines[1][:3] == ["agent1", "http://127.0.0.1:8001/", "yes"]
    assert lines[2][:3] == ["agent2", "http://127.0.0.1:8002/", "no"]
    assert run("apps").stdout == "bar\nfoo\n"


def test_queues_with_the_broker_figures(agent: FakeAgent) -> None:
    agent.on("GET", "/foo/queues/", ["tasks"])
    agent.on(
        "GET",
        "/foo/queues/tasks/",
        {"name": "tasks", "exchange": "tasks", "routing_key": "tasks", "exchange_type": None, "messages": 3},
    )
    result = run("queues", "foo")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["tasks", "tasks", "tasks", "-", "3", "-"]


def test_declare_and_delete_a_queue(agent: FakeAgent) -> None:
    queue = {"name": "tasks", "exchange": "ex", "routing_key": "tasks", "exchange_type": "topic", "options": None}
    agent.on("PUT", "/foo/queues/tasks/", queue, 201)
    agent.on("DELETE", "/foo/queues/tasks/", queue)
    result = run("declare-queue", "foo", "tasks", "--exchange", "ex", "--type", "topic")
    assert result.exit_code == 0, result.stderr
    assert agent.body() == {"exchange": "ex", "exchange_type": "topic"}
    assert result.stdout.splitlines()[1].split() == ["tasks", "ex", "tasks", "topic", "-", "-"]
    assert json.loads(run("delete-queue", "foo", "tasks", "--json").stdout) == queue
    assert agent.sent == [("PUT", "/foo/queues/tasks/"), ("DELETE", "/foo/queues/tasks/")]


def test_table_cells_are_not_rich_markup(agent: FakeAgent) -> None:
    agent.on("GET", "/foo/instances/", [instance("w1", queues=["[bold]x[/bold]"])])
    result = run("ls", "foo", "-l")
    assert "[bold]x[/bold]" in result.stdout


# -- errors: exit 1 and the API's message on stderr ---------------------------


def test_api_error_message_on_stderr_exit_1(agent: FakeAgent) -> None:
    agent.on("GET", "/instances/nope/", {"error": "no instance named 'nope'", "instance": "nope"}, 404)
    result = run("stats", "nope")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "Error: no instance named 'nope' (HTTP 404)\n"


def test_a_400_names_its_parameter(agent: FakeAgent) -> None:
    agent.on(
        "PUT", "/foo/instances/", {"error": "max_concurrency must be at most 8", "parameter": "max_concurrency"}, 400
    )
    result = run("add", "foo")
    assert result.exit_code == 1
    assert "max_concurrency must be at most 8 (HTTP 400) [parameter: max_concurrency]" in result.stderr


def test_wrong_token_exit_1_naming_the_auth_problem(agent: FakeAgent, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    agent.on("GET", "/", {"error": "missing or wrong bearer token"}, 401)
    result = run("--token-file", str(token_file), "apps")
    assert result.exit_code == 1
    assert "missing or wrong bearer token (HTTP 401)" in result.stderr
    assert "--token-file" in result.stderr
    assert agent.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_token_file_from_the_environment(agent: FakeAgent, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}  \nsecond line ignored\n")
    agent.on("GET", "/", [])
    assert run("apps", env={"SCS_TOKEN_FILE": str(token_file)}).exit_code == 0
    assert agent.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_url_from_the_environment(agent: FakeAgent) -> None:
    agent.on("GET", "/", [])
    assert run("apps", env={"SCS_URL": "http://127.0.0.1:8123/"}).exit_code == 0
    assert str(agent.requests[0].url) == "http://127.0.0.1:8123/"


def test_agent_down_is_one_line_exit_1(agent: FakeAgent) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    agent.routes[("GET", "/")] = refuse
    result = run("--url", "http://127.0.0.1:9", "status")
    assert result.exit_code == 1
    assert result.stderr == "Error: cannot reach the agent at http://127.0.0.1:9: connection refused\n"
    assert "Traceback" not in result.output


def test_agent_too_slow_is_one_line_exit_1(agent: FakeAgent) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    agent.routes[("GET", "/agents/")] = slow
    result = run("--timeout", "2.5", "agents")
    assert result.exit_code == 1
    assert result.stderr == "Error: no answer from the agent at http://127.0.0.1:8000 within 2.5 s\n"


def test_missing_agents_are_a_warning(agent: FakeAgent) -> None:
    agent.on("GET", "/", ["foo"], **{"X-SCS-Missing-Agents": "agent3,ag%C3%A9nt4", "X-SCS-Missing-Agents-Count": "5"})
    agent.on("GET", "/foo/instances/", [instance("w1")], **{"X-SCS-Missing-Agents": "agent3,ag%C3%A9nt4"})
    result = run("status")
    assert result.exit_code == 0
    assert result.stderr.count("Warning:") == 1
    assert "5 agent(s) did not answer (agent3, agént4 and 3 more)" in result.stderr
    assert "w1" in result.stdout


def test_html_error_page_still_gives_a_message(agent: FakeAgent) -> None:
    agent.routes[("GET", "/")] = httpx.Response(502, text="<html>bad gateway</html>")
    result = run("apps")
    assert result.exit_code == 1
    assert result.stderr == "Error: the agent answered Bad Gateway (HTTP 502)\n"


# -- the library -------------------------------------------------------------


def test_client_errors_carry_status_message_and_body() -> None:
    fake = FakeAgent()
    fake.on("POST", "/foo/instances/w1/autoscale/", {"error": "give max, min or both", "parameter": "max"}, 400)
    with Client("http://agent.test", token=TOKEN, transport=httpx.MockTransport(fake.handler)) as client:
        with pytest.raises(APIError) as raised:
            client.set_autoscale("foo", "w1")
    error = raised.value
    assert (error.status, error.message, error.parameter) == (400, "give max, min or both", "max")
    assert error.body == {"error": "give max, min or both", "parameter": "max"}
    assert (error.method, error.url) == ("POST", "http://agent.test/foo/instances/w1/autoscale/")
    assert fake.body() == {}


def test_client_unreachable_has_no_status() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with Client("http://agent.test", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(AgentUnreachable) as raised:
            client.apps()
    assert raised.value.status is None
    assert isinstance(raised.value, APIError)


def test_client_answers_typed_json() -> None:
    fake = FakeAgent()
    fake.on("GET", "/foo/instances/w1/", instance("w1"))
    fake.on("GET", "/foo/instances/w1/autoscale/", {"max": 2, "min": 1})
    with Client("http://agent.test/", transport=httpx.MockTransport(fake.handler)) as client:
        assert client.instance("w1", "foo")["pid"] == 1234
        assert client.autoscale("foo", "w1") == {"max": 2, "min": 1}
    assert fake.sent == [("GET", "/foo/instances/w1/"), ("GET", "/foo/instances/w1/autoscale/")]


def test_client_refuses_a_non_json_success() -> None:
    fake = FakeAgent()
    fake.routes[("GET", "/")] = httpx.Response(200, text="hello")
    with Client("http://agent.test", transport=httpx.MockTransport(fake.handler)) as client:
        with pytest.raises(APIError, match="not JSON"):
            client.apps()


def test_read_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n{TOKEN}\n")
    assert read_token_file(path) == TOKEN
    path.write_text("tök€n\n")
    with pytest.raises(TokenFileError, match="printable ASCII"):
        read_token_file(path)
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "absent")
