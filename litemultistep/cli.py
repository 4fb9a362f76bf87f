"""The ``litemultistep`` command: run workers, see and steer tasks, all on the SQLite file.

Every reading command takes ``--json``: standard output then holds the JSON alone (shapes in
docs/cli.md); logs and progress go to standard error. A user's mistake gets a message and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from . import engine, views
from .db import Database
from .errors import DatabaseUnusable, InvalidSetting, LiteMultiStepError
from .worker import WorkerOptions, run_worker

out = Console(soft_wrap=True)
err = Console(stderr=True)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(message)s"))
    root = logging.getLogger("litemultistep")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _error(message: str) -> None:
    """An error for a person, on standard error: one unwrapped line, the message verbatim."""
    click.echo(f"Error: {message}", err=True)


def _open(path: str) -> Database:
    """Open for a reading or steering command: a missing file is an error, never created."""
    return Database(path, create=False)


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


class PositiveSeconds(click.ParamType):
    """A finite number of seconds above zero (``nan`` and ``inf`` are refused)."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        return seconds


db_argument = click.argument("db", envvar="LITEMULTISTEP_DB", type=click.Path(dir_okay=True))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON alone on standard output.")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="litemultistep", prog_name="litemultistep")
def cli() -> None:
    """Multi-step tasks on one SQLite file: run workers, see progress, retry failures.

    DB is the SQLite file your application creates tasks in (or set LITEMULTISTEP_DB).
    """


# -- worker -----------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@db_argument
@click.option("-c", "--concurrency", type=click.IntRange(1, 256), default=1, show_default=True,
              envvar="LITEMULTISTEP_CONCURRENCY", show_envvar=True, help="Worker processes to run.")
@click.option("--queues", multiple=True, metavar="GLOB", envvar="LITEMULTISTEP_QUEUES", show_envvar=True,
              help="Serve only task queues whose name (the task id) matches; repeatable. Default: all.")
@click.option("--burst", is_flag=True, envvar="LITEMULTISTEP_BURST", show_envvar=True,
              help="Exit 0 once nothing is queued or running (failed jobs included).")
@click.option("--path", "paths", multiple=True, metavar="DIR", envvar="LITEMULTISTEP_PATH", show_envvar=True,
              help="Add DIR to the import path for job callables; repeatable. The current directory is "
                   "always on it.")
@click.option("--allow-module", "allow_modules", multiple=True, metavar="PREFIX",
              envvar="LITEMULTISTEP_ALLOW_MODULES", show_envvar=True,
              help="Run only job callables from these modules (and their submodules); repeatable.")
@click.option("--timeout", type=PositiveSeconds(), default=None, envvar="LITEMULTISTEP_TIMEOUT", show_envvar=True,
              help="Time limit in seconds for jobs whose task sets none: a job past it is killed and fails "
                   "with JobTimeout. Default: no limit.")
@click.option("--shutdown-timeout", type=PositiveSeconds(), default=30.0, show_default=True,
              envvar="LITEMULTISTEP_SHUTDOWN_TIMEOUT", show_envvar=True,
              help="On SIGTERM or Ctrl-C, seconds running jobs may take to finish before they are stopped "
                   "and put back in their queues.")
@click.option("--max-crashes", type=click.IntRange(1, 1000), default=3, show_default=True,
              envvar="LITEMULTISTEP_MAX_CRASHES", show_envvar=True,
              help="Times a job's process may die running it (segfault, os._exit, killed) before the job "
                   "fails with WorkerCrashed.")
@click.option("--lease", type=PositiveSeconds(), default=30.0, show_default=True,
              envvar="LITEMULTISTEP_LEASE", show_envvar=True,
              help="Seconds a worker whose lock file was removed still counts as alive after its last "
                   "heartbeat (liveness is otherwise its OS lock, exact on one host).")
@click.option("--batch", type=click.IntRange(1, 1000), default=256, show_default=True,
              envvar="LITEMULTISTEP_BATCH", show_envvar=True,
              help="Most jobs handed to a job process at once; fewer when a task's jobs take longer than "
                   "a few milliseconds in all.")
