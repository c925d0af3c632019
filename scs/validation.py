"""Checking what operators send before anything touches the store.

Every function here either returns a clean, typed value or raises
``BadParameter`` with a message that names the parameter and the problem.
Nothing here is ever run through a shell; the rules exist so that names are
safe as Celery node names, queue names and file names, and so that a typo is
refused instead of silently stored.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import stat
import unicodedata
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from scs import records
from scs.errors import BadParameter
from scs.records import BrokerInfo, QueueBinding
from scs.worker_arguments import RefusedArgument, check_worker_arguments

MAX_NAME_LENGTH = 64
MAX_QUEUE_NAME_LENGTH = 200
# Names end up in AMQP short strings (queue ``dq.<name>``, exchanges,
# routing keys: at most 255 bytes) and in file names (at most 255 bytes), so
# their UTF-8 length is bounded too, not only their length in characters.
MAX_NAME_BYTES = 200
MAX_QUEUE_NAME_BYTES = 250
MAX_QUEUES = 100
MAX_BROKER_URL_LENGTH = 1024
MAX_CONCURRENCY = 256
MAX_ARGUMENTS = 50
MAX_ARGUMENT_LENGTH = 1000
MAX_OPTIONS_LENGTH = 4096

# Letters and digits of any script, "_", "." and "-"; must start with a
# letter, digit or "_".  This keeps "/", "@", whitespace, control characters
# and shell metacharacters out of node names, file names and URLs.  Always
# used with ``fullmatch``: ``match`` with "$" lets a trailing newline through.
_NAME = re.compile(r"^\w[\w.\-]*$")
# Routing keys may use the topic wildcards.
_ROUTING_KEY = re.compile(r"^[\w.\-:*#]*$")
_CELERY_APP = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(:[A-Za-z_][A-Za-z0-9_.]*)?$")
_INTEGER = re.compile(r"[+-]?[0-9]{1,12}")
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")

# Paths that would shadow an app's URL.
RESERVED_APP_NAMES = frozenset({"ping", "agents", "admin", "metrics", "instances", "static", "openapi.json"})

_TRUE = {"1", "true", "yes", "on", ""}
_FALSE = {"0", "false", "no", "off"}


def check_name(
    value: Any,
    what: str = "name",
    max_length: int = MAX_NAME_LENGTH,
    max_bytes: int = MAX_NAME_BYTES,
) -> str:
    """A name for an app, instance or queue."""
    if not isinstance(value, str):
        raise BadParameter(f"{what} must be a string", parameter=what)
    if value == "":
        raise BadParameter(f"{what} must not be empty", parameter=what)
    if len(value) > max_length:
        raise BadParameter(
            f"{what} is too long ({len(value)} characters, at most {max_length})",
            parameter=what,
        )
    if not _NAME.fullmatch(value):
        raise BadParameter(
            f"{what} may only hold letters, digits, '_', '.' and '-', and must start with a letter, digit or '_'",
            parameter=what,
        )
    if len(value.encode("utf-8")) > max_bytes:
        raise BadParameter(
            f"{what} is too long ({len(value.encode('utf-8'))} bytes in UTF-8, at most {max_bytes})",
            parameter=what,
        )
    if unicodedata.normalize("NFC", value) != value:
        raise BadParameter(f"{what} must be in Unicode normal form NFC", parameter=what)
    return value


def check_app_name(value: Any) -> str:
    name = check_name(value, "app")
    if name in RESERVED_APP_NAMES:
        raise BadParameter(f"app may not be named {name!r}: the path is taken", parameter="app")
    return name


def check_instance_name(value: Any) -> str:
    return check_name(value, "instance")


# Queue names the broker or the agent reserve: RabbitMQ's own ("amq.") and
# each instance's private queue ("dq.<instance>"), which no other worker
# may consume.
RESERVED_QUEUE_PREFIXES = ("amq.", "dq.")


def check_queue_name(value: Any, what: str = "queue") -> str:
    name = check_name(value, what, MAX_QUEUE_NAME_LENGTH, MAX_QUEUE_NAME_BYTES)
    if name.lower().startswith(RESERVED_QUEUE_PREFIXES):
        raise BadParameter(
            f"{what}: names starting with {' or '.join(RESERVED_QUEUE_PREFIXES)} are reserved "
            "(the broker's own queues and the instances' private queues)",
            parameter=what,
        )
    return name


def check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise BadParameter(f"{what} must be an integer", parameter=what)
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: int() would also take "٣" or "1_000".
        if not _INTEGER.fullmatch(text):
            raise BadParameter(f"{what} must be an integer, got {value!r}", parameter=what)
        value = int(text)
    if not isinstance(value, int):
        raise BadParameter(f"{what} must be an integer", parameter=what)
    if not low <= value <= high:
        raise BadParameter(f"{what} must be between {low} and {high}, got {value}", parameter=what)
    return value


def check_concurrency(value: Any, what: str) -> int:
    low = 1 if what.startswith("max") else 0
    return check_int(value, what, low, MAX_CONCURRENCY)


DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 10_000


def check_lines(value: Any) -> int:
    """``lines`` of a worker log to answer: 1 to ``MAX_LOG_LINES``."""
    return check_int(value, "lines", 1, MAX_LOG_LINES)


def check_concurrency_range(max_concurrency: int, min_concurrency: int) -> None:
    if min_concurrency > max_concurrency:
        raise BadParameter(
            f"min_concurrency ({min_concurrency}) is greater than max_concurrency ({max_concurrency})",
            parameter="min_concurrency",
        )


# An app's revision from a peer may be at most this far ahead of this
# agent's clock (ms): a hostile or broken peer cannot pin an app for ever.
MAX_REVISION_AHEAD_MS = 24 * 3600 * 1000


def check_revision(value: Any) -> int:
    """An app's revision from a peer (``scs.app_sync``): a non-negative
    integer, not more than a day ahead of this agent's clock."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadParameter("revision must be a non-negative integer", parameter="revision")
    if value > records.now_ms() + MAX_REVISION_AHEAD_MS:
        raise BadParameter("revision is more than a day ahead of this agent's clock", parameter="revision")
    return value


