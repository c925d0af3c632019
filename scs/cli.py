"""``scs``: the command line for people and shell scripts (DESIGN §9.2).

It talks to any agent of a cluster through ``scs.client.Client``::

    scs [--url URL] [--token-file FILE] [--timeout S] [--json] COMMAND ...

Human tables by default, ``--json`` (before or after the command) for
scripts.  Exit status: 0 success, 1 the API refused the request or the
agent could not be reached (the message on stderr), 2 a usage error (the
message names the argument; nothing is sent).  Arguments are checked here
with the agent's own rules (``scs.validation``) before any request.

Libraries, each a well-kept one doing its job so that nothing here parses
arguments or draws tables by hand:

- click: the command-line framework.  Already installed with Celery, so
  it costs no new dependency; typed parameters and usage errors that name
  the argument (exit 2), ``--help`` on every command, environment
  variables for options, and shell completion built in
  (``eval "$(_SCS_COMPLETE=bash_source scs)"``, also zsh and fish).
  Typer would add itself and its own dependencies on top of click for
  type-hint sugar this small command set does not need.
- httpx (under ``scs.client``): a typed synchronous HTTP client with
  timeouts; see that module.
- rich: tables that size their columns to their content, colour on a
  terminal only, and the spinner with elapsed time on stderr while a
  command waits on the cluster (only when stderr is a terminal, so that
  scripts see nothing but their answer).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from scs import validation as v
from scs.client import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WAIT_TIMEOUT,
    AgentUnreachable,
    APIError,
    Client,
    Instance,
    TokenFileError,
    read_token_file,
)
from scs.errors import BadParameter

EXIT_API_ERROR = 1
EXIT_USAGE = 2
JSON_META_KEY = "scs.json"

STATE_STYLES = {
    "running": "green",
    "starting": "cyan",
    "restarting": "cyan",
    "stopping": "yellow",
    "stopped": "dim",
    "unresponsive": "bold yellow",
    "failed": "bold red",
}


# -- session state ---------------------------------------------------------


@dataclass
class Session:
    """What the group's options set up; the client is made on first use,
    so that a usage error in a command never reaches the network."""

    url: str
    token_file: str | None
    timeout: float
    _client: Client | None = None
    _warned: set[str] = field(default_factory=set)

    def client(self) -> Client:
        if self._client is None:
            token = None
            if self.token_file:
                try:
                    token = read_token_file(self.token_file)
                except TokenFileError as e:
                    raise click.BadParameter(str(e), param_hint="'--token-file' / SCS_TOKEN_FILE") from None
            self._client = Client(
                self.url,
                token=token,
                timeout=self.timeout,
                wait_timeout=max(DEFAULT_WAIT_TIMEOUT, self.timeout),
                on_missing_agents=self._missing_agents,
            )
        return self._client

    def _missing_agents(self, ids: list[str], count: int) -> None:
        key = ",".join(ids)
        if key in self._warned:
            return
        self._warned.add(key)
        named = ", ".join(ids) + (f" and {count - len(ids)} more" if count > len(ids) else "")
        click.echo(f"Warning: {count} agent(s) did not answer ({named}); this answer lacks their part", err=True)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class APIFailure(click.ClickException):
    """An ``APIError`` as the command line reports it: one line on stderr
    (no traceback), exit status 1."""

    exit_code = EXIT_API_ERROR

    def __init__(self, error: APIError) -> None:
        super().__init__(str(error))
        self.error = error

    def format_message(self) -> str:
        message = str(self.error)
        if self.error.status == 401:
            message += "; give the agent's token with --token-file or SCS_TOKEN_FILE"
        elif self.error.parameter:
            message += f" [parameter: {self.error.parameter}]"
        return message


class ScsGroup(click.Group):
    """Turns the client's errors into exit status 1 with the message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as e:
            raise APIFailure(e) from None


def _session(ctx: click.Context) -> Session:
    session = ctx.find_object(Session)
    assert session is not None
    return session


def _client(ctx: click.Context) -> Client:
    return _session(ctx).client()


