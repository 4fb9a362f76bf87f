"""The database: the SQLite file (the embedded default) and what both backends share.

The models describe the schema; the engine talks to the database with plain SQL on the connection that
:meth:`Database.connection` returns, so the hot paths stay lean and every decision is reviewable in
``engine.py``. ``Database(target)`` opens a SQLite file for a path and a PostgreSQL database for a
``postgresql://`` URL (:mod:`litemultistep.pg`); both speak the same SQL, but for the few differences a
:class:`Dialect` names.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from . import config
from ._wakeup import WalWaiter
from .errors import DatabaseBusy, DatabaseUnusable, LiteMultiStepError, SchemaTooNew, StorageError

log = logging.getLogger("litemultistep")

#: Schema version written to ``PRAGMA user_version``; an older file is upgraded, a newer one refused.
SCHEMA_VERSION = 4
#: ``PRAGMA application_id`` of our files ("LMS1"), so another program's database is recognised.
APPLICATION_ID = 0x4C4D5331
SQLITE_HEADER = b"SQLite format 3\x00"
#: Seconds a connection waits for another writer before giving up with a clear error.
BUSY_TIMEOUT = 60


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


#: the schema's tables, in the order the models below define them
TABLES = ("task", "job", "failure", "worker", "finished_task")


#: the drivers peewee imports when it is imported, if they are installed
_PEEWEE_DRIVERS = ("psycopg2cffi", "psycopg2", "psycopg", "pymysql", "MySQLdb")


def import_peewee_alone() -> None:
    """Import peewee without the other databases' drivers it looks for at import (psycopg alone
    takes a third of a second). Only for a process that opens SQLite files and runs no user code,
    such as ``litemultistep worker`` on a file: in it, peewee's PostgreSQL and MySQL classes do not
    work. A process that has imported peewee already is left as it is."""
    if "peewee" in sys.modules:
        return
    blocked = [name for name in _PEEWEE_DRIVERS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # what makes `import name` fail at once
    try:
        import peewee  # noqa: F401
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@functools.cache
def models() -> list[type[Any]]:
    """The peewee models the schema is created from, defined on first use: peewee (and with it every
    database driver it finds installed, psycopg among them: a quarter of a second) is imported only
    by a process that opens a SQLite file, never by a job process whose jobs do not touch the database.
    """
    import peewee as pw
    from playhouse.sqlite_ext import AutoIncrementField

    def _default(field: type[pw.Field], value: object) -> pw.Field:
        """A field with a SQL ``DEFAULT``: the engine inserts rows with plain SQL, not through peewee."""
        return field(default=value, constraints=[pw.SQL(f"DEFAULT {value}")])

    class _Model(pw.Model):
        class Meta:
            database = None  # bound to one file at a time, when the schema is created
            legacy_table_names = False

    class Task(_Model):
        id = pw.AutoField()
        task_id = pw.TextField(unique=True)
        slug = pw.TextField()
        state = pw.IntegerField()
        finalizable = _default(pw.BooleanField, 0)
        normal_count = _default(pw.IntegerField, 0)
        finalize_count = _default(pw.IntegerField, 0)
        completed_count = _default(pw.IntegerField, 0)
        failed_count = _default(pw.IntegerField, 0)
        #: jobs in state QUEUED (claimable now)
        pending_count = _default(pw.IntegerField, 0)
        running_count = _default(pw.IntegerField, 0)
        #: when a worker last claimed from this queue (ns); the least recently served queue goes first
        last_served = _default(pw.IntegerField, 0)
        max_retries = _default(pw.IntegerField, 0)
        retry_delay = _default(pw.FloatField, 1.0)
        created_at = pw.FloatField()
        #: seconds one job of this task may run before it is stopped (NULL: the worker's ``--timeout``)
        timeout = pw.FloatField(null=True)
        #: a running mean of how long this task's jobs take (s); claims size their batches from it
        avg_duration = pw.FloatField(null=True)
        #: the process filling the task in its ``with`` block (to clean up after a crash)
        builder_pid = pw.IntegerField(null=True)
        #: 1: a normal job that succeeds is kept (state COMPLETED) with its return value, for the finalizers
        keep_results = _default(pw.IntegerField, 0)
        #: normal jobs kept with their result
        result_count = _default(pw.IntegerField, 0)

    class Job(_Model):
        #: AUTOINCREMENT: a job id names one job forever, even after the job is done and deleted
        id = AutoIncrementField()
        task = pw.ForeignKeyField(Task, on_delete="CASCADE", index=False, column_name="task")
        kind = pw.IntegerField()
        #: order of a finalization job in its chain (0, 1, ...)
        position = pw.IntegerField(null=True)
        #: ``module:qualname`` of the callable
        func = pw.TextField()
        #: JSON ``[args, kwargs]``
        args = pw.TextField()
        state = pw.IntegerField()
        attempts = _default(pw.IntegerField, 0)
        worker = pw.IntegerField(null=True)
        run_at = pw.FloatField(null=True)
        enqueued_at = pw.FloatField()
        #: when the worker holding it claimed it (wall clock), for "running for" in the status view
        claimed_at = pw.FloatField(null=True)
        #: how many times a worker process died while holding it; at the worker's limit it fails
        crashes = _default(pw.IntegerField, 0)
        #: this job's own time limit (s), over the task's
        timeout = pw.FloatField(null=True)
        #: JSON of its return value, for a normal job of a task that keeps results (state COMPLETED)
        result = pw.TextField(null=True)
        #: what the running job last reported of its own progress (litemultistep.report), if anything
        progress_done = pw.FloatField(null=True)
        progress_total = pw.FloatField(null=True)

    class Failure(_Model):
        id = pw.AutoField()
        job = pw.ForeignKeyField(Job, on_delete="CASCADE", column_name="job")
        task = pw.ForeignKeyField(Task, on_delete="CASCADE", column_name="task")
        exc_type = pw.TextField()
        message = pw.TextField()
        traceback = pw.TextField()
        attempt = pw.IntegerField()
        failed_at = pw.FloatField()
        worker_pid = pw.IntegerField(null=True)

    class Worker(_Model):
        #: AUTOINCREMENT: a worker id is never reused, so a stale worker never passes for a new one
        id = AutoIncrementField()
        pid = pw.IntegerField()
        hostname = pw.TextField()
        #: "process" (a worker process with a heartbeat) or "inline" (sync mode, drain)
        kind = pw.TextField()
        queues = pw.TextField(null=True)
        started_at = pw.FloatField()
        heartbeat_at = pw.FloatField()
        #: end of the lease; NULL for inline runners, whose liveness is their lock alone
        expires_at = pw.FloatField(null=True)
        lock_path = pw.TextField()
        #: ``CLOCK_MONOTONIC`` of the last heartbeat: shared by every process of the host and never
        #: jumped by a clock change; consulted only when the worker's lock file has gone missing
        heartbeat_mono = pw.FloatField(null=True)
        #: processes running jobs for this worker
        concurrency = _default(pw.IntegerField, 1)

    class FinishedTask(_Model):
        task_id = pw.TextField(primary_key=True)
        slug = pw.TextField()
        normal_count = pw.IntegerField()
        finalize_count = pw.IntegerField()
        created_at = pw.FloatField()
        finished_at = pw.FloatField(index=True)

    return [Task, Job, Failure, Worker, FinishedTask]


# Partial indexes keep the claim and recovery paths to one index probe each. The claim query in
# engine.py repeats the WHERE terms of task_claimable word for word, as SQLite requires.
INDEXES = [
    "CREATE INDEX task_claimable ON task (last_served) WHERE pending_count > 0 AND state IN (1, 2)",
    "CREATE INDEX job_task_state ON job (task, state)",
    "CREATE INDEX job_running ON job (worker) WHERE state = 2",
    "CREATE INDEX job_scheduled ON job (run_at) WHERE state = 5",
    # a task's finalization chain without a pass over its (maybe millions of) normal jobs
    "CREATE INDEX job_finalizers ON job (task, position) WHERE kind = 1",
]

# One entry per schema version above 1: the statements that bring a file from version N-1 to N.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE task ADD COLUMN timeout REAL",
        "ALTER TABLE task ADD COLUMN avg_duration REAL",
        "ALTER TABLE job ADD COLUMN claimed_at REAL",
        "ALTER TABLE job ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE job ADD COLUMN timeout REAL",
        "ALTER TABLE worker ADD COLUMN heartbeat_mono REAL",
        "ALTER TABLE worker ADD COLUMN concurrency INTEGER NOT NULL DEFAULT 1",
    ],
    3: [
        "ALTER TABLE task ADD COLUMN keep_results INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN result_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE job ADD COLUMN result TEXT",
        "ALTER TABLE job ADD COLUMN progress_done REAL",
        "ALTER TABLE job ADD COLUMN progress_total REAL",
    ],
    4: ["CREATE INDEX job_finalizers ON job (task, position) WHERE kind = 1"],
}


class NetworkFilesystemWarning(UserWarning):
    """The database is on a network filesystem, where SQLite's locks (and ours) are unreliable."""


NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                       "gpfs", "fuse.sshfs", "fuse.s3fs", "fuse.rclone", "davfs", "fuse.glusterfs"}


def filesystem_type(path: str, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem holding ``path`` (Linux), from the longest matching mount point."""
    try:
        with open(mounts) as f:
            table = [line.split() for line in f]
    except OSError:
        return None
    best, kind = "", None
    for fields in table:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def _check_path(path: str, create: bool) -> str:
    """Refuse, with a message naming the problem, a path SQLite would misuse or we must not touch."""
    if path.startswith("file:") or path == ":memory:" or path == "":
        raise DatabaseUnusable(
            f"{path!r} is not a file path: litemultistep takes the path of a SQLite file "
            "(workers in other processes must open the same file), not a SQLite URI or :memory:"
        )
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise DatabaseUnusable(f"{path} is a directory: name a file in it, e.g. {path}/app.sqlite")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise DatabaseUnusable(f"cannot open {path}: its directory {parent} does not exist; create it first")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise DatabaseUnusable(f"cannot read {path}: {e.strerror}") from None
        if header and header != SQLITE_HEADER:
            raise DatabaseUnusable(f"{path} is not a SQLite database (its first bytes say otherwise)")
        if not header and not create:
            raise DatabaseUnusable(f"{path} is empty: not a litemultistep database yet (a reading command "
                                   "never turns a file into one); check the path, or create tasks first")
        if not os.access(path, os.W_OK):
            raise DatabaseUnusable(f"{path} is read-only: litemultistep writes to its database; "
                                   "make the file writable by this user")
    elif not create:
        raise DatabaseUnusable(f"no database at {path} (a reading command never creates one); "
                               "check the path, or create tasks first")
    fs = filesystem_type(parent)
    if fs in NETWORK_FILESYSTEMS:
        warnings.warn(f"{path} is on a network filesystem ({fs}): SQLite's locking is not reliable there and "
                      "workers on other hosts cannot share it; use a local disk", NetworkFilesystemWarning,
                      stacklevel=4)
    if not os.access(parent, os.W_OK):
        raise DatabaseUnusable(f"the directory {parent} is read-only: SQLite creates {os.path.basename(path)}-wal "
                               "and -shm beside the database; make the directory writable")
    if not os.path.exists(path):
        try:
            # Created here, before SQLite sees it, so the file (and the -wal and -shm SQLite copies
            # its mode to) is readable by its owner only, whatever the umask.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass  # another process created it at the same instant
    return path


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the engine needs of a connection: ``sqlite3.Connection`` has it, and so does
    :class:`litemultistep.pg.PgConnection` (same SQL, ``?`` placeholders)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    """What the engine's SQL says differently on each backend (everything else is the same text)."""

    name: str
    #: ends the sub-select that picks the jobs a claim takes: concurrent claims skip each other's rows
    skip_locked: str = ""
    #: ends a SELECT of a task row that a transaction decides from (and then changes)
    lock_row: str = ""
    #: the largest job id ever given out, even if that job is gone
    max_job_id: str = "SELECT seq FROM sqlite_sequence WHERE name = 'job'"
    #: seconds of work a claim takes at once (0: engine.CLAIM_WINDOW): more where a transaction costs more
    claim_window: float = 0.0

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


SQLITE = Dialect("sqlite")

POSTGRES_URL_PREFIXES = ("postgresql://", "postgres://")


def is_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL database (a URL) rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(POSTGRES_URL_PREFIXES)


class Database:
    """One litemultistep database, opened in this process: a SQLite file, or, for a
    ``postgresql://user@host/dbname`` URL, a PostgreSQL database (``pip install 'litemultistep[postgres]'``).

    Each thread gets its own connection; a connection is never used across ``fork``: a child opens
    fresh ones (the parent's are left untouched, never closed, as SQLite requires).

    :param path: the SQLite file (created, owner-only, if missing and ``create`` is true), or a URL.
    :param create: when false, a missing file (or a PostgreSQL database without litemultistep's
        tables) is an error: reading commands never create one.
    """

    #: the backend's SQL differences
    dialect: Dialect = SQLITE
    is_postgres = False
    #: what another process opens to reach the same database (the path, or the full URL)
    target: str
    #: how messages name the database (the path, or the URL without its password)
    path: str

    def __new__(cls, path: str | os.PathLike[str], *, create: bool = True) -> Database:
        if cls is Database and is_url(path):
            from .pg import PostgresDatabase

            return object.__new__(PostgresDatabase)
        return object.__new__(cls)

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = self.target = _check_path(os.fspath(path), create)
        self.lock_path = self.path + ".lock"
        self.workers_dir = self.path + ".workers"
        sync = 2 if config.synchronous() == "full" else 1
        import peewee as pw  # here, not at the top: see models()

        #: what opening or reading the file raises when it is not a usable SQLite database
        self._unusable = (sqlite3.DatabaseError, pw.DatabaseError)
        self._pw = pw.SqliteDatabase(None)
        self._pw.init(
            self.path,
            timeout=BUSY_TIMEOUT,
            check_same_thread=False,
            pragmas=[
                ("synchronous", sync),
                ("foreign_keys", 1),
                ("cache_size", -16000),
                ("temp_store", 2),
                # after a checkpoint the -wal file is cut back to this size instead of staying large
                ("journal_size_limit", 8 * 1024 * 1024),
                # copy the -wal back every 1 MiB (SQLite's default: 4 MiB): as fast here, and a -wal
                # that stays small never takes the space its own checkpoint needs on a nearly full disk
                ("wal_autocheckpoint", 256),
            ],
        )
        self._pid = os.getpid()
        self._forsaken: list[Any] = []
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"<litemultistep.Database {self.path}>"

    def waiter(self, poll: float) -> WalWaiter:
        """What an idle worker waits on to learn that another process committed."""
        return WalWaiter(self.path + "-wal", poll)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and reopened after a fork)."""
        if os.getpid() != self._pid:
            # Inherited across fork: keep the parent's connection object alive but unused; closing
            # it here could release locks the parent still relies on.
            self._forsaken.append(self._pw._state.conn)  # type: ignore[attr-defined]
            self._pw._state.reset()  # type: ignore[attr-defined]
            self._pid = os.getpid()
        try:
            return self._pw.connection()  # type: ignore[no-any-return]
        except self._unusable as e:
            raise DatabaseUnusable(f"{self.path} is not a usable SQLite database: {e}") from None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short ``BEGIN IMMEDIATE`` transaction: it takes the write lock at once, so it never
        fails half-way with a lock upgrade error, and it commits when the block ends."""
        conn = self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise translate_error(e, self.path) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            self._rollback(conn)
            raise
        except sqlite3.DatabaseError as e:
            self._rollback(conn)
            raise translate_error(e, self.path) from None
        except BaseException:
            self._rollback(conn)
            raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close this thread's connection (another use reopens it)."""
        if os.getpid() == self._pid and not self._pw.is_closed():
            self._pw.close()

    def _ensure_schema(self) -> None:
        conn = self.connection()
        try:
            state = _schema_state(conn, self.path)
            if state == "current":
                return
            from filelock import FileLock
            from filelock import Timeout as LockTimeout

            try:
                lock = FileLock(self.lock_path, timeout=BUSY_TIMEOUT, mode=0o600)
                lock.acquire()
            except (OSError, LockTimeout) as e:
                raise DatabaseUnusable(f"cannot take the schema lock {self.lock_path}: {e}") from None
            try:
                state = _schema_state(conn, self.path)  # another process may have done it meanwhile
                if state == "new":
                    self._create_schema(conn)
                elif state == "old":
                    self._upgrade_schema(conn)
            finally:
                lock.release()
        except self._unusable as e:
            self.close()
            raise DatabaseUnusable(f"{self.path} is not a usable SQLite database: {e}") from None

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # auto_vacuum must be chosen before the first table exists; WAL is persistent in the file.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DatabaseUnusable(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                                   "use a local disk, not a network filesystem")
        conn.execute("BEGIN IMMEDIATE")
        try:
            with self._pw.bind_ctx(models()):
                self._pw.create_tables(models(), safe=False)
            for sql in INDEXES:
                conn.execute(sql)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.debug("created litemultistep schema v%d in %s", SCHEMA_VERSION, self.path)

    def _upgrade_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for sql in MIGRATIONS[target]:
                    conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("upgraded %s from schema v%d to v%d", self.path, version, SCHEMA_VERSION)


