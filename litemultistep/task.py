"""``MultiStepTask``: the gem's API, on either backend (a SQLite file or a PostgreSQL database)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

from . import config, engine, rules, views
from .db import Database, JobKind, LivenessLock
from .errors import (
    FinalizationAlreadyBegun,
    InvalidSetting,
    InvalidSlug,
    LiteMultiStepError,
    NoResult,
    NoSuchMultiStepTask,
    NotInJob,
    NotReadyForFinalization,
)
from .jobs import callable_path, encode_args
from .runner import InlineRunner, current_job
from .views import FailureInfo, Progress

log = logging.getLogger(__name__)

DEFAULT_SLUG = "multi-step-task"
MAX_SLUG_LENGTH = 200


def _check_slug(slug: Any) -> str:
    if slug is None:
        return DEFAULT_SLUG
    if not isinstance(slug, str):
        raise InvalidSlug(f"a task slug is a string, not {type(slug).__name__} {slug!r}")
    if not slug:
        raise InvalidSlug("a task slug cannot be empty; leave it out for the default 'multi-step-task'")
    if len(slug) > MAX_SLUG_LENGTH:
        raise InvalidSlug(f"a task slug is at most {MAX_SLUG_LENGTH} characters; this one has {len(slug)}")
    if "~" in slug:
        raise InvalidSlug(f"a task slug cannot contain '~' (it separates the slug from the nonce): {slug!r}")
    try:
        slug.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSlug(f"a task slug must be valid text, {slug!r} has a lone surrogate") from None
    bad = next((ch for ch in slug if not ch.isprintable()), None)
    if bad is not None:
        raise InvalidSlug(f"a task slug cannot contain control characters ({bad!r} in {slug!r})")
    return slug


MAX_RETRIES = 1000


class JobSpec:
    """A callable with per-job options, from :func:`job`; pass it to ``add_job`` in place of the callable."""

    def __init__(self, fn: Callable[..., Any], timeout: float | None = None, max_retries: int | None = None,
                 retry_delay: float | None = None, retry_on: str | None = None) -> None:
        self.fn = fn
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        #: JSON list of exception type names
        self.retry_on = retry_on

    def __repr__(self) -> str:
        return (f"job({self.fn!r}, timeout={self.timeout!r}, max_retries={self.max_retries!r}, "
                f"retry_delay={self.retry_delay!r}, retry_on={self.retry_on!r})")


def job(fn: Callable[..., Any], *, timeout: float | None = None, max_retries: int | None = None,
        retry_delay: float | None = None, retry_on: Any = None) -> JobSpec:
    """``fn`` with options for one job, over its task's, kept apart from the job's own arguments::

        task.add_job(litemultistep.job(resize, timeout=30, max_retries=2), path, width=640)

    :param timeout: this job's time limit in seconds, over the task's and the worker's.
    :param max_retries: this job's automatic retries (see :meth:`MultiStepTask.create`).
    :param retry_delay: seconds before its first automatic retry, doubling each time.
    :param retry_on: the exception classes (and their subclasses) worth retrying for this job.
    """
    if timeout is not None:
        timeout = config.seconds(timeout, "timeout")
    if max_retries is not None:
        max_retries = _check_max_retries(max_retries)
    if retry_delay is not None:
        retry_delay = config.seconds(retry_delay, "retry_delay", zero_ok=True)
    return JobSpec(fn, timeout, max_retries, retry_delay, _retry_on(retry_on))


def _check_max_retries(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_RETRIES:
        raise InvalidSetting(f"max_retries must be a whole number from 0 to {MAX_RETRIES}, not {value!r}")
    return value


def _retry_on(value: Any) -> str | None:
    """``retry_on`` as stored: a JSON list of the classes' ``module.qualname``; None for every exception."""
    if value is None:
        return None
    classes = (value,) if isinstance(value, type) else value
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (tuple, list, set, frozenset)) or not all(
            isinstance(c, type) and issubclass(c, BaseException) for c in classes):
        raise InvalidSetting(f"retry_on takes exception classes, e.g. retry_on=(ConnectionError, TimeoutError), "
                             f"not {value!r}")
    for c in classes:
        if c.__module__ == "__main__":
            raise InvalidSetting(f"retry_on names {c.__qualname__}, a class of the script being run (__main__): no job "
                                 "can raise it, since workers never import that script; define it in a module the "
                                 "jobs import")
    return json.dumps(sorted(f"{c.__module__}.{c.__qualname__}" for c in classes))


