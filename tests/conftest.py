"""Shared helpers: real worker processes, the real command, job logs."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import litemultistep
from litemultistep import config

TESTS = Path(__file__).resolve().parent
#: the project's root (README.md, scripts/)
ROOT = TESTS.parent
LMS = shutil.which("litemultistep", path=os.path.dirname(sys.executable)) or "litemultistep"


def env_for_workers() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("LITEMULTISTEP_CRASH_FILE", None)
    return env


def cli(*args: str, timeout: float = 60, input: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run the real ``litemultistep`` console script."""
    return subprocess.run([LMS, *args], capture_output=True, text=True, timeout=timeout, input=input,
                          env=env or env_for_workers())


def lines(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition",
             pause: Callable[[float], object] = time.sleep) -> None:
    """Poll ``predicate`` until it holds; ``pause(seconds)`` between looks (a browser test passes one
    that lets the browser's events in)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause(0.02)


class Spawner:
    """Starts ``litemultistep worker`` processes as a user does, and cleans them all up."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, db: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_path = self.tmp / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([LMS, "worker", db, *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=env or env_for_workers(), start_new_session=True)
        proc.log_path = str(log_path)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text()  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.cleanup()


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A database path (not the default one: tests name it with db=)."""
    return str(tmp_path / "test.sqlite")


#: the PostgreSQL server the PostgreSQL variants of the tests use (a fresh schema per test)
POSTGRES_ENV = "LITEMULTISTEP_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


@functools.cache
def postgres_server() -> tuple[str | None, str]:
    """The server's URL, or None and why it cannot be used."""
    url = os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed: pip install -e '.[test,postgres]'"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return None, (f"no PostgreSQL server at {url} ({str(e).strip().splitlines()[0]}); point {POSTGRES_ENV} "
                      "at one, e.g. postgresql://user@host:5432/dbname")
    return url, ""


def need_postgres() -> str:
    url, why = postgres_server()
    if url is None:
        pytest.skip(why)
    return url


@pytest.fixture
def pg_db() -> Iterator[str]:
    """The URL of a fresh schema on the test server, dropped afterwards."""
    from litemultistep.pg import temporary_schema

    with temporary_schema(need_postgres()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on each backend in turn: a SQLite path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "test.sqlite")
        return
    yield request.getfixturevalue("pg_db")


def is_pg(target: str) -> bool:
    return target.startswith("postgresql://")


#: indexes a migration dropped, as they were before it
DROPPED_INDEXES = {"task_claimable": "CREATE INDEX task_claimable ON task (last_served) "
                                     "WHERE pending_count > 0 AND state IN (1, 2)"}


def undo_migrations(execute: Callable[[str], object], migrations: dict[int, list[str]], down_to: int,
                    newest: int) -> None:
    """Take a database of schema ``newest`` back to ``down_to``, migration by migration, newest first."""
    for version in range(newest, down_to, -1):
        for sql in reversed(migrations[version]):
            words = sql.split()
            if words[:2] == ["CREATE", "INDEX"]:  # "CREATE INDEX i ON ..." -> "DROP INDEX i"
                execute(f"DROP INDEX {words[2]}")
            elif words[:2] == ["CREATE", "TABLE"]:  # "CREATE TABLE t (...)" -> "DROP TABLE t"
                execute(f"DROP TABLE {words[2]}")
            elif words[:2] == ["DROP", "INDEX"]:
                execute(DROPPED_INDEXES[words[2]])
            elif words[0] == "ALTER":  # "ALTER TABLE t ADD COLUMN c ..." -> "... DROP COLUMN c"
                execute(f"ALTER TABLE {words[2]} DROP COLUMN {words[5]}")
            # (an UPDATE fills a new column: nothing to undo)


def die(lock: object) -> None:
    """What happens to a worker's lock when its process dies: the kernel drops the flock (the file
    stays); the server drops the advisory lock with the connection. On PostgreSQL a free lock alone
    is no proof of death (a cut connection frees it too), so the worker's row is given the pid of a
    process of this host that is gone, as the worker's own would be."""
    from litemultistep.pg import AdvisoryLock

    if isinstance(lock, AdvisoryLock):
        lock.release()
        gone = subprocess.Popen(["true"])
        gone.wait()
        with lock._db.write() as c:
            c.execute("UPDATE worker SET pid = ? WHERE id = ?", (gone.pid, lock.worker_id))
    else:
        # what the kernel does when the process dies: the lock goes, the file stays
        os.close(lock._fd)  # type: ignore[attr-defined]
        lock._fd = -1  # type: ignore[attr-defined]


@pytest.fixture
def log_path(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.log")


@pytest.fixture(autouse=True)
def _clean_settings() -> Iterator[None]:
    """No test leaks its mode or default database into the next."""
    saved = (config._settings.db, config._settings.mode)
    yield
    config._settings.db, config._settings.mode = saved


@pytest.fixture
def sync_mode() -> Iterator[None]:
    litemultistep.configure(mode="sync")
    yield


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), so a full disk is a real ENOSPC. Mounting needs root, as CI runs."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path) -> Path:
    """Take every free byte of the filesystem holding ``directory``; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
