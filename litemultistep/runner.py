"""Running a claimed job in this process: the code that worker processes, sync mode and
``drain`` share, so a job runs the same way everywhere.
"""

from __future__ import annotations

import atexit
import contextvars
import inspect
import json
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import engine, rules
from .db import Database
from .engine import ClaimedJob, Outcome
from .errors import InvalidSetting, NotInJob, ResultNotSerializable, Retry
from .jobs import decode_args, describe_call, encode_result, resolve

log = logging.getLogger(__name__)

#: (database, task id) of the job running in this context, for ``current_task()``
current_job: contextvars.ContextVar[tuple[Database | str, str] | None] = contextvars.ContextVar(
    "litemultistep_current_job", default=None)


@dataclass(frozen=True)
class Result:
    """An :class:`Outcome` plus, for a failure, the live exception (never stored)."""

    outcome: Outcome
    error: BaseException | None = None
    duration: float = 0.0
    #: what the job returned (for a job whose task keeps results, it is in the outcome as JSON too)
    value: Any = None


#: ``time.monotonic()`` by which the running job must end, for :func:`time_left`
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("litemultistep_deadline", default=None)


def time_left() -> float | None:
    """Seconds the running job has left before its time limit stops it; None without a limit.

    :raises NotInJob: outside a job.
    """
    if current_job.get() is None:
        raise NotInJob("time_left() is only available inside a running job")
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


#: where :func:`report` sends a running job's progress: set by whoever runs the job
_reporter: contextvars.ContextVar[Callable[[float, float | None], None] | None] = contextvars.ContextVar(
    "litemultistep_reporter", default=None)


#: the largest number :func:`report` takes: far more steps than a job can count, and small enough
#: that the sums over a task's running jobs stay finite and exact in every database
REPORT_LIMIT = 10**15


def report(done: float, total: float | None = None) -> None:
    """Tell how far the running job has come: ``done`` (of ``total``, if known). ``status``, ``watch``
    and :meth:`MultiStepTask.progress` show it. Cheap enough to call in a tight loop: in a worker it
    lands in memory shared with the worker, which stores the latest value every two seconds; inline
    (sync mode, ``drain``) it is stored at most once a second.

    :param done: how much is done: an int or float from 0 to :data:`REPORT_LIMIT` (10**15).
    :param total: how much there is to do, in the same range, or None when not known.
    :raises NotInJob: outside a job.
    :raises InvalidSetting: a number that is negative, not finite or over 10**15, or ``done`` over
        ``total``.
    """
    reporter = _reporter.get()
    if reporter is None:
        raise NotInJob("report() is only available inside a running job")
    for name, value in (("done", done), ("total", total)):
        if value is None and name == "total":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= REPORT_LIMIT:
            shown = f"an int of {value.bit_length()} bits" if type(value) is int and value > 2**64 else f"{value!r:.60}"
            raise InvalidSetting(f"report(): {name} must be a number from 0 to 10**15, not {shown}")
    if total is not None and done > total:
        raise InvalidSetting(f"report(): done ({done!r}) is more than total ({total!r})")
    reporter(float(done), None if total is None else float(total))


class ThrottledReport:
    """A reporter that stores a job's progress in the database at most once every ``every`` seconds."""

    def __init__(self, db: Database, worker_id: int, job_id: int, every: float = 1.0) -> None:
        self.db, self.worker_id, self.job_id, self.every = db, worker_id, job_id, every
        self._next = 0.0

    def __call__(self, done: float, total: float | None) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            engine.report_progress(self.db, self.worker_id, [(self.job_id, done, total)])


def _type_name(exc: BaseException) -> str:
    """The exception's type as stored: text a database takes, whatever the class calls itself (a job
    can give its exception class a name with a lone surrogate, or a ``__module__`` that is no string)."""
    cls = type(exc)
    try:
        module = cls.__module__
        # ours by their public name, as the failures the worker records itself (litemultistep.JobTimeout)
        module = "litemultistep" if module == "litemultistep.errors" else module
        name = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
        return clean_text(name)
    except BaseException:  # noqa: BLE001 - a hostile class cannot stop its failure from being recorded
        return "<an exception type whose name could not be read>"


