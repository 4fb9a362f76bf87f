"""Real ``litemultistep worker`` processes, started as a user starts them and stopped with real signals,
on a SQLite file and on a PostgreSQL database (every test runs on both)."""

from __future__ import annotations

import collections
import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import jobfuncs
import pytest
from conftest import LMS, env_for_workers, is_pg, lines, wait_for

from litemultistep import MultiStepTask, NoSuchMultiStepTask
from litemultistep.config import resolve_db
from litemultistep.engine import check

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(any_db: str) -> str:
    return any_db


def started(log_path: str, tag: str) -> list[str]:
    return [line for line in lines(log_path) if line.startswith(f"start {tag} ")]


def finished(db: str, task: MultiStepTask) -> bool:
    return task.progress().finished


def assert_clean(db: str) -> None:
    assert check(resolve_db(db)) == []


def test_parallel_tasks_finalize_in_order_across_processes(db, log_path, spawn):
    tasks = []
    for k in range(3):
        with MultiStepTask.create(f"t{k}", db=db) as task:
            for i in range(60):
                task.add_job(jobfuncs.paced_record, log_path, f"t{k}-n{i}")
            for j in range(3):
                task.add_finalization_job(jobfuncs.record, log_path, f"t{k}-F{j}")
        tasks.append(task)
    proc = spawn(db, "-c", "3", "--burst")
    assert proc.wait(90) == 0, spawn.log(proc)
    tags = [line.split()[0] for line in lines(log_path)]
    counts = collections.Counter(tags)
    assert all(n == 1 for n in counts.values()) and len(counts) == 3 * 63
    for k, task in enumerate(tasks):
        pos = {t: i for i, t in enumerate(tags)}
        last_normal = max(pos[f"t{k}-n{i}"] for i in range(60))
        assert last_normal < pos[f"t{k}-F0"] < pos[f"t{k}-F1"] < pos[f"t{k}-F2"]
        with pytest.raises(NoSuchMultiStepTask):
            MultiStepTask.find(task.task_id, db=db)
    assert len({line.split()[1] for line in lines(log_path)}) >= 2
    assert_clean(db)


def test_two_jobs_run_at_once_with_c2(db, log_path, spawn):
    with MultiStepTask.create("pair", db=db) as task:
        for i in range(2):
            task.add_job(jobfuncs.slow_record, log_path, f"p{i}", 2.5)
    proc = spawn(db, "-c", "2", "--burst")
    assert proc.wait(60) == 0
    events = [line.split()[0] for line in lines(log_path)]
    assert events[:2] == ["start", "start"], events


def test_small_task_is_not_stuck_behind_a_big_one(db, log_path, spawn):
    with MultiStepTask.create("big", db=db) as big:
        for i in range(1500):
            big.add_job(jobfuncs.record, log_path, f"big{i}")
    with MultiStepTask.create("small", db=db) as small:
        for i in range(20):
            small.add_job(jobfuncs.record, log_path, f"small{i}")
    proc = spawn(db, "--burst", "-q")
    assert proc.wait(90) == 0
    tags = [line.split()[0] for line in lines(log_path)]
    last_small = max(i for i, t in enumerate(tags) if t.startswith("small"))
    big_before = sum(1 for t in tags[:last_small] if t.startswith("big"))
    assert big_before <= 100, f"the 20-job task waited for {big_before} jobs of the big one"


def test_sigterm_lets_the_running_job_finish(db, log_path, spawn):
    with MultiStepTask.create("term", db=db) as task:
        task.add_job(jobfuncs.slow_record, log_path, "long", 1.5)
        task.add_job(jobfuncs.record, log_path, "next")
    proc = spawn(db)
    wait_for(lambda: started(log_path, "long"), what="the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, spawn.log(proc)
    assert [line.split()[0] for line in lines(log_path)] == ["start", "end"]
    p = task.progress()
    assert (p.completed_count, p.pending_count, p.running_count) == (1, 1, 0)
    assert_clean(db)


def test_second_sigterm_stops_at_once_and_the_job_runs_again(db, log_path, spawn):
    with MultiStepTask.create("term2", db=db) as task:
        task.add_job(jobfuncs.slow_record, log_path, "long", 30)
    proc = spawn(db)
    wait_for(lambda: started(log_path, "long"), what="the job to start")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) != 0
    p = task.progress()
    assert (p.completed_count, p.pending_count, p.running_count) == (0, 1, 0)
    assert_clean(db)


