"""Jobs cannot reach past their turn: a job is its whole process tree, what it leaves behind cannot fail
another job, a storm of signals stops a worker as documented, nuke stops what runs, and a database
file that vanishes or is replaced under a worker stops it with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import jobfuncs
import pytest
from conftest import cli, lines, wait_for

import litemultistep
from litemultistep import MultiStepTask
from litemultistep.config import resolve_db
from litemultistep.db import Database, process_alive
from litemultistep.engine import check

pytestmark = pytest.mark.timeout(120)


def pid_in(path: str, timeout: float = 30) -> int:
    wait_for(lambda: os.path.exists(path), timeout=timeout, what=f"a pid in {path}")
    return int(Path(path).read_text().split()[0])


@pytest.mark.parametrize("how", ["group", "session", "daemon"])
def test_a_timed_out_job_takes_every_process_it_started_with_it(db, tmp_path, spawn, how):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    with MultiStepTask.create("tree", db=db, max_retries=1, retry_delay=0, timeout=2) as task:
        task.add_finalization_job(jobfuncs.start_child, first, how)
    worker = spawn(db, "-c", "1")
    child = pid_in(first)
    assert process_alive(child)
    # the finalizer times out; its retry runs, and by then what the first run started is gone
    wait_for(lambda: not process_alive(child), timeout=15, what="the first run's child to be ended")
    Path(first).rename(second)  # the retry writes its own child's pid in `first`
    retried = pid_in(first, timeout=20)
    assert retried != child and not process_alive(child)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(40) in (0, 1)
    assert not process_alive(retried), "the retry's child outlived the worker's stop"
    [failure] = task.failures()  # the retry timed out too, before the stop ended
    assert failure.exc_type == "litemultistep.JobTimeout" and failure.attempt == 2


def test_a_jobs_children_take_stop_signals_as_any_process_does(db, log_path, spawn):
    """The job process keeps stop signals to itself: a child a job starts, and a fork pool's
    processes, are stopped by SIGTERM as anywhere else."""
    with MultiStepTask.create("signals", db=db, timeout=30) as task:
        task.add_job(jobfuncs.stop_a_child, log_path)
    assert spawn(db, "--burst", "-q").wait(60) == 0
    assert task.failures() == []
    assert lines(log_path)[0].split()[:2] == [f"child={-signal.SIGTERM}", "pool=3"]


def test_a_worker_killed_with_its_job_process_is_not_kept_alive_by_what_the_job_forked(db, log_path, spawn,
                                                                                        tmp_path):
    """Processes a job forked do not hold its worker's lock: once the worker and the job process are
    both gone, the job runs again elsewhere, though the pool it forked lives on (nothing is left
    to end it)."""
    with MultiStepTask.create("pool", db=db) as task:
        task.add_job(jobfuncs.pool_then_record, str(tmp_path / "marker"), log_path)
    first = spawn(db, "-c", "1")
    wait_for(lambda: any(line.startswith("pool ") for line in lines(log_path)), what="the pool to start")
    pool = [int(p) for p in next(line for line in lines(log_path) if line.startswith("pool ")).split()[1:]]
    try:
        job_process = _parent(pool[0])
        assert job_process is not None
        os.kill(first.pid, signal.SIGKILL)
        os.kill(job_process, signal.SIGKILL)
        first.wait(10)
        second = spawn(db, "-c", "1", "--burst", "-q")
        assert second.wait(60) == 0
        assert "again" in [line.split()[0] for line in lines(log_path)]
        assert task.progress().finished
    finally:
        for pid in pool:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_what_a_job_leaves_behind_cannot_fail_another_tasks_job(db, log_path, spawn, tmp_path):
    with MultiStepTask.create("bomber", db=db) as bomber:
        bomber.add_job(jobfuncs.thread_bomb, 1.0)
        bomber.add_job(jobfuncs.start_child, str(tmp_path / "left"), "session", False)
    with MultiStepTask.create("innocent", db=db) as innocent:
        for i in range(3):
            innocent.add_job(jobfuncs.slow_record, log_path, f"j{i}", 1.5)
    worker = spawn(db, "-c", "1", "--burst")
    assert worker.wait(60) == 0, spawn.log(worker)
    assert innocent.failures() == [] and bomber.failures() == []
    assert innocent.progress().finished and bomber.progress().finished
    log = spawn.log(worker)
    assert "left 1 thread(s) running" in log and "left child process(es) running" in log
    assert "jobfuncs:thread_bomb" in log
    assert not process_alive(pid_in(str(tmp_path / "left")))


def test_a_storm_of_sigterms_stops_the_worker_as_documented_and_is_no_crash(db, log_path, spawn):
    with MultiStepTask.create("storm", db=db) as task:
        task.add_job(jobfuncs.slow_record, log_path, "long", 3)
    worker = spawn(db, "-c", "1")
    wait_for(lambda: task.progress().running_count == 1, what="the job to start")
    time.sleep(0.3)  # well into the job
    for _ in range(200):
        try:
            worker.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.001)
    assert worker.wait(40) in (0, 1), spawn.log(worker)
    database = resolve_db(db)
    assert database.connection().execute("SELECT crashes, state FROM job").fetchall() in ([(0, 1)], [])
    assert check(database) == [] and task.failures() == []
    assert spawn(db, "--burst", "-q").wait(60) == 0
    assert task.progress().finished


def test_nuke_stops_a_running_finalizer_and_what_it_started(any_db, tmp_path, spawn):
    child_path = str(tmp_path / "child")
    with MultiStepTask.create("nuked", db=any_db) as task:
        task.add_finalization_job(jobfuncs.start_child, child_path, "session")
        task.add_finalization_job(jobfuncs.noop)
    worker = spawn(any_db, "-c", "1")
    child = pid_in(child_path)
    [job_process] = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == worker.pid]
    out = cli("nuke", any_db, "--yes", "--", task.task_id)
    assert out.returncode == 0 and "running job stop within about a second" in out.stdout, out
    wait_for(lambda: not process_alive(child), timeout=5, what="the nuked finalizer's child to end")
    assert not process_alive(job_process), "the nuked finalizer's job process runs on"
    assert "no longer this worker's" in spawn.log(worker)
    with pytest.raises(litemultistep.NoSuchMultiStepTask):
        task.progress()
    assert worker.poll() is None, "the worker itself went on"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(40) == 0


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return None


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_worker_whose_file_is_deleted_or_replaced_says_so_and_exits_2(db, spawn, how, tmp_path):
    MultiStepTask.create("here", db=db).mark_finalizable()
    worker = spawn(db, "-c", "1")
    wait_for(lambda: json.loads(cli("workers", db, "--json").stdout)["workers"], what="the worker to start")
    if how == "deleted":
        os.unlink(db)
    else:
        other = str(tmp_path / "other.sqlite")
        Database(other).close()
        shutil.move(other, db)
    assert worker.wait(30) == 2
    log = spawn.log(worker)
    assert f"{db} was deleted or replaced" in log and "Traceback" not in log, log


def test_a_wal_deleted_under_a_worker_stops_it_and_loses_nothing(db, spawn, log_path):
    """Others cannot read the file while a worker holds a deleted -wal open: it notices, says so and
    exits 2, and its closing connection copies what the deleted -wal held back into the file."""
    store = Database(db)
    with MultiStepTask.create("wal", db=store) as task:
        for i in range(400):
            task.add_job(jobfuncs.slow_record, log_path, f"j{i}", 0.01)
    store.close()  # the worker's is then the one connection, as with an application that is not running
    worker = spawn(db, "-c", "1")
    wait_for(lambda: len(lines(log_path)) > 5, what="some jobs to run")
    os.unlink(db + "-wal")
    code = worker.wait(30)
    log = spawn.log(worker)
    assert code == 2 and "Traceback" not in log and "-wal" in log, log
    store = Database(db)
    try:
        with MultiStepTask.create("after", db=store) as more:
            more.add_job(jobfuncs.noop)
    finally:
        store.close()
    assert spawn(db, "-c", "1", "--burst", "-q").wait(60) == 0
    status = json.loads(cli("status", db, "--json").stdout)
    assert status["tasks"] == [] and {t["task_id"] for t in status["finished"]} == {task.task_id, more.task_id}
    assert {line.split()[1] for line in lines(log_path) if line.startswith("end")} == {f"j{i}" for i in range(400)}


def test_a_corrupt_file_is_named_with_check_as_the_way_to_look(db):
    import sqlite3

    database = Database(db)
    error = database.driver_error(sqlite3.DatabaseError("database disk image is malformed"))
    database.close()
    assert isinstance(error, litemultistep.DatabaseUnusable)
    assert db in str(error) and "litemultistep check" in str(error)


def test_jobs_that_leave_daemons_behind_in_a_pool_of_two_never_stop_the_worker(db, tmp_path, spawn):
    """Two job processes retiring in one round (each job left a daemon), and a crash beside them:
    each process is replaced once, and the worker goes on."""
    with MultiStepTask.create("daemons", db=db) as task:
        for i in range(6):
            task.add_job(jobfuncs.start_child, str(tmp_path / f"d{i}"), "daemon", False)
        task.add_job(jobfuncs.exit_hard)
        for i in range(6):
            task.add_job(jobfuncs.noop, i)
    worker = spawn(db, "-c", "2", "--burst", "--max-crashes", "1")
    assert worker.wait(90) == 0, spawn.log(worker)
    log = spawn.log(worker)
    assert "Traceback" not in log, log
    assert task.progress().completed_count == 12
    [crash] = task.failures()
    assert crash.exc_type == "litemultistep.WorkerCrashed" and "exit code 1" in crash.message, crash.message
    assert not any(process_alive(pid_in(str(tmp_path / f"d{i}"))) for i in range(6))