def _text(exc: BaseException) -> str:
    """``str(exc)``, even when the exception's own ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException as e:  # noqa: BLE001 - whatever a broken __str__ raises, the failure is recorded
        return f"<str() of this {type(exc).__name__} raised {type(e).__name__}>"


clean_text = rules.storable_text


def _traceback() -> str:
    try:
        return traceback.format_exc()
    except BaseException:  # noqa: BLE001 - a traceback of a hostile exception cannot stop the record
        return "<the traceback could not be formatted>"


def execute(db: Database | str, job: ClaimedJob, catch_all: bool = False, timeout: float | None = None,
            reporter: Callable[[float, float | None], None] | None = None) -> Result:
    """Run one claimed job; an exception of the job (even ``SystemExit``) becomes a failure.

    ``db`` is the database the job's :func:`~litemultistep.current_task` talks to (or its path or
    URL: a job process opens it only when a job asks for it).

    With ``catch_all`` (in a worker's job process) every ``BaseException`` does, ``KeyboardInterrupt``
    included; inline (sync mode, ``drain``) those reach the caller, whose process it is.
    """
    token = current_job.set((db, job.task_id))
    rtoken = _reporter.set(reporter or _ignore)
    start = time.perf_counter()
    dtoken = _deadline.set(None if timeout is None else time.monotonic() + timeout)
    # one line at its start, its end and its failure, each naming it "job" or "finalizer" with its
    # attempt, at DEBUG: a line a job costs more than the work of a short job (the worker logs what
    # its jobs ran every 10 s at INFO, and whoever records a failure logs it at WARNING or ERROR)
    what = "finalizer" if job.is_finalizer else "job"
    debug = log.isEnabledFor(logging.DEBUG)
    if debug:
        log.debug("start %s %d of %s (attempt %d): %s", what, job.id, job.task_id, job.attempt,
                  describe_call(job.func, job.args))
    catch: tuple[type[BaseException], ...] = (BaseException,) if catch_all else (Exception, SystemExit)
    try:
        fn = resolve(job.func)
        args, kwargs = decode_args(job.args)
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            import asyncio  # here: most jobs are not coroutines, and asyncio is slow to import

            result = asyncio.run(_await(result))
    except catch as e:
        duration = time.perf_counter() - start
        message = clean_text(_text(e))
        log.debug("failed %s %d of %s (attempt %d) after %.3fs: %s", what, job.id, job.task_id, job.attempt,
                  duration, _type_name(e))
        retryable, delay = retry_of(e, job.retry_on)
        outcome = Outcome(job, False, _type_name(e), message, clean_text(_traceback()), duration,
                          retryable=retryable, retry_delay=delay)
        return Result(outcome, e, duration)
    finally:
        current_job.reset(token)
        _reporter.reset(rtoken)
        _deadline.reset(dtoken)
    duration = time.perf_counter() - start
    stored = None
    if job.keep:
        try:
            stored = encode_result(result)
        except ResultNotSerializable as e:
            log.debug("failed %s %d of %s (attempt %d): %s", what, job.id, job.task_id, job.attempt, e)
            return Result(Outcome(job, False, "litemultistep.ResultNotSerializable", clean_text(str(e)), "",
                                  duration, retryable=False), e, duration)
    if debug:
        log.debug("done %s %d of %s (attempt %d) in %.3fs", what, job.id, job.task_id, job.attempt, duration)
    return Result(Outcome(job, True, duration=duration, result=stored), None, duration, result)


def retry_of(error: BaseException | type[BaseException], retry_on: str | None) -> tuple[bool, float | None]:
    """Whether a job's failure may be retried automatically (by its ``retry_on``, a JSON list of type
    names; a :class:`Retry` always may, what no retry can cure never), and the delay it asked for."""
    cls = error if isinstance(error, type) else type(error)
    try:
        names = rules.type_names(cls)
    except Exception:  # noqa: BLE001 - a class that hides its names is retried as any other exception
        names = frozenset()
    retryable = rules.may_retry(names, None if retry_on is None else frozenset(json.loads(retry_on)))
    delay = getattr(error, "delay", None) if isinstance(error, Retry) else None
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < math.inf:
        delay = None
    return retryable, None if delay is None else float(delay)


def _ignore(done: float, total: float | None) -> None:
    return None


async def _await(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]


class InlineRunner:
    """This process's worker identity on one database, for sync mode and ``drain``.

    It holds a worker lock like a worker process, so if this process dies, the jobs it held are
    recovered by any worker; it has no heartbeat (liveness is its lock alone).
    """

    _runners: dict[tuple[str, int], InlineRunner] = {}
    _guard = threading.Lock()

    def __init__(self, db: Database) -> None:
        self.db = db
        self.worker_id, self._lock = db.register_worker("inline")

    @classmethod
    def for_db(cls, db: Database) -> InlineRunner:
        key = (db.target, os.getpid())
        with cls._guard:
            runner = cls._runners.get(key)
            if runner is None:
                runner = cls._runners[key] = cls(db)
            return runner

    def close(self) -> None:
        try:
            engine.unregister_worker(self.db, self.worker_id)
        finally:
            self._lock.release()

    def run_chain(self, job: ClaimedJob | None, raise_errors: bool = True) -> list[Result]:
        """Run ``job`` and the finalizers its completion hands to this runner, in order. A failure
        whose automatic retry was scheduled (``max_retries``, ``retry_on``) is retried at once.

        With ``raise_errors`` a job's exception is re-raised once it has finally failed (after its
        failure is recorded).
        """
        results = []
        while job is not None:
            result = execute(self.db, job, reporter=ThrottledReport(self.db, self.worker_id, job.id))
            results.append(result)
            outcome = result.outcome
            if not outcome.ok:
                # its retry, if any, runs now, not after its back-off: its failure line says so
                outcome = replace(outcome, retry_delay=0.0)
            handed = engine.record(self.db, self.worker_id, [outcome])
            if result.error is not None:
                again = engine.retry_now(self.db, self.worker_id, job.id)
                if again is not None:
                    job = again
                    continue
                if raise_errors:
                    raise result.error
            job = handed[0] if handed else None
        return results


@atexit.register
def _close_inline_runners() -> None:
    for (_, pid), runner in list(InlineRunner._runners.items()):
        if pid == os.getpid():
            try:
                runner.close()
            except Exception:  # the database may be gone (a test's temp dir): nothing left to tidy
                pass
    InlineRunner._runners.clear()


@dataclass(frozen=True)
class FailedAttempt:
    """One failed attempt of a job that :func:`drain` ran: what its failure record holds."""

    job_id: int
    task_id: str
    #: the job's callable (``module:qualname``) and its stored ``[args, kwargs]`` JSON
    func: str
    args: str
    #: whether it is a finalization job
    finalizer: bool
    #: which attempt of the job this was (from 1)
    attempt: int
    #: the exception's class (with its module unless a builtin), its ``str()``, and the traceback
    exc_type: str
    message: str
    traceback: str
    #: seconds it ran
    duration: float

    @classmethod
    def of(cls, outcome: Outcome) -> FailedAttempt:
        job = outcome.job
        return cls(job.id, job.task_id, job.func, job.args, job.is_finalizer, job.attempt, outcome.exc_type,
                   outcome.message, outcome.traceback, outcome.duration)


@dataclass
class DrainSummary:
    """What :func:`drain` (and the pytest fixture ``litemultistep_drain``) did.

    ``completed`` and ``failed`` are the older names of ``completed_jobs`` and ``failed_attempts``.
    """

    #: jobs and finalizers that ran and returned
    completed_jobs: int = 0
    #: attempts that failed: a job that failed twice, then succeeded on its automatic retry, counts 2
    failed_attempts: int = 0
    #: jobs still failed at the end: their last attempt failed (drain runs every automatic retry, so
    #: these are out of retries); each job once
    failed_jobs: int = 0
    #: ids of the tasks whose last finalizer ran (they are gone now), sorted
    finalized: list[str] = field(default_factory=list)
    #: every failed attempt, in the order they ran
    failures: list[FailedAttempt] = field(default_factory=list)
    #: for tasks that keep results: each task's results, in the order its jobs were added
    results: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        """The older name of :attr:`completed_jobs`."""
        return self.completed_jobs

    @property
    def failed(self) -> int:
        """The older name of :attr:`failed_attempts`."""
        return self.failed_attempts


def drain(db: Database, raise_on_failure: bool = False, queues: list[str] | None = None) -> DrainSummary:
    """Run every queued job, normal and finalization, in this process until none is left.

    Automatic retries that are waiting for their delay run at once. With ``raise_on_failure`` the first
    job exception is re-raised with its traceback (after its failure is recorded).

    :param queues: only the tasks whose id matches one of these globs (as ``worker --queues``).
    :returns: a :class:`DrainSummary` of what ran.
    """
    runner = InlineRunner.for_db(db)
    summary = DrainSummary()
    touched: set[str] = set()
    kept: dict[str, list[tuple[int, Any]]] = {}
    last_failed: dict[int, bool] = {}
    while True:
        batches = engine.claim(db, runner.worker_id, max_batch=1, queues=queues)
        if not batches:
            if engine.promote_scheduled(db, due_by=float("inf")):
                continue
            break
        for result in runner.run_chain(batches[0][0], raise_errors=raise_on_failure):
            job = result.outcome.job
            touched.add(job.task_id)
            last_failed[job.id] = not result.outcome.ok
            if result.outcome.ok:
                summary.completed_jobs += 1
                if job.keep:
                    kept.setdefault(job.task_id, []).append((job.id, result.value))
            else:
                summary.failed_attempts += 1
                summary.failures.append(FailedAttempt.of(result.outcome))
    summary.failed_jobs = sum(last_failed.values())
    summary.finalized = sorted(t for t in touched if engine.task_finished(db, t))
    summary.results = {t: [value for _, value in sorted(pairs, key=lambda p: p[0])] for t, pairs in kept.items()}
    return summary
