"""The backend contract: what a litemultistep database must do, whichever server (or file) it lives on.

:class:`Database` names every operation the engine, the worker and the views need of a backend, and
nothing above the backends asks which one it runs on. Two implement it:

* :mod:`litemultistep.sqlite`: one SQLite file in WAL mode, the embedded default (any path);
* :mod:`litemultistep.pg`: a PostgreSQL database, for workers on many hosts (a ``postgresql://`` URL).

``Database(target)`` (or :meth:`Database.open`) is the one factory: it opens the backend the target
names. Both backends speak the same SQL text, with ``?`` placeholders, on a connection that follows
:class:`Connection`; the few things they say differently are named by its :class:`Dialect`. What
differs beyond SQL is named here, once, as a method each backend implements:

* **writes**: :meth:`Database.write` is one short transaction (``BEGIN IMMEDIATE`` on SQLite, row
  locks taken as rows are touched on PostgreSQL);
* **liveness**: a worker holds a lock while it lives (an OS ``flock`` on SQLite, a session advisory
  lock on PostgreSQL); :meth:`~Database.register_worker`, :meth:`~Database.heartbeat`,
  :meth:`~Database.dead_workers` and :meth:`~Database.end_session` are all the engine knows of it;
* **wake-ups**: :meth:`Database.waiter` is what an idle worker sleeps on (an inotify watch of the
  ``-wal`` file; ``LISTEN``), and :meth:`Connection.notify` what a transaction says to wake it;
* **maintenance**: :meth:`~Database.tidy`, :meth:`~Database.checkpoint`, :meth:`~Database.integrity`.
"""

from __future__ import annotations

import abc
import functools
import os
import re
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from .errors import DatabaseUnusable, LiteMultiStepError

#: Version of the schema this litemultistep writes; an older database is upgraded, a newer one refused.
SCHEMA_VERSION = 7


class TaskState(IntEnum):
    """Where a task stands. A finished task has no row at all (``find`` raises, as in the gem)."""

    #: inside its ``with`` block: its jobs are stored but no worker sees them yet
    BUILDING = 0
    #: normal jobs run; finalization starts when it is finalizable and every normal job succeeded
    ACTIVE = 1
    #: the finalization jobs run, one after another
    FINALIZING = 2


class JobState(IntEnum):
    """Where a job stands. A normal job that succeeded is deleted (the task's counters keep it), or, if
    its task keeps results, kept COMPLETED with its result."""

    QUEUED = 1
    RUNNING = 2
    #: a finalization job that succeeded (kept so the status view can show the chain), or a normal job
    #: kept with its result
    COMPLETED = 3
    FAILED = 4
    #: failed, with an automatic retry due at ``run_at``
    SCHEDULED = 5
    #: a finalization job the chain has not reached yet
    WAITING = 6


class JobKind(IntEnum):
    NORMAL = 0
    FINALIZE = 1


#: which tasks a claim may serve: the WHERE terms of the task_claimable index on both backends, which
#: every query that means to use that index repeats word for word (SQLite requires it)
CLAIMABLE = "pending_count > 0 AND state IN (1, 2) AND (max_running IS NULL OR running_count < max_running)"

#: the schema's tables, the same on every backend (``throughput``: jobs completed and failed per minute)
TABLES = ("task", "job", "failure", "worker", "finished_task", "throughput")


