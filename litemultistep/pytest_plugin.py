"""pytest fixtures for code that uses litemultistep: the real engine on a real temporary file.

Registered through the ``pytest11`` entry point, so installing litemultistep is all it takes:

* ``litemultistep_db``: a fresh database file in the test's ``tmp_path``, the default for the test (with
  ``--litemultistep-postgres URL``: a fresh schema in that PostgreSQL database, dropped afterwards);
* ``litemultistep_sync``: sync mode for the test (jobs run inline in ``add_job``);
* ``litemultistep_drain``: run every queued job in this process, through the worker's own code;
* ``litemultistep_worker``: real ``litemultistep worker`` processes for the test, stopped at teardown,
  with ``crash_once()`` to make a job's process die at a chosen point of a chosen job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from . import config
from .config import resolve_db
from .embedding import Workers
from .jobproc import CRASH_FILE_ENV
from .jobs import callable_path
from .runner import DrainSummary, drain
from .task import MultiStepTask
from .views import Progress


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--litemultistep-postgres", metavar="URL", default=None,
                     help="run litemultistep's fixtures on this PostgreSQL database (a fresh schema per test) "
                          "instead of a SQLite file")


@pytest.fixture
def litemultistep_db(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database, set as the default database for the test (then unset): the path of a new
    SQLite file, or with ``--litemultistep-postgres URL`` the URL of a new schema in that database."""
    server = request.config.getoption("--litemultistep-postgres")
    saved = config._settings.db
    with ExitStack() as stack:
        if server:
            from .pg import temporary_schema

            target = stack.enter_context(temporary_schema(server))
        else:
            target = str(tmp_path / "litemultistep.sqlite")
        config.configure(db=target)
        try:
            yield target
        finally:
            config._settings.db = saved


@pytest.fixture
def litemultistep_sync() -> Iterator[None]:
    """Sync mode for the test: each job runs inline in ``add_job``, finalizers when finalizable."""
    saved = config._settings.mode
    config.configure(mode="sync")
    try:
        yield
    finally:
        config._settings.mode = saved


@pytest.fixture
def litemultistep_drain(litemultistep_db: str) -> Callable[..., DrainSummary]:
    """A callable that runs every queued job, normal and finalization, in this process until none is
    left, and returns a :class:`~litemultistep.DrainSummary`: ``completed_jobs``, ``failed_attempts``,
    ``failed_jobs`` (still failed at the end), ``finalized`` task ids, ``failures`` (each a
    :class:`~litemultistep.FailedAttempt`) and ``results``.

    ``litemultistep_drain(raise_on_failure=True)`` re-raises the first job exception, so a failing
    job fails the test with its own traceback.
    """

    def run(raise_on_failure: bool = False, db: Any = None, queues: list[str] | None = None) -> DrainSummary:
        return drain(resolve_db(db), raise_on_failure=raise_on_failure, queues=queues)

    return run


class WorkerFixture:
    """Real worker processes on the test's database, stopped when the test ends."""

    def __init__(self, db: str, tmp: Path) -> None:
        self.db = db
        self._tmp = tmp
        self._workers: list[Workers] = []
        self._crash_file = str(tmp / "litemultistep-crash")
        os.environ[CRASH_FILE_ENV] = self._crash_file

    def start(self, concurrency: int = 2, **options: Any) -> Workers:
        """Start ``concurrency`` more worker processes (options as for :class:`litemultistep.Workers`)."""
        options.setdefault("lease", 5.0)
        workers = Workers(self.db, concurrency=concurrency, **options).start()
        self._workers.append(workers)
        return workers

    def crash_once(self, fn: Callable[..., Any], when: str = "after-run") -> None:
        """Make the first process that runs a job of ``fn`` die at once, as a crash would: nothing of
        that run is recorded.

        ``when`` is ``"after-claim"`` (before the job runs) or ``"after-run"`` (it ran; its result
        is lost). The worker sees its job process die, counts the crash, and the job runs again: use
        it to prove a job idempotent. Workers started before this call see it too.
        """
        if when not in ("after-claim", "after-run"):
            raise ValueError(f"when must be 'after-claim' or 'after-run', not {when!r}")
        with open(self._crash_file, "w") as f:
            f.write(f"{when} {callable_path(fn)}\n")

    @property
    def crashed(self) -> bool:
        """Whether the crash set by :meth:`crash_once` has happened."""
        return os.path.exists(self._crash_file + ".fired")

    def wait(self, task: MultiStepTask | str, timeout: float = 30.0) -> Progress:
        """Wait until the task finishes or is blocked by failures; returns its last snapshot."""
        if isinstance(task, str):
            task = MultiStepTask(task, resolve_db(self.db))
        return task.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker: gracefully, then by force after ``timeout``."""
        for workers in self._workers:
            workers.stop(timeout)
        self._workers.clear()


@pytest.fixture
def litemultistep_worker(litemultistep_db: str, tmp_path: Path) -> Iterator[WorkerFixture]:
    """Two real ``litemultistep worker`` processes on the test's database (``.start()`` adds more),
    stopped at teardown; ``.wait(task)`` waits for a task, ``.crash_once(fn)`` crashes a worker."""
    fixture = WorkerFixture(litemultistep_db, tmp_path)
    saved = os.environ.get(CRASH_FILE_ENV)
    fixture.start()
    try:
        yield fixture
    finally:
        fixture.stop()
        if saved is None:
            os.environ.pop(CRASH_FILE_ENV, None)
        else:
            os.environ[CRASH_FILE_ENV] = saved
