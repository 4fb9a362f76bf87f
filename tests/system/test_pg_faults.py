"""The faults a network database brings, against the real server and real worker processes: a cut
session, a worker paused past its lease, a network partition (a TCP proxy of the test's own, frozen
then released), a storm of session kills, server errors a retry cures, NUL bytes, a with block whose
last write fails, passwords. The finalizers mark their runs (start, a tick every 20 ms, end, with their
pid); the rule checked: no two runs of one task's finalizers overlap, and each finalizer's last run
ended before the next began."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import jobfuncs
import psycopg
import pytest
from conftest import cli, lines, wait_for

import litemultistep
from litemultistep import Database, MultiStepTask
from litemultistep.engine import check
from litemultistep.views import failures

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def db(pg_db: str) -> str:
    return pg_db


@dataclass
class Run:
    tag: str
    run: str
    pid: int
    start: float
    last: float
    ended: bool


def runs(path: str) -> list[Run]:
    """Every run the marks show, by the time it started."""
    found: dict[str, Run] = {}
    for line in lines(path):
        kind, tag, run, pid, t = line.split()
        r = found.setdefault(run, Run(tag, run, int(pid), float(t), float(t), False))
        r.last = max(r.last, float(t))
        r.ended = r.ended or kind == "end"
    return sorted(found.values(), key=lambda r: r.start)


def assert_one_at_a_time_in_order(path: str, chain: list[str]) -> list[Run]:
    seen = [r for r in runs(path) if r.tag in chain]
    for a, b in zip(seen, seen[1:], strict=False):
        assert a.last < b.start, f"{a.tag} ({a.pid}) still ran {a.last - b.start:.3f} s into {b.tag} ({b.pid})"
    for x, y in zip(chain, chain[1:], strict=False):
        last_x = [r for r in seen if r.tag == x][-1]
        first_y = [r for r in seen if r.tag == y][0]
        assert last_x.ended and last_x.last < first_y.start, f"{y} began before {x} ended"
    assert all([r for r in seen if r.tag == tag][-1].ended for tag in chain)
    return seen


def started(path: str, tag: str) -> list[Run]:
    return [r for r in runs(path) if r.tag == tag]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def cut_sessions(db: str, worker_pid: int) -> int:
    """End the session holding the lock of the worker whose process is ``worker_pid``."""
    database = Database(db)
    try:
        return len(database.connection().execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN worker w ON l.objid = w.id::int4::oid "
            "WHERE l.locktype = 'advisory' AND l.classid = ?::int4::oid AND w.pid = ?",
            (database.lock_key, worker_pid)).fetchall())
    finally:
        database.close()


def chain_task(db: str, log_path: str, f0: float, slug: str = "chain", child: bool | None = None) -> MultiStepTask:
    """F0 runs ``f0`` seconds, then F1 and F2 briefly; with ``child``, F0's ticks come from a child
    process it starts (in a session of its own if ``child`` is True)."""
    with MultiStepTask.create(slug, db=db) as task:
        task.add_job(jobfuncs.noop)
        if child is None:
            task.add_finalization_job(jobfuncs.marked, log_path, "F0", f0)
        else:
            task.add_finalization_job(jobfuncs.marked_by_child, log_path, "F0", f0, child)
        task.add_finalization_job(jobfuncs.marked, log_path, "F1", 0.2)
        task.add_finalization_job(jobfuncs.marked, log_path, "F2", 0.2)
    return task


def finish(task: MultiStepTask, spawn, procs, timeout: float = 90) -> None:
    try:
        wait_for(lambda: task.progress().settled, timeout=timeout, what="the task to settle")
    except AssertionError as e:
        logs = "\n".join(f"--- worker {p.pid}:\n{spawn.log(p)[-4000:]}" for p in procs)
        raise AssertionError(f"{e}\n{logs}") from None


def assert_clean(db: str) -> None:
    database = Database(db)
    try:
        assert failures(database) == []
        assert check(database) == []
    finally:
        database.close()


def stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(40) in (0, 1)


def test_a_cut_session_neither_runs_a_finalizer_twice_nor_counts_a_crash(db, log_path, spawn):
    task = chain_task(db, log_path, 4.0)
    procs = [spawn(db, "-c", "1", "--lease", "6"), spawn(db, "-c", "1", "--lease", "6")]
    wait_for(lambda: started(log_path, "F0"), what="F0 to start")
    holder = parent_of(started(log_path, "F0")[0].pid)
    assert cut_sessions(db, holder) == 1
    finish(task, spawn, procs)
    seen = assert_one_at_a_time_in_order(log_path, ["F0", "F1", "F2"])
    # the worker connected again within its lease and kept its identity: its F0 went on, once
    assert [r.tag for r in seen] == ["F0", "F1", "F2"]
    assert task.progress().finished
    assert_clean(db)
    holder_proc = next(p for p in procs if p.pid == holder)
    assert "holds its lock again" in spawn.log(holder_proc)
    stop(procs)


def test_a_worker_paused_past_its_lease_is_fenced_and_its_finalizer_runs_once_at_a_time(db, log_path, spawn):
    task = chain_task(db, log_path, 6.0)
    procs = [spawn(db, "-c", "1", "--lease", "3"), spawn(db, "-c", "1", "--lease", "3")]
    wait_for(lambda: started(log_path, "F0"), what="F0 to start")
    first = started(log_path, "F0")[0]
    holder = parent_of(first.pid)
    os.kill(holder, signal.SIGSTOP)  # the worker alone: its job process runs on, and must stop itself
    try:
        wait_for(lambda: len(started(log_path, "F0")) == 2, timeout=30, what="F0 to start elsewhere")
    finally:
        os.kill(holder, signal.SIGCONT)
    finish(task, spawn, procs)
    seen = assert_one_at_a_time_in_order(log_path, ["F0", "F1", "F2"])
    old, new = [r for r in seen if r.tag == "F0"]
    assert not old.ended and parent_of(new.pid) != holder
    assert task.progress().finished
    assert_clean(db)  # no failure: the paused worker uncounted the crash of the job it had stopped
    holder_proc = next(p for p in procs if p.pid == holder)
    wait_for(lambda: "taken for dead" in spawn.log(holder_proc), what="the paused worker to rejoin")
    stop(procs)


@pytest.mark.parametrize("session", [False, True], ids=["child-in-group", "child-in-own-session"])
def test_a_worker_paused_past_its_lease_stops_what_its_finalizer_started(db, log_path, spawn, session):
    """The fence ends the job's whole process tree, a child in a session of its own included,
    before the lease runs out: the child's ticks stop before the finalizer runs elsewhere."""
    task = chain_task(db, log_path, 6.0, child=session)
    procs = [spawn(db, "-c", "1", "--lease", "3"), spawn(db, "-c", "1", "--lease", "3")]
    wait_for(lambda: started(log_path, "F0"), what="F0 to start")
    holder = parent_of(started(log_path, "F0")[0].pid)
    os.kill(holder, signal.SIGSTOP)
    try:
        wait_for(lambda: len(started(log_path, "F0")) == 2, timeout=30, what="F0 to start elsewhere")
        time.sleep(1.0)  # a child that outlived the fence would tick on meanwhile
    finally:
        os.kill(holder, signal.SIGCONT)
    finish(task, spawn, procs)
    assert_one_at_a_time_in_order(log_path, ["F0", "F1", "F2"])
    assert task.progress().finished
    assert_clean(db)
    stop(procs)


