"""The transactional core: every change of a job's or a task's state happens here, and only here.

Each function is one short write transaction (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL, rows are
locked as they are taken), or a few for bulk work; no transaction is ever open while user code runs.
The SQL is the same on both backends but for what a :class:`~litemultistep.db.Dialect` names. Counters
live in the task row and change in the same transaction as the job rows they count, so they are exact
and reading them is one row lookup; a transaction changes each task's row once, at its end, in key
order (:func:`_apply`), so no two transactions wait on each other in a cycle. After the task rows, last,
it adds what it completed and what failed to the current minute's row of ``throughput`` (the history
that ``/metrics`` and the throughput chart read); :func:`prune_history` folds old minutes into minute 0.

The rules a reader can check in this file:

* A job is claimed by marking it RUNNING with the worker's id, never by deleting it. A worker's write
  about a job only takes effect while the job is still RUNNING under that worker's id: once a dead or
  stalled worker's jobs are requeued, its late results are ignored.
* The completion that makes a task ready (finalizable, every normal job succeeded, none failed) moves
  it to FINALIZING and, in the same transaction, claims the first finalization job for the same
  worker. Each finalizer's completion claims the next one. At most one finalizer of a task is ever
  queued or running, so finalizers run one at a time, in order, and a crashed finalizer is requeued
  and resumed by whichever worker claims it.
* When the last finalizer succeeds the task row (and with it its queue) is deleted; a short summary
  stays in ``finished_task`` for the status view.
* A claim takes, from the least recently served task, only what will run within a few tens of
  milliseconds (:data:`CLAIM_WINDOW`, from the task's mean job duration; one job while it is
  unknown), so no worker sits on jobs another could start. On
  PostgreSQL concurrent claims skip each other's rows (``FOR UPDATE SKIP LOCKED``).
* A worker is alive while its OS lock (``flock``) is held; only when its lock file has vanished does
  its heartbeat on the host's monotonic clock decide. On PostgreSQL (``pg.py``) it is alive while its
  connection holds its advisory lock and its heartbeat, on the server's clock, is younger than its
  lease. A worker taken for dead claims nothing more. A dead worker's jobs go back to their queues,
  and so do jobs held under worker ids no longer registered; each such return counts as a crash of
  the job, and a job at the crash limit fails with ``WorkerCrashed`` instead of running again.
"""

from __future__ import annotations

import logging
import os
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import config, rules
from .db import CLAIMABLE, Connection, Database, JobKind, JobState, TaskState, now
from .errors import (
    FinalizationAlreadyBegun,
    JobNotFailed,
    LiteMultiStepError,
    NoSuchJob,
    NoSuchMultiStepTask,
    NotReadyForFinalization,
)
from .jobs import describe_call

log = logging.getLogger(__name__)

QUEUED, RUNNING, COMPLETED, FAILED, SCHEDULED, WAITING = (
    JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, JobState.FAILED, JobState.SCHEDULED,
    JobState.WAITING,
)
BUILDING, ACTIVE, FINALIZING = TaskState.BUILDING, TaskState.ACTIVE, TaskState.FINALIZING
NORMAL, FINALIZE = JobKind.NORMAL, JobKind.FINALIZE

#: rows written or deleted per transaction in bulk work, so no writer waits long behind it
CHUNK = 20_000
CLAIM_WINDOW = rules.CLAIM_WINDOW
#: seconds over which a task's current rate is measured (the ``rate_*`` columns of its row)
RATE_WINDOW = 10.0
DEFAULT_MAX_CRASHES = rules.DEFAULT_MAX_CRASHES
_NONCE_ALPHABET = string.ascii_letters + string.digits


class ClaimedJob(NamedTuple):
    """A job a worker holds (state RUNNING under its id) and is about to run. A tuple: made by the
    hundred thousand a second on the hot path, and sent to job processes as a JSON array as it is."""

    id: int
    task_pk: int
    task_id: str
    kind: int
    position: int | None
    func: str
    args: str
    attempt: int
    #: seconds it may run (its own limit, else its task's); None: the worker's default
    timeout: float | None = None
    #: its task keeps results: its return value is stored (a normal job only)
    keep: bool = False
    #: JSON list of the exception type names retried automatically (its own, else its task's); None: all
    retry_on: str | None = None

    @property
    def is_finalizer(self) -> bool:
        return self.kind == FINALIZE


@dataclass(frozen=True)
class Done:
    """Normal jobs of one task that all succeeded: the hot path records them in one statement."""

    task_pk: int
    task_id: str
    job_ids: list[int]
    #: seconds they ran in all
    seconds: float
    #: their return values as JSON, one per job id, when their task keeps results
    values: list[str] | None = None


@dataclass(frozen=True)
class Outcome:
    """What came of running a claimed job."""

    job: ClaimedJob
    ok: bool
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    #: seconds it ran (it feeds the task's mean duration, which sizes later claims)
    duration: float = 0.0
    #: the process running it died: it goes back to its queue until its crash limit, then fails
    crashed: bool = False
    #: its return value as JSON, when its task keeps results
    result: str | None = None
    #: a failure that a retry may cure (by the job's retry_on; a Retry the job raised always may)
    retryable: bool = True
    #: seconds before the retry, when the job asked for them (Retry(delay=...)); else the back-off
    retry_delay: float | None = None


# -- tasks ------------------------------------------------------------------------------------------


def create_task(db: Database, slug: str, *, max_retries: int = 0, retry_delay: float = 1.0,
                timeout: float | None = None, keep_results: bool = False, retry_on: str | None = None,
                max_running: int | None = None, priority: int = 0) -> str:
    """Insert a new ACTIVE task and return its id: the slug, ``~``, a random nonce. ``retry_on`` is
    a JSON list of exception type names (:func:`rules.type_names`), or None for every exception."""
    import secrets  # here: a job process, which imports this module, rarely creates a task

    for _ in range(10):
        task_id = f"{slug}~{''.join(secrets.choice(_NONCE_ALPHABET) for _ in range(8))}"
        with db.write() as c:
            row = c.execute(
                "INSERT INTO task (task_id, slug, state, created_at, max_retries, retry_delay, timeout, keep_results, "
                "retry_on, max_running, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (task_id) DO NOTHING RETURNING id",
                (task_id, slug, ACTIVE, now(), max_retries, retry_delay, timeout, int(keep_results), retry_on,
                 max_running, priority),
            ).fetchone()
        if row is not None:
            return task_id
        # else the nonce collided with a live task: draw another
    raise LiteMultiStepError("could not draw a unique task id in 10 tries")


def begin_building(db: Database, task_id: str, builder: int) -> None:
    """Hide the task's jobs from workers until :func:`mark_finalizable` (the ``with`` block).
    ``builder`` is the worker id of the runner filling it: once that runner is gone (its process
    killed, its host vanished), workers remove the task (:func:`recover`)."""
    with db.write() as c:
        cur = c.execute("UPDATE task SET state = ?, builder = ?, builder_pid = ? WHERE task_id = ? AND state = ?",
                        (BUILDING, builder, os.getpid(), task_id, ACTIVE))
        if cur.rowcount != 1:
            _task_row(c, task_id)  # raises NoSuchMultiStepTask when it is gone
            raise FinalizationAlreadyBegun(f"task {task_id} has begun finalization; it cannot be refilled")


