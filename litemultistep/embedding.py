"""Starting and stopping worker processes from inside an application."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import TracebackType
from typing import Any

from .config import resolve_db
from .errors import WorkersNotStarted
from .worker import PARENT_PID_ENV, WorkerOptions

log = logging.getLogger(__name__)


class Workers:
    """A real ``litemultistep worker``, started and stopped by an application.

    It is spawned (a fresh interpreter, safe from GUI toolkits and threads) in a process group of
    its own, with its job processes, and stops by itself if the application dies.

    :param db: the database path or URL (or :class:`litemultistep.Database`); default: the configured one.
    :param concurrency: job processes, each running one job at a time (``worker -c``).
    :param queues: globs of task queues to serve (default: all).
    :param burst: the workers exit once nothing is queued or running.
    :param options: any other ``WorkerOptions`` field (``lease``, ``batch``, ``poll``, ``paths``,
        ``allow_modules``, ``quiet``, ``verbose``).
    """

    def __init__(self, db: Any = None, concurrency: int = 1, queues: list[str] | None = None,
                 burst: bool = False, **options: Any) -> None:
        paths = list(options.pop("paths", []))
        main_dir = sys.path[0] if sys.path and sys.path[0] else ""
        if main_dir and os.path.isdir(main_dir):
            paths.append(main_dir)  # the application's own directory, so its job modules import
        self.options = WorkerOptions(db=resolve_db(db).target, concurrency=concurrency, queues=list(queues or []),
                                     burst=burst, paths=paths, **options)
        self.options.validate()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Workers:
        """Start the processes (returns at once)."""
        if self.alive:
            return self
        env = {**os.environ, **self.options.env(), PARENT_PID_ENV: str(os.getpid())}
        self.process = subprocess.Popen(self.options.argv(), start_new_session=True, env=env)
        return self

    @property
    def alive(self) -> bool:
        """Whether the workers are running."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """Pid of the worker process (its job processes are its children)."""
        return self.process.pid if self.process else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the workers to exit by themselves (with ``burst``); returns the exit status."""
        if self.process is None:
            raise WorkersNotStarted("the workers were never started: call start() first, or use a with block")
        return self.process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop as ``litemultistep worker`` stops on SIGTERM: running jobs finish, for at most the
        ``shutdown_timeout`` option (30 s), then they are stopped and go back to their queues.

        ``timeout`` (default: ``shutdown_timeout`` plus 5 s) bounds the whole wait; past it every
        process of the group is killed. Returns the exit status (0: every running job finished).
        """
        if timeout is None:
            timeout = self.options.shutdown_timeout + 5.0
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("workers did not stop within %.1f s; killing them", timeout)
        # the whole group, should any process of it outlive the worker (its job processes die with it)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        _reap_group_wait(proc.pid)
        return code

    def __enter__(self) -> Workers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _reap_group_wait(pgid: int, timeout: float = 5.0) -> None:
    """Wait until no process of the group is left (orphans are reaped by init, not by us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)
