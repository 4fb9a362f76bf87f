"""The engine's decisions, on a real SQLite file and on a real PostgreSQL database (every test that does
not name ``sqlite_store`` runs on both): fairness, stale results, recovery, repair, and a model-based
test that drives random sequences of operations against a small model of the rules."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
from conftest import die, need_postgres
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from litemultistep import FinalizationAlreadyBegun, NoSuchMultiStepTask, NotReadyForFinalization
from litemultistep import engine as E
from litemultistep.db import Database, JobKind, open_database
from litemultistep.engine import Outcome
from litemultistep.errors import DatabaseUnavailable
from litemultistep.sqlite import SqliteDatabase, lock_state
from litemultistep.views import failures, progress

NOOP = ("jobfuncs:noop", "[[],{}]", None)


def add(db: Database, task_id: str, kind: int = JobKind.NORMAL, n: int = 1) -> None:
    E.add_jobs(db, task_id, [(kind, *NOOP)] * n)


@pytest.fixture
def store(any_db):
    return open_database(any_db)


@pytest.fixture
def sqlite_store(db):
    """For what only the SQLite backend does (lock files, SQLite's own column types)."""
    return open_database(db)


def claim(store: Database, w: int, limit: int, queues: list[str] | None = None) -> list:
    """One batch of up to ``limit`` jobs, as if every task's jobs were known to be short."""
    store.connection().execute("UPDATE task SET avg_duration = 1e-6")
    batches = E.claim(store, w, max_batch=limit, queues=queues)
    return batches[0] if batches else []


def worker(store: Database, lease: float = 1000.0):
    worker_id, lock = store.register_worker("process", lease=lease)
    return worker_id


class TestClaims:
    def test_least_recently_served_queue_goes_first(self, store):
        a = E.create_task(store, "a")
        b = E.create_task(store, "b")
        add(store, a, n=5)
        add(store, b, n=5)
        w = worker(store)
        served = [claim(store, w, 1)[0].task_id for _ in range(6)]
        assert served == [a, b, a, b, a, b]

    def test_claim_takes_a_batch_from_one_queue(self, store):
        a = E.create_task(store, "a")
        add(store, a, n=10)
        jobs = claim(store, worker(store), 4)
        assert len(jobs) == 4 and [j.id for j in jobs] == sorted(j.id for j in jobs)
        p = progress(store, a)
        assert (p.running_count, p.pending_count) == (4, 6)

    def test_building_task_is_invisible(self, store):
        a = E.create_task(store, "a")
        E.begin_building(store, a, worker(store))
        add(store, a, n=3)
        assert claim(store, worker(store), 10) == []
        E.mark_finalizable(store, a)
        assert len(claim(store, worker(store), 10)) == 3

    def test_queue_globs(self, store):
        a = E.create_task(store, "images")
        b = E.create_task(store, "mail")
        add(store, a)
        add(store, b)
        w = worker(store)
        assert [j.task_id for j in claim(store, w, 5, ["mail~*"])] == [b]
        assert claim(store, w, 5, ["mail~*"]) == []


class TestStaleWorkers:
    def test_a_paused_worker_keeps_its_jobs_however_old_its_heartbeat(self, sqlite_store):
        store = sqlite_store
        t = E.create_task(store, "t")
        add(store, t)
        paused, lock = store.register_worker("process", lease=1)
        [job] = claim(store, paused, 1)
        # as if stopped (SIGSTOP, a laptop's sleep, a clock jump) for a day: its lock is still held
        store.connection().execute("UPDATE worker SET expires_at = 0, heartbeat_mono = heartbeat_mono - 86400, "
                                   "heartbeat_at = 0 WHERE id = ?", (paused,))
        assert E.recover(store, worker(store), lease=1) == 0
        assert store.heartbeat(paused, 1, lock) is True
        E.record(store, paused, [Outcome(job, True)])
        assert progress(store, t).completed_count == 1

    def test_late_result_of_a_taken_over_worker_is_ignored(self, store):
        t = E.create_task(store, "t")
        add(store, t)
        E.mark_finalizable(store, t)
        slow, lock = store.register_worker("process", lease=1)
        [job] = claim(store, slow, 1)
        die(lock)
        rescuer = worker(store)
        assert E.recover(store, rescuer, lease=1) == 1
        assert store.heartbeat(slow, 10) is False
        assert E.record(store, slow, [Outcome(job, True)]) == []
        p = progress(store, t)
        assert (p.completed_count, p.pending_count, p.running_count) == (0, 1, 0)
        [again] = claim(store, rescuer, 1)
        assert again.id == job.id and again.attempt == 1  # a run its worker did not survive is no attempt
        E.record(store, rescuer, [Outcome(again, True)])
        assert progress(store, t).finished

    def test_a_write_whose_answer_was_lost_is_made_good_by_the_next(self, store):
        """The connection drops during a commit that went through: the worker never learns of the
        batch it claimed, nor that its results were recorded. Its next write says what it holds."""
        t = E.create_task(store, "t")
        add(store, t, n=4)
        E.mark_finalizable(store, t)
        w = worker(store)
        [first] = claim(store, w, 1)
        store.connection().execute("UPDATE task SET avg_duration = 1e-6")
        [lost] = E.claim(store, w, outcomes=[Outcome(first, True)], max_batch=2)  # answer never arrives
        [kept] = claim(store, w, 1)  # a batch the worker did receive, still running
        assert E.claim(store, w, outcomes=[Outcome(first, True)], wants=0, held=[kept.id]) == []
        p = progress(store, t)
        assert (p.completed_count, p.pending_count, p.running_count) == (1, 2, 1)
        assert store.connection().execute(
            f"SELECT count(*) FROM job WHERE state = {E.QUEUED} AND attempts = 0 AND id IN ({lost[0].id}, "
            f"{lost[1].id})").fetchone() == (2,)
        E.record(store, w, [Outcome(kept, True)])
        for job in claim(store, w, 2):
            E.record(store, w, [Outcome(job, True)])
        assert progress(store, t).finished
        assert [p for p in E.check(store) if p.kind != "dead-workers"] == []  # the test let go of w's lock

    def test_a_live_worker_whose_lock_file_vanished_makes_a_new_one(self, sqlite_store):
        store = sqlite_store
        w, lock = store.register_worker("process", lease=1)
        os.unlink(lock.path)
        assert not lock.intact()
        assert E.recover(store, worker(store), lease=1) == 0  # heartbeat still fresh: alive
        assert store.heartbeat(w, 1, lock) is True and lock.intact()
        path = store.connection().execute("SELECT lock_path FROM worker WHERE id = ?", (w,)).fetchone()[0]
        assert path == lock.path and lock_state(path) is True

    def test_jobs_held_under_an_unregistered_worker_id_come_back(self, store):
        t = E.create_task(store, "t")
        add(store, t, n=2)
        w = worker(store)
        claim(store, w, 2)
        store.connection().execute("DELETE FROM worker WHERE id = ?", (w,))
        assert E.recover(store, worker(store)) == 2
        assert progress(store, t).pending_count == 2

    def test_a_job_whose_worker_dies_three_times_fails_with_worker_crashed(self, store):
        t = E.create_task(store, "t")
        add(store, t)
        for _ in range(3):
            dead, lock = store.register_worker("process")
            [job] = claim(store, dead, 1)
            die(lock)
            assert E.recover(store, worker(store), max_crashes=3) == 1
        p = progress(store, t)
        assert (p.failed_count, p.pending_count) == (1, 0)
        [failure] = failures(store, t)
        assert failure.exc_type == "litemultistep.WorkerCrashed" and "3 time(s)" in failure.message
        assert E.retry_task(store, t) == [job.id]
        assert store.connection().execute("SELECT crashes FROM job WHERE id = ?", (job.id,)).fetchone() == (0,)

    def test_dead_worker_is_found_by_its_free_lock(self, store):
        t = E.create_task(store, "t")
        add(store, t, n=2)
        dead_id, lock = store.register_worker("process", lease=1000)
        claim(store, dead_id, 2)
        die(lock)
        assert E.recover(store, worker(store)) == 2
        assert progress(store, t).pending_count == 2


class TestRetries:
    def test_scheduled_retry_waits_for_its_time(self, store):
        t = E.create_task(store, "t", max_retries=1, retry_delay=3600)
        add(store, t)
        w = worker(store)
        [job] = claim(store, w, 1)
        E.record(store, w, [Outcome(job, False, "ValueError", "no", "tb")])
        p = progress(store, t)
        assert (p.failed_count, p.pending_count) == (0, 1)
        assert E.promote_scheduled(store) == 0 and claim(store, w, 1) == []
        assert E.work_left(store)
        assert E.promote_scheduled(store, due_by=float("inf")) == 1
        assert claim(store, w, 1)[0].attempt == 2

    def test_retry_errors(self, store):
        from litemultistep import JobNotFailed, NoSuchJob
        t = E.create_task(store, "t")
        add(store, t)
        job_id = store.connection().execute("SELECT id FROM job").fetchone()[0]
        with pytest.raises(NoSuchJob):
            E.retry_jobs(store, [job_id + 100])
        with pytest.raises(JobNotFailed, match="it is queued"):
            E.retry_jobs(store, [job_id])


class TestPostgresLiveness:
    """What only a network database has: a connection that can be cut, hosts whose clocks differ."""

    @pytest.fixture
    def pg(self, pg_db):
        return open_database(pg_db)

    def test_a_worker_past_its_lease_is_dead_and_its_session_is_ended(self, pg):
        t = E.create_task(pg, "t")
        add(pg, t, n=2)
        # the lock held on another connection, as a worker on another host holds it
        other = Database(pg.target)
        try:
            w, _ = other.register_worker("process", lease=5)
            claim(other, w, 2)
            assert E.recover(pg, worker(pg)) == 0  # lock held, heartbeat fresh: alive
            # its heartbeat, on the server's clock, is older than its own lease (a host gone silent)
            pg.connection().execute("UPDATE worker SET heartbeat_mono = heartbeat_mono - 6 WHERE id = ?", (w,))
            assert E.recover(pg, worker(pg)) == 2
            assert progress(pg, t).pending_count == 2
            held = pg.connection().execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = ?::int4::oid "
                "AND classid = ?::int4::oid", (w, pg.lock_key)).fetchone()[0]
            assert held == 0  # its connection was ended, its lock with it
            # a statement of its own connects again at once; in a transaction, the transaction fails
            assert other.connection().execute("SELECT 1").fetchone() == (1,)
            pg.connection().execute("SELECT pg_terminate_backend(?)", (other.connection().raw.info.backend_pid,))
            with pytest.raises(DatabaseUnavailable, match="cannot reach"), other.write() as c:
                c.execute("SELECT 1")
            with other.write() as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
        finally:
            other.close()

    def test_a_cut_connection_is_noticed_and_the_worker_takes_its_lock_again(self, pg):
        w, lock = pg.register_worker("process", lease=30)
        backend = pg.connection().execute("SELECT pg_backend_pid()").fetchone()[0]
        admin = Database(pg.target)
        try:
            assert E.recover(admin, None) == 0
            admin.connection().execute("SELECT pg_terminate_backend(?)", (backend,))
            # the next statement connects again, and the new session takes the lock again: the same worker
            assert lock.intact()
            assert pg.heartbeat(w, 30, lock) is True and lock.intact()
            assert E.recover(admin, None) == 0
        finally:
            admin.close()

    def test_queue_globs_mean_what_they_mean_on_sqlite(self, pg):
        ids = {slug: E.create_task(pg, slug) for slug in ["img.a", "img-b", "mail", "x%y", "ab"]}
        for t in ids.values():
            add(pg, t)
        w = worker(pg)
        for pattern, expected in [("img.*", {"img.a"}), ("img?*", {"img.a", "img-b"}),
                                  ("[ma]*", {"mail", "ab"}), ("[^m]b~*", {"ab"}), ("x%y~*", {"x%y"})]:
            got = set()
            while batch := claim(pg, w, 10, [pattern]):
                got |= {j.task_id.rsplit("~", 1)[0] for j in batch}
            assert got == expected, pattern
            pg.connection().execute("UPDATE job SET state = 1, worker = NULL")
            pg.connection().execute("UPDATE task SET pending_count = 1, running_count = 0")


