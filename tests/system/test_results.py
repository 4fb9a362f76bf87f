"""Job results for the finalizers (``keep_results=True``), with real workers, on both backends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import jobfuncs
import pytest
from conftest import cli, env_for_workers, lines, wait_for

import litemultistep
from litemultistep import MultiStepTask, NoResult, NoSuchMultiStepTask, ResultNotSerializable, views
from litemultistep.config import resolve_db
from litemultistep.engine import check
from litemultistep.runner import drain

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(any_db: str) -> str:
    return any_db


def strict_json(text: str) -> dict:
    """JSON as a strict parser reads it: ``Infinity`` and ``NaN`` are not JSON."""

    def refuse(word: str) -> None:
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def gathered(tmp_path) -> dict:
    return json.loads((tmp_path / "gathered.json").read_text())


def test_the_finalizer_gets_every_result_in_add_order_from_two_workers(db, log_path, tmp_path, spawn):
    with MultiStepTask.create("gather", db=db, keep_results=True) as task:
        handles = [task.add_job(jobfuncs.double, log_path, i) for i in range(200)]
        task.add_finalization_job(jobfuncs.gather, str(tmp_path / "gathered.json"))
    workers = [spawn(db, "-c", "2", "--burst", "-q"), spawn(db, "-c", "1", "--burst", "-q")]
    assert [w.wait(60) for w in workers] == [0, 0]
    got = gathered(tmp_path)
    assert got["values"] == [2 * i for i in range(200)]
    assert got["details"] == [[h.job_id, [log_path, i], 2 * i] for i, h in enumerate(handles)]
    assert len({line.split()[1] for line in lines(log_path)}) == 200
    assert task.progress().finished
    with pytest.raises(NoSuchMultiStepTask, match="results go with it"):
        list(task.results())  # gone with the task, as the gem's finished tasks are


def test_a_job_killed_after_it_ran_runs_again_and_its_result_appears_once(db, log_path, tmp_path, spawn):
    with MultiStepTask.create("crash", db=db, keep_results=True) as task:
        for i in range(5):
            task.add_job(jobfuncs.double, log_path, i)
        task.add_finalization_job(jobfuncs.gather, str(tmp_path / "gathered.json"))
    crash_file = tmp_path / "crash"
    crash_file.write_text("after-run jobfuncs:double worker\n")
    first = spawn(db, "-q", env=dict(env_for_workers(), LITEMULTISTEP_CRASH_FILE=str(crash_file)))
    assert first.wait(60) == -signal.SIGKILL  # its result was never recorded
    assert spawn(db, "--burst", "-q").wait(60) == 0
    runs = [line.split()[1] for line in lines(log_path)]
    assert len(runs) == 6 and len(set(runs)) == 5  # one job ran twice
    assert gathered(tmp_path)["values"] == [0, 2, 4, 6, 8]


def test_results_survive_a_retry(db, tmp_path, spawn):
    with MultiStepTask.create("retry", db=db, keep_results=True) as task:
        flaky = task.add_job(jobfuncs.double_after_failing_once, str(tmp_path / "marker"), 21)
        task.add_job(jobfuncs.double_after_failing_once, str(tmp_path / "other-marker"), 1)
        task.add_finalization_job(jobfuncs.gather, str(tmp_path / "gathered.json"))
    assert spawn(db, "--burst", "-q").wait(60) == 0
    assert task.progress().result_count == 0 and len(task.failures()) == 2  # a failed attempt keeps none
    with pytest.raises(NoResult, match="it is failed"):
        flaky.result()
    assert flaky.failure() is not None and flaky.failure().exc_type == "ValueError"
    assert task.retry_failed() == 2
    assert spawn(db, "--burst", "-q").wait(60) == 0
    assert gathered(tmp_path)["values"] == [42, 2]
    assert flaky.failure() is None
    with pytest.raises(NoResult, match="no longer stored"):
        flaky.result()  # the task finished: its results went with it


def test_results_are_readable_while_the_task_lives(db, tmp_path, spawn):
    with MultiStepTask.create("live", db=db, keep_results=True) as task:
        handles = [task.add_job(jobfuncs.double_after_failing_once, str(tmp_path / f"m{i}"), i) for i in range(3)]
        handles.append(task.add_job(jobfuncs.double, str(tmp_path / "log"), 10))
    assert spawn(db, "--burst", "-q").wait(60) == 0
    # three failed once (no retries): the task is blocked, and the one that succeeded has its result
    assert list(task.results()) == [20] and handles[3].result() == 20
    assert task.progress().result_count == 1 and task.progress().blocked
    doc = json.loads(cli("status", db, task.task_id, "--json").stdout)["task"]
    assert doc["keep_results"] is True and doc["result_count"] == 1
    task.retry_failed()
    assert spawn(db, "--burst", "-q").wait(60) == 0
    assert task.progress().finished
    assert check(resolve_db(db)) == []


def test_a_return_value_json_cannot_carry_fails_the_job_clearly(db, spawn):
    with MultiStepTask.create("bad", db=db, keep_results=True) as task:
        bad = task.add_job(jobfuncs.returns_a_set)
    assert spawn(db, "--burst", "-q").wait(60) == 0
    failure = bad.failure()
    assert failure is not None and failure.exc_type == "litemultistep.ResultNotSerializable"
    assert "of type set" in failure.message and "return a sorted list" in failure.message


def test_an_int_too_long_for_json_fails_the_job_at_once_in_a_worker_and_inline(db, spawn):
    with MultiStepTask.create("huge", db=db, keep_results=True) as task:
        huge = task.add_job(jobfuncs.returns_a_huge_int)
    worker = spawn(db, "--burst")
    assert worker.wait(60) == 0
    failure = huge.failure()
    assert failure is not None and failure.exc_type == "litemultistep.ResultNotSerializable"
    assert failure.attempt == 1  # failed as it returned: no job process died over it
    assert "the return value['n'][0] is an int of more than 4,300 digits" in failure.message
    assert "return it as a string of digits" in failure.message
    assert " died " not in spawn.log(worker) and "Traceback" not in spawn.log(worker)
    litemultistep.configure(mode="sync")
    inline = MultiStepTask.create("inline", db=db, keep_results=True)
    with pytest.raises(ResultNotSerializable, match="is an int of more than 4,300 digits"):
        inline.add_job(jobfuncs.returns_a_huge_int)
    p = inline.progress()
    assert (p.failed_count, p.running_count, p.completed_count) == (1, 0, 0)  # recorded, not left running


def test_nothing_a_job_returns_or_raises_stops_its_failure_being_recorded(db, spawn):
    with MultiStepTask.create("hostile", db=db, keep_results=True) as task:
        unprintable = task.add_job(jobfuncs.returns_an_unprintable)
        badly_named = task.add_job(jobfuncs.raises_a_badly_named_exception)
    worker = spawn(db, "--burst")
    assert worker.wait(60) == 0, spawn.log(worker)
    failure = unprintable.failure()
    assert failure is not None and failure.exc_type == "litemultistep.ResultNotSerializable"
    assert "the return value[1] is of type _Unprintable (its repr() raised RuntimeError)" in failure.message
    failure = badly_named.failure()
    assert failure is not None and failure.exc_type == "jobfuncs.Badly\\udcffNamed"
    assert failure.message == "named badly" and failure.attempt == 1


# The peak is read from /proc (VmHWM, of this process's own memory): getrusage's ru_maxrss keeps, across
# exec, the peak of the process that forked it (a test runner that has grown big).
READ_BIG_RESULTS = """
import json, sys
from litemultistep import MultiStepTask

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024

