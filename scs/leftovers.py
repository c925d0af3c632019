"""Workers a crashed agent left running: finding them and ending them.

Two workers under one node name would split the node's replies and tasks,
so the supervisor ends every leftover before it spawns anything.  They are
found by their pid files and, in case a pid file was lost, by a process
whose ``--pidfile`` argument points into this instance directory.  Neither
is trusted alone: a pid is ended only if its command line is a celery worker
for that very instance (pids get reused).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from scs.policy import SupervisionPolicy
from scs.worker import PIDFILE, UnsafeName, check_path_component, instance_path


class ProcessTable:
    """The OS look-ups needed to find and end a worker this agent did not
    spawn (one left running by a previous, crashed agent).  Injected so that
    unit tests can fake the process table."""

    def cmdline(self, pid: int) -> list[str] | None:
        """argv of a live process, or None if there is none (zombies count as none)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            # The state follows the parenthesised command name.
            if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X"):
                return None
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except (OSError, ValueError):
            return None
        return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]

    def pids(self) -> list[int]:
        """Every process id now in /proc (but this process's own)."""
        me = os.getpid()
        try:
            return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
        except OSError:
            return []

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def read_pidfile(self, path: str) -> int | None:
        try:
            with open(path, encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


def is_worker_for(cmdline: Sequence[str] | None, name: str) -> bool:
    """Does this command line belong to a celery worker for instance ``name``?

    Checked before killing a pid from a pid file: pids get reused, and only a
    worker with this node name must be ended.
    """
    if not cmdline:
        return False
    # With setproctitle installed Celery renames itself "[celeryd: node:...]".
    if f"celeryd: {name}@" in " ".join(cmdline):
        return True
    if not any("celery" in a for a in cmdline) or "worker" not in cmdline:
        return False
    prefix = f"{name}@"
    for i, arg in enumerate(cmdline):
        if arg in ("-n", "--hostname") and i + 1 < len(cmdline):
            if cmdline[i + 1].startswith(prefix):
                return True
        elif arg.startswith("--hostname=") and arg[len("--hostname=") :].startswith(prefix):
            return True
    return False


def _is_instance_name(name: str) -> bool:
    try:
        check_path_component(name)
    except UnsafeName:
        return False
    return True


class Leftovers:
    """Finds and ends the leftover workers of ``instance_dir``.

    ``table`` is the process table (:class:`scs.worker.ProcessTable` or a
    fake), ``clock`` paces the polling (the processes are not our children:
    no ``processEnded`` tells when they are gone)."""

    def __init__(
        self, instance_dir: str, table: ProcessTable, clock: Any, policy: SupervisionPolicy, log: Logger
    ) -> None:
        self.instance_dir = instance_dir
        self.table = table
        self.clock = clock
        self.policy = policy
        self.log = log

    async def end_all(self) -> None:
        """End every leftover found; returns once each is gone (or survived KILL)."""
        found = self.find()
        ends = [ensureDeferred(self._end(name, pid, path)) for pid, (name, path) in sorted(found.items())]
        if ends:
            await DeferredList(ends, consumeErrors=True)

    def find(self) -> dict[int, tuple[str, str]]:
        """``{pid: (instance name, pid file path)}`` of the leftovers."""
        found = self._by_pidfile()
        for pid in self.table.pids():
            if pid not in found:
                hit = self._by_pidfile_argument(self.table.cmdline(pid) or [])
                if hit is not None:
                    found[pid] = hit
        return found

    def _by_pidfile(self) -> dict[int, tuple[str, str]]:
        found = {}
        for name in self._instance_subdirectories():
            path = self._pidfile(name)
            if path is None:
                continue
            pid = self.table.read_pidfile(path)
            if pid is not None and is_worker_for(self.table.cmdline(pid), name):
                found[pid] = (name, path)
        return found

    def _by_pidfile_argument(self, cmd: list[str]) -> tuple[str, str] | None:
        """The instance whose pid file ``cmd`` names with ``--pidfile``, if
        it is in this instance directory and ``cmd`` is its worker."""
        base = os.path.abspath(self.instance_dir)
        for i, arg in enumerate(cmd[:-1]):
            if arg != "--pidfile":
                continue
            path = os.path.abspath(cmd[i + 1])
            name = os.path.basename(os.path.dirname(path))
            if (
                os.path.dirname(os.path.dirname(path)) == base
                and os.path.basename(path) == PIDFILE
                and is_worker_for(cmd, name)
            ):
                # The pid file is removed later: only through a path that
                # stays inside the instance directory.
                safe = self._pidfile(name)
                if safe is not None:
                    return name, safe
            return None
        return None

    def _instance_subdirectories(self) -> list[str]:
        """Names of the real subdirectories of the instance directory that
        are valid instance names: the store file, its backups, stray files
        and symlinks (which could lead out of it) are not instances."""
        try:
            with os.scandir(self.instance_dir) as entries:
                return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and _is_instance_name(e.name))
        except OSError:
            return []

    def _pidfile(self, name: str) -> str | None:
        """The pid file of instance ``name``, or None (logged) if its path
        would not stay inside the instance directory."""
        try:
            return instance_path(self.instance_dir, name, PIDFILE)
        except UnsafeName as e:
            self.log.warn(
                "{{Supervisor}} leftover scan skips {name!r}: {error}",
                name=name,
                error=e.message,
                event="unsafe-path",
            )
            return None

    async def _end(self, name: str, pid: int, pidfile: str) -> None:
        self.log.warn(
            "{{Supervisor}} {name}: worker pid {pid} left from a previous run, replacing it",
            name=name,
            pid=pid,
            event="leftover",
        )
        for sig, patience in (
            (signal.SIGTERM, self.policy.kill_timeout),
            (signal.SIGKILL, self.policy.leftover_kill_wait),
        ):
            self.table.kill(pid, sig)
            deadline = self.clock.seconds() + patience
            while self.clock.seconds() < deadline:
                if not is_worker_for(self.table.cmdline(pid), name):
                    self._remove_pidfile(pidfile, pid)
                    self.log.info(
                        "{{Supervisor}} {name}: leftover pid {pid} is gone",
                        name=name,
                        pid=pid,
                        event="leftover.gone",
                    )
                    return
                await deferLater(self.clock, self.policy.leftover_poll)
        self.log.error(
            "{{Supervisor}} {name}: leftover pid {pid} survived KILL", name=name, pid=pid, event="leftover.stuck"
        )

    def _remove_pidfile(self, path: str, pid: int) -> None:
        # Only if it still names the process we ended.
        if self.table.read_pidfile(path) == pid:
            try:
                os.unlink(path)
            except OSError:
                pass


__all__ = ["Leftovers", "ProcessTable", "is_worker_for"]
