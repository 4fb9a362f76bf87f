"""Worker processes: the loop that claims and runs jobs, its heartbeat, signals, and the supervisor
that keeps ``-c N`` of them running.

One worker process runs one job at a time. It records the results of short jobs and claims its next
jobs in one transaction (group commit), and records a long job's result, a failure or a finalizer's
result at once. Every decision is the engine's; this module only loops around it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from . import engine
from ._wakeup import WalWaiter
from .db import Database
from .engine import ClaimedJob, Outcome
from .errors import LiteMultiStepError, StorageError
from .runner import execute

log = logging.getLogger("litemultistep")

#: a job that ran this long has its result recorded at once instead of with the next claim
SHORT_JOB = 0.005


#: test hook: a file whose first line "POINT module:qualname" makes the first worker to reach POINT
#: for a job of that callable exit at once (POINT: after-claim, after-run); it fires once.
CRASH_FILE_ENV = "LITEMULTISTEP_CRASH_FILE"
CRASH_EXIT_CODE = 70


def _maybe_crash(path: str, point: str, job: ClaimedJob) -> None:
    try:
        with open(path) as f:
            want_point, _, want_func = f.readline().strip().partition(" ")
    except FileNotFoundError:
        return
    if want_point != point or want_func != job.func:
        return
    try:
        os.rename(path, path + ".fired")  # exactly one process wins the rename: the crash fires once
    except FileNotFoundError:
        return
    log.warning("crash hook: exiting at %s of job %d (%s)", point, job.id, job.func)
    os._exit(CRASH_EXIT_CODE)


class StopNow(BaseException):
    """Raised in the main thread by a second stop signal: abandon the running job (it runs again)."""


@dataclass
class WorkerOptions:
    """Everything ``litemultistep worker`` accepts."""

    db: str
    concurrency: int = 1
    queues: list[str] = field(default_factory=list)
    burst: bool = False
    paths: list[str] = field(default_factory=list)
    #: seconds a worker may go without a heartbeat before its jobs are taken back
    lease: float = 30.0
    #: most jobs claimed in one transaction while jobs are short
    batch: int = 32
    #: seconds between looks at the file while idle
    poll: float = 0.02
    #: only run callables from modules with these prefixes (empty: any)
    allow_modules: list[str] = field(default_factory=list)
    verbose: bool = False
    quiet: bool = False
    #: stop when this process (our parent) is gone
    parent_pid: int | None = None
    #: started by a supervisor: ignore SIGINT, whose Ctrl-C reaches the supervisor too
    supervised: bool = False

    def argv(self, concurrency: int, supervised: bool) -> list[str]:
        """The ``litemultistep worker`` command for these options, as a child of this process."""
        argv = [sys.executable, "-m", "litemultistep", "worker", self.db, "-c", str(concurrency),
                "--lease", str(self.lease), "--batch", str(self.batch), "--poll", str(self.poll),
                "--parent-pid", str(os.getpid())]
        if supervised:
            argv.append("--supervised")
        for q in self.queues:
            argv += ["--queues", q]
        for p in self.paths:
            argv += ["--path", p]
        for m in self.allow_modules:
            argv += ["--allow-module", m]
        if self.burst:
            argv.append("--burst")
        if self.verbose:
            argv.append("-v")
        if self.quiet:
            argv.append("-q")
        return argv


class WorkerProcess:
    """One worker: registers itself, then claims and runs jobs until told to stop.

    :meth:`run_once` runs one claim-and-run round, so tests can step a worker without sleeping.
    """

    def __init__(self, db: Database, options: WorkerOptions) -> None:
        self.db = db
        self.options = options
        self.queues = options.queues or None
        self.stopping = False
        self.limit = 1
        self.lost = threading.Event()
        self._outcomes: list[Outcome] = []
        self._held: deque[ClaimedJob] = deque()
        self._waiter: WalWaiter | None = None
        self._crash_file = os.environ.get(CRASH_FILE_ENV)
        self.worker_id, self._lock = self._register()
        log.info("worker %d (pid %d) serving %s on %s", self.worker_id, os.getpid(),
                 " ".join(options.queues) or "all queues", db.path)

    def _register(self) -> tuple[int, engine.WorkerLock]:
        backoff = 0.5
        while True:
            try:
                return engine.register_worker(self.db, "process", self.queues, self.options.lease)
            except StorageError as e:  # a full disk is transient: wait for space rather than exit
                log.error("worker (pid %d) cannot register: %s; trying again in %.1f s", os.getpid(), e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("worker %d: %s; finishing the current job, then exiting", self.worker_id, why)
        self.stopping = True

    def run_once(self) -> int:
        """Record finished work, claim a batch and run it; returns how many jobs ran."""
        if self.lost.is_set():
            self._rejoin()
        jobs = engine.claim(self.db, self.worker_id, self.limit, self.queues, self._outcomes)
        self._outcomes = []
        self._held.extend(jobs)
        ran = 0
        slow = False
        while self._held and not self.stopping:
            job = self._held.popleft()
            if not self._allowed(job):
                continue
            if self._crash_file:
                _maybe_crash(self._crash_file, "after-claim", job)
            result = execute(self.db, job)
            if self._crash_file:
                _maybe_crash(self._crash_file, "after-run", job)
            ran += 1
            self._outcomes.append(result.outcome)
            if result.duration > SHORT_JOB or result.error is not None or job.is_finalizer:
                slow = slow or result.duration > SHORT_JOB
                handed = engine.record(self.db, self.worker_id, self._outcomes)
                self._outcomes = []
                self._held.extendleft(reversed(handed))
        self.limit = 1 if slow else min(self.limit * 2, self.options.batch)
        return ran

    def _allowed(self, job: ClaimedJob) -> bool:
        allow = self.options.allow_modules
        module = job.func.partition(":")[0]
        if not allow or any(module == p or module.startswith(p + ".") for p in allow):
            return True
        self._outcomes.append(Outcome(job, False, "litemultistep.JobNotAllowed",
                                      f"module {module!r} is not allowed by --allow-module "
                                      f"({', '.join(allow)}); the worker did not run {job.func}", ""))
        return False

    def _rejoin(self) -> None:
        log.warning("worker %d was taken for dead (its lease ran out); its jobs went back to their queues "
                    "and it joins again under a new id", self.worker_id)
        self._held.clear()
        self._outcomes = []
        self._lock.release()
        self.worker_id, self._lock = self._register()
        self.lost.clear()

    def finish(self) -> None:
        """Record what is done, put back what is not, and leave the worker table."""
        if self._waiter is not None:
            self._waiter.close()
        try:
            if self._outcomes and not self.lost.is_set():
                engine.record(self.db, self.worker_id, self._outcomes)
            self._outcomes = []
            engine.unregister_worker(self.db, self.worker_id)
        finally:
            self._lock.release()

    def run(self) -> int:
        """The loop: work while there is work, look after other workers, wait cheaply when idle."""
        beat = threading.Thread(target=self._heartbeat, name="litemultistep-heartbeat", daemon=True)
        beat.start()
        next_maintenance = 0.0
        backoff = 0.0
        try:
            while not self.stopping:
                try:
                    now = time.monotonic()
                    if now >= next_maintenance:  # every second, busy or not: dead workers' jobs come back
                        engine.recover(self.db, self.worker_id)
                        engine.promote_scheduled(self.db)
                        next_maintenance = now + 1.0
                    if self.run_once():
                        backoff = 0.0
                        continue
                    if self._held or self._outcomes:
                        continue  # handed a finalizer, or results to record
                    if engine.has_claimable(self.db, self.queues):
                        continue
                    engine.tidy(self.db, idle=True)
                    if self.options.burst and not engine.work_left(self.db, self.queues):
                        log.info("worker %d: nothing left to run, exiting (--burst)", self.worker_id)
                        break
                    backoff = 0.0
                    self._idle(next_maintenance)
                except StorageError as e:
                    # The results in hand stay in memory and are recorded once a write succeeds again.
                    backoff = min(max(backoff * 2, 0.5), 10.0)
                    log.error("worker %d: %s; trying again in %.1f s", self.worker_id, e, backoff)
                    self._sleep(backoff)
        except StopNow:
            log.warning("worker %d: stopped at once; its unfinished jobs go back to their queues",
                        self.worker_id)
            self.finish()
            return 1
        self.finish()
        return 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))

    def _idle(self, until: float) -> None:
        """Wait until another process commits something claimable, or ``until`` comes."""
        if self._waiter is None:
            self._waiter = WalWaiter(self.db.path + "-wal", self.options.poll)
        while not self.stopping:
            left = until - time.monotonic()
            if left <= 0:
                return
            # at most a quarter second at a time, so a stop signal is seen promptly
            if self._waiter.wait(min(left, 0.25)) and engine.has_claimable(self.db, self.queues):
                return

    def _heartbeat(self) -> None:
        interval = max(self.options.lease / 4, 0.05)
        next_beat = time.monotonic() + interval
        parent = self.options.parent_pid
        while True:
            time.sleep(min(0.5, interval))
            if parent is not None and os.getppid() != parent:
                self.request_stop(f"its parent process {parent} is gone")
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + interval
            try:
                if not self.lost.is_set() and not engine.heartbeat(self.db, self.worker_id, self.options.lease):
                    self.lost.set()
            except LiteMultiStepError as e:
                log.warning("worker %d: heartbeat failed: %s", self.worker_id, e)


def _install_signals(on_first: Callable[[str], None], supervised: bool) -> None:
    count = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        if count == 1:
            on_first(f"got {signal.Signals(signum).name}")
        else:
            raise StopNow()

    signal.signal(signal.SIGTERM, handler)
    if supervised:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, handler)


def prepare_imports(paths: Sequence[str]) -> None:
    """Put ``paths`` and the current directory first on ``sys.path``, as users expect."""
    for p in reversed([os.getcwd(), *paths]):
        p = os.path.abspath(p)
        if p not in sys.path:
            sys.path.insert(0, p)


def run_worker(options: WorkerOptions) -> int:
    """Run ``litemultistep worker``: one worker here, or a supervisor of ``concurrency`` processes."""
    if options.concurrency > 1:
        return Supervisor(options).run()
    prepare_imports(options.paths)
    db = Database(options.db)
    worker = WorkerProcess(db, options)
    _install_signals(worker.request_stop, options.supervised)
    return worker.run()


class Supervisor:
    """Keeps ``concurrency`` worker processes running; forwards stop signals; stops with its parent."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.signals = 0
        self.done: set[int] = set()

    def _start(self, slot: int) -> None:
        self.children[slot] = subprocess.Popen(self.options.argv(1, supervised=True))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("supervisor: got %s; workers finish their current jobs, then exit",
                     signal.Signals(signum).name)
        self._forward()

    def _forward(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                try:
                    child.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        Database(self.options.db)  # a bad path fails here, once, not in every child
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.options.concurrency):
            self._start(slot)
        log.info("supervisor (pid %d): %d worker processes", os.getpid(), self.options.concurrency)
        parent = self.options.parent_pid
        status = 0
        last_restart = 0.0
        while len(self.done) < len(self.children):
            time.sleep(0.05)
            if parent is not None and os.getppid() != parent and self.signals == 0:
                log.info("supervisor: its parent process %d is gone; stopping the workers", parent)
                self.signals = 1
                self._forward()
            for slot, child in self.children.items():
                code = child.poll()
                if code is None or slot in self.done:
                    continue
                if code == 0 or self.signals:
                    self.done.add(slot)
                elif code == 2:
                    log.error("supervisor: worker pid %d cannot work (exit 2); stopping", child.pid)
                    status = 2
                    self.done.add(slot)
                    self.signals = max(self.signals, 1)
                    self._forward()
                else:
                    why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                    log.warning("supervisor: worker pid %d died (%s); starting another", child.pid, why)
                    time.sleep(max(0.0, last_restart + 0.5 - time.monotonic()))
                    last_restart = time.monotonic()
                    self._start(slot)
        return status
