"""Reading the file: progress snapshots, task and failure listings, live workers.

Nothing here changes the database; every decision about who runs what is in ``engine.py``. (Telling
whether a worker is alive on SQLite takes its lock file for an instant, without creating or removing it.)
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Any, TypeVar

from . import rules
from .config import resolve_db
from .db import Database, JobKind, JobState, TaskState, now
from .engine import RATE_WINDOW
from .errors import NoResult, NoSuchJob, NoSuchMultiStepTask
from .runner import REPORT_LIMIT

_TASK_COLUMNS = ("task_id, slug, state, finalizable, normal_count, finalize_count, completed_count, "
                 "failed_count, pending_count, running_count, created_at, "
                 f"(SELECT count(*) FROM job WHERE job.task = task.id AND job.state = {int(JobState.SCHEDULED)}), "
                 "keep_results, result_count, "
                 # a value over report()'s limit (stored by an older version) is left out: the sum stays
                 # finite, and PostgreSQL does not refuse to add it up ("value out of range")
                 + ", ".join(f"(SELECT sum(CASE WHEN {c} <= {float(REPORT_LIMIT)!r} THEN {c} END) FROM job "
                             f"WHERE job.task = task.id AND job.state = {int(JobState.RUNNING)})"
                             for c in ("progress_done", "progress_total"))
                 + ", failed_attempts, rate_since, rate_count, rate, max_running, priority")


@dataclass(frozen=True)
class Progress:
    """One consistent snapshot of a task's counters, read in one query.

    ``state`` is ``"building"`` (inside its ``with`` block), ``"running"`` (jobs are queued, running
    or waiting for an automatic retry; some may have failed already), ``"blocked"`` (failed jobs stop
    it and nothing else will happen until they are retried), ``"finalizing"`` or ``"finished"``.
    """

    task_id: str
    slug: str
    state: str
    finalizable: bool
    normal_job_count: int
    finalize_job_count: int
    completed_count: int
    failed_count: int
    #: jobs waiting for a worker: queued, waiting for an automatic retry, or finalizers not yet reached
    pending_count: int
    running_count: int
    created_at: float
    finished_at: float | None = None
    #: failed jobs whose automatic retry is scheduled (they count in ``pending_count`` too)
    scheduled_count: int = 0
    #: whether the task keeps its jobs' results, and how many are stored now
    keep_results: bool = False
    result_count: int = 0
    #: what its running jobs reported of their own progress (litemultistep.report), summed over the
    #: jobs that reported; None when none did (a total only counts jobs that gave one; a value over
    #: report()'s limit, which only an older version stored, counts as none)
    reported_done: float | None = None
    reported_total: float | None = None
    #: every failed attempt of the task's jobs so far, retried or not (a finished task keeps it)
    failed_attempts: int = 0
    #: jobs completed a second, over about the last 10 s (None until it is known, and once finished)
    rate: float | None = None
    #: seconds until the jobs not done yet are done at that rate (None: no rate, blocked, finished)
    seconds_left: float | None = None
    #: jobs of the task that may run at once (None: no limit), and its priority (higher goes first)
    max_running: int | None = None
    priority: int = 0

    @property
    def total_job_count(self) -> int:
        return self.normal_job_count + self.finalize_job_count

    @property
    def duration(self) -> float | None:
        """Seconds from the task's creation to its end (``finished_at - created_at``); None until
        it has finished."""
        return None if self.finished_at is None else max(0.0, self.finished_at - self.created_at)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def blocked(self) -> bool:
        """Failed jobs stop the task, and nothing else is queued, running or scheduled."""
        return self.state == "blocked"

    @property
    def settled(self) -> bool:
        """Finished, or blocked by failures: nothing more happens without a retry."""
        return self.state in ("finished", "blocked")

    @property
    def percent(self) -> float:
        """Completed jobs as a share of all (a task with no jobs is at 0% until it finishes)."""
        if not self.total_job_count:
            return 100.0 if self.finished else 0.0
        return 100.0 * self.completed_count / self.total_job_count

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``status --json``: every field plus ``total_job_count``."""
        d = dict(self.__dict__)  # the fields are plain values: no deep copy needed (asdict's cost)
        d["total_job_count"] = self.total_job_count
        d["duration"] = self.duration
        return d


