"""The worker: one process that owns the database connection, the worker lock and the heartbeat, and
``-c N`` job processes (``jobproc.py``) that run user code, one job at a time each.

No user code ever runs in the worker process itself, so nothing a job does (hang, hold the GIL,
crash, close descriptors, ignore signals) can stop the worker from keeping its liveness, recording
results, enforcing time limits or answering a stop signal. The worker's loop:

* records the results its job processes sent, puts back the jobs they gave back, and claims a batch
  for each idle job process, all in one transaction (group commit); a batch holds what the task's
  mean job duration says will run within a few milliseconds, so no job waits in one process while
  another process idles;
* kills a job process whose job ran past its time limit (the job fails with ``JobTimeout``) and
  replaces any that died (the job's crash is counted; at the crash limit it fails with
  ``WorkerCrashed``);
* every second, whether busy or not, gives back the jobs of dead workers and queues due retries;
* sleeps in one ``select`` on its job processes' pipes, the database's waiter (an inotify watch of
  the ``-wal`` file on SQLite, ``LISTEN`` on PostgreSQL) and a signal pipe, so it wakes on exactly
  the events that matter.

Its state is a few small objects: the results and returns in hand (:class:`Pending`), when each timed
duty is due (:class:`Schedule`), and its job processes (:class:`~litemultistep.jobproc.JobProcess`, the
worker's end of their pipes).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from . import config, engine, rules
from ._wakeup import become_subreaper, end_children
from .config import WorkerOptions
from .db import Database, LivenessLock, boottime, monotonic
from .engine import ClaimedJob, Done, Outcome
from .errors import DatabaseUnusable, JobTimeout, StorageError
from .jobproc import BROKEN, RETIRED, SLOW_JOB, JobProcess, read_progress, set_fence
from .runner import retry_of

log = logging.getLogger(__name__)

#: environment variable naming a process whose death stops the worker (set by ``Workers``)
PARENT_PID_ENV = "LITEMULTISTEP_PARENT_PID"
TIDY_EVERY = 1.0
#: a job process gives back the rest of a batch once it has run this long (a claim plans for
#: engine.CLAIM_WINDOW), or right after any job slower than jobproc.SLOW_JOB
GIVE_BACK_AFTER = 2 * rules.CLAIM_WINDOW
#: seconds between the summary lines of what a worker's jobs did (at INFO)
SUMMARY_EVERY = 10.0
#: a worker with --burst waits for automatic retries due within this many seconds, not later ones
BURST_RETRY_HORIZON = 60.0


def _how_it_died(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == BROKEN:
        return "its pipes to the worker were closed (by a job that closed file descriptors?)"
    if code == RETIRED:
        return "a job left threads or processes behind"
    return f"exit code {code}"


@dataclass
class Pending:
    """What the worker has in hand and must write: results of its job processes and jobs to return.
    Written in the next claim's transaction (group commit), and kept, on a failed write, for the one
    after."""

    outcomes: list[Outcome] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    #: held jobs never started (their claim is undone)
    give_back: list[int] = field(default_factory=list)
    #: started jobs whose result is lost (they run again)
    put_back: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.done or self.give_back or self.put_back)

    def take(self) -> Pending:
        """Everything in hand, leaving this empty."""
        taken = Pending(self.outcomes, self.done, self.give_back, self.put_back)
        self.outcomes, self.done, self.give_back, self.put_back = [], [], [], []
        return taken

    def restore(self, taken: Pending) -> None:
        """Put back what :meth:`take` took (its write failed), before what came in since."""
        self.outcomes[:0] = taken.outcomes
        self.done[:0] = taken.done
        self.give_back[:0] = taken.give_back
        self.put_back[:0] = taken.put_back


class RunTally:
    """What the job processes ran since the last summary line, by task: the worker logs one line every
    :data:`SUMMARY_EVERY` seconds at INFO (a line a job, at DEBUG, would cost more than the work of
    short jobs; every failure has a WARNING line of its own)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        #: runs whose process died: put back (not failures), until the crash limit
        self.crashed: dict[str, int] = {}
        self.since = monotonic()

    def ran(self, task_id: str, n: int, failed: bool = False, crashed: bool = False) -> None:
        counts = self.crashed if crashed else self.failed if failed else self.done
        counts[task_id] = counts.get(task_id, 0) + n

    def say(self, worker_id: int) -> None:
        if self.done or self.failed or self.crashed:
            tasks = sorted(set(self.done) | set(self.failed) | set(self.crashed), key=lambda t: -self.done.get(t, 0))
            parts = [f"{t}: {self.done.get(t, 0):,} done" + "".join(
                f", {counts[t]:,} {word}" for counts, word in ((self.failed, "failed"), (self.crashed, "crashed"))
                if t in counts) for t in tasks[:5]]
            more = f" and {len(tasks) - 5} more task(s)" if len(tasks) > 5 else ""
            ran = sum(self.done.values()) + sum(self.failed.values()) + sum(self.crashed.values())
            log.info("worker %d ran %s job(s) in %.0f s: %s%s", worker_id, f"{ran:,}", monotonic() - self.since,
                     "; ".join(parts), more)
        self.done, self.failed, self.crashed, self.since = {}, {}, {}, monotonic()