class JobHandle:
    """A job added by :meth:`MultiStepTask.add_job`: its id, and once it has run, its result (if its
    task keeps results) or its failure."""

    def __init__(self, task: MultiStepTask) -> None:
        self._task = task
        self._id: int | None = None

    def __repr__(self) -> str:
        return f"<JobHandle {self._id if self._id is not None else '(not stored yet)'} of {self._task.task_id}>"

    @property
    def job_id(self) -> int:
        """The job's id (inside a ``with`` block, asking stores the jobs added so far, still unseen by
        workers until the block ends)."""
        if self._id is None:
            self._task._flush()
        if self._id is None:
            raise NoResult(f"this job of {self._task.task_id} was never stored: its with block ended with an "
                           "exception, and the task was removed")
        return self._id

    def result(self) -> Any:
        """The job's return value.

        :raises NoResult: it has not run yet, it failed, its task does not keep results, or it is gone
            (its task finished or was nuked).
        """
        found = views.job_state(self._task._db, self.job_id)
        if found is None:
            raise NoResult(f"job {self.job_id} is no longer stored: it completed in a task that does not keep "
                           "results, or its task finished or was nuked")
        state, _, value = found
        if value is None:
            if state == "completed":
                raise NoResult(f"job {self.job_id} is a finalization job: only normal jobs' results are kept")
            raise NoResult(f"job {self.job_id} has no result: it is {state}")
        return json.loads(value)

    def failure(self) -> FailureInfo | None:
        """The job's failure, while it stands failed (None otherwise)."""
        return next((f for f in self._task.failures() if f.job_id == self.job_id), None)


