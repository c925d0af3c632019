"""One Celery worker process: its command line, the paths of its files and
its ProcessProtocol.  (Workers left over from a previous agent run are
:mod:`scs.leftovers`'s business.)"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from scs.errors import BadParameter
from scs.records import InstanceSpec, QueueBinding
from scs.worker_arguments import RefusedArgument, check_worker_arguments

PIDFILE = "worker.pid"
LOGFILE = "worker.log"


def private_queue(name: str) -> str:
    """The queue every instance consumes and never cancels."""
    return f"dq.{name}"


def node_name(name: str, hostname: str) -> str:
    return f"{name}@{hostname}"


class UnsafeSpec(BadParameter):
    """Desired state the supervisor will not run, whatever let it into the
    store (an older version of the agent, a hand-edited file): the instance
    is ``failed`` and the others are not affected.  ``event`` names it in
    the log."""

    event = "unsafe-spec"


class UnsafeName(UnsafeSpec):
    """A name that must not become part of a path under the instance
    directory: not a single, valid path component, or one that resolves
    somewhere else (a symlink planted in the instance directory)."""

    event = "unsafe-path"


class SettingUnavailable(UnsafeSpec):
    """An app's ``workdir`` or ``python`` that cannot be used on this
    machine (missing, not a directory, not executable...): the API checked
    it where it was set, but apps are copied to every agent and this one
    may lack it.  The instance is ``failed`` until it is restarted or its
    app's settings change; the others are not affected."""

    event = "setting-unavailable"


def check_path_component(name: object, what: str = "instance") -> str:
    """``name`` if it is one safe path component and a valid instance name;
    :class:`UnsafeName` otherwise.

    The last line of defence where names become file names: whatever the
    API or the cluster let through, a name here is never empty, ``.`` or
    ``..``, never holds a separator or a NUL, and passes the same validator
    as names the API accepts."""
    if not isinstance(name, str):
        raise UnsafeName(f"{what} name must be a string, not {type(name).__name__}", parameter=what)
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")) or (os.altsep and os.altsep in name):
        raise UnsafeName(f"{what} name {name!r} is not a single path component", parameter=what)
    from scs.validation import check_instance_name  # here: validation may grow imports

    try:
        check_instance_name(name)
    except BadParameter as e:
        raise UnsafeName(f"{what} name {name!r} is refused: {e.message}", parameter=what) from None
    return name


def instance_path(instance_dir: str, name: str, *parts: str) -> str:
    """``instance_dir/name/parts...``, refusing (``UnsafeName``) a name
    that is not one safe component and any path that would resolve anywhere
    else: every component below ``instance_dir`` must be what it says, not
    a symlink to another place (outside the directory or inside it)."""
    check_path_component(name)
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise UnsafeName(f"bad file name {part!r} under instance {name!r}", parameter="instance")
    path = os.path.join(instance_dir, name, *parts)
    base = os.path.realpath(instance_dir)
    expected = os.path.join(base, name, *parts)
    resolved = os.path.realpath(path)
    if os.path.commonpath([base, resolved]) != base or resolved != expected:
        raise UnsafeName(
            f"instance {name!r}: {path} resolves to {resolved}, not inside {base} as itself "
            "(a symbolic link in the instance directory?)",
            parameter="instance",
        )
    return path


def is_plain_binding(q: QueueBinding) -> bool:
    """True when ``celery worker -Q name`` declares exactly this binding.

    ``-Q`` declares a queue bound to a direct exchange of the same name with
    the queue name as routing key.  Any other binding must reach the worker
    through ``add_consumer`` (which carries exchange and routing key), or the
    worker would consume a queue bound the wrong way.
    """
    return q.exchange in (q.name, "") and q.routing_key in (q.name, "") and q.exchange_type in (None, "", "direct")


