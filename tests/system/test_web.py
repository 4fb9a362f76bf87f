"""The web page: a real `litemultistep web` process, real workers, and a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jobfuncs
import pytest
from conftest import LMS, ROOT, cli, env_for_workers, is_pg, wait_for

from litemultistep import MultiStepTask
from litemultistep import engine as E
from litemultistep.config import resolve_db
from litemultistep.runner import drain

pytest.importorskip("starlette", reason="the web page needs the web extra: pip install -e '.[test,web]'")

pytestmark = pytest.mark.timeout(120)

CHROMIUM = os.environ.get("LITEMULTISTEP_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: where the screenshots of each page go, to be looked at
SHOTS = Path(os.environ.get("LITEMULTISTEP_SCREENSHOTS") or ROOT / "screenshots")
XSS = '<script>window.__xss=1</script>"><img src=x onerror="window.__xss=2">[bold]{{7*7}}\U0001F389'


class Server:
    """A `litemultistep web` process as a user starts it, on a free port."""

    def __init__(self, tmp: Path, db: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"web-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([LMS, "web", db, "--port", "0", *args], stdout=log,
                                         stderr=subprocess.STDOUT, env=env or env_for_workers(),
                                         start_new_session=True)
        found: list[str] = []

        def started() -> bool:
            m = re.search(r"at (http://\S+/) ", self.log_path.read_text())
            if m:
                found.append(m.group(1).rstrip("/"))
            assert self.proc.poll() is None, self.log_path.read_text()
            return bool(found)

        wait_for(started, 20, "the web server to start")
        self.url = found[0]

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read().decode(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers

    def post(self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str]:
        body = "&".join(f"{quote(k)}={quote(v)}" for k, v in fields.items()).encode()
        request = urllib.request.Request(self.url + path, data=body, method="POST", headers={
            "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        try:
            with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def api(self, path: str) -> Any:
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(db: str, *args: str, env: dict[str, str] | None = None) -> Server:
        servers.append(Server(tmp_path, db, *args, env=env))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need Playwright: pip install -e '.[test,web]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium (Debian), "
                    "or point LITEMULTISTEP_TEST_CHROMIUM at a Chromium binary")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.accept()))
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def shot(pg: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def until(pg: Any, predicate: Any, timeout: float, what: str) -> None:
    """``wait_for``, letting the browser's events in between looks (a plain sleep holds them)."""
    wait_for(predicate, timeout, what, pause=lambda seconds: pg.wait_for_timeout(seconds * 1000))


def task_url(server: Server, task_id: str) -> str:
    return f"{server.url}/tasks/{quote(task_id, safe='')}"


def percent(pg: Any) -> float:
    return float(pg.get_attribute("main .bar", "aria-valuenow"))


def test_progress_moves_and_reaches_100_without_a_reload(db, tmp_path, serve, spawn, page, log_path):
    task = MultiStepTask.create("live bar", db=db)
    for i in range(16):
        task.add_job(jobfuncs.slow_record, log_path, str(i), 0.15)
    task.add_finalization_job(jobfuncs.record, log_path, "final")
    task.mark_finalizable()
    server = serve(db, "--refresh", "0.2")
    page.goto(task_url(server, task.task_id))
    page.evaluate("window.__loaded_once = true")
    assert percent(page) == 0
    shot(page, "task-queued")
    spawn(db, "-c", "2")
    seen = set()

    def finished() -> bool:
        seen.add(percent(page))
        return page.locator("main .task-title .state").inner_text() == "finished"

    until(page, finished, 60, "the page to show the task finished")
    assert page.evaluate("window.__loaded_once") is True  # the same document: updated, not reloaded
    assert any(0 < p < 100 for p in seen), sorted(seen)
    assert percent(page) == 100
    assert page.errors == []
    shot(page, "task-finished")


