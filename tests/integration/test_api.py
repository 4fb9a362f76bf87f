"""The gem's behaviour, example by example, on each backend in turn: a real SQLite file and a real
PostgreSQL database (async mode drained in-process, and sync mode)."""

from __future__ import annotations

import re

import jobfuncs
import pytest
from conftest import lines

import litemultistep
from litemultistep import (
    FinalizationAlreadyBegun,
    MultiStepTask,
    NoSuchMultiStepTask,
    NotInJob,
    NotReadyForFinalization,
)
from litemultistep.config import resolve_db
from litemultistep.runner import drain


@pytest.fixture
def db(any_db: str) -> str:
    """Every test here runs on both backends."""
    return any_db


def run_all(db: str, raise_on_failure: bool = False):
    return drain(resolve_db(db), raise_on_failure=raise_on_failure)


def tags(path: str) -> list[str]:
    return [line.split()[0] for line in lines(path)]


class TestCreate:
    def test_task_id_is_slug_tilde_nonce(self, db):
        task = MultiStepTask.create("pirate-take-over", db=db)
        assert re.fullmatch(r"pirate-take-over~[A-Za-z0-9]{8}", task.task_id)
        assert task.slug == "pirate-take-over"
        assert task.queue_name == task.task_id

    def test_default_slug(self, db):
        assert MultiStepTask.create(db=db).task_id.startswith("multi-step-task~")

    def test_one_slug_gives_distinct_queues(self, db):
        ids = {MultiStepTask.create("same", db=db).queue_name for _ in range(50)}
        assert len(ids) == 50

    def test_counters_of_a_new_task(self, db):
        task = MultiStepTask.create("fresh", db=db)
        p = task.progress()
        assert (p.normal_job_count, p.finalize_job_count, p.completed_count, p.failed_count) == (0, 0, 0, 0)
        assert not task.finalizable

    def test_configured_default_database(self, db, monkeypatch):
        litemultistep.configure(db=db)
        task = MultiStepTask.create("x")
        assert MultiStepTask.find(task.task_id, db=db).task_id == task.task_id

    def test_database_from_environment(self, db, monkeypatch):
        monkeypatch.setenv("LITEMULTISTEP_DB", db)
        task = MultiStepTask.create("x")
        assert task.db.path == db

    def test_no_database_named(self, monkeypatch):
        monkeypatch.delenv("LITEMULTISTEP_DB", raising=False)
        with pytest.raises(litemultistep.NoDatabaseConfigured, match="LITEMULTISTEP_DB"):
            MultiStepTask.create("x")


class TestFind:
    def test_find_returns_the_task(self, db):
        task = MultiStepTask.create("findme", db=db)
        found = MultiStepTask.find(task.task_id, db=db)
        assert found.task_id == task.task_id

    def test_find_unknown_id(self, db):
        with pytest.raises(NoSuchMultiStepTask, match="no task 'nope~123'"):
            MultiStepTask.find("nope~123", db=db)

    def test_find_after_finish_raises(self, db, log_path):
        with MultiStepTask.create("done", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "a")
        run_all(db)
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)
        # the handle still reports the kept summary: complete
        p = task.progress()
        assert p.finished and p.completed_count == p.total_job_count == 1


