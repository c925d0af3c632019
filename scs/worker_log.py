"""A worker's log file: reading its last lines, and rotating it by size.

``<instance-dir>/<name>/worker.log`` is written by two hands:

- Celery's logging, through ``logging.handlers.WatchedFileHandler``
  (``celery.app.log``, ``--logfile``), in the worker and in each of its
  pool processes.  Before each record it compares the file open in its
  stream with what the path names now, and reopens the path when they
  differ.
- The worker's raw stdout and stderr, which :func:`scs.worker.spawn_worker`
  points at the log (``O_APPEND``) before the worker runs: what is printed
  before Celery sets up its logging, and what the interpreter itself writes
  when it dies (Celery redirects ``sys.stdout``/``sys.stderr`` to its
  logger once it runs).

:func:`rotate` therefore renames, never copies and truncates: the handler
sees the rename on its next record and reopens a new ``worker.log``; a
record written between the rename and that reopen lands at the end of
``worker.log.1``, so no line is lost.  The raw descriptors are never
reopened: their rare output goes on into the renamed file (and is lost
only once that file is older than the last backup).

:func:`tail` reads backwards from the end in fixed blocks and keeps a
bounded number of bytes, so an answer costs a few MiB at most however
large the file or long its lines.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from twisted.logger import Logger

from scs.errors import SCSError, Unavailable
from scs.validation import DEFAULT_LOG_LINES as DEFAULT_LINES, MAX_LOG_LINES as MAX_LINES
from scs.worker import LOGFILE, instance_path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3

BLOCK_SIZE = 64 * 1024
# Raw bytes of lines kept by one tail.
MAX_TAIL_BYTES = 2 * 1024 * 1024
# Longer lines keep their first bytes and end with TRUNCATED.
MAX_LINE_BYTES = 8 * 1024
# Bytes read backwards in search of line starts, at most: a file of a few
# enormous lines is not read whole to find them.
MAX_SCAN_BYTES = 16 * 1024 * 1024
# The lines as JSON (with the escapes that control characters and
# undecodable bytes cost: up to 6 bytes each), at most.  An answer from
# another agent travels inside an SRS message of at most 4 MiB
# (scs.srs_trust.MAX_MESSAGE_BYTES), whose envelope escapes the payload's
# JSON once more (at most doubling it); 1.5 MiB leaves room for that.
MAX_ANSWER_JSON_BYTES = 1536 * 1024

TRUNCATED = " [... line truncated]"
CUT_START = "[... line start not read] "

log = Logger(namespace="scs.worker_log")


def _open_log(path: str) -> int | None:
    """A read-only descriptor of ``path``, None if there is no file.  Never
    through a symbolic link, never blocking on a FIFO; anything but a
    regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Unavailable(f"{os.path.basename(path)} is a symbolic link: not read") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Unavailable(f"{os.path.basename(path)} is not a regular file: not read")
    return fd


def _decode(raw: bytes, length: int, max_line_bytes: int, start_read: bool = True) -> str:
    """One line: the CR of a CRLF dropped, undecodable bytes replaced, and
    markers where it was cut."""
    raw = raw[:max_line_bytes]
    if length <= max_line_bytes and raw.endswith(b"\r"):
        raw = raw[:-1]
    text = raw.decode("utf-8", errors="replace")
    if length > max_line_bytes:
        text += TRUNCATED
    if not start_read:
        text = CUT_START + text
    return text


def tail(
    path: str,
    lines: int,
    *,
    max_bytes: int = MAX_TAIL_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_scan: int = MAX_SCAN_BYTES,
    block_size: int = BLOCK_SIZE,
) -> list[str]:
    """The last ``lines`` lines of the file at ``path``, oldest first.

    Reads backwards from the end in blocks of ``block_size`` and never the
    whole file: at most ``max_bytes`` bytes of lines are kept (older lines
    past that are left out), each line at most ``max_line_bytes`` (its
    first bytes, then :data:`TRUNCATED`), and at most ``max_scan`` bytes are
    read.  Lines end at ``\\n`` (a ``\\r`` before it is dropped; a last line
    without one counts); bytes that are not UTF-8 are replaced.  A missing
    file has no lines; a symbolic link or a non-regular file is refused
    (``Unavailable``).  The file may grow meanwhile: what was past its end
    when it was opened is not read."""
    if lines <= 0:
        return []
    fd = _open_log(path)
    if fd is None:
        return []
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return []
        end = size
        if os.pread(fd, 1, size - 1) == b"\n":
            end -= 1  # the file's last newline ends its last line
        found: list[str] = []  # newest first
        kept = 0
        # The line being assembled: its first bytes read so far (at most
        # max_line_bytes of them) and its full length.
        head = b""
        length = 0
        pos = end
        scanned = 0
        while True:
            if pos == 0:
                # The first line of the file.
                if kept + min(len(head), max_line_bytes) <= max_bytes:
                    found.append(_decode(head, length, max_line_bytes))
                break
            if scanned >= max_scan:
                if not found:
                    found.append(_decode(head, length, max_line_bytes, start_read=False))
                break
            step = min(block_size, pos, max_scan - scanned)
            pos -= step
            block = os.pread(fd, step, pos)
            if len(block) != step:  # truncated under us: stop with what we have
                break
            scanned += step
            pieces = block.split(b"\n")
            # The last piece continues the line being assembled.
            head = (pieces[-1] + head)[: max_line_bytes + 1]
            length += len(pieces[-1])
            full = False
            for piece in reversed(pieces[:-1]):
                # ``head`` is complete: the newline before it was found.
                if kept + min(len(head), max_line_bytes) > max_bytes:
                    full = True
                    break
                found.append(_decode(head, length, max_line_bytes))
                kept += min(len(head), max_line_bytes)
                if len(found) >= lines:
                    full = True
                    break
                head = piece[: max_line_bytes + 1]
                length = len(piece)
            if full:
                break
        found.reverse()
        return found
    finally:
        os.close(fd)