def test_tasks_page_shows_new_tasks_and_finished_ones_live(db, serve, spawn, page, log_path):
    tasks = [MultiStepTask.create(f"batch {i}", db=db) for i in range(3)]
    for t in tasks:
        for _ in range(4):
            t.add_job(jobfuncs.slow_record, log_path, t.task_id, 0.1)
        t.mark_finalizable()
    server = serve(db, "--refresh", "0.2")
    page.goto(server.url + "/")
    rows = page.locator("table.tasks:not(.finished) tbody tr")
    assert rows.count() == 3 and [rows.nth(i).get_attribute("data-key") for i in range(3)] == \
        [t.task_id for t in tasks]
    late = MultiStepTask.create("added later", db=db)
    late.add_job(jobfuncs.record, log_path, "late")
    late.mark_finalizable()
    page.wait_for_selector(f"tr[data-key='{late.task_id}']", timeout=10_000)
    shot(page, "tasks")
    spawn(db, "-c", "2")
    page.wait_for_selector("table.tasks.finished tbody tr:nth-child(4)", timeout=30_000)
    assert page.locator("main").inner_text().count("No active tasks.") == 1
    shot(page, "tasks-finished")


def test_a_failure_appears_with_its_traceback_and_retry_finishes_the_task(db, tmp_path, serve, spawn, page,
                                                                          log_path):
    marker = str(tmp_path / "marker")
    task = MultiStepTask.create("fails once", db=db)
    task.add_job(jobfuncs.record, log_path, "a")
    task.add_job(jobfuncs.fail_once, marker, XSS)
    task.add_finalization_job(jobfuncs.record, log_path, "final")
    task.mark_finalizable()
    server = serve(db, "--allow-actions", "--refresh", "0.2")
    page.goto(task_url(server, task.task_id))
    spawn(db)
    page.wait_for_selector("article.failure", timeout=20_000)
    failure = page.locator("article.failure")
    assert failure.locator(".exc").inner_text() == "ValueError"
    assert failure.locator("pre.message").inner_text() == XSS
    failure.locator("summary").click()
    traceback = failure.locator("pre.traceback")
    assert traceback.is_visible()
    assert "Traceback (most recent call last)" in traceback.inner_text()
    assert "raise ValueError(message)" in traceback.inner_text()
    page.wait_for_timeout(500)  # live updates go on and keep the traceback open
    assert traceback.is_visible()
    assert page.locator("main .task-title .state").inner_text() == "blocked"
    shot(page, "task-failed")
    page.get_by_role("button", name="Retry all failed jobs").click()
    page.wait_for_selector("p.notice", timeout=10_000)
    assert page.locator("p.notice").inner_text() == "Requeued 1 job."
    until(page, lambda: page.locator("main .task-title .state").inner_text() == "finished", 30,
          "the task to finish")
    assert page.locator("article.failure").count() == 0
    assert sorted(line.split()[0] for line in Path(log_path).read_text().splitlines()) == ["a", "final"]
    assert page.evaluate("window.__xss") is None


def test_retry_one_job_and_nuke_from_the_page(db, tmp_path, serve, spawn, page, log_path):
    task = MultiStepTask.create("to be nuked", db=db)
    task.add_job(jobfuncs.boom, "no luck")
    task.mark_finalizable()
    server = serve(db, "--allow-actions", "--refresh", "0.2")
    worker = spawn(db)
    wait_for(lambda: task.failed_count == 1, 20, "the job to fail")
    page.goto(server.url + "/failures")
    page.get_by_role("button", name="Retry", exact=True).click()
    page.wait_for_selector("p.notice")
    assert page.locator("p.notice").inner_text() == "Requeued 1 job."
    assert page.url.startswith(server.url + "/failures")
    wait_for(lambda: len(task.failures()) == 1 and task.failures()[0].attempt == 2, 20, "the second failure")
    worker.kill()
    page.goto(task_url(server, task.task_id))
    page.get_by_role("button", name="Nuke task").click()
    assert page.dialogs and "cannot be undone" in page.dialogs[0]
    page.wait_for_selector("p.notice")
    assert page.locator("p.notice").inner_text() == f"Removed {task.task_id}."
    assert page.url.split("?")[0] == server.url + "/"
    assert cli("status", db, task.task_id).returncode == 1


