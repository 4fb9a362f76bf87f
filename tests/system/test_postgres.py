"""What only a network database has, with real worker processes: many processes creating the schema at
once, a cut connection, workers on different hosts, and the server restarting mid-run. (The rest of the
suite runs on PostgreSQL too: the tests taking ``any_db``.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jobfuncs
import pytest
from conftest import LMS, cli, env_for_workers, lines, wait_for

from litemultistep import Database, MultiStepTask
from litemultistep.db import SCHEMA_VERSION
from litemultistep.engine import check
from litemultistep.pg import MIGRATIONS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(pg_db: str) -> str:
    return pg_db


def ended(log_path: str, prefix: str = "end ") -> list[str]:
    return [line for line in lines(log_path) if line.startswith(prefix)]


def schema_versions(db: str) -> list[tuple[int]]:
    database = Database(db)
    try:
        return database.connection().execute("SELECT version FROM litemultistep_schema").fetchall()
    finally:
        database.close()


def open_at_once(db: str, n: int) -> None:
    """``n`` processes open the database at the same moment; each must succeed."""
    code = "import sys; from litemultistep import Database; Database(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, db], stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


def test_twenty_processes_create_the_schema_at_once(db):
    open_at_once(db, 20)
    assert schema_versions(db) == [(SCHEMA_VERSION,)]


def test_a_worker_whose_connection_is_cut_reconnects_and_nothing_is_lost(db, log_path, spawn):
    with MultiStepTask.create("cut", db=db) as task:
        for i in range(6):
            task.add_job(jobfuncs.slow_record, log_path, f"j{i}", 1.0)
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    a = spawn(db, "-c", "2", "--lease", "5")
    b = spawn(db, "-c", "1", "--lease", "5")
    wait_for(lambda: len([x for x in lines(log_path) if x.startswith("start")]) >= 3, what="jobs to start")
    database = Database(db)
    try:
        # end every session of worker a (its main connection holds its advisory lock)
        cut = database.connection().execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN worker w ON l.objid = w.id::int4::oid "
            "WHERE l.locktype = 'advisory' AND l.classid = ?::int4::oid AND w.pid = ?",
            (database.lock_key, a.pid)).fetchall()
        assert cut == [(True,)]
        wait_for(lambda: task.progress().finished, timeout=60, what="the task to finish")
        tags = {line.split()[1] for line in ended(log_path)}
        assert tags == {f"j{i}" for i in range(6)}
        assert [line.split()[0] for line in lines(log_path)].count("F") == 1
        assert check(database) == []
    finally:
        database.close()
    log = spawn.log(a)
    assert "was lost" in log or "cannot reach" in log, log
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, 1)
        assert a.poll() is not None


def _on_host(host: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """A worker in its own UTS namespace, so its hostname is ``host``, as on another machine."""
    with open(log, "wb") as out:
        return subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, LMS, "worker",
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=env_for_workers(),
                                start_new_session=True)


def test_workers_on_different_hosts_share_one_task(db, log_path, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--uts", "true"]).returncode != 0:
        pytest.skip("giving a worker its own hostname needs unshare(1) and root (util-linux; run as root)")
    with MultiStepTask.create("hosts", db=db) as task:
        for i in range(40):
            task.add_job(jobfuncs.record_host, log_path, f"j{i}", 0.05)
        task.add_finalization_job(jobfuncs.record_host, log_path, "F")
    procs = [_on_host(host, db, "-c", "1", log=tmp_path / f"{host}.log") for host in ("host-a", "host-b")]
    try:
        wait_for(lambda: len(cli("workers", db, "--json").stdout) > 10
                 and len(json.loads(cli("workers", db, "--json").stdout)["workers"]) == 2, what="two workers")
        hosts = {w["hostname"] for w in json.loads(cli("workers", db, "--json").stdout)["workers"]}
        assert hosts == {"host-a", "host-b"}
        wait_for(lambda: task.progress().finished, timeout=60, what="the task to finish")
        ran = [line.split() for line in lines(log_path)]
        assert sorted(tag for tag, _ in ran if tag != "F") == sorted(f"j{i}" for i in range(40))
        assert {host for _, host in ran} == {"host-a", "host-b"}, "both hosts ran jobs"
        assert [tag for tag, _ in ran][-1] == "F"
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0


class PrivateServer:
    """A PostgreSQL server of this test's own (initdb in a temp folder), so restarting it disturbs no
    other test."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins:
            pytest.skip("restarting a server needs PostgreSQL's own programs (Debian: apt install postgresql)")
        self.bin = bins[-1].parent
        # not under pytest's tmp_path: the server's user must reach it, and pytest's folders are private
        root = self.root = Path(tempfile.mkdtemp(prefix="lms-pg-"))
        self.data = root / "pgdata"
        self.data.mkdir()
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(root, "postgres")
            shutil.chown(self.data, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.data / "server.log"), "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_server():
    server = PrivateServer()
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop("immediate")
        except AssertionError:
            pass
        shutil.rmtree(server.root, ignore_errors=True)


