"""Control over retries and load, with real worker processes on both backends: retry only what can
succeed, a manual retry's fresh round, sync mode and drain retrying, a task's running limit across
pools, urgent tasks first."""

from __future__ import annotations

import itertools
import json
import time

import jobfuncs
import pytest
from conftest import cli, lines, wait_for

import litemultistep
from litemultistep import InvalidSetting, MultiStepTask
from litemultistep import engine as E
from litemultistep.config import resolve_db
from litemultistep.db import JobKind
from litemultistep.runner import drain

pytestmark = pytest.mark.timeout(120)


def runs(counter: str) -> int:
    return len(lines(counter))


def test_only_the_exceptions_named_are_retried(any_db, tmp_path, spawn):
    c = {name: str(tmp_path / name) for name in ("value", "conn", "refused", "asked", "own")}
    with MultiStepTask.create("retry-on", db=any_db, max_retries=3, retry_delay=0,
                              retry_on=(ConnectionError,)) as task:
        task.add_job(jobfuncs.fail_with, c["value"], "ValueError", 5)
        task.add_job(jobfuncs.fail_with, c["conn"], "ConnectionError", 2)
        task.add_job(jobfuncs.fail_with, c["refused"], "ConnectionRefusedError", 1)  # a subclass: retried
        task.add_job(jobfuncs.ask_to_retry, c["asked"], 2)  # Retry: whatever retry_on says
        task.add_job(litemultistep.job(jobfuncs.fail_with, retry_on=(KeyError,), max_retries=1), c["own"],
                     "KeyError", 1)  # its own settings over the task's
    assert spawn(any_db, "-c", "2", "--burst", "-q").wait(90) == 0
    assert (runs(c["value"]), runs(c["conn"]), runs(c["refused"]), runs(c["asked"]), runs(c["own"])) == (1, 3, 2, 3, 2)
    [failure] = task.failures()
    assert failure.exc_type == "ValueError" and failure.attempt == 1


def test_what_no_retry_can_cure_fails_at_its_first_attempt(any_db, spawn):
    task = MultiStepTask.create("cure", db=any_db, max_retries=3, retry_delay=0)
    E.add_jobs(resolve_db(any_db), task.task_id, [E.NewJob(JobKind.NORMAL, "no_such_module_here:f", "[[],{}]")])
    task.mark_finalizable()
    assert spawn(any_db, "--burst", "-q").wait(60) == 0
    [failure] = task.failures()
    assert failure.exc_type == "litemultistep.JobNotImportable" and failure.attempt == 1
    from litemultistep.views import failures

    for spelling in ("litemultistep.JobNotImportable", "litemultistep.errors.JobNotImportable"):
        assert [f.job_id for f in failures(resolve_db(any_db), exc_type=spelling)] == [failure.job_id]


def test_a_manual_retry_starts_a_fresh_round(any_db, tmp_path, spawn):
    counter = str(tmp_path / "n")
    with MultiStepTask.create("round", db=any_db, max_retries=1, retry_delay=0) as task:
        task.add_job(jobfuncs.fail_with, counter, "ValueError", 100)
    assert spawn(any_db, "--burst", "-q").wait(60) == 0
    [first] = task.failures()
    assert (runs(counter), first.attempt, first.round) == (2, 2, 1)
    assert task.retry_failed() == 1
    assert spawn(any_db, "--burst", "-q").wait(60) == 0
    [second] = task.failures()
    assert (runs(counter), second.attempt, second.round) == (4, 4, 2)


def test_a_crash_uses_no_retry(any_db, tmp_path, spawn):
    """A run whose process died is put back, and counted by the crash limit, not by max_retries:
    the job still gets its attempt and its one retry after it."""
    counter = str(tmp_path / "n")
    with MultiStepTask.create("crash-retry", db=any_db, max_retries=1, retry_delay=0) as task:
        task.add_job(jobfuncs.crash_then_fail, counter)
    assert spawn(any_db, "--burst", "-q").wait(60) == 0
    [failure] = task.failures()
    assert (runs(counter), failure.exc_type, failure.attempt) == (3, "ValueError", 2)


def test_a_stopped_run_uses_no_retry(any_db, tmp_path, spawn):
    """A run that a stop put back (two SIGTERMs: its jobs go back at once) is no attempt either."""
    import signal

    counter = str(tmp_path / "n")
    with MultiStepTask.create("stop-retry", db=any_db, max_retries=1, retry_delay=0) as task:
        task.add_job(jobfuncs.slow_fail, counter, 1.0)
    worker = spawn(any_db, "-q")
    wait_for(lambda: runs(counter) == 1, what="the job to start")
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 1
    assert task.failures() == []
    assert spawn(any_db, "--burst", "-q").wait(60) == 0
    [failure] = task.failures()
    assert (runs(counter), failure.exc_type, failure.attempt) == (3, "ValueError", 2)


