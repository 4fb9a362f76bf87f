"""The transactional core: every change of a job's or a task's state happens here, and only here.

Each function is one short ``BEGIN IMMEDIATE`` transaction (or a few, for bulk work); no transaction
is ever open while user code runs. Counters live in the task row and change in the same transaction as
the job rows they count, so they are exact and reading them is one row lookup.

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
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sqlite3
import string
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockTimeout

from . import config
from .db import Database, JobKind, JobState, TaskState, now
from .errors import (
    FinalizationAlreadyBegun,
    JobNotFailed,
    NoSuchJob,
    NoSuchMultiStepTask,
    NotReadyForFinalization,
)

log = logging.getLogger("litemultistep")

QUEUED, RUNNING, COMPLETED, FAILED, SCHEDULED, WAITING = (
    JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, JobState.FAILED, JobState.SCHEDULED,
    JobState.WAITING,
)
BUILDING, ACTIVE, FINALIZING = TaskState.BUILDING, TaskState.ACTIVE, TaskState.FINALIZING
NORMAL, FINALIZE = JobKind.NORMAL, JobKind.FINALIZE

#: rows written or deleted per transaction in bulk work, so no writer waits long behind it
CHUNK = 20_000
_NONCE_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds (state RUNNING under its id) and is about to run."""

    id: int
    task_pk: int
    task_id: str
    kind: int
    position: int | None
    func: str
    args: str
    attempt: int

    @property
    def is_finalizer(self) -> bool:
        return self.kind == FINALIZE


@dataclass
class _TaskChange:
    """What one transaction's recorded outcomes change in one task."""

    task_id: str
    completed: int = 0
    failed: int = 0
    finished_running: int = 0
    finalizer_completed: bool = False


@dataclass(frozen=True)
class Outcome:
    """What came of running a claimed job."""

    job: ClaimedJob
    ok: bool
    exc_type: str = ""
    message: str = ""
    traceback: str = ""


# -- tasks ------------------------------------------------------------------------------------------


def create_task(db: Database, slug: str, *, max_retries: int = 0, retry_delay: float = 1.0) -> str:
    """Insert a new ACTIVE task and return its id: the slug, ``~``, a random nonce."""
    for _ in range(10):
        task_id = f"{slug}~{''.join(secrets.choice(_NONCE_ALPHABET) for _ in range(8))}"
        try:
            with db.write() as c:
                c.execute(
                    "INSERT INTO task (task_id, slug, state, created_at, max_retries, retry_delay) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (task_id, slug, ACTIVE, now(), max_retries, retry_delay),
                )
            return task_id
        except sqlite3.IntegrityError as e:
            if "UNIQUE" not in str(e):
                raise
            continue  # the nonce collided with a live task: draw another
    raise RuntimeError("could not draw a unique task id in 10 tries")


def begin_building(db: Database, task_id: str) -> None:
    """Hide the task's jobs from workers until :func:`mark_finalizable` (the ``with`` block)."""
    with db.write() as c:
        cur = c.execute("UPDATE task SET state = ?, builder_pid = ? WHERE task_id = ? AND state = ?",
                        (BUILDING, os.getpid(), task_id, ACTIVE))
        if cur.rowcount != 1:
            _task_row(c, task_id)  # raises NoSuchMultiStepTask when it is gone
            raise FinalizationAlreadyBegun(f"task {task_id} has begun finalization; it cannot be refilled")


def _task_row(c: sqlite3.Connection, task_id: str) -> tuple[int, int, int, int, int, int, int]:
    row = c.execute(
        "SELECT id, state, finalizable, normal_count, completed_count, failed_count, finalize_count "
        "FROM task WHERE task_id = ?", (task_id,)).fetchone()
    if row is None:
        raise NoSuchMultiStepTask(f"no task {task_id!r}: it never existed, finished, or was nuked")
    return row  # type: ignore[no-any-return]


