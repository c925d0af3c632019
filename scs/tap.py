"""Command line and service wiring: ``Options`` and ``makeService``.

``makeService`` only builds the ``MultiService`` tree; every part lives in
its own module.  ``main`` is the ``scs-agent`` console script: the same
options, run in the foreground with logging set up from ``-l``/``-f``.
"""

from __future__ import annotations

import errno
import getopt
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from scs import __version__
from scs.amqp import DEFAULT_SPEC_PATH
from scs.records import DEFAULT_BROKER

log = Logger(namespace="scs.tap")

DEFAULT_ADDR = "127.0.0.1:8000"
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def http_endpoint(addr: str) -> str:
    """``[host]:port`` to a Twisted server endpoint string; a bare port
    binds loopback."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"ADDR must be [host]:port, got {addr!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise usage.UsageError(f"ADDR host must be an IP address, got {host!r}") from None
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """A server endpoint string split as Twisted splits it (":" separates,
    a backslash escapes the next character) into positional fields and
    keywords; a keyword given twice is refused (Twisted would silently use
    the last, so "interface=127.0.0.1:interface=0.0.0.0" binds everything)."""
    fields: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    args: list[str] = []
    keywords: dict[str, str] = {}
    for field in fields:
        name, sep, value = field.partition("=")
        if not sep:
            args.append(field)
        elif name in keywords:
            raise usage.UsageError(f"endpoint {description!r} gives {name}= twice; give it once")
        else:
            keywords[name] = value
    return args, keywords


def endpoint_interface(description: str) -> str | None:
    """The address a TCP (or ssl) server endpoint binds, as Twisted reads
    the string: "" for every address, None for other kinds of endpoint."""
    args, keywords = endpoint_fields(description)
    kind = args[0] if args else ""
    if kind in ("tcp", "tcp6"):
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory
        from twisted.internet.testing import MemoryReactor

        # Twisted's own parser, listening on a fake reactor: the interface
        # it passes to listenTCP is the one the real reactor would bind.
        reactor = MemoryReactor()
        try:
            serverFromString(reactor, description).listen(Factory())
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"bad endpoint {description!r}: {e}") from None
        return str(reactor.tcpServers[-1][3])
    if kind == "ssl":
        return keywords.get("interface", "")
    return None


def endpoint_is_loopback(description: str) -> bool:
    """Whether a server endpoint string binds only a loopback address."""
    kind = endpoint_fields(description)[0][:1]
    if kind == ["unix"]:
        return True  # unix sockets are local by nature
    host = endpoint_interface(description)
    if not host:
        return False  # all addresses, or an endpoint kind we cannot read
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--interval must be a number of seconds, got {value!r}") from None


def _whole_number(option: str, low: int) -> Any:
    """A coerce function for ``--<option>``: an integer of at least ``low``."""

    def coerce(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"--{option} must be a whole number, got {value!r}") from None
        if number < low:
            raise ValueError(f"--{option} must be at least {low}, got {number}")
        return number

    return coerce


class Options(usage.Options):
    synopsis = "[ADDR] [options]"
    longdesc = (
        "Run the SCS agent: the REST API on ADDR ([host]:port, default "
        f"{DEFAULT_ADDR}; a bare :port binds 127.0.0.1), the supervisor of this "
        "machine's Celery workers and the SRS cluster protocol."
    )

    optParameters = [
        ["http", None, None, "Twisted server endpoint for HTTP, instead of ADDR."],
        ["id", "i", None, "Agent id, unique in the cluster (default: host name)."],
        ["instance-dir", "D", None, "Store, pid and log files (default: ./scs-data/<id>)."],
        ["broker", "b", DEFAULT_BROKER, "AMQP broker for SRS and new apps."],
        ["interval", None, 5.0, "Supervisor wake-up period in seconds.", _seconds],
        [
            "worker-log-max-bytes",
            None,
            10 * 1024 * 1024,
            "Rotate a worker's worker.log once it is larger than this.",
            _whole_number("worker-log-max-bytes", 1),
        ],
        [
            "worker-log-backups",
            None,
            3,
            "Rotated worker logs kept (worker.log.1 ...); 0 keeps none.",
            _whole_number("worker-log-backups", 0),
        ],
        ["manhole", None, None, "Telnet manhole endpoint, e.g. tcp:2323:interface=127.0.0.1."],
        ["manhole-passwd", None, None, "user:password file for the manhole."],
        ["loglevel", "l", "info", f"Log level: {', '.join(LOG_LEVELS)}."],
        ["logfile", "f", None, "Log to this file instead of stdout."],
        ["amqp-spec", None, DEFAULT_SPEC_PATH, "AMQP 0-9-1 spec XML for txamqp."],
        ["cluster", None, "scs", "Answer only peers of this cluster name."],
        ["auth-token-file", None, None, "Require this bearer token on the API."],
        [
            "max-connections",
            None,
            1000,
            "Most open HTTP connections; over it, the oldest idle one is closed.",
            int,
        ],
        [
            "http-header-timeout",
            None,
            10.0,
            "Seconds a client has to send a whole request head.",
            float,
        ],
        [
            "http-idle-timeout",
            None,
            60.0,
            "Seconds an HTTP connection may stay silent between requests.",
            float,
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "Sign, check and encrypt every cluster (SRS) message with the secret in this file.",
        ],
        ["max-peers", None, 256, "Most other agents kept in the membership table.", int],
        [
            "forget-dead-after",
            None,
            86400.0,
            "Seconds a silent member stays listed (dead) before it is forgotten.",
            float,
        ],
        [
            "failover-after",
            None,
            30.0,
            "Seconds an agent must be dead before its silent instances are re-created elsewhere (0: never).",
            float,
        ],
    ]
    optFlags = [
        ["without-http", None, "Do not serve HTTP."],
        ["without-srs", None, "Do not join the cluster."],
        ["allow-remote", None, "Serve HTTP on a non-loopback address without a token."],
        ["manhole-allow-remote", None, "Allow a non-loopback manhole endpoint."],
        [
            "allow-unsigned-cluster",
            None,
            "Join a cluster on a non-loopback broker without --cluster-secret-file.",
        ],
        ["reset-store", None, "Start with an empty store, moving the old file aside."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["addr"] = None
        self["allowed-host"] = []

    def opt_allowed_host(self, name: str) -> None:
        """Also answer requests whose Host is NAME or NAME:PORT (a DNS name
        the agent is served as, e.g. behind a proxy); repeatable."""
        from scs.http.guard import BadHost, parse_host

        try:
            parse_host(name)
        except BadHost as e:
            raise usage.UsageError(f"--allowed-host: {e}") from None
        self["allowed-host"].append(name)

    def opt_version(self) -> None:
        print(f"scs-agent {__version__}")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        # The contract puts ADDR first (scs-agent :8001 -i agent1); Twisted's
        # parser stops at the first positional argument, so move options
        # ahead of positionals the way GNU getopt reads them.
        if options is None:
            options = sys.argv[1:]
        try:
            pairs, positional = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        takes_value = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        takes_value |= {f"-{c}" for c, nxt in zip(self.shortOpt, self.shortOpt[1:] + " ", strict=True) if nxt == ":"}
        ordered: list[str] = []
        for name, value in pairs:
            ordered.extend([name, value] if name in takes_value else [name])
        super().parseOptions([*ordered, "--", *positional] if positional else ordered)

    def parseArgs(self, addr: str | None = None) -> None:
        self["addr"] = addr

    def postOptions(self) -> None:
        if self["loglevel"] not in LOG_LEVELS:
            raise usage.UsageError(f"--loglevel must be one of {', '.join(LOG_LEVELS)}, got {self['loglevel']!r}")
        if self["interval"] <= 0:
            raise usage.UsageError("--interval must be a positive number of seconds")
        if self["http"] and self["addr"]:
            raise usage.UsageError("give ADDR or --http, not both")
        self["http-endpoint"] = self["http"] or http_endpoint(self["addr"] or DEFAULT_ADDR)
        self._check_http_limits()
        if self["id"] is None:
            self["id"] = socket.gethostname()
        from scs.errors import BadParameter
        from scs.validation import check_name

        try:
            check_name(self["id"], "agent id")
        except BadParameter as e:
            raise usage.UsageError(f"--id: {e.message}") from None
        if self["instance-dir"] is None:
            self["instance-dir"] = os.path.join("scs-data", self["id"])
        from scs.validation import check_broker_url

        try:
            self["broker"] = check_broker_url(self["broker"])
        except BadParameter as e:
            raise usage.UsageError(f"--broker: {e.message}") from None
        if (
            not self["without-http"]
            and not self["auth-token-file"]
            and not self["allow-remote"]
            and not endpoint_is_loopback(self["http-endpoint"])
        ):
            raise usage.UsageError(
                "refusing to serve HTTP on a non-loopback address without "
                "--auth-token-file; give --allow-remote to do it anyway"
            )
        self._check_cluster_trust()
        if self["auth-token-file"]:
            from scs.http.auth import TokenFileError, read_token_file

            try:
                read_token_file(self["auth-token-file"])
            except TokenFileError as e:
                raise usage.UsageError(f"--auth-token-file: {e}") from None
        if self["manhole"]:
            if not self["manhole-passwd"]:
                raise usage.UsageError("--manhole needs --manhole-passwd FILE")
            if not self["manhole-allow-remote"] and not endpoint_is_loopback(self["manhole"]):
                raise usage.UsageError(
                    "refusing a non-loopback manhole endpoint; give --manhole-allow-remote to do it anyway"
                )
            from scs.manhole import ManholeConfigError, check_password_file

            try:
                check_password_file(self["manhole-passwd"])
            except ManholeConfigError as e:
                raise usage.UsageError(f"--manhole-passwd: {e}") from None

    def _check_cluster_trust(self) -> None:
        """A cluster on a broker other machines reach needs a secret: anyone
        with credentials on that broker could otherwise command the agent."""
        if self["max-peers"] < 1:
            raise usage.UsageError("--max-peers must be at least 1")
        if self["forget-dead-after"] <= 0:
            raise usage.UsageError("--forget-dead-after must be a positive number of seconds")
        if not 0 <= self["failover-after"] < 10**7:
            raise usage.UsageError("--failover-after must be 0 (never) or a positive number of seconds")
        if self["cluster-secret-file"]:
            from scs.srs_trust import SecretFileError, read_secret_file

            try:
                read_secret_file(self["cluster-secret-file"])
            except SecretFileError as e:
                raise usage.UsageError(f"--cluster-secret-file: {e}") from None
        elif not self["without-srs"] and not self["allow-unsigned-cluster"] and not broker_is_loopback(self["broker"]):
            raise usage.UsageError(
                "refusing to join a cluster on a non-loopback broker without "
                "--cluster-secret-file; give --allow-unsigned-cluster to do it anyway"
            )

    def _check_http_limits(self) -> None:
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        for name in ("http-header-timeout", "http-idle-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if not self["without-http"]:
            # Refuses a keyword given twice, and a string Twisted cannot read.
            endpoint_interface(self["http-endpoint"])
        if self["manhole"]:
            endpoint_interface(self["manhole"])


def broker_is_loopback(url: str) -> bool:
    from scs.records import BrokerInfo

    host = BrokerInfo.from_url(url).hostname
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_url(endpoint: str, allowed_hosts: Sequence[str] = ()) -> str:
    """This agent's base URL as peers show it in /agents/: ``https`` on an
    ``ssl:`` endpoint; the first ``--allowed-host`` name (the name it is
    served as), else the interface it binds (127.0.0.1 for a wildcard or a
    Unix socket, a best guess)."""
    args, keywords = endpoint_fields(endpoint)
    kind = args[0] if args else "tcp"
    scheme = "https" if kind == "ssl" else "http"
    port = keywords.get("port") or (args[1] if len(args) > 1 else "")
    if allowed_hosts:
        # "NAME" or "NAME:PORT" (the port it is served on, behind a proxy).
        name, sep, named_port = allowed_hosts[0].rpartition(":")
        if not sep or not named_port.isdigit():
            name, named_port = allowed_hosts[0], ""
        return f"{scheme}://{name}:{named_port or port}/"
    host = keywords.get("interface") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/"


class _ClosingStore(Service):
    """Closes the store after every other service has stopped."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def stopService(self) -> None:
        super().stopService()
        self.store.close()


