"""Unit tests of scs.worker: the worker command line, WorkerProcess and the
process-table helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from scs.errors import BadParameter
from scs.leftovers import ProcessTable, is_worker_for
from scs.records import BrokerInfo, InstanceSpec, QueueBinding
from scs.testing import FakeSpawner
from scs.worker import (
    UnsafeName,
    WorkerProcess,
    build_argv,
    check_path_component,
    instance_path,
    session_argv,
    spawn_worker,
)

BROKER = BrokerInfo.from_url("amqp://guest:guest@127.0.0.1:5672//")


def spec(**kw):
    kw.setdefault("name", "w1")
    kw.setdefault("app", "foo")
    kw.setdefault("broker", BROKER)
    return InstanceSpec(**kw)


def tmpdir(tc) -> str:
    """A fresh directory under the system temp dir, removed after the test
    (trial's mktemp() would put it in the current directory under pytest)."""
    d = tempfile.mkdtemp(prefix="scs-test-")
    tc.addCleanup(shutil.rmtree, d, True)
    return d


class BuildArgvTests(SynchronousTestCase):
    def test_full_command_line(self) -> None:
        s = spec(
            celery_app="proj.celery",
            max_concurrency=4,
            min_concurrency=2,
            queues=(QueueBinding("tasks", "tasks", "tasks"), QueueBinding("t2", "t2", "t2", "direct")),
            arguments=("--loglevel=INFO", "-E"),
        )
        argv = build_argv(s, "/data", "host.example")
        self.assertEqual(
            argv,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "proj.celery",
                "-b",
                "amqp://guest:guest@127.0.0.1:5672/%2F",
                "worker",
                "-n",
                "w1@host.example",
                "-Q",
                "dq.w1,tasks,t2",
                "--autoscale=4,2",
                "--pidfile",
                "/data/w1/worker.pid",
                "--logfile",
                "/data/w1/worker.log",
                "--without-mingle",
                "--loglevel=INFO",
                "-E",
            ],
        )

    def test_without_celery_app_has_no_dash_a(self) -> None:
        argv = build_argv(spec(), "/d", "h")
        self.assertNotIn("-A", argv)
        # -b is a global celery option: it must come before the subcommand.
        self.assertLess(argv.index("-b"), argv.index("worker"))

    def test_queue_with_other_binding_is_left_to_add_consumer(self) -> None:
        s = spec(queues=(QueueBinding("odd", "ex", "key", "topic"), QueueBinding("plain", "plain", "plain")))
        argv = build_argv(s, "/d", "h")
        self.assertEqual(argv[argv.index("-Q") + 1], "dq.w1,plain")

    def test_mingle_switch(self) -> None:
        self.assertNotIn("--without-mingle", build_argv(spec(), "/d", "h", mingle=True))
        # Not repeated when the instance already asks for it.
        argv = build_argv(spec(arguments=("--without-mingle",)), "/d", "h")
        self.assertEqual(argv.count("--without-mingle"), 1)

    def test_non_ascii_name(self) -> None:
        argv = build_argv(spec(name="wörker"), "/d", "h")
        self.assertIn("wörker@h", argv)
        self.assertIn("dq.wörker", argv)


class IsWorkerForTests(SynchronousTestCase):
    def test_matches_own_command_line(self) -> None:
        self.assertTrue(is_worker_for(build_argv(spec(), "/d", "h"), "w1"))

    def test_other_name_or_program(self) -> None:
        self.assertFalse(is_worker_for(build_argv(spec(), "/d", "h"), "w"))
        self.assertFalse(is_worker_for(["/bin/sleep", "-n", "w1@h"], "w1"))
        self.assertFalse(is_worker_for(None, "w1"))
        self.assertFalse(is_worker_for([], "w1"))

    def test_setproctitle_form(self) -> None:
        self.assertTrue(is_worker_for(["[celeryd: w1@h:MainProcess] -active- (worker)"], "w1"))


