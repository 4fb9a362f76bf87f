"""The job process: the one place user code runs for a worker.

A worker (``worker.py``) keeps the database connection, its lock and its heartbeat to itself, and
runs jobs in long-lived child processes, one job at a time each (a fresh process per job would make
short jobs slow). A job can therefore hang, hold the GIL, close every file descriptor, crash the
interpreter or change the process's directory, environment or signal handlers without touching
the worker's own machinery: the worker kills the child at its deadline, sees it die, and starts
another. After each job the child puts back its working directory, environment and signal
handlers, so one job's changes never leak into the next.

The protocol, over two pipes, is JSON framed by :mod:`multiprocessing.connection`:

* worker to child: ``{"jobs": [[ClaimedJob fields...], ...], "window": seconds}``: a batch to run
  in order. The child gives back the jobs it has not started once the batch has run longer than
  ``window`` or a job of it turned out slow, so slow work never waits behind slow work. The first
  batch after the worker (re)takes its lock also carries ``"lock": path``: the worker's lock file,
  which the child then holds shared (on SQLite; None elsewhere).
* child to worker: ``{"ok": [job_id, ...], "seconds": s, "results": [[job_id, ok, exc_type, message,
  traceback, duration, retryable, retry_delay], ...], "gave_back": [job_id, ...], "values": [...] or
  None, "retire": [func, why] or None}``: the normal jobs that succeeded (and the seconds they took in
  all, and their return values when the task keeps results), every other outcome, the jobs not
  started, and, if a job left threads or processes running, that this child ends after this batch.

A 16-byte shared page tells the worker which job runs now and since when (``CLOCK_MONOTONIC``),
without a message per job: the id is positive while the job runs and negated once it has ended.

Both ends live here: :func:`serve` is the child's, :class:`JobProcess` the worker's.
"""

from __future__ import annotations

import _signal
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import struct
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from ._wakeup import BoottimeAlarm, become_subreaper, end_children, libc
from .db import boottime, is_url, monotonic

if TYPE_CHECKING:
    import subprocess

    from .config import WorkerOptions
    from .engine import ClaimedJob

# What runs jobs (engine, runner, jobs) is imported by serve(), in the job process: a worker imports
# this module to start its job processes before it imports the rest, so that they start up meanwhile.

log = logging.getLogger(__name__)

SLOT = struct.Struct("<dq")  # start (monotonic seconds), job id
#: after SLOT: what the running job last reported (litemultistep.report): job id, done, total (-1: none)
PROGRESS = struct.Struct("<qdd")
PROGRESS_AT = 16
#: after PROGRESS: the fence (on PostgreSQL): the CLOCK_BOOTTIME by which this process stops a running job
#: unless its worker has confirmed its lease since (0: none), and 1 once it stopped one so
FENCE = struct.Struct("<dq")
FENCE_AT = 48
#: how often a job process looks at its fence once past it (a job may start then)
FENCE_LOOK = 0.05
#: the longest a job process's fence naps while it has no deadline yet, or no timerfd to sleep until it
#: (elsewhere it sleeps until its deadline: looking every FENCE_LOOK cost 20 idle PostgreSQL workers a
#: few percent of a core)
FENCE_NAP = 0.25
SLOT_SIZE = 4096
#: a job that ran longer than this (a claim's whole plan, rules.CLAIM_WINDOW) ends its batch: the jobs
#: after it go back to the queue
SLOW_JOB = 0.05
#: the child's exit code when it can no longer talk to its worker (a job closed its pipes)
BROKEN = 197  # (codes a job is unlikely to pick for its own os._exit)
#: a job that ran at least this long may have started a process: look for what it left behind
MAY_HAVE_FORKED = 0.0002
#: the child's exit code once a job left threads or processes behind: the worker starts another
RETIRED = 198
NOT_IMPORTABLE = "litemultistep.JobNotImportable"

#: the environment variable a job process gets its setup from (a worker sets it)
SETUP_ENV = "LITEMULTISTEP_JOBPROC"
#: what a new interpreter runs to become a job process (it leaves no name in ``__main__``)
MAIN = "__import__('litemultistep.jobproc').jobproc.main()"

#: test hook: a file whose first line is "POINT module:qualname [worker]" makes the first job process to
#: reach POINT (after-claim, after-run) in a job of that callable die at once, as a crash would; with
#: "worker", it kills its whole worker first. It fires once.
CRASH_FILE_ENV = "LITEMULTISTEP_CRASH_FILE"

_SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                        signal.SIGALRM, signal.SIGCHLD, signal.SIGPIPE)]


class _Reporter:
    """litemultistep.report() in a job process: the latest value goes to the page the worker reads."""

    def __init__(self, page: mmap.mmap, job_id: int) -> None:
        self.page, self.job_id = page, job_id

    def __call__(self, done: float, total: float | None) -> None:
        PROGRESS.pack_into(self.page, PROGRESS_AT, self.job_id, done, -1.0 if total is None else total)


def read_progress(page: mmap.mmap) -> tuple[int, float, float | None] | None:
    """``(job id, done, total)`` the running job last reported, or None (read until two reads agree)."""
    while True:
        first = PROGRESS.unpack_from(page, PROGRESS_AT)
        if first == PROGRESS.unpack_from(page, PROGRESS_AT):
            job_id, done, total = first
            return None if done < 0 else (job_id, done, None if total < 0 else total)


def read_slot(page: mmap.mmap) -> tuple[int, float]:
    """``(job id, start)`` from a child's shared page, read until two reads agree (no torn read)."""
    while True:
        first = SLOT.unpack_from(page, 0)
        second = SLOT.unpack_from(page, 0)
        if first == second:
            return first[1], first[0]


def set_fence(page: mmap.mmap, deadline: float) -> None:
    """The worker confirmed its lease: a running job may go on until ``deadline`` (CLOCK_BOOTTIME)."""
    FENCE.pack_into(page, FENCE_AT, deadline, 0)


def fenced(page: mmap.mmap) -> bool:
    """Whether the job process stopped its job itself, its worker having gone silent."""
    return bool(FENCE.unpack_from(page, FENCE_AT)[1])


class JobProcess:
    """One child that runs jobs, and what the worker knows of it (the worker's end of the pipes).

    ``fence``: None where the backend never fences (SQLite); else the deadline a running job has
    (CLOCK_BOOTTIME), 0.0 while the worker has not confirmed its lease yet."""

    to_child: Connection
    from_child: Connection

    def __init__(self, options: WorkerOptions, slot: int, fence: float | None = None, fork: bool = False) -> None:
        """``fork``: fork this process rather than start a new interpreter, where that is safe (see
        :func:`_fork`): what ``litemultistep worker`` does at start, before it imports the rest."""
        import tempfile

        self.slot = slot
        self.options = options
        self.batch: list[ClaimedJob] = []
        #: the last progress report of its running job that was stored
        self.reported: tuple[int, float, float | None] | None = None
        #: some job of the batch has a time limit: the loop watches which one runs
        self.limited = False
        #: when the batch was sent (monotonic seconds)
        self.sent = 0.0
        #: the worker's lock file it was told to hold
        self.lock: str | None = None
        inbox_r, inbox_w = os.pipe()
        outbox_r, outbox_w = os.pipe()
        with tempfile.TemporaryFile() as f:
            f.truncate(SLOT_SIZE)
            self.page = mmap.mmap(f.fileno(), SLOT_SIZE)
            page_fd = os.dup(f.fileno())
        level = logging.DEBUG if options.verbose else logging.WARNING if options.quiet else logging.INFO
        # a file by its full path, as the database names itself: a job may change directory
        db = options.db if is_url(options.db) else os.path.abspath(options.db)
        setup = {"parent": os.getpid(), "inbox": inbox_r, "outbox": outbox_w, "page": page_fd, "db": db,
                 "paths": [os.path.abspath(p) for p in [os.getcwd(), *options.paths]], "log_level": level,
                 "allow_modules": options.allow_modules, "fence": fence is not None}
        try:
            # a forked child unmaps and closes what this process holds of its job processes first
            held = [self.page, *(o for p in _started for o in (p.page, p.to_child, p.from_child))]
            forked = _fork(setup, (inbox_r, outbox_w, page_fd), held) if fork else None
            self.proc: subprocess.Popen[bytes] | _Forked = forked or _exec(setup, (inbox_r, outbox_w, page_fd))
        finally:
            for fd in (inbox_r, outbox_w, page_fd):
                os.close(fd)
        self.to_child = Connection(inbox_w, readable=False)
        self.from_child = Connection(outbox_r, writable=False)
        if fence is not None:
            set_fence(self.page, fence)
        _started.add(self)

    @property
    def busy(self) -> bool:
        return bool(self.batch)

    def fileno(self) -> int:
        return self.from_child.fileno()

    def send(self, batch: list[ClaimedJob], window: float, lock: str | None = None) -> bool:
        """Hand it a batch; ``lock``: the worker's lock file, which it takes too (shared) the first
        time it is named (:attr:`LivenessLock.shared <litemultistep.db.LivenessLock.shared>`)."""
        self.batch = batch
        self.sent = monotonic()
        self.limited = any(j.timeout is not None for j in batch)
        message: dict[str, Any] = {"jobs": batch, "window": window}
        if lock != self.lock:
            message["lock"] = self.lock = lock
        try:
            self.to_child.send_bytes(json.dumps(message).encode())
        except OSError:
            return False
        return True

    def running(self) -> tuple[ClaimedJob | None, float]:
        """The job of the current batch that runs now (or ran last), and since when."""
        job_id, start = read_slot(self.page)
        for job in self.batch:
            if job.id == abs(job_id):
                return (job, start) if job_id > 0 else (job, 0.0)
        return None, 0.0

    def kill(self) -> None:
        """Kill the job process and every process of its group (what its job started stays in it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def fenced(self) -> bool:
        """It stopped its job itself: its worker had not confirmed its lease in time."""
        return fenced(self.page)

    def close(self) -> None:
        _started.discard(self)
        for conn in (self.to_child, self.from_child):
            conn.close()
        self.page.close()

    def end(self) -> None:
        """Kill it (see :meth:`kill`) and close the worker's end of its pipes and page."""
        self.kill()
        self.close()