def add_jobs(db: Database, task_id: str, jobs: Sequence[tuple[int, str, str]],
             claim_for: int | None = None) -> list[ClaimedJob]:
    """Store jobs ``(kind, func, args_json)`` of one task in one transaction.

    With ``claim_for`` (sync mode) the normal jobs are stored already claimed by that inline worker
    and returned, so no worker process can take them between the insert and their inline run.
    """
    if not jobs:
        return []
    t = now()
    with db.write() as c:
        pk, state, _, _, _, _, finalize_count = _task_row(c, task_id)
        if state == FINALIZING:
            raise FinalizationAlreadyBegun(f"task {task_id} has begun finalization: it takes no more jobs")
        rows: list[tuple[Any, ...]] = []
        n_normal = 0
        for kind, func, args in jobs:
            if kind == NORMAL:
                rows.append((pk, NORMAL, None, func, args, QUEUED, 0, None, t))
                n_normal += 1
            else:
                rows.append((pk, FINALIZE, finalize_count, func, args, WAITING, 0, None, t))
                finalize_count += 1
        insert = ("INSERT INTO job (task, kind, position, func, args, state, attempts, worker, enqueued_at) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
        claimed: list[ClaimedJob] = []
        if claim_for is None:
            c.executemany(insert, rows)
        else:
            for row in rows:
                if row[1] == NORMAL:
                    row = (*row[:5], RUNNING, 1, claim_for, t)
                job_id = c.execute(insert, row).lastrowid
                if row[1] == NORMAL and job_id is not None:
                    claimed.append(ClaimedJob(job_id, pk, task_id, NORMAL, None, row[3], row[4], 1))
        running = len(claimed)
        c.execute(
            "UPDATE task SET normal_count = normal_count + ?, finalize_count = ?, "
            "pending_count = pending_count + ?, running_count = running_count + ? WHERE id = ?",
            (n_normal, finalize_count, n_normal - running, running, pk))
        return claimed


def mark_finalizable(db: Database, task_id: str, claim_for: int | None = None) -> ClaimedJob | None:
    """Mark the task finalizable (the end of its ``with`` block, or the gem's ``finalizable!``).

    If every normal job has already succeeded, finalization starts now: the first finalizer is claimed
    for ``claim_for`` and returned, or queued for any worker.
    """
    with db.write() as c:
        pk, state, _, normal, completed, failed, _ = _task_row(c, task_id)
        if state == BUILDING:
            state = ACTIVE
        c.execute("UPDATE task SET finalizable = 1, state = ?, builder_pid = NULL WHERE id = ?",
                  (state, pk))
        if state == ACTIVE and completed >= normal and failed == 0:
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
        if not finalizable or completed < normal or failed:
            raise NotReadyForFinalization(
                f"task {task_id} is not ready for finalization: "
                + ("it is not finalizable yet" if not finalizable else
                   f"{failed} job(s) failed" if failed else f"{completed} of {normal} normal jobs done"))
        return _begin_finalization(c, pk, task_id, claim_for)


def _begin_finalization(c: sqlite3.Connection, pk: int, task_id: str,
                        claim_for: int | None) -> ClaimedJob | None:
    c.execute("UPDATE task SET state = ? WHERE id = ?", (FINALIZING, pk))
    log.debug("task %s: all jobs done, finalization begins", task_id)
    return _advance_chain(c, pk, task_id, claim_for)


def _advance_chain(c: sqlite3.Connection, pk: int, task_id: str,
                   claim_for: int | None) -> ClaimedJob | None:
    """Move the finalization chain to its next WAITING job, or finish the task if none is left."""
    row = c.execute(
        "SELECT id, position, func, args, attempts FROM job WHERE task = ? AND state = ? "
        "ORDER BY position LIMIT 1", (pk, WAITING)).fetchone()
    if row is None:
        _finish_task(c, pk, task_id)
        return None
    job_id, position, func, args, attempts = row
    if claim_for is None:
        c.execute("UPDATE job SET state = ? WHERE id = ?", (QUEUED, job_id))
        c.execute("UPDATE task SET pending_count = pending_count + 1 WHERE id = ?", (pk,))
        return None
    c.execute("UPDATE job SET state = ?, worker = ?, attempts = attempts + 1 WHERE id = ?",
              (RUNNING, claim_for, job_id))
    c.execute("UPDATE task SET running_count = running_count + 1 WHERE id = ?", (pk,))
    return ClaimedJob(job_id, pk, task_id, FINALIZE, position, func, args, attempts + 1)


def _finish_task(c: sqlite3.Connection, pk: int, task_id: str) -> None:
    t = now()
    c.execute(
        "INSERT OR REPLACE INTO finished_task (task_id, slug, normal_count, finalize_count, created_at, "
        "finished_at) SELECT task_id, slug, normal_count, finalize_count, created_at, ? FROM task "
        "WHERE id = ?", (t, pk))
    # Only finalizer rows and their failure records are left: normal jobs were deleted as they succeeded.
    c.execute("DELETE FROM task WHERE id = ?", (pk,))
    c.execute("DELETE FROM finished_task WHERE finished_at < ?", (t - config.keep_finished(),))
    log.info("task %s finished", task_id)


def delete_task(db: Database, task_id: str) -> None:
    """Remove a task, its queue and its failures (the gem's ``nuke``), in short transactions."""
    with db.write() as c:
        pk = _task_row(c, task_id)[0]
        # BUILDING hides the task from claims while its rows go, chunk by chunk
        c.execute("UPDATE task SET state = ?, pending_count = 0 WHERE id = ?", (BUILDING, pk))
    while True:
        with db.write() as c:
            n = c.execute("DELETE FROM job WHERE id IN (SELECT id FROM job WHERE task = ? LIMIT ?)",
                          (pk, CHUNK)).rowcount
        if n < CHUNK:
            break
    with db.write() as c:
        c.execute("DELETE FROM task WHERE id = ?", (pk,))


# -- claiming and recording -------------------------------------------------------------------------


def _queue_filter(queues: Sequence[str] | None) -> tuple[str, list[str]]:
    if not queues:
        return "", []
    return " AND (" + " OR ".join("task_id GLOB ?" for _ in queues) + ")", list(queues)


def claim(db: Database, worker_id: int, limit: int, queues: Sequence[str] | None = None,
          outcomes: Sequence[Outcome] = ()) -> list[ClaimedJob]:
    """Record ``outcomes`` and claim up to ``limit`` more jobs, in one transaction (group commit).

    A finalizer handed to this worker by one of the outcomes comes first; no other job is claimed
    with it, so the chain is not held up behind other work.
    """
    with db.write() as c:
        handed = _record(c, worker_id, outcomes) if outcomes else []
        if handed or limit <= 0:
            return handed
        return _claim(c, worker_id, limit, queues)


def record(db: Database, worker_id: int, outcomes: Sequence[Outcome]) -> list[ClaimedJob]:
    """Record outcomes without claiming; returns any finalizer handed to this worker."""
    return claim(db, worker_id, 0, None, outcomes)


def has_claimable(db: Database, queues: Sequence[str] | None = None) -> bool:
    """Whether a claim could find a job now: a read, so idle workers do not take the write lock."""
    where, params = _queue_filter(queues)
    row = db.connection().execute(
        f"SELECT 1 FROM task WHERE pending_count > 0 AND state IN (1, 2){where} LIMIT 1", params).fetchone()
    return row is not None


def work_left(db: Database, queues: Sequence[str] | None = None) -> bool:
    """Whether any job (in ``queues``) is queued, running, or waiting for an automatic retry."""
    where, params = _queue_filter(queues)
    conn = db.connection()
    busy = conn.execute(
        f"SELECT 1 FROM task WHERE (pending_count > 0 OR running_count > 0) AND state IN (1, 2){where} LIMIT 1",
        params).fetchone()
    return busy is not None or conn.execute("SELECT 1 FROM job WHERE state = 5 LIMIT 1").fetchone() is not None


def _claim(c: sqlite3.Connection, worker_id: int, limit: int,
           queues: Sequence[str] | None) -> list[ClaimedJob]:
    where, params = _queue_filter(queues)
    task = c.execute(
        f"SELECT id, task_id FROM task WHERE pending_count > 0 AND state IN (1, 2){where} "
        "ORDER BY last_served LIMIT 1", params).fetchone()
    if task is None:
        return []
    pk, task_id = task
    rows = c.execute(
        "UPDATE job SET state = ?, worker = ?, attempts = attempts + 1 WHERE id IN "
        "(SELECT id FROM job WHERE task = ? AND state = ? ORDER BY id LIMIT ?) "
        "RETURNING id, kind, position, func, args, attempts",
        (RUNNING, worker_id, pk, QUEUED, limit)).fetchall()
    c.execute(
        "UPDATE task SET pending_count = pending_count - ?, running_count = running_count + ?, "
        "last_served = ? WHERE id = ?", (len(rows), len(rows), time.time_ns(), pk))
    rows.sort()
    return [ClaimedJob(r[0], pk, task_id, r[1], r[2], r[3], r[4], r[5]) for r in rows]


def _record(c: sqlite3.Connection, worker_id: int, outcomes: Iterable[Outcome]) -> list[ClaimedJob]:
    t = now()
    changes: dict[int, _TaskChange] = {}
    retry_rules: dict[int, tuple[int, float] | None] = {}
    for o in outcomes:
        job = o.job
        if o.ok:
            if job.kind == NORMAL:
                cur = c.execute("DELETE FROM job WHERE id = ? AND worker = ? AND state = ?",
                                (job.id, worker_id, RUNNING))
            else:
                cur = c.execute("UPDATE job SET state = ?, worker = NULL WHERE id = ? AND worker = ? "
                                "AND state = ?", (COMPLETED, job.id, worker_id, RUNNING))
            if cur.rowcount != 1:
                _stale(job, worker_id)
                continue
            change = changes.setdefault(job.task_pk, _TaskChange(job.task_id))
            change.completed += 1
            change.finalizer_completed = change.finalizer_completed or job.kind == FINALIZE
        else:
            if job.task_pk not in retry_rules:
                retry_rules[job.task_pk] = c.execute(
                    "SELECT max_retries, retry_delay FROM task WHERE id = ?", (job.task_pk,)).fetchone()
            rules = retry_rules[job.task_pk]
            if rules is None:  # the task is gone: this late report is stale
                _stale(job, worker_id)
                continue
            max_retries, delay = rules
            retry = job.attempt <= max_retries
            new_state = SCHEDULED if retry else FAILED
            run_at = t + delay * 2 ** (job.attempt - 1) if retry else None
            cur = c.execute("UPDATE job SET state = ?, worker = NULL, run_at = ? WHERE id = ? AND worker = ? "
                            "AND state = ?", (new_state, run_at, job.id, worker_id, RUNNING))
            if cur.rowcount != 1:
                _stale(job, worker_id)
                continue
            c.execute(
                "INSERT INTO failure (job, task, exc_type, message, traceback, attempt, failed_at, "
                "worker_pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.task_pk, o.exc_type, o.message, o.traceback, job.attempt, t, os.getpid()))
            change = changes.setdefault(job.task_pk, _TaskChange(job.task_id))
            change.failed += 0 if retry else 1
        change.finished_running += 1
    handed: list[ClaimedJob] = []
    for pk, change in changes.items():
        state, finalizable, normal, completed_now, failed_now = c.execute(
            "UPDATE task SET completed_count = completed_count + ?, failed_count = failed_count + ?, "
            "running_count = running_count - ? WHERE id = ? "
            "RETURNING state, finalizable, normal_count, completed_count, failed_count",
            (change.completed, change.failed, change.finished_running, pk)).fetchone()
        nxt = None
        if state == ACTIVE and finalizable and completed_now >= normal and not failed_now:
            nxt = _begin_finalization(c, pk, change.task_id, worker_id)
        elif state == FINALIZING and change.finalizer_completed:
            nxt = _advance_chain(c, pk, change.task_id, worker_id)
        if nxt is not None:
            handed.append(nxt)
    return handed


def _stale(job: ClaimedJob, worker_id: int) -> None:
    log.warning("job %d of task %s: result of worker %d ignored, the job was taken back from it "
                "(its lease ran out or it was thought dead); it runs again elsewhere",
                job.id, job.task_id, worker_id)


def _shift_counters(c: sqlite3.Connection, task_pks: Iterable[int], **per_job: int) -> None:
    """Apply counter changes made by each of some jobs to their tasks, one UPDATE per task.
    ``per_job`` maps a counter column (a name in this file, never user input) to its change per job."""
    assignments = ", ".join(f"{column} = {column} + ?" for column in per_job)
    for pk, n in Counter(task_pks).items():
        c.execute(f"UPDATE task SET {assignments} WHERE id = ?", (*(d * n for d in per_job.values()), pk))


def _requeue(c: sqlite3.Connection, where: str, params: Sequence[object]) -> int:
    rows = c.execute(f"UPDATE job SET state = ?, worker = NULL WHERE state = ? AND {where} RETURNING task",
                     (QUEUED, RUNNING, *params)).fetchall()
    _shift_counters(c, (pk for (pk,) in rows), running_count=-1, pending_count=1)
    return len(rows)


def claim_specific(db: Database, worker_id: int, job_id: int) -> ClaimedJob | None:
    """Claim one given QUEUED job (used to run a retried job inline in sync mode)."""
    with db.write() as c:
        row = c.execute(
            "UPDATE job SET state = ?, worker = ?, attempts = attempts + 1 WHERE id = ? AND state = ? "
            "RETURNING id, task, kind, position, func, args, attempts",
            (RUNNING, worker_id, job_id, QUEUED)).fetchone()
        if row is None:
            return None
        c.execute("UPDATE task SET pending_count = pending_count - 1, running_count = running_count + 1 "
                  "WHERE id = ?", (row[1],))
        task_id = c.execute("SELECT task_id FROM task WHERE id = ?", (row[1],)).fetchone()[0]
        return ClaimedJob(row[0], row[1], task_id, row[2], row[3], row[4], row[5], row[6])


def promote_scheduled(db: Database, due_by: float | None = None) -> int:
    """Queue the automatic retries due by ``due_by`` (default: now); returns how many."""
    t = now() if due_by is None else due_by
    conn = db.connection()
    if conn.execute("SELECT 1 FROM job WHERE state = 5 AND run_at <= ? LIMIT 1", (t,)).fetchone() is None:
        return 0
    with db.write() as c:
        rows = c.execute("UPDATE job SET state = ?, run_at = NULL WHERE state = 5 AND run_at <= ? "
                         "RETURNING task", (QUEUED, t)).fetchall()
        _shift_counters(c, (pk for (pk,) in rows), pending_count=1)
    return len(rows)


def task_exists(db: Database, task_id: str) -> bool:
    """Whether the task exists (and so has not finished)."""
    return db.connection().execute("SELECT 1 FROM task WHERE task_id = ?", (task_id,)).fetchone() is not None


def task_finished(db: Database, task_id: str) -> bool:
    """Whether the task ran its last finalizer (its row is gone, its summary is kept)."""
    if task_exists(db, task_id):
        return False
    return db.connection().execute("SELECT 1 FROM finished_task WHERE task_id = ?", (task_id,)).fetchone() is not None


# -- retrying failures ------------------------------------------------------------------------------


def retry_jobs(db: Database, job_ids: Sequence[int]) -> list[int]:
    """Requeue failed jobs by id; every id must name a failed job (else nothing changes)."""
    with db.write() as c:
        for job_id in job_ids:
            row = c.execute("SELECT state FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NoSuchJob(f"no job {job_id}: check the id with `litemultistep failed`")
            if row[0] != FAILED:
                raise JobNotFailed(f"job {job_id} has not failed (it is {JobState(row[0]).name.lower()}); "
                                   "only failed jobs can be retried")
        return _retry_where(c, f"id IN ({','.join('?' * len(job_ids))})", list(job_ids))


def retry_task(db: Database, task_id: str) -> list[int]:
    """Requeue every failed job of one task; returns their ids."""
    with db.write() as c:
        pk = _task_row(c, task_id)[0]
        return _retry_where(c, "task = ?", [pk])


def retry_all(db: Database) -> list[int]:
    """Requeue every failed job of every task; returns their ids."""
    with db.write() as c:
        return _retry_where(c, "1", [])


def _retry_where(c: sqlite3.Connection, where: str, params: list[object]) -> list[int]:
    rows = c.execute(f"UPDATE job SET state = ? WHERE state = ? AND {where} RETURNING id, task",
                     (QUEUED, FAILED, *params)).fetchall()
    _shift_counters(c, (pk for _, pk in rows), failed_count=-1, pending_count=1)
    return sorted(r[0] for r in rows)


# -- workers and recovery ---------------------------------------------------------------------------


class WorkerLock:
    """The OS lock a runner holds while it lives: the kernel drops it the instant the process dies,
    so a free lock proves death, however long a zombie lingers in the process table."""

    def __init__(self, db: Database) -> None:
        os.makedirs(db.workers_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(db.workers_dir, f"{os.getpid()}-{secrets.token_hex(6)}.lock")
        self._lock = FileLock(self.path, timeout=0, mode=0o600, thread_local=False)
        self._lock.acquire()

    def release(self) -> None:
        if self._lock.is_locked:
            _unlink_and_release(self._lock)


def _unlink_and_release(lock: FileLock) -> None:
    # Removed while still held: lock names are never reused, so no one can be waiting on this file.
    try:
        os.unlink(lock.lock_file)
    except FileNotFoundError:
        pass
    lock.release()


def lock_is_held(path: str) -> bool:
    """Whether a live process holds the worker lock at ``path``."""
    probe = FileLock(path, timeout=0, mode=0o600, thread_local=False)
    try:
        probe.acquire()
    except LockTimeout:
        return True
    except OSError:
        return False
    _unlink_and_release(probe)  # it was free: its owner is dead
    return False


def register_worker(db: Database, kind: str, queues: Sequence[str] | None = None,
                    lease: float | None = None) -> tuple[int, WorkerLock]:
    """Take a worker lock, then add the worker's row (in that order, so a live row's lock is held)."""
    lock = WorkerLock(db)
    t = now()
    with db.write() as c:
        worker_id = c.execute(
            "INSERT INTO worker (pid, hostname, kind, queues, started_at, heartbeat_at, expires_at, lock_path) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (os.getpid(), socket.gethostname(), kind, " ".join(queues) if queues else None, t, t,
             t + lease if lease else None, lock.path)).lastrowid
    return int(worker_id), lock  # type: ignore[arg-type]


def heartbeat(db: Database, worker_id: int, lease: float) -> bool:
    """Renew the worker's lease; False when the worker was taken for dead and its row removed."""
    t = now()
    with db.write() as c:
        return c.execute("UPDATE worker SET heartbeat_at = ?, expires_at = ? WHERE id = ?",
                         (t, t + lease, worker_id)).rowcount == 1


def unregister_worker(db: Database, worker_id: int) -> None:
    """Remove the worker's row, putting back any job it still holds."""
    with db.write() as c:
        _requeue(c, "worker = ?", [worker_id])
        c.execute("DELETE FROM worker WHERE id = ?", (worker_id,))


def recover(db: Database, me: int | None = None) -> int:
    """Requeue the jobs of dead workers (lock free) and stalled ones (lease expired); returns the count."""
    t = now()
    rows = db.connection().execute("SELECT id, pid, lock_path, expires_at FROM worker").fetchall()
    total = 0
    for worker_id, pid, lock_path, expires_at in rows:
        if worker_id == me:
            continue
        stalled = expires_at is not None and expires_at < t
        if not stalled and lock_is_held(lock_path):
            continue
        with db.write() as c:
            n = _requeue(c, "worker = ?", [worker_id])
            c.execute("DELETE FROM worker WHERE id = ?", (worker_id,))
        total += n
        why = "its lease ran out (stalled or hung)" if stalled else "it is dead"
        log.warning("worker %d (pid %d): %s; %d job(s) back in their queues", worker_id, pid, why, n)
    return total


def tidy(db: Database, idle: bool = False) -> None:
    """Give free pages back to the filesystem once they are over a quarter of the file, and, when
    ``idle``, cut a large ``-wal`` file back to nothing, so the file shrinks when work is done."""
    conn = db.connection()
    while True:
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        if free <= 256 or free * 4 <= pages:
            break
        # Bounded steps, each its own transaction, so no other writer waits long. executescript,
        # because execute() steps this pragma once and frees a single page.
        conn.executescript("BEGIN IMMEDIATE; PRAGMA incremental_vacuum(4096); COMMIT;")
    if idle:
        try:
            wal = os.path.getsize(db.path + "-wal")
        except OSError:
            return
        if wal > 4 * 1024 * 1024:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


# -- checking and repairing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something ``check`` found wrong in the file, and whether it was repaired."""

    kind: str
    task_id: str | None
    detail: str
    repaired: bool = False


def check(db: Database, repair: bool = False) -> list[Problem]:
    """Recount every task's counters from its job rows, find claims of dead workers, stalled
    finalizations and abandoned ``with`` blocks, run SQLite's integrity check; with ``repair``, fix them.
    """
    conn = db.connection()
    problems: list[Problem] = []
    for (line,) in conn.execute("PRAGMA integrity_check").fetchall():
        if line != "ok":
            problems.append(Problem("integrity", None, line))
    live = set()
    for worker_id, expires_at, lock_path in conn.execute("SELECT id, expires_at, lock_path FROM worker"):
        if (expires_at is None or expires_at >= now()) and lock_is_held(lock_path):
            live.add(worker_id)
    orphans = conn.execute("SELECT count(*) FROM job WHERE state = ? AND (worker IS NULL OR worker NOT IN "
                           f"({','.join(str(w) for w in live) or 'NULL'}))", (RUNNING,)).fetchone()[0]
    if orphans:
        problems.append(Problem("dead-claims", None, f"{orphans} job(s) held by workers that are gone",
                                repair))
        if repair:
            with db.write() as c:
                _requeue(c, f"(worker IS NULL OR worker NOT IN ({','.join(str(w) for w in live) or 'NULL'}))", [])
                c.execute(f"DELETE FROM worker WHERE id NOT IN ({','.join(str(w) for w in live) or 'NULL'})")
    for pk, task_id in conn.execute("SELECT id, task_id FROM task ORDER BY id").fetchall():
        problems += _check_task(db, pk, task_id, repair)
    return problems


def _check_task(db: Database, pk: int, task_id: str, repair: bool) -> list[Problem]:
    problems = []
    with db.write() as c:  # one snapshot to compare, and to fix in
        row = c.execute("SELECT state, finalizable, normal_count, finalize_count, completed_count, failed_count, "
                        "pending_count, running_count, builder_pid FROM task WHERE id = ?", (pk,)).fetchone()
        if row is None:
            return []
        state, finalizable, normal, finalize, completed, failed, pending, running, builder = row
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
        }
        stored = {"finalize_count": finalize, "completed_count": completed, "failed_count": failed,
                  "pending_count": pending, "running_count": running}
        wrong = {k: (stored[k], v) for k, v in actual.items() if stored[k] != v}
        if wrong:
            detail = ", ".join(f"{k} {a} should be {b}" for k, (a, b) in wrong.items())
            problems.append(Problem("counters", task_id, detail, repair))
            if repair:
                c.execute("UPDATE task SET " + ", ".join(f"{k} = ?" for k in wrong) + " WHERE id = ?",
                          (*[b for _, b in wrong.values()], pk))
        if state == BUILDING and builder is not None and not _pid_alive(builder):
            problems.append(Problem("abandoned", task_id, f"its with block never ended (process {builder} is "
                                    "gone); repair removes it", repair))
            if repair:
                c.execute("DELETE FROM task WHERE id = ?", (pk,))
            return problems
        failed_now = actual["failed_count"]
        if state == ACTIVE and finalizable and actual["completed_count"] >= normal and not failed_now:
            problems.append(Problem("stalled", task_id, "ready, but finalization never began", repair))
            if repair:
                _begin_finalization(c, pk, task_id, None)
        elif state == FINALIZING and not failed_now and not n(FINALIZE, QUEUED, RUNNING, SCHEDULED):
            problems.append(Problem("stalled", task_id, "finalization stopped between two finalizers", repair))
            if repair:
                _advance_chain(c, pk, task_id, None)
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
