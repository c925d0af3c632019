"""Command-line options (DESIGN §4) and service wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from scs.tap import Options, endpoint_is_loopback, http_endpoint, http_url


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    options = parse("-i", "agent1")
    assert options["http-endpoint"] == "tcp:8000:interface=127.0.0.1"
    assert options["instance-dir"] == str(Path("scs-data") / "agent1")
    assert options["interval"] == 5.0
    assert options["broker"].startswith("amqp://guest:guest@127.0.0.1:5672/")
    assert options["cluster"] == "scs"


def test_addr_forms() -> None:
    assert http_endpoint(":8001") == "tcp:8001:interface=127.0.0.1"
    assert http_endpoint("localhost:8001") == "tcp:8001:interface=127.0.0.1"
    assert http_endpoint("[::1]:8001") == "tcp:8001:interface=\\:\\:1"
    assert parse(":8001", "-i", "a", "-D", "/tmp/x")["instance-dir"] == "/tmp/x"
    assert parse("--http", "tcp:9000:interface=127.0.0.1", "-i", "a")["http-endpoint"] == (
        "tcp:9000:interface=127.0.0.1"
    )
    assert http_url("tcp:8001:interface=127.0.0.1") == "http://127.0.0.1:8001/"
    assert http_url("tcp:port=8001:interface=\\:\\:1") == "http://[::1]:8001/"
    assert http_url("ssl:8443:privateKey=k.pem:interface=127.0.0.1") == "https://127.0.0.1:8443/"
    assert http_url("ssl:8443:privateKey=k.pem", ["agent1.example"]) == "https://agent1.example:8443/"
    assert http_url("tcp:8001:interface=0.0.0.0", ["agent1.example:443"]) == "http://agent1.example:443/"


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["nonsense"], "ADDR"),
        ([":99999"], "ADDR"),
        (["example.org:80"], "IP address"),
        (["--interval", "0"], "--interval"),
        (["--interval", "soon"], "--interval"),
        (["-l", "chatty"], "--loglevel"),
        (["-i", "bad/id"], "--id"),
        (["-b", "redis://x"], "--broker"),
        ([":8001", "--http", "tcp:1"], "not both"),
        (["--bogus"], "bogus"),
        (["0.0.0.0:8001"], "non-loopback"),
        (["--manhole", "tcp:2323:interface=127.0.0.1"], "--manhole-passwd"),
        (["--manhole", "tcp:2323", "--manhole-passwd", "f"], "non-loopback manhole"),
    ],
)
def test_bad_options_are_refused_naming_the_problem(args: list[str], complaint: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    assert complaint in str(raised.value)


def test_remote_http_needs_a_token_or_allow_remote(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-of-at-least-16-characters\n")
    assert parse("0.0.0.0:8001", "--allow-remote")["http-endpoint"].endswith("0.0.0.0")
    assert parse("0.0.0.0:8001", "--auth-token-file", str(token))["http-endpoint"].endswith("0.0.0.0")
    assert parse("0.0.0.0:8001", "--without-http")["without-http"]


def test_loopback_detection() -> None:
    assert endpoint_is_loopback("tcp:1:interface=127.0.0.1")
    assert endpoint_is_loopback("tcp:1:interface=127.5.0.1")
    assert endpoint_is_loopback("tcp6:1:interface=\\:\\:1")
    assert endpoint_is_loopback("unix:/tmp/sock")
    assert not endpoint_is_loopback("tcp:1")
    assert not endpoint_is_loopback("tcp:1:interface=0.0.0.0")
    assert not endpoint_is_loopback("tcp:1:interface=192.0.2.1")
