"""A real worker driven round by round, in this process, with a clock of the test's own: its decisions
(time limits, heartbeats, recovery, stops, --burst) at the time each round is given, without sleeping
through them. Its job processes are real; only the clock is the test's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import jobfuncs
import pytest
from conftest import TESTS, die, lines

import litemultistep
from litemultistep import MultiStepTask
from litemultistep.db import monotonic, open_database
from litemultistep.engine import ClaimedJob
from litemultistep.views import progress
from litemultistep.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def make_worker(any_db: str) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(**options: object) -> Worker:
        w = Worker(open_database(any_db), WorkerOptions(db=any_db, paths=[str(TESTS)], **options))  # type: ignore[arg-type]
        made.append(w)
        return w

    yield make
    for w in made:
        w.shutdown()


def step_until(w: Worker, predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Rounds at the real time until ``predicate`` holds (the job processes run in real time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        w.step()
        time.sleep(0.005)


def running(w: Worker) -> tuple[ClaimedJob | None, float]:
    for proc in w.procs:
        if proc.busy:
            job, start = proc.running()
            if job is not None and start:
                return job, start
    return None, 0.0


def test_rounds_run_a_task_to_its_end(any_db, make_worker, log_path):
    with MultiStepTask.create("steps", db=any_db) as task:
        for i in range(5):
            task.add_job(jobfuncs.record, log_path, f"j{i}")
        task.add_finalization_job(jobfuncs.record, log_path, "fin")
    w = make_worker(concurrency=2)
    step_until(w, lambda: progress(w.db, task.task_id).finished, "the task to finish")
    tags = [line.split()[0] for line in lines(log_path)]
    assert sorted(tags[:-1]) == [f"j{i}" for i in range(5)] and tags[-1] == "fin"


def test_a_job_past_its_limit_fails_in_the_round_given_a_later_time(any_db, make_worker, log_path):
    with MultiStepTask.create("limit", db=any_db) as task:
        task.add_job(litemultistep.job(jobfuncs.sleep_forever, timeout=3600), log_path, "slow")
    w = make_worker()
    step_until(w, lambda: running(w)[0] is not None, "the job to start")
    job, start = running(w)
    assert w.step(now=start + 3599) and task.failures() == []  # within its limit: left alone
    assert w.step(now=start + 3601)  # an hour later, for this worker: not a second later for the test
    [failure] = task.failures()
    assert failure.job_id == job.id and failure.exc_type == "litemultistep.JobTimeout"
    assert "3600 s limit" in failure.message
    assert all(p.proc.poll() is None for p in w.procs), "the killed job process was replaced"


def test_heartbeats_come_when_they_are_due(any_db, make_worker):
    w = make_worker()
    conn = w.db.connection()

    def beat() -> float:
        return float(conn.execute("SELECT heartbeat_at FROM worker WHERE id = ?", (w.worker_id,)).fetchone()[0])

    t = monotonic()
    w.step(now=t)
    first = beat()
    time.sleep(0.01)  # so that a new heartbeat has another wall-clock stamp
    w.step(now=t + 1.0)
    assert beat() == first, "a heartbeat before it was due"
    w.step(now=w.schedule.heartbeat)
    assert beat() > first


def test_a_dead_workers_jobs_come_back_at_the_next_round_of_recovery(any_db, make_worker):
    db = open_database(any_db)
    with MultiStepTask.create("orphan", db=db) as task:
        task.add_job(jobfuncs.noop)
    w = make_worker(queues=["nothing-*"])  # serves no task: it only recovers
    t = monotonic()
    w.step(now=t)
    dead_id, lock = db.register_worker("process", lease=1000)
    litemultistep.engine.claim(db, dead_id)
    die(lock)
    assert progress(db, task.task_id).running_count == 1
    w.step(now=t + 0.1)
    assert progress(db, task.task_id).running_count == 1, "recovered before its round was due"
    w.step(now=w.schedule.maintenance)
    p = progress(db, task.task_id)
    assert (p.running_count, p.pending_count) == (0, 1)
    assert db.connection().execute("SELECT crashes FROM job").fetchone()[0] == 1


def test_a_stop_past_the_shutdown_timeout_puts_the_running_job_back(any_db, make_worker, log_path):
    with MultiStepTask.create("stop", db=any_db) as task:
        task.add_job(jobfuncs.sleep_forever, log_path, "long")
    w = make_worker(shutdown_timeout=600)
    step_until(w, lambda: running(w)[0] is not None, "the job to start")
    w.request_stop("asked to")
    assert w.step(now=w.schedule.stop - 1), "stopped before the shutdown timeout"
    assert not w.step(now=w.schedule.stop + 1)
    assert w.forced
    w.shutdown()
    p = progress(open_database(any_db), task.task_id)
    assert (p.running_count, p.pending_count, p.failed_count) == (0, 1, 0)


def test_burst_rounds_end_once_nothing_is_left(any_db, make_worker, log_path):
    with MultiStepTask.create("burst", db=any_db) as task:
        task.add_job(jobfuncs.record, log_path, "only")
    w = make_worker(burst=True)
    rounds = 0
    while w.step():
        rounds += 1
        assert rounds < 10_000, "--burst never ended"
        time.sleep(0.002)
    assert progress(w.db, task.task_id).finished