def duration(seconds: float) -> str:
    """A duration for people, to the second: ``42s``, ``3m5s``, ``2h10m``, ``4d3h``."""
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def current_rate(since: float | None, count: int, last: float | None, at: float) -> float | None:
    """A task's jobs completed a second over the last :data:`~litemultistep.engine.RATE_WINDOW`
    seconds, from its rate window: ``count`` jobs since ``since``, after a window that measured
    ``last``. A window open longer than that (the task stalled) is its own measure, which falls
    towards 0 as it stays open. None while not known (a first window under a second old)."""
    if since is None:
        return None
    elapsed = max(0.0, at - since)
    if elapsed >= RATE_WINDOW or last is None:
        return count / elapsed if elapsed >= 1.0 else None
    # the jobs of the open window, and the last window's rate for the rest of the span
    return (count + last * (RATE_WINDOW - elapsed)) / RATE_WINDOW


def _progress_from_row(row: tuple[Any, ...], at: float | None = None) -> Progress:
    (task_id, slug, state, finalizable, normal, finalize, completed, failed, queued, running,
     created_at, scheduled, keep, results, reported_done, reported_total, failed_attempts,
     rate_since, rate_count, last_rate, max_running, priority) = row
    label = rules.task_state(state == TaskState.BUILDING, state == TaskState.FINALIZING, failed, queued, running,
                             scheduled)
    pending = normal + finalize - completed - failed - running
    # a task that is building or blocked runs nothing: it has no rate (and no time left)
    moving = label not in ("blocked", "building")
    rate = current_rate(rate_since, rate_count, last_rate, now() if at is None else at) if moving else None
    left = normal + finalize - completed - failed
    seconds_left = left / rate if rate else None
    return Progress(task_id, slug, label, bool(finalizable), normal, finalize, completed, failed, pending,
                    running, created_at, None, scheduled, bool(keep), results, reported_done, reported_total,
                    failed_attempts, rate, seconds_left, max_running, priority)


#: the largest id a job can have: both backends keep ids in signed 64-bit integers
MAX_JOB_ID = rules.MAX_JOB_ID


def parse_job_id(text: str) -> int:
    """The job id written as ``text`` (ASCII digits: the caller checks that); :class:`NoSuchJob` for
    a number over :data:`MAX_JOB_ID`, which no job can have (and SQLite cannot even bind)."""
    if len(text.lstrip("0")) > len(str(MAX_JOB_ID)) or int(text) > MAX_JOB_ID:
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text):,} digits)"
        raise NoSuchJob(f"no job {shown}: job ids go up to {MAX_JOB_ID}; see `litemultistep failed`")
    return int(text)


def check_task_id(db: Database, task_id: str) -> None:
    """:class:`NoSuchMultiStepTask` for an id no task can have, before any query sees it: a task id
    never holds a NUL character (slugs have no control characters), and PostgreSQL refuses one in
    any text it is given."""
    if rules.impossible_task_id(task_id):
        raise NoSuchMultiStepTask(f"no task {task_id!r} in {db.path}: a task id never holds a NUL character")


def progress(db: Database, task_id: str) -> Progress:
    """The task's counters; a finished task's kept summary; else :class:`NoSuchMultiStepTask`."""
    check_task_id(db, task_id)
    conn = db.connection()
    row = conn.execute(f"SELECT {_TASK_COLUMNS} FROM task WHERE task_id = ?", (task_id,)).fetchone()
    if row is not None:
        return _progress_from_row(row)
    done = conn.execute(f"SELECT {_FINISHED_COLUMNS} FROM finished_task WHERE task_id = ?", (task_id,)).fetchone()
    if done is None:
        raise NoSuchMultiStepTask(f"no task {task_id!r} in {db.path}: it never existed, was nuked, or "
                                  "finished long enough ago that its summary was dropped")
    return _finished_from_row(done)


_FINISHED_COLUMNS = "task_id, slug, normal_count, finalize_count, created_at, finished_at, failed_attempts"


def _finished_from_row(row: tuple[Any, ...]) -> Progress:
    task_id, slug, normal, finalize, created_at, finished_at, failed_attempts = row
    return Progress(task_id, slug, "finished", True, normal, finalize, normal + finalize, 0, 0, 0,
                    created_at, finished_at, failed_attempts=failed_attempts)