@click.option("--poll", type=click.FloatRange(0.001, 5), default=0.02, show_default=True,
              envvar="LITEMULTISTEP_POLL", show_envvar=True,
              help="Seconds between looks at the file while idle, where inotify is not available.")
@click.option("-v", "--verbose", is_flag=True, envvar="LITEMULTISTEP_VERBOSE", show_envvar=True,
              help="Log debug details.")
@click.option("-q", "--quiet", is_flag=True, envvar="LITEMULTISTEP_QUIET", show_envvar=True,
              help="Log warnings and errors only (no line per job).")
def worker(db: str, concurrency: int, queues: Sequence[str], burst: bool, paths: Sequence[str],
           allow_modules: Sequence[str], timeout: float | None, shutdown_timeout: float, max_crashes: int,
           lease: float, batch: int, poll: float, verbose: bool, quiet: bool) -> None:
    """Run jobs from DB in N job processes, each running one job at a time.

    The worker process itself runs no job: it claims jobs, records results, enforces time limits and
    keeps its liveness, so a job that hangs or crashes cannot harm it. A job that raises is recorded
    as a failure; one that kills its process is retried up to --max-crashes times, then fails.

    SIGTERM or Ctrl-C lets running jobs finish (at most --shutdown-timeout seconds) and exits 0; a
    second one stops them at once, puts them back in their queues and exits 1. Exit 2: the worker
    cannot work (bad database, bad option).
    """
    _setup_logging(verbose, quiet)
    options = WorkerOptions(db=db, concurrency=concurrency, queues=list(queues), burst=burst, paths=list(paths),
                            lease=lease, batch=batch, poll=poll, allow_modules=list(allow_modules),
                            timeout=timeout, shutdown_timeout=shutdown_timeout, max_crashes=max_crashes,
                            verbose=verbose, quiet=quiet)
    try:
        code = run_worker(options)
    except (DatabaseUnusable, InvalidSetting) as e:
        _error(str(e))
        sys.exit(2)
    sys.exit(code)


# -- status and watch -------------------------------------------------------------------------------


def _counts(p: views.Progress) -> str:
    return (f"{p.completed_count} done / {p.failed_count} failed / {p.pending_count} pending / "
            f"{p.running_count} running of {p.total_job_count}")


@cli.command(context_settings=CONTEXT)
@db_argument
@click.argument("task_id", required=False)
@json_option
def status(db: str, task_id: str | None, as_json: bool) -> None:
    """Show active and recently finished tasks, or one task in detail."""
    database = _open(db)
    if task_id is not None:
        _status_one(database, task_id, as_json)
        return
    active, finished = views.active_tasks(database), views.finished_tasks(database)
    if as_json:
        _emit_json({"database": database.path, "tasks": [p.as_dict() for p in active],
                    "finished": [p.as_dict() for p in finished]})
        return
    now = time.time()
    if not out.is_terminal:  # piped: plain lines, one per task, nothing cut
        for p in active:
            print(f"{p.task_id}\t{p.state}\t{p.percent:.0f}%\t{_counts(p)}\tage {_age(now - p.created_at)}")
        for p in finished:
            print(f"{p.task_id}\tfinished\t100%\t{p.total_job_count} jobs\t"
                  f"{_age(now - (p.finished_at or now))} ago")
        if not active and not finished:
            print("No active tasks.")
        return
    if not active:
        out.print("No active tasks.")
    else:
        table = Table(title=f"Active tasks in {database.path}", title_justify="left")
        for col in ("task", "progress", "done", "failed", "pending", "running", "total", "state", "age"):
            table.add_column(col, justify="right" if col not in ("task", "progress", "state") else "left",
                             no_wrap=col == "task")
        for p in active:
            table.add_row(p.task_id, ProgressBar(total=max(p.total_job_count, 1), completed=p.completed_count,
                                                 width=20),
                          str(p.completed_count), str(p.failed_count), str(p.pending_count), str(p.running_count),
                          str(p.total_job_count), p.state, _age(now - p.created_at))
        out.print(table)
    if finished:
        table = Table(title="Recently finished", title_justify="left")
        for col in ("task", "jobs", "took", "finished"):
            table.add_column(col, no_wrap=col == "task")
        for p in finished:
            table.add_row(p.task_id, str(p.total_job_count), _age((p.finished_at or now) - p.created_at),
                          f"{_age(now - (p.finished_at or now))} ago")
        out.print(table)


