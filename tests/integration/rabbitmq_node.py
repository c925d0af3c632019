"""A private RabbitMQ node for tests that stop or restart the broker.

It has its own node name, AMQP and distribution ports and data directory
(owned by the ``rabbitmq`` user), so the shared broker on 5672 is never
touched.  It runs in the foreground in its own process group, stopped by
pid.

``PrivateRabbitMQ(..., tls=True)`` also opens a TLS listener (``tls_url``,
``amqps://``) with a server certificate for 127.0.0.1 and ``localhost``
signed by a throwaway CA (``ca_path``) made here with ``cryptography``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.integration.agents import free_port
from tests.integration.certs import make_ca, server_certificate

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def available() -> bool:
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return False
    return RABBITMQ_SERVER.exists() and os.geteuid() == 0


class PrivateRabbitMQ:
    def __init__(self, log_directory: Path, *, tls: bool = False) -> None:
        # pytest's tmp_path is private to root, so the node's data lives in
        # a directory of its own that the rabbitmq user can reach.
        self.directory = Path(tempfile.mkdtemp(prefix="scs-rabbitmq-"))
        shutil.chown(self.directory, "rabbitmq", "rabbitmq")
        self.out_path = Path(log_directory) / "rabbitmq.out"
        self.name = f"scs-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.tls_port: int | None = None
        self.ca_path: Path | None = None
        if tls:
            self._configure_tls()

    def _configure_tls(self) -> None:
        """A TLS listener on a free loopback port, with a certificate for
        127.0.0.1 and localhost signed by a CA of its own; the key and
        certificates belong to the rabbitmq user."""
        self.tls_port = free_port()
        tls = self.directory / "tls"
        self.ca_path, ca_cert, ca_key = make_ca(tls)
        key_path, cert_path = server_certificate(tls, ca_cert, ca_key)
        for path in (tls, self.ca_path, key_path, cert_path):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {self.ca_path}\n"
            f"ssl_options.certfile = {cert_path}\n"
            f"ssl_options.keyfile = {key_path}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "started without tls=True"
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}//"

    def tls_answers(self) -> bool:
        """Whether the TLS listener completes a handshake."""
        import ssl

        assert self.tls_port is not None and self.ca_path is not None
        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=2) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return True
        except (OSError, ssl.SSLError):
            return False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        d = str(self.directory)
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=f"{d}/mnesia",
            RABBITMQ_LOG_BASE=f"{d}/log",
            RABBITMQ_PID_FILE=f"{d}/pid",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins",
            RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{d}/advanced.config",
            HOME="/var/lib/rabbitmq",  # its Erlang cookie
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_path, "ab") as out:
            self.process = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                env=self._env(),
                user="rabbitmq",
                group="rabbitmq",
                cwd=self.directory,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not (self.answers() and (self.tls_port is None or self.tls_answers())):
            if self.process.poll() is not None:
                raise RuntimeError(f"private RabbitMQ exited with {self.process.returncode}; see {self.out_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private RabbitMQ did not answer in {timeout} s")
            time.sleep(0.2)

    def answers(self) -> bool:
        """Whether the node completes an AMQP handshake (not just listens)."""
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as connection:
                connection.ensure_connection(max_retries=1)
            return True
        except Exception:  # noqa: BLE001 - any failure means not yet
            return False

    def destroy(self) -> None:
        """Stop the node and remove its data."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        # The Erlang VM's helpers (erl_child_setup, inet_gethost) share the group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
