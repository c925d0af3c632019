"""Worker ``arguments`` by allow-list (scs.worker_arguments), and the table
checked against Celery's real ``celery worker`` parser.

Celery is imported here, in the tests only: the validator never imports it.
The real parser is click's, built from ``celery.bin.worker.worker`` with
``make_parser`` and run with ``parse_args`` (nothing is converted, called or
started), and key=value settings go through the loader's real
``cmdline_config_parser``.
"""

from __future__ import annotations

import warnings
from typing import Any

import click
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from scs.errors import BadParameter
from scs.records import BrokerInfo, InstanceSpec
from scs.validation import check_arguments
from scs.worker import build_argv
from scs.worker_arguments import (
    ALLOWED_OPTIONS,
    ALLOWED_SETTINGS,
    LOG_LEVELS,
    POOLS,
    REFUSED_OPTIONS,
    RefusedArgument,
    check_worker_arguments,
    setting_key,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from celery import Celery, _find_option_with_arg
    from celery.app.defaults import NAMESPACES
    from celery.bin.base import LOG_LEVEL, CLIContext
    from celery.bin.celery import celery as celery_group
    from celery.bin.worker import worker as worker_command


# -- the real parser ---------------------------------------------------------------------

APP = Celery("scs-test-arguments", set_as_current=False)
CONTEXT = click.Context(worker_command, info_name="worker", obj=CLIContext(app=APP, no_color=True, workdir=None))
PARAMS = {p.name: p for p in worker_command.get_params(CONTEXT)}
BY_OPTION = {opt: p for p in PARAMS.values() for opt in p.opts}


def celery_parse(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """What ``celery worker`` makes of ``args``: options by parameter name
    (raw strings, flags True) and the words left over for configuration."""
    parser = worker_command.make_parser(CONTEXT)
    opts, largs, _order = parser.parse_args(list(args))
    return opts, largs


def celery_settings(words: list[str]) -> dict[str, Any]:
    """The settings ``app.config_from_cmdline(words, namespace="worker")``
    would apply."""
    return APP.loader.cmdline_config_parser(words, "worker")


# Parameter names (click's) of the allowed options.
ALLOWED_PARAMS = {BY_OPTION[name].name for name in ALLOWED_OPTIONS}
AGENT = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5672//")


def agent_words(arguments: tuple[str, ...] = ()) -> list[str]:
    """The words after ``worker`` in the agent's own command line."""
    argv = build_argv(
        InstanceSpec(name="w1", app="foo", broker=AGENT, max_concurrency=4, min_concurrency=2, arguments=arguments),
        "/data",
        "host.example",
    )
    return argv[argv.index("worker") + 1 :]


AGENT_OWN = celery_parse(agent_words())[0]


def refused(args: list[str]) -> RefusedArgument:
    with pytest.raises(RefusedArgument) as info:
        check_worker_arguments(args)
    return info.value


# -- refused ---------------------------------------------------------------------------

REFUSED: list[tuple[list[str], str]] = [
    # Bundled short flags used to get past the deny-list.
    (["-En", "x@y"], "-n"),
    (["-Enx@y"], "-n"),
    (["-EQq"], "-Q"),
    (["-EQ", "q"], "-Q"),
    (["-Ef/path"], "-f"),
    (["-ED"], "-D"),
    (["-Ofair", "-D"], "-D"),
    (["-l", "info", "-ED"], "-D"),
    (["-EB"], "-B"),
    # Options the agent sets.
    (["-n", "other"], "-n"),
    (["--hostname=x"], "--hostname"),
    (["--hostname", "x"], "--hostname"),
    (["-Qq9"], "-Q"),
    (["--queues=q"], "--queues"),
    (["-X", "dq.w1"], "-X"),
    (["--exclude-queues=dq.w1"], "--exclude-queues"),
    (["--autoscale=10,1"], "--autoscale"),
    (["-c", "4"], "-c"),
    (["-c4"], "-c"),
    (["-Ec4"], "-c"),
    (["--concurrency=4"], "--concurrency"),
    (["--pidfile=/tmp/x"], "--pidfile"),
    (["--logfile", "/tmp/x"], "--logfile"),
    (["-f/tmp/log"], "-f"),
    (["-A", "other"], "-A"),
    (["-Aother"], "-A"),
    (["--app=other"], "--app"),
    (["-b", "amqp://x//"], "-b"),
    (["--broker=amqp://x//"], "--broker"),
    # Detaching, users, files, code, beat, destruction, global options.
    (["-D"], "-D"),
    (["--detach"], "--detach"),
    (["--uid=0"], "--uid"),
    (["--gid", "0"], "--gid"),
    (["--umask=0"], "--umask"),
    (["--executable=/bin/sh"], "--executable"),
    (["--workdir=/"], "--workdir"),
    (["-S", "/tmp/state"], "-S"),
    (["--statedb=/tmp/state"], "--statedb"),
    (["-I", "os"], "-I"),
    (["--include=x"], "--include"),
    (["-B"], "-B"),
    (["--beat"], "--beat"),
    (["-s", "/tmp/schedule"], "-s"),
    (["--schedule=/tmp/s"], "--schedule"),
    (["--scheduler=x:Y"], "--scheduler"),
    (["--purge"], "--purge"),
    (["--discard"], "--discard"),
    (["--result-backend=redis://"], "--result-backend"),
    (["--config=evil"], "--config"),
    (["--loader=evil"], "--loader"),
    (["--help"], "--help"),
    (["-q"], "-q"),
    # Unknown options, and the odd shapes click reads as options.
    (["--frobnicate"], "--frobnicate"),
    (["-Z"], "-Z"),
    (["-EZ"], "-Z"),
    (["-E=1"], "-="),
    (["---without-gossip"], "---without-gossip"),
    (["--without-gossip=1"], "--without-gossip"),
    (["-E", "--"], "--"),
    (["--", "accept_content=pickle"], "--"),
    (["--x=<script>"], "--x"),
    # Values.
    (["-l"], "-l"),
    (["-l", "-D"], "-l"),
    (["-l", "verbose"], "-l"),
    (["-l", "ınfo"], "-l"),  # dotless i: Celery's upper() would make it INFO
    (["-lD"], "-l"),
    (["-O", "FAIR"], "-O"),
    (["-Ofast"], "-O"),
    (["-O=fair"], "-O"),
    (["-P", "solo"], "-P"),
    (["-P", "threads"], "-P"),
    (["--pool=custom"], "--pool"),
    (["--pool=celery.concurrency.prefork:TaskPool"], "--pool"),
    (["-Pgevent"], "-P"),  # Celery's early monkey-patching would not see it
    (["-EP", "eventlet"], "-P"),
    (["--prefetch-multiplier=0"], "--prefetch-multiplier"),
    (["--prefetch-multiplier", "+4"], "--prefetch-multiplier"),
    (["--prefetch-multiplier=4_0"], "--prefetch-multiplier"),
    (["--prefetch-multiplier=٤"], "--prefetch-multiplier"),
    (["--time-limit=inf"], "--time-limit"),
    (["--time-limit=nan"], "--time-limit"),
    (["--time-limit=1e3"], "--time-limit"),
    (["--time-limit=-1"], "--time-limit"),
    (["--soft-time-limit", "0"], "--soft-time-limit"),
    (["--max-tasks-per-child="], "--max-tasks-per-child"),
    (["--max-memory-per-child", "--without-gossip"], "--max-memory-per-child"),
    (["--heartbeat-interval=0"], "--heartbeat-interval"),
    (["--pool-start-method=forkserver"], "--pool-start-method"),
    # key=value configuration.
    (["accept_content=pickle"], "accept_content"),
    (['accept_content=(json)["pickle"]'], "accept_content"),
    (["CELERY_ACCEPT_CONTENT=pickle"], "CELERY_ACCEPT_CONTENT"),
    (["Accept.Content=pickle"], "Accept.Content"),
    (["task_serializer=pickle"], "task_serializer"),
    (["result_serializer=pickle"], "result_serializer"),
    (["event_serializer=pickle"], "event_serializer"),
    (["worker_pool=evil:Pool"], "worker_pool"),
    (["_pool=evil:Pool"], "_pool"),
    (["worker_consumer=evil:C"], "worker_consumer"),
    (["worker_autoscaler=evil:A"], "worker_autoscaler"),
    (["worker_concurrency=4"], "worker_concurrency"),
    (["worker_state_db=/tmp/x"], "worker_state_db"),
    (["worker_direct=true"], "worker_direct"),
    (["worker_enable_remote_control=false"], "worker_enable_remote_control"),
    (["broker_url=amqp://evil//"], "broker_url"),
    (["broker_heartbeat=0"], "broker_heartbeat"),
    (["result_backend=redis://"], "result_backend"),
    (["imports=os"], "imports"),
    (["include=os"], "include"),
    (["task_routes=(json){}"], "task_routes"),
    (["security_key=/x"], "security_key"),
    (["-E", "__prefetch_multiplier=1"], "__prefetch_multiplier"),
    (["worker_prefetch_multiplier=(int)4"], "worker_prefetch_multiplier"),
    (["worker_prefetch_multiplier=0x10"], "worker_prefetch_multiplier"),
    (["worker_prefetch_multiplier="], "worker_prefetch_multiplier"),
    (["task_acks_late=maybe"], "task_acks_late"),
    (["task_time_limit=inf"], "task_time_limit"),
    (["tas\u212a_acks_late=true"], "tas\u212a_acks_late"),  # a Kelvin sign lower-cases to "k"
    (["=1"], "=1"),
    (["worker"], "worker"),
    (["-"], "-"),
    (["info"], "info"),
]


@pytest.mark.parametrize("args, option", REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
def test_refused(args: list[str], option: str) -> None:
    error = refused(args)
    assert error.option == option
    assert option in error.message


@pytest.mark.parametrize("args, option", REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
def test_check_arguments_answers_bad_parameter_naming_the_option(args: list[str], option: str) -> None:
    with pytest.raises(BadParameter) as info:
        check_arguments(args)
    assert info.value.details == {"parameter": "arguments", "option": option}
    assert option in info.value.message


def test_owned_options_say_so() -> None:
    for name in ("-n", "--hostname", "-Q", "--autoscale", "--pidfile", "-f", "-A", "-b", "-c"):
        assert "set by the agent" in refused([name, "x"]).message


def test_unknown_option_lists_what_is_allowed() -> None:
    message = refused(["--frobnicate"]).message
    assert "--without-gossip" in message and "worker_prefetch_multiplier" in message


def test_string_form_is_split_and_checked() -> None:
    assert check_arguments("-l info -Ofair  --prefetch-multiplier=2") == (
        "-l",
        "info",
        "-Ofair",
        "--prefetch-multiplier=2",
    )
    with pytest.raises(BadParameter) as info:
        check_arguments("-l info -En x@y")
    assert info.value.details["option"] == "-n"
    with pytest.raises(BadParameter):
        check_arguments("'unbalanced")


# -- allowed ---------------------------------------------------------------------------

ALLOWED: list[list[str]] = [
    [],
    ["-E"],
    ["--task-events"],
    ["--events"],
    ["-l", "info"],
    ["-lINFO"],
    ["--loglevel=warning"],
    ["--loglevel", "DEBUG"],
    ["-Ofair"],
    ["-O", "fair"],
    ["-EOfair"],
    ["-EO", "default"],
    ["-ElINFO"],
    ["--optimization=fair"],
    ["-P", "prefork"],
    ["-Pprefork"],
    ["-EPprefork"],
    ["-P", "gevent"],
    ["--pool=eventlet"],
    ["--pool", "gevent"],
    ["--pool-start-method=spawn"],
    ["--prefetch-multiplier=1"],
    ["--prefetch-multiplier", "16"],
    ["--disable-prefetch"],
    ["--time-limit=300"],
    ["--soft-time-limit", "2.5"],
    ["--max-tasks-per-child=100"],
    ["--max-memory-per-child", "200000"],
    ["--without-gossip", "--without-mingle", "--without-heartbeat"],
    ["--heartbeat-interval=10"],
    ["-E", "-E"],
    ["worker_prefetch_multiplier=4"],
    [".prefetch_multiplier=4"],
    ["_prefetch_multiplier=4"],
    ["WORKER.PREFETCH_MULTIPLIER=4"],
    ["worker_max_tasks_per_child=10", "worker_max_memory_per_child=1000"],
    ["task_time_limit=60", "task_soft_time_limit=50.5"],
    ["worker_send_task_events=yes", "task_acks_late=True", "task_reject_on_worker_lost=0"],
    ["worker_lost_wait=20", "worker_disable_rate_limits=on", "worker_log_color=off"],
    ["task_acks_late=1", "-l", "info", "worker_lost_wait=1.5", "-E"],
]


@pytest.mark.parametrize("args", ALLOWED, ids=[" ".join(a) or "empty" for a in ALLOWED])
def test_allowed(args: list[str]) -> None:
    assert check_worker_arguments(args) == tuple(args)
    assert check_arguments(list(args)) == tuple(args)
    assert_celery_agrees(args)


# -- the table against Celery's -----------------------------------------------------------


def test_allowed_options_are_celery_worker_options_with_the_same_arity() -> None:
    for name, option in ALLOWED_OPTIONS.items():
        param = BY_OPTION[name]
        # Every spelling of that option is allowed, and nothing else.
        assert set(option.names) == set(param.opts) | set(param.secondary_opts), name
        assert option.takes_value == (not param.is_flag), name


def test_allowed_choices_are_celery_choices() -> None:
    assert set(LOG_LEVELS) == set(LOG_LEVEL.choices)
    assert set(POOLS) <= set(PARAMS["pool"].type.choices)
    assert set(PARAMS["optimization"].type.choices) == {"default", "fair"}
    assert set(PARAMS["pool_start_method"].type.choices) == {"fork", "spawn"}


def test_refused_options_are_celery_options() -> None:
    """The reasons table names real options: the worker's, or ``celery``'s
    global ones (which the worker itself refuses after ``worker``)."""
    group_options = {o for p in celery_group.params for o in p.opts + p.secondary_opts}
    for name in REFUSED_OPTIONS:
        assert name in BY_OPTION or name in group_options, name


def test_every_celery_worker_option_is_decided() -> None:
    for name in BY_OPTION:
        assert name in ALLOWED_OPTIONS or name in REFUSED_OPTIONS, name


def test_allowed_settings_are_celery_settings() -> None:
    samples = {"int": "3", "float": "2.5", "bool": "yes"}
    for key in ALLOWED_SETTINGS:
        namespace, name = key.split("_", 1)
        kind = NAMESPACES[namespace][name].type
        value = samples[kind]
        check_worker_arguments([f"{key}={value}"])
        assert set(celery_settings([f"{key}={value}"])) == {key}


@pytest.mark.parametrize(
    "word",
    [
        "worker_prefetch_multiplier=2",
        ".prefetch_multiplier=2",
        "_PREFETCH_MULTIPLIER=2",
        "Worker.Prefetch.Multiplier=2",
        "TASK_ACKS_LATE=no",
        "task.acks.late=no",
    ],
)
def test_setting_key_is_celerys(word: str) -> None:
    key = word.split("=", 1)[0]
    assert set(celery_settings([word])) == {setting_key(key)}


def test_the_agents_own_command_line_is_what_the_agent_means() -> None:
    assert AGENT_OWN["hostname"] == "w1@host.example"
    assert AGENT_OWN["autoscale"] == "4,2"
    assert set(AGENT_OWN) >= {"queues", "pidfile", "logfile", "without_mingle"}


# -- properties --------------------------------------------------------------------------


def assert_celery_agrees(args: list[str]) -> None:
    """What the validator accepted, as Celery reads it: only allowed
    options, only allowed settings, and after the agent's own words,
    nothing the agent set is changed."""
    opts, words = celery_parse(list(args))
    assert set(opts) <= ALLOWED_PARAMS, (args, opts)
    assert set(celery_settings(words)) <= set(ALLOWED_SETTINGS), (args, words)
    full_opts, full_words = celery_parse(agent_words(tuple(args)))
    for name in ("hostname", "queues", "autoscale", "pidfile", "logfile", "concurrency"):
        assert full_opts.get(name) == AGENT_OWN.get(name), (args, name)
    assert full_words == words
    # Celery's early -P/--pool scan (for monkey-patching) sees the pool click uses.
    pools = [w for w in args if w.startswith(("-P", "--pool=")) or w == "--pool"]
    if opts.get("pool") in ("eventlet", "gevent") and len(pools) == 1:
        assert _find_option_with_arg(list(args), ["-P"], ["--pool"]) == opts["pool"]


VALUES = {
    "-l": st.sampled_from(LOG_LEVELS + ("info", "debug", "Warning")),
    "-O": st.sampled_from(("default", "fair")),
    "-P": st.sampled_from(("prefork",)),
    "--pool-start-method": st.sampled_from(("fork", "spawn")),
    "--prefetch-multiplier": st.integers(1, 10_000).map(str),
    "--time-limit": st.sampled_from(("1", "30", "2.5", "3600")),
    "--soft-time-limit": st.sampled_from(("1", "30", "2.5", "3600")),
    "--max-tasks-per-child": st.integers(1, 10**6).map(str),
    "--max-memory-per-child": st.integers(1, 10**6).map(str),
    "--heartbeat-interval": st.integers(1, 3600).map(str),
}
for _option in ALLOWED_OPTIONS.values():
    for _name in _option.names:
        if _option.takes_value and _name not in VALUES:
            VALUES[_name] = VALUES[next(n for n in _option.names if n in VALUES)]
SHORT_FLAGS = sorted(n for n, o in ALLOWED_OPTIONS.items() if len(n) == 2 and not o.takes_value)
SHORT_VALUED = sorted(n for n, o in ALLOWED_OPTIONS.items() if len(n) == 2 and o.takes_value)
LONG_FLAGS = sorted(n for n, o in ALLOWED_OPTIONS.items() if len(n) > 2 and not o.takes_value)
LONG_VALUED = sorted(n for n, o in ALLOWED_OPTIONS.items() if len(n) > 2 and o.takes_value)
SETTING_VALUES = {
    "int": st.integers(1, 1000).map(str),
    "float": st.sampled_from(("1", "2.5")),
    "bool": st.sampled_from(("true", "no", "On", "0")),
}


def _spellings(key: str) -> st.SearchStrategy[str]:
    spellings = [key, key.upper(), key.replace("_", ".", 1)]
    if key.startswith("worker_"):
        spellings += [key[len("worker") :], "." + key[len("worker_") :]]
    return st.sampled_from(spellings)


@st.composite
def setting(draw: Any) -> list[str]:
    key = draw(st.sampled_from(sorted(ALLOWED_SETTINGS)))
    namespace, name = key.split("_", 1)
    value = draw(SETTING_VALUES[NAMESPACES[namespace][name].type])
    return [f"{draw(_spellings(key))}={value}"]


@st.composite
def allowed_element(draw: Any) -> list[str]:
    """One complete allowed option (or setting) in one of its forms."""
    kind = draw(st.sampled_from(["long-flag", "long=", "long value", "short", "bundle", "setting"]))
    if kind == "long-flag":
        return [draw(st.sampled_from(LONG_FLAGS))]
    if kind in ("long=", "long value"):
        name = draw(st.sampled_from(LONG_VALUED))
        value = draw(VALUES[name])
        return [f"{name}={value}"] if kind == "long=" else [name, value]
    if kind == "setting":
        return draw(setting())
    flags = "".join(f[1] for f in draw(st.lists(st.sampled_from(SHORT_FLAGS), max_size=3)))
    if kind == "short" or draw(st.booleans()):
        name = draw(st.sampled_from(SHORT_VALUED))
        value = draw(VALUES[name])
        if draw(st.booleans()):
            return [f"-{flags}{name[1]}{value}"]
        return [f"-{flags}{name[1]}", value]
    return [f"-{flags}"] if flags else ["-E"]


# Forbidden: every refused option, unknown ones, refused settings, "--".
REFUSED_SHORT = sorted(n for n in REFUSED_OPTIONS if len(n) == 2)
REFUSED_LONG = sorted(n for n in REFUSED_OPTIONS if len(n) > 2)
FORBIDDEN_SETTINGS = [
    "accept_content",
    "CELERY_ACCEPT_CONTENT",
    "task_serializer",
    "result.serializer",
    "worker_pool",
    "_pool",
    "broker_url",
    "BROKER_HEARTBEAT",
    "result_backend",
    "imports",
    "include",
    "task_routes",
    "worker_concurrency",
    "worker_consumer",
    "worker_state_db",
    "worker_direct",
    "beat_scheduler",
]


@st.composite
def forbidden_element(draw: Any) -> list[str]:
    kind = draw(st.sampled_from(["short", "short-bundled", "long", "long=", "unknown", "setting", "bad-value", "end"]))
    flags = "".join(f[1] for f in draw(st.lists(st.sampled_from(SHORT_FLAGS), max_size=2)))
    if kind in ("short", "short-bundled"):
        name = draw(st.sampled_from(REFUSED_SHORT))
        prefix = flags if kind == "short-bundled" else ""
        return draw(st.sampled_from([[f"-{prefix}{name[1]}", "x"], [f"-{prefix}{name[1]}x"], [f"-{prefix}{name[1]}"]]))
    if kind in ("long", "long="):
        name = draw(st.sampled_from(REFUSED_LONG))
        return [f"{name}=x"] if kind == "long=" else [name, "x"]
    if kind == "unknown":
        letters = draw(st.text("abcdefghijkmnopqrstuvwxyz-", min_size=1, max_size=12))
        name = "--" + letters
        if name in ALLOWED_OPTIONS:
            name = "--x" + letters
        short = draw(st.sampled_from("aeghjkmoprtuvwxyzFGHJKLMNRTUVWYZ0123456789%"))
        return draw(st.sampled_from([[name], [f"-{flags}{short}"]]))
    if kind == "setting":
        key = draw(st.sampled_from(FORBIDDEN_SETTINGS))
        return [f"{key}={draw(st.sampled_from(['1', 'x', 'pickle']))}"]
    if kind == "bad-value":
        name = draw(st.sampled_from(LONG_VALUED + SHORT_VALUED))
        value = draw(st.sampled_from(["-D", "--hostname=x", "0", "-1", "x@y", "inf", "", "=4"]))
        if name.startswith("--"):
            return [f"{name}={value}"]
        return [name, value] if value else [name]
    return ["--"]


# Words chosen to hit the parser's corners: dashes, "=", bundles of real
# short options, settings spelled oddly.
FUZZ_PIECES = list("-=EOlPcnQDfBsSXIZ._afirINFOkt0129 ") + [
    "fair",
    "info",
    "prefork",
    "worker",
    "prefetch",
    "_multiplier",
    "acks_late",
    "gevent",
    "true",
]
FUZZ_WORD = st.lists(st.sampled_from(FUZZ_PIECES), min_size=1, max_size=8).map("".join)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.lists(allowed_element(), max_size=6))
def test_generated_allowed_lists_are_accepted_and_celery_agrees(elements: list[list[str]]) -> None:
    args = [word for element in elements for word in element]
    assert check_worker_arguments(args) == tuple(args)
    assert_celery_agrees(args)


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(allowed_element(), st.lists(FUZZ_WORD, min_size=1, max_size=2)), max_size=6))
def test_whatever_is_accepted_celery_reads_as_allowed(elements: list[list[str]]) -> None:
    args = [word for element in elements for word in element]
    try:
        check_worker_arguments(args)
    except RefusedArgument:
        return
    assert_celery_agrees(args)


@PROPERTY_SETTINGS
@given(
    st.lists(allowed_element(), max_size=4),
    forbidden_element(),
    st.lists(allowed_element(), max_size=4),
)
def test_a_forbidden_element_anywhere_is_refused(
    before: list[list[str]], bad: list[str], after: list[list[str]]
) -> None:
    args = [w for e in before for w in e] + bad + [w for e in after for w in e]
    with pytest.raises(RefusedArgument):
        check_worker_arguments(args)
    with pytest.raises(BadParameter):
        check_arguments(args)


@PROPERTY_SETTINGS
@given(st.lists(allowed_element(), max_size=4), st.lists(allowed_element(), max_size=4))
def test_app_and_instance_arguments_together_are_still_allowed(app: list[list[str]], instance: list[list[str]]) -> None:
    app_args = [w for e in app for w in e]
    instance_args = [w for e in instance for w in e]
    check_worker_arguments(app_args)
    check_worker_arguments(instance_args)
    assert_celery_agrees(app_args + instance_args)