# -- argument checks: the agent's own rules, as usage errors ----------------


def _checked(check: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running a ``scs.validation`` check: its
    ``BadParameter`` becomes a usage error naming the argument."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except BadParameter as e:
            raise click.BadParameter(e.message, ctx=ctx, param=param) from None

    return callback


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL of an agent", ctx=ctx, param=param)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise click.BadParameter(f"{value!r} has a bad port", ctx=ctx, param=param) from None
    return value


def _check_target(value: str) -> tuple[str | None, str]:
    """``NAME`` or ``APP/NAME``."""
    app, sep, name = value.rpartition("/")
    if sep:
        return v.check_app_name(app), v.check_instance_name(name)
    return None, v.check_instance_name(name)


def _check_queues(value: str) -> list[str]:
    names = list(v.check_queue_list(value))
    if not names:
        raise BadParameter("give at least one queue name", parameter="queues")
    return names


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[JSON_META_KEY] = True


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json",
        "json_output",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print the API's JSON answer instead of a table.",
    )(f)


def _wants_json(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(JSON_META_KEY))


# -- shell completion of app and instance names -----------------------------


def _completion_client(ctx: click.Context) -> Client | None:
    root = ctx.find_root()
    url = root.params.get("url") or DEFAULT_URL
    token = None
    token_file = root.params.get("token_file")
    try:
        if token_file:
            token = read_token_file(token_file)
        return Client(url, token=token, timeout=2.0)
    except (TokenFileError, ValueError):
        return None


def _complete(fetch: Callable[[Client], Iterable[str]]) -> Callable[..., list[CompletionItem]]:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        client = _completion_client(ctx)
        if client is None:
            return []
        try:
            with client:
                return [CompletionItem(name) for name in sorted(fetch(client)) if name.startswith(incomplete)]
        except APIError:
            return []

    return complete


def _all_instance_names(client: Client) -> list[str]:
    return [instance["name"] for instance in client.status()]


complete_apps = _complete(lambda client: client.apps())
complete_instances = _complete(_all_instance_names)


# -- output ----------------------------------------------------------------


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        # A pipe or a file: never wrap or cut a table to 80 columns.
        console = Console(highlight=False, width=100_000, no_color=True)
    return console


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(_cell(cell)) for cell in row))
    console = _console()
    if console.is_terminal:
        console.print(table)
        return
    # Piped: the same columns without the padding rich leaves at line ends.
    with console.capture() as captured:
        console.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _state(instance: Mapping[str, Any]) -> Text:
    state = str(instance.get("state") or "-")
    return Text(state, style=STATE_STYLES.get(state, ""))


STATUS_COLUMNS = ("APP", "NAME", "AGENT", "STATE", "PID", "RESTARTS", "QUEUES")
LONG_COLUMNS = (*STATUS_COLUMNS, "ENABLED", "MAX", "MIN")


def _status_row(instance: Mapping[str, Any]) -> list[Any]:
    return [
        instance.get("app"),
        instance.get("name"),
        instance.get("agent"),
        _state(instance),
        instance.get("pid"),
        instance.get("restarts"),
        instance.get("queues"),
    ]


def _long_row(instance: Mapping[str, Any]) -> list[Any]:
    return [
        *_status_row(instance),
        instance.get("is_enabled"),
        instance.get("max_concurrency"),
        instance.get("min_concurrency"),
    ]


def print_instances(ctx: click.Context, instances: Sequence[Instance] | Instance) -> None:
    """An instance (or several) as a one-line-per-instance table."""
    if _wants_json(ctx):
        print_json(instances)
        return
    rows = [instances] if isinstance(instances, dict) else list(instances)
    print_table(LONG_COLUMNS, (_long_row(instance) for instance in rows))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _age(last_seen: Any) -> str:
    if not isinstance(last_seen, int | float):
        return "-"
    seconds = max(0.0, time.time() - last_seen)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}min ago"


