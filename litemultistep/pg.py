"""PostgreSQL: the same tasks on a server, for workers on many hosts.

``Database("postgresql://user@host/dbname")`` opens a :class:`PostgresDatabase`. The engine's SQL is the
same text on both backends (``?`` placeholders become psycopg's ``%s`` here); what differs is named by
:data:`POSTGRES` and lives in this module:

* Claims lock the job rows they take with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never wait
  on each other's jobs; a transaction changes each task's row once, at its end, in key order.
* A worker is alive while it holds its session-level advisory lock (the server drops it the instant
  the connection dies, whichever host the worker was on) *and* its heartbeat, stamped with the
  server's clock, is younger than the worker's lease: a host that vanished without closing its
  connection, or a partition, gives its jobs back within the lease. A worker found too old while its
  connection lingers has that connection ended (``pg_terminate_backend``), so it cannot go on as if
  it still held its jobs.
* Idle workers wait on ``LISTEN``; the engine sends ``NOTIFY`` only when jobs become claimable or work
  runs out, not on every commit.
* The schema is created and upgraded under a transaction-level advisory lock, so twenty workers
  starting at once create it once. Tables live in the connection's ``search_path`` schema
  (``?options=-csearch_path%3Dmyschema`` in the URL picks another).
"""

from __future__ import annotations

import logging
import os
import random
import re
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from . import rules
from .db import (
    CLAIMABLE,
    SCHEMA_VERSION,
    Database,
    DeadWorker,
    Dialect,
    LivenessLock,
    host_identity,
    now,
    process_alive,
)
from .errors import (
    DatabaseBusy,
    DatabaseUnavailable,
    DatabaseUnusable,
    LiteMultiStepError,
    SchemaTooNew,
    StorageError,
)

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

INSTALL_HINT = "install the PostgreSQL driver: pip install 'litemultistep[postgres]'"