class TestCheck:
    def test_stalled_finalization_is_found_and_resumed(self, store):
        t = E.create_task(store, "t")
        add(store, t, JobKind.FINALIZE, n=2)
        E.mark_finalizable(store, t)  # the first finalizer is queued
        conn = store.connection()
        conn.execute("UPDATE job SET state = 6 WHERE state = 1")  # as if the chain had been lost
        conn.execute("UPDATE task SET pending_count = 0")
        problems = E.check(store)
        assert [p.kind for p in problems] == ["stalled"]
        assert [p.kind for p in E.check(store, repair=True)] == ["stalled"]
        assert E.check(store) == []
        assert progress(store, t).pending_count == 2

    def test_a_block_whose_builder_is_gone_is_reported_then_removed_by_any_worker(self, store):
        t = E.create_task(store, "t")
        builder, lock = store.register_worker("inline")
        E.begin_building(store, t, builder)
        add(store, t, n=3)
        assert E.check(store) == []  # its builder lives: an open block, nothing wrong
        die(lock)
        assert [p.kind for p in E.check(store)] == ["dead-workers", "abandoned"]
        E.recover(store, None)  # what every worker does every second
        assert E.check(store) == []
        with pytest.raises(NoSuchMultiStepTask):
            progress(store, t)

    def test_a_block_left_open_by_an_older_version_is_found_by_its_pid(self, sqlite_store):
        store = sqlite_store
        t = E.create_task(store, "t")
        E.begin_building(store, t, worker(store))
        add(store, t, n=3)
        store.connection().execute("UPDATE task SET builder = NULL, builder_pid = 999999999")
        assert [p.kind for p in E.check(store, repair=True)] == ["dead-workers", "abandoned"]
        assert E.check(store) == []
        with pytest.raises(NoSuchMultiStepTask):
            progress(store, t)