# --without-mingle: measured on this machine (celery 5.7, RabbitMQ on
# loopback, 3 runs each), a worker answers its first ping 1.53-1.58 s after
# spawn by default, 0.45-0.59 s with --without-mingle --without-gossip and
# 0.45-0.46 s with --without-mingle alone.  Mingle is the whole second: at
# start it asks every other worker for its revoked-task ids and logical clock
# and waits for the replies.  The agent restarts workers often (crashes,
# hangs, reconfiguration) and readiness gates the API, so that second is
# paid on every restart for a feature (cross-worker revoke sync at start)
# that a supervised, per-instance worker rarely needs.  Gossip costs nothing
# measurable at start and feeds worker events to monitors, so it stays on.
# Celery has no option to turn mingle back on, so it is a property of the
# agent, not of an app: the Supervisor's ``mingle=True`` switches it.
WITHOUT_MINGLE = "--without-mingle"
# The app's ``task_events``: the worker sends task events, which monitors
# such as Flower read (``-E``).
TASK_EVENTS = "--task-events"


def worker_python(spec: InstanceSpec) -> str:
    """The interpreter that runs the worker: the app's ``python``, checked on
    this machine (``SettingUnavailable``), else the agent's own."""
    if spec.python is None:
        return sys.executable
    from scs.validation import check_python

    try:
        python = check_python(spec.python)
    except BadParameter as e:
        raise SettingUnavailable(f"app {spec.app!r}: {e.message}", parameter="python") from None
    return python or sys.executable


def worker_directory(spec: InstanceSpec) -> str | None:
    """The worker's working directory: the app's ``workdir``, checked on this
    machine (``SettingUnavailable``), else None (the agent's own)."""
    if spec.workdir is None:
        return None
    from scs.validation import check_workdir

    try:
        return check_workdir(spec.workdir)
    except BadParameter as e:
        raise SettingUnavailable(f"app {spec.app!r}: {e.message}", parameter="workdir") from None