@dataclass(frozen=True)
class JobResult:
    """One normal job's result, with the job it came from."""

    job_id: int
    args: list[Any]
    kwargs: dict[str, Any]
    value: Any


#: results read per query when streaming them, and the most bytes of JSON a page holds (a result
#: bigger than that is a page alone): bounded memory whatever the results' sizes, big pages of small
#: ones, and no read held open for long
RESULTS_PAGE = 20_000
RESULTS_PAGE_BYTES = 4 * 2**20
#: a result of at most this many bytes comes with the query that reads the sizes (so that query
#: holds RESULTS_PAGE * SMALL_RESULT bytes at most); a bigger one is read once its page is known
SMALL_RESULT = 200


def results(db: Database, task_id: str, details: bool = False) -> Iterator[Any]:
    """The task's stored results (its normal jobs' return values), in the order the jobs were added,
    read a page at a time (at most :data:`RESULTS_PAGE` results and about :data:`RESULTS_PAGE_BYTES`
    of JSON); with ``details``, :class:`JobResult` objects."""
    check_task_id(db, task_id)
    conn = db.connection()
    row = conn.execute("SELECT id, keep_results FROM task WHERE task_id = ?", (task_id,)).fetchone()
    if row is None:
        raise NoSuchMultiStepTask(f"no task {task_id!r} in {db.path}: it never existed, was nuked, or finished "
                                  "(a task's results go with it once its last finalizer ran)")
    pk, keep = row
    if not keep:
        raise NoResult(f"task {task_id} does not keep results: create it with keep_results=True")
    size = "length(result) + length(args)" if details else "length(result)"
    args = "args" if details else "NULL"
    where = "FROM job WHERE task = ? AND state = ? AND kind = ?"
    # the next rows' ids and sizes, with the values of the small ones: one pass over a million small results
    first = (f"SELECT id, {size}, CASE WHEN {size} <= {SMALL_RESULT} THEN {args} END, "
             f"CASE WHEN {size} <= {SMALL_RESULT} THEN result END {where} AND id > ? ORDER BY id LIMIT ?")
    # the big values of one page
    rest = f"SELECT id, {size}, {args}, result {where} AND id >= ? AND id <= ? AND {size} > {SMALL_RESULT}"
    key = (pk, JobState.COMPLETED, JobKind.NORMAL)
    last = 0
    while True:
        rows = conn.execute(first, (*key, last, RESULTS_PAGE)).fetchall()
        if not rows:
            return
        sizes = list(map(itemgetter(1), rows))
        ends = list(accumulate(sizes))  # ends[i]: the bytes of rows[0..i]
        start = 0
        while start < len(rows):
            # a page ends with the result that takes it to the budget
            budget = (ends[start - 1] if start else 0) + RESULTS_PAGE_BYTES
            stop = min(len(rows), bisect_left(ends, budget, start) + 1)
            page = rows[start:stop]
            if max(sizes[start:stop]) > SMALL_RESULT:
                big = {r[0]: r for r in conn.execute(rest, (*key, page[0][0], page[-1][0])).fetchall()}
                # a job gone since (its task nuked) is left out
                page = [r if r[1] <= SMALL_RESULT else big[r[0]] for r in page if r[1] <= SMALL_RESULT or r[0] in big]
            yield from _values(page, details)
            start = stop
        if len(rows) < RESULTS_PAGE:
            return
        last = rows[-1][0]


def _values(page: list[tuple[Any, ...]], details: bool) -> list[Any]:
    """The results of ``(id, size, args, result)`` rows (a list: each result then passes through one
    generator, not two)."""
    loads = json.loads
    if not details:
        # one parse per page, in C, instead of one call per result: twice as fast
        return loads("[" + ",".join(map(itemgetter(3), page)) + "]")  # type: ignore[no-any-return]
    out = []
    for job_id, _, args, value in page:
        a, kw = loads(args)
        out.append(JobResult(job_id, a, kw, loads(value)))
    return out