def _status_one(database: Database, task_id: str, as_json: bool) -> None:
    p = views.progress(database, task_id)
    chain = views.finalizers(database, task_id)
    fails = views.failures(database, task_id)
    if as_json:
        _emit_json({"task": p.as_dict(), "finalizers": chain, "failures": [f.as_dict() for f in fails]})
        return
    out.print(f"[bold]{p.task_id}[/]  {p.state}  {p.percent:.0f}%", highlight=False)
    out.print(f"  {_counts(p)}", highlight=False)
    out.print(f"  normal jobs {p.normal_job_count}, finalization jobs {p.finalize_job_count}, "
              f"finalizable: {'yes' if p.finalizable else 'no'}", highlight=False)
    if chain:
        out.print("  finalizers:")
        for link in chain:
            out.print(f"    {link['position'] + 1}. {link['func']} {link['state']}", highlight=False)
    for failure in fails:
        out.print(f"  [red]failed[/] job {failure.job_id} {failure.func}: {failure.exc_type}: {failure.message}",
                  highlight=False, markup=False)


@cli.command(context_settings=CONTEXT)
@db_argument
@click.argument("task_id")
@click.option("--timeout", type=float, default=None, help="Give up (exit 2) after this many seconds.")
@click.option("--interval", type=click.FloatRange(0.01), default=0.2, show_default=True,
              help="Seconds between updates.")
def watch(db: str, task_id: str, timeout: float | None, interval: float) -> None:
    """Follow a task with a progress bar until it finishes (exit 0) or is blocked by failures (exit 1)."""
    database = _open(db)
    views.progress(database, task_id)  # an unknown id fails before any bar is drawn
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=False,
                   disable=not err.is_terminal)
    last_line = ""
    with bar:
        handle = bar.add_task(task_id, total=None, rate="")
        while True:
            p = views.progress(database, task_id)
            speed = bar.tasks[0].speed
            bar.update(handle, total=p.total_job_count, completed=p.completed_count,
                       rate=f"{speed:,.0f} jobs/s" if speed else "")
            if not err.is_terminal:
                line = f"{task_id}: {_counts(p)} ({p.state})"
                if line != last_line:
                    err.print(line, highlight=False)
                    last_line = line
            if p.settled:
                break
            if deadline is not None and time.monotonic() >= deadline:
                err.print(f"{task_id} did not finish within {timeout} s: {_counts(p)}", highlight=False)
                sys.exit(2)
            time.sleep(interval)
    if p.finished:
        out.print(f"{task_id} finished: {p.total_job_count} jobs done", highlight=False)
        return
    out.print(f"{task_id} is blocked by {p.failed_count} failed job(s):", highlight=False)
    for f in views.failures(database, task_id):
        out.print(f"  job {f.job_id} {f.func}: {f.exc_type}: {f.message}", highlight=False)
    out.print(f"Retry them with: litemultistep retry {database.path} --task {task_id}", highlight=False)
    sys.exit(1)


# -- failures ---------------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@db_argument
@click.option("--task", "task_id", metavar="TASK_ID", help="Only this task's failures.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show each failure's traceback.")
@json_option
def failed(db: str, task_id: str | None, show_traceback: bool, as_json: bool) -> None:
    """List failed jobs: job id, task, callable, exception and message, attempt, time."""
    database = _open(db)
    if task_id is not None:
        views.progress(database, task_id)  # unknown id: a clear error
    fails = views.failures(database, task_id)
    if as_json:
        _emit_json({"failures": [f.as_dict() for f in fails]})
        return
    if not fails:
        out.print("No failed jobs.")
        return
    for f in fails:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.failed_at))
        kind = "finalizer" if f.finalizer else "job"
        out.print(f"{kind} {f.job_id} of {f.task_id}: {f.func}  attempt {f.attempt}, {when}", highlight=False)
        out.print(f"  {f.exc_type}: {f.message}", highlight=False, markup=False)
        if show_traceback:
            out.print("  " + f.traceback.rstrip().replace("\n", "\n  "), highlight=False, markup=False)