#: the job processes this process started and has not closed
_started: weakref.WeakSet[JobProcess] = weakref.WeakSet()


def _command() -> list[str]:
    """A new job process's command line: this interpreter with this process's own options (-O, -X dev,
    -W...), as a forked job process has them (the helper multiprocessing uses for the same)."""
    import subprocess  # here: only the worker starts job processes

    return [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", MAIN]  # type: ignore[attr-defined]


def _exec(setup: dict[str, Any], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """A job process in a new interpreter, in a session of its own."""
    import subprocess

    # the setup goes by the environment, not the command line: a database URL's password must not show
    # in the process list
    return subprocess.Popen(_command(), env={**os.environ, SETUP_ENV: json.dumps(setup)}, pass_fds=fds,
                            start_new_session=True)


class _Forked:
    """The worker's handle on a job process it forked: what it uses of :class:`subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: as Popen does, its status is lost
            pid, status = self.pid, 0
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None and self.poll() is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError:  # no pidfd (before Linux 5.3), or already reaped
                pidfd = -1
            if pidfd >= 0:
                try:
                    select.select([pidfd], [], [], timeout)
                finally:
                    os.close(pidfd)
            else:
                end = time.monotonic() + timeout
                while self.poll() is None and time.monotonic() < end:
                    time.sleep(0.005)
            if self.poll() is None:
                import subprocess

                raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout)
        while self.returncode is None:
            self._reap(0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def _fork(setup: dict[str, Any], fds: tuple[int, ...], held: list[mmap.mmap | Connection]) -> _Forked | None:
    """A job process forked from this one, which has imported what a job process needs already: a
    fraction of a millisecond, where a new interpreter takes a tenth of a second of CPU. Safe only in a
    process of one thread (a lock another thread held would stay locked in the child): None elsewhere,
    and the caller starts a new interpreter instead.

    The child is made to look as a new interpreter would (:func:`_as_new`) and never returns here;
    ``held``: what this process holds of its job processes (pipes, shared pages), closed in the child."""
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return None
    except OSError:
        return None
    from . import engine, jobs, runner  # noqa: F401  (once here, not once in each child)

    command = _command()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None where the worker was started with the descriptor closed
            stream.flush()  # not written twice
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = BROKEN
    try:
        _as_new(fds, held, command)
        code = serve(setup)
        if sys.stdout is not None:
            sys.stdout.flush()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _as_new(fds: tuple[int, ...], held: list[mmap.mmap | Connection], command: list[str]) -> None:
    """In a job process just forked: leave behind what belonged to the worker, so that it runs jobs as
    one started by :func:`_exec` would (``command``: its command line)."""
    import builtins
    import gc
    import importlib.machinery
    import types

    for thing in held:
        thing.close()
    # What else of the worker's holds a file descriptor is never collected here: closing it would close
    # whatever this process opened under the same number since.
    gc.freeze()
    os.setsid()
    signal.set_wakeup_fd(-1)
    for s in signal.valid_signals():
        # as exec does: a signal the worker handles goes back to its default; one it ignores stays
        # ignored (nohup's SIGHUP); Python's own SIGINT handler, as a new interpreter installs it
        handler = signal.getsignal(s)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    keep = sorted({0, 1, 2, *fds})
    for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
        os.closerange(low + 1, high)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    sys.argv[:] = ["-c"]
    sys.orig_argv[:] = command
    sys.path[0] = ""
    main = sys.modules["__main__"] = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    main.__annotations__ = {}
    main.__loader__ = importlib.machinery.BuiltinImporter


def _retitle(title: str) -> None:
    """Show ``title`` as this process's command line (``ps``, ``pgrep -f``, /proc/PID/cmdline): else a
    forked job process shows its worker's, and ``pgrep -f 'litemultistep worker'`` counts it as one.
    Written over the arguments the process was started with (cut to their length), where Linux keeps
    them (the interpreter keeps copies of its own: nothing else reads them)."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            after_name = f.read().rsplit(b")", 1)[1].split()
        start, end = int(after_name[45]), int(after_name[46])  # fields 48 and 49: arg_start, arg_end
    except (OSError, IndexError, ValueError):
        return
    size = end - start
    if size <= 0:
        return
    text = title.encode()[:size - 1]
    ctypes.memmove(start, text + bytes(size - len(text)), size)


def _watch_fence(page: mmap.mmap) -> None:
    """The job process's own fence: a thread that ends the process, and every process its job started
    (see :func:`_end_tree`), once a job runs past the deadline its worker last set. A worker that cannot
    confirm its lease (its host cut off from the server, or the worker itself paused) is taken for
    dead when the lease runs out, and its jobs run elsewhere: by then they must have stopped here."""
    alarm = BoottimeAlarm.make()
    while True:
        deadline = FENCE.unpack_from(page, FENCE_AT)[0]
        now = boottime()
        if deadline and now >= deadline:
            if SLOT.unpack_from(page, 0)[1] > 0:  # a job runs
                FENCE.pack_into(page, FENCE_AT, deadline, 1)
                os.write(2, f"litemultistep job process {os.getpid()}: its worker has not confirmed its lease; "
                            "stopping the running job (it runs again elsewhere)\n".encode())
                _end_tree()
            time.sleep(FENCE_LOOK)
        elif deadline and alarm is not None:
            # until the deadline, on the clock that counts a suspended host; the worker has moved it
            # later by then, at each heartbeat, and it is looked at again
            alarm.sleep_until(deadline)
        else:
            # no deadline yet (the worker has not confirmed its lease), or no timerfd: a nap at a time
            # (time.sleep counts no time the host spent suspended, the deadline does)
            time.sleep(min(deadline - now, FENCE_NAP) if deadline else FENCE_NAP)


def _leftovers(threads: int, ran: float) -> str | None:
    """What the job that just ran left running in this process (threads over ``threads``, child
    processes), said for people, or None. Children are looked for only after a job that ran long
    enough to start one: a short job costs no system call."""
    left = []
    extra = threading.active_count() - threads
    if extra > 0:
        left.append(f"{extra} thread(s)")
    if ran >= MAY_HAVE_FORKED:
        try:
            while True:
                pid, _ = os.waitpid(-1, os.WNOHANG)  # reaps the children that ended; 0: some run on
                if pid == 0:
                    left.append("child process(es)")
                    break
        except ChildProcessError:
            pass  # no child at all
    return " and ".join(left) or None


#: the worker's lock file this job process holds shared (on SQLite), or -1
_held = -1


def _hold(path: str | None) -> None:
    """Take the worker's lock file shared (closing the one held before, if any): as long as this
    process lives, its worker cannot be taken for dead."""
    global _held
    fd = -1
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # gone, or taken by one that found the worker dead: it is, and so are we soon
            if fd >= 0:
                os.close(fd)
            fd = -1
    if _held >= 0:
        os.close(_held)
    _held = fd


def _ignore(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT in a job process: the worker's business (it lets jobs finish, then ends this
    process). A handler, not SIG_IGN, which every process a job starts would inherit."""


def _in_forked_child() -> None:
    """A process a job forks (``multiprocessing``'s fork, ``os.fork``) is the job's, not ours: it does
    not hold the worker's lock (a dead worker would count as alive while it lives) and takes stop
    signals as any process does (a pool's ``terminate()`` must work)."""
    global _held
    if _held >= 0:
        os.close(_held)
        _held = -1
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is _ignore:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


def _end_tree() -> None:
    """End this process and every process its jobs started, in whatever group or session (orphans
    come to this process, a subreaper): those first, then this process's own group, itself in it."""
    end_children()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """End this process and what its job started the moment its worker dies (killed, even by
    SIGKILL), before anyone can take that job and run it again: a thread waits on the worker's
    pidfd. Without pidfds (before Linux 5.3), the kernel kills this process alone at that moment."""
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0 and os.getppid() == parent:  # the pidfd is our worker's, alive when it was opened

        def watch() -> None:
            select.select([pidfd], [], [])
            _end_tree()

        threading.Thread(target=watch, name="litemultistep-parent", daemon=True).start()
        return
    if pidfd >= 0:
        os._exit(BROKEN)  # the worker died before we looked
    if sys.platform.startswith("linux"):
        try:
            libc().prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the worker dies
        except (OSError, AttributeError):
            pass
        else:
            if os.getppid() != parent:  # it died before prctl took effect
                os._exit(BROKEN)
            return

    def watch_ppid() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        _end_tree()

    threading.Thread(target=watch_ppid, daemon=True).start()


def _environ_data() -> dict[Any, Any]:
    # os.environ's own dict of bytes compares in well under a microsecond; comparing the mapping
    # itself decodes every variable (tens of microseconds a job)
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


class _Baseline:
    """What a job may change in its process and the child puts back after it: directory, environment,
    signal handlers, ``sys.argv``."""

    def __init__(self) -> None:
        self.argv = list(sys.argv)
        self.cwd = os.getcwd()
        self.env = dict(os.environ)
        self.env_data = _environ_data()
        # _signal.getsignal: the signal module's wrapper converts to enums, 10x slower per job
        self.handlers = {int(s): _signal.getsignal(s) for s in _SIGNALS}

    def restore(self) -> None:
        if sys.argv != self.argv:
            sys.argv[:] = self.argv
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError:  # the job removed the directory it was in, or ours
            os.chdir(self.cwd)
        data = getattr(os.environ, "_data", None)
        if (data if isinstance(data, dict) else dict(os.environ)) != self.env_data:
            os.environ.clear()
            os.environ.update(self.env)
        for s, handler in self.handlers.items():
            if _signal.getsignal(s) != handler:
                signal.signal(s, handler)


def _fast_logging(level: int) -> None:
    """The worker's log format, at a fraction of the cost per line: a job process logs two lines a
    job, so the caller's file and line, thread and process names are not looked up for each."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(message)s"))
    root = logging.getLogger("litemultistep")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _maybe_crash(path: str, point: str, job: ClaimedJob, parent: int) -> None:
    try:
        with open(path) as f:
            want_point, want_func, *whom = f.readline().split()
    except (FileNotFoundError, ValueError):
        return
    if want_point != point or want_func != job.func:
        return
    try:
        os.rename(path, path + ".fired")  # exactly one process wins the rename: the crash fires once
    except FileNotFoundError:
        return
    if whom == ["worker"]:
        log.warning("crash hook: killing the worker at %s of job %d (%s)", point, job.id, job.func)
        os.kill(parent, signal.SIGKILL)
    else:
        log.warning("crash hook: the job process dies at %s of job %d (%s)", point, job.id, job.func)
    os._exit(BROKEN)


def serve(setup: dict[str, Any]) -> int:
    """Run batches from the worker until it closes the pipe; the child's whole life."""
    from .engine import ClaimedJob, Outcome
    from .jobs import allowed_or_why
    from .runner import Result, execute

    parent = setup["parent"]
    _retitle(f"litemultistep job process (worker {parent})")
    _die_with_parent(parent)
    # Stop signals are the worker's business: it lets jobs finish, then ends this process itself.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    os.register_at_fork(after_in_child=_in_forked_child)
    _fast_logging(setup["log_level"])
    for p in reversed(setup["paths"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    inbox = Connection(setup["inbox"], writable=False)
    outbox = Connection(setup["outbox"], readable=False)
    page = mmap.mmap(setup["page"], SLOT_SIZE)
    os.close(setup["page"])
    db: str = setup["db"]  # opened only if a job uses it (current_task): most never do
    pipes = [(fd, os.fstat(fd)) for fd in (setup["inbox"], setup["outbox"])]

    def pipes_intact() -> bool:
        try:
            return all(os.path.samestat(os.fstat(fd), st) for fd, st in pipes)
        except OSError:
            return False

    if setup.get("fence"):
        threading.Thread(target=_watch_fence, args=(page,), name="litemultistep-fence", daemon=True).start()
    # Orphans of what a job started (a daemon in a session of its own) become our children, so that
    # _leftovers finds them; once this process goes they pass to the worker, which ends them.
    become_subreaper()
    crash_file = os.environ.get(CRASH_FILE_ENV)
    baseline = _Baseline()
    threads = threading.active_count()
    retire: list[str] | None = None  # [the callable, what its job left running]
    while True:
        try:
            message = json.loads(inbox.recv_bytes())
        except (EOFError, OSError):
            return 0
        if "lock" in message:
            _hold(message["lock"])
        window = message["window"]
        results: list[list[Any]] = []
        ok: list[int] = []
        values: list[str | None] = []
        gave_back: list[int] = []
        began = time.monotonic()
        slow = False
        jobs = [ClaimedJob(*fields) for fields in message["jobs"]]
        for i, job in enumerate(jobs):
            if i and (slow or retire or time.monotonic() - began > window):
                gave_back = [j.id for j in jobs[i:]]
                break
            if crash_file:
                _maybe_crash(crash_file, "after-claim", job, parent)
            PROGRESS.pack_into(page, PROGRESS_AT, job.id, -1.0, -1.0)
            stamped = monotonic()
            SLOT.pack_into(page, 0, stamped, job.id)
            refusal = allowed_or_why(job.func, setup["allow_modules"]) if setup["allow_modules"] else None
            if refusal is None:
                result = execute(db, job, catch_all=True, timeout=job.timeout, reporter=_Reporter(page, job.id))
            else:
                result = Result(Outcome(job, False, "litemultistep.JobNotAllowed", refusal, retryable=False))
            SLOT.pack_into(page, 0, 0.0, -job.id)
            # timed from the stamp the worker reads, and after the page says it ended: a job the
            # worker saw running past SLOW_JOB (it then gave the rest back) is slow here too, always
            ran = monotonic() - stamped
            if not pipes_intact():
                os._exit(BROKEN)  # this job closed our pipes: the worker blames it, as the page says
            baseline.restore()
            if crash_file:
                _maybe_crash(crash_file, "after-run", job, parent)
            o = result.outcome
            if o.ok and not job.is_finalizer:
                ok.append(job.id)
                values.append(o.result)
            else:
                message = o.message
                if o.exc_type == NOT_IMPORTABLE:
                    message += (f" (the worker imports jobs from {os.getcwd()}, where it was started, and "
                                f"from --path: {', '.join(setup['paths'][1:]) or 'none given'})")
                results.append([job.id, o.ok, o.exc_type, message, o.traceback, o.duration, o.retryable,
                                o.retry_delay])
            # a slow job ends the batch (the rest go to idle processes); so does a failure, so that
            # its record is sent at once and cannot be lost with a later job that crashes this process
            slow = ran > SLOW_JOB or o.duration > SLOW_JOB or not o.ok
            left = _leftovers(threads, ran)
            if left is not None:
                # What it left could harm the next job here (a thread that calls os._exit, a child
                # holding a file): this process ends after this batch, and the worker ends what it left.
                retire = [job.func, f"job {job.id} of {job.task_id} ({job.func}) left {left} running"]
        # the whole time per job, this process's own part included: it is what a claim must plan for
        ok_seconds = (time.monotonic() - began) * len(ok) / max(1, len(results) + len(ok))
        try:
            # a batch comes from one task: all of its jobs keep their results, or none does
            outbox.send_bytes(json.dumps({"ok": ok, "seconds": ok_seconds, "results": results, "gave_back": gave_back,
                                          "values": values if jobs[0].keep else None, "retire": retire}).encode())
        except OSError:
            os._exit(BROKEN)  # our pipe is gone: the worker sees us die and starts another
        if retire:
            return RETIRED


def main() -> None:
    """Entry point of a job process, started by a worker only, with its setup as JSON in the environment."""
    code = serve(json.loads(os.environ.pop(SETUP_ENV)))  # not left for the jobs' own children
    if sys.stdout is not None:
        sys.stdout.flush()
    os._exit(code)  # no interpreter teardown: a job's threads or atexit hooks cannot hold us