def job_state(db: Database, job_id: int) -> tuple[str, int, str | None] | None:
    """A job's state name, its task's row id and its stored result, or None if it is gone."""
    row = db.connection().execute("SELECT state, task, result FROM job WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    return JobState(row[0]).name.lower(), row[1], row[2]


def _page(limit: int | None, offset: int) -> str:
    return "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(offset)}"


def active_tasks(db: Any = None, limit: int | None = None, offset: int = 0) -> list[Progress]:
    """Every task that has not finished, oldest first (``db``: a path, a Database, or the default);
    with ``limit``, that many from ``offset`` on."""
    db = resolve_db(db)
    # a page's ids first: the counting sub-selects then run for its rows only, not for every row
    # the sort passes over
    where = "" if limit is None else f" WHERE id IN (SELECT id FROM task ORDER BY created_at, id{_page(limit, offset)})"
    rows = db.connection().execute(f"SELECT {_TASK_COLUMNS} FROM task{where} ORDER BY created_at, id").fetchall()
    at = now()
    return [_progress_from_row(r, at) for r in rows]


def task_counts(db: Any = None) -> tuple[int, int]:
    """How many tasks are unfinished, and how many finished tasks' summaries are kept."""
    db = resolve_db(db)
    row = db.connection().execute(
        "SELECT (SELECT count(*) FROM task), (SELECT count(*) FROM finished_task)").fetchone()
    return int(row[0]), int(row[1])


def finished_tasks(db: Any = None, limit: int | None = None, offset: int = 0) -> list[Progress]:
    """Summaries of recently finished tasks, newest first."""
    db = resolve_db(db)
    rows = db.connection().execute(
        f"SELECT {_FINISHED_COLUMNS} FROM finished_task ORDER BY finished_at DESC, task_id{_page(limit, offset)}"
    ).fetchall()
    return [_finished_from_row(r) for r in rows]


@dataclass(frozen=True)
class FailureInfo:
    """A failed job and its last recorded failure."""

    job_id: int
    task_id: str
    func: str
    args: str
    finalizer: bool
    exc_type: str
    message: str
    traceback: str
    attempt: int
    failed_at: float
    #: the round of retries it failed in: a manual retry starts a new one
    round: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: failed jobs with their last failure, found from the tasks that count failed jobs (``failed_count``)
#: through the (task, state) index: no pass over the whole job table
_FAILED_JOBS = ("job j JOIN task t ON t.id = j.task JOIN failure f ON f.id = (SELECT max(id) FROM failure "
                "WHERE job = j.id) WHERE j.task IN (SELECT id FROM task WHERE failed_count > 0) AND j.state = ?")


def failure_count(db: Any = None) -> int:
    """How many jobs are failed now, across tasks (from the tasks' counters)."""
    db = resolve_db(db)
    return int(db.connection().execute("SELECT coalesce(sum(failed_count), 0) FROM task").fetchone()[0])


def _failure_filter(task_id: str | None, exc_type: str | None, message: str | None = None
                    ) -> tuple[str, list[Any]]:
    where = ""
    params: list[Any] = []
    for term, value in (("t.task_id", task_id), ("f.message", message)):
        if value is not None:
            where, params = f"{where} AND {term} = ?", [*params, value]
    if exc_type is not None:
        # our own exceptions are stored as litemultistep.Name; earlier code stored some as
        # litemultistep.errors.Name: either name finds both
        names = [exc_type, exc_type]
        if exc_type.startswith("litemultistep."):
            name = exc_type.removeprefix("litemultistep.errors.").removeprefix("litemultistep.")
            names = [f"litemultistep.{name}", f"litemultistep.errors.{name}"]
        where += " AND f.exc_type IN (?, ?)"
        params += names
    return where, params


def failures(db: Any = None, task_id: str | None = None, exc_type: str | None = None,
             limit: int | None = None, offset: int = 0, message: str | None = None) -> list[FailureInfo]:
    """Jobs that are failed now (not retried since), each with its last failure, oldest first; only
    ``task_id``'s, only those whose exception is ``exc_type`` (and whose message is ``message``), with
    ``limit`` that many from ``offset``."""
    db = resolve_db(db)
    where, params = _failure_filter(task_id, exc_type, message)
    rows = db.connection().execute(
        "SELECT j.id, t.task_id, j.func, j.args, j.kind, f.exc_type, f.message, f.traceback, f.attempt, "
        f"f.failed_at, f.round FROM {_FAILED_JOBS}{where} ORDER BY f.failed_at, j.id{_page(limit, offset)}",
        (JobState.FAILED, *params)).fetchall()
    return [FailureInfo(r[0], r[1], r[2], r[3], r[4] == JobKind.FINALIZE, *r[5:]) for r in rows]


@dataclass(frozen=True)
class FailureGroup:
    """The jobs failed now whose last failure has one exception type and one message."""

    exc_type: str
    message: str
    #: how many jobs
    count: int
    #: when the first and the last of them failed (Unix time)
    first_failed_at: float
    last_failed_at: float
    #: the first few of them (:data:`GROUP_JOB_IDS`), oldest failure first
    job_ids: list[int]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: job ids a failure group names
GROUP_JOB_IDS = 5


def failure_groups(db: Any = None, task_id: str | None = None, exc_type: str | None = None,
                   limit: int | None = None, offset: int = 0) -> list[FailureGroup]:
    """The jobs failed now, grouped by their last failure's exception type and message, the biggest
    group first; only ``task_id``'s, only ``exc_type``'s; with ``limit``, that many groups from ``offset``."""
    db = resolve_db(db)
    where, params = _failure_filter(task_id, exc_type)
    # one pass: each failed job with its group's size, first and last time, and its rank in the group
    rows = db.connection().execute(
        "SELECT exc_type, message, job_id, n, first_at, last_at FROM (SELECT f.exc_type AS exc_type, "
        "f.message AS message, j.id AS job_id, row_number() OVER ranked AS k, count(*) OVER g AS n, "
        "min(f.failed_at) OVER g AS first_at, max(f.failed_at) OVER g AS last_at "
        f"FROM {_FAILED_JOBS}{where} WINDOW g AS (PARTITION BY f.exc_type, f.message), "
        "ranked AS (PARTITION BY f.exc_type, f.message ORDER BY f.failed_at, j.id)) AS x "
        "WHERE k <= ? ORDER BY n DESC, exc_type, message, k", (JobState.FAILED, *params, GROUP_JOB_IDS)).fetchall()
    groups: list[FailureGroup] = []
    for exc, message, job_id, n, first_at, last_at in rows:
        if not groups or (groups[-1].exc_type, groups[-1].message) != (exc, message):
            groups.append(FailureGroup(exc, message, int(n), first_at, last_at, []))
        groups[-1].job_ids.append(job_id)
    return groups[offset:] if limit is None else groups[offset:offset + limit]


def failure_kinds(db: Any = None, task_id: str | None = None) -> list[tuple[str, int]]:
    """The exception types of the jobs failed now, each with how many, commonest first."""
    db = resolve_db(db)
    where, params = ("", ()) if task_id is None else (" AND t.task_id = ?", (task_id,))
    rows = db.connection().execute(
        f"SELECT f.exc_type, count(*) FROM {_FAILED_JOBS}{where} GROUP BY f.exc_type "
        "ORDER BY count(*) DESC, f.exc_type", (JobState.FAILED, *params)).fetchall()
    return [(exc, int(n)) for exc, n in rows]


def finalizers(db: Database, task_id: str) -> list[dict[str, Any]]:
    """The task's finalization chain: each finalizer's position, callable and state."""
    # kind as a literal: only then may the database use the partial index job_finalizers
    rows = db.connection().execute(
        "SELECT j.id, j.position, j.func, j.args, j.state, j.attempts FROM job j WHERE j.task = "
        f"(SELECT id FROM task WHERE task_id = ?) AND j.kind = {int(JobKind.FINALIZE)} ORDER BY j.position",
        (task_id,)).fetchall()
    return [{"job_id": r[0], "position": r[1], "func": r[2], "args": r[3],
             "state": JobState(r[4]).name.lower(), "attempts": r[5]} for r in rows]


@dataclass(frozen=True)
class RunningJob:
    """A job a worker holds now: running, or handed to a job process that starts it within milliseconds."""

    job_id: int
    task_id: str
    func: str
    args: str
    finalizer: bool
    worker_id: int | None
    attempt: int
    claimed_at: float | None
    #: what the job last reported of its own progress (litemultistep.report), if anything
    reported_done: float | None = None
    reported_total: float | None = None
    #: whether the worker holding it is alive; a dead worker's job goes back to its queue when a live
    #: worker (within a second) or ``check --repair`` finds it
    worker_alive: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def dead_worker_note(self) -> str:
        """What to say of a job whose worker is dead (empty if it lives)."""
        if self.worker_alive:
            return ""
        who = f"worker {self.worker_id}" if self.worker_id is not None else "its worker"
        return f"{who} is dead; `check --repair` or any live worker puts it back"


K = TypeVar("K", bound=Hashable)


def id_runs(jobs: Sequence[tuple[int, K]]) -> list[tuple[int, int, K]]:
    """Job ids as ``(first, last, key)`` runs of consecutive ids that share ``key`` (say, their task
    and when they were claimed): a worker's batch of a hundred short jobs is one run, not a hundred."""
    runs: list[tuple[int, int, K]] = []
    for job_id, key in sorted(jobs, key=lambda j: j[0]):
        if runs and runs[-1][1] == job_id - 1 and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], job_id, key)
        else:
            runs.append((job_id, job_id, key))
    return runs


