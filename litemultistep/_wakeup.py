"""Waiting, cheaply, until another process commits to the database.

Every commit in WAL mode writes to the ``-wal`` file. On Linux an inotify watch on that file wakes an
idle worker the moment a write lands, with no polling at all; elsewhere (or if inotify is refused),
a ``stat`` of the file every ``poll`` seconds tells the same thing.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


def libc() -> ctypes.CDLL:
    """The C library: on Linux its symbols are in the interpreter's own namespace, so no search for
    it (ctypes.util.find_library runs a program, which would slow every job process's start)."""
    return ctypes.CDLL(None, use_errno=True)


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux): a process a child started and
    left behind, even in a session of its own, becomes this process's child when its parent dies, so
    it can be found and ended. Whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_BOOTTIME = 7
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class BoottimeAlarm:
    """Sleep until a moment on ``CLOCK_BOOTTIME`` (Linux timerfd): the kernel wakes the sleeper then,
    counting the time the host spent suspended, which ``time.sleep`` does not. ``None`` from
    :meth:`make` where the system has no timerfd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def make(cls) -> BoottimeAlarm | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            fd = libc().timerfd_create(_CLOCK_BOOTTIME, _TFD_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(fd) if fd >= 0 else None

    def sleep_until(self, when: float) -> None:
        """Return once ``CLOCK_BOOTTIME`` reads ``when`` (at once if it is past)."""
        whole = int(when)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, max(1, int((when - whole) * 1e9))))
        if libc().timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            time.sleep(0.05)  # refused: a short nap, and the caller looks again
            return
        os.read(self.fd, 8)


def children(pid: int) -> list[int]:
    """The pids of the children of process ``pid`` (Linux: every thread's list in /proc)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        return []
    return found


def end_children(keep: frozenset[int] = frozenset(), rounds: int = 10) -> int:
    """Kill this process's children but ``keep`` (and the process groups they lead), reap them, and
    go on while more come: the orphans of what was killed become this process's children when it is
    a subreaper (:func:`become_subreaper`), so a whole tree ends, sessions of its own included.
    Returns how many processes were killed."""
    me = os.getpid()
    ended = 0
    for _ in range(rounds):
        strays = [pid for pid in children(me) if pid not in keep]
        if not strays:
            break
        for pid in strays:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already (by whoever waited on it)
        ended += len(strays)
    return ended


def _inotify_watch(path: str) -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        c = libc()
        fd = c.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if c.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        os.close(fd)
        return None
    return int(fd)


class WalWaiter:
    """Tells when ``path`` (a ``-wal`` file) was written to: :meth:`fileno` is readable at once on
    Linux (unless not ``watch``); elsewhere :meth:`changed` compares the file's size and time every
    ``poll`` seconds."""

    def __init__(self, path: str, poll: float, watch: bool = True) -> None:
        self.path = path
        self.poll = poll
        self.fd = _inotify_watch(path) if watch else None
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def fileno(self) -> int | None:
        """A descriptor that is readable once the file was written to, or None (then poll)."""
        return self.fd

    def changed(self) -> bool:
        """Whether the file was written to since the last call (and drain pending events)."""
        if self.fd is not None:
            got = False
            try:
                while os.read(self.fd, 65536):
                    got = True  # drain the queued events: one wake-up is enough
            except BlockingIOError:
                pass
            return got
        current = self._signature()
        changed = current != self._seen
        self._seen = current
        return changed

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as the file was written to."""
        if self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
            return bool(ready) and self.changed()
        time.sleep(min(self.poll, max(timeout, 0.0)))
        return self.changed()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