def worker_env(spec: InstanceSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ``base`` (the agent's, by default) with the
    app's ``env`` over it.  The stored variables are checked again (the
    store is a door too); ``UnsafeSpec`` names the refused variable, never
    a value."""
    from scs.validation import check_env

    try:
        check_env(dict(spec.env))
    except BadParameter as e:
        raise UnsafeSpec(f"stored env of app {spec.app!r} is refused: {e.message}", parameter="env") from None
    env = dict(os.environ if base is None else base)
    env.update(spec.env)
    return env


def build_argv(
    spec: InstanceSpec,
    instance_dir: str,
    hostname: str,
    *,
    mingle: bool = False,
    python: str | None = None,
) -> list[str]:
    """The worker's command line as an argv list (it never goes through a shell).

    ``-A`` and ``-b`` are Celery's global options: Celery 5's ``worker``
    subcommand rejects ``-b``, so both come before ``worker``.  The
    interpreter is ``python`` if given, else the app's (checked on this
    machine: ``SettingUnavailable``), else the agent's.
    """
    name = spec.name
    try:
        # The store is a door too: arguments stored before the allow-list
        # existed are checked again before any worker runs them.
        check_worker_arguments(spec.arguments)
    except RefusedArgument as e:
        raise UnsafeSpec(f"stored arguments of {name!r} are refused: {e}", parameter="arguments") from None
    argv = [python or worker_python(spec), "-m", "celery"]
    if spec.celery_app:
        argv += ["-A", spec.celery_app]
    argv += ["-b", spec.broker.url, "worker"]
    queues = [private_queue(name)]
    queues += [q.name for q in spec.queues if is_plain_binding(q) and q.name != queues[0]]
    argv += [
        "-n",
        node_name(name, hostname),
        "-Q",
        ",".join(queues),
        f"--autoscale={spec.max_concurrency},{spec.min_concurrency}",
        "--pidfile",
        instance_path(instance_dir, name, PIDFILE),
        "--logfile",
        instance_path(instance_dir, name, LOGFILE),
    ]
    if not mingle and WITHOUT_MINGLE not in spec.arguments:
        argv.append(WITHOUT_MINGLE)
    if spec.task_events and not {TASK_EVENTS, "-E"} & set(spec.arguments):
        argv.append(TASK_EVENTS)
    argv += list(spec.arguments)
    ssl_options = spec.broker.kombu_ssl
    if ssl_options is not None:
        # amqps://: have kombu check the certificate's host name too (it
        # checks the chain by itself). A key=value setting the worker reads
        # with app.config_from_cmdline, last, after complete option lists.
        argv.append("broker_use_ssl=(json)" + json.dumps(ssl_options, ensure_ascii=True))
    return argv


class WorkerProcess(ProcessProtocol):
    """The protocol of one spawned worker.

    It holds no policy: it reports the exit to ``on_ended`` and lets the
    supervisor decide.  The worker's stdout and stderr are not pipes but the
    log file itself (see :func:`spawn_worker`), so nothing flows through here
    and a pool child that outlives the main process cannot delay
    ``processEnded``.
    """

    log = Logger()

    def __init__(self, name: str, on_ended: Callable[[WorkerProcess, Failure], None]) -> None:
        self.name = name
        self._on_ended = on_ended
        self.pid: int | None = None
        self.ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.log.info("{name} worker started pid={pid}", name=self.name, pid=self.pid, event="worker.started")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Only reached if a spawner hands us pipes anyway; the log file has it.
        pass

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        value = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        self.exit_signal = getattr(value, "signal", None)
        self.log.info(
            "{name} worker exited pid={pid} code={code} signal={signal}",
            name=self.name,
            pid=self.pid,
            code=self.exit_code,
            signal=self.exit_signal,
            how="signal" if self.exit_signal is not None else "code",
            event="worker.exited",
        )
        self._on_ended(self, reason)

    def signal(self, sig: str) -> bool:
        """Send ``"TERM"``/``"KILL"``/``"STOP"``…; False if it has already exited."""
        if self.ended or self.transport is None:
            return False
        try:
            self.transport.signalProcess(sig)
        except ProcessExitedAlready:
            return False
        except OSError:
            return False
        return True


# Each worker runs in a session of its own, so that a Ctrl-C or hang-up
# meant for the agent's terminal does not reach the workers directly: the
# agent stops them itself, in order, when it stops (a worker that the
# terminal had stopped first would look like a crash and be restarted).
# The launcher is a constant (no user input) and exec()s the worker's argv,
# keeping its pid, which is what the supervisor tracks.
NEW_SESSION = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


def session_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` started through the new-session launcher."""
    return [sys.executable, "-S", "-E", "-c", NEW_SESSION, *argv]


def spawn_worker(
    spawner: Any,
    protocol: WorkerProcess,
    argv: Sequence[str],
    instance_dir: str,
    name: str,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
) -> None:
    """Create the instance directory and spawn ``argv`` with ``spawner``
    (an ``IReactorProcess``).  stdout/stderr are appended to worker.log;
    stdin is /dev/null.  The child gets ``env`` (default: the agent's
    environment, so a ``celery_app`` module on its PYTHONPATH is found; see
    :func:`worker_env`) and runs in ``path`` (default: the agent's working
    directory; ``python -m celery`` puts it on sys.path, so ``-A proj``
    finds ./proj as it would for ``celery -A proj worker`` typed there)."""
    directory = instance_path(instance_dir, name)
    os.makedirs(directory, exist_ok=True)
    # Checked again now that the directory exists; O_NOFOLLOW: a worker.log
    # that is a symlink is refused rather than appended through.
    logfd = os.open(
        instance_path(instance_dir, name, LOGFILE),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
        0o644,
    )
    nullfd = os.open(os.devnull, os.O_RDONLY)
    try:
        launch = session_argv(argv)
        spawner.spawnProcess(
            protocol,
            launch[0],
            launch,
            env=dict(os.environ if env is None else env),
            path=path,
            childFDs={0: nullfd, 1: logfd, 2: logfd},
        )
    finally:
        # The child has its own copies after fork; ours are not needed.
        os.close(logfd)
        os.close(nullfd)
