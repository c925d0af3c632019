"""The telnet manhole (issue 5), on a StringTransport: password file
checks, login, the namespace, evaluating an expression."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from surfaces_support import BROKER, FakeSupervisor
from telnet_support import TelnetClientSide, line
from twisted.conch.telnet import ITelnetProtocol
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python import usage

from scs import models
from scs.agent import Agent, LocalAgent
from scs.manhole import ManholeConfigError, ManholeFactory, check_password_file, make_portal, namespace
from scs.store import Store
from scs.tap import Options


@pytest.fixture
def passwd(tmp_path: Path) -> str:
    path = tmp_path / "passwd"
    path.write_text("# operators\nadmin:s3cret\nother:pw2\n")
    path.chmod(0o600)
    return os.fspath(path)


@pytest.fixture
def agent() -> Agent:
    store = Store.in_memory()
    agent = Agent(LocalAgent(store, "agent1", BROKER, FakeSupervisor()))
    for name in ("w2", "w1"):
        store.add_node("foo", name, BROKER)
    return agent


def result(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class Session:
    """A telnet client talking to the manhole over a StringTransport."""

    def __init__(self, factory: ManholeFactory) -> None:
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.client = TelnetClientSide()
        self.protocol.makeConnection(self.transport)
        self.pump()

    def pump(self, data: bytes = b"") -> str:
        if data:
            self.protocol.dataReceived(data)
        for _ in range(20):
            out = self.transport.value()
            self.transport.clear()
            if not out:
                break
            reply = self.client.received(out)
            if reply:
                self.protocol.dataReceived(reply)
        return self.client.text

    def login(self, user: str, password: str) -> str:
        # The login prompt reads lines ending CR LF; the Python prompt takes
        # keystrokes, CR NUL being the Enter key.
        self.pump(user.encode() + b"\r\n")
        return self.pump(password.encode() + b"\r\n")


def test_namespace_holds_the_running_objects(agent: Agent) -> None:
    ns = namespace(agent)
    assert ns["agent"] is agent
    assert ns["store"] is agent.store
    assert ns["supervisor"] is agent.supervisor
    assert ns["srs"] is None
    for name in ("Broker", "App", "Node", "Queue"):
        assert ns[name] is getattr(models, name)


def test_login_and_evaluate_an_expression(agent: Agent, passwd: str) -> None:
    session = Session(ManholeFactory(make_portal(passwd, namespace(agent))))
    assert session.client.text.endswith("Username: ")
    text = session.login("admin", "s3cret")
    assert text.rstrip().endswith(">>>")
    text = session.pump(line("sorted(s.name for s in store.list_nodes())"))
    assert "['w1', 'w2']" in text
    text = session.pump(line("supervisor.status('w1').state"))
    assert "'running'" in text


def test_wrong_password_is_refused(agent: Agent, passwd: str) -> None:
    session = Session(ManholeFactory(make_portal(passwd, namespace(agent))))
    text = session.login("admin", "wrong")
    assert "Authentication failed" in text
    assert text.endswith("Username: ")
    assert ">>>" not in text
    text = session.pump(line("store"))
    assert "Store" not in text


def test_portal_checks_the_password_file(passwd: str) -> None:
    portal = make_portal(passwd, {})
    interface, avatar, logout = result(portal.login(UsernamePassword(b"other", b"pw2"), None, ITelnetProtocol))
    assert interface is ITelnetProtocol
    for user, password in [(b"admin", b"s3cre"), (b"admin", b"s3cret "), (b"nobody", b"s3cret"), (b"#", b"")]:
        failure = result(portal.login(UsernamePassword(user, password), None, ITelnetProtocol))
        assert failure.check(UnauthorizedLogin), (user, password)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("", "no user:password"),
        ("admin\n", "no user:password"),
        ("admin:\n", "no user:password"),
    ],
)
def test_refuses_to_start_without_a_usable_password_file(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "passwd"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManholeConfigError, match=problem):
        check_password_file(os.fspath(path))
    with pytest.raises(usage.UsageError, match="--manhole-passwd"):
        Options().parseOptions(["--manhole", "tcp:2323:interface=127.0.0.1", "--manhole-passwd", os.fspath(path)])


def test_options_refuse_manhole_without_password_file_or_off_loopback(passwd: str) -> None:
    with pytest.raises(usage.UsageError, match="--manhole-passwd"):
        Options().parseOptions(["--manhole", "tcp:2323:interface=127.0.0.1"])
    with pytest.raises(usage.UsageError, match="non-loopback manhole"):
        Options().parseOptions(["--manhole", "tcp:2323", "--manhole-passwd", passwd])
    options = Options()
    options.parseOptions(["--manhole", "tcp:2323", "--manhole-passwd", passwd, "--manhole-allow-remote"])
    assert options["manhole"] == "tcp:2323"
