"""Workers started from Python, progress followed with watch(), wait() and asyncio."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import jobfuncs
import pytest
from conftest import TESTS, env_for_workers, lines, wait_for

import litemultistep
from litemultistep import MultiStepTask

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(any_db: str) -> str:
    """Each test on a SQLite file and on PostgreSQL."""
    return any_db


@pytest.fixture(autouse=True)
def _importable_jobs(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", env_for_workers()["PYTHONPATH"])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_run_jobs_in_other_processes_and_stop_cleanly(db, log_path):
    with litemultistep.Workers(db, concurrency=2) as workers:
        assert workers.alive
        with MultiStepTask.create("emb", db=db) as task:
            for i in range(40):
                task.add_job(jobfuncs.paced_record, log_path, f"n{i}")
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        snapshots = list(task.watch(interval=0.05))
        worker = workers.pid
    assert not workers.alive and not pid_alive(worker)
    assert snapshots[-1].finished and snapshots[-1].completed_count == snapshots[-1].total_job_count == 41
    assert len(snapshots) >= 2
    pids = {line.split()[1] for line in lines(log_path)}
    assert str(os.getpid()) not in pids and len(pids) >= 1
    assert [line.split()[0] for line in lines(log_path)][-1] == "F"


def test_forced_stop_requeues_the_running_job(db, log_path, tmp_path):
    marker = str(tmp_path / "marker")
    with MultiStepTask.create("forced", db=db) as task:
        task.add_job(jobfuncs.sleep_once, marker, log_path, "stuck", 60)
    workers = litemultistep.Workers(db).start()
    wait_for(lambda: any(line.startswith("start stuck") for line in lines(log_path)), what="the job to start")
    workers.stop(timeout=0.5)  # the 60 s job cannot finish in time: it is killed
    assert not workers.alive
    assert lines(log_path) == [line for line in lines(log_path) if line.startswith("start stuck")]
    assert task.progress().completed_count == 0  # held by the dead worker until another recovers it
    with litemultistep.Workers(db, burst=True) as again:
        assert again.wait(60) == 0
    assert task.progress().finished
    assert [line.split()[0] for line in lines(log_path)] == ["start", "stuck"]


def test_workers_exit_when_the_application_is_killed(db, log_path, tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        import litemultistep, jobfuncs
        from litemultistep import MultiStepTask
        workers = litemultistep.Workers({db!r}, concurrency=2).start()
        with MultiStepTask.create("app", db={db!r}) as task:
            for i in range(6):
                task.add_job(jobfuncs.slow_record, {log_path!r}, f"s{{i}}", 0.5)
        print(workers.pid, flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(app)], stdout=subprocess.PIPE, text=True, env=env_for_workers())
    try:
        worker = int(proc.stdout.readline())
        wait_for(lambda: any(line.startswith("start") for line in lines(log_path)), what="a job to start")
        conn = litemultistep.config.resolve_db(db).connection()
        worker_pids = [r[0] for r in conn.execute("SELECT pid FROM worker WHERE kind = 'process'")]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in [worker, *worker_pids]), timeout=15,
                 what="the workers to exit")
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    with litemultistep.Workers(db, burst=True) as again:
        assert again.wait(60) == 0
    task_id = conn.execute("SELECT task_id FROM finished_task").fetchone()[0]
    assert MultiStepTask(task_id, litemultistep.config.resolve_db(db)).progress().finished
    ended = {line.split()[1] for line in lines(log_path) if line.startswith("end")}
    assert ended == {f"s{i}" for i in range(6)}


def test_wait_and_wait_async(db, log_path):
    with MultiStepTask.create("wait", db=db) as task:
        for i in range(5):
            task.add_job(jobfuncs.record, log_path, f"n{i}")
    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        task.wait(timeout=0.2)

    async def follow():
        seen = [p async for p in task.watch_async(interval=0.02)]
        return seen, await task.wait_async(timeout=30)

    with litemultistep.Workers(db):
        seen, last = asyncio.run(follow())
    assert seen[-1].finished and last.finished and last.completed_count == 5


def test_wait_returns_when_blocked(db):
    with MultiStepTask.create("blocked", db=db) as task:
        task.add_job(jobfuncs.boom)
    with litemultistep.Workers(db):
        p = task.wait(timeout=30)
    assert p.blocked and p.failed_count == 1


def test_async_def_job_runs_in_a_worker(db, log_path):
    with MultiStepTask.create("aio", db=db) as task:
        task.add_job(jobfuncs.async_record, log_path, "aio")
    with litemultistep.Workers(db, burst=True) as workers:
        assert workers.wait(60) == 0
    [line] = lines(log_path)
    assert line.startswith("aio ") and line.split()[1] != str(os.getpid())


def test_waiting_for_workers_never_started_is_a_clear_error(db):
    with pytest.raises(litemultistep.WorkersNotStarted, match="never started"):
        litemultistep.Workers(db).wait()