def running_jobs(db: Any = None, task_id: str | None = None, lease: float = 30.0) -> list[RunningJob]:
    """Jobs held by workers now, longest-held first, each saying whether its worker is alive. Only
    looks: a dead worker's jobs stay as they are until a live worker or ``check --repair`` puts them back."""
    db = resolve_db(db)
    where, params = ("", ()) if task_id is None else (" AND t.task_id = ?", (task_id,))
    # the state as a literal: only then may SQLite use the partial index job_running
    rows = db.connection().execute(
        "SELECT j.id, t.task_id, j.func, j.args, j.kind, j.worker, j.attempts, j.claimed_at, j.progress_done, "
        f"j.progress_total FROM job j JOIN task t ON t.id = j.task WHERE j.state = {int(JobState.RUNNING)}{where} "
        "ORDER BY j.claimed_at, j.id", params).fetchall()
    if not rows:
        return []
    alive = _live_workers(db, lease)
    return [RunningJob(r[0], r[1], r[2], r[3], r[4] == JobKind.FINALIZE, r[5], r[6], r[7], r[8], r[9], r[5] in alive)
            for r in rows]


def _live_workers(db: Database, lease: float) -> set[int]:
    """The ids of the registered workers that are alive now."""
    dead = {w.id for w in db.dead_workers(lease)}
    return {w for (w,) in db.connection().execute("SELECT id FROM worker").fetchall() if w not in dead}