@dataclass
class Schedule:
    """When each timed duty of the worker is next due, on the monotonic clock of :meth:`Worker.step`."""

    heartbeat: float = 0.0
    maintenance: float = 0.0
    tidy: float = 0.0
    #: the next automatic retry (it is queued then, not a second later)
    promote: float = float("inf")
    #: a graceful stop ends running jobs then
    stop: float = float("inf")
    #: the next summary line of what ran
    summary: float = 0.0
    #: after a failed write: the next one is tried then, and the back-off that led there
    write: float = 0.0
    backoff: float = 0.0

    def next_duty(self) -> float:
        return min(self.heartbeat, self.maintenance, self.promote, self.stop)


class Worker:
    """A worker: registers itself, runs ``concurrency`` job processes, and serves until stopped.

    :meth:`run` is the loop: :meth:`step`, then :meth:`wait` for the next event. :meth:`step` is one
    round of decisions (record, claim, hand out, enforce limits, heartbeat, recover) taken at the
    time it is given, so tests drive a real worker round by round, with a clock of their own,
    without sleeping.
    """

    def __init__(self, db: Database, options: WorkerOptions, procs: list[JobProcess] | None = None) -> None:
        """``procs``: its job processes, if started already (else :meth:`start` starts them)."""
        self.db = db
        self.options = options
        self.queues = options.queues or None
        self.signals = 0
        self.stopping = False
        self.forced = False
        self.pending = Pending()
        self.schedule = Schedule()
        #: finalizers handed to this worker while every job process was busy
        self.handed: deque[ClaimedJob] = deque()
        self.procs: list[JobProcess] = list(procs or [])
        #: what the job processes ran since the last summary line
        self.tally = RunTally()
        #: the callables whose jobs left threads or processes behind (logged once each)
        self._leaky: set[str] = set()
        #: the job process whose answer is looked for first next round
        self._turn = 0
        self._waiter = db.waiter(options.poll, brief=options.burst)
        #: a write failed: it may have committed all the same (a connection lost during the commit),
        #: so the next claim tells the database which jobs we really hold
        self._unsure = False
        self._restarts: dict[int, float] = {}
        self._signal_fd: int | None = None
        #: whether this process inherits what its jobs leave behind (set by run(): a worker stepped
        #: inside another program never ends that program's children)
        self._subreaper = False
        #: the time of the round in progress (monotonic seconds)
        self._now = monotonic()
        #: on a backend where a live worker can be taken for dead (PostgreSQL: a lease on the server's
        #: clock), how long after a confirmed heartbeat its running jobs must stop if none came since
        self._fence_after = db.fence_after(options.lease)
        #: when, on CLOCK_BOOTTIME, the running jobs stop unless the lease is confirmed again
        self._fence_at: float | None = None
        #: jobs this worker stopped because it could not confirm its lease
        self._fenced: set[int] = set()
        self.worker_id, self._lock = self._register()
        log.info("worker %d (pid %d): %d job process(es) serving %s on %s", self.worker_id, os.getpid(),
                 options.concurrency, " ".join(options.queues) or "all queues", db.path)

    # -- membership ---------------------------------------------------------------------------------

    def _register(self) -> tuple[int, LivenessLock]:
        backoff = 0.5
        while True:
            try:
                sent = boottime()
                registered = self.db.register_worker("process", self.queues, self.options.lease,
                                                     self.options.concurrency)
                self._confirmed(sent)
                return registered
            except StorageError as e:  # a full disk or a long lock is transient: wait, do not exit
                log.error("worker (pid %d) cannot register: %s; trying again in %.1f s", os.getpid(), e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self.db.tighten()
                try:
                    self.db.checkpoint()  # see step(): no write may grow the -wal before this
                except StorageError:
                    pass

    def _rejoin(self) -> None:
        """Our row is gone: we were taken for dead and our jobs were given to others. Stop running
        them at once, then join again under a new id."""
        log.error("worker %d was taken for dead (its row is gone); stopping its running jobs, which run "
                  "elsewhere now, and joining again under a new id", self.worker_id)
        taken = self.pending.take()
        lost = set(self._held()) | self._fenced | set(taken.give_back) | set(taken.put_back)
        for proc in self.procs:
            if proc.busy:
                proc.kill()
                proc.batch = []
        self.handed.clear()
        self._fenced.clear()
        self._end_strays()
        self._lock.release()
        self.worker_id, self._lock = self._register()
        try:
            # Whoever took our jobs back counted each as a crash of its job; but no process running
            # them died: this worker lives, and stopped them itself, or never started them.
            engine.forgive_crashes(self.db, sorted(lost))
        except StorageError as e:
            log.warning("worker %d: could not uncount the crashes of the jobs it held: %s", self.worker_id, e)

    def _confirmed(self, sent: float) -> None:
        """The database confirmed our lease in a heartbeat sent at ``sent`` (CLOCK_BOOTTIME): running
        jobs may go on until ``sent + fence_after``; nothing was taken from us meanwhile."""
        self._fenced.clear()
        if self._fence_after is None:
            return
        self._fence_at = sent + self._fence_after
        for proc in self.procs:
            set_fence(proc.page, self._fence_at)

    def _fence(self) -> None:
        """We could not confirm our lease in time: others may take our jobs once it runs out, so stop
        every one we run now (and what it started), and give them back once we can write again."""
        stopped = 0
        for proc in self.procs:
            if proc.busy:
                stopped += len(proc.batch)
                self._stop_fenced(proc)
        log.error("worker %d could not confirm its lease with %s for %.1f s; it stopped its %d running job(s) "
                  "so that none runs twice: they run again once it reconnects, or elsewhere once its lease "
                  "(%g s) runs out", self.worker_id, self.db.path, self._fence_after or 0.0, stopped,
                  self.options.lease)

    def _stop_fenced(self, proc: JobProcess) -> None:
        """Stop a job process's batch for the fence: its jobs go back (not as crashes) when we can write."""
        job, _ = proc.running()
        self._fenced.update(j.id for j in proc.batch)
        proc.kill()
        self._return_rest(proc, job)
        if job is not None:
            self.pending.put_back.append(job.id)
        self._replace(proc, "stopped: its worker could not confirm its lease")

    # -- signals ------------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.request_stop(f"got {name}")
        elif self.signals == 2:
            log.warning("worker %d: got %s again; stopping running jobs now (they go back to their queues)",
                        self.worker_id, name)

    def request_stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.schedule.stop = monotonic() + self.options.shutdown_timeout
        busy = sum(p.busy for p in self.procs)
        if busy:
            log.info("worker %d: %s; letting %d running job(s) finish (at most %g s), then exiting",
                     self.worker_id, why, busy, self.options.shutdown_timeout)
        else:
            log.info("worker %d: %s; exiting", self.worker_id, why)

    # -- the loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the job processes (once)."""
        if not self.procs:
            self.procs = [JobProcess(self.options, i, self._fence_at) for i in range(self.options.concurrency)]

    def run(self, keep_handlers: bool = False, signals: Sequence[int] = ()) -> int:
        """Serve until stopped; returns the exit status (0: every job that started finished).

        ``keep_handlers``: leave the worker's SIGTERM and SIGINT handlers in place when it returns, for
        a process that exits next (``litemultistep worker``): a signal that comes late, in a storm of
        them, is then counted like the others rather than killing the process on its way out.
        ``signals``: a list the process's own handlers filled while the worker started: each counts as
        if it came now (read once this worker's handlers are in place)."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        self._signal_fd = rfd
        old_wakeup = signal.set_wakeup_fd(wfd)
        old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        for signum in list(signals):
            self.on_signal(signum, None)
        self._subreaper = become_subreaper()
        try:
            self.start()
            while self.step():
                self.wait()
        finally:
            # Our handler stays in place until the worker has left: a signal during the shutdown
            # only counts, it never kills the worker half-way through giving its jobs back.
            self.shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in old_handlers.items():
                if not keep_handlers:
                    signal.signal(s, handler)
            self._signal_fd = None
            os.close(rfd)
            os.close(wfd)
        return 1 if self.forced else 0

    def step(self, now: float | None = None) -> bool:
        """One round at ``now`` (monotonic seconds; default: the clock): take in what the job
        processes sent, enforce time limits, write results and claim work, do the timed duties.
        Never waits. False once the worker is done (stopped, or ``--burst`` found nothing left)."""
        self.start()
        now = self._now = monotonic() if now is None else now
        parent = self.options.parent_pid
        if parent is not None and os.getppid() != parent:
            self.request_stop(f"its parent process {parent} is gone")
        if self.signals >= 2 or (self.stopping and now >= self.schedule.stop and self._busy()):
            self._force_stop()
            return False
        self._collect()
        if self._fence_at is not None and self._busy() and boottime() >= self._fence_at:
            self._fence()
        self._enforce_time_limits(now)
        self._release_rest(now)
        if now >= self.schedule.write:
            try:
                if self.schedule.backoff:
                    # After a full disk, copy the -wal into the database and cut it back before any
                    # new write: otherwise the -wal grows into the space just freed, and stays stuck.
                    self.db.checkpoint()
                self._write(now)
                self.schedule.backoff = 0.0
            except StorageError as e:
                self._storage_trouble(e)
        if self.stopping and not self._busy() and not self.pending:
            return False
        try:
            burst_done = self._burst_done()
        except StorageError as e:
            burst_done = False
            self._storage_trouble(e)
        if burst_done:
            self.tally.say(self.worker_id)
            log.info("worker %d: nothing left to run, exiting (--burst)", self.worker_id)
            return False
        if now >= self.schedule.summary:
            self.schedule.summary = now + SUMMARY_EVERY
            self.tally.say(self.worker_id)
        return True

    def _busy(self) -> bool:
        return any(p.busy for p in self.procs)

    def _write(self, now: float) -> None:
        due = self.schedule
        if now >= due.heartbeat:
            sent = boottime()
            if self.db.heartbeat(self.worker_id, self.options.lease, self._lock):
                self._confirmed(sent)
            else:
                self._rejoin()
            due.heartbeat = now + rules.heartbeat_every(self.options.lease)  # not after a failure: try again
            self._store_reports()
        if now >= due.maintenance:  # busy or not: dead workers' jobs come back within a second
            due.maintenance = now + self.db.maintenance_every()
            if not self.db.still_there():
                raise DatabaseUnusable(f"{self.db.path} was deleted or replaced while this worker served it (or "
                                       "its -wal was deleted); stopping (start a worker again)")
            engine.recover(self.db, self.worker_id, self.options.lease, self.options.max_crashes)
            engine.prune_history(self.db)
            self._stop_what_is_no_longer_ours()
            self._end_strays()
            due.promote = 0.0
        if now >= due.promote:
            engine.promote_scheduled(self.db)
            self._watch_retries()
        idle = [] if self.stopping else [p for p in self.procs if not p.busy]
        while idle and self.handed:
            self._hand(idle.pop(), [self.handed.popleft()])
        wants = len(idle)
        if not self.pending and not self._unsure:
            if not wants:
                return
            if not engine.has_claimable(self.db, self.queues):
                if not self._busy() and now >= due.tidy:
                    # nothing to do: give back space and cut the -wal back, at most once a second (a
                    # checkpoint that meets a long reader holds the write lock for a moment each time)
                    due.tidy = now + TIDY_EVERY
                    self.db.tidy(idle=True)
                return
        taken = self.pending.take()
        try:
            batches = engine.claim(self.db, self.worker_id, outcomes=taken.outcomes, done=taken.done,
                                   give_back=taken.give_back, put_back=taken.put_back, wants=wants,
                                   max_batch=self.options.batch, queues=self.queues,
                                   max_crashes=self.options.max_crashes,
                                   held=self._held() if self._unsure else None)
        except BaseException:
            self.pending.restore(taken)  # kept in memory, and written once a write succeeds again
            raise
        self._unsure = False
        if any(not o.ok for o in taken.outcomes):
            self._watch_retries()
        for batch in batches:
            if idle:
                self._hand(idle.pop(), batch)
            else:
                self.handed.extend(batch)  # a finalizer handed to us while every process is busy

    def _stop_what_is_no_longer_ours(self) -> None:
        """Stop at once the running jobs the database no longer gives to this worker: their task was
        nuked (or they were taken back). What they were doing must not go on."""
        running = {}
        for proc in self.procs:
            job, start = proc.running() if proc.busy else (None, 0.0)
            if job is not None and start:
                running[job.id] = (proc, job)
        still = engine.held(self.db, self.worker_id, [*running, *(j.id for j in self.handed)])
        self.handed = deque(j for j in self.handed if j.id in still)
        for job_id, (proc, job) in running.items():
            if job_id not in still:
                log.warning("worker %d: %s %d of %s is no longer this worker's (its task was nuked?); stopped it",
                            self.worker_id, "finalizer" if job.is_finalizer else "job", job.id, job.task_id)
                self._return_rest(proc, job)
                self._replace(proc, "its job's task was nuked", throttle=False)

    def _held(self) -> list[int]:
        """The ids of the jobs this worker holds: those its job processes run, and finalizers in hand."""
        return [j.id for p in self.procs for j in p.batch] + [j.id for j in self.handed]

    def _store_reports(self) -> None:
        """Store what running jobs reported of their progress since the last heartbeat (one write for
        all of them, however often they called litemultistep.report)."""
        reports = []
        for proc in self.procs:
            if proc.busy:
                got = read_progress(proc.page)
                if got is not None and got != proc.reported and any(j.id == got[0] for j in proc.batch):
                    reports.append(got)
                    proc.reported = got
        engine.report_progress(self.db, self.worker_id, reports)

    def _watch_retries(self) -> None:
        due = engine.next_scheduled(self.db)
        self.schedule.promote = float("inf") if due is None else self._now + max(0.0, due - time.time())

    def _hand(self, proc: JobProcess, batch: list[ClaimedJob]) -> None:
        default = self.options.timeout
        if default is not None:
            batch = [j if j.timeout is not None else j._replace(timeout=default) for j in batch]
        if not proc.send(batch, GIVE_BACK_AFTER, self._lock.shared):
            self._crashed(proc, "its pipe is closed")

    def _collect(self) -> None:
        """Take in what one job process sent, and notice the ones that died.

        One answer a round, the processes taken in turn: each answer is then written, and the
        process given its next batch, while the others still run theirs. Taking every answer at
        once would keep the processes in step: all waiting while the worker writes for all, the
        worker waiting while all run (a fifth fewer short jobs a second on two cores)."""
        procs = list(self.procs)  # a process that dies while stopping leaves the list
        n = len(procs)
        took = False
        for k in range(n):
            index = (self._turn + k) % n
            proc = procs[index]
            if not proc.busy:
                if proc.proc.poll() is not None:
                    self._replace(proc, _how_it_died(proc.proc.returncode))
                continue
            if took:
                continue
            try:
                if not proc.from_child.poll():
                    if proc.proc.poll() is not None:
                        raise EOFError
                    continue
                message = json.loads(proc.from_child.recv_bytes())
            except (EOFError, OSError, ValueError):
                proc.proc.wait()
                self._crashed(proc, _how_it_died(proc.proc.returncode))
                continue
            if message["ok"]:
                first = proc.batch[0]
                self.pending.done.append(Done(first.task_pk, first.task_id, message["ok"], message["seconds"],
                                      message.get("values")))
                self.tally.ran(first.task_id, len(message["ok"]))
            if message["results"]:
                by_id = {j.id: j for j in proc.batch}
                for job_id, ok, exc_type, text, tb, duration, retryable, delay in message["results"]:
                    self.pending.outcomes.append(Outcome(by_id[job_id], ok, exc_type, text, tb, duration,
                                                         retryable=retryable, retry_delay=delay))
                    self.tally.ran(by_id[job_id].task_id, 1, failed=not ok)
            held = {j.id for j in proc.batch}  # not those _release_rest gave back already
            self.pending.give_back += [job_id for job_id in message["gave_back"] if job_id in held]
            proc.batch = []
            took = True
            self._turn = index + 1
            if message.get("retire"):  # its job left threads or processes: they end with it
                func, what = message["retire"]
                # once a callable, at WARNING: a library that leaves a thread in every job would
                # otherwise fill the log (the job process is still replaced every time)
                level = logging.DEBUG if func in self._leaky else logging.WARNING
                self._leaky.add(func)
                log.log(level, "worker %d: %s; its job process is replaced after it, so that nothing it left "
                        "touches another job", self.worker_id, what)
                self._replace(proc, what, throttle=False)

    def _return_rest(self, proc: JobProcess, job: ClaimedJob | None) -> None:
        """Settle a batch cut short (its process killed or dead) at ``job``, the one that ran last
        (None: none had started). The jobs before it succeeded: a job process goes on to the next job
        of a batch only after one that succeeded, quickly, leaving nothing running. They are recorded
        as done, unless their task keeps results, whose values died with the process: those run
        again. The jobs after it never started: they go back."""
        started = proc.running()[1]
        batch, proc.batch = proc.batch, []
        at = batch.index(job) if job is not None else -1
        ran = batch[:max(at, 0)]
        if ran and not ran[0].keep:
            seconds = max(0.0, (started or monotonic()) - proc.sent)
            self.pending.done.append(Done(ran[0].task_pk, ran[0].task_id, [j.id for j in ran], seconds))
            self.tally.ran(ran[0].task_id, len(ran))
        else:
            self.pending.put_back += [j.id for j in ran]
        self.pending.give_back += [j.id for j in batch[at + 1:]]

    def _crashed(self, proc: JobProcess, how: str) -> None:
        if proc.fenced:  # it stopped its job itself: we had not confirmed our lease in time
            log.error("worker %d: job process %d stopped its running job: the worker had not confirmed its "
                      "lease in time (was it paused?)", self.worker_id, proc.slot)
            self._stop_fenced(proc)
            return
        job, _ = proc.running()
        self._return_rest(proc, job)
        if job is not None:
            # a WARNING: the job goes back to its queue; at the crash limit its failure is an ERROR
            log.warning("worker %d: the process running job %d of %s died (%s)", self.worker_id, job.id,
                        job.task_id, how)
            self.pending.outcomes.append(Outcome(job, False, "litemultistep.WorkerCrashed", how, crashed=True))
            self.tally.ran(job.task_id, 1, crashed=True)
        self._replace(proc, how)

    def _enforce_time_limits(self, now: float) -> None:
        for proc in self.procs:
            if not proc.limited or not proc.busy:
                continue
            job, start = proc.running()
            if job is None or not start or job.timeout is None or now < start + job.timeout:
                continue
            proc.kill()
            # a WARNING: the failure's own line follows, an ERROR only once the job is out of retries
            log.warning("worker %d: job %d of %s ran longer than its %g s limit; its process was killed",
                        self.worker_id, job.id, job.task_id, job.timeout)
            self.pending.outcomes.append(Outcome(job, False, "litemultistep.JobTimeout",
                                         f"ran longer than its {job.timeout:g} s limit; its process was killed",
                                         "", now - start, retryable=retry_of(JobTimeout, job.retry_on)[0]))
            self.tally.ran(job.task_id, 1, failed=True)
            self._return_rest(proc, job)
            self._replace(proc, "killed at its job's time limit", throttle=False)

    def _release_rest(self, now: float) -> None:
        """Give back at once the jobs queued behind a job that turned out slow, for an idle process
        here or another worker, instead of holding them until it ends. Its process would give them
        back once the job ends (a job past SLOW_JOB ends its batch, timed there from the stamp read
        here), so they leave its batch now, and its answer's list of them is not sent twice."""
        for proc in self.procs:
            if len(proc.batch) < 2:
                continue
            job, start = proc.running()
            if job is None or not start or now - start <= SLOW_JOB:
                continue
            at = proc.batch.index(job)
            rest = proc.batch[at + 1:]
            if rest:
                proc.batch = proc.batch[:at + 1]
                self.pending.give_back += [j.id for j in rest]
                log.debug("worker %d: job %d of %s is slow; %d job(s) queued behind it go back for others",
                          self.worker_id, job.id, job.task_id, len(rest))

    def _replace(self, old: JobProcess, why: str, throttle: bool = True) -> None:
        if old not in self.procs:
            return  # replaced already, earlier this round (it retired, then was seen gone)
        old.end()
        self._end_strays()
        if self.stopping:
            self.procs.remove(old)
            return
        # a job process that dies at once, again and again (a broken install), is restarted slowly
        last = self._restarts.get(old.slot, 0.0)
        pause = 1.0 if throttle and monotonic() - last < 1.0 else 0.0
        self._restarts[old.slot] = monotonic() + pause
        if pause:
            time.sleep(pause)
        log.info("worker %d: job process %d (pid %d) replaced: %s", self.worker_id, old.slot, old.proc.pid, why)
        self.procs[self.procs.index(old)] = JobProcess(self.options, old.slot, self._fence_at)

    def _end_strays(self) -> None:
        """End the processes this worker inherited: what the jobs of job processes that are gone
        started and left behind, even in a session of their own (the worker is their subreaper),
        and, round after round, what those started."""
        if not self._subreaper:
            return
        ended = end_children(keep=frozenset(p.proc.pid for p in self.procs))
        if ended:
            log.warning("worker %d: ended %d process(es) that jobs had started and left behind",
                        self.worker_id, ended)

    def _burst_done(self) -> bool:
        if not self.options.burst or self._busy() or self.pending or self.handed:
            return False
        if engine.has_claimable(self.db, self.queues):
            return False
        if engine.work_left(self.db, self.queues, retry_horizon=BURST_RETRY_HORIZON):
            return False
        later = engine.next_scheduled(self.db)
        if later is not None:
            log.warning("worker %d: automatic retries are scheduled later than %d s from now (the next at %s); "
                        "--burst does not wait for them: `litemultistep retry` runs them now",
                        self.worker_id, BURST_RETRY_HORIZON, time.strftime("%Y-%m-%d %H:%M:%S",
                                                                           time.localtime(later)))
        self.db.tidy(idle=True)
        return True

    def wait(self) -> None:
        """Sleep until a job process answers, the database changes (when we could use work), a signal
        comes, or the next timed duty."""
        now = monotonic()
        until = self.schedule.next_duty()
        for proc in self.procs:
            if len(proc.batch) > 1:  # look again when its running job would turn slow (_release_rest)
                job, start = proc.running()
                if job is not proc.batch[-1]:  # None: its first job has not started yet
                    until = min(until, (start if job is not None and start else now) + SLOW_JOB)
            if proc.busy and proc.limited:
                job, start = proc.running()
                if job is not None and start and job.timeout is not None:
                    until = min(until, start + job.timeout)
                else:
                    until = min(until, now + 0.05)  # between two jobs of a limited batch: look again soon
        fds = [p.fileno() for p in self.procs if p.busy]
        if self._signal_fd is not None:
            fds.append(self._signal_fd)
        idle = not self.stopping and any(not p.busy for p in self.procs)
        wal = self._waiter.fileno() if idle else None
        if wal is not None:
            fds.append(wal)
        elif idle:
            until = min(until, now + self.options.poll)
        if self.pending:
            until = now if now >= self.schedule.write else self.schedule.write
        timeout = max(0.0, until - now)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._signal_fd is not None and self._signal_fd in ready:
            try:
                while os.read(self._signal_fd, 512):
                    pass
            except BlockingIOError:
                pass
        if wal is not None and wal in ready or wal is None and idle:
            self._waiter.changed()

    def _storage_trouble(self, e: StorageError) -> None:
        # The results in hand stay in memory and are recorded once a write succeeds again.
        self._unsure = True
        self.db.tighten()
        self.schedule.backoff = min(max(self.schedule.backoff * 2, 0.25), 2.0)
        self.schedule.write = self._now + self.schedule.backoff
        log.error("worker %d: %s; trying again in %.2f s", self.worker_id, e, self.schedule.backoff)

    def _stop_running(self, proc: JobProcess) -> None:
        """Kill a busy job process and put every job it held back in its queue."""
        job, _ = proc.running()
        proc.kill()
        self._return_rest(proc, job)
        if job is not None:
            self.pending.put_back.append(job.id)
        log.warning("worker %d: stopped job %s%s; it goes back to its queue", self.worker_id,
                    job.id if job else "?", f" of {job.task_id}" if job else "")
        self.forced = True

    def _force_stop(self) -> None:
        for proc in self.procs:
            if proc.busy:
                self._stop_running(proc)
        self.forced = True

    def shutdown(self) -> None:
        """Record what is done, put back what is not, end the job processes, leave the worker table."""
        self.tally.say(self.worker_id)
        for proc in self.procs:
            if proc.busy:
                self._stop_running(proc)
            proc.to_child.close()  # the child sees the end of its input and exits
        for proc in self.procs:
            try:
                proc.proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.close()
        self._end_strays()
        self._waiter.close()
        try:
            for attempt in range(20):
                try:
                    if self.pending:
                        taken = self.pending.take()
                        try:
                            engine.claim(self.db, self.worker_id, outcomes=taken.outcomes, done=taken.done,
                                         give_back=taken.give_back, put_back=taken.put_back, wants=0,
                                         max_crashes=self.options.max_crashes)
                        except BaseException:
                            self.pending.restore(taken)
                            raise
                    engine.unregister_worker(self.db, self.worker_id)
                    break
                except StorageError as e:
                    log.error("worker %d: %s; trying again (%d/20)", self.worker_id, e, attempt + 1)
                    time.sleep(0.5)
        finally:
            self._lock.release()


def run_worker(options: WorkerOptions, procs: list[JobProcess] | None = None, signals: Sequence[int] = ()) -> int:
    """Run ``litemultistep worker``: one worker process with ``concurrency`` job processes.

    ``procs``: the job processes, started already (``litemultistep worker`` starts them before it
    imports the rest, so that they start up meanwhile); ended here if the worker cannot start.
    ``signals``: the SIGTERMs and SIGINTs that came while it started (see :meth:`Worker.run`)."""
    procs = list(procs or [])
    try:
        options.validate()
        config.validate()
        parent = os.environ.get(PARENT_PID_ENV)
        if parent and options.parent_pid is None:
            options.parent_pid = int(parent)
        db = Database.open(options.db)
        options.db = db.target
        try:
            worker = Worker(db, options, procs)
            procs = []  # the worker's now: it ends them when it stops
            return worker.run(keep_handlers=True, signals=signals)
        except Exception as e:
            error = db.driver_error(e)  # a raw error of the database's driver: a message, not a traceback
            if error is None:
                raise
            raise error from None
        finally:
            db.close()
    finally:
        for proc in procs:
            proc.end()