class WorkerProcessTests(SynchronousTestCase):
    def test_reports_exit(self) -> None:
        ended = []
        proto = WorkerProcess("w1", lambda p, r: ended.append((p, r)))
        spawner = FakeSpawner()
        transport = spawner.spawnProcess(proto, "x", ["x"])
        self.assertEqual(proto.pid, transport.pid)
        transport.exit(code=3)
        self.assertEqual(len(ended), 1)
        self.assertIs(ended[0][0], proto)
        self.assertEqual(proto.exit_code, 3)
        self.assertTrue(proto.ended)
        self.assertFalse(proto.signal("TERM"))

    def test_reports_signal(self) -> None:
        proto = WorkerProcess("w1", lambda p, r: None)
        FakeSpawner().spawnProcess(proto, "x", ["x"])
        proto.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(proto.exit_signal, 9)

    def test_clean_exit(self) -> None:
        proto = WorkerProcess("w1", lambda p, r: None)
        FakeSpawner().spawnProcess(proto, "x", ["x"])
        proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(proto.exit_code, 0)

    def test_signal_goes_to_transport(self) -> None:
        spawner = FakeSpawner()
        spawner.ignore_term = True
        proto = WorkerProcess("w1", lambda p, r: None)
        t = spawner.spawnProcess(proto, "x", ["x"])
        self.assertTrue(proto.signal("TERM"))
        self.assertEqual(t.signals, ["TERM"])


class SpawnWorkerTests(SynchronousTestCase):
    def test_spawn_makes_directory_and_maps_output_to_log(self) -> None:
        base = os.path.join(tmpdir(self), "instances")
        spawner = FakeSpawner()
        proto = WorkerProcess("w1", lambda p, r: None)
        argv = build_argv(spec(), base, "h")
        os.environ["SCS_TEST_MARKER"] = "1"
        self.addCleanup(os.environ.pop, "SCS_TEST_MARKER", None)
        spawn_worker(spawner, proto, argv, base, "w1")
        (p,) = spawner.processes
        self.assertEqual(p.args, session_argv(argv))
        self.assertEqual(p.args[-len(argv) :], argv)
        self.assertEqual(p.executable, sys.executable)
        self.assertTrue(os.path.isfile(os.path.join(base, "w1", "worker.log")))
        self.assertEqual(p.env.get("SCS_TEST_MARKER"), "1")
        self.assertIsNone(p.path)  # the agent's working directory
        # stdout and stderr are the same descriptor (the log file), not pipes.
        self.assertIsInstance(p.childFDs[1], int)
        self.assertEqual(p.childFDs[1], p.childFDs[2])


