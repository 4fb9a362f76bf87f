"""No false deaths and no stuck jobs: real worker processes whose lock files vanish, whose clock is
wrong, that are paused past their lease, that meet a long reader or a nearly full disk; settings
that used to crash-loop a worker; automatic retries scheduled far ahead."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import sqlite3
import textwrap
import time

import jobfuncs
import pytest
from conftest import cli, env_for_workers, fill_disk, lines, wait_for

import litemultistep
from litemultistep import MultiStepTask, rules
from litemultistep.config import resolve_db
from litemultistep.engine import check

pytestmark = pytest.mark.timeout(150)


def assert_clean(db: str) -> None:
    assert check(resolve_db(db)) == []


def no_overlap(log_path: str) -> None:
    """No job ran twice at the same time: every start of a tag is after the end of its last run."""
    running: dict[str, int] = collections.Counter()
    for line in lines(log_path):
        event, tag = line.split()[:2]
        if event == "start":
            assert running[tag] == 0, f"{tag} started while another run of it was running"
            running[tag] += 1
        elif event == "end":
            running[tag] -= 1


def test_removing_the_lock_folder_under_a_busy_pool_strands_nothing(db, log_path, spawn):
    with MultiStepTask.create("tiny", db=db) as task:
        for i in range(3000):
            task.add_job(jobfuncs.record, log_path, f"n{i}")
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    workers = [spawn(db, "-c", "2", "-q", "--lease", "2") for _ in range(2)]
    wait_for(lambda: len(lines(log_path)) > 200, what="work to start")
    shutil.rmtree(db + ".workers")
    wait_for(lambda: task.progress().finished, timeout=60, what="the task to finish on its own")
    assert [line.split()[0] for line in lines(log_path)].count("F") == 1
    for w in workers:
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0, spawn.log(w)
    assert "taken for dead" not in "".join(spawn.log(w) for w in workers)
    assert_clean(db)


def test_a_worker_whose_clock_is_two_minutes_ahead_takes_nothing_from_the_others(db, log_path, spawn, tmp_path):
    shim = tmp_path / "skewed"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import time
        _real = time.time
        time.time = lambda: _real() + 120
        _real_ns = time.time_ns
        time.time_ns = lambda: _real_ns() + 120 * 10**9
    """))
    skewed_env = env_for_workers()
    skewed_env["PYTHONPATH"] = os.pathsep.join([str(shim), skewed_env["PYTHONPATH"]])
    with MultiStepTask.create("clock", db=db) as task:
        for i in range(400):
            task.add_job(jobfuncs.work, log_path, f"n{i}", 0.005)
        task.add_finalization_job(jobfuncs.work, log_path, "F", 0.01)
    honest = spawn(db, "-c", "2", "-q", "--lease", "2")
    skewed = spawn(db, "-c", "2", "-q", "--lease", "2", env=skewed_env)
    wait_for(lambda: task.progress().finished, timeout=60, what="the task to finish")
    no_overlap(log_path)
    ends = collections.Counter(line.split()[1] for line in lines(log_path) if line.startswith("end "))
    assert set(ends.values()) == {1}, "a job ran twice"
    for w in (honest, skewed):
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
    assert_clean(db)


def test_finalizers_never_overlap_when_their_worker_is_paused(db, log_path, spawn):
    with MultiStepTask.create("chain", db=db) as task:
        task.add_job(jobfuncs.work, log_path, "n")
        task.add_finalization_job(jobfuncs.work, log_path, "F1", 1.0)
        task.add_finalization_job(jobfuncs.work, log_path, "F2")
    first = spawn(db, "--lease", "2")
    wait_for(lambda: any(line.startswith("start F1") for line in lines(log_path)), what="F1 to start")
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = spawn(db, "--lease", "2")
        time.sleep(6)
        assert not any(line.startswith("start F2") for line in lines(log_path))
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    wait_for(lambda: task.progress().finished, what="the chain to finish")
    no_overlap(log_path)
    starts = [line.split()[1] for line in lines(log_path) if line.startswith("start ")]
    assert starts == ["n", "F1", "F2"]
    for w in (first, second):
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
    assert_clean(db)


def test_a_long_reader_does_not_stop_writers_or_the_pool(db, log_path, spawn):
    """A reader holds one snapshot the whole time: the -wal cannot be cut back, and must not block
    writers while the idle workers try."""
    with MultiStepTask.create("grow", db=db) as task:
        for i in range(40_000):
            task.add_job(jobfuncs.noop, i)
    reader = sqlite3.connect(db)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM job").fetchone()  # holds its snapshot from now on
    try:
        proc = spawn(db, "-c", "2", "-q")
        wait_for(lambda: task.progress().finished, timeout=90, what="the work to drain")
        assert os.path.getsize(db + "-wal") > 4 * 1024 * 1024
        added = MultiStepTask.create("while-reading", db=db)
        for i in range(40):  # meanwhile the idle workers try to cut the -wal back
            added.add_job(jobfuncs.record, log_path, f"r{i}")
            time.sleep(0.05)
        added.mark_finalizable()
        wait_for(lambda: added.progress().finished, timeout=30, what="jobs added during the read to run")
        assert proc.poll() is None, spawn.log(proc)
    finally:
        reader.rollback()
        reader.close()
    wait_for(lambda: os.path.getsize(db + "-wal") < 4 * 1024 * 1024, timeout=30,
             what="the -wal to be cut back once the reader is gone")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "locked" not in spawn.log(proc)


