"""Proving the guarantees: workers killed at random and at each step, contention, growth, bad input.
The tests taking ``any_db`` run on a SQLite file and on a PostgreSQL database.

Jobs log their start and end (with their pid) to a file outside the library; the checks read that
log and the database afterwards.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import jobfuncs
import pytest
from conftest import env_for_workers, fill_disk, lines, wait_for

from litemultistep import InvalidSlug, MultiStepTask
from litemultistep.config import resolve_db
from litemultistep.engine import check
from litemultistep.views import active_tasks

pytestmark = pytest.mark.timeout(240)


def events(log_path: str) -> list[tuple[str, str]]:
    """(event, tag) in order: event is start or end."""
    return [(parts[0], parts[1]) for parts in (line.split() for line in lines(log_path))]


def assert_task_ran_correctly(log: list[tuple[str, str]], normal: list[str], finalizers: list[str]) -> None:
    ended = {tag for ev, tag in log if ev == "end"}
    missing = [t for t in normal + finalizers if t not in ended]
    assert not missing, f"{len(missing)} jobs never ran to the end, e.g. {missing[:5]}"
    first_start = {}
    last_end = {}
    for i, (ev, tag) in enumerate(log):
        if ev == "start":
            first_start.setdefault(tag, i)
        else:
            last_end[tag] = i
    if finalizers:
        if normal:
            assert max(last_end[t] for t in normal) < first_start[finalizers[0]], "a finalizer ran before a job"
        for a, b in zip(finalizers, finalizers[1:], strict=False):
            assert last_end[a] < first_start[b], f"{b} started before {a} ended"


def assert_clean(db: str) -> None:
    database = resolve_db(db)
    assert check(database) == []
    assert database.integrity() == []


def test_chaos_random_sigkills(any_db, log_path, spawn):
    """Workers killed at random every few hundred milliseconds: nothing is lost, nothing counts twice."""
    db = any_db
    plan = {}
    for k in range(4):
        with MultiStepTask.create(f"chaos{k}", db=db) as task:
            normal = [f"t{k}-n{i}" for i in range(250)]
            finals = [f"t{k}-F{j}" for j in range(3)]
            for tag in normal:
                task.add_job(jobfuncs.work, log_path, tag, 0.03)
            for tag in finals:
                task.add_finalization_job(jobfuncs.work, log_path, tag, 0.02)
        plan[task.task_id] = (task, normal, finals)
    # The kills are not the jobs' fault: no job may reach the crash limit because of them.
    chaos = ("-q", "--max-crashes", "1000")
    workers = [spawn(db, *chaos) for _ in range(3)]
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(t.progress().finished for t, _, _ in plan.values()):
        time.sleep(rng.uniform(0.15, 0.4))
        victim = workers.pop(rng.randrange(len(workers)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        kills += 1
        workers.append(spawn(db, *chaos))
    final = spawn(db, "--burst", *chaos)
    assert final.wait(120) == 0, spawn.log(final)
    for w in workers:
        w.send_signal(signal.SIGTERM)
        w.wait(30)
    assert kills >= 10
    log = events(log_path)
    for task, normal, finals in plan.values():
        p = task.progress()
        assert p.finished and p.completed_count == p.total_job_count == 253
        assert_task_ran_correctly([e for e in log if e[1].split("-")[0] == normal[0].split("-")[0]], normal, finals)
    reruns = sum(n - 1 for n in collections.Counter(t for ev, t in log if ev == "start").values())
    print(f"{kills} workers killed, {reruns} job runs repeated")
    assert_clean(db)


CRASH_CASES = [(n, point, kind) for n in (0, 1, 1000) for point in ("after-claim", "after-run")
               for kind in ("job", "finalizer") if not (n == 0 and kind == "job")]


@pytest.mark.parametrize("normal_jobs, point, kind", CRASH_CASES)
def test_crash_at_each_step(any_db, log_path, tmp_path, spawn, normal_jobs, point, kind):
    """A worker dies after a claim, or after a job ran but before its result is recorded (for a
    finalizer: inside the finalization hand-off, or between two finalizers); another one finishes."""
    db = any_db
    with MultiStepTask.create("crash", db=db) as task:
        normal = [f"n{i}" for i in range(normal_jobs)]
        for i, tag in enumerate(normal):
            fn = jobfuncs.victim if kind == "job" and i == normal_jobs // 2 else jobfuncs.work
            task.add_job(fn, log_path, tag)
        finals = ["F0", "F1", "F2"]
        for tag in finals:
            fn = jobfuncs.victim if kind == "finalizer" and tag == "F1" else jobfuncs.work
            task.add_finalization_job(fn, log_path, tag)
    crash_file = tmp_path / "crash"
    crash_file.write_text(f"{point} jobfuncs:victim worker\n")
    env = dict(env_for_workers(), LITEMULTISTEP_CRASH_FILE=str(crash_file))
    first = spawn(db, "-q", env=env)
    assert first.wait(60) == -signal.SIGKILL, spawn.log(first)  # the crash hook kills the worker
    assert (tmp_path / "crash.fired").exists()
    second = spawn(db, "--burst", "-q")
    assert second.wait(120) == 0, spawn.log(second)
    p = task.progress()
    assert p.finished and p.completed_count == normal_jobs + 3
    log = events(log_path)
    assert_task_ran_correctly(log, normal, finals)
    victim_tag = normal[normal_jobs // 2] if kind == "job" else "F1"
    runs = sum(1 for ev, tag in log if ev == "end" and tag == victim_tag)
    assert runs == (2 if point == "after-run" else 1)
    assert_clean(db)


def test_contention_eight_workers_two_enqueuers(any_db, log_path, spawn, tmp_path):
    """8 workers and 2 enqueuing processes on 2,000 one-job tasks: each finalized exactly once,
    and no 'database is locked' reaches anyone."""
    db = any_db
    code = textwrap.dedent(f"""
        import sys
        import jobfuncs
        from litemultistep import MultiStepTask
        part = int(sys.argv[1])
        for k in range(1000):
            with MultiStepTask.create(f"c{{part}}-{{k}}", db={db!r}) as task:
                task.add_job(jobfuncs.noop, k)
                task.add_finalization_job(jobfuncs.record, {log_path!r}, f"F{{part}}-{{k}}")
    """)
    workers = spawn(db, "-c", "8", "-q")
    enqueuers = [subprocess.Popen([sys.executable, "-c", code, str(part)], stderr=subprocess.PIPE, text=True,
                                  env=env_for_workers()) for part in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in enqueuers]
    assert all(p.returncode == 0 for p in enqueuers), errors
    wait_for(lambda: len(lines(log_path)) >= 2000, timeout=120, what="2,000 finalizers")
    time.sleep(0.5)
    workers.send_signal(signal.SIGTERM)
    assert workers.wait(60) == 0
    counts = collections.Counter(line.split()[0] for line in lines(log_path))
    assert len(counts) == 2000 and set(counts.values()) == {1}
    text = spawn.log(workers) + "".join(errors)
    assert "locked" not in text and "Traceback" not in text
    assert active_tasks(db) == []
    assert_clean(db)


def test_file_shrinks_back_after_work(db, spawn):
    """100,000 jobs done and their tasks removed: the file and its -wal are small again."""
    empty = MultiStepTask.create("probe", db=db)
    empty.nuke()
    for k in range(10):
        with MultiStepTask.create(f"grow{k}", db=db) as task:
            for i in range(10_000):
                task.add_job(jobfuncs.noop, i)
    full = os.path.getsize(db) + os.path.getsize(db + "-wal")
    proc = spawn(db, "-c", "2", "--burst", "-q")
    assert proc.wait(180) == 0, spawn.log(proc)
    size = os.path.getsize(db)
    wal = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
    assert full > 4_000_000
    assert size < 300_000, f"the file stayed at {size} bytes (it held {full} bytes of queued work)"
    assert wal < 9 * 1024 * 1024
    assert_clean(db)


def test_disk_full_mid_run_then_work_goes_on(small_disk, log_path, spawn):
    """A worker whose writes fail for lack of space logs a clear error, keeps its results, and goes
    on once there is space again."""
    db = str(small_disk / "app.sqlite")
    with MultiStepTask.create("full", db=db) as task:
        for i in range(200):
            task.add_job(jobfuncs.record, log_path, f"n{i}")
    filler = fill_disk(small_disk)
    proc = spawn(db, "-q")
    wait_for(lambda: "the disk is full" in spawn.log(proc), timeout=30, what="the worker to report the full disk")
    assert task.progress().completed_count < 200
    filler.unlink()
    wait_for(lambda: task.progress().finished, timeout=60, what="the work to go on")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "Traceback" not in spawn.log(proc)
    assert_clean(db)


def test_enqueue_on_a_full_disk_fails_clearly_and_keeps_what_is_stored(db, tmp_path):
    with MultiStepTask.create("kept", db=db) as kept:
        kept.add_job(jobfuncs.noop, 1)
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))
        import jobfuncs
        from litemultistep import MultiStepTask, StorageError
        try:
            with MultiStepTask.create("big", db={db!r}) as task:
                for i in range(50_000):
                    task.add_job(jobfuncs.noop, "x" * 100)
        except StorageError as e:
            print("FULL:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env_for_workers())
    assert "FULL: cannot write to" in out.stdout and "nothing stored was lost" in out.stdout, out.stderr
    assert kept.progress().normal_job_count == 1
    assert_clean(db)


class TestSlugs:
    @pytest.mark.parametrize("slug, message", [
        ("", "cannot be empty"),
        ("x" * 10_000, "at most 200 characters"),
        ("a~b", "cannot contain '~'"),
        ("line\nbreak", "control characters"),
        ("nul\x00byte", "control characters"),
        ("lone\udc80", "lone surrogate"),
        (42, "a task slug is a string"),
    ])
    def test_bad_slugs(self, db, slug, message):
        with pytest.raises(InvalidSlug, match=message):
            MultiStepTask.create(slug, db=db)

    @pytest.mark.parametrize("slug", ["it's \"quoted\"", "../x", "'; DROP TABLE task; --", "pirates ☠ 海賊",
                                      "a*b?[c]"])
    def test_odd_but_valid_slugs(self, db, slug, log_path):
        with MultiStepTask.create(slug, db=db) as task:
            task.add_job(jobfuncs.record, log_path, "x")
        assert task.slug == slug and MultiStepTask.find(task.task_id, db=db).slug == slug
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM task").fetchone() == (1,)
        conn.close()

    def test_one_slug_from_two_processes_gives_unique_ids(self, any_db):
        db = any_db
        code = textwrap.dedent(f"""
            from litemultistep import MultiStepTask
            for _ in range(1000):
                print(MultiStepTask.create("same", db={db!r}).task_id)
        """)
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        ids = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
        assert len(ids) == 2000 and len(set(ids)) == 2000