def _glob_regex(pattern: str) -> str:
    """A PostgreSQL regular expression matching what SQLite's GLOB matches for ``pattern``."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            start = i + 1
            if start < len(pattern) and pattern[start] == "^":
                start += 1
            end = pattern.find("]", start + 1)  # a ']' first in the set is a member, as in GLOB
            if end < 0:
                out.append(r"\[")
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out) + "$"


class _PostgresDialect(Dialect):
    def glob(self, pattern: str) -> tuple[str, str]:
        return "task_id ~ ?", _glob_regex(pattern)

    def among(self, column: str, values: Sequence[int]) -> tuple[str, list[Any]]:
        # one array parameter: the same statement text (prepared once) for every batch size
        return f"{column} = ANY(?)", [list(values)]

    def insert_many(self, c: Any, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        # ids from the sequence are not consecutive under concurrent inserts: ask for each
        return c.executemany(sql + " RETURNING id", rows, returning=True)  # type: ignore[no-any-return]


POSTGRES = _PostgresDialect(
    "postgresql",
    max_job_id="SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM job_id_seq",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    lock_row=" FOR UPDATE",
)

SCHEMA = [
    "CREATE TABLE task (id BIGSERIAL PRIMARY KEY, task_id TEXT NOT NULL UNIQUE, slug TEXT NOT NULL, "
    "state INTEGER NOT NULL, finalizable INTEGER NOT NULL DEFAULT 0, normal_count BIGINT NOT NULL DEFAULT 0, "
    "finalize_count BIGINT NOT NULL DEFAULT 0, completed_count BIGINT NOT NULL DEFAULT 0, "
    "failed_count BIGINT NOT NULL DEFAULT 0, pending_count BIGINT NOT NULL DEFAULT 0, "
    "running_count BIGINT NOT NULL DEFAULT 0, last_served BIGINT NOT NULL DEFAULT 0, "
    "max_retries INTEGER NOT NULL DEFAULT 0, retry_delay DOUBLE PRECISION NOT NULL DEFAULT 1.0, "
    "created_at DOUBLE PRECISION NOT NULL, timeout DOUBLE PRECISION, avg_duration DOUBLE PRECISION, "
    "builder_pid INTEGER, keep_results INTEGER NOT NULL DEFAULT 0, result_count BIGINT NOT NULL DEFAULT 0, "
    "builder BIGINT, failed_attempts BIGINT NOT NULL DEFAULT 0, rate_since DOUBLE PRECISION, "
    "rate_count BIGINT NOT NULL DEFAULT 0, rate DOUBLE PRECISION, "
    "max_running INTEGER, priority INTEGER NOT NULL DEFAULT 0, retry_on TEXT)",
    "CREATE TABLE job (id BIGSERIAL PRIMARY KEY, task BIGINT NOT NULL REFERENCES task (id) ON DELETE CASCADE, "
    "kind INTEGER NOT NULL, position INTEGER, func TEXT NOT NULL, args TEXT NOT NULL, state INTEGER NOT NULL, "
    "attempts INTEGER NOT NULL DEFAULT 0, worker BIGINT, run_at DOUBLE PRECISION, "
    "enqueued_at DOUBLE PRECISION NOT NULL, claimed_at DOUBLE PRECISION, crashes INTEGER NOT NULL DEFAULT 0, "
    "timeout DOUBLE PRECISION, result TEXT, progress_done DOUBLE PRECISION, progress_total DOUBLE PRECISION, "
    "max_retries INTEGER, retry_delay DOUBLE PRECISION, retry_on TEXT, round INTEGER NOT NULL DEFAULT 1, "
    "round_start INTEGER NOT NULL DEFAULT 0)",
    # failure.job has no foreign key here: its cascade would fire a trigger for every job a worker
    # records (the hot path), and it measured slower than all the rest of the DELETE. The failures
    # of a job that later succeeded stay, unseen (every view reaches failures through their job),
    # until their task goes, and with it, by failure.task, every one of them.
    "CREATE TABLE failure (id BIGSERIAL PRIMARY KEY, job BIGINT NOT NULL, "
    "task BIGINT NOT NULL REFERENCES task (id) ON DELETE CASCADE, exc_type TEXT NOT NULL, message TEXT NOT NULL, "
    "traceback TEXT NOT NULL, attempt INTEGER NOT NULL, failed_at DOUBLE PRECISION NOT NULL, worker_pid INTEGER, "
    "round INTEGER NOT NULL DEFAULT 1)",
    "CREATE INDEX failure_job ON failure (job)",
    "CREATE INDEX failure_task ON failure (task)",
    # heartbeat_mono holds the server's clock here (one clock for every host), not a host's monotonic one
    "CREATE TABLE worker (id BIGSERIAL PRIMARY KEY, pid INTEGER NOT NULL, hostname TEXT NOT NULL, "
    "kind TEXT NOT NULL, queues TEXT, started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL, "
    "expires_at DOUBLE PRECISION, lock_path TEXT NOT NULL, heartbeat_mono DOUBLE PRECISION, "
    "concurrency INTEGER NOT NULL DEFAULT 1)",
    "CREATE TABLE finished_task (task_id TEXT PRIMARY KEY, slug TEXT NOT NULL, normal_count BIGINT NOT NULL, "
    "finalize_count BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL, finished_at DOUBLE PRECISION NOT NULL, "
    "failed_attempts BIGINT NOT NULL DEFAULT 0)",
    "CREATE INDEX finished_task_finished_at ON finished_task (finished_at)",
    "CREATE TABLE throughput (minute BIGINT PRIMARY KEY, completed BIGINT NOT NULL DEFAULT 0, "
    "failed BIGINT NOT NULL DEFAULT 0)",
    f"CREATE INDEX task_claimable ON task (priority DESC, last_served) WHERE {CLAIMABLE}",
    # id last: a claim takes a task's queued jobs in id order straight from the index, with no sort
    # (on SQLite the rowid rides along in every index for free)
    "CREATE INDEX job_task_state ON job (task, state, id)",
    "CREATE INDEX job_running ON job (worker) WHERE state = 2",
    "CREATE INDEX job_scheduled ON job (run_at) WHERE state = 5",
    "CREATE INDEX job_finalizers ON job (task, position) WHERE kind = 1",
    "CREATE INDEX task_building ON task (builder) WHERE state = 0",
    "CREATE TABLE litemultistep_schema (version INTEGER NOT NULL)",
]

#: One entry per schema version above 2 (the first on PostgreSQL): the statements from N-1 to N.
MIGRATIONS: dict[int, list[str]] = {
    3: [
        "ALTER TABLE task ADD COLUMN keep_results INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN result_count BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE job ADD COLUMN result TEXT",
        "ALTER TABLE job ADD COLUMN progress_done DOUBLE PRECISION",
        "ALTER TABLE job ADD COLUMN progress_total DOUBLE PRECISION",
    ],
    4: ["CREATE INDEX job_finalizers ON job (task, position) WHERE kind = 1"],
    5: ["ALTER TABLE task ADD COLUMN builder BIGINT", "CREATE INDEX task_building ON task (builder) WHERE state = 0"],
    6: [
        "ALTER TABLE task ADD COLUMN failed_attempts BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN rate_since DOUBLE PRECISION",
        "ALTER TABLE task ADD COLUMN rate_count BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN rate DOUBLE PRECISION",
        "ALTER TABLE finished_task ADD COLUMN failed_attempts BIGINT NOT NULL DEFAULT 0",
        "CREATE TABLE throughput (minute BIGINT PRIMARY KEY, completed BIGINT NOT NULL DEFAULT 0, "
        "failed BIGINT NOT NULL DEFAULT 0)",
        # the failures still stored: what an older version counted of a task's failed attempts
        "UPDATE task SET failed_attempts = (SELECT count(*) FROM failure f WHERE f.task = task.id "
        "AND f.job IN (SELECT id FROM job))",
    ],
    7: ["ALTER TABLE task ADD COLUMN max_running INTEGER",
        "ALTER TABLE task ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE task ADD COLUMN retry_on TEXT",
        "ALTER TABLE job ADD COLUMN max_retries INTEGER",
        "ALTER TABLE job ADD COLUMN retry_delay DOUBLE PRECISION",
        "ALTER TABLE job ADD COLUMN retry_on TEXT",
        "ALTER TABLE job ADD COLUMN round INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE job ADD COLUMN round_start INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE failure ADD COLUMN round INTEGER NOT NULL DEFAULT 1",
        "DROP INDEX task_claimable",
        f"CREATE INDEX task_claimable ON task (priority DESC, last_served) WHERE {CLAIMABLE}"],
}

_LOCKS = ("LEFT JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
          "AND l.classid = ?::int4::oid AND l.objid = w.id::int4::oid "
          "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")

#: the liveness clock: the server's, so workers on hosts with different clocks agree
SERVER_CLOCK = "extract(epoch from clock_timestamp())"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs, still a URL that works: parsed as libpq
    parses it (a password may hold ``?``, ``/`` or ``@``), and written again with the rest as given."""
    scheme, _, rest = url.partition("://")
    try:
        from psycopg.conninfo import conninfo_to_dict

        if "password" not in conninfo_to_dict(url):
            return url
    except Exception:  # noqa: BLE001 - no driver, or a URL libpq refuses: show no more than the scheme
        return f"{scheme}://..."
    # libpq's authority ends at the first "/" after its last "@"; the user is what precedes a ":"
    at = rest.rfind("@", 0, rest.find("/", rest.rfind("@") + 1) if "/" in rest else len(rest))
    if at >= 0:
        rest = rest[:at].split(":", 1)[0] + rest[at:]
    base, _, query = rest.partition("?")
    kept = "&".join(p for p in query.split("&") if p and not p.startswith("password="))
    shown = f"{scheme}://{base}" + (f"?{kept}" if kept else "")
    try:
        if "password" not in conninfo_to_dict(shown):
            return shown
    except Exception:  # noqa: BLE001 - as above
        pass
    return f"{scheme}://..."