@pytest.mark.parametrize("setting, value, message", [
    ("LITEMULTISTEP_KEEP_FINISHED", "abc", "LITEMULTISTEP_KEEP_FINISHED='abc' is not a number"),
    ("LITEMULTISTEP_SYNCHRONOUS", "bogus", "LITEMULTISTEP_SYNCHRONOUS='bogus' is not one of normal, full"),
    ("LITEMULTISTEP_LEASE", "nan", "is not a positive, finite number"),
    ("LITEMULTISTEP_TIMEOUT", "inf", "is not a positive, finite number"),
])
def test_bad_settings_are_refused_before_anything_runs(db, spawn, setting, value, message):
    MultiStepTask.create("t", db=db).add_job(jobfuncs.noop)
    env = dict(env_for_workers(), **{setting: value})
    proc = spawn(db, "--burst", env=env)
    assert proc.wait(30) == 2
    log = spawn.log(proc)
    assert message in log and "Traceback" not in log


def test_bad_task_settings_are_refused_at_create(db):
    for kwargs, message in (({"max_retries": 1025}, "max_retries"), ({"max_retries": 10**30}, "max_retries"),
                            ({"retry_delay": float("nan")}, "retry_delay"), ({"retry_delay": -1}, "retry_delay")):
        with pytest.raises(litemultistep.InvalidSetting, match=message):
            MultiStepTask.create("bad", db=db, **kwargs)
    with pytest.raises(litemultistep.InvalidSetting, match="keep_finished"):
        litemultistep.configure(keep_finished="soon")


def test_many_automatic_retries_never_overflow(db, spawn, tmp_path):
    with MultiStepTask.create("retries", db=db, max_retries=1000, retry_delay=0.0) as task:
        task.add_job(jobfuncs.fail_times, str(tmp_path / "count"), 1001)
    assert spawn(db, "--burst", "-q").wait(120) == 0
    [failure] = task.failures()
    assert failure.attempt == 1001 and failure.message == "failure 1001 of 1001"
    assert rules.retry_wait(1.0, 5000) == rules.MAX_RETRY_DELAY


def test_a_retry_scheduled_far_ahead_is_seen_and_can_be_run_now(db, log_path, spawn, tmp_path):
    marker = str(tmp_path / "marker")
    with MultiStepTask.create("later", db=db, max_retries=1, retry_delay=1e9) as task:
        task.add_job(jobfuncs.fail_once, marker)
        task.add_job(jobfuncs.record, log_path, "ok")
    proc = spawn(db, "--burst")
    assert proc.wait(60) == 0, "--burst waited for a retry due in a week"
    assert "does not wait for them" in spawn.log(proc)
    doc = json.loads(cli("failed", db, "--json").stdout)
    assert doc["failures"] == [] and len(doc["scheduled"]) == 1
    [scheduled] = doc["scheduled"]
    # asked for 1e9 s, capped at a week (MAX_RETRY_DELAY)
    assert scheduled["exc_type"] == "ValueError" and scheduled["run_at"] > time.time() + 6 * 86400
    assert "retry scheduled" in cli("failed", db).stdout
    status = json.loads(cli("status", db, task.task_id, "--json").stdout)
    assert status["task"]["scheduled_count"] == 1 and status["task"]["state"] == "running"
    assert cli("retry", db, str(scheduled["job_id"])).returncode == 0
    assert spawn(db, "--burst").wait(60) == 0
    assert task.progress().finished


def test_work_resumes_once_space_is_back_on_a_nearly_full_disk(small_disk, log_path, spawn):
    db = str(small_disk / "app.sqlite")
    with MultiStepTask.create("tight", db=db) as task:
        for i in range(3000):
            task.add_job(jobfuncs.record, log_path, f"n{i}")
    filler = fill_disk(small_disk)
    proc = spawn(db, "-c", "2", "-q")
    wait_for(lambda: "the disk is full" in spawn.log(proc), timeout=30, what="the worker to hit the full disk")
    # some space back, not all: enough to copy the -wal into the database once, if nothing grows the
    # -wal into it first
    os.truncate(filler, max(0, os.path.getsize(filler) - 800 * 1024))
    wait_for(lambda: task.progress().finished, timeout=60, what="the work to resume")
    assert len(os.listdir(db + ".workers")) == 1, "a lock file was left behind by a failed registration"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "Traceback" not in spawn.log(proc)
    assert_clean(db)