@pytest.mark.parametrize("session", [False, True], ids=["child-in-group", "child-in-own-session"])
def test_a_killed_worker_takes_what_its_finalizer_started_with_it(any_db, log_path, spawn, session):
    """SIGKILL of the worker running F0, whose child does the work: the job process ends the child
    (in its group or a session of its own) the moment its worker dies, and on SQLite the worker
    counts as alive until they are gone, so the run elsewhere never meets the child."""
    task = chain_task(any_db, log_path, 4.0, child=session)
    procs = [spawn(any_db, "-c", "1", "--lease", "3"), spawn(any_db, "-c", "1", "--lease", "3")]
    wait_for(lambda: started(log_path, "F0"), what="F0 to start")
    holder = parent_of(started(log_path, "F0")[0].pid)
    time.sleep(0.5)
    os.kill(holder, signal.SIGKILL)
    survivors = [p for p in procs if p.pid != holder]
    finish(task, spawn, survivors)
    seen = assert_one_at_a_time_in_order(log_path, ["F0", "F1", "F2"])
    assert len([r for r in seen if r.tag == "F0"]) == 2
    assert task.progress().finished
    assert_clean(any_db)
    stop(survivors)


def test_a_whole_host_paused_past_the_lease_overlaps_only_for_the_instant_it_takes_to_look(db, log_path, spawn):
    """Worker and job processes paused together (what a laptop's sleep or a frozen VM does to a host),
    past the lease: meanwhile the finalizer runs elsewhere. When the host resumes, its job process
    stops its job the moment it looks at its clock: that instant is all the overlap there is (the
    README's bound), measured here from the marks both runs leave."""
    task = chain_task(db, log_path, 8.0)
    paused = spawn(db, "-c", "1", "--lease", "3")
    wait_for(lambda: started(log_path, "F0"), what="F0 to start")
    other = spawn(db, "-c", "1", "--lease", "3")
    os.killpg(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: len(started(log_path, "F0")) == 2, timeout=30, what="F0 to start elsewhere")
    finally:
        resumed = time.time()
        os.killpg(paused.pid, signal.SIGCONT)
    finish(task, spawn, [paused, other])
    old, new = [r for r in runs(log_path) if r.tag == "F0"]
    overlap = old.last - resumed
    print(f"after the host resumed, its stale run went on for {overlap * 1000:.0f} ms")
    assert not old.ended and overlap < 1.0, f"the stale F0 ran {overlap:.3f} s after the host resumed"
    runs_after = [r for r in runs(log_path) if r.tag in ("F1", "F2")]
    assert all(r.start > new.last for r in runs_after) and [r.tag for r in runs_after] == ["F1", "F2"]
    assert_clean(db)
    stop([paused, other])