@dataclass(frozen=True)
class Dialect:
    """What the engine's SQL says differently on each backend (everything else is the same text)."""

    name: str
    #: the largest job id ever given out, even if that job is gone
    max_job_id: str
    #: ends the sub-select that picks the jobs a claim takes: concurrent claims skip each other's rows
    skip_locked: str = ""
    #: ends a SELECT of a task row that a transaction decides from (and then changes)
    lock_row: str = ""

    def glob(self, pattern: str) -> tuple[str, str]:
        """A condition on ``task_id`` matching a queue glob (``*``, ``?``, ``[...]``), and its parameter."""
        return "task_id GLOB ?", pattern

    def among(self, column: str, values: Sequence[int]) -> tuple[str, list[Any]]:
        """A condition that ``column`` is one of ``values``, and its parameters."""
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def insert_many(self, c: Any, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        """Insert ``rows`` with ``sql`` (an INSERT into a table with an AUTOINCREMENT key); their ids,
        in order. Within one write transaction SQLite gives them consecutive ids."""
        c.executemany(sql, rows)
        last = int(c.execute("SELECT last_insert_rowid()").fetchone()[0])
        return list(range(last - len(rows) + 1, last + 1))


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the engine needs of a connection: the SQL (``?`` placeholders), its dialect, and a way to
    wake idle workers."""

    @property
    def dialect(self) -> Dialect: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...

    def notify(self) -> None:
        """Wake idle workers once this transaction commits (jobs became claimable, or work ran out)."""

    def lock_task(self, task_pk: int) -> bool:
        """Take, for the rest of this write transaction, the right to claim jobs of a task that has a
        running limit, or False at once if another transaction has it (the two would not see each
        other's claims). Never waits."""


class LivenessLock(Protocol):
    """What a worker holds while it lives, and loses the instant it dies."""

    @property
    def path(self) -> str: ...

    @property
    def shared(self) -> str | None:
        """A file the worker's job processes lock too (``flock``, shared) while they live, so that a
        worker killed outright counts as alive until they, and what their jobs started, have ended;
        None where the backend fences otherwise (a lease that job processes watch themselves)."""

    def intact(self) -> bool: ...

    def renew(self) -> str: ...

    def release(self) -> None: ...


class Waiter(Protocol):
    """What an idle worker sleeps on to learn that another process made work for it."""

    def fileno(self) -> int | None:
        """A descriptor readable when something changed, or None: look again every ``poll`` seconds."""

    def changed(self) -> bool:
        """Whether something changed since the last call (and drain what woke us)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeadWorker:
    """A registered worker found dead: its id, its pid (on its own host) and its lock's name."""

    id: int
    pid: int
    lock_path: str


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(target: object) -> str | None:
    """The scheme of ``target`` if it is a URL (``postgresql``), else None (a file path)."""
    if not isinstance(target, str):
        return None
    m = _SCHEME.match(target)
    return m.group(1).lower() if m else None


def is_url(target: object) -> bool:
    """Whether ``target`` is a URL (a database server) rather than the path of a SQLite file."""
    return url_scheme(target) is not None


def backend_for(target: str | os.PathLike[str]) -> type[Database]:
    """The :class:`Database` class that opens ``target``: a path, or a URL whose scheme names a backend."""
    scheme = url_scheme(os.fspath(target))
    if scheme is None:
        from .sqlite import SqliteDatabase

        return SqliteDatabase
    if scheme in ("postgresql", "postgres"):
        from .pg import PostgresDatabase

        return PostgresDatabase
    raise DatabaseUnusable(f"unknown database URL scheme {scheme!r}: litemultistep opens a SQLite file (a path) "
                           "or a PostgreSQL database (postgresql://user@host/dbname)")


class Database(abc.ABC):
    """One litemultistep database, opened in this process: ``Database("app.sqlite")`` opens a SQLite
    file (created, owner-only, if missing); ``Database("postgresql://user@host/dbname")`` a PostgreSQL
    database (``pip install 'litemultistep[postgres]'``).

    Each thread gets its own connection; a connection is never used across ``fork``: a child opens
    fresh ones (the parent's are left untouched).

    :param target: the SQLite file's path, or a URL.
    :param create: when false, a missing file (or a database without litemultistep's tables) is an
        error: reading commands never create one.
    """

    #: the backend's SQL differences
    dialect: Dialect
    #: what another process opens to reach the same database (the path, or the full URL)
    target: str
    #: how messages name the database (the path, or the URL without its password)
    path: str

    def __new__(cls, target: str | os.PathLike[str], *, create: bool = True) -> Database:
        if cls is Database:
            cls = backend_for(target)
        return object.__new__(cls)

    @staticmethod
    def open(target: str | os.PathLike[str], *, create: bool = True) -> Database:
        """The one factory: open ``target`` with the backend it names (as ``Database(target)`` does)."""
        return backend_for(target)(target, create=create)

    def __repr__(self) -> str:
        return f"<litemultistep.Database {self.path}>"

    @classmethod  # noqa: B027 - most backends have nothing to trim
    def prepare_worker_process(cls) -> None:
        """Called once by ``litemultistep worker``, a process that runs no user code, before it opens
        the database: a backend may trim what the process imports."""

    # -- connections and transactions ---------------------------------------------------------------

    @abc.abstractmethod
    def connection(self) -> Connection:
        """This thread's connection, opened on first use (and again after a fork, or once lost)."""

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[Connection]:
        """A short write transaction, committed when the block ends and rolled back if it raises.
        Errors come as :class:`~litemultistep.errors.StorageError` (a retry may cure them) or
        :class:`~litemultistep.errors.DatabaseUnusable`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close this thread's connection (another use reopens it)."""

    @abc.abstractmethod
    def driver_error(self, error: BaseException) -> LiteMultiStepError | None:
        """The litemultistep error, with its advice, for an error the backend's driver raised where
        nothing translated it (a read on a corrupt file, say); None for any other exception."""

    @abc.abstractmethod
    def still_there(self) -> bool:
        """Whether the database this object opened is still the one its target names (a SQLite file
        can be deleted or replaced under a process)."""

    # -- schema -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version stored in the database (:data:`SCHEMA_VERSION` once opened)."""

    # -- waiting for work ---------------------------------------------------------------------------

    @abc.abstractmethod
    def waiter(self, poll: float, brief: bool = False) -> Waiter:
        """What an idle worker waits on to learn that another process committed work. ``brief``: for
        a worker that exits once it finds nothing left (``--burst``), where a backend may rather look
        every ``poll`` seconds than set up what would cost it time on its way out."""

    # -- worker liveness ----------------------------------------------------------------------------

    @abc.abstractmethod
    def register_worker(self, kind: str, queues: Sequence[str] | None = None, lease: float | None = None,
                        concurrency: int = 1) -> tuple[int, LivenessLock]:
        """Add a worker's row and take its lock, so that once others can see the row, its lock is
        held; returns the worker's id and its lock. ``kind`` is ``"process"`` (a worker with a
        heartbeat and a ``lease``) or ``"inline"`` (sync mode, ``drain``: its lock alone)."""

    @abc.abstractmethod
    def heartbeat(self, worker_id: int, lease: float, lock: LivenessLock | None = None) -> bool:
        """Renew the worker's heartbeat (and its lock, if it was lost); False when the worker's row
        is gone: it was taken for dead, and the jobs it held are no longer its own."""

    @abc.abstractmethod
    def dead_workers(self, lease: float) -> list[DeadWorker]:
        """Every registered worker that is dead. ``lease`` is the lease of workers that set none.
        Only looks: it changes nothing."""

    @abc.abstractmethod
    def end_session(self, dead: DeadWorker) -> None:
        """Make sure a worker found dead holds nothing any more, before its jobs are taken back (its
        lingering connection is ended; its lock file removed)."""

    @classmethod
    def fence_after(cls, lease: float) -> float | None:
        """Seconds after the start of a worker's last confirmed heartbeat by which, if it could not
        confirm its lease since, it must have stopped every job it runs (and its job processes stop
        themselves should the worker be paused): others may take its jobs once its lease runs out,
        whether it lives or not. None where a live worker can never be taken for dead (an OS lock)."""
        return None

    def maintenance_every(self) -> float:
        """Seconds between a worker's rounds of recovery (finding dead workers)."""
        return 1.0

    # -- maintenance --------------------------------------------------------------------------------

    def tidy(self, idle: bool = False) -> None:  # noqa: B027 - a backend with nothing to tidy keeps it
        """Give back space no longer used; ``idle``: work is done, shrink what can shrink."""

    def checkpoint(self) -> bool:
        """Make every commit durable in the main store and shrink the log; whether it got through."""
        return True

    def tighten(self) -> None:  # noqa: B027 - only a store that can fill its own disk has work here
        """After a full disk: keep the log small from now on."""

    def integrity(self) -> list[str]:
        """What the backend's own integrity check finds wrong (nothing: an empty list)."""
        return []

    @abc.abstractmethod
    def builder_gone(self, pid: int) -> bool:
        """Whether the process (of this host) that was filling a task in its ``with`` block is gone."""


_open: dict[str, Database] = {}
_open_lock = threading.Lock()


def open_database(target: str | os.PathLike[str]) -> Database:
    """The :class:`Database` for ``target`` (a path or a URL), opened once per process and shared."""
    key = os.fspath(target) if is_url(target) else os.path.abspath(os.fspath(target))
    db = _open.get(key)
    if db is not None and db.still_there():
        return db
    with _open_lock:
        db = Database.open(target)
        _open[key] = db
        return db


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host lives: a zombie (dead, not yet reaped by its parent) does
    not, although ``kill(pid, 0)`` still finds it. A process we may not signal counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all we know
    return state not in (b"Z", b"X")


@functools.cache
def host_identity() -> str:
    """What names this host's processes uniquely: its boot and its pid namespace (two containers
    on one kernel share the boot but not the pids), else its name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"boot {boot} pids {os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        import socket

        return f"host {socket.gethostname()}"


def boottime() -> float:
    """Seconds on a clock that counts the time a host spends suspended (``CLOCK_BOOTTIME``), for
    deadlines that must hold across a laptop's sleep; the monotonic clock elsewhere."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else monotonic()


def now() -> float:
    """Wall-clock seconds, the time base of every timestamp shown to people."""
    return time.time()


def monotonic() -> float:
    """``CLOCK_MONOTONIC`` seconds: one clock for every process of this host, which neither a clock
    change nor a suspend makes jump; the only time base liveness decisions on one host use."""
    return time.clock_gettime(time.CLOCK_MONOTONIC) if hasattr(time, "clock_gettime") else time.monotonic()
