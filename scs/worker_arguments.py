"""Extra ``celery worker`` arguments, checked against an allow-list.

Operators may add arguments to the worker command line the agent builds
(``scs.worker.build_argv``).  They are read here exactly the way Celery
5.7's ``celery worker`` command reads them (a click command, see
``celery/bin/worker.py`` and ``click/parser.py``), so that what Celery sees
is what was checked:

* ``--long=value`` and ``--long value``; a flag given a value
  (``--without-gossip=1``) is an error;
* short options bundled behind one dash: flags one after the other, and the
  first short option that takes a value takes the rest of the word as its
  value (``-EOfair`` is ``-E -O fair``, ``-Ec4`` is ``-E -c 4``, ``-c=4`` is
  ``-c`` with the value ``=4``), or the next word when nothing is left
  (``-EO fair``);
* a value is the next word whatever it looks like (``-l -D`` gives ``-l``
  the value ``-D``);
* a word that does not start with ``-`` (or is a lone ``-``) is not an
  option: the worker turns it into configuration with
  ``app.config_from_cmdline(args, namespace="worker")``, which splits it at
  the first ``=``, lower-cases the key, turns ``.`` into ``_`` and puts
  ``worker`` in front of a key that starts with ``_``
  (``.prefetch_multiplier=2`` sets ``worker_prefetch_multiplier``), and
  casts a value written ``(json)...``, ``(list)...`` etc. without looking
  the key up;
* ``--`` ends the options (everything after it would be configuration).

Everything is refused unless it is on the allow-lists below; values are
checked too (integers, numbers, choices), so that no value can be read as
anything else, by Celery's parser or by the early ``-P``/``--pool`` scan
Celery's ``__main__`` does before click runs.  Celery itself is never
imported here: the table is our own, and ``tests/test_worker_arguments.py``
checks it against the real Celery parser.

The agent always sets ``-n``, ``-Q``, ``--autoscale``, ``--pidfile`` and
``--logfile`` (and ``-A``/``-b`` before ``worker``), so those, and anything
that detaches the worker, changes its user, files or queues, imports code,
runs beat, deletes messages or changes what it deserializes, are refused.
The app's and the instance's arguments are appended one after the other;
each list is complete on its own (no option left waiting for its value, no
``--``), so their concatenation parses as the two lists do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOWED_OPTIONS",
    "ALLOWED_SETTINGS",
    "RefusedArgument",
    "check_worker_arguments",
    "setting_key",
]

MAX_ARGUMENT_LENGTH = 1000

Check = Callable[[str], None]


class RefusedArgument(ValueError):
    """An argument that is not allowed; ``option`` names it (the option as
    spelled, ``-n`` inside ``-En``, or a setting's key)."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.message = message
        self.option = option


# -- values -----------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]{1,12}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


def _integer(low: int, high: int) -> Check:
    def check(value: str) -> None:
        # ASCII digits only: int() would also take " 4", "+4", "4_0" or "٤".
        if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
            raise ValueError(f"an integer from {low} to {high}")

    check.__doc__ = f"an integer from {low} to {high}"
    return check


def _seconds(high: int) -> Check:
    def check(value: str) -> None:
        # No "inf", "nan", "1e3" or signs: a plain positive decimal.
        if not _DECIMAL.fullmatch(value) or not 0 < float(value) <= high:
            raise ValueError(f"a number of seconds above 0 and at most {high}")

    check.__doc__ = f"a number of seconds above 0 and at most {high}"
    return check


def _choice(*choices: str, any_case: bool = False) -> Check:
    def check(value: str) -> None:
        # Celery upper-cases a log level; only ASCII, so that no other
        # letter upper-cases into one ("ı".upper() == "I").
        candidate = value.upper() if any_case and value.isascii() else value
        if candidate not in choices:
            raise ValueError(f"one of {', '.join(choices)}")

    check.__doc__ = "one of " + ", ".join(choices)
    return check


# Celery's strtobool table (celery.utils.serialization), ASCII only.
_BOOLEANS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _boolean(value: str) -> None:
    if not value.isascii() or value.lower() not in _BOOLEANS:
        raise ValueError("true or false (yes/no, on/off, 1/0)")


_boolean.__doc__ = "true or false"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
# Pools that can grow and shrink: the agent always starts workers with
# --autoscale (and corrects it with Celery's ``autoscale`` command); solo
# and threads cannot, and "custom" loads a class named by an environment
# variable.
POOLS = ("prefork", "eventlet", "gevent")
# Pools Celery must monkey-patch before anything else: its __main__ finds
# them by a scan of its own that sees only "-P NAME", "--pool NAME" and
# "--pool=NAME" (celery.maybe_patch_concurrency), not "-Pgevent" or "-EP".
_EARLY_PATCHED_POOLS = ("eventlet", "gevent")


# -- options ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One allowed ``celery worker`` option (all its spellings)."""

    names: tuple[str, ...]
    check: Check | None = None  # None: a flag, which takes no value

    @property
    def takes_value(self) -> bool:
        return self.check is not None


_OPTIONS = (
    Option(("-l", "--loglevel"), _choice(*LOG_LEVELS, any_case=True)),
    Option(("-O", "--optimization"), _choice("default", "fair")),
    Option(("-P", "--pool"), _choice(*POOLS)),
    Option(("--pool-start-method",), _choice("fork", "spawn")),
    Option(("--prefetch-multiplier",), _integer(1, 10_000)),
    Option(("--disable-prefetch",)),
    Option(("-E", "--task-events", "--events")),
    Option(("--time-limit",), _seconds(31_536_000)),
    Option(("--soft-time-limit",), _seconds(31_536_000)),
    Option(("--max-tasks-per-child",), _integer(1, 1_000_000_000)),
    Option(("--max-memory-per-child",), _integer(1, 1_000_000_000_000)),  # KiB
    Option(("--without-gossip",)),
    Option(("--without-mingle",)),
    Option(("--without-heartbeat",)),
    Option(("--heartbeat-interval",), _integer(1, 3600)),
)

#: Allowed options by each of their spellings.
ALLOWED_OPTIONS: dict[str, Option] = {name: o for o in _OPTIONS for name in o.names}

_OWNED = "is set by the agent and cannot be overridden"

#: Options Celery knows (the worker's own, the daemon ones every worker
#: has, and ``celery``'s global ones, which the worker refuses after
#: ``worker``), with why each is refused.  Anything else is refused as
#: unknown.
REFUSED_OPTIONS: dict[str, str] = {
    **dict.fromkeys(("-n", "--hostname"), _OWNED),
    **dict.fromkeys(("-Q", "--queues"), _OWNED),
    **dict.fromkeys(("-X", "--exclude-queues"), _OWNED + " (the agent owns the queues)"),
    **dict.fromkeys(("--autoscale",), _OWNED),
    **dict.fromkeys(
        ("-c", "--concurrency"),
        _OWNED + " (--autoscale, from max_concurrency and min_concurrency, decides it)",
    ),
    **dict.fromkeys(("-f", "--logfile", "--pidfile"), _OWNED),
    **dict.fromkeys(("-A", "--app", "-b", "--broker"), _OWNED),
    **dict.fromkeys(("-D", "--detach"), "is not allowed: a detached worker escapes the agent's supervision"),
    **dict.fromkeys(
        ("--uid", "--gid", "--umask", "--executable", "--workdir"),
        "is not allowed: it changes the worker's user, files or executable",
    ),
    **dict.fromkeys(("-S", "--statedb"), "is not allowed: it writes a file outside the instance directory"),
    **dict.fromkeys(("-I", "--include"), "is not allowed: it imports code into the worker"),
    **dict.fromkeys(
        ("-B", "--beat", "-s", "--schedule", "--schedule-filename", "--scheduler"),
        "is not allowed: beat is not run inside supervised workers",
    ),
    **dict.fromkeys(("--purge", "--discard"), "is not allowed: it deletes queued messages"),
    **dict.fromkeys(
        ("--result-backend", "--loader", "--config"),
        "is not allowed: it changes the worker's configuration, backend or code",
    ),
    **dict.fromkeys(
        ("-C", "--no-color", "-q", "--quiet", "--version", "--skip-checks", "--help"),
        "is not allowed: it is not a celery worker option for instances",
    ),
}


# -- key=value configuration -----------------------------------------------------------

#: Settings that may be given as ``key=value``, by the key Celery stores
#: (see ``setting_key``), with their values.  None of them can load code,
#: change serialization, the broker, the result backend, routes or queues.
ALLOWED_SETTINGS: dict[str, Check] = {
    "worker_prefetch_multiplier": _integer(1, 10_000),
    "worker_max_tasks_per_child": _integer(1, 1_000_000_000),
    "worker_max_memory_per_child": _integer(1, 1_000_000_000_000),
    "worker_send_task_events": _boolean,
    "worker_disable_rate_limits": _boolean,
    "worker_lost_wait": _seconds(3600),
    "worker_log_color": _boolean,
    "task_time_limit": _seconds(31_536_000),
    "task_soft_time_limit": _seconds(31_536_000),
    "task_acks_late": _boolean,
    "task_reject_on_worker_lost": _boolean,
}

_SETTING_REASONS = {
    "worker_concurrency": _OWNED + " (--autoscale decides it)",
    "worker_pool": "is not allowed: it names a class to import (use -P)",
}

_KEY = re.compile(r"[A-Za-z0-9_.]{1,100}")


def setting_key(key: str) -> str:
    """The setting Celery's ``config_from_cmdline(..., namespace="worker")``
    stores for ``key`` (``.prefetch_multiplier`` and ``_prefetch_multiplier``
    are ``worker_prefetch_multiplier``, ``TASK.ACKS_LATE`` is
    ``task_acks_late``)."""
    key = key.lower().replace(".", "_")
    if key.startswith("_"):
        return "worker" + key
    return key


# -- the parser ------------------------------------------------------------------------


def _refuse_option(name: str) -> RefusedArgument:
    reason = REFUSED_OPTIONS.get(name)
    if reason is None:
        return RefusedArgument(
            f"argument {name!r} is not an allowed celery worker option "
            f"(allowed: {', '.join(sorted(ALLOWED_OPTIONS))}, and key=value for "
            f"{', '.join(sorted(ALLOWED_SETTINGS))})",
            name,
        )
    return RefusedArgument(f"argument {name!r} {reason}", name)


def _option(name: str) -> Option:
    option = ALLOWED_OPTIONS.get(name)
    if option is None:
        raise _refuse_option(name)
    return option


def _check_value(name: str, option: Option, value: str) -> None:
    assert option.check is not None
    try:
        option.check(value)
    except ValueError as e:
        raise RefusedArgument(f"argument {name!r} takes {e}, got {value[:100]!r}", name) from None


def _check_setting(item: str) -> None:
    key, equals, value = item.partition("=")
    if not equals or not _KEY.fullmatch(key):
        raise RefusedArgument(
            f"argument {item[:100]!r} is neither an allowed option nor an allowed "
            f"key=value setting ({', '.join(sorted(ALLOWED_SETTINGS))})",
            key or item,
        )
    stored = setting_key(key)
    check = ALLOWED_SETTINGS.get(stored)
    if check is None:
        spelled = key if stored == key else f"{key} ({stored})"
        reason = _SETTING_REASONS.get(stored)
        if reason:
            raise RefusedArgument(f"setting {spelled!r} {reason}", key)
        raise RefusedArgument(
            f"setting {spelled!r} may not be given as an argument (allowed: {', '.join(sorted(ALLOWED_SETTINGS))})",
            key,
        )
    try:
        check(value)
    except ValueError as e:
        raise RefusedArgument(f"setting {key!r} takes {e}, got {value[:100]!r}", key) from None


def check_worker_arguments(items: Iterable[str]) -> tuple[str, ...]:
    """``items`` as given, if every one is allowed; else ``RefusedArgument``
    naming the first option or setting that is not."""
    args: Sequence[str] = list(items)
    for item in args:
        if not isinstance(item, str) or not item:
            raise RefusedArgument("arguments must be non-empty strings", "")
        if len(item) > MAX_ARGUMENT_LENGTH or not item.isprintable():
            raise RefusedArgument("an argument is too long or holds control characters", item[:20])
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            raise RefusedArgument("argument '--' is not allowed: it would turn what follows into settings", "--")
        if not arg.startswith("-") or arg == "-":
            _check_setting(arg)
        elif arg.startswith("--"):
            i = _check_long(arg, args, i)
        else:
            i = _check_short_bundle(arg, args, i)
    return tuple(args)


def _check_long(arg: str, args: Sequence[str], i: int) -> int:
    """A long option (click tries "-x..." as a long option too, but the
    worker has no long option with a single dash); returns the index of
    the next word."""
    name, equals, explicit = arg.partition("=")
    option = _option(name)
    if not option.takes_value:
        if equals:
            raise RefusedArgument(f"argument {name!r} does not take a value", name)
        return i
    if equals:
        value = explicit
    elif i < len(args):
        value, i = args[i], i + 1
    else:
        raise RefusedArgument(f"argument {name!r} needs a value", name)
    _check_value(name, option, value)
    return i


def _check_short_bundle(arg: str, args: Sequence[str], i: int) -> int:
    """Short options, bundled: each letter is an option until one takes a
    value, which is the rest of the word (with any "=") or the next word;
    returns the index of the next word."""
    for j in range(1, len(arg)):
        name = "-" + arg[j]
        option = _option(name)
        if not option.takes_value:
            continue
        if j + 1 < len(arg):
            value = arg[j + 1 :]
            attached = True
        elif i < len(args):
            value, i = args[i], i + 1
            attached = False
        else:
            raise RefusedArgument(f"argument {name!r} needs a value", name)
        _check_value(name, option, value)
        if name == "-P" and (attached or j > 1) and value in _EARLY_PATCHED_POOLS:
            raise RefusedArgument(
                f"argument '-P {value}' must be written as its own words "
                f"('-P', '{value}') or '--pool={value}': Celery patches for "
                f"{value} before it parses bundled options",
                name,
            )
        break
    return i