def open_store(instance_dir: str, reset: bool = False) -> Any:
    """The agent's store in ``instance_dir``.  An empty or damaged store
    file stops the agent here, with one line on stderr and exit status 1
    (under ``scs-agent`` and ``twistd -n scs-agent`` alike: twistd calls
    makeService before its logging starts and lets SystemExit through).
    ``reset`` (--reset-store) moves the old file aside first."""
    from scs.store import STORE_FILENAME, Store, StoreError, move_store_aside

    path = os.path.join(instance_dir, STORE_FILENAME)
    try:
        if reset:
            moved = move_store_aside(path)
            if moved is None:
                log.info("--reset-store: no store file at {path}; starting fresh", path=path)
            else:
                log.warn(
                    "--reset-store: moved the old store {path} to {moved}; starting with an empty store",
                    path=path,
                    moved=moved,
                )
        return Store.in_directory(instance_dir)
    except (StoreError, OSError) as e:
        hint = "" if reset else "; give --reset-store to move it aside and start with an empty store"
        message = str(e) if isinstance(e, StoreError) else f"store in {instance_dir}: {e}"
        print(f"scs-agent: {message}; not starting{hint}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# How long a starting agent keeps its workers down waiting to learn from
# the cluster which of its instances moved away (scs.failover.StartGate).
START_GATE_TIMEOUT = 15.0


class AgentService(MultiService):
    """The running agent: its services, and ``agent``, the façade the
    manhole and tests reach."""

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent


def makeService(options: Options, reactor: Any = None) -> IService:
    """The one place that builds the agent's parts and wires them."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from scs.agent import Agent, ClusterQueues, LocalAgent

    _add_twistd_logfile(options)
    instance_dir = os.path.abspath(options["instance-dir"])
    store = open_store(instance_dir, reset=options["reset-store"])
    from scs.failover import StartGate

    # In a cluster, no worker starts before this agent learnt which of its
    # instances moved away while it was gone (scs.failover).
    gate = None if options["without-srs"] else StartGate(store.list_nodes, reactor, timeout=START_GATE_TIMEOUT)
    supervisor = _build_supervisor(options, gate or store.list_nodes, instance_dir, reactor)
    url = "" if options["without-http"] else http_url(options["http-endpoint"], options["allowed-host"])
    # The agent both answers its peers and asks them: the cluster is built
    # first and hands peers' requests to the façade built next.
    agent: Any = None
    srs = None
    if not options["without-srs"]:
        srs = _build_cluster(
            options,
            url,
            reactor,
            handler=lambda op, args: agent.handle_remote(op, args),
            on_connected=[lambda: agent.sync_apps_from_peers(), lambda: keeper.connected()],
            summary=lambda: agent.local.summary(),
        )
    local = LocalAgent(
        store,
        options["id"],
        options["broker"],
        supervisor,
        clock=reactor,
        resolve_queue=None if srs is None else ClusterQueues(store, srs),
        # The supervisor's CeleryControl: one Celery app per broker for both.
        control=supervisor._control,
    )
    agent = Agent(local, srs, url=url, forget_dead_after=options["forget-dead-after"])
    keeper = None
    if srs is not None:
        keeper = _build_failover(options, agent, supervisor, gate, reactor)

    from scs.metrics import AgentMetrics, MetricsService

    metrics = AgentMetrics(agent)
    top = AgentService(agent)
    # First in, last out: MultiService stops its children in reverse order.
    _ClosingStore(store).setServiceParent(top)
    supervisor.setServiceParent(top)
    if srs is not None:
        from scs.app_sync import app_sync_service

        srs.setServiceParent(top)
        keeper.setServiceParent(top)
        # Apps converge: a peer whose apps digest differs is merged (scs.app_sync).
        app_sync_service(agent.app_sync, reactor).setServiceParent(top)
    from scs.autoscaling import Autoscaler

    # Queue-depth autoscaling (DESIGN §9.5): decided by the coordinator,
    # every --interval.
    Autoscaler(agent, supervisor._control, reactor, interval=options["interval"]).setServiceParent(top)
    MetricsService(metrics).setServiceParent(top)
    if not options["without-http"]:
        _http_service(options, agent, metrics, reactor).setServiceParent(top)
    if options["manhole"]:
        _manhole_service(options, agent, metrics, reactor).setServiceParent(top)
    log.info(
        "agent {agent_id} in {instance_dir}: http={http} srs={srs}",
        agent_id=options["id"],
        instance_dir=instance_dir,
        http=None if options["without-http"] else options["http-endpoint"],
        srs=srs is not None,
    )
    return top


def _add_twistd_logfile(options: Options) -> None:
    """Under plain twistd, -f adds a log file of its own at -l's level."""
    if options["logfile"] and not options.get("console-logging"):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(_file_observer(options))


def _build_failover(options: Options, agent: Any, supervisor: Any, gate: Any, reactor: Any) -> Any:
    from scs.failover import Failover, FailoverService, Fence
    from scs.replica import PeerView, Replicas

    srs = agent.srs
    # The failover and the fence work with the façade's part that knows
    # which agent has which instance (scs.custody), not the façade.
    custody = agent.custody
    fence = Fence(custody)

    def peers() -> list[PeerView]:
        return [PeerView(m.id, custody.peers.peer_alive(m.id), getattr(m, "digest", "")) for m in srs.membership]

    replicas = Replicas(
        agent.store,
        agent.agent_id,
        peers,
        lambda peer: srs.call(peer, "instance_export", {}, timeout=agent.call_timeout),
        reactor,
        on_synced=fence,
        forget_after=options["forget-dead-after"],
    )
    failover = Failover(custody, supervisor._control, reactor, failover_after=options["failover-after"])
    gate.on_open.append(lambda: supervisor.running and supervisor.wake())
    return FailoverService(replicas, fence, failover, gate, reactor)


def _build_supervisor(options: Options, desired: Any, instance_dir: str, reactor: Any) -> Any:
    from scs.control import CeleryControl
    from scs.leftovers import ProcessTable
    from scs.supervisor import SupervisionPolicy, Supervisor

    supervisor = Supervisor(
        desired,
        instance_dir,
        policy=SupervisionPolicy(
            interval=options["interval"],
            worker_log_max_bytes=options["worker-log-max-bytes"],
            worker_log_backups=options["worker-log-backups"],
        ),
        reactor=reactor,
        control=CeleryControl(reactor=reactor),
        spawner=reactor,
        process_table=ProcessTable(),
        # Workers answer to <instance>@<agent id> (DESIGN §9.3): Celery locks
        # a node name, so a copy on another agent of the same machine (a
        # failover, a drain) needs a name of its own.
        hostname=options["id"],
    )
    return supervisor


def _build_cluster(options: Options, url: str, reactor: Any, **wiring: Any) -> Any:
    from scs.amqp import AMQPTransport
    from scs.srs import SRS

    srs = SRS(
        options["id"],
        AMQPTransport(options["broker"], spec_path=options["amqp-spec"], reactor=reactor),
        reactor=reactor,
        cluster=options["cluster"],
        url=url,
        codec=_message_codec(options, reactor),
        requires_token=bool(options["auth-token-file"]),
        max_peers=options["max-peers"],
        forget_after=options["forget-dead-after"],
        **wiring,
    )
    _log_cluster_trust(options)
    return srs


def _http_service(options: Options, agent: Any, metrics: Any, reactor: Any) -> Any:
    from twisted.internet.endpoints import serverFromString

    from scs.http.auth import TokenAuth
    from scs.http.guard import HTTPServerService, LimitedSite
    from scs.http.params import APIRequest

    auth = TokenAuth.from_file(options["auth-token-file"]) if options["auth-token-file"] else None
    site = LimitedSite(
        http_resource(agent, metrics, auth, allowed_hosts=options["allowed-host"]),
        requestFactory=APIRequest,
        header_timeout=options["http-header-timeout"],
        idle_timeout=options["http-idle-timeout"],
        reactor=reactor,
    )
    _log_access_decision(options)
    return HTTPServerService(
        serverFromString(reactor, options["http-endpoint"]),
        site,
        max_connections=options["max-connections"],
        allow_public=bool(options["auth-token-file"] or options["allow-remote"]),
    )


def _manhole_service(options: Options, agent: Any, metrics: Any, reactor: Any) -> Any:
    from scs.manhole import manhole_service

    log.info(
        "manhole on {endpoint}: {scope}, password file {passwd}",
        endpoint=options["manhole"],
        scope="loopback only"
        if endpoint_is_loopback(options["manhole"])
        else "NOT loopback (--manhole-allow-remote): telnet sends passwords in clear",
        passwd=options["manhole-passwd"],
    )
    service = manhole_service(options["manhole"], options["manhole-passwd"], agent, reactor=reactor, metrics=metrics)
    # A busy manhole port stops the start (main says so in one line), as a
    # busy HTTP port does, instead of a logged traceback and no manhole.
    service._raiseSynchronously = True
    return service


def http_resource(agent: Any, metrics: Any, auth: Any = None, allowed_hosts: Any = ()) -> Any:
    """The whole HTTP site: the API with the admin page and /metrics
    mounted, behind the Host/Origin guard and the token check, every
    request counted."""
    from scs.http.admin import Admin
    from scs.http.api import API
    from scs.http.auth import guarded
    from scs.http.guard import HostOriginGuard
    from scs.metrics import CountingResource, route_of

    api = API(agent, mounts={"admin": Admin(agent, auth).resource(), "metrics": metrics.resource()})
    # Counted outside the guards, so that refused requests show as 400s,
    # 401s and 403s.  The Host and Origin checks come first: a page that
    # rebinds a name or posts cross-site learns nothing, token or not.
    site = HostOriginGuard(guarded(api.resource(), auth), allowed_hosts)
    return CountingResource(site, metrics, route_of(API.app.url_map))


def _message_codec(options: Options, reactor: Any) -> Any:
    from scs.srs_trust import MessageCodec, read_secret_file

    secret = read_secret_file(options["cluster-secret-file"]) if options["cluster-secret-file"] else None
    return MessageCodec(options["cluster"], secret, clock=reactor.seconds)


def _log_cluster_trust(options: Options) -> None:
    """Say at start whom this agent takes cluster operations from."""
    if options["cluster-secret-file"]:
        log.info(
            "cluster {cluster}: messages signed and encrypted with the secret of {path}",
            cluster=options["cluster"],
            path=options["cluster-secret-file"],
        )
    else:
        log.warn(
            "cluster {cluster}: messages NOT signed (no --cluster-secret-file): "
            "anyone with credentials on the broker can command this agent",
            cluster=options["cluster"],
        )
    if options["auth-token-file"]:
        log.info(
            "cluster {cluster}: this agent requires a token, so it accepts cluster "
            "operations only from agents that require one too",
            cluster=options["cluster"],
        )


def _log_access_decision(options: Options) -> None:
    """Say at start who can reach the HTTP surfaces and why."""
    endpoint = options["http-endpoint"]
    if options["auth-token-file"]:
        log.info(
            "HTTP on {endpoint}: API, /metrics and /admin/ need the token of {path}",
            endpoint=endpoint,
            path=options["auth-token-file"],
        )
    elif endpoint_is_loopback(endpoint):
        log.info(
            "HTTP on {endpoint}: loopback only, no token (give --auth-token-file to serve other addresses safely)",
            endpoint=endpoint,
        )
    else:
        log.warn(
            "HTTP on {endpoint}: NOT loopback and no token (--allow-remote): "
            "anyone who can reach it can control this agent",
            endpoint=endpoint,
        )


def level_filtered(observer: Any, level_name: str) -> Any:
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate

    return FilteringLogObserver(
        observer,
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name))],
    )