@contextmanager
def waiting(description: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while the cluster works;
    nothing when stderr is not a terminal, and gone once done."""
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        yield
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        progress.add_task(description, total=None)
        yield


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


# -- the commands ----------------------------------------------------------


@click.group(
    cls=ScsGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=(
        "Exit status: 0 success; 1 the API refused the request or the agent could not be "
        "reached (the message is on stderr); 2 a usage error (nothing was sent).  "
        "NAME is an instance's name, or APP/NAME.  "
        'Shell completion: eval "$(_SCS_COMPLETE=bash_source scs)" (zsh_source, fish_source).'
    ),
)
@click.option(
    "--url",
    envvar="SCS_URL",
    default=DEFAULT_URL,
    show_default=True,
    callback=_check_url,
    help="Base URL of any agent of the cluster [env SCS_URL].",
)
@click.option(
    "--token-file",
    envvar="SCS_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    help="File holding the agents' bearer token (its first line) [env SCS_TOKEN_FILE].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for an answer (commands that wait on workers wait longer).",
)
@json_option
@click.version_option(package_name="scs-agent", prog_name="scs")
@click.pass_context
def cli(ctx: click.Context, url: str, token_file: str | None, timeout: float) -> None:
    """Drive a cluster of SCS agents: list, create, scale, restart and
    delete Celery worker instances."""
    session = Session(url=url, token_file=token_file, timeout=timeout)
    ctx.obj = session
    ctx.call_on_close(session.close)


@cli.command()
@json_option
@click.pass_context
def agents(ctx: click.Context) -> None:
    """The cluster's agents: id, URL, alive, last seen, instances."""
    members = _client(ctx).agents()
    if _wants_json(ctx):
        print_json(members)
        return
    print_table(
        ("ID", "URL", "ALIVE", "LAST SEEN", "INSTANCES", "TOKEN"),
        (
            (
                m.get("id"),
                m.get("url"),
                Text(_cell(m.get("alive")), style="green" if m.get("alive") else "bold red"),
                _age(m.get("last_seen")),
                m.get("instances"),
                m.get("requires_token"),
            )
            for m in members
        ),
    )


@cli.command()
@json_option
@click.pass_context
def apps(ctx: click.Context) -> None:
    """The names of the apps known to the cluster."""
    names = sorted(_client(ctx).apps())
    if _wants_json(ctx):
        print_json(names)
        return
    for name in names:
        click.echo(name)


@cli.command(name="ls")
@click.argument("app", required=False, callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.option("-l", "--long", "long_format", is_flag=True, help="One line per instance with its state and settings.")
@json_option
@click.pass_context
def ls(ctx: click.Context, app: str | None, long_format: bool) -> None:
    """The instances of APP (of every app without it), on every agent."""
    client = _client(ctx)
    apps_listed = [app] if app is not None else sorted(client.apps())
    if long_format:
        with waiting("listing instances"):
            instances: list[Instance] = []
            for name in apps_listed:
                instances += sorted(client.instance_details(name), key=lambda i: i.get("name", ""))
        print_instances(ctx, instances)
        return
    names: list[str] = []
    for name in apps_listed:
        names += sorted(client.instances(name))
    if _wants_json(ctx):
        print_json(names)
        return
    for name in names:
        click.echo(name)


@cli.command()
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.argument("name", required=False, callback=_checked(v.check_instance_name))
@click.option(
    "-q", "--queues", callback=_checked(_check_queues), metavar="QUEUES", help="Queues to consume, comma-separated."
)
@click.option("--max", "max_", type=click.IntRange(1, v.MAX_CONCURRENCY), help="Most worker processes (autoscale).")
@click.option("--min", "min_", type=click.IntRange(0, v.MAX_CONCURRENCY), help="Fewest worker processes (autoscale).")
@click.option("--nowait", is_flag=True, help="Answer at once (202), before the worker answers a ping.")
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    app: str,
    name: str | None,
    queues: list[str] | None,
    max_: int | None,
    min_: int | None,
    nowait: bool,
) -> None:
    """Create an instance of APP (named NAME, or a random name) on a random
    live agent; waits until its worker answers a ping unless --nowait."""
    if max_ is not None and min_ is not None and min_ > max_:
        raise click.BadParameter(f"--min ({min_}) is greater than --max ({max_})", param_hint="'--min'")
    client = _client(ctx)
    with waiting(f"creating {name or 'an instance'} of {app}; waiting for its worker"):
        instance = client.create_instance(
            app, name, queues=queues, max_concurrency=max_, min_concurrency=min_, nowait=nowait
        )
    print_instances(ctx, instance)


def _target_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument(
        "target", metavar="NAME", callback=_checked(_check_target), shell_complete=complete_instances
    )(f)


def _locate(client: Client, target: tuple[str | None, str]) -> tuple[str, str]:
    """(app, name) of ``NAME`` or ``APP/NAME``: the app from the instance."""
    app, name = target
    if app is None:
        app = client.instance(name)["app"]
    return app, name


@cli.command()
@_target_argument
@json_option
@click.pass_context
def rm(ctx: click.Context, target: tuple[str | None, str]) -> None:
    """Delete the instance NAME; its worker is shut down."""
    app, name = target
    with waiting(f"deleting {name}; waiting for its worker to stop"):
        instance = _client(ctx).delete_instance(name, app)
    print_instances(ctx, instance)


def _instance_command(operation: str, summary: str, doing: str) -> None:
    @cli.command(name=operation, help=summary)
    @_target_argument
    @json_option
    @click.pass_context
    def command(ctx: click.Context, target: tuple[str | None, str]) -> None:
        client = _client(ctx)
        app, name = _locate(client, target)
        with waiting(f"{doing} {name}"):
            instance = getattr(client, operation)(app, name)
        print_instances(ctx, instance)


_instance_command("enable", "Enable the instance NAME: its worker is started and kept running.", "enabling")
_instance_command("disable", "Disable the instance NAME: its worker is stopped, the instance kept.", "disabling")
_instance_command("restart", "Restart the worker of the instance NAME.", "restarting")


@cli.command(name="restart-app")
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.option("--rolling", is_flag=True, help="One instance at a time, each once the previous one answers again.")
@json_option
@click.pass_context
def restart_app(ctx: click.Context, app: str, rolling: bool) -> None:
    """Restart every instance of APP on every agent.

    Exit status 1 when an instance failed to come back (the rest of a
    rolling restart is then skipped)."""
    how = "one at a time" if rolling else "all at once"
    with waiting(f"restarting the instances of {app}, {how}"):
        result = _client(ctx).restart_app(app, rolling=rolling)
    failed = result.get("failed") or {}
    if _wants_json(ctx):
        print_json(result)
    else:
        rows: list[tuple[str, Any]] = [(name, Text("restarted", style="green")) for name in result.get("instances", [])]
        rows += [(name, Text(f"failed: {why}", style="bold red")) for name, why in sorted(failed.items())]
        rows += [(name, Text("skipped", style="yellow")) for name in result.get("skipped", [])]
        if rows:
            print_table(("NAME", "RESULT"), rows)
        else:
            click.echo(f"{app} has no instance to restart")
    if failed:
        _fail(f"{len(failed)} instance(s) of {app} failed to restart: " + ", ".join(sorted(failed)))


@cli.command()
@_target_argument
@click.argument("max_", metavar="MAX", type=click.IntRange(1, v.MAX_CONCURRENCY))
@click.argument("min_", metavar="[MIN]", required=False, type=click.IntRange(0, v.MAX_CONCURRENCY))
@json_option
@click.pass_context
def scale(ctx: click.Context, target: tuple[str | None, str], max_: int, min_: int | None) -> None:
    """Set the autoscale range of the instance NAME: at most MAX worker
    processes, at least MIN (unchanged without it)."""
    if min_ is not None and min_ > max_:
        raise click.BadParameter(f"MIN ({min_}) is greater than MAX ({max_})", param_hint="'MIN'")
    client = _client(ctx)
    app, name = _locate(client, target)
    answer = client.set_autoscale(app, name, max=max_, min=min_)
    if _wants_json(ctx):
        print_json(answer)
        return
    print_table(("NAME", "MAX", "MIN"), [(name, answer.get("max"), answer.get("min"))])


def _queue_command(operation: str, summary: str, done: str) -> None:
    @cli.command(name=operation, help=summary)
    @_target_argument
    @click.argument("queue", callback=_checked(v.check_queue_name))
    @json_option
    @click.pass_context
    def command(ctx: click.Context, target: tuple[str | None, str], queue: str) -> None:
        client = _client(ctx)
        app, name = _locate(client, target)
        answer = getattr(client, operation)(app, name, queue)
        if _wants_json(ctx):
            print_json(answer)
            return
        click.echo(f"{name} {done} {queue}")


_queue_command("consume", "Make the instance NAME consume from QUEUE.", "consumes from")
_queue_command("cancel", "Make the instance NAME stop consuming from QUEUE.", "no longer consumes from")


@cli.command()
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@json_option
@click.pass_context
def queues(ctx: click.Context, app: str) -> None:
    """The queues declared for APP, with the broker's message and consumer counts."""
    with waiting(f"asking for the queues of {app}"):
        found = _client(ctx).queue_details(app)
    if _wants_json(ctx):
        print_json(found)
    elif not found:
        click.echo(f"{app} has no declared queues")
    else:
        print_queues(found)


def print_queues(found: Sequence[Mapping[str, Any]]) -> None:
    print_table(
        ("NAME", "EXCHANGE", "ROUTING KEY", "TYPE", "MESSAGES", "CONSUMERS"),
        (
            (
                q.get("name"),
                q.get("exchange"),
                q.get("routing_key"),
                q.get("exchange_type"),
                q.get("messages"),
                q.get("consumers"),
            )
            for q in found
        ),
    )


def _check_routing(what: str) -> Callable[[str], str]:
    return lambda value: v.check_routing(value, what)


@cli.command(name="declare-queue")
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.argument("queue", callback=_checked(v.check_queue_name))
@click.option("--exchange", callback=_checked(_check_routing("exchange")), help="Exchange [default: the queue's name].")
@click.option(
    "--routing-key", callback=_checked(_check_routing("routing_key")), help="Routing key [default: the queue's name]."
)
@click.option("--type", "exchange_type", type=click.Choice(v.EXCHANGE_TYPES), help="Exchange type.")
@json_option
@click.pass_context
def declare_queue(
    ctx: click.Context, app: str, queue: str, exchange: str | None, routing_key: str | None, exchange_type: str | None
) -> None:
    """Declare QUEUE for APP on every agent, so that its instances can consume it."""
    answer = _client(ctx).declare_queue(
        app, queue, exchange=exchange, routing_key=routing_key, exchange_type=exchange_type
    )
    if _wants_json(ctx):
        print_json(answer)
    else:
        print_queues([answer])


@cli.command(name="delete-queue")
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.argument("queue", callback=_checked(v.check_queue_name))
@json_option
@click.pass_context
def delete_queue(ctx: click.Context, app: str, queue: str) -> None:
    """Delete the declaration of QUEUE from APP."""
    answer = _client(ctx).delete_queue(app, queue)
    if _wants_json(ctx):
        print_json(answer)
    else:
        print_queues([answer])


@cli.command()
@_target_argument
@json_option
@click.pass_context
def stats(ctx: click.Context, target: tuple[str | None, str]) -> None:
    """The Celery stats of the worker of the instance NAME."""
    client = _client(ctx)
    app, name = _locate(client, target)
    answer = client.stats(app, name)
    if _wants_json(ctx):
        print_json(answer)
        return
    print_table(("KEY", "VALUE"), _flatten(answer))


@cli.command()
@_target_argument
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(1, v.MAX_LOG_LINES),
    default=v.DEFAULT_LOG_LINES,
    show_default=True,
    help="How many of the last lines.",
)
@json_option
@click.pass_context
def log(ctx: click.Context, target: tuple[str | None, str], lines: int) -> None:
    """The last lines of the worker log of the instance NAME, from its agent."""
    client = _client(ctx)
    app, name = _locate(client, target)
    answer = client.log(app, name, lines)
    if _wants_json(ctx):
        print_json(answer)
        return
    for line in answer.get("lines", []):
        click.echo(line)


