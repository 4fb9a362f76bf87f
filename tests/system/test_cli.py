"""The `litemultistep` command, run as a user runs it, on databases made by real tasks and workers: on
SQLite files and on PostgreSQL (the tests taking ``db``)."""

from __future__ import annotations

import json
import sqlite3

import jobfuncs
import pytest
from conftest import cli, lines

from litemultistep import MultiStepTask, NoSuchMultiStepTask
from litemultistep.cli import main
from litemultistep.config import resolve_db
from litemultistep.runner import drain

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db(any_db: str) -> str:
    return any_db


@pytest.fixture
def tasks(db, log_path, tmp_path):
    """An active task, a blocked one (one failure), and a finished one."""
    with MultiStepTask.create("alpha", db=db) as alpha:
        for i in range(3):
            alpha.add_job(jobfuncs.record, log_path, f"a{i}")
        alpha.add_finalization_job(jobfuncs.record, log_path, "FA")
    with MultiStepTask.create("done", db=db) as done:
        done.add_job(jobfuncs.record, log_path, "d")
    drain(resolve_db(db), queues=["done~*"])
    with MultiStepTask.create("beta", db=db) as beta:
        beta.add_job(jobfuncs.fail_once, str(tmp_path / "marker"), "first attempt fails on purpose")
        beta.add_finalization_job(jobfuncs.record, log_path, "FB")
    drain(resolve_db(db), queues=["beta~*"])
    return alpha, beta, done


def json_out(*args: str) -> dict:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class TestStatus:
    def test_status_json_lists_active_and_finished(self, db, tasks):
        alpha, beta, done = tasks
        doc = json_out("status", db, "--json")
        by_id = {t["task_id"]: t for t in doc["tasks"]}
        assert set(by_id) == {alpha.task_id, beta.task_id}
        assert by_id[alpha.task_id]["total_job_count"] == 4
        assert by_id[alpha.task_id]["state"] == "running"
        assert by_id[beta.task_id]["state"] == "blocked" and by_id[beta.task_id]["failed_count"] == 1
        assert [t["task_id"] for t in doc["finished"]] == [done.task_id]
        assert doc["finished"][0]["state"] == "finished"

    def test_status_of_one_task(self, db, tasks):
        _, beta, _ = tasks
        doc = json_out("status", db, beta.task_id, "--json")
        assert doc["task"]["task_id"] == beta.task_id and doc["task"]["total_job_count"] == 2
        assert [f["state"] for f in doc["finalizers"]] == ["waiting"]
        assert doc["failures"][0]["message"] == "first attempt fails on purpose"

    def test_status_table(self, db, tasks):
        alpha, beta, done = tasks
        result = cli("status", db)
        assert result.returncode == 0
        assert alpha.task_id in result.stdout and beta.task_id in result.stdout
        assert f"{done.task_id}\tfinished" in result.stdout
        assert f"{beta.task_id}\tblocked" in result.stdout

    def test_status_of_one_task_text(self, db, tasks):
        _, beta, _ = tasks
        result = cli("status", db, beta.task_id)
        assert "blocked" in result.stdout and "first attempt fails on purpose" in result.stdout

    def test_unknown_task(self, db, tasks):
        result = cli("status", db, "nope~1")
        assert result.returncode == 1
        assert "no task 'nope~1'" in result.stderr and "Traceback" not in result.stderr

    def test_missing_database_is_not_created(self, tmp_path):
        path = tmp_path / "absent.sqlite"
        result = cli("status", str(path))
        assert result.returncode == 1 and "never creates one" in result.stderr
        assert not path.exists()

    def test_another_programs_database(self, tmp_path):
        path = tmp_path / "other.sqlite"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
        result = cli("status", str(path), "--json")
        assert result.returncode == 1 and "another program" in result.stderr and result.stdout == ""

    def test_database_from_environment(self, db, tasks):
        import os
        env = dict(os.environ, LITEMULTISTEP_DB=db)
        result = cli("status", "--json", env=env)
        assert result.returncode == 0 and json.loads(result.stdout)["database"] == db


