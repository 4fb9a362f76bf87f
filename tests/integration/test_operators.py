"""What operators read, on both backends: failed attempts counted as they are recorded, a finished
task's summary, failures grouped, the per-minute throughput history and its pruning, a task's rate,
and the Prometheus text of /metrics."""

from __future__ import annotations

import json
import os

import jobfuncs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from litemultistep import MultiStepTask
from litemultistep import engine as E
from litemultistep.db import now, open_database
from litemultistep.engine import Outcome
from litemultistep.runner import drain
from litemultistep.views import (
    current_rate,
    failure_groups,
    failures,
    groups_doc,
    metrics,
    progress,
    status_doc,
    throughput,
    totals,
)


@pytest.fixture
def store(any_db):
    return open_database(any_db)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The Prometheus text as prometheus_client's own parser reads it: (sample name, labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_failed_attempt_counts_in_the_transaction_that_records_it(store):
    task = MultiStepTask.create("attempts", db=store, max_retries=1, retry_delay=3600)
    task.add_job(jobfuncs.boom, "once")
    task.mark_finalizable()
    worker_id, _ = store.register_worker("process", lease=1000.0)
    [[job]] = E.claim(store, worker_id)
    E.record(store, worker_id, [Outcome(job, False, "RuntimeError", "once", "tb")])
    p = task.progress()
    # the attempt is counted although the job is not failed (its retry is scheduled)
    assert (p.failed_attempts, p.failed_count, p.scheduled_count) == (1, 0, 1)


def test_a_finished_task_keeps_its_failed_attempts_and_duration(store, tmp_path):
    with MultiStepTask.create("flaky", db=store, max_retries=3, retry_delay=0.001) as task:
        task.add_job(jobfuncs.fail_times, str(tmp_path / "a"), 2)   # fails twice, then succeeds
        task.add_job(jobfuncs.fail_times, str(tmp_path / "b"), 1)
        task.add_job(jobfuncs.noop)
        task.add_finalization_job(jobfuncs.fail_once, str(tmp_path / "fin"))  # retried too
    summary = drain(store)
    assert summary.finalized == [task.task_id]
    p = task.progress()
    assert p.finished and p.failed_attempts == 4
    # what a duration is, not how long it took (a wall clock may step): its own start and end
    assert isinstance(p.duration, float) and p.duration == pytest.approx(p.finished_at - p.created_at)
    [entry] = status_doc(store)["finished"]
    assert entry["failed_attempts"] == 4 and entry["duration"] == pytest.approx(p.duration)
    json.dumps(entry)  # plain JSON values
    # a task that never failed says 0, and an unfinished one has no duration yet
    with MultiStepTask.create("clean", db=store) as clean:
        clean.add_job(jobfuncs.noop)
    assert clean.progress().duration is None and clean.progress().as_dict()["duration"] is None
    drain(store)
    assert clean.progress().failed_attempts == 0 and clean.progress().duration is not None


def test_a_manual_retry_adds_its_attempts_to_the_count(store):
    with MultiStepTask.create("again", db=store) as task:
        task.add_job(jobfuncs.boom, "always")
    drain(store)
    assert task.progress().failed_attempts == 1
    task.retry_failed()
    drain(store)
    assert task.progress().failed_attempts == 2 and task.failed_count == 1


def test_failures_are_grouped_by_exception_and_message(store):
    with MultiStepTask.create("many", db=store) as task:
        for _ in range(7):
            task.add_job(jobfuncs.boom, "the same")
        task.add_job(jobfuncs.boom, "another")
        task.add_job(jobfuncs.exit_job)
    with MultiStepTask.create("other", db=store) as other:
        other.add_job(jobfuncs.boom, "the same")
    drain(store)
    groups = failure_groups(store)
    assert [(g.exc_type, g.message, g.count) for g in groups] == [
        ("RuntimeError", "the same", 8), ("RuntimeError", "another", 1), ("SystemExit", "3", 1)]
    same = groups[0]
    oldest_first = [f.job_id for f in failures(store) if f.message == "the same"]
    assert same.job_ids == oldest_first[:5]   # a few ids
    assert same.first_failed_at <= same.last_failed_at
    assert [g.count for g in failure_groups(store, task_id=other.task_id)] == [1]
    assert [g.message for g in failure_groups(store, exc_type="SystemExit")] == ["3"]
    assert [g.message for g in failure_groups(store, limit=1, offset=1)] == ["another"]
    doc = groups_doc(store, task.task_id)
    assert set(doc["groups"][0]) == {"exc_type", "message", "count", "first_failed_at", "last_failed_at", "job_ids"}
    assert doc["groups"][0]["count"] == 7