# -- the model-based test ---------------------------------------------------------------------------


class EngineModel(RuleBasedStateMachine):
    """Random operations on a real file, each checked against a model of the rules."""

    def open(self) -> Database:
        self.dir = tempfile.mkdtemp(prefix="lms-model-")
        return Database(os.path.join(self.dir, "model.sqlite"))

    @initialize()
    def setup(self) -> None:
        self.db = self.open()
        self.tasks: dict[str, dict] = {}  # task id -> model
        self.workers = [self.db.register_worker("process", lease=1000) for _ in range(3)]
        self.claims: dict[int, list] = {w: [] for w, _ in self.workers}  # worker id -> claimed jobs
        self.orphans: list[tuple[int, E.ClaimedJob]] = []  # claims of crashed workers

    def teardown(self) -> None:
        for _, lock in getattr(self, "workers", []):
            lock.release()
        if hasattr(self, "db"):
            self.db.close()
        if hasattr(self, "schema"):
            self.schema.__exit__(None, None, None)

    # model helpers
    def live(self) -> list[str]:
        return [t for t, m in self.tasks.items() if m["state"] != "done"]

    def last_job_id(self) -> int:
        return int(self.db.connection().execute("SELECT max(id) FROM job").fetchone()[0])

    def advance(self, m: dict, claim_for: int | None) -> int | None:
        """The model's finalization step: the next waiting finalizer, or done. Returns its job id."""
        waiting = sorted((j["position"], jid) for jid, j in m["jobs"].items()
                         if j["kind"] == "F" and j["state"] == "waiting")
        if not waiting:
            m["state"] = "done"
            return None
        jid = waiting[0][1]
        m["jobs"][jid]["state"] = "running" if claim_for else "queued"
        m["jobs"][jid]["worker"] = claim_for
        return jid

    def ready(self, m: dict) -> bool:
        normal = [j for j in m["jobs"].values() if j["kind"] == "N"]
        return (m["state"] == "active" and m["finalizable"] and all(j["state"] == "done" for j in normal))

    # rules
    @rule(normal=st.integers(0, 3), finalizers=st.integers(0, 3), finalizable=st.booleans(),
          max_running=st.sampled_from([None, 1, 2]), priority=st.integers(0, 1))
    def create(self, normal, finalizers, finalizable, max_running, priority) -> None:
        task_id = E.create_task(self.db, "m", max_running=max_running, priority=priority)
        self.tasks[task_id] = {"state": "active", "finalizable": False, "jobs": {}, "next_pos": 0,
                               "max_running": max_running, "priority": priority}
        for finalizer in [False] * normal + [True] * finalizers:
            self._add(task_id, finalizer)
        if finalizable:
            self._mark(task_id)

    def _add(self, task_id: str, finalizer: bool) -> None:
        m = self.tasks[task_id]
        kind = JobKind.FINALIZE if finalizer else JobKind.NORMAL
        if m["state"] == "done":
            with pytest.raises(NoSuchMultiStepTask):
                add(self.db, task_id, kind)
            return
        if m["state"] == "finalizing":
            with pytest.raises(FinalizationAlreadyBegun):
                add(self.db, task_id, kind)
            return
        add(self.db, task_id, kind)
        job = {"kind": "F" if finalizer else "N", "state": "waiting" if finalizer else "queued", "worker": None}
        if finalizer:
            job["position"] = m["next_pos"]
            m["next_pos"] += 1
        m["jobs"][self.last_job_id()] = job

    def _mark(self, task_id: str) -> None:
        m = self.tasks[task_id]
        if m["state"] == "done":
            with pytest.raises(NoSuchMultiStepTask):
                E.mark_finalizable(self.db, task_id)
            return
        E.mark_finalizable(self.db, task_id)
        m["finalizable"] = True
        if self.ready(m) and not any(j["state"] == "failed" for j in m["jobs"].values()):
            m["state"] = "finalizing"
            self.advance(m, None)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), finalizer=st.booleans())
    def add_job(self, data, finalizer) -> None:
        self._add(data.draw(st.sampled_from(list(self.tasks))), finalizer)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def mark_finalizable(self, data) -> None:
        self._mark(data.draw(st.sampled_from(list(self.tasks))))

    @rule(w=st.integers(0, 2))
    def work(self, w) -> None:
        """A worker claims a batch and completes it, finalizers handed to it included."""
        self.claim(w, 3)
        while self.claims[self.workers[w][0]]:
            self._finish(w, 0, True)

    @rule(w=st.integers(0, 2), limit=st.integers(1, 4))
    def claim(self, w, limit) -> None:
        worker_id = self.workers[w][0]
        jobs = claim(self.db, worker_id, limit)

        def room(m: dict) -> float:
            running = sum(1 for j in m["jobs"].values() if j["state"] == "running")
            return float("inf") if m["max_running"] is None else m["max_running"] - running

        # a task may give jobs while it has queued ones and room under its running limit
        claimable = {t: m for t, m in self.tasks.items() if m["state"] in ("active", "finalizing")
                     and any(j["state"] == "queued" for j in m["jobs"].values()) and room(m) > 0}
        assert bool(jobs) == bool(claimable)
        assert len({j.task_id for j in jobs}) <= 1 and len(jobs) <= limit
        if jobs:
            m = self.tasks[jobs[0].task_id]
            assert len(jobs) <= room(m), "a claim went past the task's running limit"
            assert m["priority"] == max(c["priority"] for c in claimable.values()), "a lower priority went first"
        for job in jobs:
            model_job = self.tasks[job.task_id]["jobs"][job.id]
            assert model_job["state"] == "queued"
            model_job.update(state="running", worker=worker_id)
            self.claims[worker_id].append(job)

    def _finish(self, w: int, index: int, ok: bool) -> None:
        worker_id = self.workers[w][0]
        job = self.claims[worker_id].pop(index % len(self.claims[worker_id]))
        handed = E.record(self.db, worker_id, [Outcome(job, ok, "ValueError", "model failure", "tb")])
        m = self.tasks[job.task_id]
        mj = m["jobs"][job.id]
        expected = None
        if not ok:
            mj.update(state="failed", worker=None)
        else:
            mj.update(state="done", worker=None)
            failed = any(j["state"] == "failed" for j in m["jobs"].values())
            if self.ready(m) and not failed:
                m["state"] = "finalizing"
                expected = self.advance(m, worker_id)
            elif m["state"] == "finalizing" and mj["kind"] == "F":
                expected = self.advance(m, worker_id)
        assert [h.id for h in handed] == ([expected] if expected else [])
        self.claims[worker_id].extend(handed)

    @rule(w=st.integers(0, 2), index=st.integers(0, 10))
    def complete(self, w, index) -> None:
        if self.claims[self.workers[w][0]]:
            self._finish(w, index, True)

    @rule(w=st.integers(0, 2), index=st.integers(0, 10))
    def fail(self, w, index) -> None:
        if self.claims[self.workers[w][0]]:
            self._finish(w, index, False)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def retry(self, data) -> None:
        task_id = data.draw(st.sampled_from(list(self.tasks)))
        m = self.tasks[task_id]
        if m["state"] == "done":
            with pytest.raises(NoSuchMultiStepTask):
                E.retry_task(self.db, task_id)
            return
        ids = E.retry_task(self.db, task_id)
        failed = sorted(jid for jid, j in m["jobs"].items() if j["state"] == "failed")
        assert ids == failed
        for jid in failed:
            m["jobs"][jid].update(state="queued", crashes=0)

    @rule(w=st.integers(0, 2))
    def crash(self, w) -> None:
        """A worker dies: its jobs go back to their queues; a new worker takes its place."""
        worker_id, lock = self.workers[w]
        die(lock)
        other = self.workers[(w + 1) % 3][0]
        assert E.recover(self.db, other, max_crashes=3) == len(self.claims[worker_id])
        for job in self.claims.pop(worker_id):
            mj = self.tasks[job.task_id]["jobs"][job.id]
            mj["crashes"] = mj.get("crashes", 0) + 1
            # a job whose worker died with it three times fails (WorkerCrashed) instead of running again
            mj.update(state="failed" if mj["crashes"] >= 3 else "queued", worker=None)
            self.orphans.append((worker_id, job))
        self.workers[w] = self.db.register_worker("process", lease=1000)
        self.claims[self.workers[w][0]] = []

    # On PostgreSQL a worker past its lease is dead, whatever its lock says (TestPostgresLiveness).
    @precondition(lambda self: isinstance(self.db, SqliteDatabase))
    @rule(w=st.integers(0, 2))
    def pause(self, w) -> None:
        """A worker is stopped far past its lease (SIGSTOP, a laptop's sleep, a clock jump): its OS
        lock is still held, so no job is taken from it."""
        worker_id, _ = self.workers[w]
        self.db.connection().execute("UPDATE worker SET heartbeat_mono = heartbeat_mono - 1e6, expires_at = 0, "
                                     "heartbeat_at = 0 WHERE id = ?", (worker_id,))
        assert E.recover(self.db, self.workers[(w + 1) % 3][0], lease=1) == 0

    @rule(w=st.integers(0, 2))
    def resume(self, w) -> None:
        """The paused worker goes on: it is still registered, its claims are still its own."""
        worker_id, lock = self.workers[w]
        assert self.db.heartbeat(worker_id, 1000, lock) is True

    @precondition(lambda self: not isinstance(self.db, SqliteDatabase))
    @rule()
    def cut_session(self) -> None:
        """The server ends our session (an administrator, a proxy, a restart): every lock it held is
        free, but the workers live. No one takes their jobs; the next statement connects again, and
        the new session holds the same locks: the same workers, their claims still their own."""
        admin = Database(self.db.target)
        try:
            backend = self.db.connection().raw.info.backend_pid
            admin.connection().execute("SELECT pg_terminate_backend(?)", (backend,))
            assert E.recover(admin, None, lease=1000) == 0
        finally:
            admin.close()
        for worker_id, lock in self.workers:
            assert self.db.heartbeat(worker_id, 1000, lock) is True and lock.intact()

    @precondition(lambda self: not isinstance(self.db, SqliteDatabase))
    @rule(w=st.integers(0, 2))
    def pause_past_lease(self, w) -> None:
        """A worker is cut off (or paused) past its lease: on PostgreSQL it is taken for dead and its
        jobs go back, each counted as a crash. When it comes back it finds its row gone, joins again,
        and takes back those crash counts: it lived, and had stopped its jobs itself."""
        worker_id, lock = self.workers[w]
        self.db.connection().execute("UPDATE worker SET heartbeat_mono = heartbeat_mono - 1e6 WHERE id = ?",
                                     (worker_id,))
        assert E.recover(self.db, self.workers[(w + 1) % 3][0], lease=1000, max_crashes=3) == len(
            self.claims[worker_id])
        held = self.claims.pop(worker_id)
        for job in held:
            mj = self.tasks[job.task_id]["jobs"][job.id]
            mj["crashes"] = mj.get("crashes", 0) + 1
            mj.update(state="failed" if mj["crashes"] >= 3 else "queued", worker=None)
            self.orphans.append((worker_id, job))
        assert self.db.heartbeat(worker_id, 1000, lock) is False  # it is back: its row is gone
        lock.release()
        self.workers[w] = self.db.register_worker("process", lease=1000)
        self.claims[self.workers[w][0]] = []
        E.forgive_crashes(self.db, [job.id for job in held])
        for job in held:
            mj = self.tasks[job.task_id]["jobs"][job.id]
            if mj["state"] != "failed":
                mj["crashes"] -= 1

    @precondition(lambda self: self.orphans)
    @rule(index=st.integers(0, 10), ok=st.booleans())
    def late_result(self, index, ok) -> None:
        """A crashed worker's result arrives anyway: it must change nothing."""
        worker_id, job = self.orphans[index % len(self.orphans)]
        assert E.record(self.db, worker_id, [Outcome(job, ok, "X", "late", "")]) == []

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def finalize(self, data) -> None:
        task_id = data.draw(st.sampled_from(list(self.tasks)))
        m = self.tasks[task_id]
        failed = any(j["state"] == "failed" for j in m["jobs"].values())
        if m["state"] in ("done", "finalizing"):
            with pytest.raises(FinalizationAlreadyBegun):
                E.finalize(self.db, task_id)
        elif not self.ready(m) or failed:
            with pytest.raises(NotReadyForFinalization):
                E.finalize(self.db, task_id)
        else:  # unreachable by the engine's own rules: ready tasks begin finalization at once
            raise AssertionError(f"task {task_id} is ready but finalization did not begin")

    @staticmethod
    def _count(jobs: list[dict], kind: str, *states: str) -> int:
        return sum(1 for j in jobs if j["kind"] in kind and j["state"] in states)

    @invariant()
    def counters_match_the_model(self) -> None:
        if not hasattr(self, "db"):
            return
        for task_id, m in self.tasks.items():
            if m["state"] == "done":
                assert E.task_finished(self.db, task_id)
                continue
            p = progress(self.db, task_id)
            count = functools.partial(self._count, list(m["jobs"].values()))
            assert p.normal_job_count == count("N", "queued", "running", "failed", "done")
            assert p.finalize_job_count == count("F", "waiting", "queued", "running", "failed", "done")
            assert p.completed_count == count("NF", "done")
            assert p.failed_count == count("NF", "failed")
            assert p.running_count == count("NF", "running")
            assert p.pending_count == count("NF", "queued", "waiting")
            assert p.finalizable == m["finalizable"]
            assert (p.state == "finalizing") == (m["state"] == "finalizing" and not p.failed_count)
        assert E.check(self.db) == []


EngineModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestEngineModel = EngineModel.TestCase
TestEngineModel.pytestmark = pytest.mark.timeout(600)


class PostgresEngineModel(EngineModel):
    """The same rules on PostgreSQL: a fresh schema per example."""

    def open(self) -> Database:
        from litemultistep.pg import temporary_schema

        self.schema = temporary_schema(need_postgres())
        return Database(self.schema.__enter__())


PostgresEngineModel.TestCase.settings = settings(max_examples=15, stateful_step_count=40, deadline=None,
                                                 suppress_health_check=[HealthCheck.too_slow])
TestPostgresEngineModel = PostgresEngineModel.TestCase
TestPostgresEngineModel.pytestmark = pytest.mark.timeout(600)


def test_json_arguments_are_stored_as_text(sqlite_store):
    store = sqlite_store
    t = E.create_task(store, "t")
    E.add_jobs(store, t, [(JobKind.NORMAL, "jobfuncs:noop", json.dumps([[1, "two"], {"k": None}]), None)])
    assert store.connection().execute("SELECT typeof(args) FROM job").fetchone() == ("text",)
