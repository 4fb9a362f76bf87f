"""Defaults a user sets once: ``configure(db=..., mode=...)`` and the ``LITEMULTISTEP_*`` variables.

Precedence, highest first: an explicit argument (``db=``), :func:`configure`, the environment.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidSetting, NoDatabaseConfigured
from .rules import DEFAULT_MAX_CRASHES

if TYPE_CHECKING:
    from .db import Database

Mode = Literal["async", "sync"]
Synchronous = Literal["normal", "full"]

_UNSET: Any = object()


@dataclass
class _Settings:
    db: Any = None
    mode: Mode | None = None
    synchronous: Synchronous | None = None
    keep_finished: float | None = None
    keep_history: float | None = None


_settings = _Settings()


def configure(
    db: Any = _UNSET,
    mode: Mode | None = _UNSET,
    synchronous: Synchronous | None = _UNSET,
    keep_finished: float | None = _UNSET,
    keep_history: float | None = _UNSET,
) -> None:
    """Set process-wide defaults; an argument left out keeps its current value, ``None`` resets it.

    :param db: the default database: a path or an opened :class:`litemultistep.Database`
        (else ``LITEMULTISTEP_DB``).
    :param mode: ``"async"`` (jobs wait for a worker, the default) or ``"sync"`` (each job runs inline
        in ``add_job``, the finalizers when the task becomes finalizable; for development and tests).
        Else ``LITEMULTISTEP_MODE``.
    :param synchronous: SQLite durability for databases opened from now on: ``"normal"`` (default; a
        power loss may roll back the last commits, a crashed process loses nothing) or ``"full"``
        (every commit reaches the disk). Else ``LITEMULTISTEP_SYNCHRONOUS``.
    :param keep_finished: seconds a summary of a finished task stays visible to ``status``
        (default 3600). Else ``LITEMULTISTEP_KEEP_FINISHED``.
    :param keep_history: seconds the per-minute counts of completed and failed jobs are kept, for the
        web page's throughput chart (default 86400, a day; older minutes still count in ``/metrics``'
        totals). Else ``LITEMULTISTEP_KEEP_HISTORY``.
    """
    if mode is not _UNSET and mode not in (None, "async", "sync"):
        raise InvalidSetting(f"mode must be 'async' or 'sync', not {mode!r}")
    if synchronous is not _UNSET and synchronous not in (None, "normal", "full"):
        raise InvalidSetting(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
    if keep_finished is not _UNSET and keep_finished is not None:
        keep_finished = seconds(keep_finished, "keep_finished", zero_ok=True, text_ok=True)
    if keep_history is not _UNSET and keep_history is not None:
        keep_history = seconds(keep_history, "keep_history", zero_ok=True, text_ok=True)
    for name, value in (("db", db), ("mode", mode), ("synchronous", synchronous),
                        ("keep_finished", keep_finished), ("keep_history", keep_history)):
        if value is not _UNSET:
            setattr(_settings, name, value)


def seconds(value: Any, name: str | None = None, *, zero_ok: bool = False, text_ok: bool = False) -> float:
    """``value`` as a number of seconds, or :class:`InvalidSetting` naming the setting: finite, above 0
    (or at least 0 with ``zero_ok``); text, as from a variable or an option, only with ``text_ok``.
    The one check of every duration litemultistep takes (limits, delays, leases)."""
    shown = f"{name}={value!r}" if name else repr(value)
    if text_ok and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidSetting(f"{shown} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSetting(f"{shown} is not a number of seconds")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        kind = "finite number of seconds >= 0" if zero_ok else "positive, finite number of seconds"
        raise InvalidSetting(f"{shown} is not a {kind}")
    return float(value)


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise InvalidSetting(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def mode() -> Mode:
    """The mode in force: ``"async"`` or ``"sync"``."""
    if _settings.mode is not None:
        return _settings.mode
    return _env_choice("LITEMULTISTEP_MODE", ("async", "sync"), "async")  # type: ignore[return-value]


def synchronous() -> Synchronous:
    """The ``synchronous`` setting for newly opened databases."""
    if _settings.synchronous is not None:
        return _settings.synchronous
    return _env_choice("LITEMULTISTEP_SYNCHRONOUS", ("normal", "full"), "normal")  # type: ignore[return-value]


def keep_finished() -> float:
    """Seconds a finished task's summary is kept for the status view."""
    if _settings.keep_finished is not None:
        return float(_settings.keep_finished)
    value = os.environ.get("LITEMULTISTEP_KEEP_FINISHED", "").strip()
    return seconds(value, "LITEMULTISTEP_KEEP_FINISHED", zero_ok=True, text_ok=True) if value else 3600.0