def test_each_minute_counts_completed_jobs_and_failed_attempts(store):
    before = totals(store)
    with MultiStepTask.create("minutes", db=store, max_retries=1, retry_delay=0.001) as task:
        for _ in range(5):
            task.add_job(jobfuncs.noop)
        task.add_job(jobfuncs.boom, "twice")
    drain(store)
    completed, failed = totals(store)
    assert (completed - before[0], failed - before[1]) == (5, 2)
    history = throughput(store, minutes=3)
    assert len(history.completed) == len(history.failed) == 3
    assert history.end_minute == int(now() // 60)
    assert sum(history.completed) == completed and sum(history.failed) == failed


def test_old_minutes_are_folded_into_the_totals(store):
    t = now()
    with store.write() as c:
        for age_minutes, done, failed in ((3000, 7, 1), (2000, 5, 2), (10, 3, 0)):
            c.execute("INSERT INTO throughput (minute, completed, failed) VALUES (?, ?, ?)",
                      (int(t // 60) - age_minutes, done, failed))
    assert totals(store) == (15, 3)
    assert E.prune_history(store) == 2       # older than a day
    assert E.prune_history(store) == 0       # a read finds nothing more
    assert totals(store) == (15, 3)          # the totals never go down
    minutes = [m for (m,) in store.connection().execute("SELECT minute FROM throughput ORDER BY minute")]
    assert minutes == [0, int(t // 60) - 10]
    assert sum(throughput(store, minutes=60).completed) == 3
    assert E.prune_history(store, keep=0) == 1
    assert totals(store) == (15, 3)


def test_the_rate_is_measured_over_a_window():
    assert current_rate(None, 0, None, 100.0) is None                 # nothing completed yet
    assert current_rate(100.0, 5, None, 100.5) is None                # too soon to say
    assert current_rate(100.0, 20, None, 104.0) == 5.0                # the first window
    assert current_rate(100.0, 10, 4.0, 105.0) == (10 + 4.0 * 5) / 10  # half of it, half the last window
    assert current_rate(100.0, 10, 4.0, 200.0) == 0.1                 # stalled: falls towards 0


def test_a_task_knows_its_rate_and_the_time_it_has_left(store):
    task = MultiStepTask.create("rated", db=store)
    for _ in range(40):
        task.add_job(jobfuncs.noop)
    task.mark_finalizable()
    worker_id, _ = store.register_worker("process", lease=1000.0)
    [[job]] = E.claim(store, worker_id, max_batch=1)
    E.record(store, worker_id, [Outcome(job, True)])       # opens the task's first window
    with store.write() as c:                               # ... which began 10 s ago
        c.execute("UPDATE task SET rate_since = rate_since - 10")
    [[job]] = E.claim(store, worker_id, max_batch=1)
    E.record(store, worker_id, [Outcome(job, True)])       # closes it: 2 jobs in 10 s
    p = task.progress()
    assert p.rate == pytest.approx(0.2, rel=0.05)
    assert p.seconds_left == pytest.approx(38 / p.rate)
    doc = status_doc(store)["tasks"][0]
    assert doc["rate"] == pytest.approx(p.rate, rel=0.05) and doc["seconds_left"] > 0


def test_metrics_are_prometheus_text_read_from_counters(store, tmp_path):
    with MultiStepTask.create("ok", db=store) as ok:
        for _ in range(3):
            ok.add_job(jobfuncs.noop)
    with MultiStepTask.create("bad", db=store) as bad:
        bad.add_job(jobfuncs.boom, "x")
        bad.add_job(jobfuncs.noop)
    drain(store)
    with MultiStepTask.create("later", db=store, max_retries=5, retry_delay=3600) as later:
        later.add_job(jobfuncs.noop)
        later.add_job(jobfuncs.noop)
        later.add_finalization_job(jobfuncs.noop)
    building = MultiStepTask.create("building", db=store)
    builder, builder_lock = store.register_worker("builder")
    E.begin_building(store, building.task_id, builder)
    worker_id, lock = store.register_worker("process", lease=1000.0)
    [[job]] = E.claim(store, worker_id, max_batch=1)
    E.record(store, worker_id, [Outcome(job, False, "ValueError", "later", "")])  # a retry is scheduled
    [[running]] = E.claim(store, worker_id, max_batch=1)
    got = samples(metrics(store))
    jobs = {state: got[("litemultistep_jobs", (("state", state),))]
            for state in ("pending", "running", "scheduled", "failed")}
    # later: one scheduled, one running, its finalizer waiting; bad: one failed
    assert jobs == {"pending": 1, "running": 1, "scheduled": 1, "failed": 1}
    tasks = {state: got[("litemultistep_tasks", (("state", state),))]
             for state in ("building", "running", "blocked", "finalizing", "finished")}
    assert tasks == {"building": 1, "running": 1, "blocked": 1, "finalizing": 0, "finished": 1}
    # drain's runner, the builder and this worker are registered and alive
    assert got[("litemultistep_workers", (("alive", "true"),))] == 3
    assert got[("litemultistep_workers", (("alive", "false"),))] == 0
    assert got[("litemultistep_jobs_completed_total", ())] == 4
    assert got[("litemultistep_jobs_failed_total", ())] == 2
    assert running.task_id == later.task_id
    builder_lock.release()
    lock.release()


def test_metrics_count_dead_workers(store):
    from conftest import die

    _, lock = store.register_worker("process", lease=0.5)
    die(lock)
    got = samples(metrics(store, lease=0.5))
    assert got[("litemultistep_workers", (("alive", "false"),))] == 1


def test_counts_survive_an_upgrade_from_schema_5(tmp_path):
    """A SQLite file of schema v5 gets the new columns and table; a task's failed attempts start from
    the failures still stored."""
    import sqlite3

    from conftest import undo_migrations

    from litemultistep.db import SCHEMA_VERSION, Database
    from litemultistep.sqlite import MIGRATIONS

    path = str(tmp_path / "v5.sqlite")
    with MultiStepTask.create("old", db=Database(path)) as task:
        task.add_job(jobfuncs.boom, "kept")
        task.add_job(jobfuncs.noop)
    drain(open_database(path))
    conn = sqlite3.connect(path)
    undo_migrations(conn.execute, MIGRATIONS, 5, SCHEMA_VERSION)
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    upgraded = Database(path)
    try:
        assert progress(upgraded, task.task_id).failed_attempts == 1
        assert totals(upgraded) == (0, 0)
    finally:
        upgraded.close()
    assert os.path.exists(path)


def test_drain_says_what_it_counted(store, tmp_path):
    from litemultistep import DrainSummary, FailedAttempt

    with MultiStepTask.create("drained", db=store, max_retries=2, retry_delay=0.001) as task:
        task.add_job(jobfuncs.fail_times, str(tmp_path / "counter"), 1)   # fails once, then passes
        task.add_job(jobfuncs.boom, "always")                              # fails all 3 attempts
        task.add_job(jobfuncs.noop)
        task.add_finalization_job(jobfuncs.noop)                           # never reached
    summary = drain(store)
    assert isinstance(summary, DrainSummary)
    assert (summary.completed_jobs, summary.failed_attempts, summary.failed_jobs) == (2, 4, 1)
    assert (summary.completed, summary.failed) == (2, 4)    # the older names
    assert summary.finalized == [] and summary.results == {}
    assert all(isinstance(f, FailedAttempt) for f in summary.failures)
    always = [f for f in summary.failures if f.func == "jobfuncs:boom"]
    assert [f.attempt for f in always] == [1, 2, 3]
    last = always[-1]
    assert (last.task_id, last.exc_type, last.message, last.finalizer) == (task.task_id, "RuntimeError", "always",
                                                                          False)
    assert last.job_id == task.failures()[0].job_id and "Traceback" in last.traceback
    assert isinstance(last.duration, float)
    assert last.args == '[["always"],{}]'