@cli.command(context_settings=CONTEXT)
@db_argument
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--task", "task_id", metavar="TASK_ID", help="Retry every failed job of this task.")
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed job.")
@json_option
def retry(db: str, job_ids: tuple[int, ...], task_id: str | None, retry_all: bool, as_json: bool) -> None:
    """Requeue failed jobs (JOB_ID ..., --task ID or --all); a retried finalizer resumes its chain."""
    if sum(bool(x) for x in (job_ids, task_id, retry_all)) != 1:
        raise click.UsageError("name what to retry: JOB_ID ..., --task TASK_ID, or --all (one of them)")
    database = _open(db)
    if job_ids:
        ids = engine.retry_jobs(database, job_ids)
    elif task_id is not None:
        ids = engine.retry_task(database, task_id)
    else:
        ids = engine.retry_all(database)
    if as_json:
        _emit_json({"retried": ids})
    elif ids:
        out.print(f"Requeued {len(ids)} job(s): {', '.join(map(str, ids))}", highlight=False)
    else:
        out.print("No failed jobs to retry.")


# -- workers, nuke, check ---------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@db_argument
@json_option
def workers(db: str, as_json: bool) -> None:
    """List registered workers: pid, since when, the jobs each holds now."""
    database = _open(db)
    rows = views.workers(database)
    if as_json:
        _emit_json({"workers": [w.as_dict() for w in rows]})
        return
    if not rows:
        out.print("No workers.")
        return
    table = Table(title=f"Workers on {database.path}", title_justify="left")
    for col in ("id", "pid", "host", "kind", "since", "alive", "running jobs", "queues"):
        table.add_column(col)
    now = time.time()
    for w in rows:
        table.add_row(str(w.id), str(w.pid), w.hostname, w.kind, _age(now - w.started_at) + " ago",
                      "yes" if w.alive else "[red]no[/]", ", ".join(map(str, w.running_job_ids)) or "-",
                      w.queues or "all")
    out.print(table)


@cli.command(context_settings=CONTEXT)
@db_argument
@click.argument("task_id")
@click.option("--yes", is_flag=True, help="Do not ask first.")
def nuke(db: str, task_id: str, yes: bool) -> None:
    """Remove a task, its queue and its failures, finished or not."""
    database = _open(db)
    p = views.progress(database, task_id)
    if p.finished:
        raise LiteMultiStepError(f"task {task_id} has already finished: there is nothing to nuke")
    if not yes:
        click.confirm(f"Remove task {task_id} ({_counts(p)})?", abort=True, err=True)
    engine.delete_task(database, task_id)
    out.print(f"Removed task {task_id}.", highlight=False)


@cli.command(context_settings=CONTEXT)
@db_argument
@click.option("--repair", is_flag=True, help="Fix what is found.")
@json_option
def check(db: str, repair: bool, as_json: bool) -> None:
    """Recount counters from the job rows, find dead workers' claims and stalled finalizations.

    Runs SQLite's integrity check too. Exits 1 when problems remain (not repaired).
    """
    database = _open(db)
    problems = engine.check(database, repair=repair)
    if as_json:
        _emit_json({"ok": not problems, "problems": [p.__dict__ for p in problems]})
    elif not problems:
        out.print(f"{database.path}: ok")
    else:
        for p in problems:
            what = "repaired" if p.repaired else "found"
            out.print(f"{what}: {p.kind} {p.task_id or ''}: {p.detail}", highlight=False)
    if any(not p.repaired for p in problems):
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="litemultistep",
                 standalone_mode=False)
    except click.exceptions.Abort:
        err.print("Aborted.")
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except LiteMultiStepError as e:
        _error(str(e))
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    return 0