def jobs_of_dead_workers(db: Any = None, lease: float = 30.0) -> list[RunningJob]:
    """The jobs held by workers that are dead (or no longer registered), oldest claim first."""
    return [r for r in running_jobs(db, lease=lease) if not r.worker_alive]


@dataclass(frozen=True)
class ScheduledRetry:
    """A failed job whose automatic retry is due at ``run_at``; ``retry`` runs it now."""

    job_id: int
    task_id: str
    func: str
    args: str
    attempt: int
    run_at: float
    exc_type: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def scheduled_retries(db: Any = None, task_id: str | None = None, limit: int | None = None) -> list[ScheduledRetry]:
    """Failed jobs waiting for their automatic retry, soonest first, each with its last failure (with
    ``limit``, the first that many)."""
    db = resolve_db(db)
    where, params = ("", ()) if task_id is None else (" AND t.task_id = ?", (task_id,))
    rows = db.connection().execute(
        "SELECT j.id, t.task_id, j.func, j.args, j.attempts, j.run_at, f.exc_type, f.message FROM job j "
        "JOIN task t ON t.id = j.task LEFT JOIN failure f ON f.id = (SELECT max(id) FROM failure WHERE job = j.id) "
        f"WHERE j.state = ?{where} ORDER BY j.run_at, j.id{_page(limit, 0)}", (JobState.SCHEDULED, *params)).fetchall()
    return [ScheduledRetry(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or "", r[7] or "") for r in rows]


@dataclass(frozen=True)
class WorkerInfo:
    """A registered worker and the jobs it holds now."""

    id: int
    pid: int
    hostname: str
    kind: str
    queues: str | None
    started_at: float
    heartbeat_at: float
    expires_at: float | None
    alive: bool
    running_job_ids: list[int]
    concurrency: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def workers(db: Any = None, lease: float = 30.0) -> list[WorkerInfo]:
    """Registered workers, with whether each is alive now (its OS lock held). Only looks."""
    db = resolve_db(db)
    conn = db.connection()
    dead = {w.id for w in db.dead_workers(lease)}
    out = []
    for wid, pid, host, kind, queues, started, beat, expires, concurrency in conn.execute(
            "SELECT id, pid, hostname, kind, queues, started_at, heartbeat_at, expires_at, concurrency "
            "FROM worker ORDER BY id").fetchall():
        jobs = [r[0] for r in conn.execute("SELECT id FROM job WHERE state = ? AND worker = ? ORDER BY id",
                                           (JobState.RUNNING, wid))]
        alive = wid not in dead
        out.append(WorkerInfo(wid, pid, host, kind, queues, started, beat, expires, alive, jobs, concurrency))
    return out