class FreezableProxy:
    """A TCP proxy to the server: ``freeze()`` stops carrying bytes both ways (the connections stay
    open, as in a network partition), ``release()`` carries them again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        pair = {a: b, b: a}
        try:
            while not self.closed:
                self.flowing.wait()
                ready, _, _ = select.select([a, b], [], [], 0.05)
                if not self.flowing.is_set():
                    continue  # frozen: whatever came waits in the socket buffers
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    pair[src].sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def url(self, url: str) -> str:
        return url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}", 1)

    def freeze(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


def test_a_partitioned_worker_stops_its_job_before_it_runs_elsewhere(db, log_path, spawn):
    info = psycopg.conninfo.conninfo_to_dict(db)
    proxy = FreezableProxy((info.get("host", "127.0.0.1"), int(info.get("port", 5432))))
    try:
        if proxy.url(db) == db:
            pytest.skip(f"the test server's URL names no host:port to put a proxy in front of: {db}")
        task = chain_task(db, log_path, 6.0)
        cut_off = spawn(proxy.url(db), "-c", "1", "--lease", "3")
        wait_for(lambda: started(log_path, "F0"), what="F0 to start behind the proxy")
        other = spawn(db, "-c", "1", "--lease", "3")
        proxy.freeze()
        try:
            wait_for(lambda: len(started(log_path, "F0")) == 2, timeout=30, what="F0 to run on the other side")
        finally:
            proxy.release()
        finish(task, spawn, [cut_off, other])
        seen = assert_one_at_a_time_in_order(log_path, ["F0", "F1", "F2"])
        old, new = [r for r in seen if r.tag == "F0"]
        assert not old.ended, "the cut-off worker's F0 ran to its end"
        assert_clean(db)
        wait_for(lambda: "taken for dead" in spawn.log(cut_off), timeout=60, what="the cut-off worker to rejoin")
        stop([cut_off, other])
    finally:
        proxy.close()


def test_a_minute_of_session_kills_loses_nothing_overlaps_nothing_and_fails_nothing(db, tmp_path, spawn):
    procs = [spawn(db, "-c", "2", "--lease", "3", "-q") for _ in range(3)]
    tasks: list[tuple[MultiStepTask, str]] = []
    rng = random.Random(7)
    killed = 0
    deadline = time.monotonic() + 60
    next_task = 0.0
    database = Database(db)
    try:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_task:
                path = str(tmp_path / f"t{len(tasks)}.log")
                with MultiStepTask.create(f"storm-{len(tasks)}", db=db) as task:
                    for i in range(6):
                        task.add_job(jobfuncs.marked, path, f"j{i}", 0.1)
                    task.add_finalization_job(jobfuncs.marked, path, "F0", 0.6)
                    task.add_finalization_job(jobfuncs.marked, path, "F1", 0.2)
                tasks.append((task, path))
                next_task = time.monotonic() + 2.0
            killed += len(database.connection().execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
                "AND l.classid = ?::int4::oid AND l.objsubid = 2 AND l.objid = "
                "(SELECT w.id::int4::oid FROM worker w WHERE w.kind = 'process' ORDER BY random() LIMIT 1)",
                (database.lock_key,)).fetchall())
            time.sleep(rng.uniform(0.2, 0.5))
    finally:
        database.close()
    assert killed > 60 and len(tasks) >= 25
    for task, _ in tasks:
        finish(task, spawn, procs, timeout=120)
        assert task.progress().finished, task.task_id
    for _, path in tasks:
        assert_one_at_a_time_in_order(path, ["F0", "F1"])
        assert {r.tag for r in runs(path) if r.ended} >= {f"j{i}" for i in range(6)}
    assert_clean(db)
    assert all(p.poll() is None for p in procs), "a worker died"
    stop(procs)


def test_server_errors_a_retry_cures_never_stop_a_worker(db, log_path, spawn):
    """statement_timeout and lock_timeout firing, again and again, while the test holds a lock on the
    job table: the worker logs them and tries again, and once the lock goes the task finishes."""
    with MultiStepTask.create("timeouts", db=db) as task:
        for i in range(4):
            task.add_job(jobfuncs.record, log_path, f"j{i}")
    short = db + "%20-cstatement_timeout%3D200%20-clock_timeout%3D100"
    schema = psycopg.conninfo.conninfo_to_dict(db)["options"].split("=", 1)[1]
    with psycopg.connect(db.split("?")[0]) as holder:
        holder.execute(f"LOCK TABLE {schema}.job IN ACCESS EXCLUSIVE MODE")
        worker = spawn(short, "-c", "1", "--lease", "10")
        time.sleep(3)
        assert worker.poll() is None, spawn.log(worker)
        holder.rollback()
    wait_for(lambda: task.progress().finished, timeout=60, what="the task to finish")
    log = spawn.log(worker)
    assert "canceling statement" in log or "lock timeout" in log, log
    stop([worker])


def test_a_nul_byte_in_what_a_job_raises_is_stored_escaped_and_harms_no_one(any_db, log_path, spawn):
    with MultiStepTask.create("nul", db=any_db) as bad:
        bad.add_job(jobfuncs.raise_nul)
        bad.add_job(jobfuncs.raise_nul_type)
    with MultiStepTask.create("innocent", db=any_db) as good:
        for i in range(20):
            good.add_job(jobfuncs.record, log_path, f"j{i}")
    assert spawn(any_db, "-c", "2", "--burst").wait(60) == 0
    assert good.progress().finished
    found = {f.exc_type: f.message for f in bad.failures()}
    assert found == {"ValueError": "bad\\x00message", "jobfuncs.Nul\\x00Error": "its type's name has a NUL"}
    doc = json.loads(cli("failed", any_db, "--json").stdout)
    assert {f["message"] for f in doc["failures"]} == {"bad\\x00message", "its type's name has a NUL"}


def test_a_block_whose_last_write_is_cut_leaves_nothing_behind(db, log_path):
    """The builder's session is ended while its final flush waits for a lock: the block raises, and
    the task is gone (removed on a new connection once the lock is released)."""
    schema = psycopg.conninfo.conninfo_to_dict(db)["options"].split("=", 1)[1]
    database = Database(db)
    outcome: list[BaseException] = []
    task = MultiStepTask.create("cut-block", db=database)

    def build() -> None:
        try:
            with task:
                for i in range(10):
                    task.add_job(jobfuncs.record, log_path, f"j{i}")
        except BaseException as e:  # noqa: BLE001 - what the block raised is the result
            outcome.append(e)

    with psycopg.connect(db.split("?")[0], autocommit=True) as admin, psycopg.connect(db.split("?")[0]) as holder:
        holder.execute(f"LOCK TABLE {schema}.job IN ACCESS EXCLUSIVE MODE")
        builder = threading.Thread(target=build)
        builder.start()
        wait_for(lambda: admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
                                       f"'{schema}.job'::regclass").fetchone()[0] > 0, what="the flush to wait")
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_locks WHERE NOT granted AND relation = "
                      f"'{schema}.job'::regclass").fetchall()
        time.sleep(0.5)
        holder.rollback()
    builder.join(30)
    assert outcome and isinstance(outcome[0], litemultistep.DatabaseUnavailable), outcome
    with pytest.raises(litemultistep.NoSuchMultiStepTask):
        MultiStepTask.find(task.task_id, db=db)
    assert database.connection().execute("SELECT count(*) FROM job").fetchone() == (0,)
    assert check(database) == []
    database.close()


def test_a_builder_killed_mid_block_leaves_a_task_that_workers_remove(any_db, tmp_path, spawn):
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(tmp_path)!r})
from litemultistep import MultiStepTask
import jobfuncs
with MultiStepTask.create("killed-builder", db={any_db!r}) as task:
    for i in range(30000):  # over one flush: some of its jobs are stored
        task.add_job(jobfuncs.noop, i)
    print(task.task_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    import subprocess
    import sys

    from conftest import env_for_workers
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=env_for_workers())
    task_id = out.stdout.strip()
    assert out.returncode == -signal.SIGKILL and task_id, out.stderr
    database = Database(any_db)
    try:
        # reported meanwhile, changed by nobody
        problems = check(database)
        assert [p.kind for p in problems] == ["dead-workers", "abandoned"], problems
        worker = spawn(any_db, "-c", "1")
        wait_for(lambda: not database.connection().execute("SELECT 1 FROM task WHERE task_id = ?",
                                                           (task_id,)).fetchone(), what="a worker to remove it")
        assert database.connection().execute("SELECT count(*) FROM job").fetchone() == (0,)
        assert check(database) == []
        stop([worker])
    finally:
        database.close()


def test_a_password_appears_nowhere(db, spawn):
    secret = "Sup3r?Sec/ret@x"
    authority, rest = db.split("://", 1)[1].split("/", 1)
    if "@" not in authority:
        pytest.skip(f"the test server's URL names no user to give a password to: {db}")
    user, host = authority.split("@", 1)
    url = f"postgresql://{user}:{quote(secret, safe='')}@{host}/{rest}"  # trust auth: any password will do
    assert psycopg.conninfo.conninfo_to_dict(url)["password"] == secret
    with MultiStepTask.create("secret", db=url) as task:
        task.add_job(jobfuncs.sleep_forever, "/dev/null", "x")
    # jobfuncs' directory named: the directory Workers adds by default is this process's sys.path[0],
    # which under pytest is whichever test directory was collected first
    with litemultistep.Workers(url, concurrency=1, paths=[os.path.dirname(jobfuncs.__file__)]) as workers:
        wait_for(lambda: task.progress().running_count == 1, what="the job to start")
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_is(int(p), workers.pid)]
        assert children, "no job process found"
        for pid in [workers.pid, *children]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"Sup3r" not in f.read(), f"the password is in the command line of process {pid}"
        worker_log = cli("workers", url).stdout
    opened = Database(url)
    # URLs libpq cannot read, whose message quotes the part it could not read
    unreadable = [f"postgresql://{user}:Sup3r%ZZ@{host}/{rest}", f"postgresql://{user}:{secret}%@{host}/{rest}",
                  f"postgresql://{user}@{host}/{rest}?password=Sup3r%zz"]
    shown = [cli("status", url, "--json").stdout, cli("status", url, task.task_id).stdout, worker_log,
             cli("status", url.replace(f"/{rest}", "/no_such_db")).stderr, repr(opened), str(task),
             *(cli("status", bad).stderr for bad in unreadable)]
    opened.close()
    for text in shown:
        assert "Sup3r" not in text, text
    # the URL shown is one that works: the same, but for the password
    assert json.loads(shown[0])["database"] == f"postgresql://{user}@{host}/{rest}"
    assert cli("status", json.loads(shown[0])["database"], "--json").returncode == 0


def _parent_is(pid: int, parent: int) -> bool:
    try:
        return parent_of(pid) == parent
    except OSError:
        return False