class TestCounters:
    def test_with_block_counts(self, db, log_path):
        with MultiStepTask.create("pirate", db=db) as task:
            for i in range(3):
                task.add_job(jobfuncs.record, log_path, f"n{i}")
            task.add_finalization_job(jobfuncs.record, log_path, "F1")
            task.add_finalization_job(jobfuncs.record, log_path, "F2")
        t = MultiStepTask.find(task.task_id, db=db)
        assert (t.normal_job_count, t.finalize_job_count, t.total_job_count) == (3, 2, 5)
        assert (t.completed_count, t.failed_count) == (0, 0)
        assert t.finalizable and not t.ready_for_finalization
        p = t.progress()
        assert (p.pending_count, p.running_count, p.state) == (5, 0, "running")

    def test_counters_inside_block_include_unflushed_jobs(self, db, log_path):
        with MultiStepTask.create("inside", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "a")
            assert task.normal_job_count == 1
            assert task.progress().state == "building"

    def test_completed_counts_every_job_once(self, db, log_path):
        with MultiStepTask.create("count", db=db) as task:
            for i in range(10):
                task.add_job(jobfuncs.record, log_path, f"n{i}")
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        summary = run_all(db)
        assert summary.completed == 11 and summary.finalized == [task.task_id]
        assert tags(log_path)[-1] == "F"
        assert sorted(tags(log_path)[:-1]) == sorted(f"n{i}" for i in range(10))

    def test_keyword_arguments(self, db, log_path):
        with MultiStepTask.create("kw", db=db) as task:
            task.add_job(jobfuncs.record_kw, log_path, tag="k", extra=[1, {"a": None}])
        run_all(db, raise_on_failure=True)
        assert lines(log_path) == ["k [1, {'a': None}]"]

    def test_classmethod_and_staticmethod_jobs(self, db, log_path):
        with MultiStepTask.create("methods", db=db) as task:
            task.add_job(jobfuncs.Holder.cm, log_path, "x")
            task.add_job(jobfuncs.Holder.sm, log_path, "y")
        run_all(db, raise_on_failure=True)
        assert sorted(tags(log_path)) == ["cm-x", "sm-y"]

    def test_async_def_job(self, db, log_path):
        with MultiStepTask.create("async", db=db) as task:
            task.add_job(jobfuncs.async_record, log_path, "aio")
        run_all(db, raise_on_failure=True)
        assert tags(log_path) == ["aio"]