def keep_history() -> float:
    """Seconds the per-minute counts of completed and failed jobs are kept (a day by default)."""
    if _settings.keep_history is not None:
        return float(_settings.keep_history)
    value = os.environ.get("LITEMULTISTEP_KEEP_HISTORY", "").strip()
    return seconds(value, "LITEMULTISTEP_KEEP_HISTORY", zero_ok=True, text_ok=True) if value else 86400.0


def validate() -> None:
    """Check every setting now, so a bad one is refused where it is given, before anything runs."""
    mode()
    synchronous()
    keep_finished()
    keep_history()


def resolve_db(db: Any = None) -> Database:
    """The :class:`Database` for ``db``, falling back to the configured default."""
    from .db import Database, open_database

    if db is None:
        db = _settings.db
    if db is None:
        db = os.environ.get("LITEMULTISTEP_DB") or None
    if db is None:
        raise NoDatabaseConfigured(
            "no database named: pass db='path/to/app.sqlite', call "
            "litemultistep.configure(db='path/to/app.sqlite') once, or set LITEMULTISTEP_DB"
        )
    if isinstance(db, Database):
        return db
    return open_database(db)


#: the database of `litemultistep worker`, when it is not on the command line
DB_ENV = "LITEMULTISTEP_DB"


@dataclass
class WorkerOptions:
    """Everything ``litemultistep worker`` accepts (see ``litemultistep worker --help``)."""

    db: str
    #: job processes, each running one job at a time
    concurrency: int = 1
    queues: list[str] = field(default_factory=list)
    burst: bool = False
    paths: list[str] = field(default_factory=list)
    #: a worker whose lock file vanished counts as alive this long after its last heartbeat
    lease: float = 30.0
    #: most jobs handed to a job process at once while the task's jobs are short
    batch: int = 256
    #: seconds between looks at the file while idle, where inotify is not available
    poll: float = 0.02
    #: only run callables defined in these modules (empty: any)
    allow_modules: list[str] = field(default_factory=list)
    #: time limit (s) for jobs whose task sets none; None: no limit
    timeout: float | None = None
    #: seconds a graceful stop lets running jobs finish before they are stopped and put back
    shutdown_timeout: float = 30.0
    #: deaths of a job's process before the job fails with WorkerCrashed
    max_crashes: int = DEFAULT_MAX_CRASHES
    verbose: bool = False
    quiet: bool = False
    #: stop when this process is gone
    parent_pid: int | None = None

    def validate(self) -> None:
        """Refuse values that cannot work, with a message naming the setting."""
        if not isinstance(self.concurrency, int) or not 1 <= self.concurrency <= 256:
            raise InvalidSetting(f"concurrency must be a whole number from 1 to 256, not {self.concurrency!r}")
        if not isinstance(self.batch, int) or not 1 <= self.batch <= 1000:
            raise InvalidSetting(f"batch must be a whole number from 1 to 1000, not {self.batch!r}")
        if not isinstance(self.max_crashes, int) or not 1 <= self.max_crashes <= 1000:
            raise InvalidSetting(f"max_crashes must be a whole number from 1 to 1000, not {self.max_crashes!r}")
        for name, value in (("lease", self.lease), ("poll", self.poll), ("shutdown_timeout", self.shutdown_timeout)):
            seconds(value, name)
        if self.lease < 1.0:
            raise InvalidSetting(f"lease must be at least 1 second, not {self.lease!r} (a worker sends a "
                                 "heartbeat every fifth of it)")
        if self.timeout is not None:
            seconds(self.timeout, "timeout")
        for p in self.paths:
            if not os.path.isdir(p):
                raise InvalidSetting(f"--path {p}: no such directory")
        try:
            os.getcwd()  # on the import path of every job
        except FileNotFoundError:
            raise InvalidSetting("the current directory no longer exists (it was deleted): start the worker "
                                 "from one that does") from None

    def argv(self) -> list[str]:
        """The ``litemultistep worker`` command line for these options; the database goes in the
        environment (:meth:`env`), so that a URL's password never shows in the process list."""
        argv = [sys.executable, "-m", "litemultistep", "worker", "-c", str(self.concurrency),
                "--lease", repr(self.lease), "--batch", str(self.batch), "--poll", repr(self.poll),
                "--shutdown-timeout", repr(self.shutdown_timeout), "--max-crashes", str(self.max_crashes)]
        if self.timeout is not None:
            argv += ["--timeout", repr(self.timeout)]
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

    def env(self) -> dict[str, str]:
        """The environment variables that go with :meth:`argv`."""
        return {DB_ENV: self.db}