def test_sync_mode_and_drain_retry_at_once(any_db, tmp_path, sync_mode):
    flaky, hopeless = str(tmp_path / "flaky"), str(tmp_path / "hopeless")
    with MultiStepTask.create("sync", db=any_db, max_retries=3, retry_delay=3600) as task:
        task.add_job(jobfuncs.fail_with, flaky, "ConnectionError", 2)  # no wait for the hour's delay
        with pytest.raises(ValueError, match="run 4"):
            task.add_job(jobfuncs.fail_with, hopeless, "ValueError", 100)
    assert (runs(flaky), runs(hopeless)) == (3, 4)
    litemultistep.configure(mode="async")
    counter = str(tmp_path / "drained")
    with MultiStepTask.create("drain", db=any_db, max_retries=2, retry_delay=3600) as drained:
        drained.add_job(jobfuncs.fail_with, counter, "ConnectionError", 2)
    drain(resolve_db(any_db))
    assert runs(counter) == 3 and drained.progress().finished


def test_a_running_limit_holds_across_pools(any_db, tmp_path, spawn):
    log = str(tmp_path / "marks")
    with MultiStepTask.create("limited", db=any_db, max_running=2) as task:
        for i in range(14):
            task.add_job(jobfuncs.marked, log, f"j{i}", 0.3)
        task.add_finalization_job(jobfuncs.marked, log, "F", 0.1)
    pools = [spawn(any_db, "-c", "2", "--burst", "-q") for _ in range(3)]
    for pool in pools:
        assert pool.wait(90) == 0, spawn.log(pool)
    assert task.progress().finished
    intervals = {}
    for line in lines(log):
        kind, tag, run, _, t = line.split()
        start, end = intervals.get(run, (float(t), float(t)))
        intervals[run] = (min(start, float(t)), max(end, float(t)))
    events = sorted(itertools.chain.from_iterable(((s, 1), (e, -1)) for s, e in intervals.values()))
    at_once = max(itertools.accumulate(step for _, step in events))
    assert at_once == 2, f"{at_once} jobs of a task with max_running=2 ran at once"


def test_an_urgent_task_goes_before_a_large_one(any_db, tmp_path, spawn):
    big_log, urgent_log = str(tmp_path / "big"), str(tmp_path / "urgent")
    with MultiStepTask.create("large", db=any_db) as big:
        for i in range(300):
            big.add_job(jobfuncs.slow_record, big_log, f"b{i}", 0.02)
    worker = spawn(any_db, "-c", "2", "-q")
    wait_for(lambda: len(lines(big_log)) >= 5, what="the large task to start")
    with MultiStepTask.create("urgent", db=any_db, priority=10) as urgent:
        for i in range(20):
            urgent.add_job(jobfuncs.slow_record, urgent_log, f"u{i}", 0.02)
    before = len(lines(big_log))
    wait_for(lambda: urgent.progress().finished, timeout=60, what="the urgent task to finish")
    assert len(lines(big_log)) - before <= 10, "the large task went on while the urgent one waited"
    worker.terminate()
    assert worker.wait(40) in (0, 1)


@pytest.mark.parametrize("kwargs", [{"max_running": 0}, {"max_running": -1}, {"max_running": 1.5},
                                    {"max_running": True}, {"priority": "high"}, {"priority": 10**12},
                                    {"retry_on": ("ConnectionError",)}, {"retry_on": (int,)},
                                    {"retry_on": "ValueError"}])
def test_bad_settings_are_refused_where_they_are_given(db, kwargs):
    with pytest.raises(InvalidSetting):
        MultiStepTask.create("bad", db=db, **kwargs)
    for bad in ({"max_retries": -1}, {"retry_delay": float("nan")}, {"retry_on": [ValueError, "x"]}):
        with pytest.raises(InvalidSetting):
            litemultistep.job(jobfuncs.noop, **bad)


def test_the_limit_and_priority_are_shown(db):
    with MultiStepTask.create("shown", db=db, max_running=4, priority=7) as task:
        task.add_job(jobfuncs.noop)
    doc = json.loads(cli("status", db, "--json").stdout)
    [shown] = [t for t in doc["tasks"] if t["task_id"] == task.task_id]
    assert (shown["max_running"], shown["priority"]) == (4, 7)
    text = cli("status", db, task.task_id).stdout
    assert "at most 4 running at once" in text and "priority 7" in text


def test_retry_settings_that_cannot_work_are_refused(db):
    with pytest.raises(InvalidSetting, match="Retry"):
        litemultistep.Retry(delay=float("nan"))
    for bad in (-5, float("inf"), "3", True):
        with pytest.raises(InvalidSetting):
            litemultistep.Retry(delay=bad)
    assert litemultistep.Retry(delay=0).delay == 0 and litemultistep.Retry().delay is None

    class Local(Exception):  # noqa: N818 - a stand-in for a class of a script being run
        pass

    Local.__module__ = "__main__"
    with pytest.raises(InvalidSetting, match="__main__"):
        MultiStepTask.create("local", db=db, retry_on=(Local,))
    with pytest.raises(InvalidSetting, match="__main__"):
        litemultistep.job(jobfuncs.noop, retry_on=(Local,))
