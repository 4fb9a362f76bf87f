"""Jobs that misbehave, in real `litemultistep worker -c 2` pools: hangs of every kind are stopped at
their time limit, crashers become failures within the crash limit, a job cannot change what the next
job sees, stop signals reach running jobs the way a person expects, and --allow-module holds."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import time

import jobfuncs
import pytest
from conftest import lines, wait_for

import litemultistep
from litemultistep import MultiStepTask
from litemultistep import engine as E
from litemultistep.config import resolve_db
from litemultistep.db import JobKind
from litemultistep.engine import check
from litemultistep.views import failures

pytestmark = pytest.mark.timeout(180)


def assert_clean(db: str) -> None:
    assert check(resolve_db(db)) == []


def kinds(task: MultiStepTask) -> dict[str, str]:
    """callable name -> the exception type of its recorded failure"""
    return {f.func.partition(":")[2]: f.exc_type for f in task.failures()}


def start_times(log_path: str) -> dict[str, float]:
    return {parts[1]: float(parts[3]) for parts in (line.split() for line in lines(log_path))
            if parts[0] == "start" and len(parts) == 4}


def test_hangs_of_every_kind_fail_with_job_timeout(db, log_path, spawn):
    with MultiStepTask.create("hangs", db=db, timeout=1.5) as task:
        task.add_job(jobfuncs.sleep_forever, log_path, "sleep")
        task.add_job(jobfuncs.spin_forever, log_path, "spin")
        task.add_job(jobfuncs.regex_forever, log_path, "regex")
        task.add_job(jobfuncs.deaf_sleeper, log_path, "deaf")
        task.add_job(jobfuncs.record, log_path, "quick")
    proc = spawn(db, "-c", "2", "--burst")
    assert proc.wait(120) == 0, spawn.log(proc)
    p = task.progress()
    assert (p.completed_count, p.failed_count, p.state) == (1, 4, "blocked")
    fails = task.failures()
    assert {f.exc_type for f in fails} == {"litemultistep.JobTimeout"}
    assert all(f.message == "ran longer than its 1.5 s limit; its process was killed" for f in fails)
    started = start_times(log_path)
    for f in fails:
        tag = json.loads(f.args)[0][1]
        # stopped at its limit, give or take the loop's reaction time and a busy machine
        assert 1.4 <= f.failed_at - started[tag] < 1.5 + 5, (tag, f.failed_at - started[tag])
    assert_clean(db)


def test_per_job_and_worker_time_limits_and_time_left(db, log_path, spawn):
    with MultiStepTask.create("limits", db=db) as task:
        task.add_job(litemultistep.job(jobfuncs.sleep_forever, timeout=1), log_path, "own-limit")
        task.add_job(jobfuncs.sleep_forever, log_path, "worker-limit")
        task.add_job(litemultistep.job(jobfuncs.report_time_left, timeout=30), log_path)
    proc = spawn(db, "-c", "2", "--burst", "--timeout", "2")
    assert proc.wait(60) == 0, spawn.log(proc)
    messages = sorted(f.message for f in task.failures())
    assert messages == ["ran longer than its 1 s limit; its process was killed",
                        "ran longer than its 2 s limit; its process was killed"]
    [left] = [line for line in lines(log_path) if line.startswith("left ")]
    assert 25 < float(left.split()[1]) <= 30


def test_a_job_option_cannot_clash_with_its_own_keywords(db, log_path, sync_mode):
    task = MultiStepTask.create("kw", db=db)
    task.add_job(litemultistep.job(jobfuncs.record_kw, timeout=5), log_path, tag="timeout", extra=["x"])
    assert lines(log_path) == ["timeout ['x']"]
    with pytest.raises(litemultistep.InvalidSetting, match="timeout"):
        litemultistep.job(jobfuncs.noop, timeout=float("nan"))
    with pytest.raises(litemultistep.InvalidSetting, match="timeout"):
        MultiStepTask.create("bad", db=db, timeout=0)


def test_crashers_become_recorded_failures_and_the_pool_keeps_serving(db, log_path, spawn):
    with MultiStepTask.create("crashers", db=db) as bad:
        for fn in (jobfuncs.exit_hard, jobfuncs.segfault, jobfuncs.keyboard_interrupt, jobfuncs.base_exception,
                   jobfuncs.broken_str, jobfuncs.close_all_fds, jobfuncs.exit_job):
            bad.add_job(fn)
    with MultiStepTask.create("bystander", db=db) as good:
        for i in range(40):
            good.add_job(jobfuncs.paced_record, log_path, f"g{i}")
    proc = spawn(db, "-c", "2", "--burst", "--max-crashes", "3")
    assert proc.wait(120) == 0, spawn.log(proc)
    assert good.progress().finished
    assert kinds(bad) == {
        "exit_hard": "litemultistep.WorkerCrashed",
        "segfault": "litemultistep.WorkerCrashed",
        "close_all_fds": "litemultistep.WorkerCrashed",
        "keyboard_interrupt": "KeyboardInterrupt",
        "base_exception": "jobfuncs.NotAnException",
        "broken_str": "jobfuncs.BrokenStr",
        "exit_job": "SystemExit",
    }
    by_name = {f.func.partition(":")[2]: f for f in bad.failures()}
    assert "exit code 1" in by_name["exit_hard"].message and "3 time(s)" in by_name["exit_hard"].message
    assert "SIGSEGV" in by_name["segfault"].message
    assert "pipes" in by_name["close_all_fds"].message
    assert by_name["broken_str"].message == "<str() of this BrokenStr raised RuntimeError>"
    for name in ("exit_hard", "segfault", "close_all_fds"):
        # its process died three times, then it failed: crashes count toward the crash limit, not as
        # attempts (which max_retries counts), so its failure is that of its first attempt
        assert "3 time(s)" in by_name[name].message and by_name[name].attempt == 1
    for name in ("keyboard_interrupt", "base_exception", "broken_str"):
        assert by_name[name].attempt == 1  # an exception is a failure in the process that ran it
    p = bad.progress()
    assert (p.failed_count, p.state) == (7, "blocked")
    assert_clean(db)


def test_a_crashed_job_that_is_retried_starts_afresh(db, log_path, spawn, tmp_path):
    with MultiStepTask.create("afresh", db=db) as task:
        task.add_job(jobfuncs.exit_hard)
    assert spawn(db, "--burst", "--max-crashes", "1").wait(60) == 0
    [failure] = task.failures()
    assert failure.exc_type == "litemultistep.WorkerCrashed" and failure.attempt == 1
    conn = resolve_db(db).connection()
    task.retry_failed()
    assert conn.execute("SELECT crashes FROM job WHERE id = ?", (failure.job_id,)).fetchone() == (0,)


def test_a_job_cannot_change_what_the_next_job_sees(db, log_path, spawn, tmp_path):
    with MultiStepTask.create("leak", db=db) as task:
        task.add_job(jobfuncs.surroundings, log_path, "before")
        task.add_job(jobfuncs.meddle)
        for i in range(3):
            task.add_job(jobfuncs.surroundings, log_path, f"after{i}")
    proc = spawn(db, "--burst")  # one job process: every job runs in the same process, in order
    assert proc.wait(60) == 0, spawn.log(proc)
    seen = [line.split("\t") for line in lines(log_path)]
    assert [s[0] for s in seen] == ["before", "after0", "after1", "after2"]
    assert {tuple(s[1:]) for s in seen} == {tuple(seen[0][1:])}
    assert seen[0][1:3] == [os.getcwd(), "-"] and seen[0][5] == "['-c']"


def test_one_sigterm_to_the_whole_tree_lets_running_jobs_finish(db, log_path, spawn):
    """What systemd and `kill -- -PGID` do: every process of the worker gets SIGTERM once."""
    with MultiStepTask.create("finish", db=db) as task:
        for i in range(2):
            task.add_job(jobfuncs.work, log_path, f"long{i}", 3)
        for i in range(4):
            task.add_job(jobfuncs.work, log_path, f"later{i}", 3)
    proc = spawn(db, "-c", "2")
    wait_for(lambda: len([x for x in lines(log_path) if x.startswith("start ")]) == 2, what="two jobs running")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0, spawn.log(proc)
    log = lines(log_path)
    assert sorted(x.split()[1] for x in log if x.startswith("end ")) == ["long0", "long1"]
    assert not [x for x in log if "later" in x]
    p = task.progress()
    assert (p.completed_count, p.pending_count, p.running_count) == (2, 4, 0)
    assert_clean(db)


def test_a_stop_past_the_shutdown_timeout_puts_the_job_back_and_exits_1(db, log_path, spawn):
    with MultiStepTask.create("slowstop", db=db) as task:
        task.add_job(jobfuncs.deaf_sleeper, log_path, "deaf")
    proc = spawn(db, "--shutdown-timeout", "1")
    wait_for(lambda: lines(log_path), what="the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 1
    assert "stopped job" in spawn.log(proc)
    p = task.progress()
    assert (p.pending_count, p.running_count, p.failed_count) == (1, 0, 0)
    assert_clean(db)


def test_a_second_signal_stops_at_once(db, log_path, spawn):
    with MultiStepTask.create("twice", db=db) as task:
        task.add_job(jobfuncs.work, log_path, "long", 30)
    proc = spawn(db, "-c", "2")
    wait_for(lambda: lines(log_path), what="the job to start")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 1
    assert task.progress().pending_count == 1
    assert "Traceback" not in spawn.log(proc)


def test_allow_module_checks_the_callable_itself(db, log_path, spawn, tmp_path):
    task = MultiStepTask.create("allow", db=db)
    store = resolve_db(db)
    evil = tmp_path / "evil"
    calls = [
        ("jobfuncs:record", [log_path, "allowed"]),
        ("jobfuncs:os.system", [f"touch {evil}"]),
        ("jobfuncs:litemultistep.configure", []),
        ("jobfuncs:path_join", ["a", "b"]),
        ("json:dumps", [1]),
    ]
    E.add_jobs(store, task.task_id, [(JobKind.NORMAL, func, json.dumps([args, {}]), None) for func, args in calls])
    task.mark_finalizable()
    proc = spawn(db, "--burst", "--allow-module", "jobfuncs")
    assert proc.wait(60) == 0, spawn.log(proc)
    assert not evil.exists()
    assert [line.split()[0] for line in lines(log_path)] == ["allowed"]
    by_func = {f.func: f for f in failures(store, task.task_id)}
    assert set(by_func) == {"jobfuncs:os.system", "jobfuncs:litemultistep.configure", "jobfuncs:path_join",
                            "json:dumps"}
    assert all(f.exc_type == "litemultistep.JobNotAllowed" for f in by_func.values())
    assert "reaches into the module 'os'" in by_func["jobfuncs:os.system"].message
    assert "defined in 'posixpath'" in by_func["jobfuncs:path_join"].message
    assert "module 'json' is not allowed" in by_func["json:dumps"].message


def test_an_unimportable_job_names_where_the_worker_looks(db, tmp_path, spawn):
    task = MultiStepTask.create("where", db=db)
    E.add_jobs(resolve_db(db), task.task_id, [(JobKind.NORMAL, "myjobs:run", "[[],{}]", None)])
    task.mark_finalizable()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = spawn(db, "--burst", "--path", str(elsewhere))
    assert proc.wait(60) == 0
    [f] = task.failures()
    assert "No module named 'myjobs'" in f.message and str(elsewhere) in f.message and "started" in f.message
    bad = spawn(db, "--burst", "--path", str(tmp_path / "missing"))
    assert bad.wait(30) == 2 and "no such directory" in spawn.log(bad)


def test_chaos_of_timeouts_crashers_and_sigkills_loses_nothing(db, log_path, spawn, tmp_path):
    with MultiStepTask.create("mixed", db=db, timeout=1) as task:
        normal = [f"n{i}" for i in range(150)]
        for i, tag in enumerate(normal):
            if i % 30 == 7:
                task.add_job(jobfuncs.crash_once, str(tmp_path / f"marker-{tag}"), log_path, tag)
            else:
                task.add_job(jobfuncs.work, log_path, tag, 0.08)  # seconds of work: time for 5 kills
        for tag in ("F0", "F1"):
            task.add_finalization_job(jobfuncs.work, log_path, tag, 0.01)
    with MultiStepTask.create("hung", db=db, timeout=1) as hung:
        hung.add_job(jobfuncs.sleep_forever, log_path, "hang")
    workers = [spawn(db, "-c", "2", "-q", "--max-crashes", "50") for _ in range(2)]
    rng = random.Random(11)
    kills = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not task.progress().finished:
        time.sleep(rng.uniform(0.2, 0.5))
        victim = workers.pop(rng.randrange(len(workers)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        kills += 1
        workers.append(spawn(db, "-c", "2", "-q", "--max-crashes", "50"))
    final = spawn(db, "-c", "2", "--burst", "-q", "--max-crashes", "50")
    assert final.wait(120) == 0, spawn.log(final)
    for w in workers:
        w.send_signal(signal.SIGTERM)
        w.wait(30)
    assert kills >= 5
    p = task.progress()
    assert p.finished and p.completed_count == p.total_job_count == 152
    ended = collections.Counter(line.split()[1] for line in lines(log_path) if line.startswith("end "))
    assert set(normal) - {t for i, t in enumerate(normal) if i % 30 == 7} <= set(ended)
    recorded = [line.split()[0] for line in lines(log_path) if not line.startswith(("start", "end"))]
    assert {t for i, t in enumerate(normal) if i % 30 == 7} <= set(recorded)
    [f] = hung.failures()
    assert f.exc_type in ("litemultistep.JobTimeout", "litemultistep.WorkerCrashed")
    assert_clean(db)
