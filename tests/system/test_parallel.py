"""Real jobs in parallel: two job processes share slow work, no worker hoards claimed jobs, the
counters say what really runs, and an idle --burst worker notices the last result of another pool.
Assertions are on who ran what and on the counters, not on wall-clock time (see scripts/bench.py)."""

from __future__ import annotations

import collections
import json
import threading
import time

import jobfuncs
import pytest
from conftest import cli, lines, wait_for

from litemultistep import MultiStepTask, views
from litemultistep.config import resolve_db

pytestmark = pytest.mark.timeout(120)


class Sampler:
    """Reads the counters every few milliseconds while a test runs, as `status` would."""

    def __init__(self, db: str) -> None:
        self.db = resolve_db(db)
        self.most_running = 0
        self.most_held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tasks = views.active_tasks(self.db)
            self.most_running = max([self.most_running, *(t.running_count for t in tasks)])
            held = [len(w.running_job_ids) for w in views.workers(self.db)]
            self.most_held = max([self.most_held, *held])
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_slow_jobs_spread_over_an_idle_pool_and_nothing_is_hoarded(db, log_path, spawn):
    MultiStepTask.create("warm-up", db=db).nuke()  # the file exists before the worker starts
    proc = spawn(db, "-c", "2")
    wait_for(lambda: len(views.workers(resolve_db(db))) == 1, what="the worker")
    time.sleep(1.5)  # idle for a while: a claim size that grew with idleness would show now
    with Sampler(db) as sampler:
        with MultiStepTask.create("sleepy", db=db) as task:
            for i in range(10):
                task.add_job(jobfuncs.slow_record, log_path, f"s{i}", 0.4)
        wait_for(lambda: task.progress().finished, what="the task to finish")
    by_pid = collections.Counter(line.split()[2] for line in lines(log_path) if line.startswith("end "))
    assert len(by_pid) == 2 and all(n >= 3 for n in by_pid.values()), by_pid
    assert sampler.most_running <= 2, f"running_count reached {sampler.most_running} with 2 job processes"
    assert sampler.most_held <= 2, f"one worker held {sampler.most_held} jobs with 2 job processes"
    proc.terminate()
    assert proc.wait(30) == 0


def test_cpu_bound_jobs_run_at_the_same_time(db, log_path, spawn):
    with MultiStepTask.create("cpu", db=db) as task:
        for i in range(30):
            task.add_job(jobfuncs.burn, log_path, f"c{i}", 0.03)
    assert spawn(db, "-c", "2", "--burst").wait(60) == 0
    spans = collections.defaultdict(list)
    for line in lines(log_path):
        tag, pid, start, end = line.split()
        spans[pid].append((float(start), float(end)))
    assert len(spans) == 2, "both job processes burned CPU"
    (a, b) = spans.values()
    overlaps = sum(1 for s1, e1 in a for s2, e2 in b if s1 < e2 and s2 < e1)
    assert overlaps >= 5, "the two processes never ran jobs at the same time"


def test_a_slow_job_in_a_batch_of_short_ones_hands_the_rest_back(db, log_path, spawn):
    """A task known for short jobs is claimed in batches; when one job turns out slow, the jobs
    behind it go back to the queue and the other process runs them meanwhile."""
    with MultiStepTask.create("mixed", db=db) as task:
        for i in range(400):
            if i == 300:
                task.add_job(jobfuncs.slow_record, log_path, "slow", 2)
            else:
                task.add_job(jobfuncs.record, log_path, f"q{i}")
    proc = spawn(db, "-c", "2", "--burst", "-v")
    assert proc.wait(60) == 0
    log = lines(log_path)
    slow_pid = next(line.split()[2] for line in log if line.startswith("start slow"))
    end = log.index(next(x for x in log if x.startswith("end slow")))
    # the 99 jobs behind it, those claimed in its own batch included, run elsewhere before it ends
    meanwhile = [x for x in log[:end] if x.startswith("q") and x.split()[1] != slow_pid
                 and int(x.split()[0][1:]) > 300]
    waited = sorted({f"q{i}" for i in range(301, 400)} - {x.split()[0] for x in meanwhile})
    assert not waited, (f"{len(waited)} job(s) after the slow one waited for it instead of running elsewhere: "
                        f"{waited}\n{log}\n{spawn.log(proc)}")
    assert task.progress().finished


def test_a_burst_worker_leaves_when_another_pool_finishes_the_last_job(db, log_path, spawn):
    with MultiStepTask.create("elsewhere", db=db) as task:
        task.add_job(jobfuncs.work, log_path, "long", 2)
    busy = spawn(db)
    wait_for(lambda: lines(log_path), what="the job to start")
    waiter = spawn(db, "--burst")
    time.sleep(0.5)
    assert waiter.poll() is None, "--burst left while a job was still running in another pool"
    assert waiter.wait(30) == 0
    assert task.progress().finished
    busy.terminate()
    busy.wait(30)


def test_a_small_task_behind_a_large_task_of_slow_jobs_gets_its_share(db, log_path, spawn):
    with MultiStepTask.create("large", db=db) as large:
        for i in range(60):
            large.add_job(jobfuncs.work, log_path, f"L{i}", 0.1)
    with MultiStepTask.create("small", db=db) as small:
        for i in range(4):
            small.add_job(jobfuncs.work, log_path, f"S{i}", 0.1)
    assert spawn(db, "-c", "2", "--burst").wait(60) == 0
    ends = [line.split()[1] for line in lines(log_path) if line.startswith("end ")]
    last_small = max(i for i, tag in enumerate(ends) if tag.startswith("S"))
    assert sum(1 for tag in ends[:last_small] if tag.startswith("L")) <= 8, ends[:last_small + 1]


def test_status_shows_how_long_running_jobs_have_run(db, log_path, spawn):
    with MultiStepTask.create("shown", db=db) as task:
        task.add_job(jobfuncs.work, log_path, "long", 30)
    proc = spawn(db)
    wait_for(lambda: lines(log_path), what="the job to start")
    time.sleep(1.2)
    doc = cli("status", db, task.task_id, "--json")
    [running] = json.loads(doc.stdout)["running"]
    assert running["func"] == "jobfuncs:work" and time.time() - running["claimed_at"] >= 1
    assert "running job" in cli("status", db, task.task_id).stdout
    assert proc.poll() is None  # the spawn fixture kills it: a graceful stop would wait for the 30 s job