def _task_row(c: Connection, task_id: str) -> tuple[int, int, int, int, int, int, int]:
    """The task's row, locked for the rest of the transaction (a decision is made from it)."""
    if rules.impossible_task_id(task_id):
        raise NoSuchMultiStepTask(f"no task {task_id!r}: a task id never holds a NUL character")
    row = c.execute(
        "SELECT id, state, finalizable, normal_count, completed_count, failed_count, finalize_count "
        "FROM task WHERE task_id = ?" + c.dialect.lock_row, (task_id,)).fetchone()
    if row is None:
        raise NoSuchMultiStepTask(f"no task {task_id!r}: it never existed, finished, or was nuked")
    return row  # type: ignore[no-any-return]


class Added(NamedTuple):
    """What :func:`add_jobs` stored: every job's id, in the order given, and the jobs claimed at once."""

    ids: list[int]
    claimed: list[ClaimedJob]


class NewJob(NamedTuple):
    """A job to store: its kind, callable and JSON arguments, and its own settings over its task's."""

    kind: int
    func: str
    args: str
    timeout: float | None = None
    max_retries: int | None = None
    retry_delay: float | None = None
    #: JSON list of exception type names retried automatically
    retry_on: str | None = None


def add_jobs(db: Database, task_id: str, jobs: Sequence[Sequence[Any]], claim_for: int | None = None) -> Added:
    """Store jobs (:class:`NewJob`, or tuples of its fields) of one task in one transaction.

    With ``claim_for`` (sync mode) the normal jobs are stored already claimed by that inline worker
    and returned, so no worker process can take them between the insert and their inline run.
    """
    if not jobs:
        return Added([], [])
    t = now()
    with db.write() as c:
        pk, state, _, _, _, _, finalize_count = _task_row(c, task_id)
        if state == FINALIZING:
            raise FinalizationAlreadyBegun(f"task {task_id} has begun finalization: it takes no more jobs")
        rows: list[tuple[Any, ...]] = []
        n_normal = 0
        for kind, func, args, timeout, max_retries, retry_delay, retry_on in (
                j if len(j) == len(NewJob._fields) else NewJob(*j) for j in jobs):
            if kind == NORMAL:
                rows.append((pk, NORMAL, None, func, args, QUEUED, t, timeout, max_retries, retry_delay, retry_on))
                n_normal += 1
            else:
                rows.append((pk, FINALIZE, finalize_count, func, args, WAITING, t, timeout, max_retries, retry_delay,
                             retry_on))
                finalize_count += 1
        ids = c.dialect.insert_many(
            c, "INSERT INTO job (task, kind, position, func, args, state, enqueued_at, timeout, max_retries, "
               "retry_delay, retry_on) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        claimed: list[ClaimedJob] = []
        if claim_for is not None and n_normal:
            normal_ids = [i for i, row in zip(ids, rows, strict=True) if row[1] == NORMAL]
            among, params = c.dialect.among("id", normal_ids)
            claimed = _take(c, claim_for, _task_info(c, pk), f"{among} AND state = {QUEUED}", params)
        c.execute(
            "UPDATE task SET normal_count = normal_count + ?, finalize_count = ?, "
            "pending_count = pending_count + ?, running_count = running_count + ? WHERE id = ?",
            (n_normal, finalize_count, n_normal - len(claimed), len(claimed), pk))
        if n_normal > len(claimed) and state != BUILDING:
            c.notify()
        return Added(ids, claimed)


def mark_finalizable(db: Database, task_id: str, claim_for: int | None = None) -> ClaimedJob | None:
    """Mark the task finalizable (the end of its ``with`` block, or the gem's ``finalizable!``).

    If every normal job has already succeeded, finalization starts now: the first finalizer is claimed
    for ``claim_for`` and returned, or queued for any worker.
    """
    with db.write() as c:
        pk, state, _, normal, completed, failed, _ = _task_row(c, task_id)
        if state == BUILDING:
            state = ACTIVE
            c.notify()  # the jobs added in the with block are claimable from now on
        c.execute("UPDATE task SET finalizable = 1, state = ?, builder = NULL, builder_pid = NULL WHERE id = ?",
                  (state, pk))
        if state == ACTIVE and rules.may_finalize(True, normal, completed, failed):
            return _begin_finalization(c, pk, task_id, claim_for)
        return None


def finalize(db: Database, task_id: str, claim_for: int | None = None) -> ClaimedJob | None:
    """The gem's ``finalize!``: start finalization of a ready task, or raise why it cannot start."""
    with db.write() as c:
        try:
            pk, state, finalizable, normal, completed, failed, _ = _task_row(c, task_id)
        except NoSuchMultiStepTask:
            raise FinalizationAlreadyBegun(f"task {task_id} is gone: it finished (or was nuked)") from None
        if state == FINALIZING:
            raise FinalizationAlreadyBegun(f"task {task_id} has already begun finalization")
        why = rules.why_not_finalizable(bool(finalizable), normal, completed, failed)
        if why is not None:
            raise NotReadyForFinalization(f"task {task_id} is not ready for finalization: {why}")
        return _begin_finalization(c, pk, task_id, claim_for)


def _begin_finalization(c: Connection, pk: int, task_id: str,
                        claim_for: int | None) -> ClaimedJob | None:
    c.execute("UPDATE task SET state = ? WHERE id = ?", (FINALIZING, pk))
    log.debug("task %s: all jobs done, finalization begins", task_id)
    return _advance_chain(c, pk, task_id, claim_for)


def _advance_chain(c: Connection, pk: int, task_id: str,
                   claim_for: int | None) -> ClaimedJob | None:
    """Move the finalization chain to its next WAITING job (claimed for ``claim_for``, or queued for
    any worker), or finish the task if none is left."""
    # kind as a literal: only then may the database use the partial index job_finalizers
    row = c.execute(f"SELECT id FROM job WHERE task = ? AND kind = {FINALIZE} AND state = ? ORDER BY position LIMIT 1",
                    (pk, WAITING)).fetchone()
    if row is None:
        _finish_task(c, pk, task_id)
        return None
    if claim_for is None:
        c.execute("UPDATE job SET state = ? WHERE id = ?", (QUEUED, row[0]))
        c.execute("UPDATE task SET pending_count = pending_count + 1 WHERE id = ?", (pk,))
        c.notify()
        return None
    [job] = _take(c, claim_for, _task_info(c, pk), f"id = ? AND state = {WAITING}", [row[0]])
    c.execute("UPDATE task SET running_count = running_count + 1 WHERE id = ?", (pk,))
    return job


def _finish_task(c: Connection, pk: int, task_id: str) -> None:
    t = now()
    c.execute(
        "INSERT INTO finished_task (task_id, slug, normal_count, finalize_count, created_at, finished_at, "
        "failed_attempts) SELECT task_id, slug, normal_count, finalize_count, created_at, ?, failed_attempts "
        "FROM task WHERE id = ? "
        "ON CONFLICT (task_id) DO UPDATE SET slug = excluded.slug, normal_count = excluded.normal_count, "
        "finalize_count = excluded.finalize_count, created_at = excluded.created_at, "
        "finished_at = excluded.finished_at, failed_attempts = excluded.failed_attempts", (t, pk))
    # Only finalizer rows and their failure records are left: normal jobs were deleted as they succeeded.
    c.execute("DELETE FROM task WHERE id = ?", (pk,))
    c.execute("DELETE FROM finished_task WHERE finished_at < ?", (t - config.keep_finished(),))
    log.info("task %s finished", task_id)


def delete_task(db: Database, task_id: str) -> int:
    """Remove a task, its queue and its failures (the gem's ``nuke``), in short transactions. Returns
    how many of its jobs were running: their workers stop them within about a second."""
    with db.write() as c:
        pk = _task_row(c, task_id)[0]
        (running,) = c.execute(f"SELECT count(*) FROM job WHERE task = ? AND state = {RUNNING}", (pk,)).fetchone()
        # BUILDING hides the task from claims while its rows go, chunk by chunk
        c.execute("UPDATE task SET state = ?, pending_count = 0 WHERE id = ?", (BUILDING, pk))
    while True:
        with db.write() as c:
            n = c.execute("DELETE FROM job WHERE id IN (SELECT id FROM job WHERE task = ? ORDER BY id LIMIT ?)",
                          (pk, CHUNK)).rowcount
        if n < CHUNK:
            break
    with db.write() as c:
        c.execute("DELETE FROM task WHERE id = ?", (pk,))
    return int(running)


def delete_finished(db: Database, task_id: str) -> bool:
    """Remove a finished task's kept summary; returns whether there was one."""
    if rules.impossible_task_id(task_id):
        return False
    with db.write() as c:
        return c.execute("DELETE FROM finished_task WHERE task_id = ?", (task_id,)).rowcount == 1


def nuke(db: Database, task_id: str) -> int:
    """Remove an unfinished task (:func:`delete_task`) or a finished task's kept summary; raises
    :class:`NoSuchMultiStepTask` if there is neither. Returns how many of its jobs were running
    (their workers stop them within about a second)."""
    try:
        return delete_task(db, task_id)
    except NoSuchMultiStepTask:
        if not delete_finished(db, task_id):
            raise
        return 0


# -- claiming and recording -------------------------------------------------------------------------


def _queue_filter(c: Connection, queues: Sequence[str] | None) -> tuple[str, list[str]]:
    if not queues:
        return "", []
    terms = [c.dialect.glob(q) for q in queues]
    return " AND (" + " OR ".join(sql for sql, _ in terms) + ")", [p for _, p in terms]


@dataclass
class _Delta:
    """What one transaction changes in one task's row: applied once, at the end of the transaction,
    to every task in key order (:func:`_apply`), so concurrent transactions never wait on each other
    in a cycle, and a task's row (hot when many workers finish its jobs) is held only briefly."""

    task_id: str = ""
    completed: int = 0
    failed: int = 0
    #: failures recorded (a failed attempt, whether it is retried or not)
    failed_attempts: int = 0
    pending: int = 0
    running: int = 0
    #: when a claim served the task (ns), 0 if none did
    served: int = 0
    #: normal jobs kept with their result
    results: int = 0
    #: normal jobs that ran, and their seconds in all (for the mean duration)
    ran: int = 0
    seconds: float = 0.0
    #: a job of the task completed here: its finalization may be due
    decide: bool = False
    finalizer_completed: bool = False


class _Tally(dict[int, _Delta]):
    def of(self, pk: int, task_id: str = "") -> _Delta:
        d = self.get(pk)
        if d is None:
            d = self[pk] = _Delta(task_id)
        elif task_id and not d.task_id:
            d.task_id = task_id
        return d


def claim(db: Database, worker_id: int, *, outcomes: Sequence[Outcome] = (), done: Sequence[Done] = (),
          give_back: Sequence[int] = (), put_back: Sequence[int] = (), wants: int = 1, max_batch: int = 32,
          queues: Sequence[str] | None = None, max_crashes: int = DEFAULT_MAX_CRASHES,
          held: Sequence[int] | None = None) -> list[list[ClaimedJob]]:
    """Record ``outcomes`` and ``done``, return jobs to their queues (``give_back``: held but never
    started; ``put_back``: started, but stopped or their result lost; neither counts as an attempt),
    and claim up to ``wants`` batches, all in one transaction (group commit).

    ``held``, after a write whose answer was lost (the connection dropped during its commit, so it
    may or may not have happened): the jobs the worker really holds. Any other job the database says
    it holds was claimed by that write and never reached the worker: it goes back unstarted.

    Each batch comes from one task, the least recently served first, and holds as many of its jobs as
    the task's mean job duration says will run within :data:`CLAIM_WINDOW` (one job while that is
    not known yet), at most ``max_batch``. A finalizer handed to this worker by one of the outcomes is
    a batch of its own and comes first, so the chain is not held up behind other work.
    """
    with db.write() as c:
        tally = _Tally()
        if outcomes or done:
            _record(c, worker_id, outcomes, done, max_crashes, tally, again=held is not None)
        if give_back:
            ids, params = c.dialect.among("id", give_back)
            _requeue(c, f"worker = ? AND {ids}", [worker_id, *params], tally=tally)
        if put_back:
            ids, params = c.dialect.among("id", put_back)
            _requeue(c, f"worker = ? AND {ids}", [worker_id, *params], tally=tally)
        if held is not None:
            ids, params = c.dialect.among("id", held)
            lost = _requeue(c, f"worker = ? AND NOT ({ids})", [worker_id, *params], tally=tally)
            if lost:
                log.warning("worker %d: %d job(s) claimed by a write whose answer was lost went back to their "
                            "queues", worker_id, lost)
        batches = _claim(c, worker_id, wants, max_batch, queues, tally)
        handed = _apply(c, tally, worker_id)
        if (outcomes or done) and len(batches) < wants:
            c.notify()  # work is running out: an idle --burst worker may be done now
        return [[job] for job in handed] + batches


def record(db: Database, worker_id: int, outcomes: Sequence[Outcome],
           max_crashes: int = DEFAULT_MAX_CRASHES) -> list[ClaimedJob]:
    """Record outcomes without claiming; returns any finalizer handed to this worker."""
    return [b[0] for b in claim(db, worker_id, outcomes=outcomes, wants=0, max_crashes=max_crashes)]


def has_claimable(db: Database, queues: Sequence[str] | None = None) -> bool:
    """Whether a claim could find a job now: a read, so idle workers do not take the write lock."""
    conn = db.connection()
    where, params = _queue_filter(conn, queues)
    row = conn.execute(
        f"SELECT 1 FROM task WHERE {CLAIMABLE}{where} LIMIT 1", params).fetchone()
    return row is not None


def work_left(db: Database, queues: Sequence[str] | None = None, retry_horizon: float | None = None) -> bool:
    """Whether any job (in ``queues``) is queued or running, or waits for an automatic retry due
    within ``retry_horizon`` seconds (any retry at all when it is None)."""
    conn = db.connection()
    where, params = _queue_filter(conn, queues)
    busy = conn.execute(
        f"SELECT 1 FROM task WHERE (pending_count > 0 OR running_count > 0) AND state IN (1, 2){where} LIMIT 1",
        params).fetchone()
    if busy is not None:
        return True
    due = float("inf") if retry_horizon is None else now() + retry_horizon
    return conn.execute(f"SELECT 1 FROM job WHERE state = {SCHEDULED} AND run_at <= ? AND task IN "
                        f"(SELECT id FROM task WHERE state >= 0{where}) LIMIT 1",
                        (due, *params)).fetchone() is not None


def next_scheduled(db: Database) -> float | None:
    """When the next automatic retry is due (wall clock), or None."""
    row = db.connection().execute(f"SELECT min(run_at) FROM job WHERE state = {SCHEDULED}").fetchone()
    return None if row is None else row[0]


def _claim(c: Connection, worker_id: int, wants: int, max_batch: int, queues: Sequence[str] | None,
           tally: _Tally) -> list[list[ClaimedJob]]:
    """Up to ``wants`` batches, taken in turn from the claimable tasks of the highest priority, the
    least recently served first. A task with a running limit gives at most what its limit leaves."""
    if wants <= 0:
        return []
    where, params = _queue_filter(c, queues)
    # A few more candidates than batches: on PostgreSQL another worker may be emptying one right now.
    # None for a worker taken for dead: its heartbeat notices and it joins again; it takes nothing meanwhile.
    tasks = c.execute(
        f"SELECT id, task_id, timeout, keep_results, avg_duration, retry_on, priority, max_running FROM task "
        f"WHERE {CLAIMABLE}{where} AND EXISTS (SELECT 1 FROM worker WHERE id = ?) "
        "ORDER BY priority DESC, last_served LIMIT ?", (*params, worker_id, wants + 2)).fetchall()
    batches: list[list[ClaimedJob]] = []
    empty: set[int] = set()
    turn = 0
    while len(batches) < wants and len(empty) < len(tasks):
        # taken in turn among the highest priority that still has jobs to give
        top = max(t[6] for t in tasks if t[0] not in empty)
        pk, task_id, timeout, keep, avg_duration, retry_on, priority, max_running = tasks[turn % len(tasks)]
        turn += 1
        if pk in empty or priority < top:
            continue
        size = rules.batch_size(avg_duration, max_batch)
        if max_running is not None:
            size = min(size, _room(c, pk, max_running, tally))
        jobs = _take(c, worker_id, _TaskInfo(pk, task_id, timeout, bool(keep), retry_on),
                     f"id IN (SELECT id FROM job WHERE task = ? AND state = {QUEUED} ORDER BY id LIMIT ?"
                     f"{c.dialect.skip_locked})", [pk, size]) if size > 0 else []
        if not jobs:
            empty.add(pk)
            continue
        d = tally.of(pk, task_id)
        d.pending -= len(jobs)
        d.running += len(jobs)
        d.served = time.time_ns()
        batches.append(jobs)
    return batches


def _room(c: Connection, pk: int, max_running: int, tally: _Tally) -> int:
    """How many more jobs of a task with a running limit this transaction may claim: none while another
    transaction claims from it (it would not see our claims, nor we its), else its limit less what
    runs, this transaction's changes included. No transaction ever waits here."""
    if not c.lock_task(pk):
        return 0
    (running,) = c.execute("SELECT running_count FROM task WHERE id = ?", (pk,)).fetchone()
    mine = tally.get(pk)
    return int(max_running - running - (mine.running if mine is not None else 0))


class _TaskInfo(NamedTuple):
    """What a claimed job carries of its task."""

    pk: int
    task_id: str
    timeout: float | None
    keep: bool
    retry_on: str | None = None


def _task_info(c: Connection, pk: int) -> _TaskInfo:
    task_id, timeout, keep, retry_on = c.execute(
        "SELECT task_id, timeout, keep_results, retry_on FROM task WHERE id = ?", (pk,)).fetchone()
    return _TaskInfo(pk, task_id, timeout, bool(keep), retry_on)


def _take(c: Connection, worker_id: int, task: _TaskInfo, where: str, params: Sequence[Any]) -> list[ClaimedJob]:
    """Claim the jobs of ``task`` that match ``where`` for ``worker_id``: the one claim every path
    takes (workers, finalization hand-offs, sync mode, a retry run inline). The caller counts them
    in the task's counters; each claim is an attempt."""
    rows = c.execute(
        f"UPDATE job SET state = {RUNNING}, worker = ?, attempts = attempts + 1, claimed_at = ?, "
        f"progress_done = NULL, progress_total = NULL WHERE {where} "
        "RETURNING id, kind, position, func, args, attempts, timeout, retry_on", (worker_id, now(), *params)).fetchall()
    rows.sort()
    return [ClaimedJob(r[0], task.pk, task.task_id, r[1], r[2], r[3], r[4], r[5],
                       r[6] if r[6] is not None else task.timeout, task.keep and r[1] == NORMAL,
                       r[7] if r[7] is not None else task.retry_on) for r in rows]


def _record(c: Connection, worker_id: int, outcomes: Iterable[Outcome], done: Iterable[Done],
            max_crashes: int, tally: _Tally, again: bool = False) -> None:
    """Write the outcomes to the job rows; what they change in the tasks goes to ``tally``. ``again``:
    they are sent a second time, after a write whose answer was lost (which may have recorded them).

    Every write is guarded by ``worker = ? AND state = RUNNING``: a result about a job no longer held
    by this worker (taken back while it was thought dead) changes nothing, and is not counted."""
    for d in done:
        _record_done(c, worker_id, d, tally, again)
    for o in outcomes:
        job = o.job
        if o.crashed:
            if not _requeue(c, "id = ? AND worker = ?", [job.id, worker_id], crashed=(o.message, max_crashes),
                            tally=tally):
                _stale(job, worker_id, again)
            continue
        state = _record_success(c, worker_id, o) if o.ok else _record_failure(c, worker_id, o)
        if state is None:
            _stale(job, worker_id, again)  # the job is no longer ours (or its task is gone)
            continue
        change = tally.of(job.task_pk, job.task_id)
        change.running -= 1
        if o.ok:
            change.completed += 1
            change.results += 1 if job.kind == NORMAL and o.result is not None else 0
            change.decide = True
            change.finalizer_completed = change.finalizer_completed or job.kind == FINALIZE
        else:
            change.failed_attempts += 1
            if state == FAILED:
                change.failed += 1
        if job.kind == NORMAL:
            change.ran += 1
            change.seconds += o.duration


def _record_done(c: Connection, worker_id: int, d: Done, tally: _Tally, again: bool) -> None:
    """The hot path: one statement for a batch of succeeded normal jobs. Those whose claim was taken
    back in the meantime are not deleted, and so not counted: exact either way."""
    if d.values is None:
        ids, params = c.dialect.among("id", d.job_ids)
        n = c.execute(f"DELETE FROM job WHERE worker = ? AND state = {RUNNING} AND {ids}",
                      (worker_id, *params)).rowcount
    else:  # kept, with their results, for the finalizers
        n = c.executemany(f"UPDATE job SET state = {COMPLETED}, worker = NULL, result = ? WHERE id = ? "
                          f"AND worker = ? AND state = {RUNNING}",
                          [(value, job_id, worker_id) for job_id, value in zip(d.job_ids, d.values, strict=True)]
                          ).rowcount
    if n != len(d.job_ids):
        log.warning("%d result(s) of task %s from worker %d ignored: %s", len(d.job_ids) - n, d.task_id,
                    worker_id, _GONE[again])
    change = tally.of(d.task_pk, d.task_id)
    change.completed += n
    change.running -= n
    change.results += n if d.values is not None else 0
    change.decide = change.decide or n > 0
    change.ran += len(d.job_ids)
    change.seconds += d.seconds


def _record_success(c: Connection, worker_id: int, o: Outcome) -> int | None:
    """A job that returned: a normal job is deleted (or kept with its result), a finalizer kept
    COMPLETED for the status view. COMPLETED, or None if the job was no longer ours."""
    job = o.job
    params: tuple[Any, ...] = ()
    if job.kind == NORMAL and o.result is None:
        sql = "DELETE FROM job"
    else:
        sql, params = f"UPDATE job SET state = {COMPLETED}, worker = NULL, result = ?", (o.result,)
    done = c.execute(f"{sql} WHERE id = ? AND worker = ? AND state = {RUNNING}", (*params, job.id, worker_id))
    return COMPLETED if done.rowcount == 1 else None


def _record_failure(c: Connection, worker_id: int, o: Outcome) -> int | None:
    """A job that raised: its automatic retry is scheduled (its own settings over its task's; the
    attempts of its round, since a manual retry starts a new one), or it stands failed; its failure
    is kept either way. SCHEDULED or FAILED, or None if the job was no longer ours."""
    job, t = o.job, now()
    row = c.execute(f"SELECT coalesce(j.max_retries, t.max_retries), coalesce(j.retry_delay, t.retry_delay), "
                    f"j.round_start, j.round FROM job j JOIN task t ON t.id = j.task "
                    f"WHERE j.id = ? AND j.worker = ? AND j.state = {RUNNING}", (job.id, worker_id)).fetchone()
    if row is None:
        return None
    max_retries, delay, round_start, round_ = row
    attempt = job.attempt - round_start  # of this round
    retry = o.retryable and rules.retries(attempt, max_retries)
    wait = o.retry_delay if o.retry_delay is not None else rules.retry_wait(delay, attempt)
    state = SCHEDULED if retry else FAILED
    run_at = t + min(wait, rules.MAX_RETRY_DELAY) if retry else None
    c.execute("UPDATE job SET state = ?, worker = NULL, run_at = ? WHERE id = ?", (state, run_at, job.id))
    _insert_failure(c, job.id, job.task_pk, o.exc_type, o.message, o.traceback, job.attempt, t, round_)
    _log_failure(job, o.exc_type, o.message, round_start + max_retries + 1 if o.retryable else None,
                 run_at, t, o.traceback)
    return state


def _log_failure(job: ClaimedJob, exc_type: str, message: str, attempts: int | None, run_at: float | None,
                 t: float, tb: str = "") -> None:
    """A failed attempt, in the log of the process that records it (a worker, or an inline runner):
    a WARNING while another attempt is to come, an ERROR once the job is out of retries, and its
    traceback at DEBUG. Control characters of the job's text are escaped: one failure, one line.
    ``attempts``: how many its round allows, or None for a failure never retried automatically."""
    what = f"task {job.task_id}: {'finalizer' if job.is_finalizer else 'job'} {job.id}"
    of = f" of {attempts}" if attempts is not None else ""
    failed = (f"{what} failed, attempt {job.attempt}{of}: {describe_call(job.func, job.args)}: "
              f"{exc_type}: {_one_line(message)}")
    if run_at is not None:
        wait = max(0.0, run_at - t)
        log.warning("%s; next attempt in %s (at %s)", failed, f"{wait:.2g} s" if wait < 60 else
                    f"{wait / 60:.0f} min" if wait < 7200 else f"{wait / 3600:.1f} h",
                    time.strftime("%Y-%m-%d %H:%M:%S" if wait >= 43200 else "%H:%M:%S", time.localtime(run_at)))
    else:
        log.error("%s; %s (`litemultistep retry DB %d` runs it again)", failed,
                  "no retries left" if attempts is not None else "not retried automatically", job.id)
    if tb and log.isEnabledFor(logging.DEBUG):
        log.debug("%s: traceback of attempt %d:\n%s", what, job.attempt, tb.rstrip())


def _one_line(text: str, limit: int = 300) -> str:
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _apply(c: Connection, tally: _Tally, worker_id: int | None = None) -> list[ClaimedJob]:
    """Apply each task's changes in one UPDATE, in key order (the same order in every transaction),
    then start or advance finalization where a completion made it due; returns the finalizers handed
    to ``worker_id``. What completed and failed in all is added to this minute's counts last
    (:func:`_count_minute`), so that row is held for the least time."""
    handed: list[ClaimedJob] = []
    t = now()
    completed = failed_attempts = 0
    for pk in sorted(tally):
        d = tally[pk]
        completed += d.completed
        failed_attempts += d.failed_attempts
        mean = d.seconds / d.ran if d.ran else None
        # the rate window: a window open RATE_WINDOW seconds closes with its jobs (and these) as its
        # rate, and a new one opens now (SET sees the row as it was, on both backends)
        row = c.execute(
            "UPDATE task SET completed_count = completed_count + ?, failed_count = failed_count + ?, "
            "failed_attempts = failed_attempts + ?, "
            "pending_count = pending_count + ?, running_count = running_count + ?, "
            "last_served = CASE WHEN ? > last_served THEN ? ELSE last_served END, "
            "avg_duration = coalesce((avg_duration + ?) / 2, ?, avg_duration), result_count = result_count + ?, "
            "rate = CASE WHEN rate_since IS NOT NULL AND ? >= rate_since + ? "
            "THEN (rate_count + ?) / (? - rate_since) ELSE rate END, "
            "rate_count = CASE WHEN rate_since IS NOT NULL AND ? >= rate_since + ? THEN 0 ELSE rate_count + ? END, "
            "rate_since = CASE WHEN rate_since IS NULL OR ? >= rate_since + ? THEN ? ELSE rate_since END "
            "WHERE id = ? RETURNING task_id, state, finalizable, normal_count, completed_count, failed_count",
            (d.completed, d.failed, d.failed_attempts, d.pending, d.running, d.served, d.served, mean, mean,
             d.results, t, RATE_WINDOW, d.completed, t, t, RATE_WINDOW, d.completed, t, RATE_WINDOW, t,
             pk)).fetchone()
        if row is None or not d.decide:
            continue
        task_id, state, finalizable, normal, completed_now, failed_now = row
        nxt = None
        if state == ACTIVE and rules.may_finalize(bool(finalizable), normal, completed_now, failed_now):
            nxt = _begin_finalization(c, pk, task_id, worker_id)
        elif state == FINALIZING and d.finalizer_completed:
            nxt = _advance_chain(c, pk, task_id, worker_id)
        if nxt is not None:
            handed.append(nxt)
    if completed or failed_attempts:
        _count_minute(c, int(t // 60), completed, failed_attempts)
    return handed


def _count_minute(c: Connection, minute: int, completed: int, failed: int) -> None:
    """Add to one minute's counts of completed jobs and failed attempts (the throughput history)."""
    c.execute("INSERT INTO throughput (minute, completed, failed) VALUES (?, ?, ?) ON CONFLICT (minute) DO UPDATE "
              "SET completed = throughput.completed + excluded.completed, failed = throughput.failed + excluded.failed",
              (minute, completed, failed))


def prune_history(db: Database, keep: float | None = None) -> int:
    """Fold the minutes of the throughput history older than ``keep`` seconds (default
    :func:`config.keep_history`, a day) into minute 0, which keeps what they counted, so the totals
    never go down. A read when there is nothing to prune. Returns how many minutes went."""
    cutoff = int((now() - (config.keep_history() if keep is None else keep)) // 60)
    if db.connection().execute("SELECT 1 FROM throughput WHERE minute > 0 AND minute < ? LIMIT 1",
                               (cutoff,)).fetchone() is None:
        return 0
    with db.write() as c:
        # each old row is deleted, and counted, by one transaction only, however many prune at once
        rows = c.execute("DELETE FROM throughput WHERE minute > 0 AND minute < ? RETURNING completed, failed",
                         (cutoff,)).fetchall()
        if rows:
            _count_minute(c, 0, sum(r[0] for r in rows), sum(r[1] for r in rows))
    return len(rows)


def _insert_failure(c: Connection, job_id: int, task_pk: int, exc_type: str, message: str,
                    tb: str, attempt: int, t: float, round_: int = 1) -> None:
    c.execute(
        "INSERT INTO failure (job, task, exc_type, message, traceback, attempt, failed_at, worker_pid, round) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (job_id, task_pk, *map(rules.storable_text, (exc_type, message, tb)),
                                                attempt, t, os.getpid(), round_))


#: why a result is not recorded, by whether it is sent again after a write whose answer was lost
_GONE = {False: "no longer held by that worker (it was thought dead); run again elsewhere",
         True: "no longer held by that worker (recorded by its write whose answer was lost, or taken "
               "back while it was thought dead)"}


def _stale(job: ClaimedJob, worker_id: int, again: bool = False) -> None:
    log.warning("job %d of task %s: result of worker %d ignored: %s", job.id, job.task_id, worker_id, _GONE[again])


def _shift(c: Connection, task_pks: Iterable[int], *, pending: int = 0, running: int = 0, failed: int = 0,
           failed_attempts: int = 0, tally: _Tally | None = None) -> None:
    """Count, for each of some jobs, a change of its task's counters: into ``tally``, or applied at once."""
    own = _Tally() if tally is None else tally
    for pk in task_pks:
        d = own.of(pk)
        d.pending += pending
        d.running += running
        d.failed += failed
        d.failed_attempts += failed_attempts
    if tally is None:
        _apply(c, own)


def _requeue(c: Connection, where: str, params: Sequence[object], crashed: tuple[str, int] | None = None,
             tally: _Tally | None = None) -> int:
    """Put RUNNING jobs matching ``where`` back in their queues. Their run, if it began, did not end
    in a failure, so it is no attempt: ``max_retries`` counts only failures. With ``crashed`` (why,
    limit) their process died holding them: each crash is counted, and a job at the limit fails with
    WorkerCrashed (that run is then its failed attempt)."""
    if crashed is None:
        rows = c.execute("UPDATE job SET state = ?, worker = NULL, attempts = attempts - 1 "
                         f"WHERE state = ? AND {where} RETURNING task",
                         (QUEUED, RUNNING, *params)).fetchall()
        _shift(c, (pk for (pk,) in rows), running=-1, pending=1, tally=tally)
        if rows:
            c.notify()
        return len(rows)
    why, limit = crashed
    # a run its process did not survive is no attempt: the crash limit counts it, not max_retries
    rows = c.execute(f"UPDATE job SET crashes = crashes + 1, worker = NULL, state = CASE WHEN crashes + 1 >= ? "
                     f"THEN {FAILED} ELSE {QUEUED} END, attempts = CASE WHEN crashes + 1 >= ? THEN attempts "
                     f"ELSE attempts - 1 END WHERE state = ? AND {where} "
                     "RETURNING id, task, state, crashes, attempts, round, kind, func, args",
                     (limit, limit, RUNNING, *params)).fetchall()
    back = [r[1] for r in rows if r[2] == QUEUED]
    failed = [r for r in rows if r[2] == FAILED]
    own = _Tally() if tally is None else tally
    _shift(c, back, running=-1, pending=1, tally=own)
    _shift(c, (r[1] for r in failed), running=-1, failed=1, failed_attempts=1, tally=own)
    if tally is None:
        _apply(c, own)
    if back:
        c.notify()
    t = now()
    for job_id, pk, _, crashes, attempt, round_, kind, func, args in failed:
        message = f"the process running it died {crashes} time(s), the crash limit ({why})"
        _insert_failure(c, job_id, pk, "litemultistep.WorkerCrashed", message, "", attempt, t, round_)
        (task_id,) = c.execute("SELECT task_id FROM task WHERE id = ?", (pk,)).fetchone() or ("?",)
        _log_failure(ClaimedJob(job_id, pk, task_id, kind, None, func, args, attempt), "litemultistep.WorkerCrashed",
                     message, None, None, t)
    return len(rows)


def claim_specific(db: Database, worker_id: int, job_id: int) -> ClaimedJob | None:
    """Claim one given QUEUED job (used to run a retried job inline in sync mode)."""
    with db.write() as c:
        row = c.execute(f"SELECT task FROM job WHERE id = ? AND state = {QUEUED}", (job_id,)).fetchone()
        if row is None:
            return None
        jobs = _take(c, worker_id, _task_info(c, row[0]), f"id = ? AND state = {QUEUED}", [job_id])
        c.execute("UPDATE task SET pending_count = pending_count - 1, running_count = running_count + 1 "
                  "WHERE id = ?", (row[0],))
        return jobs[0]


def retry_now(db: Database, worker_id: int, job_id: int) -> ClaimedJob | None:
    """Claim now, for an inline runner, a job whose automatic retry is scheduled: sync mode and
    ``drain`` retry at once instead of waiting for the retry's delay. None if it is not scheduled."""
    with db.write() as c:
        row = c.execute(f"SELECT task FROM job WHERE id = ? AND state = {SCHEDULED}", (job_id,)).fetchone()
        if row is None:
            return None
        c.execute("UPDATE job SET run_at = NULL WHERE id = ?", (job_id,))
        [job] = _take(c, worker_id, _task_info(c, row[0]), f"id = ? AND state = {SCHEDULED}", [job_id])
        c.execute("UPDATE task SET running_count = running_count + 1 WHERE id = ?", (row[0],))
        return job


def held(db: Database, worker_id: int, job_ids: Sequence[int]) -> set[int]:
    """Which of these jobs the database still says ``worker_id`` holds (a nuked task's are gone)."""
    if not job_ids:
        return set()
    conn = db.connection()
    ids, params = conn.dialect.among("id", job_ids)
    return {r[0] for r in conn.execute(f"SELECT id FROM job WHERE worker = ? AND state = {RUNNING} AND {ids}",
                                       (worker_id, *params)).fetchall()}


def forgive_crashes(db: Database, job_ids: Sequence[int]) -> int:
    """Take back the crash counted for each of these jobs when their worker was taken for dead: it
    lived (cut off from the database, or paused past its lease) and stopped them itself, or never
    started them. A job that already failed at its crash limit stays failed (``retry`` runs it).
    Returns how many crash counts were taken back."""
    if not job_ids:
        return 0
    with db.write() as c:
        ids, params = c.dialect.among("id", job_ids)
        return int(c.execute(f"UPDATE job SET crashes = crashes - 1 WHERE crashes > 0 AND state <> {FAILED} "
                             f"AND {ids}", params).rowcount)


def report_progress(db: Database, worker_id: int, reports: Sequence[tuple[int, float, float | None]]) -> None:
    """Store what running jobs reported of their own progress: ``(job id, done, total)``; a report
    about a job no longer held by ``worker_id`` changes nothing."""
    if not reports:
        return
    with db.write() as c:
        c.executemany(f"UPDATE job SET progress_done = ?, progress_total = ? WHERE id = ? AND worker = ? "
                      f"AND state = {RUNNING}", [(done, total, job_id, worker_id) for job_id, done, total in reports])


def promote_scheduled(db: Database, due_by: float | None = None) -> int:
    """Queue the automatic retries due by ``due_by`` (default: now); returns how many."""
    t = now() if due_by is None else due_by
    conn = db.connection()
    if conn.execute("SELECT 1 FROM job WHERE state = 5 AND run_at <= ? LIMIT 1", (t,)).fetchone() is None:
        return 0
    with db.write() as c:
        rows = c.execute("UPDATE job SET state = ?, run_at = NULL WHERE state = 5 AND run_at <= ? "
                         "RETURNING task", (QUEUED, t)).fetchall()
        _shift(c, (pk for (pk,) in rows), pending=1)
        if rows:
            c.notify()
    return len(rows)


def task_exists(db: Database, task_id: str) -> bool:
    """Whether the task exists (and so has not finished)."""
    if rules.impossible_task_id(task_id):
        return False
    return db.connection().execute("SELECT 1 FROM task WHERE task_id = ?", (task_id,)).fetchone() is not None


def task_finished(db: Database, task_id: str) -> bool:
    """Whether the task ran its last finalizer (its row is gone, its summary is kept)."""
    if task_exists(db, task_id) or rules.impossible_task_id(task_id):
        return False
    return db.connection().execute("SELECT 1 FROM finished_task WHERE task_id = ?", (task_id,)).fetchone() is not None


# -- retrying failures ------------------------------------------------------------------------------


def retry_jobs(db: Database, job_ids: Sequence[int]) -> list[int]:
    """Requeue failed jobs by id, and run scheduled automatic retries now; every id must name a
    failed or scheduled job (else nothing changes)."""
    with db.write() as c:
        for job_id in job_ids:
            if not 0 < job_id <= rules.MAX_JOB_ID:
                raise NoSuchJob(f"no job {job_id}: no job ever had that id; see `litemultistep failed`")
            row = c.execute("SELECT state FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                top = c.execute(c.dialect.max_job_id).fetchone()
                if top is not None and 0 < job_id <= top[0]:
                    raise NoSuchJob(f"job {job_id} is no longer stored: it completed (or its task finished or "
                                    "was nuked), so there is nothing to retry")
                raise NoSuchJob(f"no job {job_id}: no job ever had that id; see `litemultistep failed`")
            if row[0] not in (FAILED, SCHEDULED):
                raise JobNotFailed(f"job {job_id} has not failed (it is {JobState(row[0]).name.lower()}); "
                                   "only failed jobs and scheduled retries can be retried")
        marks = ",".join("?" * len(job_ids))
        return _retry_where(c, f"id IN ({marks})", list(job_ids))


def retry_task(db: Database, task_id: str) -> list[int]:
    """Requeue every failed job of one task, and run its scheduled retries now; returns their ids."""
    with db.write() as c:
        pk = _task_row(c, task_id)[0]
        return _retry_where(c, "task = ?", [pk])


def retry_group(db: Database, exc_type: str, message: str, task_id: str | None = None) -> list[int]:
    """Requeue every failed job whose last failure has this exception type and message (a group of
    ``failed --group``), only ``task_id``'s when given; returns their ids."""
    where = (f"id IN (SELECT j.id FROM job j JOIN failure f ON f.id = (SELECT max(id) FROM failure WHERE job = j.id) "
             f"WHERE j.state = {FAILED} AND f.exc_type = ? AND f.message = ?")
    params: list[object] = [exc_type, message]
    with db.write() as c:
        if task_id is not None:
            where += " AND j.task = ?"
            params.append(_task_row(c, task_id)[0])
        return _retry_where(c, where + ")", params)


def retry_all(db: Database) -> list[int]:
    """Requeue every failed job of every task, and run every scheduled retry now; returns their ids."""
    with db.write() as c:
        return _retry_where(c, "TRUE", [])


def _retry_where(c: Connection, where: str, params: list[object]) -> list[int]:
    # a retry starts afresh: a new round of automatic retries, and the crash count of a job that hit
    # the crash limit back to zero
    rows = c.execute(f"UPDATE job SET state = ?, run_at = NULL, crashes = 0, round = round + 1, "
                     f"round_start = attempts WHERE state = ? AND {where} RETURNING id, task",
                     (QUEUED, FAILED, *params)).fetchall()
    tally = _Tally()
    _shift(c, (pk for _, pk in rows), failed=-1, pending=1, tally=tally)
    due = c.execute(f"UPDATE job SET state = ?, run_at = NULL WHERE state = ? AND {where} RETURNING id, task",
                    (QUEUED, SCHEDULED, *params)).fetchall()
    _shift(c, (pk for _, pk in due), pending=1, tally=tally)
    _apply(c, tally)
    if rows or due:
        c.notify()
    return sorted(r[0] for r in rows + due)


# -- workers and recovery ---------------------------------------------------------------------------


def worker_count(db: Database) -> int:
    """How many workers are registered (alive or not)."""
    return int(db.connection().execute("SELECT count(*) FROM worker").fetchone()[0])


def unregister_worker(db: Database, worker_id: int) -> None:
    """Remove the worker's row, putting back any job it still holds."""
    with db.write() as c:
        _requeue(c, "worker = ?", [worker_id])
        c.execute("DELETE FROM worker WHERE id = ?", (worker_id,))


#: tasks whose with block never ended: the runner filling them is no longer registered
_ABANDONED = (f"SELECT task_id FROM task WHERE state = {BUILDING} AND builder IS NOT NULL "
              "AND builder NOT IN (SELECT id FROM worker)")


def recover(db: Database, me: int | None = None, lease: float = 30.0,
            max_crashes: int = DEFAULT_MAX_CRASHES) -> int:
    """Requeue the jobs of dead workers, and of worker ids that are no longer registered at all;
    each counts as a crash of the job. Remove the tasks whose ``with`` block was left open by a
    runner that is gone. Returns how many jobs went back (or failed at the crash limit)."""
    total = 0
    for dead in db.dead_workers(lease):
        if dead.id == me:
            continue
        db.end_session(dead)
        with db.write() as c:
            n = _requeue(c, "worker = ?", [dead.id], crashed=(f"worker pid {dead.pid} died", max_crashes))
            c.execute("DELETE FROM worker WHERE id = ?", (dead.id,))
        total += n
        log.warning("worker %d (pid %d) is dead; %d job(s) it held went back to their queues", dead.id, dead.pid, n)
    for (task_id,) in db.connection().execute(_ABANDONED).fetchall():
        log.warning("task %s: its with block never ended (the process filling it is gone); removing it", task_id)
        try:
            delete_task(db, task_id)
        except NoSuchMultiStepTask:
            pass  # another worker removed it first
    conn = db.connection()
    if conn.execute(f"SELECT 1 FROM job WHERE state = {RUNNING} AND (worker IS NULL OR worker NOT IN "
                    "(SELECT id FROM worker)) LIMIT 1").fetchone() is not None:
        with db.write() as c:
            n = _requeue(c, "(worker IS NULL OR worker NOT IN (SELECT id FROM worker))", [],
                         crashed=("held by a worker that is no longer registered", max_crashes))
        total += n
        log.warning("%d job(s) held under worker ids no longer registered went back to their queues", n)
    return total


# -- checking and repairing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something ``check`` found wrong in the file, and whether it was repaired."""

    kind: str
    task_id: str | None
    detail: str
    repaired: bool = False


def check(db: Database, repair: bool = False, lease: float = 30.0,
          max_crashes: int = DEFAULT_MAX_CRASHES) -> list[Problem]:
    """Recount every task's counters from its job rows, find claims of dead workers, stalled
    finalizations and abandoned ``with`` blocks, run SQLite's integrity check; with ``repair``, fix them.
    """
    conn = db.connection()
    problems = [Problem("integrity", None, line) for line in db.integrity()]
    dead = db.dead_workers(lease)
    dead_ids = {w.id for w in dead}
    held = conn.execute(f"SELECT worker, count(*) FROM job WHERE state = {RUNNING} GROUP BY worker").fetchall()
    registered = {w for (w,) in conn.execute("SELECT id FROM worker").fetchall()}
    orphans = sum(n for w, n in held if w is None or w in dead_ids or w not in registered)
    if orphans:
        problems.append(Problem("dead-claims", None, f"{orphans} job(s) held by workers that are gone", repair))
    if dead:
        problems.append(Problem("dead-workers", None, f"{len(dead)} dead worker(s) still registered: "
                                + ", ".join(f"id {w.id} (pid {w.pid})" for w in dead), repair))
    if repair and (orphans or dead):
        recover(db, lease=lease, max_crashes=max_crashes)
    live = registered - dead_ids
    for pk, task_id in conn.execute("SELECT id, task_id FROM task ORDER BY id").fetchall():
        problems += _check_task(db, pk, task_id, repair, live)
    return problems


def _check_task(db: Database, pk: int, task_id: str, repair: bool, live: set[int]) -> list[Problem]:
    problems = []
    with db.write() as c:  # one snapshot to compare, and to fix in
        row = c.execute("SELECT state, finalizable, normal_count, finalize_count, completed_count, failed_count, "
                        "pending_count, running_count, builder, builder_pid, result_count FROM task WHERE id = ?"
                        + c.dialect.lock_row, (pk,)).fetchone()
        if row is None:
            return []
        (state, finalizable, normal, finalize, completed, failed, pending, running, builder, builder_pid,
         results) = row
        counts = dict(c.execute("SELECT kind * 10 + state, count(*) FROM job WHERE task = ? GROUP BY kind, state",
                                (pk,)).fetchall())

        def n(kind: int, *states: int) -> int:
            return sum(counts.get(kind * 10 + s, 0) for s in states)

        normal_rows = n(NORMAL, QUEUED, RUNNING, FAILED, SCHEDULED)
        actual = {
            "finalize_count": n(FINALIZE, QUEUED, RUNNING, COMPLETED, FAILED, SCHEDULED, WAITING),
            "completed_count": (normal - normal_rows) + n(FINALIZE, COMPLETED),
            "failed_count": n(NORMAL, FAILED) + n(FINALIZE, FAILED),
            "pending_count": n(NORMAL, QUEUED) + n(FINALIZE, QUEUED),
            "running_count": n(NORMAL, RUNNING) + n(FINALIZE, RUNNING),
            "result_count": n(NORMAL, COMPLETED),
        }
        stored = {"finalize_count": finalize, "completed_count": completed, "failed_count": failed,
                  "pending_count": pending, "running_count": running, "result_count": results}
        wrong = {k: (stored[k], v) for k, v in actual.items() if stored[k] != v}
        if wrong:
            detail = ", ".join(f"{k} {a} should be {b}" for k, (a, b) in wrong.items())
            problems.append(Problem("counters", task_id, detail, repair))
            if repair:
                c.execute("UPDATE task SET " + ", ".join(f"{k} = ?" for k in wrong) + " WHERE id = ?",
                          (*[b for _, b in wrong.values()], pk))
        # (a task left building by an older version names its builder by pid alone)
        if state == BUILDING and (builder not in live if builder is not None else
                                  builder_pid is not None and db.builder_gone(builder_pid)):
            who = f"worker {builder}" if builder is not None else f"process {builder_pid}"
            problems.append(Problem("abandoned", task_id, f"its with block never ended ({who}, which filled it, is "
                                    "gone); any live worker, or repair, removes it", repair))
            if repair:
                c.execute("DELETE FROM task WHERE id = ?", (pk,))
            return problems
        failed_now = actual["failed_count"]
        if state == ACTIVE and rules.may_finalize(bool(finalizable), normal, actual["completed_count"], failed_now):
            problems.append(Problem("stalled", task_id, "ready, but finalization never began", repair))
            if repair:
                _begin_finalization(c, pk, task_id, None)
        elif state == FINALIZING and not failed_now and not n(FINALIZE, QUEUED, RUNNING, SCHEDULED):
            problems.append(Problem("stalled", task_id, "finalization stopped between two finalizers", repair))
            if repair:
                _advance_chain(c, pk, task_id, None)
    return problems