def _json_cost(line: str) -> int:
    return len(json.dumps(line, ensure_ascii=True)) + 1


def fit_answer(lines: list[str], budget: int = MAX_ANSWER_JSON_BYTES) -> list[str]:
    """The newest of ``lines`` whose JSON takes at most ``budget`` bytes."""
    total = 0
    start = len(lines)
    while start > 0:
        cost = _json_cost(lines[start - 1])
        if total + cost > budget:
            break
        total += cost
        start -= 1
    return lines[start:]


def read_tail(instance_dir: str, name: str, lines: int = DEFAULT_LINES) -> list[str]:
    """The last ``lines`` lines of instance ``name``'s worker.log, small
    enough for an answer (:data:`MAX_ANSWER_JSON_BYTES`).  ``UnsafeName``
    for a name or path that is not safe; ``Unavailable`` when the file
    cannot be read."""
    path = instance_path(instance_dir, name, LOGFILE)
    try:
        return fit_answer(tail(path, lines))
    except SCSError:
        raise
    except OSError as e:
        raise Unavailable(f"cannot read the worker log of {name!r}: {e.strerror or e}", instance=name) from None


def backup_name(path: str, k: int) -> str:
    return f"{path}.{k}"


def rotate(path: str, max_bytes: int, backups: int) -> int | None:
    """Rotate the log at ``path`` if it is larger than ``max_bytes``: the
    size it had, or None when it was left alone.

    ``path.1`` … ``path.<backups-1>`` move one up (what was
    ``path.<backups>`` is dropped, and so are older ones that a larger
    ``backups`` left), then ``path`` becomes ``path.1``.  With ``backups``
    0 the log is removed.  Renames only, never a copy and truncate: a
    writer that reopens on rename (``WatchedFileHandler``) loses nothing,
    and one that does not (the worker's raw stdout and stderr) goes on
    writing into the renamed file.  Renaming never follows a symbolic
    link; a ``path`` that is not a regular file is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size <= max_bytes:
        return None
    if backups <= 0:
        os.unlink(path)
    older = _backups(path)
    # Oldest first, so that each moves to a free name.
    for n in sorted(older, reverse=True):
        if n >= backups:
            os.unlink(backup_name(path, n))
        else:
            os.replace(backup_name(path, n), backup_name(path, n + 1))
    if backups > 0:
        os.replace(path, backup_name(path, 1))
    return st.st_size


def _backups(path: str) -> list[int]:
    """The numbers of the backups of ``path`` there are (``path.<n>``)."""
    directory, base = os.path.split(path)
    prefix = base + "."
    found = []
    for entry in os.listdir(directory or "."):
        suffix = entry[len(prefix) :] if entry.startswith(prefix) else ""
        if suffix.isascii() and suffix.isdigit() and not suffix.startswith("0"):
            found.append(int(suffix))
    return found


def rotate_instance_log(instance_dir: str, name: str, max_bytes: int, backups: int, logger: Any = None) -> int | None:
    """:func:`rotate` the worker.log of instance ``name``, logging
    ``event="worker.log.rotated"`` when it was.  ``UnsafeName`` for an
    unsafe name or path, ``OSError`` when the files cannot be renamed."""
    path = instance_path(instance_dir, name, LOGFILE)
    size = rotate(path, max_bytes, backups)
    if size is not None:
        (logger or log).info(
            "{{Supervisor}} {name} worker.log rotated at {size} bytes ({backups} kept)",
            name=name,
            size=size,
            backups=backups,
            event="worker.log.rotated",
        )
    return size


__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_LINES",
    "DEFAULT_MAX_BYTES",
    "MAX_LINES",
    "fit_answer",
    "read_tail",
    "rotate",
    "rotate_instance_log",
    "tail",
]