def test_read_only_by_default_no_buttons_and_posts_refused(db, serve, spawn, page):
    task = MultiStepTask.create("read only", db=db)
    task.add_job(jobfuncs.boom)
    task.mark_finalizable()
    spawn(db, "--burst").wait(30)
    server = serve(db)
    for path in ("/", "/failures", "/workers", "/tasks/" + quote(task.task_id, safe="")):
        page.goto(server.url + path)
        assert page.locator("main form[method=post], form.action").count() == 0, path
        assert page.locator(".mode").inner_text() == "read-only"
    status, body = server.post("/actions/retry-task", {"task_id": task.task_id, "csrf": "x"})
    assert status == 403 and "--allow-actions" in body
    assert task.failed_count == 1


def test_forged_posts_are_refused(db, serve, spawn, page):
    task = MultiStepTask.create("forged", db=db)
    task.add_job(jobfuncs.boom)
    task.mark_finalizable()
    spawn(db, "--burst").wait(30)
    server = serve(db, "--allow-actions")
    _, html, _ = server.get("/tasks/" + quote(task.task_id, safe=""))
    token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    fields = {"task_id": task.task_id}
    status, body = server.post("/actions/retry-task", fields)
    assert status == 403 and "CSRF token" in body
    assert server.post("/actions/retry-task", {**fields, "csrf": token + "x"})[0] == 403
    status, body = server.post("/actions/retry-task", {**fields, "csrf": token},
                               headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body
    assert server.get("/actions/retry-task")[0] == 405  # never on GET
    assert task.failed_count == 1
    # a page of another origin (here about:blank, Origin: null) posting a form to the server, as a
    # malicious site would, with a stolen-looking token even
    page.set_content(f'<form method="post" action="{server.url}/actions/nuke">'
                     f'<input name="task_id" value="{task.task_id}"><input name="csrf" value="{token}">'
                     '<button>go</button></form>')
    with page.expect_navigation():
        page.click("button")
    assert "refused" in page.content()
    assert task.failed_count == 1
    status, _ = server.post("/actions/retry-task", {**fields, "csrf": token}, headers={"Origin": server.url})
    assert status == 303
    assert task.failed_count == 0
    status, body = server.post("/actions/retry-job", {"job_id": "987654", "csrf": token})
    assert status == 404 and "987654" in body


def test_user_text_stays_text_on_every_page(db, tmp_path, serve, spawn, page):
    task = MultiStepTask.create(XSS, db=db)
    task.add_job(jobfuncs.boom, XSS)
    task.add_job(jobfuncs.slow_record, str(tmp_path / "log"), XSS, 60)
    task.add_finalization_job(jobfuncs.record, str(tmp_path / "log"), XSS)
    task.mark_finalizable()
    spawn(db, "-c", "2")
    wait_for(lambda: task.failed_count == 1 and task.progress().running_count == 1, 30, "a failure and a runner")
    server = serve(db, "--allow-actions", "--refresh", "0.2")
    pages = {"tasks": "/", "task": "/tasks/" + quote(task.task_id, safe=""),
             "failures": "/failures?task=" + quote(task.task_id, safe=""), "workers": "/workers"}
    for name, path in pages.items():
        page.goto(server.url + path)
        until(page, lambda: page.locator("[data-live-state]").inner_text().startswith("Live"), 10,
              "a live update")  # it has run over the page too
        assert page.evaluate("window.__xss") is None, name
        assert page.locator("main img, main script").count() == 0, name
        assert task.task_id in page.locator("main").inner_text(), name
        shot(page, f"xss-{name}")
    page.goto(server.url + pages["task"])
    assert page.locator("article.failure pre.message").inner_text() == XSS
    assert page.locator("article.group pre.message").inner_text() == XSS
    assert json.dumps(XSS, ensure_ascii=False) in page.locator("table.running").inner_text()
    assert page.dialogs == [] and page.errors == []


def test_updates_pause_while_the_tab_is_hidden(db, serve, page):
    MultiStepTask.create("hidden", db=db).add_job(jobfuncs.noop)
    server = serve(db, "--refresh", "0.1")
    fetches: list[str] = []
    page.on("request", lambda r: fetches.append(r.url) if r.headers.get("x-live") else None)
    page.goto(server.url + "/")
    until(page, lambda: len(fetches) >= 3, 10, "live updates")
    page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    page.wait_for_timeout(300)
    before = len(fetches)
    page.wait_for_timeout(1000)
    assert len(fetches) == before
    assert page.locator("[data-live-state]").inner_text() == "Paused while this tab is hidden."
    page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    until(page, lambda: len(fetches) >= before + 3, 10, "updates to resume")


def test_workers_page_shows_what_each_worker_runs(db, tmp_path, serve, spawn, page):
    task = MultiStepTask.create("long", db=db)
    task.add_job(jobfuncs.slow_record, str(tmp_path / "log"), "x", 60)
    task.mark_finalizable()
    w = spawn(db)
    wait_for(lambda: task.progress().running_count == 1, 20, "the job to start")
    server = serve(db, "--refresh", "0.2")
    page.goto(server.url + "/workers")
    row = page.locator("table.workers tbody tr")
    assert row.count() == 1
    assert str(w.pid) in row.inner_text() and task.task_id in row.inner_text()
    assert "alive" in row.inner_text()
    shot(page, "workers")
    os.killpg(w.pid, signal.SIGKILL)
    w.wait(10)
    page.wait_for_selector("table.workers tr.dead", timeout=10_000)
    assert "dead" in page.locator("table.workers tbody tr").inner_text()


# -- without a browser --------------------------------------------------------------------------------


def test_a_held_batch_is_one_item_on_the_workers_page(db, serve):
    """A worker holding a batch of short jobs shows it as one run of ids, as `litemultistep workers`
    does, not one item per job."""
    task = MultiStepTask.create("batch <b>", db=db)
    for _ in range(40):
        task.add_job(jobfuncs.noop)
    task.mark_finalizable()
    database = resolve_db(db)
    database.connection().execute("UPDATE task SET avg_duration = 1e-6")  # known short: batches of many
    worker_id, lock = database.register_worker("inline")
    [batch] = E.claim(database, worker_id, max_batch=32)
    server = serve(db)
    status, body, _ = server.get("/workers")
    assert status == 200
    assert f"{batch[0].id}–{batch[-1].id} of" in body and body.count('class="job"') == 1
    assert "batch &lt;b&gt;" in body
    lock.release()


def _dump(db: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_api_has_the_shapes_of_the_cli_json(any_db, serve, spawn):
    task = MultiStepTask.create("api [x] <b>", db=any_db, keep_results=True)
    task.add_job(jobfuncs.noop)
    task.add_job(jobfuncs.boom, "api failure")
    task.add_finalization_job(jobfuncs.noop)
    task.mark_finalizable()
    spawn(any_db, "--burst").wait(30)
    other = MultiStepTask.create("other", db=any_db)
    other.add_job(jobfuncs.noop)
    server = serve(any_db)

    def json_of(*args: str) -> Any:
        r = cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert server.api("/api/tasks") == json_of("status", any_db)
    assert server.api("/api/tasks/" + quote(task.task_id, safe="")) == json_of("status", any_db, task.task_id)
    assert server.api("/api/failures") == json_of("failed", any_db)
    assert server.api("/api/failures?task=" + quote(task.task_id, safe="")) == \
        json_of("failed", any_db, "--task", task.task_id)
    assert server.api("/api/workers") == json_of("workers", any_db)
    assert [t["task_id"] for t in server.api("/api/tasks?limit=1&offset=1")["tasks"]] == [other.task_id]
    assert server.api("/api/failures?exc_type=RuntimeError")["failures"][0]["message"] == "api failure"
    assert server.api("/api/failures?exc_type=KeyError")["failures"] == []
    status, body, headers = server.get("/api/tasks/nope~12345678")
    assert status == 404 and "no task 'nope~12345678'" in json.loads(body)["error"]
    assert headers["content-type"] == "application/json"
    status, body, _ = server.get("/api/tasks?limit=lots")
    assert status == 400 and "limit must be a whole number from 1" in json.loads(body)["error"]
    assert server.get("/api/failures?offset=" + "9" * 30)[0] == 400
    if not is_pg(any_db):
        before = _dump(any_db)
        for path in ("/", "/failures", "/workers", "/tasks/" + quote(task.task_id, safe=""), "/api/tasks"):
            assert server.get(path)[0] == 200
        assert _dump(any_db) == before  # looking writes nothing


def strict_json(text: str) -> Any:
    """JSON as a strict parser reads it: ``Infinity`` and ``NaN`` are not JSON."""

    def refuse(word: str) -> None:
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def test_absurd_reports_stored_by_an_older_version_leave_the_json_strict(any_db, serve):
    with MultiStepTask.create("old reports", db=any_db) as task:
        task.add_job(jobfuncs.noop)
        task.add_job(jobfuncs.noop)
    store = resolve_db(any_db)
    worker_id, lock = store.register_worker("process")
    try:
        held = [job for _ in range(2) for batch in E.claim(store, worker_id, max_batch=1) for job in batch]
        assert len(held) == 2
        # what a worker of a version whose report() took any finite number stored: their sum overflows
        E.report_progress(store, worker_id, [(job.id, 1e308, 1e308) for job in held])
        server = serve(any_db)
        status, body, _ = server.get("/api/tasks")
        assert status == 200, body
        api = strict_json(body)["tasks"][0]
        assert (api["reported_done"], api["reported_total"], api["running_count"]) == (None, None, 2)
        r = cli("status", any_db, "--json")
        assert r.returncode == 0, r.stderr
        # the rate is measured at the moment of reading: it is known only once the window is a second old
        timed = ("rate", "seconds_left")
        assert {k: v for k, v in strict_json(r.stdout)["tasks"][0].items() if k not in timed} == \
            {k: v for k, v in api.items() if k not in timed}
        r = cli("status", any_db, task.task_id, "--json")
        assert r.returncode == 0, r.stderr
        assert [j["reported_done"] for j in strict_json(r.stdout)["running"]] == [1e308, 1e308]
    finally:
        E.unregister_worker(store, worker_id)
        lock.release()


def test_ids_that_no_task_or_job_can_have_are_not_found(any_db, serve):
    task = MultiStepTask.create("ids", db=any_db)
    task.add_job(jobfuncs.boom)
    task.mark_finalizable()
    drain(resolve_db(any_db))
    server = serve(any_db, "--allow-actions")
    for path in ("/api/tasks/a%00b", "/tasks/a%00b", "/api/failures?task=a%00b", "/failures?task=a%00b"):
        status, body, _ = server.get(path)
        assert status == 404 and "never holds a NUL character" in body, (path, status, body)
    status, body, _ = server.get("/api/failures?exc_type=Runtime%00Error")
    assert status == 400 and "NUL" in body
    _, html, _ = server.get("/tasks/" + quote(task.task_id, safe=""))
    token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    for job_id in ("9" * 23, "9223372036854775808", "1" + "0" * 5000):  # over 64 bits: no job has such an id
        status, body = server.post("/actions/retry-job", {"job_id": job_id, "csrf": token})
        assert status == 404 and "job ids go up to 9223372036854775807" in body, (status, body)
    status, body = server.post("/actions/retry-job", {"job_id": "\u00b2", "csrf": token})  # "²".isdigit() is true
    assert status == 400 and "a job id is a whole number" in body
    for action in ("retry-task", "nuke"):
        status, body = server.post(f"/actions/{action}", {"task_id": "a\x00b", "csrf": token})
        assert status == 404 and "never holds a NUL character" in body, (action, status, body)
    assert task.failed_count == 1


def test_the_tasks_page_is_paged(db, serve):
    with MultiStepTask.create("first", db=db) as first:
        first.add_job(jobfuncs.noop)
    for i in range(54):
        MultiStepTask.create(f"t{i}", db=db)
    server = serve(db)
    _, html, _ = server.get("/")
    assert html.count('<tr data-key=') == 50 and first.task_id in html
    assert "Tasks 1–50 of 55 (page 1 of 2)" in html and 'href="/?page=2"' in html
    _, html, _ = server.get("/?page=2")
    assert html.count('<tr data-key=') == 5 and "t53~" in html and first.task_id not in html
    assert "Tasks 51–55 of 55 (page 2 of 2)" in html
    assert "(page 2 of 2)" in server.get("/?page=9")[1]  # past the end: the last page


def test_pages_answer_with_security_headers_and_a_404_for_an_unknown_task(db, serve):
    MultiStepTask.create("x", db=db).add_job(jobfuncs.noop)
    server = serve(db)
    status, body, headers = server.get("/")
    assert status == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    status, body, _ = server.get("/tasks/" + quote("no <such> task~1", safe=""))
    assert status == 404 and "no task &#39;no &lt;such&gt; task~1&#39;" in body
    status, body, _ = server.get("/?page=zero")
    assert status == 400 and "page must be a whole number" in body
    assert server.get("/static/live.js")[0] == 200


def test_another_host_name_is_refused_on_loopback(db, serve):
    MultiStepTask.create("x", db=db)
    server = serve(db)
    assert server.get("/", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
    assert server.get("/", headers={"Host": "localhost:1"})[0] == 200


def test_the_page_serves_on_the_ipv6_loopback(db, serve):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"this machine has no IPv6 loopback address (::1): {e}")
    task = MultiStepTask.create("v6", db=db)
    for host in ("::1", "[::1]"):
        server = serve(db, "--host", host)
        assert re.fullmatch(r"http://\[::1\]:\d+", server.url), server.url  # the URL it prints works
        status, body, _ = server.get("/")  # Host: [::1]:PORT
        assert status == 200 and task.task_id in body
        assert server.api("/api/tasks")["tasks"][0]["task_id"] == task.task_id
        assert server.get("/", headers={"Host": "localhost"})[0] == 200
        assert server.get("/", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding, still refused
        assert server.get("/", headers={"Host": "[::1]evil"})[0] == 400
        server.stop()


def test_other_addresses_need_a_password(db, serve):
    MultiStepTask.create("x", db=db)
    r = cli("web", db, "--host", "0.0.0.0", "--port", "0", timeout=20)
    assert r.returncode == 2
    assert "--password" in r.stderr and "Traceback" not in r.stderr
    env = {**env_for_workers(), "LITEMULTISTEP_WEB_PASSWORD": "s3cret"}
    server = serve(db, "--host", "0.0.0.0", env=env)
    assert server.get("/")[0] == 401
    assert server.get("/api/tasks")[0] == 401
    wrong = base64.b64encode(b"me:nope").decode()
    assert server.get("/", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    right = base64.b64encode(b"anyone:s3cret").decode()
    assert server.get("/", headers={"Authorization": f"Basic {right}"})[0] == 200


def test_web_errors_are_messages(db, tmp_path, serve):
    r = cli("web", str(tmp_path / "missing.sqlite"), "--port", "0", timeout=20)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.sqlite" in r.stderr
    MultiStepTask.create("x", db=db)
    server = serve(db)
    port = server.url.rsplit(":", 1)[1]
    r = cli("web", db, "--port", port, timeout=20)
    assert r.returncode == 2 and f"port {port}" in r.stderr and "Traceback" not in r.stderr
    assert server.stop() == -signal.SIGTERM  # stopped as by the signal, after a clean shutdown
    assert "Traceback" not in server.log_path.read_text()


def test_the_app_mounts_in_another_asgi_application(db, tmp_path):
    task = MultiStepTask.create("mounted", db=db)
    script = tmp_path / "host.py"
    script.write_text(f"""
import socket, sys, uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
import litemultistep.web
outer = Starlette(routes=[Mount("/jobs", app=litemultistep.web.app({db!r}))])
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen()
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(outer, log_level="warning")).run(sockets=[sock])
""")
    proc = subprocess.Popen([os.path.join(os.path.dirname(LMS), "python"), str(script)], stdout=subprocess.PIPE,
                            text=True, env=env_for_workers(), start_new_session=True)
    try:
        port = proc.stdout.readline().strip()
        base = f"http://127.0.0.1:{port}/jobs"
        wait_for(lambda: _answers(base + "/"), 20, "the mounted app")
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            html = r.read().decode()
        assert task.task_id in html
        assert f'href="/jobs/tasks/{quote(task.task_id, safe="")}"' in html
        assert 'src="/jobs/static/live.js"' in html
        with urllib.request.urlopen(base + "/tasks/" + quote(task.task_id, safe=""), timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            assert metric_samples(r.read().decode())[("litemultistep_tasks", (("state", "running"),))] == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()


def test_three_thousand_identical_failures_are_one_group_on_a_small_page(db, serve, page):
    with MultiStepTask.create("many failures", db=db) as task:
        for _ in range(3000):
            task.add_job(jobfuncs.boom, "the same " * 20)
        task.add_job(jobfuncs.boom, "a different one")
    burst = cli("worker", db, "-c", "2", "--burst", "-q", timeout=120)
    assert burst.returncode == 0 and task.failed_count == 3001
    server = serve(db, "--allow-actions", "--refresh", "0.3")
    path = "/tasks/" + quote(task.task_id, safe="")
    status, html, _ = server.get(path)
    assert status == 200 and len(html.encode()) < 300_000, len(html)
    assert html.count('<article class="group"') == 2 and 'data-count="3000"' in html
    assert html.count('<article class="failure"') == 20
    api = server.api("/api/failures?group=1&task=" + quote(task.task_id, safe=""))
    assert [g["count"] for g in api["groups"]] == [3000, 1]
    one = server.api("/api/failures?limit=2&message=" + quote("a different one"))["failures"]
    assert [f["message"] for f in one] == ["a different one"]
    # what the page's live update fetches every 0.3 s is as small
    _, live, _ = server.get(path, headers={"X-Live": "1"})
    assert len(live.encode()) < 300_000
    page.goto(server.url + path)
    groups = page.locator("article.group")
    assert groups.count() == 2 and groups.first.get_attribute("data-count") == "3000"
    assert groups.first.locator(".count").inner_text() == "3,000"
    assert page.locator("article.failure").count() == 20
    sizes = []
    page.on("response", lambda r: sizes.append(len(r.body())) if r.url.endswith(path) else None)
    until(page, lambda: len(sizes) >= 2, 10, "two live updates")
    assert max(sizes) < 300_000, sizes
    shot(page, "task-3000-failures")
    page.get_by_role("link", name="Later →").click()
    assert page.locator("article.failure").count() == 20 and "page=2" in page.url
    # the failures page retries one group: the 3,000, and not the other one
    page.goto(server.url + "/failures?task=" + quote(task.task_id, safe=""))
    assert page.locator("article.group").count() == 2
    page.locator("article.group").first.get_by_role("button", name="Retry all 3,000").click()
    page.wait_for_selector("p.notice")
    assert page.locator("p.notice").inner_text() == "Requeued 3000 jobs."
    p = task.progress()
    assert (p.failed_count, p.pending_count) == (1, 3000)
    assert [f.message for f in task.failures()] == ["a different one"]
    assert page.errors == []


def test_a_killed_workers_job_is_marked_dead_in_every_view(any_db, serve, spawn, log_path):
    task = MultiStepTask.create("orphaned", db=any_db)
    task.add_job(jobfuncs.sleep_forever, log_path, "held")
    task.mark_finalizable()
    proc = spawn(any_db)
    wait_for(lambda: any(line.startswith("start held") for line in Path(log_path).read_text().splitlines())
             if Path(log_path).exists() else False, 30, "the job to start")
    [worker] = json.loads(cli("workers", any_db, "--json").stdout)["workers"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    note = f"worker {worker['id']} is dead; `check --repair` or any live worker puts it back"
    before = None if is_pg(any_db) else _dump(any_db)
    overview = cli("status", any_db)
    assert note in overview.stdout, overview.stdout
    one = cli("status", any_db, task.task_id)
    assert note in one.stdout, one.stdout
    [running] = json.loads(cli("status", any_db, task.task_id, "--json").stdout)["running"]
    assert running["worker_alive"] is False and running["worker_id"] == worker["id"]
    listed = cli("workers", any_db)
    assert note in listed.stdout, listed.stdout
    assert json.loads(cli("workers", any_db, "--json").stdout)["workers"][0]["alive"] is False
    server = serve(any_db)
    _, html, _ = server.get("/tasks/" + quote(task.task_id, safe=""))
    assert f"worker {worker['id']} is dead; <code>check --repair</code> or any live worker puts it back" in html
    assert '<span class="state state-blocked">dead</span>' in html
    assert f"(worker {worker['id']}); <code>check --repair</code>" in server.get("/")[1]
    assert f"worker {worker['id']} is dead; <code>check --repair</code>" in server.get("/workers")[1]
    assert server.api("/api/tasks/" + quote(task.task_id, safe=""))["running"][0]["worker_alive"] is False
    if before is not None:
        assert _dump(any_db) == before  # looking wrote nothing
    assert cli("check", any_db, "--repair").returncode == 0
    p = task.progress()
    assert (p.running_count, p.pending_count) == (0, 1)
    assert "is dead" not in cli("status", any_db).stdout


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What Prometheus' own parser reads in the text: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_are_prometheus_text_behind_the_password(any_db, serve, spawn, tmp_path):
    with MultiStepTask.create("good", db=any_db) as good:
        for _ in range(5):
            good.add_job(jobfuncs.noop)
    with MultiStepTask.create("bad", db=any_db, max_retries=1, retry_delay=0.01) as bad:
        bad.add_job(jobfuncs.boom, "twice")
    assert spawn(any_db, "--burst", "-c", "2").wait(30) == 0
    waiting = MultiStepTask.create("waiting", db=any_db)
    waiting.add_job(jobfuncs.noop)
    waiting.mark_finalizable()
    env = {**env_for_workers(), "LITEMULTISTEP_WEB_PASSWORD": "s3cret"}
    server = serve(any_db, env=env)  # read-only: /metrics needs no --allow-actions
    assert server.get("/metrics")[0] == 401
    right = base64.b64encode(b"prometheus:s3cret").decode()
    status, body, headers = server.get("/metrics", headers={"Authorization": f"Basic {right}"})
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    got = metric_samples(body)
    assert {state: got[("litemultistep_jobs", (("state", state),))]
            for state in ("pending", "running", "scheduled", "failed")} == \
        {"pending": 1, "running": 0, "scheduled": 0, "failed": 1}
    assert {state: got[("litemultistep_tasks", (("state", state),))]
            for state in ("building", "running", "blocked", "finalizing", "finished")} == \
        {"building": 0, "running": 1, "blocked": 1, "finalizing": 0, "finished": 1}
    assert got[("litemultistep_workers", (("alive", "true"),))] == 0   # the burst worker left
    assert got[("litemultistep_jobs_completed_total", ())] == 5
    assert got[("litemultistep_jobs_failed_total", ())] == 2
    worker = spawn(any_db)
    auth = {"Authorization": f"Basic {right}"}

    def counted() -> bool:
        got = metric_samples(server.get("/metrics", headers=auth)[1])
        return (got[("litemultistep_workers", (("alive", "true"),))] == 1
                and got[("litemultistep_jobs_completed_total", ())] == 6)

    wait_for(counted, 30, "the live worker and its work in /metrics")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_the_tasks_page_draws_throughput_and_rates(db, serve, spawn, page, log_path):
    with MultiStepTask.create("steady", db=db) as steady:
        for i in range(300):
            steady.add_job(jobfuncs.paced_record, log_path, str(i))
    with MultiStepTask.create("failing", db=db) as failing:
        for _ in range(30):
            failing.add_job(jobfuncs.boom, "chart")
    server = serve(db, "--refresh", "0.3")
    page.goto(server.url + "/")
    chart = page.locator("#throughput")
    assert chart.locator("svg").count() == 1 and chart.locator("rect.completed").count() == 0
    worker = spawn(db, "-c", "2")
    row = page.locator(f'table.tasks:not(.finished) tr[data-key="{steady.task_id}"]')
    rates = set()

    def finished() -> bool:
        cells = row.locator("td").all_inner_texts() if row.count() else []
        if cells:
            rates.add((cells[-3], cells[-2]))
        return row.count() == 0 and "300 jobs completed" in chart.locator("figcaption").inner_text()

    until(page, finished, 60, "the chart to count the task's jobs")
    # while it ran, the task showed a rate in jobs a second and the time it had left
    assert any(rate.endswith("/s") and left != "–" for rate, left in rates), rates
    assert "30 attempts failed" in chart.locator("figcaption").inner_text()
    assert chart.locator("rect.completed").count() >= 1 and chart.locator("rect.failed").count() >= 1
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # the page's own live.js alone
    assert page.errors == []
    shot(page, "tasks-throughput")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False
