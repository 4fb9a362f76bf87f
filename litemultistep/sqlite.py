"""SQLite: one file in WAL mode, the embedded default (any path names one).

Peewee earns its place here: its models below are the one description of the SQLite schema (the
tables are created from them), and its deferred database (``SqliteDatabase(None)`` then ``init``)
opens the file with our pragmas on every connection. The engine then talks plain SQL on the
connection, so the hot paths stay lean. Peewee (and with it every database driver it finds
installed) is imported only by a process that opens a SQLite file: job processes never do.

What only this backend does:

* liveness by an OS lock: a worker holds ``flock`` on its own file in ``DB.workers/`` while it
  lives, and the kernel drops it the instant the process dies, however long a zombie lingers;
* wake-ups by an inotify watch of the ``-wal`` file (every commit writes to it);
* maintenance: incremental vacuum, and checkpoints that cut the ``-wal`` back when work is done.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import socket
import sqlite3
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import config
from ._wakeup import WalWaiter
from .db import CLAIMABLE, SCHEMA_VERSION, TABLES, Database, DeadWorker, Dialect, monotonic, now, process_alive
from .errors import DatabaseBusy, DatabaseUnusable, LiteMultiStepError, SchemaTooNew, StorageError

log = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of our files ("LMS1"), so another program's database is recognised.
APPLICATION_ID = 0x4C4D5331
SQLITE_HEADER = b"SQLite format 3\x00"
#: Seconds a connection waits for another writer before giving up with a clear error.
BUSY_TIMEOUT = 60
#: the longest a checkpoint that cuts the -wal file back waits for readers, holding the write lock
CHECKPOINT_WAIT_MS = 50
#: -wal pages between automatic checkpoints once the disk has been full (256 otherwise)
TIGHT_AUTOCHECKPOINT = 64

SQLITE = Dialect("sqlite", max_job_id="SELECT seq FROM sqlite_sequence WHERE name = 'job'")


class SqliteConnection(sqlite3.Connection):
    """A ``sqlite3`` connection that follows :class:`litemultistep.db.Connection` (its statements
    still run in C: nothing is added on the hot path)."""

    dialect = SQLITE

    def notify(self) -> None:
        """Nothing to send: every commit writes to the ``-wal`` file, which wakes idle workers."""

    def lock_task(self, task_pk: int) -> bool:
        """Always: a SQLite write transaction is the only one."""
        return True


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
        #: the worker id of the runner filling the task in its ``with`` block: once that runner is gone,
        #: workers remove the task (the ``builder_pid`` of older versions is only read by ``check``)
        builder = pw.IntegerField(null=True)
        #: every failed attempt of the task's jobs, retried or not (counted as each is recorded)
        failed_attempts = _default(pw.IntegerField, 0)
        #: the task's current rate: jobs completed since ``rate_since`` (wall clock), in a window of
        #: ``engine.RATE_WINDOW`` seconds, and the rate (jobs/s) the window before measured
        rate_since = pw.FloatField(null=True)
        rate_count = _default(pw.IntegerField, 0)
        rate = pw.FloatField(null=True)
        #: jobs of the task that may run at once, across every worker (NULL: no limit)
        max_running = pw.IntegerField(null=True)
        #: workers serve higher priorities first
        priority = _default(pw.IntegerField, 0)
        #: JSON list of the exception types (``module.qualname``) retried automatically (NULL: every one)
        retry_on = pw.TextField(null=True)

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
        #: this job's own retry settings, over its task's
        max_retries = pw.IntegerField(null=True)
        retry_delay = pw.FloatField(null=True)
        retry_on = pw.TextField(null=True)
        #: a manual retry starts a new round of automatic retries: its number, and the attempts before it
        round = _default(pw.IntegerField, 1)
        round_start = _default(pw.IntegerField, 0)

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
        #: the job's round of retries when it failed
        round = _default(pw.IntegerField, 1)

    class Worker(_Model):
        #: AUTOINCREMENT: a worker id is never reused, so a stale worker never passes for a new one
        id = AutoIncrementField()
        pid = pw.IntegerField()
        hostname = pw.TextField()
        #: "process" (a worker process with a heartbeat), "inline" (sync mode, drain) or "builder" (an
        #: open with block)
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
        failed_attempts = _default(pw.IntegerField, 0)

    class Throughput(_Model):
        """Jobs completed and attempts failed in each minute (``minute``: Unix time // 60), written in the
        work's own transactions; minute 0 holds what older minutes counted once they are pruned."""

        minute = pw.IntegerField(primary_key=True)
        completed = _default(pw.IntegerField, 0)
        failed = _default(pw.IntegerField, 0)

    return [Task, Job, Failure, Worker, FinishedTask, Throughput]


# Partial indexes keep the claim and recovery paths to one index probe each. The claim query in
# engine.py repeats the WHERE terms of task_claimable word for word, as SQLite requires.
INDEXES = [
    # the tasks a claim may serve, highest priority first, the least recently served first within one:
    # a task at its max_running is not in it, so claims stay one index probe however many tasks wait
    f"CREATE INDEX task_claimable ON task (priority DESC, last_served) WHERE {CLAIMABLE}",
    "CREATE INDEX job_task_state ON job (task, state)",
    "CREATE INDEX job_running ON job (worker) WHERE state = 2",
    "CREATE INDEX job_scheduled ON job (run_at) WHERE state = 5",
    # a task's finalization chain without a pass over its (maybe millions of) normal jobs
    "CREATE INDEX job_finalizers ON job (task, position) WHERE kind = 1",
    # the tasks whose with block is open, for the workers that look for abandoned ones every second
    "CREATE INDEX task_building ON task (builder) WHERE state = 0",
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
    5: ["ALTER TABLE task ADD COLUMN builder INTEGER", "CREATE INDEX task_building ON task (builder) WHERE state = 0"],
    6: [
        "ALTER TABLE task ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN rate_since REAL",
        "ALTER TABLE task ADD COLUMN rate_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN rate REAL",
        "ALTER TABLE finished_task ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE throughput (minute INTEGER NOT NULL PRIMARY KEY, completed INTEGER NOT NULL DEFAULT 0, "
        "failed INTEGER NOT NULL DEFAULT 0)",
        # the failures still stored: what an older version counted of a task's failed attempts
        "UPDATE task SET failed_attempts = (SELECT count(*) FROM failure f WHERE f.task = task.id "
        "AND f.job IN (SELECT id FROM job))",
    ],
    7: ["ALTER TABLE task ADD COLUMN max_running INTEGER",
        "ALTER TABLE task ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN retry_on TEXT",
        "ALTER TABLE job ADD COLUMN max_retries INTEGER",
        "ALTER TABLE job ADD COLUMN retry_delay REAL",
        "ALTER TABLE job ADD COLUMN retry_on TEXT",
        "ALTER TABLE job ADD COLUMN round INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE job ADD COLUMN round_start INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE failure ADD COLUMN round INTEGER NOT NULL DEFAULT 1",
        "DROP INDEX task_claimable",
        f"CREATE INDEX task_claimable ON task (priority DESC, last_served) WHERE {CLAIMABLE}"],
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




class SqliteDatabase(Database):
    """A litemultistep database in one SQLite file (see :class:`litemultistep.Database`)."""

    dialect = SQLITE

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
            factory=SqliteConnection,
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
        self._identity = _identity(self.path)

    @classmethod
    def prepare_worker_process(cls) -> None:
        import_peewee_alone()  # the worker runs no user code, and needs no PostgreSQL driver

    def driver_error(self, error: BaseException) -> LiteMultiStepError | None:
        return translate_error(error, self.path) if isinstance(error, sqlite3.DatabaseError) else None

    def still_there(self) -> bool:
        return _identity(self.path) == self._identity and not _wal_deleted(self.path)

    def builder_gone(self, pid: int) -> bool:
        return not process_alive(pid)

    def waiter(self, poll: float, brief: bool = False) -> WalWaiter:
        # no inotify watch for a brief worker: taking one down waits for a kernel grace period, some
        # 15 ms on a busy machine, and it would be the last thing such a worker does
        return WalWaiter(self.path + "-wal", poll, watch=not brief)

    def connection(self) -> SqliteConnection:
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
    def write(self) -> Iterator[SqliteConnection]:
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
        if os.getpid() == self._pid and not self._pw.is_closed():
            self._pw.close()

    # -- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

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

    # -- liveness -----------------------------------------------------------------------------------

    def register_worker(self, kind: str, queues: Sequence[str] | None = None, lease: float | None = None,
                        concurrency: int = 1) -> tuple[int, WorkerLock]:
        # the lock first, then the row: a row that others can see always has its lock held
        lock = WorkerLock(self)
        t = now()
        try:
            with self.write() as c:
                worker_id = c.execute(
                    "INSERT INTO worker (pid, hostname, kind, queues, started_at, heartbeat_at, expires_at, "
                    "lock_path, heartbeat_mono, concurrency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (os.getpid(), socket.gethostname(), kind, " ".join(queues) if queues else None, t, t,
                     t + lease if lease else None, lock.path, monotonic(), concurrency)).lastrowid
        except BaseException:
            lock.release()
            raise
        return int(worker_id), lock  # type: ignore[arg-type]

    def heartbeat(self, worker_id: int, lease: float, lock: Any = None) -> bool:
        t = now()
        path = lock.renew() if lock is not None and not lock.intact() else None
        with self.write() as c:
            if path is not None:
                c.execute("UPDATE worker SET lock_path = ? WHERE id = ?", (path, worker_id))
            return c.execute("UPDATE worker SET heartbeat_at = ?, expires_at = ?, heartbeat_mono = ? WHERE id = ?",
                             (t, t + lease, monotonic(), worker_id)).rowcount == 1

    def dead_workers(self, lease: float) -> list[DeadWorker]:
        rows = self.connection().execute("SELECT id, pid, lock_path, heartbeat_mono FROM worker").fetchall()
        return [DeadWorker(w, pid, path) for w, pid, path, mono in rows if not worker_alive(path, mono, lease)]

    def end_session(self, dead: DeadWorker) -> None:
        _unlink(dead.lock_path)  # its owner is dead: nobody holds or waits on it (names are never reused)

    # -- maintenance --------------------------------------------------------------------------------

    def tidy(self, idle: bool = False) -> None:
        """Give free pages back to the filesystem once they are over a quarter of the file, and, when
        ``idle``, cut the ``-wal`` file back to nothing, so the files shrink when work is done.

        The checkpoint that cuts the ``-wal`` holds the write lock while it waits for readers, so it
        waits at most :data:`CHECKPOINT_WAIT_MS` and simply tries again at the next idle moment.
        """
        conn = self.connection()
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
                wal = os.path.getsize(self.path + "-wal")
            except OSError:
                return
            if wal:
                self.checkpoint()

    def checkpoint(self) -> bool:
        """Copy the ``-wal`` into the database and cut it back to nothing, waiting for readers at most
        :data:`CHECKPOINT_WAIT_MS`; returns whether it got through."""
        conn = self.connection()
        busy = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
        try:
            blocked = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError as e:
            error = translate_error(e, self.path)
            if isinstance(error, DatabaseBusy):
                return False
            raise error from None  # a full disk: the caller waits for space before writing anything
        finally:
            conn.execute(f"PRAGMA busy_timeout = {busy}")
        return not blocked

    def tighten(self) -> None:
        """After a full disk: copy the -wal back every 64 pages from now on. On a nearly full disk, a
        -wal left to grow takes the space its own checkpoint needs, and everything stops again."""
        try:
            self.connection().execute(f"PRAGMA wal_autocheckpoint = {TIGHT_AUTOCHECKPOINT}")
        except sqlite3.Error:
            pass

    def integrity(self) -> list[str]:
        return [line for (line,) in self.connection().execute("PRAGMA integrity_check").fetchall() if line != "ok"]


def _wal_deleted(path: str) -> bool:
    """Whether this process holds the file's ``-wal`` open after it was deleted (Linux): others then
    open a new, empty one and cannot read the database until this process closes its connection,
    which copies what the deleted one holds back into the file."""
    wal = os.path.realpath(path) + "-wal (deleted)"
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == wal:
                return True
        except OSError:
            pass
    return False


def _identity(path: str) -> tuple[int, int] | None:
    """The file's device and inode: a file deleted and made anew at the same path has other ones."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
    # (A file of an older version lacks the tables its upgrade adds.)
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
    for table in TABLES if version == SCHEMA_VERSION else [t for t in TABLES if t in present]:
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


# -- liveness -----------------------------------------------------------------------------------------

class WorkerLock:
    """The OS lock (``flock``) a worker holds while it lives: the kernel drops it the instant the
    process dies, so a free lock proves death, however long a zombie lingers in the process table.

    The lock is shared, and the worker's job processes take it too (:attr:`shared`): a worker killed
    outright stays "alive" until the last of its job processes has ended what its job started, and
    only then can another worker take its jobs and run them again. Anyone looking tries to take it
    exclusively (:func:`lock_state`), which no holder of a shared lock allows.

    Its file lives in ``DB.workers/``. Should the file vanish (someone cleaned the folder), the owner
    makes a new one at its next heartbeat (:meth:`renew`); meanwhile others take it for alive while
    its monotonic heartbeat is fresh.
    """

    def __init__(self, db: SqliteDatabase) -> None:
        self._dir = db.workers_dir
        self._fd, self.path, self._inode = self._take()

    def _take(self) -> tuple[int, str, int]:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        path = os.path.join(self._dir, f"{os.getpid()}-{secrets.token_hex(6)}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a new name: no one else can hold it
            return fd, path, os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise

    @property
    def shared(self) -> str:
        """The file the worker's job processes lock as well (shared), while they live."""
        return self.path

    def intact(self) -> bool:
        """Whether the file at :attr:`path` is still the one this lock holds."""
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def renew(self) -> str:
        """Take a fresh lock file (the old one was removed); returns its path."""
        old = self._fd
        self._fd, self.path, self._inode = self._take()
        os.close(old)
        return self.path

    def release(self) -> None:
        if self._fd >= 0:
            # Removed while still held: lock names are never reused, so no one can be waiting on it.
            _unlink(self.path)
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # a lock dropped unreleased goes as it would with its process: the file stays, found dead
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def lock_state(path: str) -> bool | None:
    """Whether a live process holds the worker lock at ``path``: True, False (its owner is dead), or
    None when the file is missing. Only looks: it never creates or removes a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot look (permissions): do not take the owner for dead
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it took one
    return False


def worker_alive(lock_path: str, heartbeat_mono: float | None, lease: float) -> bool:
    """A worker is alive while its lock is held; if its lock file has vanished, while its monotonic
    heartbeat is younger than ``lease`` (a live worker makes a new lock file within a second)."""
    state = lock_state(lock_path)
    if state is not None:
        return state
    return heartbeat_mono is not None and monotonic() - heartbeat_mono < lease