class MultiStepTask:
    """A group of jobs that run in parallel, then finalization jobs that run in order.

    Make one with :meth:`create`, look one up with :meth:`find`. Every counter and predicate reads the
    database afresh. Used as a context manager, the jobs added in the block are committed when it ends
    and the task becomes finalizable; if the block raises, nothing of the task is left.
    """

    def __init__(self, task_id: str, db: Database) -> None:
        self._task_id = task_id
        self._db = db
        self._buffer: list[engine.NewJob] | None = None  # jobs of an open ``with`` block
        self._builder: tuple[int, LivenessLock] | None = None  # its worker id and lock, while the block is open
        self._handles: list[JobHandle] = []  # theirs, given ids when they are stored

    def __repr__(self) -> str:
        return f"<MultiStepTask {self._task_id} in {self._db.path}>"

    # -- making and finding -------------------------------------------------------------------------

    @classmethod
    def create(cls, slug: str | None = None, db: Any = None, *, max_retries: int = 0,
               retry_delay: float = 1.0, timeout: float | None = None, keep_results: bool = False,
               retry_on: Any = None, max_running: int | None = None, priority: int = 0) -> MultiStepTask:
        """Create a task whose id (and queue name) is ``slug~nonce``.

        :param slug: a readable name (default ``multi-step-task``); printable, at most 200 characters,
            no ``~``.
        :param db: a path or :class:`litemultistep.Database` (default: the configured one).
        :param max_retries: automatic retries of a failed job before it counts as failed (default 0,
            as in the gem).
        :param retry_delay: seconds before the first automatic retry; each next one waits twice as long
            (at most a week).
        :param timeout: seconds each job and finalizer of the task may run; past it, its process is
            killed and the job fails with :class:`JobTimeout` (retry rules apply). Default: the
            worker's ``--timeout``, else no limit. One job can have its own: :func:`litemultistep.job`.
        :param keep_results: store each normal job's return value (JSON types; anything else fails the
            job with :class:`ResultNotSerializable`) for :meth:`results`, until the task finishes.
        :param retry_on: the exception classes (and their subclasses) worth an automatic retry, e.g.
            ``(ConnectionError, TimeoutError)``; default: every exception but those no retry can cure
            (:class:`JobNotImportable`, :class:`JobNotAllowed`, :class:`ArgumentNotSerializable`,
            :class:`ResultNotSerializable`), which fail at once whatever ``max_retries`` says. A job
            may always ask for a retry: ``raise litemultistep.Retry(delay=None)``.
        :param max_running: at most this many of the task's jobs (normal and finalization) run at once,
            across every worker and host; workers serve other tasks meanwhile. Default: no limit.
        :param priority: workers serve tasks of a higher priority first (default 0; tasks of one
            priority in turn). A running job is never stopped for a more urgent one.
        """
        slug = _check_slug(slug)
        max_retries = _check_max_retries(max_retries)
        retry_delay = config.seconds(retry_delay, "retry_delay", zero_ok=True)
        if max_running is not None and (type(max_running) is not int or not 1 <= max_running <= 1_000_000):
            raise InvalidSetting(f"max_running must be a whole number from 1 to 1000000 (or None for no limit), "
                                 f"not {max_running!r}")
        if type(priority) is not int or not -rules.MAX_PRIORITY <= priority <= rules.MAX_PRIORITY:
            raise InvalidSetting(f"priority must be a whole number from {-rules.MAX_PRIORITY} to {rules.MAX_PRIORITY}, "
                                 f"not {priority!r}")
        stored_retry_on = _retry_on(retry_on)
        if timeout is not None:
            timeout = config.seconds(timeout, "timeout")
        database = config.resolve_db(db)
        if type(keep_results) is not bool:
            raise InvalidSetting(f"keep_results must be True or False, not {keep_results!r}")
        return cls(engine.create_task(database, slug, max_retries=max_retries, retry_delay=retry_delay,
                                      timeout=timeout, keep_results=keep_results, retry_on=stored_retry_on,
                                      max_running=max_running, priority=priority), database)

    @classmethod
    def find(cls, task_id: str, db: Any = None) -> MultiStepTask:
        """The task with this id; :class:`NoSuchMultiStepTask` if it does not exist or has finished."""
        database = config.resolve_db(db)
        views.check_task_id(database, task_id)
        if not engine.task_exists(database, task_id):
            raise NoSuchMultiStepTask(f"no task {task_id!r} in {database.path}: it never existed, "
                                      "finished, or was nuked")
        return cls(task_id, database)

    # -- the with block -----------------------------------------------------------------------------

    def __enter__(self) -> MultiStepTask:
        # The block's builder: registered (and its lock held) while the block is open, so that, should
        # this process die or its host vanish mid-block, any worker removes what the block stored.
        self._builder = self._db.register_worker("builder")
        try:
            engine.begin_building(self._db, self._task_id, self._builder[0])
        except BaseException:
            self._leave()
            raise
        if config.mode() == "async":
            self._buffer = []
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                try:
                    self._flush()
                    self._buffer = None
                    self.mark_finalizable()
                    return
                except BaseException:
                    self._abandon()
                    raise
            self._abandon()
        finally:
            self._leave()

    def _leave(self) -> None:
        """The block is over: its builder leaves (should that fail, its lock, released, tells)."""
        if self._builder is None:
            return
        worker_id, lock = self._builder
        self._builder = None
        try:
            engine.unregister_worker(self._db, worker_id)
        except LiteMultiStepError as e:
            log.warning("the builder of task %s could not unregister (%s); workers remove its row", self._task_id, e)
        finally:
            lock.release()

    def _abandon(self) -> None:
        """The block raised, in its body or in its own last writes: remove what it stored. Should even
        that fail (the database unreachable), the task stays hidden from workers, and any worker
        removes it once this process has ended."""
        self._buffer = None
        self._handles = []
        try:
            engine.delete_task(self._db, self._task_id)
        except NoSuchMultiStepTask:
            pass
        except LiteMultiStepError as e:
            log.warning("task %s: its with block failed and it could not be removed now (%s); it stays hidden "
                        "from workers, which remove it once this process has ended", self._task_id, e)

    def _flush(self) -> None:
        if self._buffer:
            jobs, self._buffer = self._buffer, []
            handles, self._handles = self._handles, []
            ids = engine.add_jobs(self._db, self._task_id, jobs).ids
            for handle, job_id in zip(handles, ids, strict=True):
                handle._id = job_id

    # -- adding jobs --------------------------------------------------------------------------------

    def add_job(self, fn: Callable[..., Any] | JobSpec, *args: Any, **kwargs: Any) -> JobHandle:
        """Queue ``fn(*args, **kwargs)`` as a normal job; the arguments must be JSON types. Returns a
        :class:`JobHandle`: the job's id, and later its result or failure.

        In sync mode the job runs here and now, and its exception (if any) propagates after it is
        recorded as a failure.
        """
        return self._add(JobKind.NORMAL, fn, args, kwargs)

    def add_finalization_job(self, fn: Callable[..., Any] | JobSpec, *args: Any, **kwargs: Any) -> JobHandle:
        """Queue ``fn(*args, **kwargs)`` to run after every normal job, after the finalizers added before."""
        return self._add(JobKind.FINALIZE, fn, args, kwargs)

    def _add(self, kind: int, fn: Callable[..., Any] | JobSpec, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> JobHandle:
        if isinstance(fn, JobSpec):
            job = engine.NewJob(kind, callable_path(fn.fn), encode_args(args, kwargs), fn.timeout, fn.max_retries,
                                fn.retry_delay, fn.retry_on)
        else:  # the common case, on the path of every job added: nothing built that is not needed
            job = engine.NewJob(kind, callable_path(fn), encode_args(args, kwargs))
        handle = JobHandle(self)
        if self._buffer is not None:
            self._buffer.append(job)
            self._handles.append(handle)
            if len(self._buffer) >= engine.CHUNK:
                self._flush()
        elif kind == JobKind.NORMAL and config.mode() == "sync":
            runner = InlineRunner.for_db(self._db)
            added = engine.add_jobs(self._db, self._task_id, [job], claim_for=runner.worker_id)
            handle._id = added.ids[0]
            runner.run_chain(added.claimed[0])
        else:
            handle._id = engine.add_jobs(self._db, self._task_id, [job]).ids[0]
        return handle

    # -- finalization -------------------------------------------------------------------------------

    def mark_finalizable(self) -> None:
        """Allow finalization (the gem's ``finalizable!``); it starts at once if every job is done."""
        self._flush()
        if config.mode() == "sync":
            runner = InlineRunner.for_db(self._db)
            runner.run_chain(engine.mark_finalizable(self._db, self._task_id, claim_for=runner.worker_id))
        else:
            engine.mark_finalizable(self._db, self._task_id)

    def finalize(self) -> None:
        """Start finalization now (the gem's ``finalize!``).

        :raises FinalizationAlreadyBegun: finalization has begun, or the task is gone.
        :raises NotReadyForFinalization: not finalizable, a normal job is not done, or one failed.
        """
        self._flush()
        if config.mode() == "sync":
            runner = InlineRunner.for_db(self._db)
            runner.run_chain(engine.finalize(self._db, self._task_id, claim_for=runner.worker_id))
        else:
            engine.finalize(self._db, self._task_id)

    def maybe_finalize(self) -> bool:
        """Start finalization if the task is ready for it; returns whether it started."""
        try:
            self.finalize()
        except (NoSuchMultiStepTask, NotReadyForFinalization, FinalizationAlreadyBegun):
            return False
        return True

    def nuke(self) -> int:
        """Remove the task, its queued jobs and its failures at once, finished or not; its running
        jobs and finalizers are stopped by their workers within about a second. Returns how many
        were running."""
        self._buffer = None
        return engine.delete_task(self._db, self._task_id)

    # -- identity -----------------------------------------------------------------------------------

    @property
    def task_id(self) -> str:
        """``slug~nonce``: store it to find the task again from another process."""
        return self._task_id

    @property
    def queue_name(self) -> str:
        """The name of the task's own queue (its id, as in the gem)."""
        return self._task_id

    @property
    def slug(self) -> str:
        return self._task_id.rpartition("~")[0]

    @property
    def db(self) -> Database:
        return self._db

    # -- counters -----------------------------------------------------------------------------------

    def progress(self) -> Progress:
        """Every counter in one consistent snapshot (one query); a finished task shows as complete."""
        self._flush()
        return views.progress(self._db, self._task_id)

    @property
    def normal_job_count(self) -> int:
        return self.progress().normal_job_count

    @property
    def finalize_job_count(self) -> int:
        return self.progress().finalize_job_count

    @property
    def total_job_count(self) -> int:
        """Normal plus finalization jobs."""
        return self.progress().total_job_count

    @property
    def completed_count(self) -> int:
        """Jobs (normal and finalization) that ran and returned; each counts once."""
        return self.progress().completed_count

    @property
    def failed_count(self) -> int:
        """Jobs whose last attempt failed and that have not been retried since."""
        return self.progress().failed_count

    @property
    def finalizable(self) -> bool:
        return self.progress().finalizable

    @property
    def ready_for_finalization(self) -> bool:
        """Finalizable and every normal job completed (the gem's ``ready_for_finalization?``)."""
        p = self.progress()
        return rules.ready_for_finalization(p.finalizable, p.normal_job_count, p.completed_count)

    @property
    def incomplete_because_of_errors(self) -> bool:
        """Some job failed and the normal jobs are not all complete."""
        p = self.progress()
        return p.failed_count > 0 and p.completed_count < p.normal_job_count

    @property
    def unfinalized_because_of_errors(self) -> bool:
        """Some job failed and the task (finalizers included) is not complete."""
        p = self.progress()
        return p.failed_count > 0 and p.completed_count < p.total_job_count

    # -- failures and waiting -----------------------------------------------------------------------

    def failures(self) -> list[FailureInfo]:
        """The task's failed jobs, each with its exception, message and traceback."""
        return views.failures(self._db, self._task_id)

    # -- results ------------------------------------------------------------------------------------

    def results(self) -> Iterator[Any]:
        """The return values of the task's succeeded normal jobs, in the order the jobs were added,
        each once (a job that ran twice gives the result of the run that was recorded). Streamed a
        page at a time, so a million results take little memory. For a task created with
        ``keep_results=True``; while it lives (in its finalizers, typically: once the last finalizer
        ran, the results go with the task).

        :raises NoResult: the task does not keep results.
        :raises NoSuchMultiStepTask: the task is gone.
        """
        return views.results(self._db, self._task_id)

    def job_results(self) -> Iterator[views.JobResult]:
        """As :meth:`results`, each as a :class:`JobResult` with the job's id and arguments."""
        return views.results(self._db, self._task_id, details=True)

    def retry_failed(self) -> int:
        """Requeue every failed job (in sync mode: run them now); returns how many."""
        ids = engine.retry_task(self._db, self._task_id)
        if config.mode() == "sync":
            runner = InlineRunner.for_db(self._db)
            for job_id in ids:
                runner.run_chain(engine.claim_specific(self._db, runner.worker_id, job_id))
        return len(ids)

    def watch(self, interval: float = 0.5) -> Iterator[Progress]:
        """Yield a progress snapshot every ``interval`` seconds until the task finishes or is blocked.

        The last snapshot of a finished task shows it complete (completed equals total).
        """
        while True:
            p = self.progress()
            yield p
            if p.settled:
                return
            time.sleep(interval)

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> Progress:
        """Block until the task finishes or is blocked by failures; returns the last snapshot.

        :raises TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            p = self.progress()
            if p.settled:
                return p
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self._task_id} did not finish within {timeout} s "
                                   f"({p.completed_count}/{p.total_job_count} done)")
            time.sleep(interval)

    async def watch_async(self, interval: float = 0.5) -> AsyncIterator[Progress]:
        """:meth:`watch` for asyncio: the database is read in a thread, the loop never blocks."""
        while True:
            p = await asyncio.to_thread(self.progress)
            yield p
            if p.settled:
                return
            await asyncio.sleep(interval)

    async def wait_async(self, timeout: float | None = None, interval: float = 0.1) -> Progress:
        """:meth:`wait` for asyncio."""
        async def _wait() -> Progress:
            while True:
                p = await asyncio.to_thread(self.progress)
                if p.settled:
                    return p
                await asyncio.sleep(interval)
        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"task {self._task_id} did not finish within {timeout} s") from None


def current_task() -> MultiStepTask:
    """The task of the job running now, so a job can add jobs to its own task.

    :raises NotInJob: outside a job.
    """
    running = current_job.get()
    if running is None:
        raise NotInJob("current_task() is only available inside a running job")
    db, task_id = running
    return MultiStepTask(task_id, config.resolve_db(db))  # a job process opens its database on first use