def _schema_state(conn: sqlite3.Connection, path: str) -> str:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise DatabaseUnusable(f"{path} is a SQLite database of another program (it has tables but "
                                   "no litemultistep schema); litemultistep leaves it untouched")
        return "new"
    if app_id != APPLICATION_ID:
        raise DatabaseUnusable(f"{path} belongs to another program (application_id {app_id:#x}); "
                               "litemultistep leaves it untouched")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"{path} was written by a newer litemultistep (schema v{version}; this version "
                           f"knows v{SCHEMA_VERSION}): upgrade litemultistep to use it")
    # Touch every table's root page: a truncated file fails here, at open, not in the middle of work.
    for table in TABLES:
        conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()
    return "current" if version == SCHEMA_VERSION else "old"


def translate_error(error: sqlite3.DatabaseError, path: str) -> LiteMultiStepError:
    """The litemultistep error, with its advice, for an error SQLite raised on ``path``."""
    message = str(error)
    if "locked" in message or "busy" in message:
        return DatabaseBusy(f"{path} stayed locked by another writer for {BUSY_TIMEOUT:.0f} s: {message}")
    if "full" in message:
        return StorageError(f"cannot write to {path}: the disk is full ({message}); "
                            "free some space, nothing stored was lost")
    if "disk I/O error" in message:
        return StorageError(f"cannot write to {path}: disk I/O error (the disk may be full or failing, or a "
                            "file size limit was reached); nothing stored was lost")
    if "readonly" in message:
        return DatabaseUnusable(f"cannot write to {path}: {message}")
    if "malformed" in message or "not a database" in message:
        return DatabaseUnusable(f"{path} is corrupt ({message}); restore it from a backup, or run "
                                "`litemultistep check` to see what SQLite finds")
    return DatabaseUnusable(f"{path}: {message}")


_open: dict[str, Database] = {}
_open_lock = threading.Lock()


def open_database(path: str | os.PathLike[str]) -> Database:
    """The :class:`Database` for ``path`` (or URL), opened once per process and shared."""
    key = os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))
    db = _open.get(key)
    if db is not None and (db.is_postgres or os.path.exists(key)):
        return db
    with _open_lock:
        db = Database(path)
        _open[key] = db
        return db


def now() -> float:
    """Wall-clock seconds, the time base of every timestamp shown to people."""
    return time.time()


def monotonic() -> float:
    """``CLOCK_MONOTONIC`` seconds: one clock for every process of this host, which neither a clock
    change nor a suspend makes jump; the only time base liveness decisions use."""
    return time.clock_gettime(time.CLOCK_MONOTONIC) if hasattr(time, "clock_gettime") else time.monotonic()
