"""The operator's view, with real `litemultistep worker` processes and the real command, on SQLite
files and on PostgreSQL: failures grouped and filtered, failures in the worker's log, a finished
task's summary."""

from __future__ import annotations

import json

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
    assert finished["failed_attempts"] == 2 and finished["duration"] > 0
    assert cli("failed", db, "--limit", "0").returncode == 2