# -- the documents of ``--json`` and the web API (shapes in docs/cli.md) ----------------------------


def to_json(doc: Any, indent: int | None = None) -> str:
    """A document as strict JSON text, for ``--json`` and the web API: JSON has no NaN or infinity,
    so a non-finite float (none should reach a document) becomes null instead of a word that JSON
    parsers refuse (``Infinity``)."""
    separators = None if indent is not None else (",", ":")
    try:
        return json.dumps(doc, indent=indent, separators=separators, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(doc), indent=indent, separators=separators, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value



def status_doc(db: Database, limit: int | None = None, offset: int = 0,
               finished_limit: int | None = None) -> dict[str, Any]:
    """``status --json``: the unfinished tasks (with ``limit``, a page of them) and the kept
    summaries of finished ones."""
    return {"database": db.path,
            "tasks": [p.as_dict() for p in active_tasks(db, limit, offset)],
            "finished": [p.as_dict() for p in finished_tasks(db, finished_limit)]}


def task_doc(db: Database, task_id: str, failure_limit: int | None = None, failure_offset: int = 0,
             scheduled_limit: int | None = None) -> dict[str, Any]:
    """``status DB TASK_ID --json``: one task, its finalization chain, failures, running jobs and
    scheduled retries. Raises :class:`NoSuchMultiStepTask` for an unknown id. The web page reads a
    page of the failures (``failure_limit`` from ``failure_offset``) and the first ``scheduled_limit``
    scheduled retries, so a task with thousands of failures is a page of bounded size."""
    p = progress(db, task_id)
    scheduled = scheduled_retries(db, task_id, scheduled_limit)
    return {"task": p.as_dict(), "finalizers": finalizers(db, task_id),
            "failures": [f.as_dict() for f in failures(db, task_id, limit=failure_limit, offset=failure_offset)],
            "running": [r.as_dict() for r in running_jobs(db, task_id)],
            "scheduled": [s.as_dict() for s in scheduled]}


def failures_doc(db: Database, task_id: str | None = None, exc_type: str | None = None,
                 limit: int | None = None, offset: int = 0, message: str | None = None) -> dict[str, Any]:
    """``failed --json``: failed jobs (filtered as :func:`failures` does) and scheduled retries."""
    if task_id is not None:
        progress(db, task_id)  # an unknown id is an error, not an empty list
    scheduled = scheduled_retries(db, task_id)
    if exc_type is not None:
        scheduled = [s for s in scheduled if s.exc_type == exc_type]
    if message is not None:
        scheduled = [s for s in scheduled if s.message == message]
    return {"failures": [f.as_dict() for f in failures(db, task_id, exc_type, limit, offset, message)],
            "scheduled": [s.as_dict() for s in scheduled]}


def groups_doc(db: Database, task_id: str | None = None, exc_type: str | None = None,
               limit: int | None = None, offset: int = 0) -> dict[str, Any]:
    """``failed --group --json``: the failed jobs grouped by exception type and message."""
    if task_id is not None:
        progress(db, task_id)
    return {"groups": [g.as_dict() for g in failure_groups(db, task_id, exc_type, limit, offset)]}


def workers_doc(db: Database) -> dict[str, Any]:
    """``workers --json``: every registered worker, alive or not, and the jobs each holds."""
    return {"workers": [w.as_dict() for w in workers(db)]}


# -- history and metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Jobs completed and job attempts failed in each minute of a span, oldest first: the last
    entry is the minute ``end_minute`` (Unix time // 60), which is still counting."""

    end_minute: int
    completed: list[int]
    failed: list[int]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def throughput(db: Any = None, minutes: int = 60, at: float | None = None) -> Throughput:
    """The throughput history of the last ``minutes`` minutes (the current one included)."""
    db = resolve_db(db)
    last = int((now() if at is None else at) // 60)
    first = last - minutes + 1
    counts = {m: (c, f) for m, c, f in db.connection().execute(
        "SELECT minute, completed, failed FROM throughput WHERE minute >= ? AND minute <= ?",
        (first, last)).fetchall()}
    span = [counts.get(m, (0, 0)) for m in range(first, last + 1)]
    return Throughput(last, [int(c) for c, _ in span], [int(f) for _, f in span])


def totals(db: Any = None) -> tuple[int, int]:
    """Jobs completed and job attempts failed since the database was made (or upgraded to keep count)."""
    db = resolve_db(db)
    row = db.connection().execute("SELECT coalesce(sum(completed), 0), coalesce(sum(failed), 0) FROM throughput"
                                  ).fetchone()
    return int(row[0]), int(row[1])


#: the states ``litemultistep_jobs`` and ``litemultistep_tasks`` have, always all of them
JOB_STATES = ("pending", "running", "scheduled", "failed")
TASK_STATES = ("building", "running", "blocked", "finalizing", "finished")


def metrics(db: Any = None, lease: float = 30.0) -> str:
    """The Prometheus text exposition (format 0.0.4) of the database: jobs and tasks by state, workers
    alive or not, and the totals of completed jobs and failed attempts. It reads the tasks' counters,
    the scheduled retries' index, the workers and the history, never a pass over the jobs."""
    db = resolve_db(db)
    conn = db.connection()
    waiting, running, failed = conn.execute(
        "SELECT coalesce(sum(normal_count + finalize_count - completed_count - failed_count - running_count), 0), "
        "coalesce(sum(running_count), 0), coalesce(sum(failed_count), 0) FROM task").fetchone()
    # ordered by run_at: only then does SQLite read the scheduled retries' own index (job_scheduled)
    # rather than every job of the (task, state) index
    scheduled = dict(conn.execute(f"SELECT task, count(*) FROM (SELECT task FROM job WHERE state = "
                                  f"{int(JobState.SCHEDULED)} ORDER BY run_at) AS s GROUP BY task").fetchall())
    n_scheduled = sum(scheduled.values())
    jobs = {"pending": int(waiting) - n_scheduled, "running": int(running), "scheduled": n_scheduled,
            "failed": int(failed)}
    tasks = dict.fromkeys(TASK_STATES, 0)
    for pk, state, n_failed, queued, n_running in conn.execute(
            "SELECT id, state, failed_count, pending_count, running_count FROM task").fetchall():
        tasks[rules.task_state(state == TaskState.BUILDING, state == TaskState.FINALIZING, n_failed, queued,
                               n_running, scheduled.get(pk, 0))] += 1
    tasks["finished"] = int(conn.execute("SELECT count(*) FROM finished_task").fetchone()[0])
    registered = int(conn.execute("SELECT count(*) FROM worker").fetchone()[0])
    dead = len(db.dead_workers(lease))
    completed, failed_attempts = totals(db)
    out = ["# HELP litemultistep_jobs Jobs of unfinished tasks by state: pending (queued, or a finalizer not "
           "reached yet), running, scheduled (failed, waiting for an automatic retry), failed.",
           "# TYPE litemultistep_jobs gauge"]
    out += [f'litemultistep_jobs{{state="{k}"}} {v}' for k, v in jobs.items()]
    out += ["# HELP litemultistep_tasks Tasks by state (finished: summaries still kept).",
            "# TYPE litemultistep_tasks gauge"]
    out += [f'litemultistep_tasks{{state="{k}"}} {v}' for k, v in tasks.items()]
    out += ["# HELP litemultistep_workers Registered workers, alive or dead (a dead one stays listed until "
            "a worker or check --repair removes it).", "# TYPE litemultistep_workers gauge",
            f'litemultistep_workers{{alive="true"}} {registered - dead}',
            f'litemultistep_workers{{alive="false"}} {dead}',
            "# HELP litemultistep_jobs_completed_total Jobs (and finalizers) completed.",
            "# TYPE litemultistep_jobs_completed_total counter",
            f"litemultistep_jobs_completed_total {completed}",
            "# HELP litemultistep_jobs_failed_total Job attempts that failed, retried or not.",
            "# TYPE litemultistep_jobs_failed_total counter",
            f"litemultistep_jobs_failed_total {failed_attempts}"]
    return "\n".join(out) + "\n"