class SessionLauncherTests(SynchronousTestCase):
    def test_runs_argv_in_a_new_session_with_the_same_pid(self) -> None:
        probe = "import os, sys; print(os.getpid(), os.getsid(0), sys.argv[1:])"
        child = subprocess.Popen(
            session_argv([sys.executable, "-c", probe, "a b", "ö"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = child.communicate(timeout=30)
        pid, sid, args = out.split(" ", 2)
        self.assertEqual(int(pid), child.pid)  # exec'd: the pid the agent tracks
        self.assertEqual(int(sid), child.pid)  # leader of its own session
        self.assertNotEqual(int(sid), os.getsid(0))
        self.assertEqual(args.strip(), repr(["a b", "ö"]))


class ProcessTableTests(SynchronousTestCase):
    def test_own_process(self) -> None:
        cmd = ProcessTable().cmdline(os.getpid())
        self.assertIsNotNone(cmd)
        self.assertIn("python", cmd[0])

    def test_pids(self) -> None:
        pids = ProcessTable().pids()
        self.assertIn(os.getppid(), pids)
        self.assertNotIn(os.getpid(), pids)

    def test_missing_process(self) -> None:
        # pid_max is at most 2**22 on Linux.
        self.assertIsNone(ProcessTable().cmdline(2**22 + 1))

    def test_pidfile(self) -> None:
        path = os.path.join(tmpdir(self), "worker.pid")
        with open(path, "w") as f:
            f.write("1234\n")
        self.assertEqual(ProcessTable().read_pidfile(path), 1234)
        self.assertIsNone(ProcessTable().read_pidfile(path + ".missing"))


HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../A-escape",
    "../../etc",
    "a/b",
    "/etc",
    "a\\b",
    "..\\x",
    "a\0b",
    "\0",
    ".hidden",  # would shadow the store file's neighbours
    "-n",  # would read as an option
    "a b",
    "x" * 65,
    "wo\u0308rker",  # not NFC
]


class InstancePathTests(SynchronousTestCase):
    """Paths built from names stay inside the instance directory (-D)."""

    def test_plain_names(self) -> None:
        base = tmpdir(self)
        self.assertEqual(instance_path(base, "w1"), os.path.join(base, "w1"))
        self.assertEqual(instance_path(base, "wörker-1", "worker.pid"), os.path.join(base, "wörker-1", "worker.pid"))
        # The directory as given (relative or not), not its resolved form.
        self.assertEqual(instance_path("/data", "w1", "worker.log"), "/data/w1/worker.log")

    def test_hostile_names_are_refused(self) -> None:
        base = tmpdir(self)
        for name in HOSTILE_NAMES:
            with self.subTest(name=name):
                with self.assertRaises(UnsafeName) as raised:
                    instance_path(base, name, "worker.pid")
                self.assertIsInstance(raised.exception, BadParameter)
                self.assertIn(repr(name), raised.exception.message)
                with self.assertRaises(UnsafeName):
                    build_argv(spec(name=name), base, "h")
        self.assertEqual(os.listdir(base), [])

    def test_non_string_names_are_refused(self) -> None:
        for name in (None, b"w1", 3):
            with self.subTest(name=name), self.assertRaises(UnsafeName):
                instance_path("/data", name)  # type: ignore[arg-type]

    def test_bad_file_parts_are_refused(self) -> None:
        for part in ("", "..", "../x", "a\0"):
            with self.subTest(part=part), self.assertRaises(UnsafeName):
                instance_path("/data", "w1", part)

    def test_symlinked_instance_directory_pointing_outside(self) -> None:
        base, outside = tmpdir(self), tmpdir(self)
        os.symlink(outside, os.path.join(base, "w1"))
        with self.assertRaises(UnsafeName) as raised:
            instance_path(base, "w1", "worker.pid")
        self.assertIn("symbolic link", raised.exception.message)
        with self.assertRaises(UnsafeName):
            build_argv(spec(), base, "h")

    def test_symlink_to_another_place_inside_is_refused_too(self) -> None:
        base = tmpdir(self)
        os.mkdir(os.path.join(base, "w2"))
        os.symlink(os.path.join(base, "w2"), os.path.join(base, "w1"))
        with self.assertRaises(UnsafeName):
            instance_path(base, "w1", "worker.pid")
        # A log file planted as a symlink (to the store, say) is refused too.
        os.mkdir(os.path.join(base, "w3"))
        os.symlink(os.path.join(base, ".scs-store.sqlite"), os.path.join(base, "w3", "worker.log"))
        with self.assertRaises(UnsafeName):
            instance_path(base, "w3", "worker.log")

    def test_instance_directory_itself_may_be_a_symlink(self) -> None:
        """-D is the operator's choice; only what lies below it is checked."""
        real = tmpdir(self)
        link = os.path.join(tmpdir(self), "D")
        os.symlink(real, link)
        self.assertEqual(instance_path(link, "w1", "worker.pid"), os.path.join(link, "w1", "worker.pid"))

    def test_check_path_component(self) -> None:
        self.assertEqual(check_path_component("w1"), "w1")
        for name in HOSTILE_NAMES:
            with self.subTest(name=name), self.assertRaises(UnsafeName):
                check_path_component(name)


class SpawnWorkerPathTests(SynchronousTestCase):
    def test_hostile_name_creates_nothing_and_spawns_nothing(self) -> None:
        root = tmpdir(self)
        base = os.path.join(root, "D")
        os.mkdir(base)
        spawner = FakeSpawner()
        for name in ("../A-escape", "", "a\0b", ".."):
            with self.subTest(name=name), self.assertRaises(UnsafeName):
                spawn_worker(spawner, WorkerProcess(name, lambda p, r: None), ["x"], base, name)
        self.assertEqual(spawner.processes, [])
        self.assertEqual(sorted(os.listdir(root)), ["D"])
        self.assertEqual(os.listdir(base), [])

    def test_symlinked_instance_directory_is_not_written_through(self) -> None:
        base, outside = tmpdir(self), tmpdir(self)
        os.symlink(outside, os.path.join(base, "w1"))
        spawner = FakeSpawner()
        with self.assertRaises(UnsafeName):
            spawn_worker(spawner, WorkerProcess("w1", lambda p, r: None), ["x"], base, "w1")
        self.assertEqual(spawner.processes, [])
        self.assertEqual(os.listdir(outside), [])