def schema_key(schema: str) -> int:
    """The first key of a schema's advisory locks (a positive int4)."""
    return zlib.crc32(f"litemultistep:{schema}".encode()) & 0x7FFFFFFF


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def _translate(error: Exception, path: str) -> StorageError | DatabaseUnusable:
    import psycopg

    state = getattr(error, "sqlstate", None) or ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if state in ("40P01", "40001", "55P03"):
        return DatabaseBusy(f"{path}: {message} (another transaction was in the way; nothing was written: try again)")
    if state == "57014":
        return DatabaseBusy(f"{path}: {message} (the server cancelled the statement: its statement_timeout, or "
                            "an administrator; nothing was written: try again)")
    if state.startswith("53"):
        return StorageError(f"the server of {path} is out of resources ({message}); nothing stored was lost")
    if state.startswith(("08", "57P")) or isinstance(error, psycopg.OperationalError) and not state:
        return DatabaseUnavailable(f"cannot reach {path}: {message}")
    return DatabaseUnusable(f"{path}: {message}")


class PgConnection:
    """A psycopg connection that speaks the engine's SQL (``?`` placeholders) and its errors."""

    dialect = POSTGRES

    def __init__(self, raw: psycopg.Connection[Any], db: PostgresDatabase) -> None:
        self.raw = raw
        self._db = db
        #: the workers whose advisory lock this connection's session holds: taken again on a new
        #: session when the old one is lost, so a worker keeps its identity through a dropped connection
        self.locks: set[int] = set()

    def reconnect(self) -> None:
        """Open a new session in place of a lost one, and take this connection's locks again."""
        import psycopg

        log.warning("the connection to %s was lost; connecting again", self._db.path)
        self.raw.close()
        self.raw = self._db._connect()
        for worker_id in sorted(self.locks):
            args = (self._db.lock_key, worker_id)
            try:
                if not self.raw.execute(_pg_sql(_TRY_LOCK), args).fetchone()[0]:  # type: ignore[index]
                    # our old session, still alive for the server (its client vanished mid-network)
                    self.raw.execute(_pg_sql(_END_HOLDER), args).fetchall()
                    self.raw.execute(_pg_sql("SELECT pg_advisory_lock(?::int4, ?::int4)"), args)
            except psycopg.Error as e:
                raise _translate(e, self._db.path) from None
            log.warning("worker %d holds its lock again, on a new connection to %s", worker_id, self._db.path)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        import psycopg
        from psycopg.pq import TransactionStatus

        alone = self.raw.info.transaction_status == TransactionStatus.IDLE
        try:
            return self.raw.execute(_pg_sql(sql), parameters)
        except psycopg.OperationalError as e:
            if not (alone and self.raw.broken):
                raise _translate(e, self._db.path) from None
        except psycopg.Error as e:
            raise _translate(e, self._db.path) from None
        # A statement of its own (a read: the engine writes only in transactions) on a connection that
        # turned out to be lost (the server restarted, a proxy dropped it): connect again and run it
        # once more.
        self.reconnect()
        try:
            return self.raw.execute(_pg_sql(sql), parameters)
        except psycopg.Error as e:
            raise _translate(e, self._db.path) from None

    def executemany(self, sql: str, parameters: Sequence[Sequence[Any]], /, returning: bool = False) -> Any:
        """Run ``sql`` for each row of parameters; with ``returning``, the first column each returned."""
        import psycopg

        cur = self.raw.cursor()
        try:
            cur.executemany(_pg_sql(sql), parameters, returning=returning)
            if not returning:
                return cur
            out = []
            while True:
                out.append(cur.fetchone()[0])  # type: ignore[index]
                if not cur.nextset():
                    return out
        except psycopg.Error as e:
            raise _translate(e, self._db.path) from None

    def notify(self) -> None:
        """Wake the idle workers of this database once the transaction commits."""
        self.raw.execute(f"NOTIFY {self._db.channel}")

    def lock_task(self, task_pk: int) -> bool:
        """A transaction-level advisory lock of its own (not the task's row: locking that before this
        transaction's updates of task rows, made in key order at its end, could deadlock)."""
        key = (self._db.lock_key << 32) | (task_pk & 0xFFFFFFFF)
        return bool(self.execute("SELECT pg_try_advisory_xact_lock(?)", (key,)).fetchone()[0])

    @property
    def usable(self) -> bool:
        return not (self.raw.closed or self.raw.broken)


