"""The telnet manhole (``--manhole ENDPOINT --manhole-passwd FILE``).

A Python prompt inside the running agent, over telnet, for live debugging.
Its namespace holds the running ``agent``, ``store``, ``supervisor``,
``srs``, the model classes and the records, e.g.::

    >>> [s.name for s in store.list_nodes()]
    >>> supervisor.status("w1")

Telnet sends the password in clear text: the endpoint must be loopback
(checked by ``scs.tap.Options`` unless ``--manhole-allow-remote``), and the
manhole refuses to start without a readable password file holding at least
one ``user:password`` line.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.application import strports
from twisted.application.service import IService
from twisted.conch import manhole
from twisted.conch.insults import insults
from twisted.conch.telnet import (
    AuthenticatingTelnetProtocol,
    ITelnetProtocol,
    TelnetBootstrapProtocol,
    TelnetTransport,
)
from twisted.cred import checkers, portal
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="scs.manhole")


class ManholeConfigError(Exception):
    """The manhole cannot start; the message says why."""


def check_password_file(path: str | None) -> None:
    """Refuse a missing, unreadable or empty password file."""
    if not path:
        raise ManholeConfigError("the manhole needs --manhole-passwd FILE")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ManholeConfigError(f"cannot read the manhole password file {path!r}: {e}") from None
    entries = [line for line in lines if line.strip() and not line.startswith(b"#")]
    if not any(b":" in line and line.split(b":", 1)[1] for line in entries):
        raise ManholeConfigError(f"the manhole password file {path!r} has no user:password line")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        # Not refused: the operator may have reasons; but say it.
        log.warn("the manhole password file {path} is readable by other users", path=path)


def namespace(agent: Any, **extra: Any) -> dict[str, Any]:
    """What the manhole's Python prompt starts with."""
    from scs import models, records

    local = getattr(agent, "local", None)
    ns: dict[str, Any] = {
        "agent": agent,
        "store": getattr(agent, "store", None),
        "supervisor": getattr(agent, "supervisor", None),
        "srs": getattr(agent, "srs", None),
        "local": local,
        "models": models,
        "records": records,
    }
    for name in ("Broker", "App", "Node", "Queue", "Consumption"):
        ns[name] = getattr(models, name)
    for name in ("InstanceSpec", "QueueBinding", "BrokerInfo", "AppRecord", "WorkerStatus"):
        ns[name] = getattr(records, name)
    ns.update(extra)
    return ns


@implementer(portal.IRealm)
class ManholeRealm:
    """Gives each logged-in user a colored Python prompt on the namespace."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if ITelnetProtocol not in interfaces:
            raise NotImplementedError("only telnet")
        log.info("manhole login by {user}", user=avatarId)
        # Telnet -> terminal emulation -> the manhole, sharing one namespace
        # so that what one session defines the next can see.
        protocol = TelnetBootstrapProtocol(insults.ServerProtocol, manhole.ColoredManhole, self.namespace)
        return ITelnetProtocol, protocol, lambda: None


def make_portal(passwd_file: str, namespace: dict[str, Any]) -> portal.Portal:
    check_password_file(passwd_file)
    # cache=False: a changed password file takes effect without a restart.
    checker = checkers.FilePasswordDB(passwd_file, cache=False)
    return portal.Portal(ManholeRealm(namespace), [checker])


class ManholeFactory(ServerFactory):
    """Telnet with a username/password prompt in front of the manhole."""

    def __init__(self, portal_: portal.Portal) -> None:
        self.portal = portal_

    def buildProtocol(self, addr: Any) -> TelnetTransport:
        log.info("manhole connection from {peer}", peer=addr)
        protocol = TelnetTransport(AuthenticatingTelnetProtocol, self.portal)
        protocol.factory = self
        return protocol


def manhole_service(endpoint: str, passwd_file: str, agent: Any, reactor: Any = None, **extra: Any) -> IService:
    """The manhole listening on ``endpoint`` (a Twisted endpoint string)."""
    factory = ManholeFactory(make_portal(passwd_file, namespace(agent, **extra)))
    return strports.service(endpoint, factory, reactor=reactor)