def test_sigkill_mid_job_loses_nothing(db, log_path, spawn):
    with MultiStepTask.create("kill", db=db) as task:
        task.add_job(jobfuncs.slow_record, log_path, "victim", 1.0)
        for i in range(5):
            task.add_job(jobfuncs.record, log_path, f"n{i}")
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    proc = spawn(db)
    wait_for(lambda: started(log_path, "victim"), what="the job to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    second = spawn(db, "--burst")
    assert second.wait(60) == 0, spawn.log(second)
    assert len(started(log_path, "victim")) == 2
    assert task.progress().finished
    tags = [line.split()[0] for line in lines(log_path)]
    assert tags.count("F") == 1 and tags[-1] == "F"
    assert "went back to their queues" in spawn.log(second)
    assert_clean(db)


def test_sigkill_mid_finalization_resumes_at_that_finalizer(db, log_path, spawn):
    with MultiStepTask.create("killfin", db=db) as task:
        task.add_job(jobfuncs.record, log_path, "n")
        task.add_finalization_job(jobfuncs.record, log_path, "F1")
        task.add_finalization_job(jobfuncs.slow_record, log_path, "F2", 1.0)
        task.add_finalization_job(jobfuncs.record, log_path, "F3")
    proc = spawn(db)
    wait_for(lambda: started(log_path, "F2"), what="the second finalizer to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    second = spawn(db, "--burst")
    assert second.wait(60) == 0, spawn.log(second)
    tags = [line.split()[0] for line in lines(log_path)]
    assert tags.count("F1") == 1 and tags.count("F3") == 1 and tags[-1] == "F3"
    assert len(started(log_path, "F2")) == 2
    assert task.progress().finished
    assert_clean(db)


def test_many_tasks_finishing_together_finalize_exactly_once(db, log_path, spawn):
    for k in range(200):
        with MultiStepTask.create(f"one{k}", db=db) as task:
            task.add_job(jobfuncs.noop, k)
            task.add_finalization_job(jobfuncs.record, log_path, f"F{k}")
    proc = spawn(db, "-c", "4", "--burst", "-q")
    assert proc.wait(90) == 0, spawn.log(proc)
    counts = collections.Counter(line.split()[0] for line in lines(log_path))
    assert counts == {f"F{k}": 1 for k in range(200)}
    assert "error" not in spawn.log(proc).lower()
    assert_clean(db)


def test_job_adds_jobs_to_its_own_task(db, log_path, spawn):
    with MultiStepTask.create("fan", db=db) as task:
        task.add_job(jobfuncs.fan_out, log_path, 10)
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    proc = spawn(db, "-c", "2", "--burst")
    assert proc.wait(60) == 0
    tags = [line.split()[0] for line in lines(log_path)]
    assert sorted(tags[:-1]) == sorted(["parent"] + [f"child{i}" for i in range(10)])
    assert tags[-1] == "F"


def test_a_worker_paused_past_its_lease_keeps_its_job_and_runs_it_once(db, log_path, spawn):
    """SIGSTOP for three leases, then SIGCONT (a laptop's sleep). On SQLite a live worker is never
    taken for dead (its OS lock is held), so its job is neither run a second time nor stuck. On
    PostgreSQL a worker silent past its lease cannot be told from a host that vanished: it is taken
    for dead, its session is ended and its job runs elsewhere; once it resumes, its result is ignored.
    Either way the task finishes, with its finalizer run once."""
    runs = 2 if is_pg(db) else 1
    with MultiStepTask.create("stall", db=db) as task:
        task.add_job(jobfuncs.slow_record, log_path, "held", 1.0)
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    paused = spawn(db, "--lease", "1")
    wait_for(lambda: started(log_path, "held"), what="the job to start")
    os.killpg(paused.pid, signal.SIGSTOP)  # the worker and its job process, as a suspend does
    try:
        rescuer = spawn(db, "--lease", "1")
        time.sleep(3.5)
        assert len(started(log_path, "held")) == runs
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    wait_for(lambda: finished(db, task), what="the task to finish")
    tags = [line.split()[0] for line in lines(log_path)]
    assert tags.count("F") == 1 and len(started(log_path, "held")) == runs
    assert task.progress().completed_count == 2
    for proc in (paused, rescuer):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert_clean(db)


def test_failures_do_not_stop_a_burst_worker(db, log_path, spawn):
    with MultiStepTask.create("fails", db=db) as task:
        task.add_job(jobfuncs.boom, "multi\nline\x1b[31m message")
        task.add_job(jobfuncs.record, log_path, "ok")
        task.add_finalization_job(jobfuncs.record, log_path, "F")
    proc = spawn(db, "--burst")
    assert proc.wait(60) == 0
    assert task.failed_count == 1 and task.completed_count == 1
    log = spawn.log(proc)
    assert " failed, attempt 1 of 1: " in log and "multi\\nline\\x1b[31m message" in log and "\x1b" not in log


def test_callable_gone_at_run_time_fails_with_the_reason(db, tmp_path, spawn):
    name = f"vanishing_{os.getpid()}_{time.monotonic_ns()}"  # a new module each time: imports are cached
    module = tmp_path / f"{name}.py"
    module.write_text("def work():\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        vanishing = importlib.import_module(name)
        with MultiStepTask.create("gone", db=db) as task:
            task.add_job(vanishing.work)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    module.write_text("# work() was removed\n")
    proc = spawn(db, "--burst", "--path", str(tmp_path))
    assert proc.wait(60) == 0
    [failure] = task.failures()
    assert "has no 'work'" in failure.message and "JobNotImportable" in failure.exc_type


def test_allow_module_refuses_other_modules(db, log_path, spawn):
    with MultiStepTask.create("allow", db=db) as task:
        task.add_job(jobfuncs.record, log_path, "x")
    proc = spawn(db, "--burst", "--allow-module", "myapp.jobs")
    assert proc.wait(60) == 0
    assert lines(log_path) == []
    [failure] = task.failures()
    assert "not allowed by --allow-module" in failure.message


def test_queues_glob_serves_only_matching_tasks(db, log_path, spawn):
    with MultiStepTask.create("images", db=db) as images:
        images.add_job(jobfuncs.record, log_path, "img")
    with MultiStepTask.create("mail", db=db) as mail:
        mail.add_job(jobfuncs.record, log_path, "mail")
    proc = spawn(db, "--burst", "--queues", "images~*")
    assert proc.wait(60) == 0
    assert [line.split()[0] for line in lines(log_path)] == ["img"]
    assert mail.progress().pending_count == 1


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_worker_takes_its_job_processes_with_it(db, log_path, spawn):
    """SIGKILL of the worker: its job processes die at once (no job runs on, unowned, while another
    worker runs it again), and the next worker runs the held jobs."""
    with MultiStepTask.create("orphans", db=db) as task:
        for i in range(4):
            task.add_job(jobfuncs.slow_record, log_path, f"s{i}", 5)
    proc = spawn(db, "-c", "2")
    wait_for(lambda: len([line for line in lines(log_path) if line.startswith("start ")]) == 2,
             what="two jobs running")
    kids = child_pids(proc.pid)
    assert len(kids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: all(gone(pid) for pid in kids), timeout=5, what="the job processes to die")
    assert not [line for line in lines(log_path) if line.startswith("end ")]
    second = spawn(db, "-c", "2", "--burst", "-q")
    assert second.wait(60) == 0
    assert task.progress().finished
    assert_clean(db)


def _processes_marked(mark: str) -> list[int]:
    """The processes whose environment holds ``mark`` (a worker's job processes inherit it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_bad_database_exits_2_with_a_message(tmp_path, spawn):
    notdb = tmp_path / "notes.txt"
    notdb.write_text("hello\n" * 50)
    mark = f"LMS_TEST_MARK={tmp_path.name}"
    proc = spawn(str(notdb), "--burst", "-c", "3", env={**env_for_workers(), "LMS_TEST_MARK": tmp_path.name})
    assert proc.wait(30) == 2
    log = spawn.log(proc)
    assert "is not a SQLite database" in log and "Traceback" not in log
    # the job processes it started before it opened the file are gone with it
    wait_for(lambda: _processes_marked(mark) == [], timeout=10, what="its job processes to end")


def test_a_worker_on_a_path_with_no_file_creates_it_and_says_so(tmp_path, spawn):
    typo = tmp_path / "tpyo.sqlite"
    first = spawn(str(typo), "--burst", "-q")
    assert first.wait(30) == 0
    log = spawn.log(first)
    assert f"WARNING [pid {first.pid}] no database at {typo}: created a new, empty one; is the path right?" in log
    assert typo.exists() and "Traceback" not in log
    MultiStepTask.create("after", db=str(typo))  # a database like any other: the application can use it
    again = spawn(str(typo), "--burst", "-q")
    assert again.wait(30) == 0 and "no database" not in spawn.log(again)
    # a worker that cannot start makes no file
    bad = spawn(str(tmp_path / "other.sqlite"), "--burst", "--path", str(tmp_path / "no such dir"))
    assert bad.wait(30) == 2 and "no such directory" in spawn.log(bad)
    assert not (tmp_path / "other.sqlite").exists() and "no database at" not in spawn.log(bad)
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # SQLite takes an empty file as a new database: said the same way
    made = spawn(str(empty), "--burst", "-q")
    assert made.wait(30) == 0 and f"no database at {empty}: created a new, empty one" in spawn.log(made)
    short = spawn(str(typo), "--burst", "--lease", "0.5")
    assert short.wait(30) == 2 and "lease must be at least 1 second, not 0.5" in spawn.log(short)


def test_idle_worker_starts_a_new_job_quickly(db, log_path, spawn):
    proc = spawn(db)
    wait_for(lambda: resolve_db(db).connection().execute("SELECT count(*) FROM worker").fetchone()[0] == 1,
             what="the worker to register")
    time.sleep(0.5)
    with MultiStepTask.create("late", db=db) as task:
        task.add_job(jobfuncs.record, log_path, "late")
    wait_for(lambda: lines(log_path), timeout=10, what="the job to run")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert task.progress().finished
    assert os.path.exists(log_path)


def test_job_processes_start_without_what_they_do_not_use(db, tmp_path, log_path, spawn):
    """A job process imports neither peewee nor a database driver, rich, click nor asyncio: each
    costs its start-up time, and a no-op job's whole run is a few microseconds. Those the worker
    starts with are forked from it before it imports the rest (click comes with them, at no cost);
    a replacement is a new interpreter. Both show a job the same process otherwise."""
    name = f"modules_seen_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(
        "import logging, os, signal, sys\n"
        "def seen(path, tag):\n"
        "    names = ('peewee', 'psycopg', 'rich', 'click', 'asyncio', 'filelock')\n"
        "    main = sorted(vars(sys.modules['__main__']))\n"
        "    root = logging.getLogger()\n"
        "    with open(path, 'a') as f:\n"
        "        f.write(f'{tag}|{os.getpid()}|' + ' '.join(n for n in names if n in sys.modules)\n"
        "                + f'|{sys.argv}|{sys.path[0]!r}|{main}|{root.handlers}|{root.level}'\n"
        "                + f'|{os.getsid(0) == os.getpid()}|{fds()}|{handlers()}|{title()}'\n"
                "                + f'|{sys.orig_argv}|{sys.modules[\"__main__\"]!r}\\n')\n"
        "def title():\n"
        "    with open('/proc/self/cmdline', 'rb') as f:\n"
        "        return f.read().rstrip(bytes(1)).decode()\n"
        "def handlers():\n"
        "    names = ('SIGHUP', 'SIGINT', 'SIGTERM', 'SIGUSR1', 'SIGCHLD', 'SIGPIPE', 'SIGXFSZ')\n"
        "    found = [signal.getsignal(getattr(signal, n)) for n in names]\n"
        "    return [getattr(h, '__name__', None) or getattr(h, 'name', str(h)) for h in found]\n"
        "def fds():\n"
        "    kinds = []\n"
        "    for fd in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            link = os.readlink(f'/proc/self/fd/{fd}')\n"
        "        except OSError:\n"
        "            continue  # the listing's own\n"
        "        if link != 'anon_inode:[timerfd]':  # the fence's (PostgreSQL), made by a thread meanwhile\n"
        "            kinds.append('deleted' if link.endswith(' (deleted)') else link if link.startswith('anon_inode')\n"
        "                         else link.split(':')[0])\n"
        "    return sorted(kinds)\n"
        "def crash_once(marker):\n"
        "    if not os.path.exists(marker):\n"
        "        open(marker, 'w').close()\n"
        "        os._exit(9)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        with MultiStepTask.create("lean", db=db) as task:
            task.add_job(module.seen, log_path, "forked")
            task.add_job(module.crash_once, str(tmp_path / "crashed"))
            task.add_job(module.seen, log_path, "new")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    # started as nohup starts it: SIGHUP stays ignored in job processes of either kind, as across exec
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        worker = spawn(db, "--burst", "-c", "1", "--path", str(tmp_path))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert worker.wait(60) == 0
    assert task.progress().finished
    rows = {line.split("|")[0]: line.strip().split("|")[1:] for line in lines(log_path) if "|" in line}
    forked, new = rows["forked"], rows["new"]
    assert forked[0] != new[0]  # the crash replaced the process
    assert forked[1] == "click" and new[1] == ""
    assert forked[2:] == new[2:]
    assert new[2] == "['-c']" and new[5:7] == ["[]", "30"] and new[7] == "True"
    assert new[4] == str(sorted(["__annotations__", "__builtins__", "__doc__", "__loader__", "__name__",
                                 "__package__", "__spec__"]))
    assert new[10].startswith("litemultistep job process (worker ")  # not its worker's command line
    assert new[9] == str(["SIG_IGN", "_ignore", "_ignore", "SIG_DFL", "SIG_DFL",
                          "SIG_IGN", "SIG_IGN"])


def test_peewee_alone_leaves_the_drivers_importable():
    """What `litemultistep worker` on a SQLite file does: peewee without psycopg, which stays
    importable for whoever needs it later."""
    code = ("import sys; from litemultistep.sqlite import import_peewee_alone; import_peewee_alone(); "
            "import peewee; assert 'psycopg' not in sys.modules and peewee.psycopg is None; "
            "import psycopg; print('ok')")
    pytest.importorskip("psycopg", reason="this test needs psycopg: pip install -e '.[test,postgres]'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_job_killed_at_its_limit_inside_a_batch_runs_no_finished_job_again(db, log_path, spawn):
    # jobs of 10 ms travel in batches of several: a sleeper killed at its limit after some of its
    # batch finished must not send those back to run again (they succeeded)
    with MultiStepTask.create("batched", db=db, timeout=0.5) as task:
        for i in range(60):
            task.add_job(jobfuncs.paced_record, log_path, f"q{i}")
            if i % 6 == 5:
                task.add_job(jobfuncs.slow_record, log_path, f"s{i}", 3)
    worker = spawn(db, "-c", "1", "--burst")
    assert worker.wait(120) == 0, spawn.log(worker)
    runs = collections.Counter(line.split()[0] for line in lines(log_path) if line.startswith("q"))
    assert len(runs) == 60 and set(runs.values()) == {1}, {tag: n for tag, n in runs.items() if n > 1}
    p = task.progress()
    assert (p.completed_count, p.failed_count) == (60, 10)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(k) for k in f.read().split()]


def test_a_stop_signal_while_the_worker_starts_stops_it_cleanly(tmp_path, log_path, spawn):
    db = str(tmp_path / "starting.sqlite")  # SQLite: a write lock held here keeps it from registering
    with MultiStepTask.create("waiting", db=db) as task:
        task.add_job(jobfuncs.record, log_path, "job")
    holder = sqlite3.connect(db)
    holder.execute("BEGIN IMMEDIATE")  # the worker cannot register until this ends
    try:
        worker = spawn(db, "-c", "2")
        wait_for(lambda: len(_children(worker.pid)) == 2, what="its job processes to start")
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        holder.rollback()
        holder.close()
    assert worker.wait(30) == 0, spawn.log(worker)  # it stopped as asked, not killed by the signal
    assert "got SIGTERM; exiting" in spawn.log(worker) and "Traceback" not in spawn.log(worker)
    assert task.progress().pending_count == 1  # never started: still queued for the next worker


def _watches(pid: int) -> bool:
    """Whether process ``pid`` holds an inotify instance."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return "anon_inode:inotify" in links


def test_a_burst_worker_looks_for_new_work_without_watching_the_file(db, log_path, spawn):
    # A --burst worker looks every --poll seconds rather than holding an inotify watch, whose removal
    # at exit waits for a kernel grace period; it still takes work added while it runs.
    with MultiStepTask.create("long", db=db) as long:
        long.add_job(jobfuncs.slow_record, log_path, "long", 3.0)
    burst = spawn(db, "--burst", "-c", "2")
    wait_for(lambda: started(log_path, "long"), what="the long job to start")
    if not is_pg(db):
        assert not _watches(burst.pid)
    with MultiStepTask.create("late", db=db) as late:
        late.add_job(jobfuncs.record, log_path, "late")
    wait_for(lambda: "late" in [line.split()[0] for line in lines(log_path)], timeout=2.5,
             what="the job added during the burst to run beside the long one")
    assert "end long" not in " ".join(lines(log_path))
    assert burst.wait(30) == 0
    assert long.progress().finished and late.progress().finished
    if not is_pg(db):
        steady = spawn(db)
        wait_for(lambda: _watches(steady.pid), what="a worker that keeps running to watch the -wal")
        steady.send_signal(signal.SIGTERM)
        assert steady.wait(30) == 0


def test_a_worker_started_with_sigchld_ignored_still_learns_how_children_end(db, log_path, spawn):
    # With SIGCHLD ignored the kernel reaps children unasked: neither the worker (how its job process
    # died) nor a job (subprocess.run) could learn their exit status.
    with MultiStepTask.create("children", db=db) as task:
        task.add_job(jobfuncs.run_a_child, log_path, "child")
        task.add_job(jobfuncs.exit_hard)
        task.add_job(jobfuncs.run_a_child, log_path, "after")
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        worker = spawn(db, "--burst", "-c", "1", "--max-crashes", "1")
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert worker.wait(60) == 0
    assert sorted(line.strip() for line in lines(log_path)) == ["after 5", "child 5"]
    [failure] = task.failures()
    assert "exit code 1" in failure.message


def test_job_processes_of_either_kind_run_with_the_workers_interpreter_options(db, log_path, tmp_path):
    # -O skips asserts in the worker's forked job processes: in a replacement too, not only there
    with MultiStepTask.create("flags", db=db) as task:
        task.add_job(jobfuncs.record_flags, log_path, "forked")
        task.add_job(jobfuncs.exit_hard)
        task.add_job(jobfuncs.record_flags, log_path, "new")
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen([sys.executable, "-O", "-X", "dev", "-m", "litemultistep", "worker", db,
                                   "--burst", "-c", "1", "--max-crashes", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env_for_workers(), start_new_session=True)
    try:
        assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    assert sorted(line.strip() for line in lines(log_path)) == ["forked 1 True", "new 1 True"]


def test_a_worker_with_its_output_closed_runs_its_jobs(db, log_path):
    # Started with standard descriptors closed, the worker opens /dev/null on them: else a pipe to a
    # job process took their numbers, and a job writing to them, or pointing them elsewhere, broke it.
    closings = (">&-", "2>&-", "<&- >&- 2>&-")
    for i, closing in enumerate(closings):
        with MultiStepTask.create("closed", db=db) as task:
            task.add_job(jobfuncs.print_everywhere, log_path, f"printed{i}")
            task.add_job(jobfuncs.silence_stderr, log_path, f"silenced{i}")
        done = subprocess.run(["sh", "-c", f'exec "$0" worker "$1" --burst -c 1 {closing}', LMS, db],
                              env=env_for_workers(), timeout=60, start_new_session=True)
        assert done.returncode == 0, closing
        assert task.progress().completed_count == 2, closing
    ran = [line.split()[0] for line in lines(log_path)]
    assert ran == [f"{what}{i}" for i in range(len(closings)) for what in ("printed", "silenced")]  # each once


def test_a_worker_started_in_a_deleted_directory_says_so(db, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(["sh", "-c", 'cd "$2" && rmdir "$2" && exec "$0" worker "$1" --burst', LMS, db, str(gone)],
                          env=env_for_workers(), timeout=60, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("Error: the current directory no longer exists (it was deleted): start the "
                                   "worker from one that does")