class PostgresDatabase(Database):
    """A litemultistep database on a PostgreSQL server (see :class:`litemultistep.Database`)."""

    dialect = POSTGRES

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise DatabaseUnusable(f"{redact(os.fspath(path))} is a PostgreSQL URL: {INSTALL_HINT}") from None
        self.target = os.fspath(path)
        self.path = redact(self.target)
        #: each thread's connection, by thread id: those of threads that ended are closed (not left to
        #: the garbage collector) when another connection is opened, or at close()
        self._conns: dict[int, PgConnection] = {}
        self._conns_lock = threading.Lock()
        self._pid = os.getpid()
        self._forsaken: list[Any] = []
        conn = self.connection()
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        if schema is None:
            raise DatabaseUnusable(f"{self.path}: no schema to create tables in (the search_path names none "
                                   "that exists); create it, or fix the URL's search_path option")
        #: our advisory locks' first key, and our NOTIFY channel: one per schema, so two litemultistep
        #: schemas in one database never see each other's workers
        self.lock_key = schema_key(schema)
        self.channel = f"litemultistep_{self.lock_key}"
        self._prepare_schema(create)

    def driver_error(self, error: BaseException) -> LiteMultiStepError | None:
        import psycopg

        return _translate(error, self.path) if isinstance(error, psycopg.Error) else None

    def still_there(self) -> bool:
        return True

    def builder_gone(self, pid: int) -> bool:
        return False  # the builder may be on another host, where its pid says nothing

    def schema_version(self) -> int:
        return int(self.connection().execute("SELECT max(version) FROM litemultistep_schema").fetchone()[0])

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            given = conninfo_to_dict(self.target)
        except psycopg.Error as e:
            why = str(e).strip()
            rest = self.target.partition("://")[2]
            if "password" in rest or ("@" in rest and ":" in rest.rpartition("@")[0]):
                # libpq quotes the part it could not read, which may be the password itself
                why = re.sub(r'"[^"]*"', "(not shown)", why)
            raise DatabaseUnusable(f"{self.path} is not a PostgreSQL URL libpq can read: {why}") from None
        # keepalives: a connection to a host that vanished is noticed in about half a minute
        defaults = {"application_name": "litemultistep", "connect_timeout": "10", "keepalives": "1",
                    "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3"}
        extra = {k: v for k, v in defaults.items() if k not in given}
        try:
            return psycopg.connect(make_conninfo(self.target, **extra), autocommit=True)
        except psycopg.Error as e:
            raise _translate(e, self.path) from None

    def connection(self) -> PgConnection:
        """This thread's connection, opened on first use, after a fork, and after it was lost."""
        if os.getpid() != self._pid:
            # Inherited across fork: never close them here (that would end the parent's sessions).
            self._forsaken.append(self._conns)
            self._conns = {}
            self._pid = os.getpid()
        me = threading.get_ident()
        conn = self._conns.get(me)
        if conn is None:
            self._close_orphans()
            conn = self._conns[me] = PgConnection(self._connect(), self)
        elif not conn.usable:
            conn.reconnect()
        return conn

    def _close_orphans(self) -> None:
        alive = {t.ident for t in threading.enumerate()}
        with self._conns_lock:
            for ident in [i for i in self._conns if i not in alive]:
                self._conns.pop(ident).raw.close()

    @contextmanager
    def write(self) -> Iterator[PgConnection]:
        """A short transaction, committed when the block ends."""
        import psycopg

        conn = self.connection()
        try:
            with conn.raw.transaction():
                yield conn
        except psycopg.Error as e:
            raise _translate(e, self.path) from None

    def close(self) -> None:
        """Close this thread's connection, and those of threads that ended (another use reopens it)."""
        if os.getpid() != self._pid:
            return
        conn = self._conns.pop(threading.get_ident(), None)
        if conn is not None:
            conn.raw.close()
        self._close_orphans()

    def waiter(self, poll: float, brief: bool = False) -> PgWaiter:
        return PgWaiter(self, poll)  # LISTEN, brief or not: its connection closes at no cost

    # -- schema -------------------------------------------------------------------------------------

    def _schema_state(self, conn: PgConnection) -> str:
        # pg_tables, read with this statement's snapshot: it sees what a creator just committed (the
        # catalog caches behind to_regclass may not yet)
        tables = {name for (name,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename IN ('litemultistep_schema', 'task')").fetchall()}
        if "litemultistep_schema" not in tables:
            if "task" in tables:
                raise DatabaseUnusable(f"{self.path} already has a table 'task' of another program in schema "
                                       f"{conn.execute('SELECT current_schema()').fetchone()[0]!r}; litemultistep "
                                       "leaves it untouched (give it its own schema with the URL's search_path)")
            return "new"
        row = conn.execute("SELECT max(version) FROM litemultistep_schema").fetchone()
        version = row[0] or 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{self.path} was written by a newer litemultistep (schema v{version}; this version "
                               f"knows v{SCHEMA_VERSION}): upgrade litemultistep to use it")
        return "current" if version == SCHEMA_VERSION else "old"

    def _prepare_schema(self, create: bool) -> None:
        conn = self.connection()
        state = self._schema_state(conn)
        if state == "current":
            return
        if state == "new" and not create:
            raise DatabaseUnusable(f"no litemultistep tables in {self.path} (a reading command never creates "
                                   "them); check the URL, or create tasks first")
        with self.write() as c:
            # One creator at a time; the others find the work done when they get the lock.
            c.execute("SELECT pg_advisory_xact_lock(?::int4, 0)", (self.lock_key,))
            state = self._schema_state(c)
            if state == "new":
                for sql in SCHEMA:
                    c.execute(sql)
                c.execute("INSERT INTO litemultistep_schema (version) VALUES (?)", (SCHEMA_VERSION,))
                log.debug("created litemultistep schema v%d in %s", SCHEMA_VERSION, self.path)
            elif state == "old":
                (version,) = c.execute("SELECT max(version) FROM litemultistep_schema").fetchone()
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for sql in MIGRATIONS[target]:
                        c.execute(sql)
                c.execute("UPDATE litemultistep_schema SET version = ?", (SCHEMA_VERSION,))
                log.info("upgraded %s from schema v%d to v%d", self.path, version, SCHEMA_VERSION)


    # -- liveness -----------------------------------------------------------------------------------

    def register_worker(self, kind: str, queues: Sequence[str] | None = None, lease: float | None = None,
                        concurrency: int = 1) -> tuple[int, AdvisoryLock]:
        # the row and the lock in one transaction: once others see the row, its lock is held
        t = now()
        with self.write() as c:
            (worker_id,) = c.execute(
                "INSERT INTO worker (pid, hostname, kind, queues, started_at, heartbeat_at, expires_at, lock_path, "
                f"heartbeat_mono, concurrency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, {SERVER_CLOCK}, ?) RETURNING id",
                (os.getpid(), socket.gethostname(), kind, " ".join(queues) if queues else None, t, t,
                 t + lease if lease else None, _lock_name(), concurrency)).fetchone()
            # session-level: it outlives this transaction, and is released only by unlock or disconnect
            c.execute("SELECT pg_advisory_lock(?::int4, ?::int4)", (self.lock_key, worker_id))
        c.locks.add(int(worker_id))
        return int(worker_id), AdvisoryLock(self, int(worker_id))

    def heartbeat(self, worker_id: int, lease: float, lock: LivenessLock | None = None) -> bool:
        """Renew the heartbeat on the server's clock (and the lock, on a new connection)."""
        if lock is not None and not lock.intact():
            lock.renew()
        t = now()
        with self.write() as c:
            return c.execute(f"UPDATE worker SET heartbeat_at = ?, expires_at = ?, heartbeat_mono = {SERVER_CLOCK} "
                             "WHERE id = ?", (t, t + lease, worker_id)).rowcount == 1

    def dead_workers(self, lease: float) -> list[DeadWorker]:
        """Workers whose heartbeat, on the server's clock, is older than their own lease: a worker
        cut off from the server has stopped its jobs by then (:meth:`fence_after`). A free lock alone
        proves nothing (a dropped connection frees it while the worker and its jobs run on), unless
        the worker's process, on this very host, is gone. Inline runners (sync mode, ``drain``) and
        the builders of ``with`` blocks, which have no heartbeat, live while their lock is held, and,
        should it be lost, while their process lives (on this host) or the lease from their
        registration lasts (on another host)."""
        rows = self.connection().execute(
            f"SELECT w.id, w.pid, w.lock_path, l.pid, {SERVER_CLOCK} - w.heartbeat_mono, "
            f"w.expires_at - w.heartbeat_at, w.kind FROM worker w {_LOCKS} ORDER BY w.id", (self.lock_key,)).fetchall()
        dead = []
        here = _lock_name()
        for wid, pid, path, backend, age, own_lease, kind in rows:
            stale = age is not None and float(age) > (own_lease or lease)
            gone_here = backend is None and path == here and not process_alive(pid)
            if kind != "process":  # inline runners, builders: no heartbeat; alive while their lock is held
                gone = gone_here or (backend is None and path != here and stale)
            else:
                gone = stale or gone_here
            if gone:
                dead.append(DeadWorker(wid, pid, path))
        return dead

    @classmethod
    def fence_after(cls, lease: float) -> float | None:
        return rules.fence_after(lease)

    def end_session(self, dead: DeadWorker) -> None:
        """End the connection still holding a dead worker's lock, if any (its heartbeat ran out), so
        it cannot go on as if it still held its jobs."""
        try:
            self.connection().execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objsubid = 2 AND l.classid = ?::int4::oid AND l.objid = ?::int4::oid "
                "AND l.pid <> pg_backend_pid() "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (self.lock_key, dead.id)).fetchall()
        except DatabaseUnusable as e:
            log.warning("could not end the session of dead worker %d: %s", dead.id, e)

    def maintenance_every(self) -> float:
        """Each round asks the server's lock table, so a pool of n workers shares the duty: each worker
        looks every n/4 seconds (give or take a fifth, so they do not look together), and a dead worker
        is still found within about a second."""
        (n,) = self.connection().execute("SELECT count(*) FROM worker").fetchone()
        return max(1.0, int(n) / 4) * random.uniform(0.8, 1.2)


# -- liveness -----------------------------------------------------------------------------------------


_TRY_LOCK = "SELECT pg_try_advisory_lock(?::int4, ?::int4)"
#: ends the session holding a worker's lock, but ours
_END_HOLDER = ("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
               "AND classid = ?::int4::oid AND objid = ?::int4::oid AND objsubid = 2 AND pid <> pg_backend_pid()")


def _lock_name() -> str:
    """The ``lock_path`` of a worker's row: its lock, and the host its pid belongs to."""
    return f"advisory lock, {host_identity()}"


class AdvisoryLock:
    """A worker's session-level advisory lock: held by its connection, dropped by the server the
    instant that connection dies."""

    def __init__(self, db: PostgresDatabase, worker_id: int) -> None:
        self._db = db
        self.worker_id = worker_id
        self.path = _lock_name()
        #: job processes watch their fence instead (the lease runs on the server, not on this host)
        self.shared: str | None = None

    def intact(self) -> bool:
        """Whether this thread's connection still holds the lock (a lost one does not, nor a new one)."""
        try:
            return self._db.connection().execute(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
                "AND classid = ?::int4::oid AND objid = ?::int4::oid AND objsubid = 2",
                (self._db.lock_key, self.worker_id)).fetchone() is not None
        except DatabaseUnavailable:
            return False

    def renew(self) -> str:
        """Take the lock again on this thread's connection (it is not the one that took it). A
        session of ours that the server still thinks alive is ended first: it is ours."""
        conn = self._db.connection()
        args = (self._db.lock_key, self.worker_id)
        if not conn.execute(_TRY_LOCK, args).fetchone()[0]:
            conn.execute(_END_HOLDER, args).fetchall()
            conn.execute("SELECT pg_advisory_lock(?::int4, ?::int4)", args)
        conn.locks.add(self.worker_id)
        log.warning("worker %d took its lock again on a new connection to %s", self.worker_id, self._db.path)
        return self.path

    def release(self) -> None:
        try:
            conn = self._db.connection()
            conn.locks.discard(self.worker_id)
            conn.execute("SELECT pg_advisory_unlock(?::int4, ?::int4)", (self._db.lock_key, self.worker_id))
        except (StorageError, DatabaseUnusable):
            pass  # the connection is gone, and the lock with it


# -- waiting ------------------------------------------------------------------------------------------


class PgWaiter:
    """An idle worker's ear: a connection of its own that LISTENs on the database's channel.
    :meth:`fileno` is readable when a NOTIFY (or the connection's end) arrives; with no connection
    (the server is away) it is None, and the worker polls."""

    def __init__(self, db: PostgresDatabase, poll: float) -> None:
        self.db = db
        self.poll = poll
        self.conn: psycopg.Connection[Any] | None = None
        self._next_try = 0.0
        self._listen()

    def _listen(self) -> None:
        import psycopg

        # while the server is away, try again at most every 2 s (a connect may wait for its timeout)
        if time.monotonic() < self._next_try:
            return
        self._next_try = time.monotonic() + 2.0
        try:
            conn = self.db._connect()
            conn.execute(f"LISTEN {self.db.channel}")
        except (psycopg.Error, StorageError, DatabaseUnusable):
            self.conn = None
            return
        self.conn = conn

    def fileno(self) -> int | None:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.close()
            self._listen()
        return None if self.conn is None else self.conn.fileno()

    def changed(self) -> bool:
        """Whether a notification came since the last call (and drain them)."""
        import psycopg

        if self.conn is None:
            return True
        try:
            self.conn.pgconn.consume_input()
            got = False
            while self.conn.pgconn.notifies() is not None:
                got = True
            return got
        except psycopg.Error:
            self.close()
            return True

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as a notification came."""
        fd = self.fileno()
        if fd is None:
            select.select([], [], [], min(self.poll, max(timeout, 0.0)))
            return True
        ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
        return bool(ready) and self.changed()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- throwaway schemas, for tests -----------------------------------------------------------------------


def with_search_path(url: str, schema: str) -> str:
    """``url`` with its connections' ``search_path`` set to ``schema`` (libpq's ``options``)."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def temporary_schema(url: str, prefix: str = "lms_test") -> Iterator[str]:
    """A fresh, empty schema in the database at ``url``, dropped afterwards; yields the URL that puts
    litemultistep's tables in it. What the pytest plugin and the test suite run on."""
    import secrets

    import psycopg

    from . import db as dbmod

    schema = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    target = with_search_path(url, schema)
    try:
        yield target
    finally:
        opened = dbmod._open.pop(target, None)
        if opened is not None:
            opened.close()
        with psycopg.connect(url, autocommit=True) as admin:
            # workers still connected to it are ended first, so the drop never waits on them
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                          "AND classid = %s::int4::oid AND pid <> pg_backend_pid()", (schema_key(schema),))
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