def test_the_server_restarting_mid_run_loses_nothing(private_server, log_path, spawn):
    db = private_server.url
    with MultiStepTask.create("restart", db=db) as task:
        for i in range(60):
            task.add_job(jobfuncs.slow_record, log_path, f"j{i}", 0.05)
        task.add_finalization_job(jobfuncs.record, log_path, "F1")
        task.add_finalization_job(jobfuncs.record, log_path, "F2")
    Database(db).close()
    workers = [spawn(db, "-c", "2"), spawn(db, "-c", "1")]
    wait_for(lambda: len(ended(log_path)) >= 10, what="some jobs to finish")
    private_server.stop("immediate")  # as a crash or a power cut does: no goodbye to anyone
    time.sleep(2)
    private_server.start()
    try:
        wait_for(lambda: any(x.startswith("F2") for x in lines(log_path)),
                 timeout=90, what="the task to finish after the restart")
    except AssertionError as e:
        logs = "\n".join(f"--- worker {proc.pid}:\n{spawn.log(proc)}" for proc in workers)
        raise AssertionError(f"{e}\njobs.log: {lines(log_path)}\n{logs}") from None
    tags = [line.split()[0] for line in lines(log_path)]
    assert {line.split()[1] for line in ended(log_path)} == {f"j{i}" for i in range(60)}
    assert tags.count("F1") == 1 and tags.count("F2") == 1 and tags[-2:] == ["F1", "F2"]
    database = Database(db)
    try:
        assert check(database) == []
        assert task.progress().finished
    finally:
        database.close()
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, spawn.log(proc)


def test_an_older_schema_is_upgraded_once_by_many_processes(db):
    """A database made by an earlier version (schema v2) is upgraded by whichever of many starting
    processes gets the schema lock first; the others find it done."""
    database = Database(db)
    try:
        with database.write() as c:
            for version in range(SCHEMA_VERSION, 2, -1):  # each migration undone, newest first
                for sql in reversed(MIGRATIONS[version]):
                    words = sql.split()
                    if words[:2] == ["CREATE", "INDEX"]:  # "CREATE INDEX i ON ..." -> "DROP INDEX i"
                        c.execute(f"DROP INDEX {words[2]}")
                    elif words[:2] == ["CREATE", "TABLE"]:  # "CREATE TABLE t (...)" -> "DROP TABLE t"
                        c.execute(f"DROP TABLE {words[2]}")
                    elif words[0] == "ALTER":  # "ALTER TABLE t ADD COLUMN c ..." -> "... DROP COLUMN c"
                        c.execute(f"ALTER TABLE {words[2]} DROP COLUMN {words[5]}")
                    # (an UPDATE fills a new column: nothing to undo)
            c.execute("UPDATE litemultistep_schema SET version = 2")
    finally:
        database.close()
    open_at_once(db, 10)
    with MultiStepTask.create("after", db=db, keep_results=True) as task:
        task.add_job(jobfuncs.noop)
    assert task.progress().keep_results
    assert schema_versions(db) == [(SCHEMA_VERSION,)]