def _file_observer(options: Options) -> Any:
    from twisted.logger import textFileLogObserver

    if options["logfile"] in (None, "-"):
        stream = sys.stdout
    else:
        stream = open(options["logfile"], "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return level_filtered(textFileLogObserver(stream), options["loglevel"])


def main(argv: list[str] | None = None) -> None:
    """``scs-agent [ADDR] [options]``: the agent in the foreground.

    The same as ``twistd -n scs-agent [options]``, with ``-l``/``-f``
    deciding where the log goes and how much of it.
    """
    from twisted.scripts import twistd

    args = list(sys.argv[1:] if argv is None else argv)
    config = twistd.ServerOptions()
    try:
        # No pid file: the agent keeps its own per-instance pid files.
        config.parseOptions(["--nodaemon", "--pidfile=", "scs-agent", *args])
    except usage.UsageError as e:
        print(f"scs-agent: {e}", file=sys.stderr)
        print("scs-agent: try --help for usage", file=sys.stderr)
        sys.exit(2)
    options = config.subOptions
    options["console-logging"] = True
    config["logger"] = lambda: _file_observer(options)
    from twisted.internet.error import CannotListenError

    # twistd.runApp without its last step: after a signal stopped the
    # reactor (Ctrl-C, kill) it kills itself again with that signal, so a
    # clean stop would show as 130 or 143.  Every service has stopped in
    # order by the time run() returns: the agent exits 0.
    try:
        twistd._SomeApplicationRunner(config).run()
    except CannotListenError as e:
        # Logging has begun and took sys.stderr over: the line goes to the
        # terminal's stderr, without the traceback.
        print(f"scs-agent: {cannot_listen_message(e)}", file=sys.__stderr__, flush=True)
        sys.exit(1)


def cannot_listen_message(error: Any) -> str:
    """One line for a port that cannot be listened on (busy, or not ours)."""
    host = error.interface or "*"
    if ":" in host:
        host = f"[{host}]"
    socket_error = error.socketError
    reason = getattr(socket_error, "strerror", None) or str(socket_error)
    if getattr(socket_error, "errno", None) == errno.EADDRINUSE:
        reason += " (another agent or program holds it)"
    return f"cannot listen on {host}:{error.port}: {reason[:1].lower()}{reason[1:]}"
