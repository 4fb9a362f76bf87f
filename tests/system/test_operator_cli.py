"""The operator's view, with real `litemultistep worker` processes and the real command, on SQLite
files and on PostgreSQL: failures grouped and filtered, failures in the worker's log, a finished
task's summary."""

from __future__ import annotations

import json
import re

import jobfuncs
import pytest
from conftest import cli

from litemultistep import MultiStepTask

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(any_db: str) -> str:
    return any_db


def json_out(*args: str) -> dict:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_failed_groups_filters_and_limits(db, tmp_path):
    with MultiStepTask.create("bad", db=db) as bad:
        for _ in range(20):
            bad.add_job(jobfuncs.boom, "missing column")
        bad.add_job(jobfuncs.exit_job)
    with MultiStepTask.create("good", db=db, max_retries=2, retry_delay=0.01) as good:
        good.add_job(jobfuncs.fail_times, str(tmp_path / "counter"), 2)
    burst = cli("worker", db, "-c", "2", "--burst", "-q")
    assert burst.returncode == 0, burst.stderr
    groups = json_out("failed", db, "--group", "--json")["groups"]
    assert [(g["exc_type"], g["message"], g["count"]) for g in groups] == [
        ("RuntimeError", "missing column", 20), ("SystemExit", "3", 1)]
    assert len(groups[0]["job_ids"]) == 5 and groups[0]["first_failed_at"] <= groups[0]["last_failed_at"]
    assert json_out("failed", db, "--group", "--json", "--limit", "1")["groups"] == groups[:1]
    assert json_out("failed", db, "--group", "--json", "--exc-type", "SystemExit")["groups"] == groups[1:]
    doc = json_out("failed", db, "--exc-type", "RuntimeError", "--limit", "5", "--json")
    assert set(doc) == {"failures", "scheduled"} and len(doc["failures"]) == 5
    assert {f["exc_type"] for f in doc["failures"]} == {"RuntimeError"}
    assert json_out("failed", db, "--exc-type", "NoSuchError", "--json")["failures"] == []
    text = cli("failed", db, "--group").stdout.splitlines()
    assert text[0] == "20 jobs  RuntimeError: missing column"
    assert text[2] == "1 job  SystemExit: 3"
    # the finished task's summary: two failed attempts, then its success
    [finished] = json_out("status", db, "--json")["finished"]
    assert finished["task_id"] == good.task_id
    assert finished["failed_attempts"] == 2
    assert finished["duration"] == pytest.approx(finished["finished_at"] - finished["created_at"])
    assert cli("failed", db, "--limit", "0").returncode == 2


def test_each_failed_attempt_is_in_the_log_of_a_quiet_worker(db):
    with MultiStepTask.create("flaky", db=db, max_retries=1, retry_delay=0.2) as task:
        task.add_job(jobfuncs.boom, "no luck\nsecond line")
    burst = cli("worker", db, "--burst", "-q")
    assert burst.returncode == 0
    [job_id] = [f.job_id for f in task.failures()]
    log = burst.stderr.splitlines()
    warning = [line for line in log if " WARNING " in line]
    error = [line for line in log if " ERROR " in line]
    assert len(warning) == 1 and len(error) == 1, burst.stderr
    call = "jobfuncs:boom[[\"no luck\\nsecond line\"],{}]"
    assert (f"task {task.task_id}: job {job_id} failed, attempt 1 of 2: {call}: "
            "RuntimeError: no luck\\nsecond line; next attempt in 0.2 s (at ") in warning[0]
    assert (f"task {task.task_id}: job {job_id} failed, attempt 2 of 2: {call}: RuntimeError: "
            f"no luck\\nsecond line; no retries left (`litemultistep retry DB {job_id}` runs it again)") in error[0]
    assert " INFO " not in burst.stderr and "Traceback" not in burst.stderr
    # -v adds each attempt's traceback; the start and end of every job name it and its attempt
    with MultiStepTask.create("verbose", db=db) as again:
        again.add_job(jobfuncs.boom, "loud")
        again.add_finalization_job(jobfuncs.noop)
    verbose = cli("worker", db, "--burst", "-v", "--queues", "verbose~*")
    [job_id] = [f.job_id for f in again.failures()]
    assert f"task {again.task_id}: job {job_id}: traceback of attempt 1:\n" in verbose.stderr
    assert 'raise RuntimeError(message)' in verbose.stderr
    assert f"start job {job_id} of {again.task_id} (attempt 1): jobfuncs:boom" in verbose.stderr
    assert f"failed job {job_id} of {again.task_id} (attempt 1) after " in verbose.stderr
    with MultiStepTask.create("finalized", db=db) as done:
        done.add_finalization_job(jobfuncs.noop)
    loud = cli("worker", db, "--burst", "-v", "--queues", "finalized~*")
    start = re.search(rf" DEBUG .* start finalizer (\d+) of {re.escape(done.task_id)} \(attempt 1\): jobfuncs:noop",
                      loud.stderr)
    assert start, loud.stderr
    assert re.search(rf" DEBUG .* done finalizer {start.group(1)} of {re.escape(done.task_id)} \(attempt 1\) in ",
                     loud.stderr)
    # by default, no line a job (it would cost more than short jobs do): a line of what ran, by task
    with MultiStepTask.create("summed", db=db) as summed:
        for i in range(5):
            summed.add_job(jobfuncs.noop, i)
    plain = cli("worker", db, "--burst", "--queues", "summed~*")
    assert " start job " not in plain.stderr and " done job " not in plain.stderr
    summary = rf" INFO .* ran 5 job\(s\) in \d+ s: {re.escape(summed.task_id)}: 5 done"
    assert re.search(summary, plain.stderr), plain.stderr