task = MultiStepTask.find(sys.argv[1], db=sys.argv[2])
first = None
values = []
for value in task.results():
    if first is None:  # as a finalizer that looks at the first result
        first = peak_mb()
    values.append(value[:6] if len(value) == 6 + 2**20 else "bad length")
details = [(r.job_id, r.args[0], r.value[:6]) for r in task.job_results()]
print(json.dumps({"first": first, "peak": peak_mb(), "values": values, "details": details}))
"""


def test_big_results_stream_in_pages_bounded_by_size(db, spawn):
    task = MultiStepTask.create("big", db=db, keep_results=True)  # not finalizable: the results stay
    handles = [task.add_job(jobfuncs.big_result, i, 2**20) for i in range(400)]
    assert spawn(db, "--burst", "-q").wait(120) == 0
    assert task.progress().result_count == 400
    done = subprocess.run([sys.executable, "-c", READ_BIG_RESULTS, task.task_id, db], capture_output=True, text=True,
                          timeout=120, env=env_for_workers())
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["values"] == [f"{i:06d}" for i in range(400)]  # all 400, each once, in the order added
    assert got["details"] == [[h.job_id, i, f"{i:06d}"] for i, h in enumerate(handles)]
    # 400 MiB of results, read a few MiB at a time (all of them at once took 1.2 GB)
    assert got["first"] < 150 and got["peak"] < 200, {k: got[k] for k in ("first", "peak")}


def test_results_of_mixed_sizes_come_whole_and_in_order_across_pages(db, monkeypatch):
    sizes = [(i * 7919) % 2500 if i % 3 else i % 50 for i in range(90)]  # small ones, big ones, one over a page
    task = MultiStepTask.create("mixed", db=db, keep_results=True)
    for i, size in enumerate(sizes):
        task.add_job(jobfuncs.big_result, i, size)
    drain(resolve_db(db))
    expected = [f"{i:06d}" + "x" * size for i, size in enumerate(sizes)]
    monkeypatch.setattr(views, "RESULTS_PAGE", 13)  # pages of at most 13 results and about 2,000 bytes
    monkeypatch.setattr(views, "RESULTS_PAGE_BYTES", 2000)
    assert list(task.results()) == expected
    assert [(r.args, r.value) for r in task.job_results()] == [([i, size], expected[i]) for i, size in
                                                                enumerate(sizes)]


def test_without_keep_results_nothing_is_stored(db, log_path, spawn):
    with MultiStepTask.create("plain", db=db) as task:
        handle = task.add_job(jobfuncs.double, log_path, 1)
        task.add_job(jobfuncs.double, log_path, 2)
    with pytest.raises(NoResult, match="keep_results=True"):
        list(task.results())
    assert spawn(db, "--burst", "-q").wait(60) == 0
    with pytest.raises(NoResult, match="no longer stored"):
        handle.result()


def test_drain_and_sync_mode_keep_results_too(db, log_path, tmp_path):
    with MultiStepTask.create("drained", db=db, keep_results=True) as task:
        for i in range(4):
            task.add_job(jobfuncs.double, log_path, i)
        task.add_finalization_job(jobfuncs.gather, str(tmp_path / "gathered.json"))
    summary = drain(resolve_db(db))
    assert summary.results == {task.task_id: [0, 2, 4, 6]}
    assert gathered(tmp_path)["values"] == [0, 2, 4, 6]
    litemultistep.configure(mode="sync")
    t = MultiStepTask.create("sync", db=db, keep_results=True)
    assert t.add_job(jobfuncs.double, log_path, 5).result() == 10
    with pytest.raises(ResultNotSerializable):
        t.add_job(jobfuncs.returns_a_set)


def test_keep_results_must_be_a_bool(db):
    with pytest.raises(litemultistep.InvalidSetting, match="keep_results"):
        MultiStepTask.create("x", db=db, keep_results="yes")


def test_a_job_reports_its_progress_and_status_shows_it(db, log_path, spawn):
    with MultiStepTask.create("report", db=db) as task:
        task.add_job(jobfuncs.reporting, log_path, 120, 0.05)  # 6 s: the worker stores reports every 2 s
    worker = spawn(db, "-q")
    seen = []

    def reported() -> bool:
        doc = json.loads(cli("status", db, task.task_id, "--json").stdout)
        seen.extend((r["reported_done"], r["reported_total"]) for r in doc["running"])
        return any(done and total == 120 for done, total in seen)

    wait_for(reported, timeout=30, what="a report in status --json")
    assert task.progress().reported_total == 120 or task.progress().finished
    text = cli("status", db, task.task_id).stdout
    assert "reports" in text or task.progress().finished
    wait_for(lambda: task.progress().finished, timeout=30, what="the task to finish")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_report_inline_outside_a_job_and_bad_values(db, log_path):
    with pytest.raises(litemultistep.NotInJob, match="report"):
        litemultistep.report(1)
    litemultistep.configure(mode="sync")
    task = MultiStepTask.create("inline", db=db)
    task.add_job(jobfuncs.report_and_look, log_path)
    assert lines(log_path) == ["3.0 10.0"]
    with pytest.raises(litemultistep.InvalidSetting, match="more than total"):
        task.add_job(jobfuncs.report_badly)


def test_absurd_reports_are_refused_and_status_json_stays_strict(db, log_path, tmp_path, spawn):
    marker = tmp_path / "stop"
    with MultiStepTask.create("huge", db=db) as task:
        for _ in range(2):
            task.add_job(jobfuncs.report_huge, log_path, str(marker))
    worker = spawn(db, "-c", "2", "-q")
    seen: list[dict] = []

    def both_reported() -> bool:
        r = cli("status", db, "--json")
        assert r.returncode == 0, r.stderr
        seen[:] = strict_json(r.stdout)["tasks"]
        return seen[0]["reported_done"] == 2 * 10**15

    wait_for(both_reported, timeout=30, what="both jobs' reports in status --json")
    assert seen[0]["reported_total"] == 2 * 10**15 and seen[0]["running_count"] == 2
    assert lines(log_path) == ["refused: report(): done must be a number from 0 to 10**15, not 1e+308"] * 2
    assert task.progress().reported_done == 2e15
    marker.touch()
    wait_for(lambda: task.progress().finished, timeout=30, what="the task to finish")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