@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context) -> None:
    """Every instance of the cluster: app, name, agent, state, pid,
    restarts, queues."""
    with waiting("asking every agent"):
        instances = _client(ctx).status()
    if _wants_json(ctx):
        print_json(instances)
        return
    if not instances:
        click.echo("no instances")
        return
    print_table(STATUS_COLUMNS, (_status_row(instance) for instance in instances))


def _check_seconds(value: str) -> float:
    return v.check_seconds(value, "scale_down_after", 0.0, v.MAX_SCALE_DOWN_AFTER)


@cli.command()
@click.argument("app", callback=_checked(v.check_app_name), shell_complete=complete_apps)
@click.option("--queue", "-q", callback=_checked(v.check_queue_name), help="The queue whose depth decides.")
@click.option("--min", "min_", type=click.IntRange(1, v.MAX_INSTANCES), help="Fewest instances [default 1].")
@click.option("--max", "max_", type=click.IntRange(1, v.MAX_INSTANCES), help="Most instances.")
@click.option(
    "--per", type=click.IntRange(1, v.MAX_MESSAGES_PER_INSTANCE), help="Ready messages per instance [default 10]."
)
@click.option(
    "--down-after",
    callback=_checked(_check_seconds),
    help="Seconds the depth must stay low before an instance goes [default 60].",
)
@click.option("--delete", is_flag=True, help="Drop the policy (the instances stay as they are).")
@json_option
@click.pass_context
def autoscaling(
    ctx: click.Context,
    app: str,
    queue: str | None,
    min_: int | None,
    max_: int | None,
    per: int | None,
    down_after: float | None,
    delete: bool,
) -> None:
    """Show or set APP's autoscaling by queue depth: about
    ceil(messages / PER) instances consuming QUEUE, between MIN and MAX.
    With no option it shows the policy and the current decision; options
    left out keep their stored value."""
    given = {"--queue": queue, "--min": min_, "--max": max_, "--per": per, "--down-after": down_after}
    if delete and any(value is not None for value in given.values()):
        raise click.UsageError("--delete takes no other option")
    if min_ is not None and max_ is not None and min_ > max_:
        raise click.BadParameter(f"--min ({min_}) is greater than --max ({max_})", param_hint="'--min'")
    client = _client(ctx)
    if delete:
        answer = client.delete_autoscaling(app)
        if _wants_json(ctx):
            print_json(answer)
        else:
            click.echo(f"{app} has no autoscaling policy any more")
        return
    if any(value is not None for value in given.values()):
        with waiting(f"setting the policy of {app} on every agent"):
            answer = client.set_autoscaling(
                app,
                queue=queue,
                min_instances=min_,
                max_instances=max_,
                messages_per_instance=per,
                scale_down_after=down_after,
            )
    else:
        answer = client.autoscaling(app)
    if _wants_json(ctx):
        print_json(answer)
        return
    print_table(
        ("APP", "QUEUE", "MIN", "MAX", "PER INSTANCE", "DOWN AFTER"),
        [
            (
                answer.get("app"),
                answer.get("queue"),
                answer.get("min_instances"),
                answer.get("max_instances"),
                answer.get("messages_per_instance"),
                f"{answer.get('scale_down_after', 0):g} s",
            )
        ],
    )
    decision = answer.get("decision")
    if decision:
        click.echo(
            f"decision ({decision.get('agent')}): {decision.get('direction')}, "
            f"{decision.get('messages')} messages ready, {decision.get('instances')} instances, "
            f"target {decision.get('target')}" + (f"; {decision['reason']}" if decision.get("reason") else "")
        )


def main(argv: Sequence[str] | None = None) -> None:
    """The ``scs`` console script."""
    cli.main(args=None if argv is None else list(argv), prog_name="scs")


__all__ = ["APIFailure", "AgentUnreachable", "cli", "main"]


if __name__ == "__main__":
    main()