class TestFinalization:
    def test_finalizers_run_last_in_order(self, db, log_path):
        with MultiStepTask.create("order", db=db) as task:
            for i in range(5):
                task.add_job(jobfuncs.record, log_path, f"n{i}")
            for j in range(3):
                task.add_finalization_job(jobfuncs.record, log_path, f"F{j}")
        run_all(db)
        assert tags(log_path)[5:] == ["F0", "F1", "F2"]

    def test_no_finalization_until_finalizable(self, db, log_path):
        task = MultiStepTask.create("manual", db=db)
        task.add_job(jobfuncs.record, log_path, "a")
        task.add_finalization_job(jobfuncs.record, log_path, "F")
        run_all(db)
        assert tags(log_path) == ["a"]
        assert not task.ready_for_finalization and task.completed_count == 1
        task.mark_finalizable()
        run_all(db)
        assert tags(log_path) == ["a", "F"]
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)

    def test_task_without_normal_jobs_finalizes_at_once(self, db, log_path):
        with MultiStepTask.create("only-fin", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        assert task.progress().state == "finalizing"
        run_all(db)
        assert tags(log_path) == ["F"]
        assert task.progress().finished

    def test_task_without_any_job_is_gone_at_once(self, db):
        with MultiStepTask.create("empty", db=db) as task:
            pass
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)

    def test_finalize_before_jobs_ran(self, db, log_path):
        with MultiStepTask.create("early", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "a")
        with pytest.raises(NotReadyForFinalization, match="0 of 1 normal jobs done"):
            task.finalize()

    def test_finalize_of_a_task_not_finalizable(self, db, log_path):
        task = MultiStepTask.create("notfin", db=db)
        with pytest.raises(NotReadyForFinalization, match="not finalizable"):
            task.finalize()

    def test_finalize_with_failed_jobs(self, db):
        task = MultiStepTask.create("failing", db=db)
        task.add_job(jobfuncs.boom)
        run_all(db)
        task.mark_finalizable()
        with pytest.raises(NotReadyForFinalization, match="1 job\\(s\\) failed"):
            task.finalize()

    def test_finalize_after_finalization_began(self, db, log_path):
        with MultiStepTask.create("began", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        with pytest.raises(FinalizationAlreadyBegun):
            task.finalize()
        assert task.maybe_finalize() is False

    def test_finalize_of_a_finished_task(self, db, log_path):
        with MultiStepTask.create("gone", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "a")
        run_all(db)
        with pytest.raises(FinalizationAlreadyBegun, match="gone"):
            task.finalize()

    def test_no_job_can_join_a_finalizing_task(self, db, log_path):
        with MultiStepTask.create("closed", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        with pytest.raises(FinalizationAlreadyBegun, match="takes no more jobs"):
            task.add_job(jobfuncs.record, log_path, "late")

    def test_failed_finalizer_stops_the_chain_and_retry_resumes_it(self, db, log_path, tmp_path):
        marker = str(tmp_path / "marker")
        with MultiStepTask.create("chain", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "n")
            task.add_finalization_job(jobfuncs.record, log_path, "F1")
            task.add_finalization_job(jobfuncs.fail_once, marker)
            task.add_finalization_job(jobfuncs.record, log_path, "F3")
        summary = run_all(db)
        assert summary.failed == 1 and tags(log_path) == ["n", "F1"]
        assert task.failed_count == 1 and task.unfinalized_because_of_errors
        assert not task.incomplete_because_of_errors
        assert task.retry_failed() == 1
        run_all(db)
        assert tags(log_path) == ["n", "F1", "F3"]
        assert task.progress().finished


class TestFailures:
    def test_failed_job_is_counted_and_blocks_finalization(self, db, log_path):
        with MultiStepTask.create("fail", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "ok")
            task.add_job(jobfuncs.boom, "kaboom")
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        summary = run_all(db)
        assert (summary.completed, summary.failed) == (1, 1)
        assert tags(log_path) == ["ok"]
        assert (task.completed_count, task.failed_count) == (1, 1)
        assert task.incomplete_because_of_errors and task.progress().state == "blocked"
        [failure] = task.failures()
        assert failure.exc_type == "RuntimeError" and failure.message == "kaboom"
        assert "raise RuntimeError(message)" in failure.traceback and failure.attempt == 1

    def test_retried_failure_that_succeeds_unblocks_finalization(self, db, log_path, tmp_path):
        marker = str(tmp_path / "marker")
        with MultiStepTask.create("retry", db=db) as task:
            task.add_job(jobfuncs.fail_once, marker)
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        run_all(db)
        assert task.failed_count == 1
        assert task.retry_failed() == 1
        assert task.failed_count == 0
        run_all(db)
        assert tags(log_path) == ["F"]
        assert task.progress().finished

    def test_drain_reraises_the_job_exception(self, db):
        with MultiStepTask.create("raise", db=db) as task:
            task.add_job(jobfuncs.boom, "loud")
        with pytest.raises(RuntimeError, match="loud"):
            run_all(db, raise_on_failure=True)
        assert task.failed_count == 1

    def test_system_exit_in_a_job_is_a_failure(self, db):
        with MultiStepTask.create("exit", db=db) as task:
            task.add_job(jobfuncs.exit_job)
        assert run_all(db).failed == 1
        assert task.failures()[0].exc_type == "SystemExit"

    def test_automatic_retries(self, db, tmp_path):
        counter = str(tmp_path / "n")
        with MultiStepTask.create("auto", db=db, max_retries=2, retry_delay=0) as task:
            task.add_job(jobfuncs.fail_times, counter, 2)
        summary = run_all(db)
        assert (summary.completed, summary.failed) == (1, 2)
        assert task.progress().finished

    def test_automatic_retries_exhausted(self, db, tmp_path):
        counter = str(tmp_path / "n")
        with MultiStepTask.create("auto", db=db, max_retries=1, retry_delay=0) as task:
            task.add_job(jobfuncs.fail_times, counter, 5)
        run_all(db)
        assert task.failed_count == 1
        [failure] = task.failures()
        assert failure.attempt == 2 and failure.message == "failure 2 of 5"

    def test_bad_retry_options(self, db):
        with pytest.raises(ValueError, match="max_retries"):
            MultiStepTask.create("x", db=db, max_retries=-1)
        with pytest.raises(ValueError, match="retry_delay"):
            MultiStepTask.create("x", db=db, retry_delay="soon")


class TestAtomicBlock:
    def test_exception_in_block_leaves_nothing(self, db, log_path):
        with pytest.raises(KeyError), MultiStepTask.create("atomic", db=db) as task:
            for i in range(100):
                task.add_job(jobfuncs.record, log_path, f"n{i}")
            raise KeyError("inside")
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)
        assert run_all(db).completed == 0
        conn = resolve_db(db).connection()
        assert conn.execute("SELECT count(*) FROM job").fetchone() == (0,)

    def test_jobs_of_an_open_block_are_invisible_to_workers(self, db, log_path):
        with MultiStepTask.create("hidden", db=db) as task:
            task.add_job(jobfuncs.record, log_path, "a")
            task.progress()  # flushes the job to the file
            assert run_all(db).completed == 0
        assert run_all(db).completed == 1

    def test_big_block_is_written_in_chunks(self, db):
        with MultiStepTask.create("big", db=db) as task:
            for i in range(45_000):
                task.add_job(jobfuncs.noop, i)
        assert task.normal_job_count == 45_000


class TestJobsAddingJobs:
    def test_job_fans_out_and_finalization_waits(self, db, log_path):
        with MultiStepTask.create("fan", db=db) as task:
            task.add_job(jobfuncs.fan_out, log_path, 3)
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        run_all(db, raise_on_failure=True)
        got = tags(log_path)
        assert got[0] == "parent" and sorted(got[1:4]) == ["child0", "child1", "child2"] and got[4] == "F"
        assert task.progress().total_job_count == 5

    def test_finalizer_cannot_add_jobs(self, db, log_path):
        with MultiStepTask.create("late", db=db) as task:
            task.add_finalization_job(jobfuncs.add_job_late, log_path)
        run_all(db)
        [failure] = task.failures()
        assert failure.exc_type == "litemultistep.FinalizationAlreadyBegun"

    def test_current_task_outside_a_job(self):
        with pytest.raises(NotInJob):
            litemultistep.current_task()


class TestSyncMode:
    def test_jobs_run_when_added_and_finalizers_last(self, db, log_path, sync_mode):
        with MultiStepTask.create("sync", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
            task.add_job(jobfuncs.record, log_path, "a")
            assert tags(log_path) == ["a"]
            task.add_job(jobfuncs.record, log_path, "b")
            assert task.completed_count == 2
        assert tags(log_path) == ["a", "b", "F"]
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)

    def test_failure_raises_and_blocks_finalizers(self, db, log_path, sync_mode):
        with MultiStepTask.create("sync-fail", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
            with pytest.raises(RuntimeError, match="boom"):
                task.add_job(jobfuncs.boom)
        assert tags(log_path) == []
        found = MultiStepTask.find(task.task_id, db=db)
        assert found.failed_count == 1 and found.incomplete_because_of_errors

    def test_retry_in_sync_mode_runs_at_once(self, db, log_path, tmp_path, sync_mode):
        marker = str(tmp_path / "m")
        with MultiStepTask.create("sync-retry", db=db) as task:
            task.add_finalization_job(jobfuncs.record, log_path, "F")
            with pytest.raises(ValueError):
                task.add_job(jobfuncs.fail_once, marker)
        assert task.retry_failed() == 1
        assert tags(log_path) == ["F"] and task.progress().finished

    def test_jobs_added_by_a_job_run_inline(self, db, log_path, sync_mode):
        with MultiStepTask.create("sync-fan", db=db) as task:
            task.add_job(jobfuncs.fan_out, log_path, 2)
            task.add_finalization_job(jobfuncs.record, log_path, "F")
        assert tags(log_path) == ["child0", "child1", "parent", "F"]

    def test_mode_from_environment(self, db, log_path, monkeypatch):
        monkeypatch.setenv("LITEMULTISTEP_MODE", "sync")
        task = MultiStepTask.create("env", db=db)
        task.add_job(jobfuncs.record, log_path, "now")
        assert tags(log_path) == ["now"]

    def test_bad_mode(self, monkeypatch):
        with pytest.raises(ValueError, match="mode"):
            litemultistep.configure(mode="later")
        monkeypatch.setenv("LITEMULTISTEP_MODE", "later")
        with pytest.raises(ValueError, match="LITEMULTISTEP_MODE"):
            litemultistep.config.mode()


class TestNuke:
    def test_nuke_removes_task_and_queue(self, db, log_path):
        with MultiStepTask.create("nuked", db=db) as task:
            for i in range(10):
                task.add_job(jobfuncs.record, log_path, f"n{i}")
        task.nuke()
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)
        assert run_all(db).completed == 0