class TestFailedAndRetry:
    def test_failed_json_carries_the_message_verbatim(self, db, tasks):
        doc = json_out("failed", db, "--json")
        [failure] = doc["failures"]
        assert failure["message"] == "first attempt fails on purpose"
        assert failure["exc_type"] == "ValueError" and failure["attempt"] == 1
        assert "Traceback" in failure["traceback"]

    def test_failed_text_with_traceback(self, db, tasks):
        result = cli("failed", db, "--traceback")
        assert "ValueError: first attempt fails on purpose" in result.stdout
        assert "Traceback (most recent call last)" in result.stdout

    def test_retry_all_then_the_finalizer_runs(self, db, tasks, log_path, spawn):
        _, beta, _ = tasks
        result = cli("retry", db, "--all", "--json")
        assert result.returncode == 0
        assert len(json.loads(result.stdout)["retried"]) == 1
        proc = spawn(db, "--burst", "--queues", "beta~*")
        assert proc.wait(60) == 0
        assert "FB" in [line.split()[0] for line in lines(log_path)]
        assert beta.progress().finished

    def test_retry_by_job_id_and_task(self, db, tasks):
        _, beta, _ = tasks
        [failure] = json_out("failed", db, "--json")["failures"]
        assert cli("retry", db, str(failure["job_id"])).stdout.startswith("Requeued 1 job: ")
        result = cli("retry", db, "--task", beta.task_id)
        assert result.returncode == 0 and "No failed jobs to retry" in result.stdout

    def test_retry_errors(self, db, tasks):
        for args, message in ((["999999"], "no job 999999"),
                              (["--task", "nope~1"], "no task 'nope~1'"),
                              ([], "name what to retry")):
            result = cli("retry", db, *args)
            assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
        job_id = resolve_db(db).connection().execute("SELECT id FROM job WHERE state = 1 LIMIT 1").fetchone()[0]
        result = cli("retry", db, str(job_id))
        assert result.returncode == 1 and "has not failed (it is queued)" in result.stderr


class TestWatch:
    def test_watch_finished_task_exits_0(self, db, tasks):
        _, _, done = tasks
        result = cli("watch", db, done.task_id)
        assert result.returncode == 0 and "finished" in result.stdout

    def test_watch_blocked_task_exits_1_with_failures(self, db, tasks):
        _, beta, _ = tasks
        result = cli("watch", db, beta.task_id)
        assert result.returncode == 1
        assert "first attempt fails on purpose" in result.stdout and "litemultistep retry" in result.stdout

    def test_watch_timeout_exits_2(self, db, tasks):
        alpha, _, _ = tasks
        result = cli("watch", db, alpha.task_id, "--timeout", "0.3")
        assert result.returncode == 2 and "did not finish within" in result.stderr

    def test_watch_follows_a_running_task(self, db, tasks, spawn):
        alpha, _, _ = tasks
        proc = spawn(db, "--queues", "alpha~*")
        try:
            result = cli("watch", db, alpha.task_id, "--interval", "0.05")
            assert result.returncode == 0, result.stderr
            assert "4 done" in result.stderr
        finally:
            proc.terminate()
            proc.wait(30)