def check_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise BadParameter(f"{what} must be true or false, got {value!r}", parameter=what)


def check_broker_url(value: Any, what: str = "broker") -> str:
    """An ``amqp://user:password@host:port/vhost`` URL (``amqps://`` for
    AMQP over TLS), in its one spelling."""
    if not isinstance(value, str) or not value:
        raise BadParameter(f"{what} must be a non-empty amqp:// or amqps:// URL", parameter=what)
    if len(value) > MAX_BROKER_URL_LENGTH:
        raise BadParameter(f"{what} is too long (at most {MAX_BROKER_URL_LENGTH} characters)", parameter=what)
    if any(c.isspace() or not c.isprintable() for c in value):
        raise BadParameter(f"{what} must be a URL without spaces or control characters", parameter=what)
    if not value.lower().startswith(("amqp://", "pyamqp://", "amqps://")):
        raise BadParameter(
            # The scheme alone: the URL may hold a password, and this
            # message reaches answers and logs.
            f"{what} must start with amqp:// or amqps://, not {value.partition(':')[0][:20]!r}",
            parameter=what,
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        # Not urllib's text: it may quote part of the password.
        raise BadParameter(f"{what}: not a valid URL (bad host or port)", parameter=what) from None
    try:
        info = BrokerInfo.from_url(value)
    except ValueError as e:  # BrokerInfo's own messages never quote the URL
        raise BadParameter(f"{what}: {e}", parameter=what) from None
    if port == 0:
        raise BadParameter(f"{what}: port 0 is not a broker port", parameter=what)
    host = parts.hostname
    if host:
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise BadParameter(f"{what}: {host!r} is not an IPv6 address", parameter=what) from None
        elif not _HOSTNAME.fullmatch(host):
            raise BadParameter(
                f"{what}: host name {host!r} may only hold ASCII letters, digits, '_', '.' and '-'",
                parameter=what,
            )
    for part in (info.userid, info.password, info.virtual_host):
        if not part.isprintable():
            raise BadParameter(
                f"{what}: user, password and virtual host must not hold control characters",
                parameter=what,
            )
    return info.url


def check_celery_app(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 255 or not _CELERY_APP.fullmatch(value):
        raise BadParameter(
            "celery_app must be a Python import path such as 'proj.celery:app'",
            parameter="celery_app",
        )
    return value


def check_arguments(value: Any) -> tuple[str, ...]:
    """Extra ``celery worker`` arguments: a JSON list of strings, or a string
    split like a command line (split only: no shell ever sees it)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            items: list[Any] = shlex.split(value)
        except ValueError as e:
            raise BadParameter(f"arguments: {e}", parameter="arguments") from None
    elif isinstance(value, list):
        items = value
    else:
        raise BadParameter("arguments must be a list of strings", parameter="arguments")
    if len(items) > MAX_ARGUMENTS:
        raise BadParameter(f"at most {MAX_ARGUMENTS} arguments", parameter="arguments")
    for item in items:
        if not isinstance(item, str) or not item:
            raise BadParameter("arguments must be non-empty strings", parameter="arguments")
        if len(item) > MAX_ARGUMENT_LENGTH or not item.isprintable():
            raise BadParameter("an argument is too long or holds control characters", parameter="arguments")
    try:
        return check_worker_arguments(items)
    except RefusedArgument as e:
        raise BadParameter(e.message, parameter="arguments", option=e.option) from None


# -- app settings for its workers: env, workdir, python --------------------------

MAX_ENV_VARIABLES = 100
MAX_ENV_NAME_LENGTH = 128
MAX_ENV_VALUE_LENGTH = 4096
MAX_ENV_LENGTH = 32768  # the whole object as JSON text
MAX_PATH_LENGTH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables an app may not set for its workers.  The dynamic loader's
# (LD_PRELOAD and the like) would load native code into the worker and into
# the agent's session launcher; Celery's own (CELERY_LOADER,
# CELERY_CUSTOM_WORKER_POOL, CELERY_RDB_HOST...) would configure the worker
# around the agent's command line and the allow-list of ``arguments``; and
# the interpreter's that change which Python runs or make it interactive
# are the ``python`` setting's business.  PYTHONPATH, PATH and the app's own
# variables are allowed: an app's code may need them.
#
# The interpreter's own (PYTHON*) are an allow-list: several of the others
# import or run code named in their value (PYTHONWARNINGS names a module to
# import, PYTHONSTARTUP a file to run, PYTHONBREAKPOINT a hook...).  Other
# programs' start-up hooks that Python's standard library can reach are
# refused too (BROWSER is run by webbrowser, PERL5OPT by a perl it starts,
# BASH_ENV by a shell).
REFUSED_ENV_PREFIXES = ("LD_", "DYLD_", "CELERY_", "PERL", "RUBY", "NODE_", "BASH_FUNC_")
REFUSED_ENV_NAMES = frozenset(
    {
        "C_FORCE_ROOT",
        "C_FAKEFORK",
        "FORKED_BY_MULTIPROCESSING",
        "MP_MAIN_FILE",
        "BROWSER",
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "PS4",
        "IFS",
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCPATH",
        "NLSPATH",
    }
)
ALLOWED_PYTHON_ENV_NAMES = frozenset(
    {
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONFAULTHANDLER",
        "PYTHONOPTIMIZE",
        "PYTHONDEVMODE",
    }
)


def _env_name_refused(name: str) -> bool:
    upper = name.upper()
    if upper.startswith("PYTHON"):
        return upper not in ALLOWED_PYTHON_ENV_NAMES
    return upper in REFUSED_ENV_NAMES or upper.startswith(REFUSED_ENV_PREFIXES)


# The literal that sets ``workdir`` or ``python`` back to the agent's own
# (a form cannot send "no value": an empty field means "not given").
DEFAULT_SETTING = "default"


def check_env(value: Any, *, on_this_machine: bool = False) -> dict[str, str] | None:
    """``env``: a JSON object of environment variables (or its JSON text, as
    a form field sends it), names like ``[A-Za-z_][A-Za-z0-9_]*``, values
    printable strings.  None: not given (JSON null); ``{}`` clears.  Messages
    name a bad variable, never quote a value (values may be credentials).
    With ``on_this_machine`` (the API's door), a ``PYTHONPATH`` directory
    that every user may write to is refused, as ``workdir`` is."""
    if value is None:
        return None
    if value == "":
        raise BadParameter("env must be a JSON object of names to strings ({} clears)", parameter="env")
    if isinstance(value, str):
        if len(value) > MAX_ENV_LENGTH:
            raise BadParameter(f"env is too long (at most {MAX_ENV_LENGTH} characters)", parameter="env")
        try:
            value = json.loads(value, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise BadParameter("env must be a JSON object of names to strings", parameter="env") from None
    if not isinstance(value, dict):
        raise BadParameter("env must be a JSON object of names to strings", parameter="env")
    if len(value) > MAX_ENV_VARIABLES:
        raise BadParameter(f"env: at most {MAX_ENV_VARIABLES} variables", parameter="env")
    clean: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or len(name) > MAX_ENV_NAME_LENGTH or not _ENV_NAME.fullmatch(name):
            raise BadParameter(
                f"env: variable name {str(name)[:40]!r} must be ASCII letters, digits and '_' "
                f"(not starting with a digit), at most {MAX_ENV_NAME_LENGTH} characters",
                parameter="env",
            )
        if _env_name_refused(name):
            raise BadParameter(
                f"env: {name} may not be set for workers (dynamic loader, Celery's own or interpreter variables)",
                parameter="env",
                variable=name,
            )
        if not isinstance(text, str):
            raise BadParameter(f"env: the value of {name} must be a string", parameter="env", variable=name)
        if len(text) > MAX_ENV_VALUE_LENGTH or not text.isprintable():
            raise BadParameter(
                f"env: the value of {name} must be printable (no control characters or newlines) "
                f"and at most {MAX_ENV_VALUE_LENGTH} characters",
                parameter="env",
                variable=name,
            )
        clean[name] = text
    if len(json.dumps(clean)) > MAX_ENV_LENGTH:
        raise BadParameter(f"env is too long (at most {MAX_ENV_LENGTH} characters as JSON)", parameter="env")
    if on_this_machine:
        for name, text in clean.items():
            if name.upper() != "PYTHONPATH":
                continue
            for entry in text.split(os.pathsep):
                try:
                    info = os.stat(entry or ".")
                except OSError:
                    continue  # not there (yet): nothing to plant in
                if info.st_mode & stat.S_IWOTH:
                    raise BadParameter(
                        f"env: PYTHONPATH names {entry!r}, writable by every user: anyone could plant "
                        "modules the workers import",
                        parameter="env",
                        variable=name,
                    )
    return clean


def _check_path_form(value: Any, what: str) -> str | None:
    """An absolute, normalised path of printable characters; None for
    ``default`` (or JSON null) meaning "the agent's own"."""
    if value is None or value == DEFAULT_SETTING:
        return None
    if not isinstance(value, str):
        raise BadParameter(f"{what} must be an absolute path or {DEFAULT_SETTING!r}", parameter=what)
    if len(value) > MAX_PATH_LENGTH or not value.isprintable():
        raise BadParameter(
            f"{what} must be printable (no control characters) and at most {MAX_PATH_LENGTH} characters",
            parameter=what,
        )
    if not value.startswith("/"):
        raise BadParameter(f"{what} must be an absolute path (or {DEFAULT_SETTING!r}), got {value!r}", parameter=what)
    if os.path.normpath(value) != value or value.startswith("//"):
        raise BadParameter(
            f"{what} must be a normalised path (no '.', '..', '//' or trailing '/'), got {value!r}", parameter=what
        )
    return value


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise BadParameter(f"{what} {path!r} cannot be used on this agent: {e.strerror}", parameter=what) from None


def check_workdir(value: Any, *, on_this_machine: bool = True) -> str | None:
    """``workdir``: the workers' working directory, an absolute normalised
    path; None means the agent's own (``default``).

    With ``on_this_machine`` (the API's door) it must also exist here, be a
    directory the agent can enter, and not be writable by every user:
    ``python -m celery`` puts it first on the workers' ``sys.path``, so in a
    directory such as /tmp anyone could plant a module the worker imports.
    A peer's copy of an app is checked for its form only (the directory may
    not exist on every machine); a worker whose directory is missing where
    it runs is ``failed`` (see ``scs.worker.check_worker_paths``)."""
    path = _check_path_form(value, "workdir")
    if path is None or not on_this_machine:
        return path
    info = _stat(path, "workdir")
    if not stat.S_ISDIR(info.st_mode):
        raise BadParameter(f"workdir {path!r} is not a directory", parameter="workdir")
    if not os.access(path, os.X_OK):
        raise BadParameter(f"workdir {path!r} cannot be entered by the agent", parameter="workdir")
    if info.st_mode & stat.S_IWOTH:
        raise BadParameter(
            f"workdir {path!r} is writable by every user: anyone could plant modules the workers import",
            parameter="workdir",
        )
    return path


def check_python(value: Any, *, on_this_machine: bool = True) -> str | None:
    """``python``: the interpreter that runs ``-m celery`` (a virtualenv's
    ``bin/python``, say; symlinks are followed), an absolute normalised path;
    None means the agent's own (``default``).  With ``on_this_machine`` it
    must be an executable regular file here, not writable by every user; a
    peer's copy is checked for its form only, as for ``workdir``."""
    path = _check_path_form(value, "python")
    if path is None or not on_this_machine:
        return path
    info = _stat(path, "python")
    if not stat.S_ISREG(info.st_mode):
        raise BadParameter(f"python {path!r} is not a regular file", parameter="python")
    if not os.access(path, os.X_OK):
        raise BadParameter(f"python {path!r} is not executable", parameter="python")
    if info.st_mode & stat.S_IWOTH:
        raise BadParameter(f"python {path!r} is writable by every user", parameter="python")
    return path


# The settings of ``PUT /<app>/`` (and of the admin page's app forms).
APP_SETTINGS = ("broker", "celery_app", "arguments", "env", "workdir", "python", "task_events")


def check_app_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Agent.app_put`` for the settings an
    operator sent (the API and the admin page, both on this machine): each
    one given is checked; one left out is not in the result (unchanged)."""
    checks: dict[str, Any] = {
        "broker": check_broker_url,
        "celery_app": check_celery_app,
        "arguments": lambda value: list(check_arguments(value)),
        "env": lambda value: check_env(value, on_this_machine=True),
        "workdir": check_workdir,
        "python": check_python,
        "task_events": lambda value: check_bool(value, "task_events"),
    }
    return {name: check(params[name]) for name, check in checks.items() if name in params}


def check_queue_list(value: Any) -> tuple[str, ...]:
    """``queues``: a comma-separated string or a JSON list of names."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",")]
    elif isinstance(value, list):
        items = value
    else:
        raise BadParameter("queues must be a comma-separated list of names", parameter="queues")
    if len(items) > MAX_QUEUES:
        raise BadParameter(f"at most {MAX_QUEUES} queues", parameter="queues")
    names = [check_queue_name(item, "queues") for item in items]
    if len(set(names)) != len(names):
        raise BadParameter("queues names a queue twice", parameter="queues")
    return tuple(names)


def check_routing(value: Any, what: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) > MAX_QUEUE_NAME_LENGTH
        or len(value.encode("utf-8")) > MAX_QUEUE_NAME_BYTES
    ):
        raise BadParameter(
            f"{what} must be a string of at most {MAX_QUEUE_NAME_LENGTH} characters and {MAX_QUEUE_NAME_BYTES} bytes",
            parameter=what,
        )
    if not _ROUTING_KEY.fullmatch(value):
        raise BadParameter(f"{what} may only hold letters, digits and '_.-:*#'", parameter=what)
    return value


def check_exchange_type(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if value not in EXCHANGE_TYPES:
        raise BadParameter(
            f"exchange_type must be one of {', '.join(EXCHANGE_TYPES)}",
            parameter="exchange_type",
        )
    return str(value)


def check_options(value: Any) -> dict[str, Any] | None:
    if value is None or value == "" or value == "null":
        return None
    if isinstance(value, str):
        if len(value) > MAX_OPTIONS_LENGTH:
            raise BadParameter("options is too long", parameter="options")
        try:
            value = json.loads(value, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise BadParameter("options must be a JSON object", parameter="options") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadParameter("options must be a JSON object", parameter="options")
    try:
        # allow_nan=False: NaN and Infinity are not JSON and would be stored
        # and answered as such.
        encoded = json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError):
        raise BadParameter("options must be a JSON object without NaN or Infinity", parameter="options") from None
    if len(encoded) > MAX_OPTIONS_LENGTH:
        raise BadParameter("options is too long", parameter="options")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def queue_binding(name: str, params: Mapping[str, Any]) -> QueueBinding:
    """A queue declaration from ``exchange``, ``routing_key``,
    ``exchange_type`` and ``options``; exchange and routing key default to
    the queue's name."""
    exchange = params.get("exchange")
    routing_key = params.get("routing_key")
    return QueueBinding(
        name=check_queue_name(name),
        exchange=name if exchange in (None, "") else check_routing(exchange, "exchange"),
        routing_key=name if routing_key in (None, "") else check_routing(routing_key, "routing_key"),
        exchange_type=check_exchange_type(params.get("exchange_type")),
        options=check_options(params.get("options")),
    )


class EmptyField(str):
    """An empty query or form field (``max=``): "not given".  It reads as
    ``""`` until :func:`only` drops it."""


def only(params: MutableMapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse parameters a route does not know, naming them; then drop the
    empty form fields (:class:`EmptyField`), which mean "not given"."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadParameter(
            f"unknown parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            parameter=unknown[0],
            allowed=sorted(allowed),
        )
    for name in [name for name, value in params.items() if isinstance(value, EmptyField)]:
        del params[name]


# -- queue-depth autoscaling policies (DESIGN §9.5, scs.autoscaling) ----------

MAX_INSTANCES = 1000
MAX_MESSAGES_PER_INSTANCE = 1_000_000
MAX_SCALE_DOWN_AFTER = 7 * 24 * 3600.0
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,12}(?:\.[0-9]*)?|\.[0-9]+)")
# What a policy starts from for the settings a first PUT leaves out.
DEFAULT_POLICY = {"min_instances": 1, "messages_per_instance": 10, "scale_down_after": 60.0}
POLICY_FIELDS = ("queue", "min_instances", "max_instances", "messages_per_instance", "scale_down_after")


def check_seconds(value: Any, what: str, low: float, high: float) -> float:
    """A finite number of seconds in [low, high] (int, float or its text)."""
    if isinstance(value, bool):
        raise BadParameter(f"{what} must be a number of seconds", parameter=what)
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            raise BadParameter(f"{what} must be a number of seconds, got {value[:40]!r}", parameter=what)
        value = float(text)
    if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise BadParameter(f"{what} must be a number of seconds", parameter=what)
    if not low <= value <= high:
        raise BadParameter(f"{what} must be between {low:g} and {high:g} seconds, got {value:g}", parameter=what)
    return float(value)


def check_policy_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaling settings given in ``params`` (a policy's fields, any
    of them), each checked alone: sizes are whole numbers of at least 1
    (``min_instances`` too: a policy always keeps a worker listening),
    ``scale_down_after`` seconds from 0."""
    clean: dict[str, Any] = {}
    if "queue" in params:
        clean["queue"] = check_queue_name(params["queue"])
    if "min_instances" in params:
        clean["min_instances"] = check_int(params["min_instances"], "min_instances", 1, MAX_INSTANCES)
    if "max_instances" in params:
        clean["max_instances"] = check_int(params["max_instances"], "max_instances", 1, MAX_INSTANCES)
    if "messages_per_instance" in params:
        clean["messages_per_instance"] = check_int(
            params["messages_per_instance"], "messages_per_instance", 1, MAX_MESSAGES_PER_INSTANCE
        )
    if "scale_down_after" in params:
        clean["scale_down_after"] = check_seconds(
            params["scale_down_after"], "scale_down_after", 0.0, MAX_SCALE_DOWN_AFTER
        )
    return clean


def check_policy(fields: Mapping[str, Any], given: Iterable[str] = POLICY_FIELDS) -> dict[str, Any]:
    """A whole policy: every field present, each checked, and
    ``min_instances`` not above ``max_instances``.  That error names
    ``min_instances``, or ``max_instances`` when only that one was
    ``given`` (the other is the stored value)."""
    for name in POLICY_FIELDS:
        if name not in fields:
            raise BadParameter(f"missing parameter {name}", parameter=name)
    clean = check_policy_fields(fields)
    if clean["min_instances"] > clean["max_instances"]:
        raise BadParameter(
            f"min_instances ({clean['min_instances']}) is greater than max_instances ({clean['max_instances']})",
            parameter="max_instances" if "min_instances" not in given else "min_instances",
        )
    return clean
