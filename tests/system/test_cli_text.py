"""The command tells the truth about any text and any state: user text comes back verbatim (piped,
and in a real pseudo-terminal), exit codes and JSON agree, looking changes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import time

import jobfuncs
import pytest
from conftest import LMS, cli, env_for_workers, lines, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from litemultistep import MultiStepTask, views
from litemultistep.cli import main
from litemultistep.config import resolve_db
from litemultistep.runner import drain

pytestmark = pytest.mark.timeout(300)

NASTY_SLUG = "[bold]report :ok: [/x] <script>alert(1)</script> \"q\" 'q' \\n emoji 🎉"
NASTY_MESSAGE = "[/bad] :ok: [red]red[/] \x1b[31mescape\x1b[0m\ttab\nsecond line \u202eRTL\u202c " + "long " * 200


def run(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process, piped: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def failing_task(db: str, slug: str, message: str) -> MultiStepTask:
    with MultiStepTask.create(slug, db=db) as task:
        task.add_job(jobfuncs.boom, message)
        task.add_job(jobfuncs.noop)
    drain(resolve_db(db), queues=[glob_escape(task.task_id)])
    return task


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


slugs = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="~"), min_size=1,
                max_size=200).filter(lambda s: s.isprintable())
messages = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slug=slugs, message=messages)
def test_any_slug_and_message_come_back_verbatim_when_piped(tmp_path_factory, slug, message):
    db = str(tmp_path_factory.mktemp("text") / "t.sqlite")
    task = failing_task(db, slug, message)
    tid = task.task_id
    # "--" before a task id: a slug may start with "-", as any command-line argument may
    for argv in (["status", db], ["status", db, "--", tid], ["failed", db], ["failed", db, "--traceback"],
                 ["watch", db, "--", tid], ["nuke", db, "--yes", "--", tid]):
        code, out, err = run(*argv)
        assert code == (1 if argv[0] == "watch" else 0), (argv, err)
        assert tid in out, argv
        if argv[0] in ("failed", "watch") or argv == ["status", db, "--", tid]:
            # verbatim, but for a NUL byte, which both backends store as the text \x00
            assert message.replace("\x00", "\\x00") in out, argv


def test_json_carries_text_exactly(db):
    task = failing_task(db, NASTY_SLUG, NASTY_MESSAGE)
    doc = json.loads(cli("failed", db, "--json").stdout)
    [failure] = doc["failures"]
    assert failure["message"] == NASTY_MESSAGE and failure["task_id"] == task.task_id
    doc = json.loads(cli("status", db, task.task_id, "--json").stdout)
    assert doc["task"]["task_id"] == task.task_id and doc["task"]["slug"] == NASTY_SLUG


def in_terminal(*argv: str, columns: int = 80, env: dict[str, str] | None = None, term: str = "xterm"
                ) -> tuple[int, str]:
    """Run the real command in a pseudo-terminal of ``columns`` columns (``TERM=term``); (status, what
    it showed)."""
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([LMS, *argv], stdin=follower, stdout=follower, stderr=follower,
                            env=dict(env or env_for_workers(), COLUMNS=str(columns), TERM=term), close_fds=True)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    code = proc.wait(30)
    os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # the terminal's own styling, not user text


def test_text_in_a_terminal_is_shown_as_typed_and_escapes_are_defused(db):
    task = failing_task(db, NASTY_SLUG, NASTY_MESSAGE)
    tid = task.task_id
    shown_message = NASTY_MESSAGE.replace("\x1b", "\\x1b").replace("\t", "\\x09")
    for argv in (["status", db, tid], ["failed", db], ["watch", db, tid]):
        code, text = in_terminal(*argv)
        assert code == (1 if argv[0] == "watch" else 0), text
        assert tid in text, (argv, text)
        assert shown_message in text, argv
        assert "\x1b[31mescape" not in text
    code, text = in_terminal("status", db)
    assert code == 0 and tid in text  # too wide for a table: plain lines, the id whole


def test_the_status_table_says_states_and_percent_in_words(db):
    """Piped, in a dumb terminal and in a colour one, the task table gives each task's percent, its
    scheduled retries and its state as words: nothing is said by colour alone."""
    with MultiStepTask.create("blocked", db=db) as blocked:
        blocked.add_job(jobfuncs.boom, "x")
    # a long slug: the table is wider than the 80 columns rich gives a dumb terminal, whatever else
    with MultiStepTask.create("retrying-" + "x" * 60, db=db, max_retries=3, retry_delay=3600) as retrying:
        retrying.add_job(jobfuncs.boom, "later")
        for _ in range(3):
            retrying.add_job(jobfuncs.noop)
    with MultiStepTask.create("done", db=db) as done:
        done.add_job(jobfuncs.noop)
    assert cli("worker", db, "--burst", "-q").returncode == 0
    piped = cli("status", db).stdout.splitlines()
    assert piped[0].split("\t") == ["task", "state", "progress", "done", "failed", "scheduled", "pending",
                                     "running", "total", "age"]
    rows = {line.split("\t")[0]: line.split("\t")[1:9] for line in piped[1:]}
    assert rows[blocked.task_id] == ["blocked", "0%", "0", "1", "0", "0", "0", "1"]
    assert rows[retrying.task_id] == ["running", "75%", "3", "0", "1", "1", "0", "4"]
    assert rows[done.task_id] == ["finished", "100%", "1", "0", "0", "0", "0", "1"]
    # a dumb terminal (a table, or plain lines when rich takes it for 80 columns): the same words
    code, dumb = in_terminal("status", db, columns=200, term="dumb")
    assert code == 0
    for task, state, percent in ((retrying, "running", "75%"), (blocked, "blocked", "0%"), (done, "finished", "100%")):
        line = next(line for line in dumb.splitlines() if task.task_id in line)
        assert re.search(rf"\b{state}\b.*\b{percent}", line), line
    code, table = in_terminal("status", db, columns=200)
    assert code == 0
    header = next(line for line in table.splitlines() if "scheduled" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")][:7] == [
        "task", "state", "progress", "%", "done", "failed", "scheduled"], header
    row = next(line for line in table.splitlines() if retrying.task_id in line)
    assert re.search(r"│ running\s*│.*│\s*75% │\s*3 │\s*0 │\s*1 │", row), row
    assert re.search(r"│ blocked\s*│", next(line for line in table.splitlines() if blocked.task_id in line))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slug=slugs, message=messages)
def test_any_slug_and_message_come_back_in_a_terminal(tmp_path_factory, slug, message):
    """The same in a real pseudo-terminal: printable text exactly, control characters as escapes."""
    db = str(tmp_path_factory.mktemp("pty") / "t.sqlite")
    task = failing_task(db, slug, message)
    shown = "".join(f"\\x{ord(c):02x}" if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 else c
                    for c in message)
    for argv in (["status", db, "--", task.task_id], ["failed", db]):
        code, text = in_terminal(*argv, columns=120)
        assert code == 0, text
        assert task.task_id in text.replace("\n", ""), argv
        lines_shown = [line for line in shown.split("\n") if line.strip()]
        assert all(line.rstrip() in text for line in lines_shown), argv


def test_errors_on_stderr_are_never_wrapped(tmp_path):
    path = tmp_path / ("a-very-long-directory-name-" * 4) / "notes.txt"
    path.parent.mkdir()
    path.write_text("hello\n" * 50)
    result = subprocess.run([LMS, "status", str(path)], capture_output=True, text=True,
                            env=dict(env_for_workers(), COLUMNS="40"))
    assert result.returncode == 1
    assert result.stderr == f"Error: {path} is not a SQLite database (its first bytes say otherwise)\n"


def test_check_finds_claims_of_a_pool_killed_whole(db, log_path, spawn):
    with MultiStepTask.create("held", db=db) as task:
        for i in range(4):
            task.add_job(jobfuncs.work, log_path, f"h{i}", 30)
    proc = spawn(db, "-c", "2")
    wait_for(lambda: len(lines(log_path)) == 2, what="two jobs running")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    doc = json.loads(cli("workers", db, "--json").stdout)
    assert [w["alive"] for w in doc["workers"]] == [False]
    before = cli("workers", db, "--json").stdout
    assert before == cli("workers", db, "--json").stdout  # looking changes nothing
    result = cli("check", db, "--json")
    assert result.returncode == 1
    kinds = {p["kind"] for p in json.loads(result.stdout)["problems"]}
    assert {"dead-claims", "dead-workers"} <= kinds
    result = cli("check", db, "--repair", "--json")
    doc = json.loads(result.stdout)
    assert result.returncode == 0 and doc["ok"] and doc["found"] == doc["repaired"] >= 2
    assert json.loads(cli("workers", db, "--json").stdout)["workers"] == []
    p = task.progress()
    assert (p.running_count, p.pending_count) == (0, 4)
    assert cli("check", db).stdout.strip().endswith(": ok")


def test_watch_keeps_watching_while_jobs_remain_after_a_failure(db, log_path, spawn):
    with MultiStepTask.create("partly", db=db) as task:
        task.add_job(jobfuncs.boom, "early failure")
        for i in range(6):
            task.add_job(jobfuncs.work, log_path, f"w{i}", 0.3)
    proc = spawn(db, "-c", "2")
    watched = subprocess.run([LMS, "watch", db, task.task_id], capture_output=True, text=True,
                             env=env_for_workers(), timeout=60)
    assert watched.returncode == 1
    assert "failed: job" in watched.stderr and "early failure" in watched.stderr
    assert task.progress().completed_count == 6  # it waited for the others before calling it blocked
    assert len([x for x in lines(log_path) if x.startswith("end ")]) == 6
    p = task.wait(timeout=5)
    assert p.state == "blocked"
    proc.terminate()
    proc.wait(30)


def test_watch_interrupted_exits_130(db, log_path):
    with MultiStepTask.create("forever", db=db) as task:
        task.add_job(jobfuncs.noop)
    proc = subprocess.Popen([LMS, "watch", db, task.task_id], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env_for_workers())
    try:
        assert task.task_id in proc.stderr.readline()  # watching now (a first progress line)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_database_from_the_environment_with_a_task_id(db, tasks_env):
    task = tasks_env
    env = dict(env_for_workers(), LITEMULTISTEP_DB=db)
    for argv in (["status", task.task_id, "--json"], ["failed", "--json"], ["workers", "--json"],
                 ["check", "--json"]):
        result = subprocess.run([LMS, *argv], capture_output=True, text=True, env=env)
        assert result.returncode == 0, (argv, result.stderr)
    result = subprocess.run([LMS, "watch", task.task_id], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1 and task.task_id in result.stdout
    job_id = json.loads(cli("failed", db, "--json").stdout)["failures"][0]["job_id"]
    result = subprocess.run([LMS, "retry", str(job_id), "--json"], capture_output=True, text=True, env=env)
    assert json.loads(result.stdout) == {"retried": [job_id]}
    result = subprocess.run([LMS, "status", db, task.task_id], capture_output=True, text=True, env=env)
    assert result.returncode == 0  # DB given anyway: the variable does not get in the way


@pytest.fixture
def tasks_env(db):
    return failing_task(db, "env", "from the environment")


def test_no_arguments_prints_help_and_exits_0():
    result = cli()
    assert result.returncode == 0 and "Commands:" in result.stdout


def test_a_reading_command_never_turns_a_file_into_a_database(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch(mode=0o644)
    result = cli("status", str(empty))
    assert result.returncode == 1 and "is empty" in result.stderr
    assert empty.stat().st_size == 0 and not (tmp_path / "empty.sqlite-wal").exists()


def test_created_files_are_for_their_owner_only(db):
    MultiStepTask.create("private", db=db)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            assert os.stat(db + suffix).st_mode & 0o077 == 0, suffix


def test_retry_of_a_completed_job_says_so(db, log_path):
    with MultiStepTask.create("done", db=db) as task:
        task.add_job(jobfuncs.record, log_path, "x")
        task.add_job(jobfuncs.boom)
    drain(resolve_db(db))
    done_id = min(f.job_id for f in task.failures()) - 1
    result = cli("retry", db, str(done_id))
    assert result.returncode == 1 and f"job {done_id} is no longer stored: it completed" in result.stderr
    result = cli("retry", db, "999999")
    assert "no job ever had that id" in result.stderr


def test_piped_tables_are_tab_separated_lines(db, spawn, log_path):
    with MultiStepTask.create("shown", db=db) as task:
        task.add_job(jobfuncs.work, log_path, "long", 30)
    proc = spawn(db)
    wait_for(lambda: lines(log_path), what="the job to start")
    out = cli("workers", db).stdout.splitlines()
    assert out[0].split("\t")[:3] == ["id", "pid", "host"] and len(out) == 2
    assert out[1].split("\t")[1] == str(proc.pid)
    assert proc.poll() is None  # the spawn fixture kills it: a graceful stop would wait for the 30 s job


def test_help_and_docs_name_every_variable():
    help_text = cli("worker", "--help").stdout
    for name in ("LITEMULTISTEP_DB", "LITEMULTISTEP_VERBOSE", "LITEMULTISTEP_QUIET", "LITEMULTISTEP_TIMEOUT",
                 "LITEMULTISTEP_SHUTDOWN_TIMEOUT", "LITEMULTISTEP_MAX_CRASHES", "LITEMULTISTEP_CONCURRENCY"):
        assert name in help_text, name


def test_wording(db, log_path):
    with MultiStepTask.create("one", db=db) as task:
        task.add_job(jobfuncs.boom)
    drain(resolve_db(db))
    result = cli("watch", db, task.task_id)
    assert "1 failed job:" in result.stdout and "job(s)" not in result.stdout
    empty = MultiStepTask.create("nothing", db=db)
    assert empty.progress().percent == 0.0


def test_a_batch_of_held_jobs_is_shown_as_one_run_of_ids():
    from litemultistep.cli import _id_runs

    batch = [(job_id, "0s") for job_id in range(656, 799)]
    assert _id_runs([(1195, "2m"), *batch, (1196, "2m"), (1198, "")]) == "656-798 (0s), 1195-1196 (2m), 1198"
    assert _id_runs([]) == "-"


def test_json_documents_are_strict_json():
    doc = {"a": [1.5, float("inf"), (float("nan"),)], "b": -float("inf"), "c": {"d": 1e308, "e": "Infinity"}}
    assert views.to_json(doc) == '{"a":[1.5,null,[null]],"b":null,"c":{"d":1e+308,"e":"Infinity"}}'
    assert json.loads(views.to_json(doc, indent=2)) == json.loads(views.to_json(doc))