class TestWorkersNukeCheck:
    def test_workers_json(self, db, tasks, spawn):
        from conftest import wait_for
        def process_workers() -> list[dict]:
            # this test process is listed too, as an "inline" runner: it drained jobs in the fixture
            return [w for w in json_out("workers", db, "--json")["workers"] if w["kind"] == "process"]

        proc = spawn(db, "--queues", "nothing")
        wait_for(process_workers, what="the worker to register")
        [w] = process_workers()
        assert w["pid"] == proc.pid and w["alive"] and w["queues"] == "nothing"
        proc.terminate()
        assert proc.wait(30) == 0
        assert process_workers() == []

    def test_nuke_asks_first(self, db, tasks):
        alpha, _, _ = tasks
        result = cli("nuke", db, alpha.task_id, input="n\n")
        assert result.returncode == 1 and alpha.progress().state == "running"
        result = cli("nuke", db, alpha.task_id, "--yes")
        assert result.returncode == 0
        assert alpha.task_id not in json.dumps(json_out("status", db, "--json"))

    def test_nuke_unknown_and_finished(self, db, tasks):
        _, _, done = tasks
        assert "no task" in cli("nuke", db, "x~y", "--yes").stderr
        result = cli("nuke", db, done.task_id, "--yes")
        assert result.returncode == 0 and "Removed the summary of finished task" in result.stdout
        assert done.task_id not in json.dumps(json_out("status", db, "--json"))
        assert "no task" in cli("nuke", db, done.task_id, "--yes").stderr

    def test_check_clean_database(self, db, tasks):
        assert json_out("check", db, "--json") == {"ok": True, "found": 0, "repaired": 0, "problems": []}
        assert cli("check", db).stdout.strip().endswith(": ok")

    def test_check_finds_and_repairs_drifted_counters_and_dead_claims(self, db, tasks):
        alpha, _, _ = tasks
        with resolve_db(db).write() as conn:
            conn.execute("UPDATE task SET completed_count = completed_count + 5 WHERE task_id = ?", (alpha.task_id,))
            # a claim by a worker that never existed: as if it died without a trace
            conn.execute("UPDATE job SET state = 2, worker = 424242 WHERE id = "
                         "(SELECT min(id) FROM job WHERE state = 1)")
        result = cli("check", db, "--json")
        assert result.returncode == 1
        kinds = {p["kind"] for p in json.loads(result.stdout)["problems"]}
        assert {"counters", "dead-claims"} <= kinds
        result = cli("check", db, "--repair")
        assert result.returncode == 0 and "repaired" in result.stdout
        assert json_out("check", db, "--json")["ok"]


class TestHelpAndMain:
    def test_help_lists_commands_and_env_vars(self):
        result = cli("--help")
        for name in ("worker", "status", "watch", "failed", "retry", "workers", "nuke", "check"):
            assert name in result.stdout
        assert "LITEMULTISTEP_CONCURRENCY" in cli("worker", "--help").stdout

    def test_main_as_a_function(self, db, tasks, capsys):
        assert main(["status", db, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["database"] == db
        assert main(["retry", db]) == 2

    def test_bad_option(self, db):
        result = cli("worker", db, "-c", "0")
        assert result.returncode == 2 and "Invalid value" in result.stderr and "Traceback" not in result.stderr


def test_ids_that_no_task_or_job_can_have_are_errors_not_tracebacks(db):
    MultiStepTask.create("ids", db=db)
    for job_id in ("99999999999999999999999", "9223372036854775808", "1" + "0" * 5000):  # over 64 bits
        r = cli("retry", db, job_id)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "no job" in r.stderr and "job ids go up to 9223372036854775807" in r.stderr
    r = cli("retry", db, "9223372036854775807")
    assert r.returncode == 1 and "no job 9223372036854775807: no job ever had that id" in r.stderr
    r = cli("retry", db, "\u00b2")  # "²".isdigit() is true, but it is no job id
    assert r.returncode == 2 and "a job id is a whole number" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(NoSuchMultiStepTask, match="never holds a NUL character"):
        MultiStepTask.find("a\x00b", db=db)


@pytest.mark.parametrize("command", [["status"], ["workers"], ["worker", "--burst"]])
def test_an_unknown_url_scheme_is_named_as_such(command):
    out = cli(command[0], "mysql://u@h/db", *command[1:])
    # a reading command's mistake exits 1; a worker that cannot work, 2 (docs/cli.md)
    assert out.returncode == (2 if command[0] == "worker" else 1) and "Traceback" not in out.stderr, out.stderr
    assert "unknown database URL scheme 'mysql'" in out.stderr, out.stderr
    assert "directory" not in out.stderr, out.stderr  # not taken for a file path
